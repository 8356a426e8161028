"""Console progress (MetricLogger), one JSON line per epoch (``log.txt``), and what a run needs to be repeated.

Named after what it does; it never shadows the standard library's ``logging`` for importers, since it is only
reachable as ``common.logging`` (absolute imports). Nothing in ``common`` uses the standard ``logging``: the
console gets ``print`` on rank 0, problems get ``warnings``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from common.checkpoint import atomic_write
from common.dist import all_reduce_sum, get_world_size, is_main_process

# The checkout this package was imported from: its git state is what ran.
REPO_ROOT = Path(__file__).resolve().parents[1]


class SmoothedValue:
    """A series of numbers: median, mean and max of the last ``window_size``, and the mean of all of them."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.window: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        """Record ``value`` as the mean of ``n`` samples (e.g. a batch's accuracy with n = batch size)."""
        self.window.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Make ``count`` and ``total`` (hence ``global_avg``) cover every process; the window stays local."""
        summed = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count = int(summed[0].item())
        self.total = float(summed[1].item())

    @property
    def median(self) -> float:
        return statistics.median(self.window) if self.window else math.nan

    @property
    def avg(self) -> float:
        return statistics.fmean(self.window) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.window) if self.window else math.nan

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else math.nan

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """Named ``SmoothedValue``s, and ``log_every`` to iterate a loader while printing progress on rank 0."""

    def __init__(self, delimiter: str = "  ", stream: IO[str] | None = None) -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.stream = stream  # None: sys.stdout at print time

    def update(self, **values: float | torch.Tensor) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}")
            self.meters[name].update(value)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, name: str) -> SmoothedValue:
        # Only reached for names that are not attributes: metric_logger.loss reads the "loss" meter.
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"{type(self).__name__} has no meter or attribute {name!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        """Yield from ``iterable``; every ``print_freq`` steps (and at the last) print progress with the ETA.

        ``time`` is a whole step (loading plus the caller's work on the batch), ``data`` the wait for the batch.
        """
        total = len(iterable) if isinstance(iterable, Sized) else None
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total)) if total is not None else 1
        start = end = time.perf_counter()
        step = -1
        for step, obj in enumerate(iterable):
            data_time.update(time.perf_counter() - end)
            yield obj
            iter_time.update(time.perf_counter() - end)
            if step % print_freq == 0 or step == (total or 0) - 1:
                self._print(self._progress_line(header, step, total, width, iter_time, data_time))
            end = time.perf_counter()
        elapsed = time.perf_counter() - start
        steps = step + 1
        self._print(f"{header} Total time: {format_seconds(elapsed)} ({elapsed / max(steps, 1):.4f} s / it)".strip())

    def _progress_line(
        self, header: str, step: int, total: int | None, width: int, iter_time: SmoothedValue,
        data_time: SmoothedValue,
    ) -> str:
        parts = [header, f"[{step:>{width}}/{total}]" if total is not None else f"[{step}]"]
        if total is not None:
            parts.append(f"eta: {format_seconds(iter_time.global_avg * (total - 1 - step))}")
        parts += [str(self), f"time: {iter_time}", f"data: {data_time}"]
        if torch.cuda.is_available():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
        return self.delimiter.join(part for part in parts if part)

    def _print(self, line: str) -> None:
        if is_main_process():
            print(line, file=self.stream or sys.stdout, flush=True)


def format_seconds(seconds: float) -> str:
    """``3725.4`` → ``"1:02:05"``."""
    return str(datetime.timedelta(seconds=int(seconds)))


def git_state(repo_dir: str | os.PathLike = REPO_ROOT) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}``; ``"unknown"`` / None where ``repo_dir`` is no git checkout.

    Only a checkout whose top level is ``repo_dir`` counts, so an installed copy that happens to sit inside some
    other repository does not report that repository's commit. Untracked files do not make it dirty.
    """
    repo_dir = Path(repo_dir).resolve()
    top_level = _git(repo_dir, "rev-parse", "--show-toplevel")
    if top_level is None or Path(top_level).resolve() != repo_dir:
        return {"git_commit": "unknown", "git_dirty": None}
    commit = _git(repo_dir, "rev-parse", "HEAD")
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": None if status is None else bool(status)}


def _git(cwd: Path, *args: str) -> str | None:
    # None for every way git can fail here: not installed, not a repository, no commit yet, "dubious ownership".
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def run_metadata(args: Any, repo_dir: str | os.PathLike = REPO_ROOT) -> dict[str, Any]:
    """Everything needed to tell later what ran where: arguments, code version, software, hardware, start time."""
    cuda = torch.cuda.is_available()
    return {
        "args": dict(args) if isinstance(args, Mapping) else dict(vars(args)),
        "argv": list(sys.argv),
        **git_state(repo_dir),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _installed_version("torchvision"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "world_size": get_world_size(),
        "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _installed_version(package: str) -> str | None:
    # From the package metadata, so that writing the metadata does not import torchvision.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _to_json(value: Any) -> Any:
    # What args and metrics commonly hold besides plain JSON types; anything else fails loudly.
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        return value.item()
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    raise TypeError(
        f"cannot write a {type(value).__name__} as JSON; convert it to a number, string, list or dict first"
    )


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON; a kill leaves the old file or the new one, never half of one."""
    data = (json.dumps(obj, indent=2, default=_to_json) + "\n").encode()
    with atomic_write(path, "wb") as f:
        f.write(data)


def append_jsonl(obj: Any, path: str | os.PathLike) -> None:
    """Append ``obj`` as one JSON line (``log.txt``) and flush it to disk; call it on the main process only.

    A line cut short by a killed run is removed first, so the new line never fuses with it.
    """
    line = json.dumps(obj, default=_to_json) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_last_line(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _repair_last_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(
                f"{path}: removing an incomplete last line ({len(data) - keep} bytes) left by an interrupted run",
                stacklevel=3,
            )
            f.truncate(keep)
            return
        f.write(b"\n")  # a complete record that merely lacks its newline


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines file; an unreadable last line (a killed run's) is skipped with a warning."""
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if index < len(lines) - 1:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err.msg}); the file is damaged in the middle, "
                    f"so repair or delete that line"
                ) from err
            warnings.warn(f"{path}, line {number}: skipping an incomplete last line (a killed run?)", stacklevel=2)
    return records
