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

from common import patch_kernels
from common.cka import _no_autocast, _promote, cka_and_gradient_

__all__ = ["patch_grid", "patchify", "patch_cka", "check_pair"]

# Channels per chunk of ``patch_cka`` on CPU: about this many elements of resized map per chunk.
# A chunk's rows stay in cache from the resize to the Gram matmuls; a whole P3 level (~37 MiB in
# float32) would not, and its temporaries would be mmap-ed and page-faulted afresh.
CPU_CHUNK_ELEMENTS = 1 << 19
# On CPU, MKL's Gram product X X^T runs 10-40% faster when X^T has a multiple of 8 columns (n = 70
# patches: 134 GFLOP/s, 72: 160; 63: 103, 64: 171; 2 threads, AVX-512), so the patch rows are padded
# with zero rows up to one, where that adds at most this fraction to the product's work.
ROW_PADDING = 0.1


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


def check_pair(feat_s: Tensor, feat_t: Tensor, patch_size: int, where: str = "") -> tuple[int, int]:
    """Check that two maps can be compared patch by patch; return their patch grid. ``where`` prefixes the errors.

    PCKA pairs channels one to one and patches position by position, so the maps need the same
    batch, channels and patch grid.
    """
    if feat_s.dim() != 4 or feat_t.dim() != 4:
        raise ValueError(
            f"{where}feature maps must be (B, C, H, W); got {tuple(feat_s.shape)} and {tuple(feat_t.shape)}."
        )
    if feat_s.shape[:2] != feat_t.shape[:2]:
        raise ValueError(
            f"{where}student (B, C) = {tuple(feat_s.shape[:2])} but teacher (B, C) = "
            f"{tuple(feat_t.shape[:2])}; PCKA pairs channels one to one, so both need the same "
            "batch and channel count (FPN levels usually have 256)."
        )
    grid_s = patch_grid(*feat_s.shape[-2:], patch_size)
    grid_t = patch_grid(*feat_t.shape[-2:], patch_size)
    if grid_s != grid_t:
        raise ValueError(
            f"{where}student map {tuple(feat_s.shape[-2:])} and teacher map {tuple(feat_t.shape[-2:])} "
            f"give different patch grids ({grid_s[0]}x{grid_s[1]} vs {grid_t[0]}x{grid_t[1]} patches of "
            f"{patch_size}x{patch_size}); pair levels of the same stride."
        )
    return grid_s


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


def _level_path(feat_s: Tensor, feat_t: Tensor, patch_size: int) -> str:
    """How ``patch_cka`` cuts a level into patch rows; both maps of a level take the same path.

    * ``direct``: neither map needs resizing; the rows are copied out of the maps.
    * ``kernel`` (CPU): ``common.patch_kernels``, one compiled pass over each map for the resize
      and the cut into rows, and one for their gradient. The previous CPU path took five passes of
      torch's operators each way (centre, resize along H, transpose, resize along W, copy): each
      fast, together as long as the Gram matmuls.
    * ``nchw`` (GPU, or a CPU where the kernels could not be built): torch's resize on the maps
      as they are, then the copy. On GPU these are a few large launches over a whole level.
    """
    size = _resized_size(*feat_s.shape[-2:], patch_size)
    if size == tuple(feat_s.shape[-2:]) and size == tuple(feat_t.shape[-2:]):
        return "direct"
    return "kernel" if feat_s.device.type == "cpu" and patch_kernels.load() is not None else "nchw"


_Resize = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]  # a map's resize along H and along W (kernel path)


def _resize_coefficients(feat: Tensor, patch_size: int) -> _Resize:
    """The ``kernel`` path's resize of a map along H and along W (``patch_kernels.resize_coefficients``)."""
    size_h, size_w = _resized_size(*feat.shape[-2:], patch_size)
    return (patch_kernels.resize_coefficients(feat.shape[-2], size_h, feat.dtype),
            patch_kernels.resize_coefficients(feat.shape[-1], size_w, feat.dtype))


def _patch_rows(feat: Tensor, chunk: slice, patch_size: int, offset: Tensor | None, path: str, out: Tensor,
                resized: Tensor | None, padded_rows: int, resize: _Resize | None) -> Tensor:
    """``patchify`` of channels ``chunk`` of a float32 or float64 map into ``out``; of ``feat - offset`` if given.

    Returns the rows as (c, padded_rows, b * p * p), the patches' rows followed by zero rows up to
    ``padded_rows`` (see ``_padded_rows``). ``out`` (flat, at least that size) receives them;
    ``resized`` (the ``nchw`` path's) is a buffer of the chunk's resized size. Reusing both across a
    level's chunks keeps them in cache and spares malloc. ``feat`` is the whole map, contiguous on
    the ``kernel`` path, whose ``resize`` is the map's ``_resize_coefficients``; there the rows list
    each patch's pixels column by column (see ``common.patch_kernels``), which changes no Gram.

    Centred, the offset (B, C) is the map's first pixel: each image's channel first loses its
    top-left value, in the first pass over the map. That subtracts the same number from every
    entry of a column of X (a column holds one image's pixels), which the centred Gram ignores,
    and it removes any offset exactly: a constant channel is exact zeros before the resize, so its
    Gram is exactly zero whatever the resize's rounding (subtracting after the resize would leave
    that rounding, a few ulp of the offset, for the CKA to normalise into noise). The Gram is then
    formed from numbers of the data's own spread and centred at O(n^2) (``cka_and_gradient_``).
    """
    b, _, h, w = feat.shape
    c = chunk.stop - chunk.start
    p = patch_size
    size_h, size_w = _resized_size(h, w, p)
    gh, gw = size_h // p, size_w // p
    padded = out[: c * padded_rows * b * p * p].view(c, padded_rows, b * p * p)
    if path == "kernel":
        patch_kernels.load().rows_forward(feat, chunk.start, offset, *resize, p, padded)
        return padded
    feat = feat[:, chunk]
    offset = None if offset is None else offset[:, chunk, None, None]
    if path == "nchw":  # on GPU a chunk is a whole level: one work buffer, not two
        if offset is not None:  # into out, which the resize reads before the rows overwrite it
            feat = torch.sub(feat, offset, out=out[: feat.numel()].view(feat.shape))
            offset = None
        map_ = resized[: b * c * size_h * size_w].view(b, c, size_h, size_w)
        torch._C._nn.upsample_bilinear2d(feat, [size_h, size_w], False, None, None, out=map_)
        feat = map_
    blocks = feat.view(b, c, gh, p, gw, p).permute(1, 2, 4, 0, 3, 5)
    target = padded[:, : gh * gw].view(blocks.shape)
    if offset is None:
        target.copy_(blocks)
    else:
        torch.sub(blocks, offset.view(b, c, 1, 1, 1, 1).permute(1, 2, 4, 0, 3, 5), out=target)
    if padded_rows > gh * gw:  # last: the nchw path's centring may have used that memory
        padded[:, gh * gw:].zero_()
    return padded


def _grad_from_rows(grad_rows: Tensor, grad_in: Tensor, chunk: slice, path: str, patch_size: int,
                    resized: Tensor | None, resize: _Resize | None) -> None:
    """The adjoint of ``_patch_rows`` (less the offset, see backward): channels ``chunk`` of ``grad_in`` (b, C, h, w).

    ``grad_rows`` (k, n, b * p * p) is contiguous, and so is ``grad_in``; ``resized`` (the ``nchw``
    path's) is a buffer of the chunk's resized size.
    """
    b, _, h, w = grad_in.shape
    k = chunk.stop - chunk.start
    p = patch_size
    size_h, size_w = _resized_size(h, w, p)
    gh, gw = size_h // p, size_w // p
    if path == "kernel":
        patch_kernels.load().rows_backward(grad_rows, *resize, p, grad_in, chunk.start)
        return
    blocks = grad_rows.view(k, gh, gw, b, p, p).permute(3, 0, 1, 4, 2, 5)
    if path == "direct":
        grad_in[:, chunk].view(b, k, gh, p, gw, p).copy_(blocks)
        return
    grad_map = resized[: b * k * size_h * size_w].view(b, k, gh, p, gw, p)
    grad_map.copy_(blocks)
    torch.ops.aten.upsample_bilinear2d_backward.grad_input(
        grad_map.view(b, k, size_h, size_w), [size_h, size_w], [b, k, h, w], False, None, None,
        grad_input=grad_in[:, chunk],
    )


def _channel_chunks(feat: Tensor, patch_size: int) -> list[slice]:
    """Slices of channels for ``patch_cka``: on CPU about CPU_CHUNK_ELEMENTS of resized map each, evenly split.

    Even, so that no chunk is a short remainder that costs a chunk's fixed overhead (op calls) for
    a few channels.
    """
    b, c, h, w = feat.shape
    if feat.device.type != "cpu":
        return [slice(0, c)]  # the caching allocator recycles big buffers; one big batch is fastest
    per_channel = b * math.prod(_resized_size(h, w, patch_size))
    count = min(c, max(1, round(c * per_channel / CPU_CHUNK_ELEMENTS)))
    bounds = [c * i // count for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def _padded_rows(n: int, like: Tensor) -> int:
    """Rows of the patch matrices as ``_patch_rows`` lays them out: n, or on CPU n padded to a multiple of 8."""
    padded = -(-n // 8) * 8
    return padded if like.device.type == "cpu" and padded - n <= ROW_PADDING * n else n


def _gram(rows: Tensor, n: int, out: Tensor, scratch: Tensor | None) -> None:
    """``out`` (k, n, n) = X X^T for the first n of ``rows`` (k, n_pad, d), through ``scratch`` if padded."""
    if scratch is None:
        torch.bmm(rows, rows.transpose(1, 2), out=out)
        return
    # X against the padded X: MKL's faster kernel for a multiple of 8 columns; the zero rows give
    # zero columns, which the copy drops.
    product = scratch[: rows.shape[0]]
    torch.bmm(rows[:, :n], rows.transpose(1, 2), out=product)
    out.copy_(product[..., :n])


class _PatchCKA(torch.autograd.Function):
    """Per-channel CKA of patch Grams with a hand-written backward; see ``patch_cka``."""

    @staticmethod
    def forward(ctx, feat_s: Tensor, feat_t: Tensor, patch_size: int, centered: bool) -> Tensor:
        fs, ft = _promote(feat_s), _promote(feat_t)
        if fs.dtype != ft.dtype:  # float32 and float64: both in float64, as linear_cka does
            fs, ft = fs.double(), ft.double()
        path = _level_path(fs, ft, patch_size)
        if path == "kernel":  # the kernels index whole maps
            fs, ft = fs.contiguous(), ft.contiguous()
        chunks = _channel_chunks(fs, patch_size)
        b, c, h, w = fs.shape
        n = math.prod(patch_grid(h, w, patch_size))
        grams = fs.new_empty(2, c, n, n)  # student's and teacher's, one buffer for cka_and_gradient_
        # The teacher's rows and the nchw path's resized map are reused by every chunk; the
        # student's rows are kept for backward.
        k_max = max(ch.stop - ch.start for ch in chunks)
        chunk_numel = b * k_max * math.prod(_resized_size(h, w, patch_size))
        n_pad = _padded_rows(n, fs)
        rows_numel = chunk_numel // n * n_pad  # chunk_numel is b * k_max * n * p * p
        rows_t = fs.new_empty(rows_numel)
        gram_pad = fs.new_empty(k_max, n, n_pad) if n_pad != n else None
        resized = fs.new_empty(chunk_numel) if path == "nchw" else None
        resize_s = _resize_coefficients(fs, patch_size) if path == "kernel" else None
        resize_t = _resize_coefficients(ft, patch_size) if path == "kernel" else None
        # The first pixels, once per level (see _patch_rows); a copy, not a strided slice of the
        # map, from which some kernels broadcast at half speed. The kernels take zeros uncentred.
        if centered:
            offset_s, offset_t = fs[:, :, 0, 0].contiguous(), ft[:, :, 0, 0].contiguous()
        else:
            offset_s = offset_t = fs.new_zeros(b, c) if path == "kernel" else None
        rows_s = []
        with _no_autocast(fs):
            for chunk in chunks:
                xs = _patch_rows(fs, chunk, patch_size, offset_s, path, fs.new_empty(rows_numel), resized, n_pad,
                                 resize_s)
                xt = _patch_rows(ft, chunk, patch_size, offset_t, path, rows_t, resized, n_pad, resize_t)
                _gram(xs, n, grams[0, chunk], gram_pad)
                _gram(xt, n, grams[1, chunk], gram_pad)
                rows_s.append(xs[:, :n])
            # Once per level, in place: its ~20 small ops per call cost more, called per chunk, than
            # the Grams' trip back through cache (the Grams are n x n, a few MiB for a whole level).
            # It centres the Grams when centred (see _patch_rows).
            values, grad_grams = cka_and_gradient_(grams, centered)
        ctx.patch_size, ctx.path, ctx.chunks, ctx.resize = patch_size, path, chunks, resize_s
        ctx.in_shape, ctx.in_dtype = fs.shape, feat_s.dtype
        ctx.save_for_backward(grad_grams, *rows_s)
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_grams, *rows_s = ctx.saved_tensors
        # K = R R^T gives dR = (G + G^T) R = 2 G R (G symmetric). When centred, the subtracted first
        # pixels would add -(sum of dR over the patches) to their own entries, but K is centred as
        # H K H, so G = H G H, 1^T G = 0 and that sum is zero: no step of its own.
        # The incoming gradient is folded into the n x n matrices, the smallest objects here (the
        # patch rows are larger), once per level: not in place, the saved Grams may serve again.
        grad_grams = grad_grams * (2 * grad_values.to(grad_grams.dtype))[:, None, None]
        grad_fs = grad_grams.new_empty(ctx.in_shape)
        chunk_numel = max(xs.numel() for xs in rows_s)  # per-chunk buffers, reused
        grad_rows = grad_grams.new_empty(chunk_numel)
        resized = grad_grams.new_empty(chunk_numel) if ctx.path == "nchw" else None
        for chunk, xs in zip(ctx.chunks, rows_s):  # xs: (k, n, d), the first n of its padded rows
            blocks = grad_rows[: xs.numel()].view(xs.shape)
            torch.bmm(grad_grams[chunk], xs, out=blocks)
            _grad_from_rows(blocks, grad_fs, chunk, ctx.path, ctx.patch_size, resized, ctx.resize)
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
    matmuls. Here each chunk of channels goes (centre, resize) -> rows -> Gram while it sits in
    cache, the CKA and its gradient with respect to each Gram are formed in closed form in forward
    (``cka_and_gradient_``, in place on the level's stacked Grams), and backward is the one matmul
    ``2 G X`` per chunk followed by the resize's backward, the forward's steps in reverse.

    On CPU the resize and the cut into rows are one compiled pass per map each way
    (``common.patch_kernels``; torch's operators take about five, see ``_level_path``), and the
    patch rows of a level are padded with zero rows to a multiple of 8 where that adds little
    (P3's 70 patches become 72; ``_padded_rows``): MKL's Gram kernel is so much faster on such
    shapes that P3's Gram, copy included, takes ~11% less time.

    Where the time goes (CPU, RetinaNet P3-P6 at batch 2, ``benchmarks/bench_losses.py``, 2
    threads): about two thirds the matmuls; the rest the kernels (about a fifth), the CKA on the
    Grams, and op calls. By level, P3 costs ~1.2x its matmuls; the small levels move many
    elements for few FLOPs (P4 has 20 patches, P6 two) and cost 2-8x theirs. Tried and measured
    slower or no faster: recomputing the student's rows in backward instead of keeping them (less
    memory, one more resize), torch's NCHW resize (the ``nchw`` path: ~1.5x slower on CPU), the
    resize as five passes of torch's operators (the previous CPU path: 12-30% slower than the
    kernels, the most where other tenants fill the caches), ``torch.compile`` of the resize and
    rearrangement (3.6-4.4x slower per chunk than those passes), the same kernels in numba (its
    OpenMP runtime is not torch's: the two thread pools spin against each other, and the step
    was 10% slower than torch's passes), a sparse resize matrix, symmetric half-Gram products,
    and smaller or larger chunks.

    Memory: the student's patch rows are kept from forward to backward, as autograd would keep
    them; nothing level-sized is allocated besides them, the input gradient and (on GPU, one chunk
    per level) the per-chunk work buffers.
    """
    _check(feat_s, patch_size)
    _check(feat_t, patch_size)
    check_pair(feat_s, feat_t, patch_size)  # the kernels and buffers are sized by the student's map
    return _PatchCKA.apply(feat_s, feat_t.detach(), patch_size, centered)
