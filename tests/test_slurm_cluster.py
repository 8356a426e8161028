"""The one-node SLURM cluster of the `slurm_cluster` fixture works the way the launcher uses SLURM:
sbatch, submitit jobs and job arrays, a 2-task torch.distributed (gloo) job, and preemption of a
Checkpointable job that SLURM requeues and that resumes from its saved progress.

Every wait is bounded; a failure carries the job's stdout/stderr, `scontrol show job` and the
daemon log tails. There is no accounting database: submitit warns that `sacct` fails and reads the
jobs' results from its own files, which is all these tests need.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import cloudpickle
import pytest
import submitit
from slurm_cluster import JOB_TIMEOUT_S, SlurmCluster, describe, free_ports, wait_for, wait_results

from slurm.launch import requeue_ignoring_sigterm

pytestmark = pytest.mark.slurm

# submitit pickles the callables with cloudpickle. By reference, the job's Python would have to
# import this module, which is not on its sys.path: pickle what this module defines by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])



# ------------------------------------------------------------------------------------- callables
def add(a: int, b: int) -> dict:
    return {"sum": a + b, "job_id": os.environ.get("SLURM_JOB_ID"), "host": os.uname().nodename}


def square(x: int) -> tuple[int, str | None]:
    return x * x, os.environ.get("SLURM_ARRAY_TASK_ID")


def all_reduce_rank_plus_one(master_port: int) -> dict:
    import torch
    import torch.distributed as dist

    dist_env = submitit.helpers.TorchDistributedEnvironment()
    dist_env.master_port = master_port  # a port the test found free, not one hashed from the job id
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    dist.init_process_group(backend="gloo", init_method="env://", timeout=timedelta(seconds=60))
    try:
        value = torch.tensor([float(dist_env.rank + 1)])
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return {
            "rank": dist_env.rank,
            "world_size": dist_env.world_size,
            "procid": int(os.environ["SLURM_PROCID"]),
            "value": value.item(),
        }
    finally:
        dist.destroy_process_group()


class StepCounter(submitit.helpers.Checkpointable):
    """Counts to `steps`, saving its progress to `workdir/progress` after each step.

    In the job it swaps in the launcher's `requeue_ignoring_sigterm` (see there). Each (re)start appends "<progress at start> <SLURM_RESTART_COUNT>" to `workdir/starts`. On
    preemption, Checkpointable.checkpoint resubmits the same call; the requeued run reads the
    saved progress and goes on from there.
    """

    def __call__(self, workdir: str, steps: int, step_s: float) -> dict:
        submitit.slurm.slurm.SlurmJobEnvironment._requeue = requeue_ignoring_sigterm
        wd = Path(workdir)
        progress = wd / "progress"
        done = int(progress.read_text()) if progress.exists() else 0
        restart_count = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(wd / "starts", "a") as f:
            f.write(f"{done} {restart_count}\n")
        for i in range(done, steps):
            time.sleep(step_s)
            tmp = wd / "progress.tmp"
            tmp.write_text(str(i + 1))
            os.replace(tmp, progress)
        return {"progress": int(progress.read_text()), "restart_count": int(restart_count)}


# ------------------------------------------------------------------------------------- helpers
def make_executor(cluster: SlurmCluster, folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder)
    assert executor.cluster == "slurm", f"submitit picked {executor.cluster!r}, not slurm"
    defaults = dict(
        timeout_min=5,
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=1,
        mem_gb=0.5,
        slurm_partition=cluster.partition,
        name="rcka-test",
    )
    defaults.update(params)
    executor.update_parameters(**defaults)
    return executor


def test_cluster_is_up(slurm_cluster: SlurmCluster) -> None:
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf_path)
    assert slurm_cluster.env["SLURM_CONF"] == str(slurm_cluster.conf_path)
    # Jobs of tests that ran earlier in the session may still be leaving the node.
    wait_for(lambda: slurm_cluster.node_state() == "idle", "the node to be idle", slurm_cluster, timeout=60)
    partition, cpus = slurm_cluster.run(["sinfo", "-h", "-o", "%P %c"]).stdout.split()
    assert partition == slurm_cluster.partition + "*"  # the default partition
    assert int(cpus) == slurm_cluster.cpus >= 2  # room for the 2-task job


def test_sbatch_wrap_runs_and_writes_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "wrap.out"
    proc = slurm_cluster.run(
        [
            "sbatch", "--parsable", "-p", slurm_cluster.partition, "-N1", "-n1", "-c1",
            "--mem=100M", "-t", "1", "-J", "rcka-wrap", "-o", str(out),
            "--wrap", "echo hello from job $SLURM_JOB_ID on $(hostname -s)",
        ]
    )
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), proc.stdout

    def finished() -> bool:
        return job_id not in slurm_cluster.job_ids() and out.exists() and out.read_text().strip() != ""

    wait_for(finished, f"sbatch job {job_id}", slurm_cluster)
    text = out.read_text()
    assert text.strip() == f"hello from job {job_id} on {slurm_cluster.hostname}", (
        f"{text!r}\n{slurm_cluster.job_info(job_id)}\n{slurm_cluster.log_tail()}"
    )


def test_submitit_function_returns_value(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    executor = make_executor(slurm_cluster, tmp_path / "submitit")
    job = executor.submit(add, 2, 3)
    assert isinstance(job, submitit.SlurmJob)
    (result,) = wait_results(slurm_cluster, job)
    assert result["sum"] == 5
    assert result["job_id"] == job.job_id
    assert result["host"].split(".")[0] == slurm_cluster.hostname


def test_submitit_job_array(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    executor = make_executor(slurm_cluster, tmp_path / "submitit", slurm_array_parallelism=2)
    jobs = executor.map_array(square, [3, 4])
    assert len(jobs) == 2
    assert all("_" in job.job_id for job in jobs), [job.job_id for job in jobs]
    results = [wait_results(slurm_cluster, job)[0] for job in jobs]
    assert results == [(9, "0"), (16, "1")]


def test_two_task_torch_distributed_all_reduce(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    executor = make_executor(
        slurm_cluster, tmp_path / "submitit", nodes=1, tasks_per_node=2, cpus_per_task=1, mem_gb=1
    )
    (port,) = free_ports(1)
    job = executor.submit(all_reduce_rank_plus_one, port)
    results = wait_results(slurm_cluster, job, timeout=120)
    assert sorted(r["rank"] for r in results) == [0, 1], results
    for r in results:
        assert r["world_size"] == 2, results
        assert r["procid"] == r["rank"], results
        assert r["value"] == 3.0, results  # (0 + 1) + (1 + 1)


def test_preempted_checkpointable_job_is_requeued_and_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    progress = workdir / "progress"
    steps, step_s = 16, 0.5
    executor = make_executor(slurm_cluster, tmp_path / "submitit")
    job = executor.submit(StepCounter(), str(workdir), steps, step_s)

    def progress_at_least(n: int):
        return lambda: progress.exists() and int(progress.read_text() or 0) >= n

    # Running, with its signal handlers in place and some progress saved.
    wait_for(progress_at_least(2), f"job {job.job_id} to make progress", slurm_cluster, job)
    try:
        job._interrupt(timeout=False)  # what a preemption sends: SIGTERM, then submitit's USR2
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not signal job {job.job_id}: {e}\n{describe(slurm_cluster, job)}")
    interrupted_at = int(progress.read_text())

    (result,) = wait_results(slurm_cluster, job, timeout=JOB_TIMEOUT_S)
    starts = [tuple(map(int, line.split())) for line in (workdir / "starts").read_text().splitlines()]
    context = f"result={result} starts={starts} interrupted at {interrupted_at}\n{describe(slurm_cluster, job)}"
    assert result["progress"] == steps, context
    assert len(starts) == 2, context
    assert starts[0] == (0, 0), context
    resumed_from, restart_count = starts[1]
    assert restart_count == 1 and result["restart_count"] == 1, context
    # It went on from the saved progress instead of starting over.
    assert interrupted_at <= resumed_from < steps, context
