"""Feature map -> patches, the layout PCKA compares (paper Sec. 4.2, "patch-based CKA").

A feature map (B, C, H, W) is resized bilinearly so that H and W become the next multiples of the
patch size p, cut into non-overlapping p x p patches, and rearranged per channel into a matrix
``X_c`` of shape (num_patches, B * p * p): one row per patch position, holding that patch's
pixels from every image of the batch. PCKA then compares, channel by channel, the
patch x patch Gram matrices ``X_c X_c^T`` of teacher and student.

This is what the paper's released code does (Klayand/PCKA, mmrazor CKA loss); it resizes with
``F.interpolate(mode="bilinear", align_corners=False)``, which we keep. A map whose sides are
already multiples of p is not resampled.

``patch_cka`` computes those per-channel CKAs in one fused operation with its own backward, close
to the cost of its Gram matmuls; see its docstring for where the time goes and why.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from common.cka import _no_autocast, _promote, cka_and_gradient

__all__ = ["patch_grid", "patchify", "patch_cka"]

# Channels per chunk of ``patch_cka`` on CPU: about this many elements of resized map per chunk.
# A few MiB stay in cache and are recycled by malloc; a whole P3 level (~37 MiB in float32) is
# mmap-ed and page-faulted afresh by every temporary, which cost more than the matmuls.
CPU_CHUNK_ELEMENTS = 1 << 19


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Number of patch rows and columns after rounding H and W up to multiples of the patch size."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def _check(feat: Tensor, patch_size: int) -> None:
    if feat.dim() != 4:
        raise ValueError(
            f"patchify expects a feature map of shape (B, C, H, W); got shape {tuple(feat.shape)}."
        )
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}.")


def _resized_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    rows, cols = patch_grid(height, width, patch_size)
    return rows * patch_size, cols * patch_size


def patchify(feat: Tensor, patch_size: int = 16) -> Tensor:
    """(B, C, H, W) -> (C, num_patches, B * p * p), resizing to the next multiple of p first.

    Patches are numbered row-major over the grid, and within a row of the output the layout is
    (image, pixel row, pixel column); only the patch order matters for the Gram matrices, and it
    is the same for every map cut on the same grid.
    """
    _check(feat, patch_size)
    _, _, h, w = feat.shape
    target = _resized_size(h, w, patch_size)
    if target != (h, w):
        feat = F.interpolate(feat, size=target, mode="bilinear", align_corners=False)
    return rearrange(feat, "b c (gh p1) (gw p2) -> c (gh gw) (b p1 p2)", p1=patch_size, p2=patch_size)


def _patch_rows(feat: Tensor, patch_size: int, centered: bool) -> Tensor:
    """``patchify`` of a float32 map into a fresh contiguous buffer, its columns centred over the patches if asked.

    Centring as ``common.cka.center_columns`` does it (subtract the first patch, then the mean:
    accurate for offset maps, exact zeros for a constant channel), with the first subtraction
    writing the rearranged copy, so centring adds one pass over the buffer, not three.
    """
    b, c, h, w = feat.shape
    size = _resized_size(h, w, patch_size)
    if size != (h, w):
        feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
    gh, gw = size[0] // patch_size, size[1] // patch_size
    blocks = feat.view(b, c, gh, patch_size, gw, patch_size).permute(1, 2, 4, 0, 3, 5)
    rows = feat.new_empty(blocks.shape)
    if centered:
        torch.sub(blocks, blocks[:, :1, :1].clone(), out=rows)
        rows = rows.view(c, gh * gw, b * patch_size * patch_size)
        return rows.sub_(rows.mean(dim=1, keepdim=True))
    return rows.copy_(blocks).view(c, gh * gw, b * patch_size * patch_size)


def _channel_chunks(feat: Tensor, patch_size: int) -> list[slice]:
    b, c, h, w = feat.shape
    if feat.device.type != "cpu":
        return [slice(0, c)]  # the caching allocator recycles big buffers; one big batch is fastest
    per_channel = b * math.prod(_resized_size(h, w, patch_size))
    step = max(1, CPU_CHUNK_ELEMENTS // per_channel)
    return [slice(start, min(start + step, c)) for start in range(0, c, step)]


class _PatchCKA(torch.autograd.Function):
    """Per-channel CKA of patch Grams with a hand-written backward; see ``patch_cka``."""

    @staticmethod
    def forward(ctx, feat_s: Tensor, feat_t: Tensor, patch_size: int, centered: bool) -> Tensor:
        fs, ft = _promote(feat_s), _promote(feat_t)
        chunks = _channel_chunks(fs, patch_size)
        values, saved = [], []
        with _no_autocast(fs):
            for chunk in chunks:
                xs = _patch_rows(fs[:, chunk], patch_size, centered)
                xt = _patch_rows(ft[:, chunk], patch_size, centered)
                # The rows are centred already; cka_and_gradient centres the Grams once more, which
                # only removes the rounding left in the means (O(n^2), small).
                value, grad_gram = cka_and_gradient(xs @ xs.transpose(1, 2), xt @ xt.transpose(1, 2), centered)
                values.append(value)
                saved += [xs, grad_gram]
        ctx.patch_size, ctx.chunks, ctx.in_shape, ctx.in_dtype = patch_size, chunks, fs.shape, feat_s.dtype
        ctx.save_for_backward(*saved)
        return torch.cat(values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        saved = ctx.saved_tensors
        p, (b, _, h, w) = ctx.patch_size, ctx.in_shape
        size = _resized_size(h, w, p)
        gh, gw = size[0] // p, size[1] // p
        grad_fs = saved[0].new_empty(ctx.in_shape)
        for chunk, xs, grad_gram in zip(ctx.chunks, saved[0::2], saved[1::2]):
            c = xs.shape[0]
            # K = X X^T gives dX = (G + G^T) X = 2 G X (G symmetric). Centring X (X = H X_raw)
            # needs no step of its own: G = H G H already, so H (2 G X) = 2 G X.
            scale = 2 * grad_values[chunk].to(grad_gram.dtype)[:, None, None]
            blocks = ((grad_gram * scale) @ xs).view(c, gh, gw, b, p, p)
            if size == (h, w):
                grad_fs[:, chunk].view(b, c, gh, p, gw, p).copy_(blocks.permute(3, 0, 1, 4, 2, 5))
                continue
            # The resize's backward is ~8x faster on a channels-last gradient (CPU), and writing the
            # patches out in that layout costs no more than in NCHW.
            grad_map = blocks.permute(3, 1, 4, 2, 5, 0).reshape(b, *size, c).permute(0, 3, 1, 2)
            grad_fs[:, chunk] = torch.ops.aten.upsample_bilinear2d_backward(
                grad_map, list(size), [b, c, h, w], False, None, None
            )
        return grad_fs.to(ctx.in_dtype), None, None, None


def patch_cka(feat_s: Tensor, feat_t: Tensor, patch_size: int = 16, centered: bool = True) -> Tensor:
    """CKA, per channel, of the patch x patch Gram matrices of two maps (B, C, H, W): shape (C,).

    The same values as ``linear_cka(patchify(feat_s), patchify(feat_t), centered)``. Gradients
    flow to ``feat_s`` only (the teacher side builds no graph). Differentiable once.

    Why a fused operation: the Gram matmuls (teacher, student, and the student's backward) are
    the irreducible cost, and everything else is memory traffic over maps the size of the
    resized level: the resize and its backward, the rearranging copies, the centring. Done as
    separate autograd ops over a whole FPN level, each pass allocates a new level-sized buffer,
    and on CPU those are mmap-ed and page-faulted afresh; together they cost several times the
    matmuls. Here each chunk of channels goes resize -> (copy + centre) -> Gram while it sits in
    cache, the CKA's gradient with respect to each Gram is formed in closed form in forward
    (``cka_and_gradient``, O(n^2) per channel), and backward is the one matmul ``2 G X`` per chunk
    followed by the resize's backward. Memory: the student's patch rows are kept from forward to
    backward, as autograd would keep them.
    """
    _check(feat_s, patch_size)
    _check(feat_t, patch_size)
    return _PatchCKA.apply(feat_s, feat_t.detach(), patch_size, centered)
