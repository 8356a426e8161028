"""The run folder: its files, its identity, and the one decision every start makes (new / resume / finished / conflict).

A run folder (``output_dir``) holds::

    args.json          written once, at the first start: the run's identity, the flags as given, code and machine
    invocations.jsonl  one line per start and per end (resumed, finished, failed, interrupted), never rewritten
    log.txt            one JSON object per epoch
    checkpoint.pth     the full training state, replaced atomically after every epoch
    student_best.pth   zoo-format weights {"model", "epoch", "acc"} of the best epoch, and student_last.pth
    teacher_eval.json  the teacher's measured accuracy, keyed by the sha256 of its checkpoint
    done.json          the result, written last: a folder with it is finished

Only this module types these names. The **identity** of a run is the dict of resolved settings that change its
result (the task decides which: method after defaults, loss weights, recipe, data, teacher sha256, seed); flags that
do not (paths, workers, print frequency, device) are not in it. The same identity resumes or is finished, however
the flags were spelled; a different identity is refused with the keys that differ. The keys in ``extendable``
(``epochs`` for a step schedule indexed by epoch) may grow on resume: training on is then the same as having asked
for more epochs at the start.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from common.checkpoint import CheckpointError, atomic_write, load_checkpoint
from common.logging import append_jsonl, read_jsonl, run_metadata, write_json_atomic

ARGS_FILE = "args.json"
HISTORY_FILE = "invocations.jsonl"
LOG_FILE = "log.txt"
CHECKPOINT_FILE = "checkpoint.pth"
BEST_WEIGHTS_FILE = "student_best.pth"
LAST_WEIGHTS_FILE = "student_last.pth"
TEACHER_EVAL_FILE = "teacher_eval.json"
DONE_FILE = "done.json"
# Written by slurm/launch.py at submission, before the run itself starts.
SLURM_JOB_FILE = "slurm_job.json"

# Longest default folder name for the settings that differ from the recipe; past it a hash keeps names unique.
_MAX_SUFFIX = 60


class RunError(RuntimeError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


class RunConflictError(RunError):
    """The folder holds a run with another identity."""


@dataclass
class Decision:
    """What a start does in a folder: "new", "resume" (from ``start_epoch`` of the checkpoint) or "finished"."""

    state: str
    extended: dict = field(default_factory=dict)  # extendable keys changed on resume: {key: (old, new)}


def _normalise(value: Any) -> Any:
    # What JSON would give back, so a fresh identity compares equal to a stored one (tuples become lists).
    return json.loads(json.dumps(value))


def identity_differences(old: Mapping, new: Mapping, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """[(key, old value, new value)] for every key whose value differs (a missing key counts as None)."""
    old, new = _normalise(dict(old)), _normalise(dict(new))
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in ignore]
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def folder_suffix(identity: Mapping, recipe: Mapping, ignore: tuple[str, ...] = ()) -> str:
    """A readable name for what differs from the recipe: '' for the recipe itself, else e.g. 'lr0.1-no_amp'.

    Booleans read as ``key`` / ``no_key``, numbers as ``key<value>``, lists joined by '_'. A long suffix keeps its
    first parts and ends with a hash of the whole, so two settings never share a name.
    """
    parts = []
    for key, _, value in identity_differences(recipe, identity, ignore):
        if isinstance(value, bool):
            parts.append(key if value else f"no_{key}")
        elif value is None:
            parts.append(f"no_{key}")
        elif isinstance(value, float):
            parts.append(f"{key}{value:g}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{key}{'_'.join(str(v) for v in value)}")
        elif isinstance(value, str):
            parts.append(f"{key}_{value}")
        else:
            parts.append(f"{key}{value}")
    suffix = "-".join(parts).replace(os.sep, "_").replace(" ", "_")
    if len(suffix) > _MAX_SUFFIX:
        digest = hashlib.sha1(suffix.encode()).hexdigest()[:8]
        suffix = f"{suffix[:_MAX_SUFFIX - 9].rstrip('-_')}-{digest}"
    return suffix


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({err}): the {what} is damaged. Delete that file (or the whole "
                       f"folder) to continue; nothing else in the folder is affected.") from None
    except OSError as err:
        raise RunError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} holds a JSON {type(obj).__name__}, not an object: the {what} is damaged. Delete it "
                       f"(or the whole folder) to continue.")
    return obj


class RunFolder:
    """One run's folder. Cheap to make: nothing is read or written until asked."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.args_file = self.path / ARGS_FILE
        self.history_file = self.path / HISTORY_FILE
        self.log_file = self.path / LOG_FILE
        self.checkpoint = self.path / CHECKPOINT_FILE
        self.best_weights = self.path / BEST_WEIGHTS_FILE
        self.last_weights = self.path / LAST_WEIGHTS_FILE
        self.teacher_eval_file = self.path / TEACHER_EVAL_FILE
        self.done_file = self.path / DONE_FILE

    # ------------------------------------------------------------------------------------------ reading
    def read_identity(self) -> dict | None:
        """The identity stored at the first start, or None where no run started here."""
        if not self.args_file.exists():
            return None
        record = _read_json(self.args_file, "run record (args.json)")
        if not isinstance(record.get("identity"), dict):
            raise RunError(f"{self.args_file} has no \"identity\": it was written by an older version of this code, "
                           f"which cannot tell whether your settings match. Pass another --output_dir, or delete "
                           f"{self.path} to start over.")
        return record["identity"]

    def read_done(self) -> dict | None:
        return _read_json(self.done_file, "result (done.json)") if self.done_file.exists() else None

    def read_history(self) -> list[dict]:
        if not self.history_file.exists():
            return []
        with warnings.catch_warnings():  # a running process may be writing its last line
            warnings.simplefilter("ignore")
            return read_jsonl(self.history_file)

    def epochs_logged(self) -> int:
        if not self.log_file.exists():
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return len({entry.get("epoch") for entry in read_jsonl(self.log_file) if isinstance(entry, dict)})

    # ------------------------------------------------------------------------------------------ deciding
    def check_writable(self) -> None:
        """A clear error now, rather than a traceback after the data is loaded, where the folder cannot be written."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--output_dir {self.path} is a file, not a folder: pass a folder path (it is created "
                           f"when missing).")
        existing = self.path.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise RunError(f"{existing} is a file, so the run folder {self.path} cannot be created under it: pass "
                           f"another --output_dir.")
        try:  # a real write: permissions alone miss read-only mounts, and root passes every permission check
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise RunError(f"cannot write to {existing} ({err.strerror}), so the run folder {self.path} cannot be "
                           f"{'written' if existing == self.path.absolute() else 'created'}: pass an --output_dir "
                           f"where you can write.") from None

    def decide(self, identity: Mapping, extendable: tuple[str, ...] = ("epochs",)) -> Decision:
        """new / resume / finished for this identity; RunConflictError where the folder holds another run, or a
        finished one that has trained more epochs than now asked for (it cannot shrink back)."""
        self.check_writable()
        stored = self.read_identity()
        if stored is None:
            leftovers = [name for name in (CHECKPOINT_FILE, DONE_FILE, LOG_FILE) if (self.path / name).exists()]
            if leftovers:
                raise RunConflictError(
                    f"{self.path} holds {', '.join(leftovers)} but no {ARGS_FILE}: it is not a run folder of this "
                    f"version (or its record was deleted), so it cannot be resumed safely. Pass another "
                    f"--output_dir, or delete {self.path} to start over.")
            return Decision("new")
        changed = identity_differences(stored, identity)
        differences = [d for d in changed if d[0] not in extendable]
        if differences:
            lines = "\n".join(f"  {key}: {old!r} there, {new!r} now" for key, old, new in differences)
            raise RunConflictError(
                f"{self.path} holds a run with other settings:\n{lines}\nEither leave out --output_dir (every "
                f"setting gets its own default folder), or pass a new --output_dir; to redo that run from "
                f"scratch, delete {self.path}.")
        extended = {key: (old, new) for key, old, new in changed if key in extendable}
        done = self.read_done()
        epochs = identity.get("epochs")
        trained = (done or {}).get("epochs")
        if trained is not None and epochs is not None and epochs < trained:
            raise RunConflictError(
                f"{self.path} has already trained {trained} epochs; --epochs {epochs} cannot undo that. Pass "
                f"--epochs {trained} or more to use this run, or another --output_dir for a shorter one.")
        if done is not None and (epochs is None or trained is None or epochs <= trained):
            return Decision("finished")
        return Decision("resume" if (self.checkpoint.exists() or done is not None) else "new", extended)

    # ------------------------------------------------------------------------------------------ writing
    def start(self, identity: Mapping, args: Any, decision: Decision, extra: Mapping | None = None) -> None:
        """Create the folder, write args.json if this is the run's first start, and record this invocation."""
        self.path.mkdir(parents=True, exist_ok=True)
        metadata = run_metadata(args)
        if decision.state == "resume" and self.done_file.exists():
            # A finished run trained on for more epochs: its old result goes into the history, not the report.
            self.record("reopened", previous_result=self.read_done())
            self.done_file.unlink()
        if not self.args_file.exists():
            write_json_atomic({"identity": dict(identity), **metadata, **(extra or {})}, self.args_file)
        elif decision.extended:
            # The one change a run may take: keep the record's identity current, and its history says when.
            record = _read_json(self.args_file, "run record (args.json)")
            record["identity"] = {**record["identity"], **{k: new for k, (_, new) in decision.extended.items()}}
            write_json_atomic(record, self.args_file)
        self.record("start", decision=decision.state,
                    extended={k: list(v) for k, v in decision.extended.items()} or None,
                    argv=metadata["argv"], git_commit=metadata["git_commit"], hostname=metadata["hostname"],
                    world_size=metadata["world_size"])

    @contextlib.contextmanager
    def recording(self, main_process: bool = True) -> Iterator[None]:
        """Around a run's training: an exception is recorded in invocations.jsonl as "failed" with its message
        (Ctrl-C as "interrupted") before it propagates, so reports and status tell a failed run from a running one.
        Only the main process writes."""
        try:
            yield
        except BaseException as err:
            if main_process and not isinstance(err, SystemExit):
                if isinstance(err, KeyboardInterrupt):
                    self.record("interrupted")
                else:
                    self.record("failed", message=f"{type(err).__name__}: {err}")
            raise

    def record(self, event: str, **details: Any) -> None:
        """One line in invocations.jsonl: start, finished, failed (with its message), interrupted."""
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        entry = {"event": event, "time": now, "pid": os.getpid(),
                 **{k: v for k, v in details.items() if v is not None}}
        append_jsonl(entry, self.history_file)

    def append_log(self, entry: Mapping) -> None:
        append_jsonl(dict(entry), self.log_file)

    def repair_log(self, start_epoch: int) -> None:
        """Drop log lines of epochs >= start_epoch: a run killed after logging an epoch but before checkpointing it
        redoes that epoch, which would otherwise appear twice."""
        if not self.log_file.exists():
            return
        kept = [entry for entry in read_jsonl(self.log_file) if entry.get("epoch", -1) < start_epoch]
        with atomic_write(self.log_file, "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in kept)

    def read_teacher_eval(self, sha256: str) -> dict | None:
        if not self.teacher_eval_file.exists():
            return None
        try:
            cache = _read_json(self.teacher_eval_file, "teacher evaluation cache")
        except RunError:
            return None  # a cache: measure again rather than fail
        entry = cache.get(sha256)
        return entry if isinstance(entry, dict) else None

    def write_teacher_eval(self, sha256: str, entry: Mapping) -> None:
        cache = {}
        if self.teacher_eval_file.exists():
            try:
                cache = _read_json(self.teacher_eval_file, "teacher evaluation cache")
            except RunError:
                cache = {}
        cache[sha256] = dict(entry)
        write_json_atomic(cache, self.teacher_eval_file)

    def read_checkpoint(self, identity: Mapping, extendable: tuple[str, ...] = ("epochs",),
                        resume: str | os.PathLike | None = None) -> dict | None:
        """The training checkpoint to resume from (``resume``, else this folder's; None where there is none),
        checked to be a training checkpoint of a run with this identity that has not trained past its epochs."""
        path = Path(resume) if resume else (self.checkpoint if self.checkpoint.exists() else None)
        if path is None:
            return None
        if not path.is_file():
            raise RunError(f"--resume {path} does not exist; check the path, or leave --resume out to resume from "
                           f"the run folder's own {CHECKPOINT_FILE}.")
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint:
            raise RunError(f"--resume {path} holds weights only, not a training checkpoint: to evaluate it add "
                           f"--eval; to continue training, resume from a run's {CHECKPOINT_FILE}.")
        saved = checkpoint.get("identity")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} records no run identity (an older version of this code wrote it), so it "
                                  f"cannot be resumed safely. Pass another --output_dir, or delete it to start over.")
        differences = identity_differences(saved, identity, ignore=extendable)
        if differences:
            lines = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, old, new in differences)
            raise RunConflictError(f"{path} belongs to a run with other settings ({lines}): pass the settings it was "
                                   f"trained with, or another --output_dir.")
        # As decide() for a finished run: epochs may grow on resume, not shrink below what is trained.
        trained, epochs = checkpoint.get("epoch", -1) + 1, identity.get("epochs")
        if epochs is not None and trained > epochs:
            raise RunConflictError(f"{path} has already trained {trained} epochs; --epochs {epochs} cannot undo that: "
                                   f"pass --epochs {trained} or more, or another --output_dir for a shorter run.")
        return checkpoint

    def finish(self, summary: Mapping) -> None:
        write_json_atomic(dict(summary), self.done_file)
        self.record("finished")


# ---------------------------------------------------------------------------------------------- reading many runs
@dataclass
class RunRecord:
    """A run as reports and status views see it."""

    path: Path
    state: str  # done | in progress | failed | not started | corrupt
    identity: dict | None = None
    summary: dict | None = None  # done.json
    epochs_done: int = 0
    detail: str = ""  # the error of a failed or corrupt run

    @property
    def epochs(self) -> int | None:
        return (self.summary or {}).get("epochs", (self.identity or {}).get("epochs"))


def read_run(path: str | os.PathLike) -> RunRecord:
    """Where one run folder stands. Never raises for a damaged folder: it is reported as ``corrupt`` instead."""
    folder = RunFolder(path)
    try:
        identity = folder.read_identity()
        summary = folder.read_done()
        epochs_done = folder.epochs_logged()
        history = folder.read_history()
    except (RunError, ValueError, OSError) as err:
        return RunRecord(folder.path, "corrupt", detail=str(err))
    if summary is not None:
        if identity is None and isinstance(summary.get("identity"), dict):
            identity = summary["identity"]  # done.json repeats it; a folder may have lost its args.json
        return RunRecord(folder.path, "done", identity, summary, epochs_done)
    last_end = next((entry for entry in reversed(history) if entry.get("event") != "start"), None)
    last_start = next((entry for entry in reversed(history) if entry.get("event") == "start"), None)
    if last_end is not None and last_start is not None and history.index(last_end) > history.index(last_start):
        if last_end.get("event") == "failed":
            return RunRecord(folder.path, "failed", identity, None, epochs_done, last_end.get("message", ""))
        if last_end.get("event") == "interrupted":
            return RunRecord(folder.path, "in progress", identity, None, epochs_done,
                             "interrupted; rerun its command to resume")
    if epochs_done == 0 and not folder.checkpoint.exists():
        return RunRecord(folder.path, "not started", identity, None, epochs_done)
    return RunRecord(folder.path, "in progress", identity, None, epochs_done)


def find_runs(root: str | os.PathLike) -> list[RunRecord]:
    """Every run folder under ``root`` (searched recursively): folders with args.json or done.json."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root} does not exist or is not a folder; pass the output_dir of your runs or a folder "
                       f"above them")
    folders = sorted({p.parent for name in (ARGS_FILE, DONE_FILE) for p in root.rglob(name)})
    return [read_run(folder) for folder in folders]


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
