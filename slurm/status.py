"""Where each run stands: done / running / pending / failed / not submitted, from its folder and squeue."""
from __future__ import annotations

import getpass
import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from common.run import SLURM_JOB_FILE, RunRecord, read_run
from slurm.sweeps import Run

QUEUE_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"}
JOB_RECORD = SLURM_JOB_FILE


def squeue_states() -> tuple[dict[str, str] | None, str]:
    """{job id: SLURM state} of this user's queued and running jobs (array tasks one by one), or (None, why not)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None, "squeue not found (not on a SLURM cluster)"
    try:
        proc = subprocess.run([squeue, "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "squeue did not answer within 60 s"
    if proc.returncode != 0:
        return None, f"squeue failed: {proc.stderr.strip()}"
    return dict(line.split("|", 1) for line in proc.stdout.split()), ""


def _task_progress(run: Run, record: RunRecord) -> str | None:
    """The task's own words for how far a run is, where its report module has progress(record) (detection counts
    iterations, and its checkpoints are detectron2's, so log.txt's epochs and checkpoint.pth say nothing there)."""
    try:
        report = importlib.import_module(f"{run.task}.report")
    except ModuleNotFoundError:
        return None
    progress = getattr(report, "progress", None)
    return progress(record) if progress is not None else None


def _progress(run: Run) -> str:
    record = read_run(run.output_dir)
    if record.state == "corrupt":
        return f"run folder damaged ({record.detail})"
    task_progress = _task_progress(run, record)
    if task_progress:
        return task_progress
    if record.state == "not started":
        return "not started"
    epochs = (record.identity or {}).get("epochs", getattr(run.args, "epochs", "?"))
    return f"epoch {record.epochs_done}/{epochs}"


def _tail(path: str | os.PathLike, lines: int = 10) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        return f"<{path}: {err.strerror}>"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_state(run: Run, queue: dict[str, str] | None) -> tuple[str, str]:
    """(state, detail): done, running, pending, failed, not submitted, or unknown (no scheduler to ask).

    `queue` must be read before this is called: a job that leaves the queue has written done.json by then.
    """
    folder = read_run(run.output_dir)
    # Classification runs report top-1, detection runs (coco_detection) box AP.
    if folder.state == "done":
        summary = folder.summary
        scores = [f"{key} {summary[key]:.2f}" for key in ("last_acc1", "best_acc1", "AP")
                  if isinstance(summary.get(key), (int, float))]
        return "done", ", ".join(scores)
    if folder.state == "corrupt":
        return "failed", f"run folder damaged: {folder.detail}"
    record_path = run.output_dir / JOB_RECORD
    if not record_path.exists():
        if folder.state == "failed":
            return "failed", f"not submitted; its last start failed: {folder.detail}"
        return "not submitted", _progress(run) if folder.epochs_done else ""
    record = json.loads(record_path.read_text())
    job_id = record["job_id"]
    if queue is None or record.get("cluster", "slurm") != "slurm":
        return "unknown", f"job {job_id}, {_progress(run)}"
    slurm_state = queue.get(job_id)
    if slurm_state in QUEUE_RUNNING:
        return "running", f"job {job_id}, {_progress(run)}"
    if slurm_state is not None:
        return "pending", f"job {job_id} {slurm_state}, {_progress(run)}"
    stderr = record.get("stderr", "")
    tail = "\n".join("    | " + line for line in _tail(stderr).splitlines())
    return "failed", f"job {job_id} left the queue without done.json ({_progress(run)}); tail of {stderr}:\n{tail}"


def run_states(runs: Sequence[Run]) -> list[tuple[Run, str, str]]:
    queue = {}
    if any((run.output_dir / JOB_RECORD).exists() for run in runs):  # else no need to ask the scheduler
        queue, why = squeue_states()
        if queue is None:
            print(f"warning: cannot read the queue ({why}); submitted runs that are not done show as unknown")
    return [(run, *run_state(run, queue)) for run in runs]


def summarise(states: Sequence[tuple[Run, str, str]]) -> str:
    order = ("done", "running", "pending", "failed", "not submitted", "unknown")
    counts = {name: sum(1 for _, state, _ in states if state == name) for name in order}
    runs = f"{len(states)} run{'s' if len(states) != 1 else ''}"
    return f"{runs}: " + ", ".join(f"{counts[name]} {name}" for name in order if counts[name])


def print_status(runs: Sequence[Run]) -> list[tuple[Run, str, str]]:
    states = run_states(runs)
    width = max([len(run.name) for run in runs] + [3])
    for run, state, detail in states:
        print(f"{state:<13} {run.name:<{width}}  {detail}")
    print(summarise(states))
    return states
