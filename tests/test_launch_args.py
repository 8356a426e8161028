"""slurm/launch.py without SLURM: flags pass through to the task, SLURM flags map to submitit's parameters, sweeps
expand from paper_results.csv, finished runs are skipped, errors say what to do, and one tiny CIFAR-100 run goes
end to end through submitit's LocalExecutor."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from submitit.slurm import slurm as submitit_slurm

from cifar100 import train
from cifar100.report import load_paper_results
from cifar_fixtures import write_fake_cifar100
from slurm import launch

REPO = Path(__file__).resolve().parents[1]
TASK_FLAGS = ["--teacher", "resnet56", "--student", "resnet20", "--method", "dkd", "--epochs", "7",
              "--lr_decay_epochs", "3", "5", "--batch_size", "128", "--cka_centered", "--amp", "--seed", "4",
              "--dkd_beta", "2.5", "--data_path", "/data/cifar", "--zoo_dir", "zoo", "--loader", "torchvision"]
SLURM_FLAGS = ["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--timeout_min", "600",
               "--account", "proj", "--qos", "high", "--constraint", "a100", "--mem_gb", "64", "--cpus_per_task", "10",
               "--array_parallelism", "4"]


def parse(*argv):
    return launch.parse_args(["cifar100", *argv])[1]


def expand(*argv):
    return launch.expand_runs("cifar100", parse(*argv))


def pairs_of(source):
    return list(dict.fromkeys((r["teacher"], r["student"]) for r in load_paper_results() if r["source"] == source))


# ------------------------------------------------------------------------------------------- arguments
def test_task_flags_reach_main_unchanged_beside_the_slurm_flags():
    runs = expand(*TASK_FLAGS, *SLURM_FLAGS)
    assert len(runs) == 1
    expected = train.get_args_parser().parse_args(TASK_FLAGS)
    got = vars(runs[0].args)
    # Only output_dir differs: derived from the settings and made absolute at submission.
    assert got.pop("output_dir") == os.path.abspath(train.default_output_dir(expected))
    assert got == {k: v for k, v in vars(expected).items() if k != "output_dir"}


def test_the_printed_command_parses_back_to_the_runs_arguments():
    (run,) = expand(*TASK_FLAGS, "--output_dir", "rel/run")
    assert run.command[:3] == ("python", "-m", "cifar100.train")
    assert vars(train.get_args_parser().parse_args(list(run.command[3:]))) == vars(run.args)
    assert run.args.output_dir == os.path.abspath("rel/run")


def test_slurm_flags_map_to_submitit_parameters_and_sbatch_lines(tmp_path):
    params = launch.executor_parameters(parse(*SLURM_FLAGS), "cifar100")
    assert params == {"name": "cifar100", "nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 10,
                      "mem_gb": 64.0, "timeout_min": 600, "slurm_partition": "gpu", "slurm_account": "proj",
                      "slurm_qos": "high", "slurm_constraint": "a100", "slurm_array_parallelism": 4}
    # submitit accepts every key (it validates the slurm_ ones even on another executor) ...
    submitit.AutoExecutor(folder=tmp_path, cluster="debug").update_parameters(**params)
    # ... and writes them as these sbatch lines.
    equivalent = submitit_slurm.SlurmExecutor._equivalence_dict()
    sbatch = {equivalent.get(k, k.removeprefix("slurm_")): v for k, v in params.items()}
    sbatch["mem"] = submitit_slurm._convert_mem(sbatch["mem"])
    text = submitit_slurm._make_sbatch_string(command="true", folder=tmp_path, **sbatch)
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10", "--mem=64GB",
                 "--time=600", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=a100"):
        assert f"#SBATCH {line}\n" in text, line


def test_slurm_flags_left_out_are_not_passed():
    assert launch.executor_parameters(parse(), "x") == {"name": "x", "tasks_per_node": 1}
    assert launch.executor_parameters(parse("--gpus_per_node", "4"), "x")["tasks_per_node"] == 4
    one_task = parse("--gpus_per_node", "4", "--ntasks_per_node", "1")
    assert launch.executor_parameters(one_task, "x")["tasks_per_node"] == 1


# ------------------------------------------------------------------------------------------- sweeps
def test_table1_is_every_pair_times_six_methods_with_one_ce_run_per_student():
    pairs = pairs_of("rcka_table1")
    assert len(pairs) == 9
    students = {s for _, s in pairs}
    runs = expand("--sweep", "table1")
    per_seed = len(pairs) * 5 + len(students)  # kd dkd fcka lcka rcka per pair; ce once per student
    assert len(runs) == 3 * per_seed
    assert len({r.output_dir for r in runs}) == len(runs)
    ce = [r.args for r in runs if r.args.method == "ce"]
    assert len(ce) == 3 * len(students) and all(a.teacher is None for a in ce)
    assert {(a.student, a.seed) for a in ce} == {(s, seed) for s in students for seed in (0, 1, 2)}
    distilled = {(a.teacher, a.student, a.method, a.seed) for r in runs if (a := r.args).method != "ce"}
    assert distilled == {(t, s, m, seed) for t, s in pairs for m in ("kd", "dkd", "fcka", "lcka", "rcka")
                         for seed in (0, 1, 2)}
    assert all(r.output_dir == Path(os.path.abspath(train.default_output_dir(r.args))) for r in runs)


def test_baselines13_is_thirteen_pairs_times_kd_dkd_rcka():
    pairs = pairs_of("crd_dkd_baselines")
    assert len(pairs) == 13
    runs = expand("--sweep", "baselines13", "--seeds", "5")
    assert {(r.args.teacher, r.args.student, r.args.method, r.args.seed) for r in runs} == {
        (t, s, m, 5) for t, s in pairs for m in ("kd", "dkd", "rcka")}
    assert len(runs) == 13 * 3


def test_methods_pairs_and_seeds_restrict_a_sweep_and_other_flags_apply_to_every_run():
    runs = expand("--sweep", "table1", "--pairs", "resnet8:resnet8", "resnet56:resnet20", "--methods", "kd", "ce",
                  "--seeds", "0", "1", "--epochs", "3")
    settings = [(r.args.teacher, r.args.student, r.args.method, r.args.seed) for r in runs]
    assert settings == [("resnet8", "resnet8", "kd", 0), ("resnet8", "resnet8", "kd", 1),
                        (None, "resnet8", "ce", 0), (None, "resnet8", "ce", 1),
                        ("resnet56", "resnet20", "kd", 0), ("resnet56", "resnet20", "kd", 1),
                        (None, "resnet20", "ce", 0), (None, "resnet20", "ce", 1)]
    assert all(r.args.epochs == 3 for r in runs)


def test_seeds_without_a_sweep_repeat_the_single_run():
    runs = expand("--teacher", "resnet56", "--student", "resnet20", "--seeds", "0", "1", "2")
    assert [(r.args.teacher, r.args.method, r.args.seed) for r in runs] == [("resnet56", None, s) for s in (0, 1, 2)]


@pytest.mark.parametrize("argv,message", [
    (["--sweep", "table9"], "unknown sweep 'table9'; sweeps: table1"),
    (["--sweep", "table1", "--seed", "3"], "pass only --seeds"),
    (["--sweep", "table1", "--teacher", "resnet56"], "pass only --pairs"),
    (["--sweep", "table1", "--output_dir", "x"], "--output_dir names one run"),
    (["--sweep", "table1", "--methods", "fitnet"], "unknown method(s) fitnet; methods: ce, kd"),
    (["--pairs", "resnet56-resnet20"], "TEACHER:STUDENT"),
    (["--pairs", "resnet56:resnet21"], "unknown architecture(s) resnet21"),
])
def test_bad_run_flags_say_what_to_pass(argv, message):
    with pytest.raises(launch.LaunchError) as err:
        expand(*argv)
    assert message in str(err.value)


def test_unknown_task_and_task_without_train_py_list_the_available_ones(monkeypatch):
    with pytest.raises(launch.LaunchError, match=r"unknown task 'mnist'; tasks: cifar100, imagenet, coco_detection"):
        launch.main(["mnist"])
    monkeypatch.setitem(launch.TASKS, "planned", "planned_task.train")  # every real task has its train.py now
    with pytest.raises(launch.LaunchError, match=r"planned_task/train.py does not exist.*available now: cifar100, "
                                                 r"imagenet, coco_detection"):
        launch.main(["planned", "--nodes", "2"])


def test_cli_errors_are_one_line_without_traceback():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "slurm" / "launch.py"), "cifar100", "--sweep", "nope"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown sweep 'nope'")


# ------------------------------------------------------------------------------------------- states and submission
def write_done(run, last=61.5, best=62.25):
    run.output_dir.mkdir(parents=True, exist_ok=True)
    (run.output_dir / "done.json").write_text(json.dumps({"last_acc1": last, "best_acc1": best}))


def record(run, job_id, stderr=""):
    run.output_dir.mkdir(parents=True, exist_ok=True)
    (run.output_dir / "slurm_job.json").write_text(json.dumps({"job_id": job_id, "cluster": "slurm",
                                                               "stderr": str(stderr)}))


def test_run_state_from_the_run_folder_and_the_queue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = expand("--student", "resnet8", "--epochs", "10", "--seeds", "0", "1", "2", "3", "4", "5")
    write_done(runs[0])
    record(runs[1], "7_1")
    (runs[1].output_dir / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')
    record(runs[2], "7_2")
    stderr = tmp_path / "7_3_0_log.err"
    stderr.write_text("Traceback ...\nDatasetNotFoundError: no cifar-100-python under /nowhere\n")
    record(runs[3], "7_3", stderr)
    record(runs[5], "8")
    queue = {"7_1": "RUNNING", "7_2": "PENDING"}
    states = [launch.run_state(run, queue) for run in runs]
    assert states[0] == ("done", "last_acc1 61.50, best_acc1 62.25")
    assert states[1] == ("running", "job 7_1, epoch 3/10")
    assert states[2] == ("pending", "job 7_2 PENDING, not started")
    assert states[3][0] == "failed" and "DatasetNotFoundError: no cifar-100-python" in states[3][1]
    assert states[4] == ("not submitted", "")
    assert launch.run_state(runs[5], None)[0] == "unknown"  # no scheduler to ask: never guessed as failed


def test_finished_runs_are_not_submitted_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["cifar100", "--student", "resnet8", "--seeds", "0", "1", "--timeout_min", "5"]
    for run in launch.expand_runs(*launch.parse_args(argv)):
        write_done(run)
    assert launch.main(argv, cluster="debug") == []
    out = capsys.readouterr().out
    assert "skipped 2 finished run(s)" in out and "nothing to submit" in out
    assert not (tmp_path / "output" / "slurm").exists()


def test_dry_run_prints_each_run_and_submits_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["cifar100", "--sweep", "table1", "--pairs", "resnet56:resnet20", "--methods", "kd", "--seeds", "0", "1",
            "--dry_run"]
    runs = launch.expand_runs(*launch.parse_args(argv))
    write_done(runs[0])
    states = launch.main(argv)
    assert [state for _, state, _ in states] == ["done", "not submitted"]
    out = capsys.readouterr().out
    for run in runs:
        assert str(run.output_dir) in out and shlex.join(run.command) in out
    assert "would submit 1" in out
    assert not (tmp_path / "output" / "slurm").exists() and not (runs[1].output_dir / "slurm_job.json").exists()


def test_dry_run_warns_when_the_plan_has_no_time_limit_or_no_gpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "SLURM_DEFAULTS", {})  # a task that declares no resources
    launch.main(["cifar100", "--sweep", "table1", "--dry_run"])
    out = capsys.readouterr().out
    assert "warning: no --timeout_min" in out and "warning: no --gpus_per_node" in out
    assert "159 runs" in out
    launch.main(["cifar100", "--sweep", "table1", "--dry_run", "--timeout_min", "600", "--gpus_per_node", "1"])
    assert "warning" not in capsys.readouterr().out


def test_timed_out_jobs_are_requeued_many_times_not_submitits_default_three(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}
    real = launch.submitit.AutoExecutor

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch.submitit, "AutoExecutor", recording)
    (job,) = launch.main(["cifar100", "--student", "resnet8", "--epochs", "1", "--timeout_min", "5", "--device",
                          "cpu", "--data_path", str(tmp_path / "none"), "--no_download"], cluster="debug")
    assert seen["slurm_max_num_timeout"] == launch.MAX_NUM_TIMEOUT >= 30


def test_submitting_needs_a_time_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "SLURM_DEFAULTS", {})  # a task that declares no time limit
    with pytest.raises(launch.LaunchError, match="pass --timeout_min"):
        launch.main(["cifar100", "--student", "resnet8"], cluster="debug")


def test_bare_cifar100_command_plans_table1s_rcka_column_on_one_gpu_each(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    states = launch.main(["cifar100", "--dry_run"])
    out = capsys.readouterr().out
    assert len(states) == 9 * 3 and {run.args.method for run, _, _ in states} == {"rcka"}
    assert {(run.args.teacher, run.args.student) for run, _, _ in states} == set(pairs_of("rcka_table1"))
    assert "default sweep table1_rcka" in out and "'gpus_per_node': 1" in out and "'timeout_min': 720" in out
    assert "warning" not in out


def test_device_cpu_leaves_out_the_tasks_gpu_default():
    args, _ = launch.with_task_defaults("cifar100", parse("--student", "resnet8", "--device", "cpu"))
    assert args.gpus_per_node is None and args.timeout_min == 720


def test_checkpoint_requeues_the_same_run():
    (run,) = expand("--student", "resnet8")
    trainer = launch.Trainer("cifar100", run.args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, launch.Trainer) and delayed.function is not trainer
    assert delayed.function.task == "cifar100" and delayed.function.args == run.args
    assert delayed.args == () and delayed.kwargs == {}


def test_one_tiny_run_end_to_end_through_submitits_local_executor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_fake_cifar100(tmp_path / "data", n_train=64, n_test=32, seed=0)
    argv = ["cifar100", "--data_path", str(tmp_path / "data"), "--no_verify_data", "--no_download", "--device", "cpu",
            "--student", "resnet8", "--epochs", "1", "--batch_size", "32", "--print_freq", "1000",
            "--timeout_min", "5", "--job_dir", str(tmp_path / "jobs" / "%j")]
    (job,) = launch.main(argv, cluster="local")
    summary = job.result()
    # The recipe's folder name plus what differs from the recipe (the batch and the unverified test data).
    out = tmp_path / "output" / "cifar100" / "resnet8" / "ce-batch_size32-data_unverified" / "seed0"
    assert summary == json.loads((out / "done.json").read_text())
    assert summary["output_dir"] == str(out) and summary["epochs"] == 1
    recorded = json.loads((out / "slurm_job.json").read_text())
    assert recorded["job_id"] == str(job.job_id) and recorded["cluster"] == "local"
    assert recorded["command"][:3] == ["python", "-m", "cifar100.train"]
    assert launch.main(argv + ["--status"])[0][1] == "done"
