"""Feature map -> patches, the layout PCKA compares (paper Sec. 4.2, "patch-based CKA").

A feature map (B, C, H, W) is resized bilinearly so that H and W become the next multiples of the
patch size p, cut into non-overlapping p x p patches, and rearranged per channel into a matrix
``X_c`` of shape (num_patches, B * p * p): one row per patch position, holding that patch's
pixels from every image of the batch. PCKA then compares, channel by channel, the
patch x patch Gram matrices ``X_c X_c^T`` of teacher and student.

This is what the paper's released code does (Klayand/PCKA, mmrazor CKA loss); it resizes with
``F.interpolate(mode="bilinear", align_corners=False)``, which we keep. A map whose sides are
already multiples of p is not resampled.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["patch_grid", "patchify"]


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Number of patch rows and columns after rounding H and W up to multiples of the patch size."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def patchify(feat: Tensor, patch_size: int = 16) -> Tensor:
    """(B, C, H, W) -> (C, num_patches, B * p * p), resizing to the next multiple of p first.

    Patches are numbered row-major over the grid, and within a row of the output the layout is
    (image, pixel row, pixel column); only the patch order matters for the Gram matrices, and it
    is the same for every map cut on the same grid.
    """
    if feat.dim() != 4:
        raise ValueError(
            f"patchify expects a feature map of shape (B, C, H, W); got shape {tuple(feat.shape)}."
        )
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}.")
    _, _, h, w = feat.shape
    rows, cols = patch_grid(h, w, patch_size)
    target = (rows * patch_size, cols * patch_size)
    if target != (h, w):
        feat = F.interpolate(feat, size=target, mode="bilinear", align_corners=False)
    return rearrange(feat, "b c (gh p1) (gw p2) -> c (gh gw) (b p1 p2)", p1=patch_size, p2=patch_size)
