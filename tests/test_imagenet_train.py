"""imagenet/train.py end to end on a generated ImageFolder of small JPEGs (CPU, no network): the real architectures
at 16-32 pixels, one short run per method, resume after SIGKILL, the teacher check, errors, and 2-process DDP."""
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from common.evaluation import state_dict_sha256
from imagenet import train
from imagenet.models import build_model
from common.run import file_sha256
from imagenet.teachers import TeacherNotFoundError, resolve_teacher_checkpoint
from imagenet_fixtures import write_fake_imagenet, write_torchvision_teacher

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("args.json", "log.txt", "checkpoint.pth", "student_best.pth", "student_last.pth", "done.json")
# 4 classes, --subset 2: one training step of 8 images per epoch, 8 validation images.
SMALL = ["--num_classes", "4", "--subset", "2",
         "--train_crop_size", "16", "--val_resize_size", "18", "--val_crop_size", "16",
         "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--print_freq", "1000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_imagenet(tmp_path_factory.mktemp("imagenet"), classes=4, train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {arch: write_torchvision_teacher(root / f"{arch}.pth", arch, 4) for arch in ("resnet34", "resnet50")}


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher_eval")


def make_args(data, out, *extra, epochs=1):
    return train.get_args_parser().parse_args(
        ["--data_path", str(data), "--output_dir", str(out), "--epochs", str(epochs), *SMALL, *extra])


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "imagenet" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.parametrize("method,teacher,student,terms", [
    ("ce", None, "resnet18", {"ce"}),
    ("kd", "resnet34", "resnet18", {"ce", "kd"}),
    ("dkd", "resnet50", "mobilenet_v1", {"ce", "tckd", "nckd"}),
    ("fcka", "resnet34", "resnet18", {"ce", "fcka"}),
    ("lcka", "resnet34", "resnet18", {"ce", "lcka_intra", "lcka_inter"}),
    ("rcka", "resnet50", "mobilenet_v1", {"ce", "fcka", "lcka_intra", "lcka_inter"}),
])
def test_short_distillation_writes_every_run_file(data, teachers, eval_cache, tmp_path, method, teacher, student,
                                                   terms):
    out = tmp_path / method
    extra = ["--student", student, "--method", method]
    if teacher:
        extra += ["--teacher", teacher, "--teacher_ckpt", str(teachers[teacher]),
                  "--teacher_eval_cache", str(eval_cache)]
    summary = train.main(make_args(data, out, *extra))
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    (entry,) = read_log(out / "log.txt")
    assert {f"train_{t}" for t in terms} | {"train_loss", "test_acc1", "test_acc5", "lr"} <= set(entry)
    assert 0 <= entry["test_acc1"] <= entry["test_acc5"] <= 100
    done = json.loads((out / "done.json").read_text())
    assert done == summary and done["method"] == method and done["last_acc5"] == entry["test_acc5"]
    identity = json.loads((out / "args.json").read_text())["identity"]
    assert identity["train_crop_size"] == 16 and identity["subset"] == 2 and identity["amp"] is False
    if method == "dkd":  # DKD's per-pair beta (configs/imagenet/r50_mv1/dkd.yaml) and warm-up of 1 epoch
        assert identity["dkd_beta"] == 2.0 and identity["dkd_warmup"] == 1 and identity["dkd_temperature"] == 1.0
    if method == "kd":  # configs/imagenet kd.yaml: T 1, CE 0.5, KD 0.5
        assert identity["ce_weight"] == 0.5 and identity["kd_weight"] == 0.5 and identity["kd_temperature"] == 1.0
    best = torch.load(out / "student_best.pth", weights_only=True)
    build_model(student, 4).load_state_dict(best["model"], strict=True)


def test_recipe_defaults_and_the_linear_lr_scaling(capsys, data, tmp_path):
    args = train.get_args_parser().parse_args(["--teacher", "resnet34"])
    cfg = train.derive_config(args, world_size=8)
    assert (args.epochs, args.batch_size, args.momentum, args.weight_decay, args.lr_decay_epochs) == \
        (100, 512, 0.9, 1e-4, [30, 60, 90])
    assert cfg["lr"] == 0.2 and cfg["batch_size_per_process"] == 64 and cfg["dkd_beta"] == 0.5
    scaled = train.derive_config(train.get_args_parser().parse_args(["--batch_size", "256"]), world_size=1)
    assert scaled["lr"] == 0.1 and "linear scaling" in scaled["lr_rule"]
    train.main(make_args(data, tmp_path / "run", "--student", "mobilenet_v1"))
    assert "learning rate 0.003125 (0.2 x 8/512 (linear scaling))" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "args.json").read_text())["derived"]["lr"] == 0.003125


def test_default_output_dir_names_what_differs_from_the_recipe():
    parse = train.get_args_parser().parse_args
    assert train.default_output_dir(parse(["--teacher", "resnet34"])) == "output/imagenet/resnet34_resnet18/rcka/seed0"
    assert train.default_output_dir(parse(["--teacher", "resnet34", "--subset", "10", "--seed", "2"])) == \
        "output/imagenet/resnet34_resnet18/rcka-subset10/seed2"


# ---------------------------------------------------------------- the teacher check
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


def test_teacher_is_downloaded_hash_checked_measured_once_and_printed_beside_its_published_top1(
        data, tmp_path, http_server, capsys):
    served, url = http_server
    weights = write_torchvision_teacher(tmp_path / "w.pth", "resnet34", 4)
    name = f"resnet34-{file_sha256(weights)[:8]}.pth"  # torchvision's naming: the sha256 prefix is checked
    os.replace(weights, served / name)
    common = ["--teacher", "resnet34", "--student", "mobilenet_v1", "--method", "kd",
              "--weights_dir", str(tmp_path / "hub"), "--teacher_url", f"{url}/{name}",
              "--teacher_eval_cache", str(tmp_path / "cache")]
    train.main(make_args(data, tmp_path / "a", *common))
    out = capsys.readouterr().out
    assert (tmp_path / "hub" / name).is_file()
    assert "published 73.31" in out and "measured in" in out and "not comparable" in out
    train.main(make_args(data, tmp_path / "b", *common, "--seed", "1"))  # another run, the same teacher file
    assert "cached in" in capsys.readouterr().out
    bad = "resnet34-00000000.pth"
    (served / bad).write_bytes((served / name).read_bytes())
    with pytest.raises(TeacherNotFoundError, match="downloading .* failed"):
        resolve_teacher_checkpoint("resnet34", None, tmp_path / "hub", f"{url}/{bad}")
    with pytest.raises(TeacherNotFoundError, match="--no_download"):
        resolve_teacher_checkpoint("resnet50", None, tmp_path / "hub", download=False)


def test_teacher_below_its_published_top1_warns_or_stops_with_strict_teacher(data, teachers, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(train, "FULL_VAL_IMAGES", 8)  # our 8 validation images stand for the 50,000
    ckpt = tmp_path / "claims_99.pth"
    torch.save({"model": torch.load(teachers["resnet34"], weights_only=True), "acc": 99.0}, ckpt)
    base = ["--teacher", "resnet34", "--teacher_ckpt", str(ckpt), "--teacher_eval_cache", str(tmp_path / "cache")]
    train.main(make_args(data, tmp_path / "warn", *base))
    assert "WARNING" in capsys.readouterr().out
    with pytest.raises(train.TeacherCheckError, match="published 99.00"):
        train.main(make_args(data, tmp_path / "strict", *base, "--strict_teacher"))


# ---------------------------------------------------------------- bad inputs: one-line errors, no tracebacks
def cli_error(*argv) -> str:
    """What the command line prints for a user error: cli() exits with the message (no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        train.cli(list(argv))
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("error: ")
    return exit_.value.code


def test_teacher_of_another_architecture_is_a_clear_error(data, teachers, tmp_path):
    message = cli_error("--data_path", str(data), "--output_dir", str(tmp_path / "out"), *SMALL, "--teacher",
                        "resnet34", "--teacher_ckpt", str(teachers["resnet50"]))
    assert "'resnet34'" in message and str(teachers["resnet50"]) in message


def test_unknown_architecture_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.get_args_parser().parse_args(["--student", "resnet19"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "resnet19" in err and "mobilenet_v1" in err


def test_flat_validation_folder_is_a_clear_error_from_the_command_line(tmp_path):
    root = write_fake_imagenet(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    for folder in list((root / "val").iterdir()):
        for image in folder.iterdir():
            image.rename(root / "val" / image.name)
        folder.rmdir()
    message = cli_error("--data_path", str(root), "--output_dir", str(tmp_path / "out"), *SMALL)
    assert "one folder per class" in message and "torchvision.datasets.ImageNet" in message


def test_method_without_teacher_is_a_usage_error(data, tmp_path):
    assert "--teacher" in cli_error("--data_path", str(data), *SMALL, "--method", "rcka")


def test_subset_is_part_of_the_runs_identity(data, tmp_path):
    out = tmp_path / "run"
    train.main(make_args(data, out))
    assert json.loads((out / "done.json").read_text())["identity"]["subset"] == 2
    with pytest.raises(train.RunError, match="subset: 2 there, 3 now"):
        train.main(make_args(data, out, "--subset", "3"))


# ---------------------------------------------------------------- resume and DDP
@pytest.mark.slow
def test_resume_after_kill_gives_identical_weights(data, tmp_path):
    flags = ["--data_path", str(data), *SMALL, "--subset", "4", "--student", "mobilenet_v1", "--epochs", "3",
             "--lr_decay_epochs", "2"]  # two steps per epoch
    reference = tmp_path / "uninterrupted"
    result = run_cli(*flags, "--output_dir", str(reference))
    assert result.returncode == 0, result.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "imagenet" / "train.py"), *flags, "--output_dir", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoint.pth").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in epoch 1, after epoch 0's checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "done.json").exists()

    resumed = run_cli(*flags, "--output_dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = torch.load(reference / "student_last.pth", weights_only=True)["model"]
    b = torch.load(killed / "student_last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["epoch"] for e in read_log(killed / "log.txt")] == [0, 1, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_weights_and_evaluate_like_one(data, teachers, tmp_path):
    out = tmp_path / "ddp"
    flags = ["--data_path", str(data), *SMALL, "--teacher", "resnet34", "--teacher_ckpt", str(teachers["resnet34"]),
             "--teacher_eval_cache", str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(REPO / "imagenet" / "train.py"), *flags, "--epochs", "1", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    done = json.loads((out / "done.json").read_text())
    fingerprints = [line.split()[-1] for line in result.stdout.splitlines() if "final weights sha256" in line]
    assert len(fingerprints) == 2 and set(fingerprints) == {done["weights_sha256"]}
    assert json.loads((out / "args.json").read_text())["derived"]["batch_size_per_process"] == 4

    student = build_model("resnet18", 4)
    student.load_state_dict(torch.load(out / "student_last.pth", weights_only=True)["model"])
    assert state_dict_sha256(student) == done["weights_sha256"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes
    try:
        stats = train.main(train.get_args_parser().parse_args(
            ["--data_path", str(data), *SMALL, "--eval", "--resume", str(out / "student_last.pth")]))
    finally:
        torch.set_num_threads(threads)
    assert (stats["acc1"], stats["acc5"]) == (done["last_acc1"], done["last_acc5"])
