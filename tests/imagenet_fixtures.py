"""Writes small ImageNet look-alikes: the ImageFolder layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) with real
JPEG files of a few classes, and teacher files in torchvision's format (a bare state_dict).

Import from test modules (this directory is on ``sys.path`` under pytest's default import mode)::

    from imagenet_fixtures import write_fake_imagenet, write_torchvision_teacher
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["WNIDS", "write_fake_imagenet", "write_torchvision_teacher"]

# Real ImageNet-1k wnids (the first classes in sorted order: tench, goldfish, great white shark, tiger shark, ...).
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668")


def _image(label: int, index: int, rng: np.random.Generator) -> Image.Image:
    """Class colour plus stripes at a class-dependent angle plus noise; sizes vary like ImageNet's."""
    height, width = (40, 52) if index % 2 else (52, 40)
    palette = np.random.default_rng(1234).integers(40, 216, size=(len(WNIDS), 3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = label * np.pi / len(WNIDS)
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / 10 + rng.uniform(0, 2 * np.pi))
    pixels = palette[label] + 50 * stripes[..., None] + rng.normal(0, 10, size=(height, width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def write_fake_imagenet(root: str | Path, classes: int = 4, train_per_class: int = 8, val_per_class: int = 4,
                        seed: int = 0) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG`` and ``root/val/<wnid>/ILSVRC2012_val_<i>.JPEG``; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    number = 0
    for label, wnid in enumerate(WNIDS[:classes]):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                number += 1
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{number:08d}.JPEG"
                _image(label, i, rng).save(folder / name, quality=90)
    return root


def write_torchvision_teacher(path: str | Path, arch: str, num_classes: int, seed: int = 0) -> Path:
    """A randomly initialised ``arch`` saved as torchvision saves its weights: a bare state_dict."""
    import torch

    from imagenet.models import build_model

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(arch, num_classes).state_dict(), path)
    return path
