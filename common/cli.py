"""What every task's train.py does the same way at the command line: flag errors, the device check, and running
``main(args)`` as a command, where a user error is one line with its fix and never a traceback."""
from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

import torch


class UsageError(ValueError):
    """Flags that do not fit together or cannot work here; the message says which and what to pass instead."""


def resolve_device(name: str | None) -> torch.device:
    """The training device (``--device``; default cuda where there is one), with a clear error where it does not
    exist on this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device torch knows; pass cpu or cuda (cuda:N for one GPU)."
                         ) from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: the tasks train on cpu or cuda only.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}, built "
                         f"with CUDA {torch.version.cuda}); pass --device cpu, or run where a GPU is visible.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here (cuda:0..).")
    return device


def run_command(main: Callable[[argparse.Namespace], object], args: argparse.Namespace,
                user_errors: tuple[type[BaseException], ...]) -> None:
    """``main(args)`` as a command: exit 1 with one line for a user error (its message already says the fix), for
    Ctrl-C (the run resumes from its last checkpoint) and for a full disk or a folder that cannot be written."""
    try:
        main(args)
    except user_errors as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the run stopped; rerun the same command to resume from its last checkpoint "
                 "(saved after every epoch).")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        sys.exit(f"error: cannot write {err.filename or 'a run file'}: {err.strerror}. Files written before are "
                 f"intact; free space or fix the permissions, then rerun the same command to resume.")
