"""slurm/launch.py against a real one-node SLURM cluster (the `slurm_cluster` fixture): one run, a sweep as one job
array, a 2-task DDP job, preemption with requeue and resume, resubmission of a finished sweep, and --status.

Jobs ask for 1 CPU per task (the node may have only 2) and train resnet8 on a tiny generated CIFAR-100. Every wait
is bounded; a failure shows the job's state, its stdout/stderr and the daemon logs.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import submitit
import torch
from slurm_cluster import SlurmCluster, describe, free_ports, wait_for, wait_results

from cifar100 import train
from cifar_fixtures import write_fake_cifar100, write_teacher_zoo
from slurm import launch

pytestmark = pytest.mark.slurm

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, n_train=128, n_test=64, seed=0)
    return root


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return write_teacher_zoo(tmp_path_factory.mktemp("zoo"), "resnet8")


@pytest.fixture(autouse=True)
def job_environment(monkeypatch):
    # sbatch hands the submitting environment to the jobs: one thread per task (the node has 2 cores), and
    # unbuffered output so that the logs show progress as it happens.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


def launch_argv(cluster: SlurmCluster, cifar_root: Path, job_dir: Path, *extra: str) -> list[str]:
    """Tiny CPU runs (add --student or a sweep), 1 CPU per task, job scripts and logs under job_dir."""
    return ["cifar100", "--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu",
            "--epochs", "2", "--batch_size", "32", "--print_freq", "1000",
            "--timeout_min", "5", "--cpus_per_task", "1", "--mem_gb", "1", "--partition", cluster.partition,
            "--job_dir", str(job_dir / "%j"), *extra]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- (a) one run
def test_one_run_through_the_launcher_returns_its_summary(slurm_cluster, cifar_root, tmp_path):
    out = tmp_path / "run"
    (job,) = launch.main(launch_argv(slurm_cluster, cifar_root, tmp_path / "jobs", "--student", "resnet8",
                                     "--output_dir", str(out)))
    assert isinstance(job, submitit.SlurmJob) and "_" not in job.job_id  # one run: a plain job, no array
    (summary,) = wait_results(slurm_cluster, job)
    context = describe(slurm_cluster, job)
    assert (out / "done.json").is_file(), context
    assert summary == json.loads((out / "done.json").read_text()), context
    assert summary["output_dir"] == str(out) and summary["epochs"] == 2
    assert [e["epoch"] for e in read_log(out)] == [0, 1]
    recorded = json.loads((out / "slurm_job.json").read_text())
    assert recorded["job_id"] == job.job_id and recorded["cluster"] == "slurm"
    assert recorded["stdout"] == str(job.paths.stdout) and Path(recorded["stdout"]).is_file()
    assert "RESULT cifar100 resnet8 ce seed 0" in Path(recorded["stdout"]).read_text(), context


# ------------------------------------------------------------------------------------------- (b, e, f) a sweep
@pytest.fixture(scope="module")
def finished_sweep(slurm_cluster, cifar_root, zoo_dir, tmp_path_factory):
    """A 2-seed kd sweep of the pair resnet8 -> resnet8, submitted from (and writing under) its own folder."""
    root = tmp_path_factory.mktemp("sweep")
    argv = launch_argv(slurm_cluster, cifar_root, root / "jobs", "--sweep", "table1", "--pairs", "resnet8:resnet8",
                       "--methods", "kd", "--seeds", "0", "1", "--zoo_dir", str(zoo_dir))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the runs' output_dirs derive from the working directory: ./output/cifar100/...
        mp.setenv("OMP_NUM_THREADS", "1")
        jobs = launch.main(argv)
        results = [wait_results(slurm_cluster, job)[0] for job in jobs]
    return root, argv, jobs, results


def test_a_sweep_goes_out_as_one_job_array_and_every_run_finishes(slurm_cluster, finished_sweep):
    root, _, jobs, results = finished_sweep
    context = describe(slurm_cluster, *jobs)
    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_0", f"{array_id}_1"], context
    for seed, (job, summary) in enumerate(zip(jobs, results)):
        # the recipe's folder name plus what these tiny runs change: the batch and the unverified test data
        out = root / "output" / "cifar100" / "resnet8_resnet8" / "kd-batch_size32-data_unverified" / f"seed{seed}"
        assert summary == json.loads((out / "done.json").read_text()), context
        assert (summary["teacher"], summary["method"], summary["seed"]) == ("resnet8", "kd", seed)
        recorded = json.loads((out / "slurm_job.json").read_text())
        assert (recorded["job_id"], recorded["array_job_id"], recorded["array_index"]) == (job.job_id, array_id, seed)
    assert results[0]["weights_sha256"] != results[1]["weights_sha256"]  # the seeds really differ


def test_resubmitting_a_finished_sweep_submits_nothing(slurm_cluster, finished_sweep, monkeypatch, capsys):
    root, argv, _, _ = finished_sweep
    monkeypatch.chdir(root)
    jobs_before = slurm_cluster.job_ids()
    assert launch.main(argv) == []
    out = capsys.readouterr().out
    assert "skipped 2 finished run(s)" in out and "nothing to submit" in out
    assert slurm_cluster.job_ids() == jobs_before


def test_status_reports_finished_runs_as_done_with_their_accuracy(finished_sweep, monkeypatch, capsys):
    root, argv, _, results = finished_sweep
    monkeypatch.chdir(root)
    states = launch.main(argv + ["--status"])
    out = capsys.readouterr().out
    assert [state for _, state, _ in states] == ["done", "done"], out
    for (_, _, detail), summary in zip(states, results):
        assert detail == f"last_acc1 {summary['last_acc1']:.2f}, best_acc1 {summary['best_acc1']:.2f}"
    assert out.splitlines()[-1] == "2 runs: 2 done"


def test_status_reports_a_failed_job_with_its_error(slurm_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = launch_argv(slurm_cluster, tmp_path / "no_data", tmp_path / "jobs", "--student", "resnet8", "--seeds", "0")
    (job,) = launch.main(argv)
    # submitit sees the job done once its result file is written; squeue a moment later.
    wait_for(lambda: job.done() and job.job_id not in slurm_cluster.job_ids(), f"job {job.job_id} to leave the queue",
             slurm_cluster, job)
    (_, state, detail), = launch.main(argv + ["--status"])
    context = f"{detail}\n{describe(slurm_cluster, job)}"
    assert state == "failed", context
    assert f"job {job.job_id} left the queue without done.json" in detail, context
    assert "cifar-100-python" in detail, context  # the tail of the job's stderr says what went wrong
    assert capsys.readouterr().out.splitlines()[-1] == "1 run: 1 failed"


# ------------------------------------------------------------------------------------------- (c) DDP
def test_two_tasks_on_one_node_train_one_ddp_run(slurm_cluster, cifar_root, tmp_path, monkeypatch):
    # common/dist.py derives the rendezvous port from the job id; other test sessions on this machine run clusters
    # of their own whose job ids (and so ports) may be the same, so this job gets a port found free now.
    monkeypatch.setenv("MASTER_PORT", str(free_ports(1)[0]))
    out = tmp_path / "ddp"
    argv = launch_argv(slurm_cluster, cifar_root, tmp_path / "jobs", "--student", "resnet8", "--output_dir", str(out),
                       "--ntasks_per_node", "2")
    (job,) = launch.main(argv)
    results = wait_results(slurm_cluster, job)
    context = describe(slurm_cluster, job)
    assert len(results) == 2, context
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"], context
    assert results[0] == results[1] == json.loads((out / "done.json").read_text()), context
    metadata = json.loads((out / "args.json").read_text())
    assert metadata["derived"]["world_size"] == 2 and metadata["derived"]["batch_size_per_process"] == 16
    assert "distributed: 2 processes via slurm" in job.stdout(), context

    # The accuracy the two processes measured together is that of the weights rank 0 saved.
    eval_args = train.get_args_parser().parse_args(
        ["--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu",
         "--student", "resnet8", "--output_dir", str(tmp_path / "eval"), "--eval",
         "--resume", str(out / "student_last.pth")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the job
    try:
        stats = train.main(eval_args)
    finally:
        torch.set_num_threads(threads)
    assert stats["acc1"] == results[0]["last_acc1"], context


# ------------------------------------------------------------------------------------------- (d) preemption
def test_a_requeued_job_resumes_from_its_checkpoint_and_loses_nothing(slurm_cluster, tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_fake_cifar100(data, n_train=1024, n_test=64, seed=0)  # epochs of about a second, to interrupt one
    epochs = 6
    monkeypatch.chdir(tmp_path)
    common = launch_argv(slurm_cluster, data, tmp_path / "jobs", "--student", "resnet8", "--epochs", str(epochs),
                         "--lr_decay_epochs", "3", "5")
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    (ref_job,) = launch.main(common + ["--output_dir", str(reference)])  # the same run, left alone
    (job,) = launch.main(common + ["--output_dir", str(preempted)])
    checkpoint = preempted / "checkpoint.pth"
    wait_for(checkpoint.exists, "the first checkpoint", slurm_cluster, job)

    (_, state, detail), = launch.main(common + ["--output_dir", str(preempted), "--status"])
    assert state == "running" and detail.startswith(f"job {job.job_id}, epoch "), detail

    # Interrupt just after a checkpoint was saved, i.e. early in the next epoch: that epoch is what gets redone.
    saved = checkpoint.stat().st_mtime_ns
    wait_for(lambda: checkpoint.stat().st_mtime_ns != saved, "the next checkpoint", slurm_cluster, job)
    try:
        job._interrupt(timeout=False)  # what a preemption sends: SIGTERM, then submitit's USR2
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not signal job {job.job_id}: {e}\n{describe(slurm_cluster, job)}")
    epochs_at_interrupt = len(read_log(preempted))

    (summary,) = wait_results(slurm_cluster, job, timeout=180)
    (ref_summary,) = wait_results(slurm_cluster, ref_job)
    context = f"interrupted after {epochs_at_interrupt} epochs\n{describe(slurm_cluster, job)}"
    assert epochs_at_interrupt < epochs, context
    stdout = job.stdout()
    assert "requeueing" in stdout and "resumed from" in stdout, context
    assert f"at epoch {epochs_at_interrupt}/{epochs}" in stdout, context  # from the checkpoint, not from scratch
    assert "Restarts=1" in slurm_cluster.job_info(job.job_id), context
    assert [e["epoch"] for e in read_log(preempted)] == list(range(epochs)), context
    assert summary == json.loads((preempted / "done.json").read_text()), context
    # Nothing lost and nothing repeated: the same weights as the run nobody interrupted.
    assert summary["weights_sha256"] == ref_summary["weights_sha256"], context
    assert summary["last_acc1"] == ref_summary["last_acc1"], context
