"""cifar100/train.py end to end on a tiny CIFAR-100 written in the real on-disk format (CPU, no network)."""
import http.server
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from cifar100 import train
from cifar100.models import build_model
from cifar100.teachers import TeacherNotFoundError, resolve_teacher_checkpoint, zoo_checkpoint_path
from cifar_fixtures import write_fake_cifar100, write_teacher_zoo

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("args.json", "invocations.jsonl", "log.txt", "checkpoint.pth", "student_best.pth", "student_last.pth",
             "done.json")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, n_train=192, n_test=96, seed=0)
    return root


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return write_teacher_zoo(tmp_path_factory.mktemp("zoo"), "resnet8")


def make_args(cifar_root, output_dir, *extra):
    return train.get_args_parser().parse_args(
        ["--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu",
         "--output_dir", str(output_dir), "--epochs", "2", "--batch_size", "64", "--print_freq", "1000",
         *extra]
    )


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("method,terms", [
    ("ce", {"ce"}),
    ("kd", {"ce", "kd"}),
    ("dkd", {"ce", "tckd", "nckd"}),
    ("fcka", {"ce", "fcka"}),
    ("lcka", {"ce", "lcka_intra", "lcka_inter"}),
    ("rcka", {"ce", "fcka", "lcka_intra", "lcka_inter"}),
])
def test_short_distillation_writes_every_run_file(cifar_root, zoo_dir, tmp_path, method, terms):
    out = tmp_path / method
    extra = ["--student", "resnet8", "--method", method]
    if method != "ce":
        extra += ["--teacher", "resnet8", "--zoo_dir", str(zoo_dir)]
    summary = train.main(make_args(cifar_root, out, *extra))
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    log = read_log(out / "log.txt")
    assert [entry["epoch"] for entry in log] == [0, 1]
    for entry in log:
        assert {f"train_{t}" for t in terms} | {"train_loss", "test_acc1", "test_acc5", "lr", "epoch_time"} <= set(entry)
        assert all(isinstance(entry[f"train_{t}"], float) for t in terms)
    done = json.loads((out / "done.json").read_text())
    assert done == summary
    assert done["method"] == method and done["epochs"] == 2 and done["last_acc1"] == log[-1]["test_acc1"]
    assert done["best_acc1"] == max(entry["test_acc1"] for entry in log)
    metadata = json.loads((out / "args.json").read_text())
    assert metadata["args"]["method"] == method and "git_commit" in metadata and metadata["derived"]["lr"] == 0.05
    assert metadata["identity"] == done["identity"] and metadata["identity"]["method"] == method
    best = torch.load(out / "student_best.pth", weights_only=True)
    assert set(best) == {"model", "epoch", "acc"} and best["acc"] == done["best_acc1"]
    build_model("resnet8").load_state_dict(best["model"], strict=True)
    if method != "ce":
        teacher_eval = json.loads((out / "teacher_eval.json").read_text())
        assert list(teacher_eval) == [metadata["identity"]["teacher_sha256"]]  # keyed by the checkpoint's sha256
        assert 0.0 <= teacher_eval[metadata["identity"]["teacher_sha256"]]["acc1"] <= 100.0


def test_dkd_warmup_ramps_the_loss_in(cifar_root, zoo_dir, tmp_path):
    out = tmp_path / "dkd"
    train.main(make_args(cifar_root, out, "--student", "resnet8", "--teacher", "resnet8", "--zoo_dir", str(zoo_dir),
                         "--method", "dkd", "--dkd_warmup", "2"))
    log = read_log(out / "log.txt")
    # Epoch 0 runs at half weight; with the same teacher the ratio of nckd to tckd is unaffected.
    assert log[0]["train_nckd"] > 0 and log[0]["train_tckd"] > 0


def run_cli(*args, timeout=300, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "cifar100" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


def cli_args(cifar_root, out, epochs):
    return ["--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu", "--output_dir",
            str(out), "--epochs", str(epochs), "--batch_size", "32", "--student", "resnet8", "--print_freq", "1000",
            "--lr_decay_epochs", "2", "3"]


@pytest.mark.slow
def test_resume_after_kill_gives_identical_weights(cifar_root, tmp_path):
    epochs = 4
    reference = tmp_path / "uninterrupted"
    result = run_cli(*cli_args(cifar_root, reference, epochs))
    assert result.returncode == 0, result.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "cifar100" / "train.py"), *cli_args(cifar_root, killed, epochs)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = killed / "log.txt"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-training: in epoch 2, after epoch 1's checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "done.json").exists()

    resumed = run_cli(*cli_args(cifar_root, killed, epochs))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = torch.load(reference / "student_last.pth", weights_only=True)["model"]
    b = torch.load(killed / "student_last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [e["epoch"] for e in read_log(killed / "log.txt")][-1] == epochs - 1


def test_a_finished_run_is_not_redone(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(make_args(cifar_root, out, "--student", "resnet8", "--epochs", "1"))
    log_before = (out / "log.txt").read_text()
    checkpoint_mtime = (out / "checkpoint.pth").stat().st_mtime_ns
    summary = train.main(make_args(cifar_root, out, "--student", "resnet8", "--epochs", "1"))
    assert "Nothing to do" in capsys.readouterr().out
    assert (out / "log.txt").read_text() == log_before
    assert (out / "checkpoint.pth").stat().st_mtime_ns == checkpoint_mtime
    assert summary["last_acc1"] == json.loads((out / "done.json").read_text())["last_acc1"]


def test_eval_evaluates_a_zoo_checkpoint(cifar_root, zoo_dir, tmp_path):
    ckpt = zoo_dir / "cifar_teachers" / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    stats = train.main(make_args(cifar_root, tmp_path / "eval", "--student", "resnet8", "--eval", "--resume", str(ckpt)))
    assert set(stats) == {"acc1", "acc5", "loss"} and 0 <= stats["acc1"] <= stats["acc5"] <= 100


def test_teacher_below_its_claim_warns_or_stops_with_strict_teacher(cifar_root, tmp_path, capsys):
    ckpt = tmp_path / "claims_99.pth"
    torch.save({"model": build_model("resnet8").state_dict(), "acc": 99.0}, ckpt)
    base = ["--student", "resnet8", "--teacher", "resnet8", "--teacher_ckpt", str(ckpt), "--epochs", "1"]
    train.main(make_args(cifar_root, tmp_path / "warn", *base))
    assert "WARNING" in capsys.readouterr().out
    with pytest.raises(train.TeacherCheckError, match="claimed 99.00"):
        train.main(make_args(cifar_root, tmp_path / "strict", *base, "--strict_teacher"))


# ---------------------------------------------------------------- teacher zoo download (loopback HTTP server)
@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_missing_teacher_is_downloaded_from_the_zoo_archive_and_unpacked(cifar_root, tmp_path, http_server):
    served, url = http_server
    teacher_file = tmp_path / "pack" / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    teacher_file.parent.mkdir(parents=True)
    torch.save({"model": build_model("resnet56").state_dict()}, teacher_file)
    with tarfile.open(served / "cifar_teachers.tar", "w") as tar:
        tar.add(tmp_path / "pack" / "cifar_teachers", arcname="cifar_teachers")
    new_zoo, out = tmp_path / "new_zoo", tmp_path / "run"
    args = train.get_args_parser().parse_args(
        ["--data_path", str(cifar_root), "--no_verify_data", "--device", "cpu", "--output_dir", str(out),
         "--epochs", "1", "--student", "resnet8", "--teacher", "resnet56", "--method", "kd",
         "--zoo_dir", str(new_zoo), "--zoo_url", f"{url}/cifar_teachers.tar"]
    )
    train.main(args)
    assert zoo_checkpoint_path(new_zoo, "resnet56").is_file()
    assert (out / "done.json").is_file()


def test_failed_teacher_download_names_both_ways_out(tmp_path, http_server):
    _, url = http_server
    with pytest.raises(TeacherNotFoundError) as err:
        resolve_teacher_checkpoint("resnet56", None, tmp_path / "zoo", url=f"{url}/missing.tar")
    message = str(err.value)
    assert "missing.tar" in message and "tar -xf" in message and "--teacher_ckpt" in message
    with pytest.raises(TeacherNotFoundError, match="has no resnet8 teacher"):
        resolve_teacher_checkpoint("resnet8", None, tmp_path / "zoo", url=f"{url}/missing.tar")


# ---------------------------------------------------------------- bad inputs: clear errors, no tracebacks
def test_unknown_architecture_lists_the_choices():
    result = run_cli("--student", "resnet21")
    assert result.returncode == 2
    assert "resnet21" in result.stderr and "resnet20" in result.stderr and "wrn_40_2" in result.stderr


def test_main_job_without_data_says_how_to_get_cifar100(tmp_path):
    result = run_cli("--teacher", "resnet56", "--student", "resnet20", "--data_path", str(tmp_path / "nodata"),
                     "--no_download", "--device", "cpu", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cifar-100-python" in result.stderr and str(tmp_path / "nodata") in result.stderr


def test_mismatched_teacher_checkpoint_names_both_architectures(cifar_root, tmp_path):
    ckpt = tmp_path / "wrong.pth"
    torch.save({"model": build_model("resnet8x4").state_dict()}, ckpt)
    result = run_cli(*cli_args(cifar_root, tmp_path / "out", 1), "--teacher", "resnet8", "--teacher_ckpt", str(ckpt))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "resnet8" in result.stderr and str(ckpt) in result.stderr and "--teacher" in result.stderr


def test_corrupt_checkpoint_is_a_clear_error(cifar_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated")
    result = run_cli(*cli_args(cifar_root, out, 1))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "checkpoint.pth" in result.stderr and "corrupt" in result.stderr.lower()


def test_method_without_teacher_is_a_usage_error(cifar_root, tmp_path):
    with pytest.raises(train.UsageError, match="--teacher"):
        train.main(make_args(cifar_root, tmp_path / "x", "--method", "rcka"))


def test_amp_and_channels_last_train_on_cpu(cifar_root, zoo_dir, tmp_path):
    # bf16 autocast and channels-last are the GPU fast path; the same code runs on CPU.
    out = tmp_path / "amp"
    summary = train.main(make_args(cifar_root, out, "--student", "resnet8", "--teacher", "resnet8", "--zoo_dir",
                                   str(zoo_dir), "--epochs", "1", "--amp", "--channels_last"))
    log = read_log(out / "log.txt")
    assert all(torch.isfinite(torch.tensor(log[0][f"train_{k}"])) for k in ("fcka", "lcka_intra", "lcka_inter"))
    assert 0 <= summary["last_acc1"] <= 100


def test_torchvision_loader_path_trains(cifar_root, tmp_path):
    out = tmp_path / "pil"
    summary = train.main(make_args(cifar_root, out, "--student", "resnet8", "--epochs", "1", "--loader",
                                   "torchvision", "--num_workers", "0"))
    assert (out / "done.json").is_file() and 0 <= summary["last_acc1"] <= 100


@pytest.mark.slow
def test_compile_trains_and_taps_still_record_features(cifar_root, zoo_dir, tmp_path):
    # torch.compile must keep the forward hooks that FCKA reads; inductor builds C++ kernels on CPU too.
    out = tmp_path / "compiled"
    train.main(make_args(cifar_root, out, "--student", "resnet8", "--teacher", "resnet8", "--zoo_dir", str(zoo_dir),
                         "--epochs", "1", "--compile"))
    log = read_log(out / "log.txt")
    assert log[0]["train_fcka"] > 0 and (out / "done.json").is_file()


def test_epoch_logged_but_not_checkpointed_is_logged_once_after_resume(cifar_root, tmp_path):
    # A kill between the epoch's log line and its checkpoint makes the resumed run redo that epoch.
    out = tmp_path / "run"
    train.main(make_args(cifar_root, out, "--student", "resnet8", "--epochs", "2"))
    (out / "done.json").unlink()
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps({"epoch": 2, "test_acc1": -1.0}) + "\n")
    train.main(make_args(cifar_root, out, "--student", "resnet8", "--epochs", "3"))
    log = read_log(out / "log.txt")
    assert [entry["epoch"] for entry in log] == [0, 1, 2]
    assert log[-1]["test_acc1"] >= 0


def test_ce_with_a_teacher_flag_trains_the_student_alone(cifar_root, tmp_path, capsys):
    out = tmp_path / "ce"
    train.main(make_args(cifar_root, out, "--student", "resnet8", "--teacher", "resnet8", "--method", "ce",
                         "--epochs", "1"))
    assert "is not loaded" in capsys.readouterr().out
    assert set(k for k in read_log(out / "log.txt")[0] if k.startswith("train_")) == {"train_loss", "train_ce"}
    assert not (out / "teacher_eval.json").exists()
