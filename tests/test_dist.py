"""Specification of common/dist.py: launcher detection, SLURM node lists and ports, real 2-process gloo runs."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from common import dist as rdist
from common.dist import (
    DistInfo,
    DistributedEvalSampler,
    LaunchEnv,
    expand_nodelist,
    first_host,
    gather_counts,
    init_distributed,
    parse_launch_env,
    port_from_job_id,
    reduce_dict,
)

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def without_launcher_variables(env) -> dict[str, str]:
    """The environment minus whatever a surrounding torchrun or SLURM job put there."""
    return {
        name: value for name, value in env.items()
        if name not in LAUNCHER_VARIABLES and not name.startswith(("SLURM_", "TORCHELASTIC"))
    }


@pytest.fixture
def no_scontrol(monkeypatch):
    monkeypatch.setattr(rdist.shutil, "which", lambda name: None)


def slurm_env(**overrides) -> dict[str, str]:
    env = {
        "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242424", "SLURM_JOB_NODELIST": "gpu[03-04,10],login",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_no_launcher_variables_mean_a_single_process():
    assert parse_launch_env({"PATH": "/usr/bin"}) == LaunchEnv("single")


def test_torchrun_variables_are_read():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    assert parse_launch_env(env) == LaunchEnv("torchrun", 3, 4, 1, "node7", 29400)


def test_torchrun_wins_over_slurm_variables_of_the_surrounding_job(no_scontrol):
    env = slurm_env() | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert parse_launch_env(env).launcher == "torchrun"


def test_torchrun_with_one_process_creates_no_group():
    assert parse_launch_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).world_size == 1


def test_torchrun_variables_without_master_port_are_an_error_that_says_what_is_missing():
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        parse_launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a"})


def test_slurm_variables_are_read_with_master_from_the_node_list_and_port_from_the_job_id(no_scontrol):
    assert parse_launch_env(slurm_env()) == LaunchEnv("slurm", 5, 8, 1, "gpu03", 20000 + 4242424 % 10000)


def test_slurm_prefers_the_step_node_list_and_explicit_master_variables(no_scontrol):
    assert parse_launch_env(slurm_env(SLURM_STEP_NODELIST="gpu[10]")).master_addr == "gpu10"
    env = slurm_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="23456")
    assert (parse_launch_env(env).master_addr, parse_launch_env(env).master_port) == ("10.0.0.1", 23456)


def test_a_single_slurm_task_is_a_single_process():
    assert parse_launch_env(slurm_env(SLURM_NTASKS="1", SLURM_PROCID="0")).world_size == 1


def test_an_sbatch_script_outside_srun_runs_as_one_process_with_a_warning(no_scontrol):
    with pytest.warns(UserWarning, match="not started by srun"):
        assert parse_launch_env(slurm_env(SLURM_STEP_ID=None)) == LaunchEnv("single")


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03,07],other", ["node01", "node02", "node03", "node07", "other"]),
        ("a100-[8-11]", ["a100-8", "a100-9", "a100-10", "a100-11"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
        ("x[1],y[2-3]z", ["x1", "y2z", "y3z"]),
        ("127.0.0.1", ["127.0.0.1"]),
    ],
)
def test_node_lists_expand_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node[a-b]", ""])
def test_malformed_node_lists_are_errors(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_nodelist(nodelist)


def test_first_host_asks_scontrol_when_it_is_installed(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho from-scontrol-1\necho from-scontrol-2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert first_host("node[1-2]") == "from-scontrol-1"


def test_first_host_falls_back_to_the_parser_when_scontrol_fails(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert first_host("node[07-08]") == "node07"


def test_port_from_job_id_is_deterministic_and_in_range():
    for job_id in [0, 1, 9999, 10000, 123456, "4242424", 2**40 + 17]:
        port = port_from_job_id(job_id)
        assert 20000 <= port < 30000 and port == port_from_job_id(str(job_id))
    assert port_from_job_id(123456) != port_from_job_id(123457)


def test_single_process_init_creates_no_process_group(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCHER_VARIABLES or name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, False, torch.device("cpu"), None)
    assert not torch.distributed.is_initialized()
    assert reduce_dict({"loss": torch.tensor(2.0)}) == {"loss": 2.0}
    assert gather_counts(torch.tensor(7), 10) == (7, 10)


def test_asking_for_cuda_without_cuda_says_to_pass_device_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cpu"):
        init_distributed("cuda")


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_eval_sampler_shards_cover_every_sample_exactly_once(world_size):
    shards = [list(DistributedEvalSampler(range(101), rank, world_size)) for rank in range(world_size)]
    assert sorted(index for shard in shards for index in shard) == list(range(101))
    assert [len(DistributedEvalSampler(range(101), rank, world_size)) for rank in range(world_size)] == list(
        map(len, shards)
    )


WORKER = """
import json
import torch
import torch.distributed as dist
from common.dist import (DistributedEvalSampler, barrier, broadcast_buffers, cleanup, gather_counts,
                         init_distributed, print_main, reduce_dict)
from common.logging import SmoothedValue

info = init_distributed("cpu")
dataset = torch.arange(101)  # odd, so a padding sampler would count one sample twice
loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=DistributedEvalSampler(dataset))
correct = total = 0
seen = []
for batch in loader:
    correct += int((batch % 3 == 0).sum())  # "correct" on every third sample: 34 of 101
    total += len(batch)
    seen += batch.tolist()
everyone_seen = [None] * info.world_size
dist.all_gather_object(everyone_seen, seen)
bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(float(info.rank + 5))  # ranks disagree, as after a DDP epoch
broadcast_buffers(bn)
buffers_after = [None] * info.world_size
dist.all_gather_object(buffers_after, bn.running_mean.tolist())
meter = SmoothedValue()
meter.update(float(info.rank), n=info.rank + 1)
meter.synchronize_between_processes()
result = {
    "info": [info.rank, info.world_size, info.distributed, info.backend],
    "seen": sorted(i for shard in everyone_seen for i in shard),
    "counts": gather_counts(correct, total),
    "mean": reduce_dict({"loss": torch.tensor(float(info.rank + 1)), "acc": 10.0 * info.rank}),
    "sum": reduce_dict({"n": 1.0}, average=False),
    "meter": [meter.count, meter.total],
    "buffers": buffers_after,
}
print_main("RESULT " + json.dumps(result))
barrier()
cleanup()
"""


def free_port(low: int = 1024, high: int = 65536) -> int:
    for port in random.sample(range(low, high), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def check_worker_output(outputs: list[str]) -> None:
    results = [line[len("RESULT "):] for out in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, "print_main prints on rank 0 only"
    result = json.loads(results[0])
    assert result["info"][1:] == [2, True, "gloo"]
    assert result["seen"] == list(range(101))
    assert result["counts"] == [34, 101]
    assert result["mean"] == {"acc": 5.0, "loss": 1.5}
    assert result["sum"] == {"n": 2.0}
    assert result["meter"] == [3, 2.0]  # rank 0: one sample of 0.0; rank 1: two samples of 1.0
    assert result["buffers"] == [[5.0, 5.0, 5.0]] * 2  # rank 0's BN statistics on both ranks


def test_two_gloo_processes_under_torchrun_reduce_and_count_every_test_sample_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = without_launcher_variables(os.environ) | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    check_worker_output([done.stdout])


def test_two_gloo_processes_as_slurm_tasks_find_each_other_from_slurm_variables(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port(20000, 30000)
    job_id = 7_000_000 + port - 20000  # so that port_from_job_id gives the free port
    base = without_launcher_variables(os.environ) | {
        "OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NODELIST": "127.0.0.1",
    }
    tasks = [
        subprocess.Popen(
            [sys.executable, str(script)], env=base | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    try:
        finished = [task.communicate(timeout=120) for task in tasks]
    finally:
        for task in tasks:  # a task left waiting for a peer that failed
            if task.poll() is None:
                task.kill()
    for task, (_, stderr) in zip(tasks, finished):
        assert task.returncode == 0, stderr[-3000:]
    check_worker_output([stdout for stdout, _ in finished])
