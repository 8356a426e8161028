"""`python slurm/launch.py coco_detection` alone submits Table 3's configs, one 8-GPU node each, as detectron2 runs:
one SLURM task per node and --num-gpus equal to --gpus_per_node. Needs detectron2 (the task module imports it)."""
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (it has no PyPI release): build it from "
                    "source as coco_detection/README.md says to run the detection tests")

from coco_detection import train  # noqa: E402
from slurm import launch  # noqa: E402
from slurm.sweeps import REPO, SWEEPS  # noqa: E402

CONFIGS = ["retinanet_R101_to_R50_pcka", "faster_rcnn_R101_to_R50_pcka", "faster_rcnn_X101_to_R50_pcka",
           "retinanet_R50", "faster_rcnn_R50"]


def plan(argv):
    args, notes = launch.with_task_defaults("coco_detection", launch.parse_args(["coco_detection", *argv])[1], argv)
    return args, notes, launch.expand_runs("coco_detection", args)


def test_bare_command_dry_run_plans_table3s_configs_on_one_8_gpu_node_each(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    states = launch.main(["coco_detection", "--dry_run"])
    out = capsys.readouterr().out
    assert [run.output_dir for run, _, _ in states] == [
        tmp_path / "output/coco_detection" / name / "default" for name in CONFIGS]
    for (run, state, _), name in zip(states, CONFIGS):
        assert state == "not submitted"
        assert run.args.config_file == str(REPO / "coco_detection/configs" / f"{name}.yaml")
        assert os.path.isabs(run.args.config_file) and os.path.isfile(run.args.config_file)
        assert run.args.num_gpus == 8
        # The printed command parses back to the run's flags.
        assert vars(train.get_args_parser().parse_args(list(run.command[3:]))) == vars(run.args)
    assert "default sweep table3" in out and "name runs with --config-file FILE" in out
    assert "--num-gpus 8, as --gpus_per_node 8" in out
    assert ("'nodes': 1, 'gpus_per_node': 8, 'tasks_per_node': 1, 'cpus_per_task': 64, 'timeout_min': 2880"
            in out)
    assert "warning" not in out and not (tmp_path / "output" / "slurm").exists()


def test_table3_lists_every_config_of_the_task_but_the_bases():
    shipped = sorted(p.stem for p in (REPO / "coco_detection/configs").glob("*.yaml") if not p.stem.startswith("Base"))
    assert sorted(SWEEPS["table3"].configs) == shipped == sorted(CONFIGS)
    assert train.DEFAULT_SWEEP == "table3"


def test_a_config_file_names_one_run_and_gpus_per_node_sets_num_gpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "coco_detection/configs/retinanet_R50.yaml")
    args, notes, runs = plan(["--config-file", config, "--gpus_per_node", "4", "SOLVER.IMS_PER_BATCH", "8"])
    assert args.sweep is None and len(runs) == 1
    (run,) = runs
    assert run.args.num_gpus == 4 and run.args.opts == ["SOLVER.IMS_PER_BATCH", "8"]
    assert launch.executor_parameters(args, "x")["tasks_per_node"] == 1
    assert any("--num-gpus 4, as --gpus_per_node 4" in note for note in notes)
    # A relative config path goes to the job absolute, as the output_dir does.
    monkeypatch.chdir(REPO)
    (run,) = plan(["--config-file", "coco_detection/configs/retinanet_R50.yaml"])[2]
    assert run.args.config_file == config
    # --num-gpus that agrees is kept, and says nothing.
    args, notes, _ = plan(["--config-file", config, "--num-gpus", "8"])
    assert args.num_gpus == 8 and not any("--num-gpus" in note for note in notes)


@pytest.mark.parametrize("argv,message", [
    (["--num-gpus", "2"], r"--num-gpus 2 but --gpus_per_node 8: .* pass the same number to both"),
    (["--ntasks_per_node", "8"], r"--ntasks_per_node 8: coco_detection starts its GPU processes .* --ntasks_per_node 1"),
    (["--seeds", "0", "1"], r"--seeds do not apply to coco_detection, whose runs are config files: .*SEED N.*table3"),
    (["--sweep", "table3", "--methods", "pcka"], r"--methods do not apply to coco_detection"),
    (["--sweep", "table3", "--config-file", "x.yaml"], r"--config-file and --sweep both name the runs.*table3"),
    (["--sweep", "table1"], r"sweep 'table1' is a cifar100 sweep"),
    (["--config-file", "nowhere.yaml"], r"--config-file nowhere.yaml does not exist; .* coco_detection/configs/"),
])
def test_plans_that_would_start_the_wrong_processes_or_runs_are_refused_before_queueing(argv, message):
    with pytest.raises(launch.LaunchError, match=message):
        plan(argv)
