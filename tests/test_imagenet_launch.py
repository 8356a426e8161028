"""`python slurm/launch.py imagenet` alone submits Table 2's RCKA runs on one 8-GPU node each; flags override."""
import os

from imagenet import train
from slurm import launch


def test_bare_command_dry_run_prints_the_table2_rcka_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    states = launch.main(["imagenet", "--dry_run"])
    out = capsys.readouterr().out
    assert [run.output_dir for run, _, _ in states] == [
        tmp_path / "output/imagenet/resnet34_resnet18/rcka/seed0",
        tmp_path / "output/imagenet/resnet50_mobilenet_v1/rcka/seed0"]
    assert all(state == "not submitted" for _, state, _ in states)
    assert "default sweep table2_rcka" in out and "--gpus_per_node 8" in out and "--timeout_min 720" in out
    assert "'nodes': 1, 'gpus_per_node': 8, 'tasks_per_node': 8, 'cpus_per_task': 10, 'timeout_min': 720" in out
    assert "python -m imagenet.train --student mobilenet_v1 --teacher resnet50 --method rcka" in out
    assert not (tmp_path / "output" / "slurm").exists()


def test_table2_sweep_has_every_method_of_table2_we_implement(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, _ = launch.with_task_defaults("imagenet", launch.parse_args(["imagenet", "--sweep", "table2"])[1])
    runs = launch.expand_runs("imagenet", args)
    names = sorted(os.path.relpath(run.output_dir, tmp_path / "output/imagenet") for run in runs)
    assert names == ["mobilenet_v1/ce/seed0", "resnet18/ce/seed0",
                     "resnet34_resnet18/dkd/seed0", "resnet34_resnet18/kd/seed0", "resnet34_resnet18/rcka/seed0",
                     "resnet50_mobilenet_v1/dkd/seed0", "resnet50_mobilenet_v1/kd/seed0",
                     "resnet50_mobilenet_v1/rcka/seed0"]


def test_any_flag_overrides_the_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, notes = launch.with_task_defaults("imagenet", launch.parse_args(
        ["imagenet", "--teacher", "resnet34", "--timeout_min", "600", "--data_path", "/data/in1k"])[1])
    assert args.sweep is None and args.timeout_min == 600 and args.gpus_per_node == 8
    assert len(notes) == 1 and "default resources" in notes[0] and "timeout_min" not in notes[0]
    (run,) = launch.expand_runs("imagenet", args)
    assert run.args.data_path == "/data/in1k" and run.args.student == "resnet18"
    # Recipe flags alone still mean the default sweep, with those flags in every run.
    args, _ = launch.with_task_defaults("imagenet", launch.parse_args(["imagenet", "--epochs", "10"])[1])
    assert args.sweep == "table2_rcka"
    assert all(run.args.epochs == 10 for run in launch.expand_runs("imagenet", args))
    assert train.SLURM_DEFAULTS["gpus_per_node"] * 64 == 512  # the recipe's total batch at 64 per GPU
    # A selection flag spelled out names one run even when its value is the default.
    argv = ["imagenet", "--student", "resnet18", "--teacher", "resnet34"]
    args, _ = launch.with_task_defaults("imagenet", launch.parse_args(argv)[1], argv[1:])
    assert args.sweep is None
    argv = ["imagenet", "--seed=0"]
    args, _ = launch.with_task_defaults("imagenet", launch.parse_args(argv)[1], argv[1:])
    assert args.sweep is None and len(launch.expand_runs("imagenet", args)) == 1
