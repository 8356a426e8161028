"""The run lifecycle of cifar100/train.py: bad input stops early and clearly, a run knows its settings.

The bad-input matrix is one table of cases: command -> exit code, no traceback, a message that names the problem
and the fix. Most cases run the real command-line entry (train.cli) in this process, which is what
``python cifar100/train.py`` runs; the ones that need a real process (Ctrl-C) run one.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar100 import train
from cifar100.models import build_model
from cifar_fixtures import write_fake_cifar100, write_teacher_zoo
from common.run import RunFolder, read_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, n_train=96, n_test=64, seed=0)
    return root


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return write_teacher_zoo(tmp_path_factory.mktemp("zoo"), "resnet8")


@pytest.fixture(scope="module")
def finished_run(cifar_root, zoo_dir, tmp_path_factory):
    """One finished 1-epoch RCKA run (resnet8 -> resnet8), shared by the cases that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(parse(base(cifar_root, out, zoo_dir)))
    return out


def base(cifar_root, out, zoo_dir=None, *extra):
    """The issue's `A`: a distillation on generated data (teacher from the generated zoo), 1 epoch."""
    argv = ["--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu",
            "--output_dir", str(out), "--epochs", "1", "--batch_size", "32", "--print_freq", "1000",
            "--student", "resnet8"]
    if zoo_dir is not None:
        argv += ["--teacher", "resnet8", "--zoo_dir", str(zoo_dir)]
    return argv + list(extra)


def parse(argv):
    return train.get_args_parser().parse_args(argv)


def run_cli_in_process(argv, capsys, with_stdout=False):
    """(exit code, stderr) of `python cifar100/train.py ARGV`. An error that is not a user error escapes as an
    exception and fails the test: that is the traceback a user would see."""
    try:
        train.cli(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    captured = capsys.readouterr()
    return (code, captured.err, captured.out) if with_stdout else (code, captured.err)


# ------------------------------------------------------------------------------------------------ the matrix
def _truncate(folder: Path):
    data = (folder / "cifar-100-python" / "train").read_bytes()
    (folder / "cifar-100-python" / "train").write_bytes(data[: len(data) // 3])


def _drop_fine_labels(folder: Path):
    path = folder / "cifar-100-python" / "train"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    del entry["fine_labels"]
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _os_system_pickle(folder: Path):
    (folder / "cifar-100-python" / "train").write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")


DATA_DAMAGE = {"truncated": _truncate, "no_fine_labels": _drop_fine_labels, "os_system": _os_system_pickle}

# id -> (extra flags, expected exit code, regexes the message must match). "{out}" is the run folder.
FLAG_CASES = {
    "batch_size_0": (["--batch_size", "0"], 1, [r"--batch_size 0", r"at least 2"]),
    "batch_size_1": (["--batch_size", "1"], 1, [r"--batch_size 1", r"at least 2"]),
    "lr_negative": (["--lr", "-1"], 1, [r"--lr -1", r"positive"]),
    "lr_nan": (["--lr", "nan"], 1, [r"--lr nan", r"positive"]),
    "seed_negative": (["--seed", "-1"], 1, [r"--seed -1", r"\[0, 2\*\*32\)"]),
    "print_freq_0": (["--print_freq", "0"], 1, [r"--print_freq 0", r">= 1"]),
    "num_workers_negative": (["--num_workers", "-1"], 1, [r"--num_workers -1", r"0"]),
    "epochs_0": (["--epochs", "0"], 1, [r"--epochs 0", r"at least 1"]),
    "epochs_negative": (["--epochs", "-1"], 1, [r"--epochs -1", r"at least 1"]),
    "weight_negative": (["--lcka_intra_weight", "-2"], 1, [r"--lcka_intra_weight -2", r">= 0"]),
    "decay_epochs_unsorted": (["--lr_decay_epochs", "180", "150"], 1, [r"--lr_decay_epochs", r"increasing"]),
    "device_tpu": (["--device", "tpu"], 1, [r"--device 'tpu'", r"cpu or cuda"]),
    "device_cuda_without_gpu": (["--device", "cuda"], 1, [r"--device cuda", r"no usable CUDA GPU", r"--device cpu"]),
    "fcka_stages_bad": (["--fcka_stages", "7"], 1, [r"--fcka_stages '7'", r"stages are", r"'-1'"]),
    "unknown_architecture": (["--student", "resnet21"], 2, [r"resnet21", r"resnet20", r"wrn_40_2"]),
    "cka_batch_unknown": (["--cka_batch", "world"], 2, [r"--cka_batch", r"'world'", r"'local', 'global'"]),
    "fcka_form_unknown": (["--fcka_form", "cosine"], 2, [r"--fcka_form", r"'cosine'", r"'sp', 'gram'"]),
    "dkd_beta_negative": (["--dkd_beta", "-1"], 1, [r"--dkd_beta -1", r">= 0"]),
    "missing_teacher_ckpt": (["--teacher_ckpt", "{out}/nothing.pth"], 1, [r"nothing.pth", r"not a file"]),
}


# Cases checked after the dataset is found (a missing teacher file is looked for after the data).
NEEDS_DATA = {"missing_teacher_ckpt"}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flag_is_one_clear_line_before_any_work(case, cifar_root, zoo_dir, tmp_path, capsys):
    extra, code, patterns = FLAG_CASES[case]
    out = tmp_path / "out"
    # Data that does not exist: a flag error must come first, before the dataset is looked at or loaded.
    data = cifar_root if case in NEEDS_DATA else tmp_path / "no_data_here"
    argv = base(data, out, zoo_dir, *[e.replace("{out}", str(tmp_path)) for e in extra])
    if torch.cuda.is_available() and case == "device_cuda_without_gpu":
        pytest.skip("this machine has a GPU")
    exit_code, stderr = run_cli_in_process(argv, capsys)
    assert exit_code == code, stderr
    assert "Traceback" not in stderr
    for pattern in patterns:
        assert __import__("re").search(pattern, stderr), (pattern, stderr)
    assert not out.exists(), "a failed start must not create the run folder"


def test_method_without_teacher_names_the_flag(cifar_root, tmp_path, capsys):
    code, stderr = run_cli_in_process(base(cifar_root, tmp_path / "o", None, "--method", "rcka"), capsys)
    assert code == 1 and "--teacher ARCH" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("damage", sorted(DATA_DAMAGE))
def test_damaged_dataset_file_says_to_download_again(damage, zoo_dir, tmp_path, capsys):
    root = tmp_path / "data"
    write_fake_cifar100(root, n_train=64, n_test=32, seed=1)
    DATA_DAMAGE[damage](root)
    code, stderr = run_cli_in_process(base(root, tmp_path / "out", None), capsys)
    assert code == 1 and "Traceback" not in stderr
    assert "cannot be read as a CIFAR-100 file" in stderr and "delete" in stderr and "--no_verify_data" in stderr
    assert read_run(tmp_path / "out").state == "failed"  # the report lists it as failed, not "in progress"


def test_missing_dataset_says_where_and_how_to_get_it(zoo_dir, tmp_path, capsys):
    code, stderr = run_cli_in_process(base(tmp_path / "nodata", tmp_path / "out", zoo_dir), capsys)
    assert code == 1 and "cifar-100-python" in stderr and str(tmp_path / "nodata") in stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused(cifar_root, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    code, stderr = run_cli_in_process(base(cifar_root, target, None), capsys)
    assert code == 1 and "is a file" in stderr and "Traceback" not in stderr


def test_read_only_output_dir_is_refused_before_any_work(cifar_root, tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    target = read_only / "run"
    if os.access(read_only, os.W_OK) and os.geteuid() == 0:
        # root writes through permissions; /sys is a read-only mount in containers and on most systems.
        target = Path("/sys/rcka_test_run")
        if os.access("/sys", os.W_OK) and Path("/sys").stat().st_dev == 0:  # pragma: no cover - unusual host
            pytest.skip("no read-only folder to test with")
    code, stderr = run_cli_in_process(base(cifar_root, target, None), capsys)
    assert code == 1 and "cannot write to" in stderr and "--output_dir" in stderr and "Traceback" not in stderr


def test_invalid_done_json_names_the_file_and_the_fix(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(parse(base(cifar_root, out, None)))
    (out / "done.json").write_text("{not json")
    code, stderr = run_cli_in_process(base(cifar_root, out, None), capsys)
    assert code == 1 and "done.json" in stderr and "not valid JSON" in stderr and "Delete" in stderr


def test_resume_from_a_weights_file_without_eval_says_what_to_do(finished_run, cifar_root, zoo_dir, tmp_path, capsys):
    argv = base(cifar_root, tmp_path / "new", zoo_dir, "--resume", str(finished_run / "student_best.pth"))
    code, stderr = run_cli_in_process(argv, capsys)
    assert code == 1 and "weights only" in stderr and "--eval" in stderr and "Traceback" not in stderr


def test_resume_of_a_missing_file_names_it(cifar_root, zoo_dir, tmp_path, capsys):
    code, stderr = run_cli_in_process(base(cifar_root, tmp_path / "new", zoo_dir, "--resume", str(tmp_path / "no.pth")),
                                      capsys)
    assert code == 1 and "no.pth" in stderr and "does not exist" in stderr


def test_random_bytes_teacher_is_corrupt_and_never_offered_unsafe_loading(cifar_root, tmp_path, capsys):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(os.urandom(4096))
    code, stderr = run_cli_in_process(base(cifar_root, tmp_path / "out", None, "--teacher", "resnet8",
                                           "--teacher_ckpt", str(bad)), capsys)
    assert code == 1 and "teacher.pth" in stderr and "corrupt" in stderr
    assert "weights_only=False" not in stderr and "weights_only set to False" not in stderr


def test_mismatched_teacher_is_refused_before_the_data_is_loaded(cifar_root, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "wrong.pth"
    torch.save({"model": build_model("resnet8x4").state_dict()}, ckpt)
    monkeypatch.setattr(train, "load_cifar100", lambda *a, **k: pytest.fail("data loaded before the teacher check"))
    code, stderr = run_cli_in_process(base(cifar_root, tmp_path / "out", None, "--teacher", "resnet8",
                                           "--teacher_ckpt", str(ckpt)), capsys)
    assert code == 1 and "resnet8" in stderr and str(ckpt) in stderr


def test_full_disk_says_so_and_keeps_the_last_checkpoint(cifar_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train.main(parse(base(cifar_root, out, None)))
    (out / "done.json").unlink()  # as if killed after epoch 0's checkpoint
    before = (out / "checkpoint.pth").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    code, stderr = run_cli_in_process(base(cifar_root, out, None, "--epochs", "2"), capsys)
    assert code == 1 and "Traceback" not in stderr
    assert "could not write" in stderr and "intact" in stderr and "rerun the same command" in stderr
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1.3 MB file system: room for one epoch's checkpoint and best weights of resnet8, not for the next."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill up ({mounted.stderr.strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_real_full_disk_stops_clearly_and_resume_continues_from_the_intact_checkpoint(cifar_root, zoo_dir,
                                                                                        small_tmpfs, capsys):
    out = small_tmpfs / "run"
    code, stderr = run_cli_in_process(base(cifar_root, out, zoo_dir, "--epochs", "5"), capsys)
    assert code == 1 and "could not write" in stderr and "MiB free there" in stderr and "is intact" in stderr
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert read_run(out).state == "failed"


def test_full_disk_while_logging_says_so(cifar_root, tmp_path, capsys, monkeypatch):
    import errno

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "log.txt"))

    monkeypatch.setattr(RunFolder, "append_log", enospc)
    code, stderr = run_cli_in_process(base(cifar_root, tmp_path / "run", None), capsys)
    assert code == 1 and "No space left on device" in stderr and "rerun the same command" in stderr


@pytest.mark.slow
def test_ctrl_c_says_the_run_can_be_resumed(cifar_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = base(cifar_root, out, None, "--epochs", "50")
    proc = subprocess.Popen([sys.executable, str(REPO / "cifar100" / "train.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.txt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr and "resume" in stderr
    assert read_run(out).state == "in progress"
    assert json.loads((out / "invocations.jsonl").read_text().splitlines()[-1])["event"] == "interrupted"


def test_a_batch_that_does_not_divide_the_data_never_gives_a_one_sample_batch(cifar_root, tmp_path):
    # 96 training images: batch 95 leaves one sample over, which would crash CKA; it is dropped.
    summary = train.main(parse(base(cifar_root, tmp_path / "run", None, "--teacher", "resnet8", "--teacher_ckpt",
                                    str(_teacher_file(tmp_path)), "--batch_size", "95")))
    assert summary["epochs"] == 1


def test_ddp_shards_below_two_samples_are_refused():
    args = parse(["--teacher", "resnet56", "--student", "resnet20", "--batch_size", "8"])
    with pytest.raises(train.UsageError, match="1 sample.*per process.*--batch_size 16"):
        train.derive_config(args, 8)


def _teacher_file(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.pth"
    torch.manual_seed(3)
    torch.save({"model": build_model("resnet8").state_dict()}, path)
    return path


# ------------------------------------------------------------------------------------------------ identity
def test_same_settings_spelled_differently_resume_the_same_run(finished_run, cifar_root, zoo_dir, capsys):
    # --method rcka is the default with a teacher; the launcher always spells it out.
    spelled = base(cifar_root, finished_run, zoo_dir, "--method", "rcka", "--lr", "0.05", "--num_workers", "7",
                   "--print_freq", "3")
    summary = train.main(parse(spelled))
    assert "Nothing to do" in capsys.readouterr().out
    assert summary == json.loads((finished_run / "done.json").read_text())


@pytest.mark.parametrize("change,key", [
    (["--cka_centered"], "cka_centered"),
    (["--method", "kd"], "method"),
    (["--lcka_intra_weight", "5"], "lcka_intra_weight"),
    (["--batch_size", "16"], "batch_size"),
    (["--seed", "1"], "seed"),
])
def test_different_settings_never_share_a_folder(finished_run, cifar_root, zoo_dir, capsys, change, key):
    before = (finished_run / "args.json").read_text()
    code, stderr = run_cli_in_process(base(cifar_root, finished_run, zoo_dir, *change), capsys)
    assert code == 1 and "Traceback" not in stderr
    assert "holds a run with other settings" in stderr and f"  {key}:" in stderr
    assert "leave out --output_dir" in stderr and "new --output_dir" in stderr
    assert (finished_run / "args.json").read_text() == before  # the record is never rewritten


def test_default_folders_of_different_settings_differ_and_read_well():
    def folder(*argv):
        return train.default_output_dir(parse(["--teacher", "resnet56", "--student", "resnet20", *argv]))

    assert folder() == os.path.join("output", "cifar100", "resnet56_resnet20", "rcka", "seed0")
    assert folder("--method", "rcka", "--lr", "0.05") == folder()
    assert folder("--epochs", "1") == folder()  # a run may be extended, so its length is not in its name
    variants = [folder(*flags) for flags in ([], ["--cka_centered"], ["--method", "kd"],
                                             ["--method", "kd", "--kd_temperature", "8"], ["--lr", "0.1"],
                                             ["--no_verify_data"], ["--seed", "1"], ["--amp"])]
    assert len(set(variants)) == len(variants)
    assert folder("--method", "kd", "--kd_temperature", "8").endswith(os.path.join("kd-kd_temperature8", "seed0"))
    # a flag the method does not read does not split its runs
    assert folder("--method", "kd", "--lcka_intra_weight", "3") == folder("--method", "kd")


def test_killed_run_rerun_with_another_lr_is_refused(cifar_root, tmp_path, capsys):
    out = tmp_path / "K"
    train.main(parse(base(cifar_root, out, None, "--epochs", "1")))
    (out / "done.json").unlink()  # killed after epoch 0's checkpoint
    code, stderr = run_cli_in_process(base(cifar_root, out, None, "--epochs", "3", "--lr", "0.5", "--weight_decay",
                                           "0", "--batch_size", "16"), capsys)
    assert code == 1
    for key in ("lr", "weight_decay", "batch_size"):
        assert f"  {key}:" in stderr
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.05


def test_more_epochs_extend_a_finished_run_and_fewer_are_refused(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(parse(base(cifar_root, out, None, "--epochs", "1")))
    summary = train.main(parse(base(cifar_root, out, None, "--epochs", "2")))
    assert "--epochs changed from 1 to 2" in capsys.readouterr().out
    assert summary["epochs"] == 2 and [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1]
    events = [json.loads(x)["event"] for x in (out / "invocations.jsonl").read_text().splitlines()]
    assert events == ["start", "finished", "reopened", "start", "finished"]
    assert json.loads((out / "args.json").read_text())["identity"]["epochs"] == 2
    code, stderr = run_cli_in_process(base(cifar_root, out, None, "--epochs", "1"), capsys)
    assert code == 1 and "already trained 2 epochs" in stderr


def test_extending_gives_the_same_weights_as_asking_for_more_epochs_at_the_start(cifar_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(parse(base(cifar_root, a, None, "--epochs", "2", "--lr_decay_epochs", "1")))
    train.main(parse(base(cifar_root, b, None, "--epochs", "1", "--lr_decay_epochs", "1")))
    train.main(parse(base(cifar_root, b, None, "--epochs", "2", "--lr_decay_epochs", "1")))
    wa = torch.load(a / "student_last.pth", weights_only=True)["model"]
    wb = torch.load(b / "student_last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_teacher_check_is_bound_to_the_checkpoint_file(cifar_root, tmp_path, capsys):
    teacher = _teacher_file(tmp_path)
    out = tmp_path / "run"
    train.main(parse(base(cifar_root, out, None, "--teacher", "resnet8", "--teacher_ckpt", str(teacher))))
    cache = json.loads((out / "teacher_eval.json").read_text())
    identity = json.loads((out / "args.json").read_text())["identity"]
    assert list(cache) == [identity["teacher_sha256"]]
    # Another file at the same path is another teacher: another run, never the cached accuracy.
    torch.manual_seed(99)
    torch.save({"model": build_model("resnet8").state_dict(), "acc": 99.0}, teacher)
    code, stderr = run_cli_in_process(base(cifar_root, out, None, "--teacher", "resnet8", "--teacher_ckpt",
                                           str(teacher), "--strict_teacher"), capsys)
    assert code == 1 and "teacher_sha256" in stderr


def test_eval_needs_no_teacher_and_writes_nothing(finished_run, cifar_root, tmp_path, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in finished_run.iterdir())
    argv = base(cifar_root, finished_run, None, "--teacher", "resnet56", "--zoo_dir", str(tmp_path / "no_zoo"),
                "--eval")
    code, stderr, stdout = run_cli_in_process(argv, capsys, with_stdout=True)
    assert code == 0, stderr
    assert "resnet8 from" in stdout and "top-1" in stdout
    assert sorted((p.name, p.stat().st_mtime_ns) for p in finished_run.iterdir()) == before
    stats = train.main(parse(base(cifar_root, tmp_path / "never_created", None, "--eval", "--resume",
                                  str(finished_run / "student_best.pth"))))
    assert 0 <= stats["acc1"] <= 100 and not (tmp_path / "never_created").exists()


def test_launcher_and_hand_typed_command_are_the_same_run(cifar_root, zoo_dir, tmp_path, monkeypatch, capsys):
    from slurm.launch import expand_runs, parse_args

    monkeypatch.chdir(tmp_path)
    hand = ["--teacher", "resnet8", "--student", "resnet8", "--zoo_dir", str(zoo_dir), "--data_path",
            str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu", "--epochs", "1",
            "--batch_size", "32"]
    task, launch_args = parse_args(["cifar100", *hand])
    (run,) = expand_runs(task, launch_args)
    hand_args = parse(hand)
    assert run.output_dir == Path(train.default_output_dir(hand_args)).absolute()
    train.main(hand_args)  # typed by hand, into the default folder
    relaunched = parse(list(run.command[3:]))  # what the SLURM job runs: `python -m cifar100.train ...`
    summary = train.main(relaunched)
    assert "Nothing to do" in capsys.readouterr().out and summary["epochs"] == 1
