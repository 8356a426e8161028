"""One set-up for a single process, torchrun and SLURM tasks (srun, submitit); rank helpers and reductions.

``init_distributed`` reads what the launcher put in the environment and returns a ``DistInfo``; nothing here
patches ``print`` or keeps state beyond torch.distributed's own process group.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

# SLURM jobs derive their rendezvous port from the job id, so two jobs sharing a node do not collide and
# nothing needs a fixed port. The range sits below Linux's ephemeral ports (32768 and up).
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 10000


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: who started it, its ranks, and where rank 0 listens."""

    launcher: str  # "single", "torchrun" or "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class DistInfo:
    """The outcome of ``init_distributed``: this process's place in the job and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    distributed: bool
    device: torch.device
    backend: str | None


def parse_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Read torchrun's variables, else SLURM's; neither (or a single task) means a plain single process.

    torchrun is checked first: it sets RANK/WORLD_SIZE explicitly, also when it runs inside a SLURM job.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        if world_size == 1:
            return LaunchEnv("torchrun")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise RuntimeError(
                f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: start the job with torchrun "
                f"(python -m torch.distributed.run), which sets all of them, or export the missing ones"
            )
        return LaunchEnv(
            "torchrun", int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)),
            env["MASTER_ADDR"], int(env["MASTER_PORT"]),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _parse_slurm_env(env)
    return LaunchEnv("single")


def _parse_slurm_env(env: Mapping[str, str]) -> LaunchEnv:
    world_size = int(env["SLURM_NTASKS"])
    if world_size == 1:
        return LaunchEnv("slurm")
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        # An sbatch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one process: joining
        # a group of SLURM_NTASKS would wait forever for tasks that were never started. srun sets the step id.
        warnings.warn(
            f"SLURM_NTASKS={world_size} but this process was not started by srun (no SLURM_STEP_ID): running "
            f"as a single process. To use all tasks, launch with srun or slurm/launch.py.",
            stacklevel=3,
        )
        return LaunchEnv("single")
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        # The step's node list when there is one: a step may run on a subset of the job's nodes.
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is not set; export MASTER_ADDR instead")
        master_addr = first_host(nodelist)
    if env.get("MASTER_PORT"):
        master_port = int(env["MASTER_PORT"])
    elif env.get("SLURM_JOB_ID"):
        master_port = port_from_job_id(env["SLURM_JOB_ID"])
    else:
        raise RuntimeError("SLURM_NTASKS > 1 but SLURM_JOB_ID is not set; export MASTER_PORT instead")
    return LaunchEnv(
        "slurm", int(env["SLURM_PROCID"]), world_size, int(env.get("SLURM_LOCALID", 0)), master_addr, master_port
    )


def port_from_job_id(job_id: str | int) -> int:
    """A rendezvous port in [20000, 30000) that every task of a job computes alike."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_RANGE


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when it runs, else ``expand_nodelist``."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            result = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """``"node[01-03,07],gpu-[1-2]x"`` → ``["node01", "node02", "node03", "node07", "gpu-1x", "gpu-2x"]``.

    Covers SLURM's bracket syntax (ranges, lists, zero padding, several groups per name); ``scontrol`` remains
    the authority for anything more exotic.
    """
    hosts = [host for item in _split_outside_brackets(nodelist) for host in _expand_item(item, nodelist)]
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_outside_brackets(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, nodelist: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"unbalanced brackets in SLURM node list {nodelist!r}")
        return [item]
    prefix, suffix = item[: match.start()], item[match.end():]
    return [prefix + value + rest for value in _expand_ranges(match.group(1), nodelist)
            for rest in _expand_item(suffix, nodelist)]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"cannot read range {part!r} in SLURM node list {nodelist!r}")
        # SLURM keeps the zero padding of the lower bound: node[008-010] → node008 ... node010.
        values.extend(f"{number:0{len(low)}d}" for number in range(int(low), int(high or low) + 1))
    return values


def init_distributed(device: str = "cuda", timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group the launcher set up (none for a single process) and pick this process's device.

    The backend is NCCL on CUDA devices and gloo on CPU. Under several processes each takes the GPU of its local
    rank (or the one GPU it sees, when SLURM binds one GPU per task).
    """
    launch = parse_launch_env(os.environ)
    distributed = launch.world_size > 1
    resolved = _resolve_device(device, launch.local_rank, distributed)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not distributed:
        return DistInfo(0, 1, 0, False, resolved, None)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    # torchrun may host the rendezvous store in its agent (TORCHELASTIC_USE_AGENT_STORE), which only env://
    # knows how to join; SLURM tasks have no agent, so rank 0 opens the store at the derived address.
    init_method = "env://" if launch.launcher == "torchrun" else f"tcp://{launch.master_addr}:{launch.master_port}"
    dist.init_process_group(
        backend=backend, init_method=init_method, world_size=launch.world_size, rank=launch.rank,
        timeout=timeout, device_id=resolved if resolved.type == "cuda" else None,
    )
    print_main(
        f"distributed: {launch.world_size} processes via {launch.launcher}, backend {backend}, "
        f"rendezvous {launch.master_addr}:{launch.master_port}",
    )
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, True, resolved, backend)


def _resolve_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    requested = torch.device(device)
    if requested.type != "cuda":
        return requested
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} requested but CUDA is not available on {socket.gethostname()}; "
            f"pass --device cpu, or run on a machine with a GPU"
        )
    if not distributed:
        return torch.device("cuda", requested.index or 0)
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: {socket.gethostname()} shows {count}. Start at most "
            f"{count} processes per node (torchrun --nproc_per_node, SLURM --ntasks-per-node)"
        )
    return torch.device("cuda", local_rank)


def cleanup() -> None:
    """Destroy the process group, if there is one (call at the end of main)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def print_main(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, flushed so that SLURM log files show progress as it happens."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def save_on_master(obj: Any, path: str | os.PathLike) -> None:
    """Atomic ``torch.save`` on rank 0 only; every rank holds the same weights under DDP."""
    # Imported here: checkpoint.py is heavier and most users of this module never save.
    from common.checkpoint import save_atomic

    if is_main_process():
        save_atomic(obj, path)


def _reduction_device() -> torch.device:
    # NCCL reduces CUDA tensors only, gloo CPU tensors.
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes, as a new tensor on ``tensor``'s device."""
    if not is_dist_avail_and_initialized():
        return tensor.detach().clone()
    reduced = tensor.detach().to(_reduction_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def gather_sizes(size: int) -> list[int]:
    """Every process's ``size`` (e.g. its batch size), in rank order; ``[size]`` for a single process."""
    if not is_dist_avail_and_initialized():
        return [int(size)]
    mine = torch.tensor([int(size)], dtype=torch.int64, device=_reduction_device())
    everyone = [torch.empty_like(mine) for _ in range(get_world_size())]
    dist.all_gather(everyone, mine)
    return [int(t.item()) for t in everyone]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], same_loss_everywhere: bool) -> torch.Tensor:
        rank, world = get_rank(), get_world_size()
        if len(sizes) != world or sizes[rank] != tensor.shape[0]:
            raise ValueError(
                f"sizes={sizes} do not match this process (rank {rank} of {world}, {tensor.shape[0]} rows); pass "
                "gather_sizes(tensor.shape[0]) or leave sizes out"
            )
        staged = tensor.detach().to(_reduction_device()).contiguous()
        longest = max(sizes)
        if staged.shape[0] < longest:  # all_gather moves equal shapes only
            staged = torch.cat([staged, staged.new_zeros((longest - staged.shape[0], *staged.shape[1:]))])
        parts = [torch.empty_like(staged) for _ in range(world)]
        dist.all_gather(parts, staged)
        ctx.rows = (sum(sizes[:rank]), sum(sizes[: rank + 1]))
        ctx.same_loss_everywhere, ctx.world, ctx.device = same_loss_everywhere, world, tensor.device
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(tensor.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, stop = ctx.rows
        if ctx.same_loss_everywhere:
            # Every process computed the same loss from the same gathered tensor, so their gradients
            # are equal and their sum is world_size times ours: no communication needed.
            return grad[start:stop] * ctx.world, None, None
        summed = grad.detach().to(_reduction_device(), copy=True).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[start:stop].to(ctx.device), None, None


def all_gather_with_grad(
    tensor: torch.Tensor, sizes: list[int] | None = None, *, same_loss_everywhere: bool = False
) -> torch.Tensor:
    """All processes' ``tensor`` concatenated along dim 0 in rank order, differentiable with respect to ours.

    Ranks may hold different numbers of rows; ``sizes`` (from ``gather_sizes``) saves the exchange that
    finds them out when several tensors of one batch are gathered. Without a process group: ``tensor``.

    Gradient: the loss each process backpropagates may depend on every row, so the gradient of our rows is
    the sum over processes of each one's gradient for them (an all_reduce of the gathered gradient). Under
    DDP, which averages parameter gradients over processes, this makes the step equal to that of one process
    on the concatenated batch. ``same_loss_everywhere=True`` declares that every process computes the very
    same loss from the gathered tensors (global-batch CKA does): then each gradient is the same and their
    sum is ``world_size`` times ours, which needs no communication.
    """
    if not is_dist_avail_and_initialized():
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0])
    return _AllGatherRows.apply(tensor, list(sizes), same_loss_everywhere)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, but the last training forward then updates them
    locally, so after an epoch ranks hold slightly different BN statistics. Syncing them before evaluation
    makes every rank evaluate, and fingerprint, exactly the weights rank 0 saves.
    """
    if not is_dist_avail_and_initialized():
        return
    for buffer in module.buffers():
        if dist.get_backend() == dist.Backend.NCCL or buffer.device.type == "cpu":
            dist.broadcast(buffer.data, src)
        else:
            staged = buffer.detach().cpu()
            dist.broadcast(staged, src)
            buffer.data.copy_(staged)


def reduce_dict(values: Mapping[str, torch.Tensor | float], average: bool = True) -> dict[str, float]:
    """Sum (or average) scalar values across processes, for logging; every process must pass the same keys."""
    if not values:
        return {}
    names = sorted(values)  # the same order on every rank, whatever order each built its dict in
    stacked = torch.stack([torch.as_tensor(values[name]).detach().double().cpu().reshape(()) for name in names])
    reduced = all_reduce_sum(stacked)
    if average:
        reduced /= get_world_size()
    return dict(zip(names, reduced.tolist()))


def gather_counts(correct: int | torch.Tensor, total: int | torch.Tensor) -> tuple[int, int]:
    """Sum per-process counts of correct predictions and samples, for an accuracy over the whole test set.

    With ``DistributedEvalSampler`` each sample is evaluated by exactly one process, so the summed ``total``
    equals the dataset size.
    """
    summed = all_reduce_sum(torch.tensor([int(correct), int(total)], dtype=torch.int64))
    return int(summed[0]), int(summed[1])


class DistributedEvalSampler(Sampler[int]):
    """Every index exactly once across processes: rank r takes r, r + W, r + 2W, ...

    Unlike ``DistributedSampler``, it does not pad the shards to equal length with repeated samples, which
    would count those samples twice in the accuracy. Ranks may therefore run different numbers of batches:
    evaluate the unwrapped model (``unwrap_model``), since a DDP forward can run collectives that would then
    wait forever.
    """

    def __init__(self, dataset: Sized, rank: int | None = None, world_size: int | None = None) -> None:
        self.num_samples_total = len(dataset)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples_total, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples_total, self.world_size))
