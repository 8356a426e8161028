"""Checkpoints that survive a kill, loads that explain their failures, RNG states, the teacher-zoo format.

The zoo format is the one the public CIFAR teacher checkpoints use: ``{"model": state_dict, "epoch", "acc"}``.
Everything this module writes loads with ``torch.load(weights_only=True)``: tensors, numbers, strings and
plain containers only, so a checkpoint never needs the code that wrote it and never runs code when read.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

# How many offending keys an error message lists before it says "and N more".
_MAX_KEYS_SHOWN = 5


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used: corrupt, truncated, or made for another model."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    A reader (or a rerun after a kill) sees either the old file or the complete new one, never a half-written
    file: the data is flushed and fsync'ed before ``os.replace``, which is atomic within one file system. On any
    error the temporary file is removed and the old ``path`` is untouched. A SIGKILL mid-write can leave a hidden
    ``.<name>.<hex>.tmp`` beside it, which nothing reads.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write replaces the whole file: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace never crosses a file system; "x" so the umask sets the permissions
    # (tempfile.mkstemp would make every checkpoint private to its owner).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a Ctrl-C during torch.save must not leave the temporary file behind either.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable across a power loss. Best effort: Windows cannot open a directory this
    # way and some network file systems refuse to fsync one; the new file is in place either way.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous file is intact."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that a kill at any moment leaves either the old file or the new one.

    A failed write (a full disk shows up as OSError ENOSPC, or as torch's "PytorchStreamWriter failed writing"
    RuntimeError) raises CheckpointWriteError, which says so and that the previous file is untouched.
    """
    try:
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
    except OSError as err:
        raise _write_error(Path(path), err.strerror or str(err)) from err
    except RuntimeError as err:
        # torch's zip writer reports a failed write (a full disk among others) as a RuntimeError from its C++
        # container ("[enforce fail at inline_container.cc] unexpected pos ...", "PytorchStreamWriter failed
        # writing file ..."), never as an OSError.
        message = str(err)
        if not any(mark in message for mark in ("inline_container", "PytorchStreamWriter", "write failed")):
            raise
        raise _write_error(Path(path), message.splitlines()[0]) from err


def _write_error(path: Path, reason: str) -> CheckpointWriteError:
    try:
        free_bytes = shutil.disk_usage(path.parent).free
        free = (f"{free_bytes / 2**30:.1f} GiB" if free_bytes >= 2**30 else f"{free_bytes / 2**20:.1f} MiB") + " free there"
    except OSError:
        free = "free space unknown"
    previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written yet"
    return CheckpointWriteError(
        f"could not write {path} ({reason}; {free}); {previous}. Free disk space (or pick another "
        f"--output_dir) and rerun the same command: the run resumes from its last checkpoint.")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` that names the file and the way out when it fails, instead of a pickle traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (or the --resume / --teacher flag)")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    # IndexError and KeyError: torch's weights-only unpickler fails that way on some random bytes (about 1 file in
    # 20 of os.urandom), where it reads an opcode's stack or memo that the garbage never set up.
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        raise _explain_load_error(path, err, weights_only) from err


def _explain_load_error(path: Path, err: Exception, weights_only: bool) -> CheckpointError:
    # torch reports damage in many shapes (EOFError, OSError, RuntimeError from the zip reader, and an
    # UnpicklingError for random bytes) and uses the same types for other problems: the file's structure
    # tells which message fits. Quote torch's first line only, without its terminal colour codes.
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    said = f"(torch.load said: {message.splitlines()[0] if message else type(err).__name__})"
    if "weights_only" in message:
        # torch's text then advises weights_only=False, which must never reach a user about a damaged or
        # unknown file: loading it that way would run whatever code it holds.
        said = f"(torch.load: {type(err).__name__})"
    refused = weights_only and isinstance(err, pickle.UnpicklingError)
    file_format = _file_format(path)
    if file_format == "zip" and refused:
        return CheckpointError(
            f"checkpoint {path} is intact but holds Python objects other than tensors, numbers, strings and "
            f"plain containers, which weights_only loading refuses. If you trust its source, load it with "
            f"weights_only=False. {said}"
        )
    if file_format == "zip":
        return CheckpointError(f"checkpoint {path} is intact but could not be loaded: {err}")
    if file_format == "legacy" and refused:
        return CheckpointError(
            f"checkpoint {path} (written by torch < 1.6) is unreadable: it is corrupt, or holds Python objects "
            f"that weights_only loading refuses. If you trust its source, load it with weights_only=False; "
            f"otherwise delete it, or point to another checkpoint. {said}"
        )
    return CheckpointError(
        f"checkpoint {path} is unreadable: it is corrupt or truncated (a run killed while writing it with a "
        f"non-atomic save?), or not a PyTorch file at all. Delete it to restart that run from scratch, or "
        f"point to another checkpoint. {said}"
    )


# torch < 1.6 wrote a pickle stream that opens with a pickled magic number (torch.serialization.MAGIC_NUMBER).
_LEGACY_HEADER = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _file_format(path: Path) -> str:
    """"zip" for an intact archive (what torch.save writes since 1.6), "legacy" for the older format."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                # testzip checks every member's CRC: a damaged archive counts as "unknown", i.e. corrupt.
                return "zip" if archive.testzip() is None else "unknown"
        except (zipfile.BadZipFile, OSError, EOFError):
            return "unknown"
    with open(path, "rb") as f:
        return "legacy" if f.read(len(_LEGACY_HEADER)) == _LEGACY_HEADER else "unknown"


def rng_state() -> dict[str, Any]:
    """The states of python ``random``, numpy's global generator, torch CPU and every CUDA device.

    numpy's key is stored as a tensor so that the state loads with ``weights_only=True``.
    """
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state()`` captured.

    CUDA states are restored for the devices both machines have; on a machine without CUDA they are skipped,
    since nothing there draws from them.
    """
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _as_tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; a state that went through JSON comes back as lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def save_zoo_weights(model: nn.Module, path: str | os.PathLike, epoch: int, acc: float) -> None:
    """Write ``{"model": state_dict, "epoch": epoch, "acc": acc}`` atomically, tensors on CPU.

    CPU tensors so the file loads on any machine without a ``map_location``; keys without a ``module.`` prefix.
    """
    state_dict = {
        key: value.detach().cpu() if torch.is_tensor(value) else value
        for key, value in unwrap_model(model).state_dict().items()
    }
    save_atomic({"model": state_dict, "epoch": int(epoch), "acc": float(acc)}, path)


def load_zoo_weights(
    model: nn.Module, path: str | os.PathLike, arch_name: str, weights_only: bool = True
) -> dict[str, Any]:
    """Load weights into ``model`` (strict) and return ``{"epoch", "acc"}`` as the file records them (or None).

    Accepts the zoo format, a ``{"state_dict": ...}`` file, or a bare state_dict, with or without the
    ``module.`` prefix DDP adds (and the ``_orig_mod.`` prefix torch.compile adds).
    """
    checkpoint = load_checkpoint(path, weights_only=weights_only)
    state_dict = _find_state_dict(checkpoint, path)
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    model = unwrap_model(model)
    _check_keys_match(model, state_dict, path, arch_name)
    model.load_state_dict(state_dict, strict=True)
    # CRD-era teacher files call the accuracy "best_acc".
    acc = checkpoint.get("acc", checkpoint.get("best_acc"))
    return {"epoch": _as_number(checkpoint.get("epoch")), "acc": _as_number(acc)}


def _find_state_dict(checkpoint: Any, path: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    if checkpoint and all(torch.is_tensor(value) for value in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(
        f"{path} holds no weights: expected them under 'model' or 'state_dict', or a bare state_dict; "
        f"its top-level keys are {_show(list(checkpoint))}"
    )


def _check_keys_match(model: nn.Module, state_dict: Mapping[str, Any], path: Any, arch_name: str) -> None:
    # Compared here rather than left to load_state_dict, whose message lists every key of a ResNet.
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and torch.is_tensor(value) and torch.is_tensor(state_dict[key])
        and state_dict[key].shape != value.shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"weights in {path} do not fit architecture {arch_name!r}:"]
    if missing:
        lines.append(f"  missing from the file ({len(missing)}): {_show(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the file ({len(unexpected)}): {_show(unexpected)}")
    if wrong_shape:
        lines.append(f"  wrong shape ({len(wrong_shape)}): {_show(wrong_shape)}")
    lines.append(
        "Is this the checkpoint of a different architecture, or is the architecture flag (e.g. --teacher) wrong? "
        "Pass the architecture the file was trained as, or point to that architecture's checkpoint."
    )
    raise CheckpointError("\n".join(lines))


def _show(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_KEYS_SHOWN])
    if len(items) > _MAX_KEYS_SHOWN:
        shown += f", ... and {len(items) - _MAX_KEYS_SHOWN} more"
    return shown


def _as_number(value: Any) -> Any:
    # Older zoo files store the accuracy as a 0-d tensor.
    return value.item() if torch.is_tensor(value) and value.numel() == 1 else value


def save_training_state(path: str | os.PathLike, *, model: nn.Module, criterion: nn.Module | None,
                        optimizer: torch.optim.Optimizer, lr_scheduler: Any, epoch: int, best_acc1: float,
                        best_epoch: int, identity: Mapping[str, Any]) -> None:
    """checkpoint.pth of a classification run, atomically: everything a resume needs to continue bit for bit (the
    loss's own state too, for a loss with parameters) and the run's identity, which a resume checks."""
    save_atomic({"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "criterion": criterion.state_dict() if criterion is not None else {},
                 "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "best_acc1": best_acc1,
                 "best_epoch": best_epoch, "rng": rng_state(), "identity": dict(identity)}, path)


def restore_training_state(checkpoint: Mapping[str, Any], *, model: nn.Module, criterion: nn.Module | None,
                           optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> tuple[int, float, int]:
    """Load what ``save_training_state`` wrote (RNG states included); returns (start epoch, best top-1, its epoch)."""
    unwrap_model(model).load_state_dict(checkpoint["model"])
    if criterion is not None and checkpoint.get("criterion"):
        criterion.load_state_dict(checkpoint["criterion"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["epoch"] + 1, checkpoint["best_acc1"], checkpoint["best_epoch"]
