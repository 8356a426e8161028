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

from common.cka import _no_autocast, _promote, cka_and_gradient_

__all__ = ["patch_grid", "patchify", "patch_cka"]

# Channels per chunk of ``patch_cka`` on CPU: about this many elements of resized map per chunk.
# A few MiB stay in cache and are recycled by malloc; a whole P3 level (~37 MiB in float32) is
# mmap-ed and page-faulted afresh by every temporary, which cost more than the matmuls.
CPU_CHUNK_ELEMENTS = 1 << 19
# torch's bilinear resize uses its channels-last kernel when the output's H + W is at most this
# (aten/src/ATen/native/cpu/UpSampleKernel.cpp, _use_vectorized_kernel_cond_2d).
SMALL_OUTPUT = 128
# Channels per transposing copy in patch_cka's backward (see there).
COPY_CHANNELS = 8


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


def _patch_rows(feat: Tensor, patch_size: int, centered: bool, out: Tensor | None = None,
                scratch: Tensor | None = None) -> Tensor:
    """``patchify`` of a float32 map into a contiguous buffer; with ``centered``, minus its first patch.

    ``out`` (flat, at least the rows' size) receives the rows, else a fresh tensor does; the
    resized map goes to ``scratch`` (flat, at least its size) when given. Reusing both across a
    level's chunks keeps them in cache and spares malloc.

    Subtracting one patch (a row of X) from all of them removes any offset exactly, so a constant
    channel gives exact zeros and the Gram is formed from numbers of the data's own spread; the
    Gram is then centred (``cka_and_gradient_``), which finishes the centring at O(n^2). That costs
    eps * (|x_0 - mean| / spread)^2 of precision, the same as zero-mean data, and no pass over the
    rows beyond the rearranging copy it is fused into (a full column centring would add two).
    """
    b, c, h, w = feat.shape
    size = _resized_size(h, w, patch_size)
    gh, gw = size[0] // patch_size, size[1] // patch_size
    numel = b * c * size[0] * size[1]
    if size == (h, w):
        blocks = feat.view(b, c, gh, patch_size, gw, patch_size).permute(1, 2, 4, 0, 3, 5)
    elif sum(size) <= SMALL_OUTPUT and feat.device.type == "cpu":
        # torch resizes such maps with its channels-last kernel whatever the input's layout,
        # reading NCHW element by element; handing it a channels-last copy is 2-3x faster.
        resized = feat.new_empty(numel) if scratch is None else scratch[:numel]
        resized = resized.view(b, *size, c).permute(0, 3, 1, 2)
        torch._C._nn.upsample_bilinear2d(
            feat.contiguous(memory_format=torch.channels_last), list(size), False, None, None, out=resized
        )
        blocks = resized.permute(0, 2, 3, 1).view(b, gh, patch_size, gw, patch_size, c).permute(5, 1, 3, 0, 2, 4)
    else:
        resized = (feat.new_empty(numel) if scratch is None else scratch[:numel]).view(b, c, *size)
        torch._C._nn.upsample_bilinear2d(feat, list(size), False, None, None, out=resized)
        blocks = resized.view(b, c, gh, patch_size, gw, patch_size).permute(1, 2, 4, 0, 3, 5)
    rows = (feat.new_empty(numel) if out is None else out[:numel]).view(blocks.shape)
    if centered:
        torch.sub(blocks, blocks[:, :1, :1], out=rows)
    else:
        rows.copy_(blocks)
    return rows.view(c, gh * gw, b * patch_size * patch_size)


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
        b, c, h, w = fs.shape
        n = math.prod(patch_grid(h, w, patch_size))
        grams = fs.new_empty(2, c, n, n)  # student's and teacher's, one buffer for cka_and_gradient_
        size = _resized_size(h, w, patch_size)
        chunk_numel = b * (chunks[0].stop - chunks[0].start) * math.prod(size)  # the first chunk is the largest
        rows_t = fs.new_empty(chunk_numel)  # reused by every chunk, as is the resized map
        scratch = fs.new_empty(chunk_numel) if size != (h, w) else None
        rows_s = []
        with _no_autocast(fs):
            for chunk in chunks:
                xs = _patch_rows(fs[:, chunk], patch_size, centered, scratch=scratch)  # kept for backward
                xt = _patch_rows(ft[:, chunk], patch_size, centered, out=rows_t, scratch=scratch)
                torch.bmm(xs, xs.transpose(1, 2), out=grams[0, chunk])
                torch.bmm(xt, xt.transpose(1, 2), out=grams[1, chunk])
                rows_s.append(xs)
            # Once per level, in place: its ~20 small ops per call cost more, called per chunk, than
            # the Grams' trip back through cache (the Grams are n x n, a few MiB for a whole level).
            # It centres the Grams when centred (see _patch_rows).
            values, grad_grams = cka_and_gradient_(grams, centered)
        ctx.patch_size, ctx.chunks, ctx.in_shape, ctx.in_dtype = patch_size, chunks, fs.shape, feat_s.dtype
        ctx.save_for_backward(grad_grams, *rows_s)
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_grams, *rows_s = ctx.saved_tensors
        p, (b, _, h, w) = ctx.patch_size, ctx.in_shape
        size = _resized_size(h, w, p)
        gh, gw = size[0] // p, size[1] // p
        # K = R R^T gives dR = (G + G^T) R = 2 G R (G symmetric). When centred, R = X - 1 x_0^T and
        # K is centred as H K H, so G = H G H and dX = (I - e_0 1^T) 2 G R = 2 G R: no step of its own.
        scale = 2 * grad_values.to(grad_grams.dtype)[:, None, None]
        grad_fs = grad_grams.new_empty(ctx.in_shape)
        n, row_len = gh * gw, b * p * p
        step = ctx.chunks[0].stop - ctx.chunks[0].start  # the first chunk is the largest
        blocks_buffer = grad_grams.new_empty(step * n * row_len)  # per-chunk buffers, reused
        map_buffer = grad_grams.new_empty(b * size[0] * size[1] * step)
        out_buffer = grad_grams.new_empty(b * h * w * step)
        for chunk, xs in zip(ctx.chunks, rows_s):
            k = xs.shape[0]
            blocks = blocks_buffer[: k * n * row_len].view(k, n, row_len)
            # The incoming gradient is folded into the chunk's n x n matrices, not the level's
            # (which would be one more pass over all of them) nor the (larger) patch rows.
            torch.bmm(grad_grams[chunk] * scale[chunk], xs, out=blocks)
            blocks = blocks.view(k, gh, gw, b, p, p)
            if size == (h, w):
                grad_fs[:, chunk].view(b, k, gh, p, gw, p).copy_(blocks.permute(3, 0, 1, 4, 2, 5))
                continue
            # The resize's backward is several times faster on a channels-last gradient (CPU).
            grad_map = map_buffer[: b * size[0] * size[1] * k].view(b, gh, p, gw, p, k)
            # That copy reads one element from each channel in turn, and channel c starts a
            # multiple of 4 KiB after channel c - 1 (n * B * p * p floats), so the reads of 16
            # channels contend for the same cache set (2-3x slower); 8 at a time do not. Padding
            # the channels apart instead would make the matmul above write a non-contiguous
            # output, which torch then computes one matrix at a time on one thread.
            step_copy = COPY_CHANNELS if grad_map.device.type == "cpu" else k
            for start in range(0, k, step_copy):
                group = slice(start, min(start + step_copy, k))
                grad_map[..., group].copy_(blocks[group].permute(3, 1, 4, 2, 5, 0))
            grad_map = grad_map.view(b, *size, k).permute(0, 3, 1, 2)
            grad_chunk = out_buffer[: b * h * w * k].view(b, h, w, k).permute(0, 3, 1, 2)
            torch.ops.aten.upsample_bilinear2d_backward.grad_input(
                grad_map, list(size), [b, k, h, w], False, None, None, grad_input=grad_chunk
            )
            grad_fs[:, chunk] = grad_chunk
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
    cache, the CKA and its gradient with respect to each Gram are formed in closed form in forward
    (``cka_and_gradient_``, in place on the level's stacked Grams), and backward is the one matmul
    ``2 G X`` per chunk followed by the resize's backward on a channels-last gradient (torch's
    fastest CPU kernel for it).

    Where the time goes (CPU, RetinaNet P3-P6 at batch 2, ``benchmarks/bench_losses.py``): about
    35% the matmuls; 20% the two forward resizes (torch's bilinear kernel, ~1.5 ns per output
    element per core); 20% the copies between the NCHW map, the patch rows and the
    channels-last gradient; 10% the resize's backward; the rest Python and small ops. Tried and
    measured slower: recomputing the student's rows in backward instead of keeping them (less
    memory, one more resize), separable resizes from torch's 1-D and channels-last kernels
    written straight into the rows, a sparse resize matrix, symmetric half-Gram products, smaller
    or larger chunks. ``torch.compile`` fuses resize and rearrangement 2.2x faster on CPU, but
    detection batches change size every step, and recompiling per shape would cost more.

    Memory: the student's patch rows are kept from forward to backward, as autograd would keep
    them; nothing level-sized is allocated besides them, the input gradient and (on GPU, one chunk
    per level) the per-chunk work buffers.
    """
    _check(feat_s, patch_size)
    _check(feat_t, patch_size)
    return _PatchCKA.apply(feat_s, feat_t.detach(), patch_size, centered)
