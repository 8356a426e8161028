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
# On CPU, maps whose resized H + W is at most this are resized channels-last (vectorised over
# channels; few pixels), larger ones one axis at a time (vectorised along the other axis).
SMALL_OUTPUT = 128
# torch's channels-last bilinear kernels run at full speed on whole vectors of channels: 16 of
# them are ~2x faster per element than 14, 32 ~3x (AVX2, float32).
CHANNEL_VECTOR = 16
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
    * ``nchw`` (not CPU): torch's resize on the maps as they are, then the copy.
    * ``channels_last`` (CPU, resized H + W <= SMALL_OUTPUT): a channels-last copy, torch's
      channels-last resize (vectorised over channels), then the rows.
    * ``separable`` (CPU, larger maps): the resize one axis at a time, each pass torch's
      channels-last kernel applied to a view in which the other axis plays the channels: along H
      on the map as it is (vectorised along W), then along W on its transpose (vectorised along
      H). One transpose in all (``_transposed``), and no pass of torch's per-element NCHW
      kernel, which costs about as much as the rest together. Bilinear interpolation is
      separable, so this is the same resize up to rounding. Its rows list the patches column by
      column and each patch transposed, which leaves every Gram's CKA unchanged (the same
      reordering of samples and features on both sides). Its work buffers are channel-major
      (C, B, ...): torch splits each pass among threads by its outermost dimension, so every
      pass, like the Gram matmuls, gives each thread the channels it wrote in the pass before.
      (Reading what another core just wrote cost up to 5x more than reading one's own, in some
      phases of the 2-vCPU VM this was measured on; 2-3% less time overall in the others.)
    """
    size = _resized_size(*feat_s.shape[-2:], patch_size)
    if size == tuple(feat_s.shape[-2:]) and size == tuple(feat_t.shape[-2:]):
        return "direct"
    if feat_s.device.type != "cpu":
        return "nchw"
    return "channels_last" if sum(size) <= SMALL_OUTPUT else "separable"


def _axis_view(t: Tensor) -> Tensor:
    """(..., A, B) contiguous -> the same memory as a channels-last (N, B, A, 1) map.

    torch's channels-last resize of that view interpolates along A, vectorised over B. A view,
    never a copy (``view`` raises where ``reshape`` would copy), so that outputs land in ``t``.
    """
    return t.view(-1, t.shape[-2], t.shape[-1], 1).permute(0, 2, 1, 3)


def _resize_axis(src: Tensor, out: Tensor) -> None:
    """Bilinear resize (align_corners=False) along A of ``_axis_view``s: (N, B, A, 1) into (N, B, A', 1)."""
    torch._C._nn.upsample_bilinear2d(src, [out.shape[2], 1], False, None, None, out=out)


def _resize_axis_backward(grad_out: Tensor, grad_in: Tensor) -> None:
    """The adjoint of ``_resize_axis``: ``grad_in`` (N, B, A, 1) from ``grad_out`` (N, B, A', 1)."""
    torch.ops.aten.upsample_bilinear2d_backward.grad_input(
        grad_out, [grad_out.shape[2], 1], list(grad_in.shape), False, None, None, grad_input=grad_in
    )


def _transposed(t: Tensor) -> Tensor:
    """Contiguous (..., A, B) -> a new contiguous (..., B, A), by torch's channel shuffle.

    Seen as channels-last (N, A * B, 1, 1) maps, a shuffle of A groups is exactly this transpose,
    and its channels-last CPU kernel transposes with SIMD: ~4x faster than a transposing copy,
    which loads one element at a time. It splits the N maps among threads, as the passes around
    it do.
    """
    a, b = t.shape[-2], t.shape[-1]
    maps = t.as_strided((t.numel() // (a * b), a * b, 1, 1), (a * b, 1, a * b, a * b))
    return torch.channel_shuffle(maps, a).view(*t.shape[:-2], b, a)


def _copy_minus(out: Tensor, src: Tensor, offset: Tensor | None) -> None:
    """``out = src - offset`` (broadcast), or a plain copy where there is no offset: the first pass over a map."""
    if offset is None:
        out.copy_(src)
    else:
        torch.sub(src, offset, out=out)


class _Scratch:
    """Flat work buffers reused by every chunk of a level, and their views, made once per shape.

    A chunk's steps need a dozen views of the buffers; made afresh, they cost as much Python time
    as a small chunk's copies.
    """

    def __init__(self, like: Tensor, numel: int):
        self.like, self.numel = like, numel
        self.buffers: dict[int, Tensor] = {}  # allocated when first used
        self._views: dict = {}

    def __call__(self, index: int, *shape: int, axis: bool = False) -> Tensor:
        """Buffer ``index`` viewed as contiguous ``shape`` (as its ``_axis_view`` with ``axis``)."""
        key = (index, shape, axis)
        view = self._views.get(key)
        if view is None:
            if index not in self.buffers:
                self.buffers[index] = self.like.new_empty(self.numel)
            view = self.buffers[index][: math.prod(shape)].view(shape)
            if axis:
                view = _axis_view(view)
            self._views[key] = view
        return view


def _patch_rows(feat: Tensor, patch_size: int, offset: Tensor | None, path: str, out: Tensor,
                scratch: _Scratch | None, padded_rows: int) -> Tensor:
    """``patchify`` of a float32 map into ``out``, on ``path``; of ``feat - offset`` if an offset is given.

    Returns the rows as (c, padded_rows, b * p * p), the patches' rows followed by zero rows up to
    ``padded_rows`` (see ``_padded_rows``). ``out`` (flat, at least that size) receives them;
    ``scratch`` holds buffers of the resized map's size (None on the ``direct`` path). Reusing
    them across a level's chunks keeps them in cache and spares malloc.

    Centred, the offset (B, C, 1, 1) is the map's first pixel: each image's channel first loses
    its top-left value, in the first pass over the map (fused into a copy where the path has one).
    That subtracts the same number from every entry of a column of X (a column holds one image's
    pixels), which the centred Gram ignores, and it removes any offset exactly: a constant channel
    is exact zeros before the resize, so its Gram is exactly zero whatever the resize's rounding
    (subtracting after the resize would leave that rounding, a few ulp of the offset, for the CKA
    to normalise into noise). The Gram is then formed from numbers of the data's own spread and
    centred at O(n^2) (``cka_and_gradient_``).
    """
    b, c, h, w = feat.shape
    p = patch_size
    size_h, size_w = _resized_size(h, w, p)
    gh, gw = size_h // p, size_w // p
    padded = out[: c * padded_rows * b * p * p].view(c, padded_rows, b * p * p)
    rows_offset = None  # the direct path's; the others subtract the offset in their first pass
    if path == "direct":
        blocks = feat.view(b, c, gh, p, gw, p).permute(1, 2, 4, 0, 3, 5)
        if offset is not None:
            rows_offset = offset.view(b, c, 1, 1, 1, 1).permute(1, 2, 4, 0, 3, 5)
    elif path == "nchw":  # on GPU a chunk is a whole level: one work buffer, not two
        if offset is not None:  # into out, which the resize reads before the rows overwrite it
            feat = torch.sub(feat, offset, out=out[: feat.numel()].view(feat.shape))
        resized = scratch(0, b, c, size_h, size_w)
        torch._C._nn.upsample_bilinear2d(feat, [size_h, size_w], False, None, None, out=resized)
        blocks = resized.view(b, c, gh, p, gw, p).permute(1, 2, 4, 0, 3, 5)
    elif path == "channels_last":
        # The map is first copied as it is (contiguous, for _transposed), then made channels-last;
        # after the resize, (p, c) blocks within a row are transposed, so that the rows' copy
        # moves whole cache lines.
        _copy_minus(scratch(1, b, c, h, w), feat, offset)
        feat_cl = _transposed(scratch(1, b, c, h * w)).view(b, h, w, c)
        resized = scratch(0, b, size_h, size_w, c)
        torch._C._nn.upsample_bilinear2d(
            feat_cl.permute(0, 3, 1, 2), [size_h, size_w], False, None, None, out=resized.permute(0, 3, 1, 2)
        )
        lines = _transposed(scratch(0, b * gh * p * gw, p, c)).view(b, gh, p, gw, c, p)  # (b, gh, p1, gw, c, p2)
        blocks = lines.permute(4, 1, 3, 0, 2, 5)
    else:  # separable, channel-major (see _level_path)
        if h != size_h:
            # The H pass needs its input contiguous; the copy (or the centring) gives it.
            channel_major = None if offset is None else offset.transpose(0, 1)
            _copy_minus(scratch(1, c, b, h, w), feat.transpose(0, 1), channel_major)
            _resize_axis(scratch(1, c, b, h, w, axis=True), scratch(0, c, b, size_h, w, axis=True))
            transposed = _transposed(scratch(0, c, b, size_h, w))
        else:
            transposed = scratch(1, c, b, w, size_h)
            _copy_minus(transposed, feat.permute(1, 0, 3, 2), None if offset is None else offset.permute(1, 0, 3, 2))
        resized_t = transposed
        if w != size_w:
            resized_t = scratch(0, c, b, size_w, size_h)
            _resize_axis(_axis_view(transposed), scratch(0, c, b, size_w, size_h, axis=True))
        blocks = resized_t.view(c, b, gw, p, gh, p).permute(0, 2, 4, 1, 3, 5)  # (c, gw, gh, b, p2, p1)
    _copy_minus(padded[:, : gh * gw].view(blocks.shape), blocks, rows_offset)
    if padded_rows > gh * gw:  # last: the nchw path's centring may have used that memory
        padded[:, gh * gw:].zero_()
    return padded


def _grad_from_rows(grad_rows: Tensor, grad_in: Tensor, path: str, patch_size: int,
                    scratch: _Scratch | None) -> None:
    """The adjoint of ``_patch_rows`` (less the offset, see backward): ``grad_in`` (b, k, h, w) from ``grad_rows``.

    ``grad_rows`` (k, n, b * p * p) is contiguous; ``scratch`` holds two buffers of its size.
    """
    b, k, h, w = grad_in.shape
    p = patch_size
    size_h, size_w = _resized_size(h, w, p)
    gh, gw = size_h // p, size_w // p
    if path == "direct":
        grad_in.view(b, k, gh, p, gw, p).copy_(grad_rows.view(k, gh, gw, b, p, p).permute(3, 0, 1, 4, 2, 5))
    elif path == "nchw":
        grad_map = scratch(0, b, k, gh, p, gw, p)
        grad_map.copy_(grad_rows.view(k, gh, gw, b, p, p).permute(3, 0, 1, 4, 2, 5))
        torch.ops.aten.upsample_bilinear2d_backward.grad_input(
            scratch(0, b, k, size_h, size_w), [size_h, size_w], [b, k, h, w], False, None, None, grad_input=grad_in
        )
    elif path == "channels_last":
        # The forward's copies in reverse, then torch's channels-last resize backward.
        lines = scratch(0, b, gh, p, gw, k, p)
        lines.copy_(grad_rows.view(k, gh, gw, b, p, p).permute(3, 1, 4, 2, 0, 5))
        grad_map = _transposed(scratch(0, b * gh * p * gw, k, p)).view(b, size_h, size_w, k)
        grad_cl = scratch(1, b, h, w, k)
        torch.ops.aten.upsample_bilinear2d_backward.grad_input(
            grad_map.permute(0, 3, 1, 2), [size_h, size_w], [b, k, h, w], False, None, None,
            grad_input=grad_cl.permute(0, 3, 1, 2),
        )
        grad_in.copy_(_transposed(scratch(1, b, h * w, k)).view(b, k, h, w))
    else:  # separable, channel-major: W's backward on the transposed map, transpose, H's backward
        scratch(0, k, b, gw, p, gh, p).copy_(grad_rows.view(k, gw, gh, b, p, p).permute(0, 3, 1, 4, 2, 5))
        grad_t, free = scratch(0, k, b, size_w, size_h), 1
        if w != size_w:
            _resize_axis_backward(scratch(0, k, b, size_w, size_h, axis=True), scratch(1, k, b, w, size_h, axis=True))
            grad_t, free = scratch(1, k, b, w, size_h), 0
        if h == size_h:
            grad_in.copy_(grad_t.permute(1, 0, 3, 2))
            return
        _resize_axis_backward(_axis_view(_transposed(grad_t)), scratch(free, k, b, h, w, axis=True))
        grad_in.copy_(scratch(free, k, b, h, w).transpose(0, 1))


def _channel_chunks(feat: Tensor, patch_size: int, path: str) -> list[slice]:
    """Slices of channels for ``patch_cka``: on CPU about CPU_CHUNK_ELEMENTS of resized map each, evenly split.

    Even, so that no chunk is a short remainder that costs a chunk's fixed overhead (about 0.2 ms
    of op calls) for a few channels; on the channels-last path in whole vectors of channels.
    """
    b, c, h, w = feat.shape
    if feat.device.type != "cpu":
        return [slice(0, c)]  # the caching allocator recycles big buffers; one big batch is fastest
    per_channel = b * math.prod(_resized_size(h, w, patch_size))
    count = min(c, max(1, round(c * per_channel / CPU_CHUNK_ELEMENTS)))
    if path == "channels_last" and c >= count * CHANNEL_VECTOR:
        step = math.ceil(c / count / CHANNEL_VECTOR) * CHANNEL_VECTOR
        return [slice(start, min(start + step, c)) for start in range(0, c, step)]
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
        path = _level_path(fs, ft, patch_size)
        chunks = _channel_chunks(fs, patch_size, path)
        b, c, h, w = fs.shape
        n = math.prod(patch_grid(h, w, patch_size))
        grams = fs.new_empty(2, c, n, n)  # student's and teacher's, one buffer for cka_and_gradient_
        # The teacher's rows and the resize's scratch are reused by every chunk; the student's rows
        # are kept for backward.
        k_max = max(ch.stop - ch.start for ch in chunks)
        chunk_numel = b * k_max * math.prod(_resized_size(h, w, patch_size))
        n_pad = _padded_rows(n, fs)
        rows_numel = chunk_numel // n * n_pad  # chunk_numel is b * k_max * n * p * p
        rows_t = fs.new_empty(rows_numel)
        gram_pad = fs.new_empty(k_max, n, n_pad) if n_pad != n else None
        scratch = None if path == "direct" else _Scratch(fs, chunk_numel)
        # The first pixels, once per level (see _patch_rows); broadcasting from a copy, not from a
        # strided slice of the map, which costs some kernels 2x.
        offset_s = fs[:, :, :1, :1].contiguous() if centered else None
        offset_t = ft[:, :, :1, :1].contiguous() if centered else None
        rows_s = []
        with _no_autocast(fs):
            for chunk in chunks:
                off_s, off_t = (offset_s[:, chunk], offset_t[:, chunk]) if centered else (None, None)
                xs = _patch_rows(fs[:, chunk], patch_size, off_s, path, fs.new_empty(rows_numel), scratch, n_pad)
                xt = _patch_rows(ft[:, chunk], patch_size, off_t, path, rows_t, scratch, n_pad)
                _gram(xs, n, grams[0, chunk], gram_pad)
                _gram(xt, n, grams[1, chunk], gram_pad)
                rows_s.append(xs[:, :n])
            # Once per level, in place: its ~20 small ops per call cost more, called per chunk, than
            # the Grams' trip back through cache (the Grams are n x n, a few MiB for a whole level).
            # It centres the Grams when centred (see _patch_rows).
            values, grad_grams = cka_and_gradient_(grams, centered)
        ctx.patch_size, ctx.path, ctx.chunks = patch_size, path, chunks
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
        scratch = None if ctx.path == "direct" else _Scratch(grad_grams, chunk_numel)
        for chunk, xs in zip(ctx.chunks, rows_s):  # xs: (k, n, d), the first n of its padded rows
            blocks = grad_rows[: xs.numel()].view(xs.shape)
            torch.bmm(grad_grams[chunk], xs, out=blocks)
            _grad_from_rows(blocks, grad_fs[:, chunk], ctx.path, ctx.patch_size, scratch)
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
    matmuls. Here each chunk of channels goes (centre) -> resize -> rows -> Gram while it sits in
    cache, the CKA and its gradient with respect to each Gram are formed in closed form in forward
    (``cka_and_gradient_``, in place on the level's stacked Grams), and backward is the one matmul
    ``2 G X`` per chunk followed by the resize's backward, the forward's steps in reverse.

    On CPU the patch rows of a level are padded with zero rows to a multiple of 8 where that adds
    little (P3's 70 patches become 72; ``_padded_rows``): MKL's Gram kernel is so much faster on
    such shapes that P3's Gram, copy included, takes ~11% less time. The resize never uses
    torch's NCHW bilinear kernel, which gathers four pixels per output element (~0.75 ns per
    element at 2 threads, as much as the rest of a chunk's work together): large maps are resized
    one axis at a time by its channels-last kernel (see ``_level_path``), small ones
    channels-last with chunks of whole vectors of channels.

    Where the time goes (CPU, RetinaNet P3-P6 at batch 2, ``benchmarks/bench_losses.py``): about
    half the matmuls; a quarter the forward (per map: the read of the map, two resize passes, a
    transpose and the rows' copy); a fifth the backward's; the rest the CKA on the Grams, Python
    and small ops (about 0.15 ms of op calls per chunk, some 10 ms a step in all). By level, P3
    costs ~1.4x its matmuls; P4 (20 patches: few FLOPs per element moved) ~3x, P5 ~4x and P6,
    whose matmuls take 0.13 ms, ~13x; the small levels make half the time above the bound.
    Tried and measured slower: recomputing the student's rows in backward instead of keeping
    them (less memory, one more resize), torch's NCHW resize, resizing channels-last through a
    transpose of a large map, both axes in "patch-row" layouts (the W pass then runs on vectors
    of 16), H's backward per image straight into the gradient (a copy fewer, two calls more),
    ``channel_shuffle``'s ``out=`` form (it copies through a temporary), a sparse resize matrix,
    symmetric half-Gram products, smaller or larger chunks, ``torch.compile`` of the resize and
    rearrangement (3.6-4.4x slower per chunk than these passes, static or dynamic shapes), and a
    plain fused numba kernel (2-3x slower).

    Memory: the student's patch rows are kept from forward to backward, as autograd would keep
    them; nothing level-sized is allocated besides them, the input gradient and (on GPU, one chunk
    per level) the per-chunk work buffers.
    """
    _check(feat_s, patch_size)
    _check(feat_t, patch_size)
    return _PatchCKA.apply(feat_s, feat_t.detach(), patch_size, centered)
