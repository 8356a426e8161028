"""ImageNet teachers: torchvision's V1 weights of ResNet-34 and ResNet-50 (the paper's Table 2), or a local file.

The files are torchvision's own (``ResNet34_Weights.IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V1``): a bare
state_dict, downloaded from download.pytorch.org into torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where
torchvision itself caches them, so a cluster's pre-downloaded copy is found) and checked against the sha256 prefix
in their file names. train.py measures every teacher on the validation set before distilling and prints it beside
the published accuracy; the measurement is cached by the checkpoint's sha256 (and the validation set), so a sweep
of many runs evaluates each teacher once.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import ResNet34_Weights, ResNet50_Weights

from common.logging import write_json_atomic

# The weights Table 2's teachers are: "the torchvision ResNet-34/50 weights (V1)" (paper, Table 2).
TEACHER_WEIGHTS = {
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
}


def published_top1(name: str) -> float | None:
    """torchvision's published ImageNet-1k val top-1 (%) of the teacher's V1 weights: 73.314 / 76.13.

    (The paper's Table 2 lists 73.31 and 76.16 for the same weights.)"""
    weights = TEACHER_WEIGHTS.get(name)
    return None if weights is None else weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]


def default_url(name: str) -> str | None:
    weights = TEACHER_WEIGHTS.get(name)
    return None if weights is None else weights.url


class TeacherNotFoundError(FileNotFoundError):
    """No teacher checkpoint, and none could be fetched; the message lists the ways out."""


def resolve_teacher_checkpoint(name: str, teacher_ckpt: str | None, weights_dir: str | None = None,
                               url: str | None = None, download: bool = True) -> Path:
    """The file to load for teacher ``name``: ``--teacher_ckpt``, else torchvision's weights (downloaded when
    missing, sha256-checked against the prefix in the file name, as torchvision does)."""
    if teacher_ckpt:
        path = Path(teacher_ckpt)
        if not path.is_file():
            raise TeacherNotFoundError(f"--teacher_ckpt {path} is not a file; pass a torchvision-format state_dict "
                                       f"of {name} (or leave the flag out to use torchvision's weights).")
        return path
    url = url or default_url(name)
    if url is None:
        raise TeacherNotFoundError(f"torchvision publishes no ImageNet weights for {name} that the paper uses as a "
                                   f"teacher (those are {', '.join(TEACHER_WEIGHTS)}): pass --teacher_ckpt FILE "
                                   f"(a torchvision-format state_dict of {name}).")
    directory = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    fix = (f"download {url} on a machine with internet and copy it to {path} (or set TORCH_HOME, or pass "
           f"--weights_dir DIR holding it, or --teacher_ckpt FILE)")
    if not download:
        raise TeacherNotFoundError(f"teacher {name} is not at {path} and downloading is off (--no_download): {fix}.")
    directory.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a wrong hash is a RuntimeError
        raise TeacherNotFoundError(f"teacher {name}: downloading {url} failed ({err}); {fix}.") from err
    return path


def _cache_file(cache_dir: str | os.PathLike, sha256: str, val_key: str) -> Path:
    # The validation set (its size, transform, subset) is part of the key: a --subset run measures other images.
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", val_key)
    return Path(cache_dir) / f"{sha256[:16]}_{tag}.json"


def cached_teacher_top1(cache_dir: str | os.PathLike, sha256: str, val_key: str) -> dict | None:
    path = _cache_file(cache_dir, sha256, val_key)
    if not path.is_file():
        return None
    entry = json.loads(path.read_text())
    return entry if entry.get("sha256") == sha256 and entry.get("val") == val_key else None


def store_teacher_top1(cache_dir: str | os.PathLike, sha256: str, val_key: str, entry: dict) -> Path:
    path = _cache_file(cache_dir, sha256, val_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**entry, "sha256": sha256, "val": val_key}, path)
    return path
