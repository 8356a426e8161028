"""What every task's train.py does the same way at the command line: flag errors, the device check, and running
``main(args)`` as a command, where a user error is one line with its fix and never a traceback."""
from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable, Iterable

import torch


class UsageError(ValueError):
    """Flags that do not fit together or cannot work here; the message says which and what to pass instead."""


# Loss weights of the classification tasks' shared flags: each must be a finite value >= 0 (None: the task's default).
WEIGHT_FLAGS = ("ce_weight", "kd_weight", "dkd_alpha", "dkd_beta", "fcka_weight", "lcka_intra_weight",
                "lcka_inter_weight")


def check_flags(args: argparse.Namespace, task_checks: Iterable[tuple[bool, str]] = ()) -> None:
    """Flags that are wrong on their own, caught before anything is loaded: the recipe and loss flags every
    classification task shares, then the task's own ``(ok, message)`` checks. The first failure is a UsageError."""
    checks = [
        (args.epochs >= 1, f"--epochs {args.epochs}: train at least 1 epoch"),
        (args.batch_size >= 2, f"--batch_size {args.batch_size}: CKA needs at least 2 samples per batch"),
        (args.lr is None or (math.isfinite(args.lr) and args.lr > 0), f"--lr {args.lr}: pass a positive learning rate"),
        (args.momentum >= 0, f"--momentum {args.momentum}: pass a value >= 0"),
        (args.weight_decay >= 0, f"--weight_decay {args.weight_decay}: pass a value >= 0"),
        (args.lr_decay_rate > 0, f"--lr_decay_rate {args.lr_decay_rate}: pass a positive factor"),
        (all(e >= 1 for e in args.lr_decay_epochs) and list(args.lr_decay_epochs) == sorted(args.lr_decay_epochs),
         f"--lr_decay_epochs {args.lr_decay_epochs}: pass increasing epochs >= 1"),
        (0 <= args.seed < 2**32, f"--seed {args.seed}: pass an integer in [0, 2**32)"),
        (args.print_freq >= 1, f"--print_freq {args.print_freq}: pass a number of iterations >= 1"),
        (args.num_workers >= 0, f"--num_workers {args.num_workers}: pass 0 (load in the main process) or more"),
        (args.kd_temperature > 0 and args.dkd_temperature > 0, "--kd_temperature / --dkd_temperature: must be > 0"),
        (args.dkd_warmup >= 0, f"--dkd_warmup {args.dkd_warmup}: pass a number of epochs >= 0"),
    ]
    for name in WEIGHT_FLAGS:
        value = getattr(args, name)
        checks.append((value is None or (math.isfinite(value) and value >= 0), f"--{name} {value}: pass a value >= 0"))
    for ok, message in [*checks, *task_checks]:
        if not ok:
            raise UsageError(message + ".")


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
