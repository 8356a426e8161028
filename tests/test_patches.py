"""common.patches: patchify (layout, resizing, errors) and patch_cka (PCKA's fused per-channel CKA)."""
import pytest
import torch
import torch.nn.functional as F

import common.patches as patches_module
from common.cka import linear_cka
from common.patches import patch_cka, patch_grid, patchify


def slow_patchify(feat, p):
    """Loop reference: row (patch gi, gj) of channel c holds every image's p x p block."""
    b, c, h, w = feat.shape
    rows, cols = h // p, w // p
    out = torch.empty(c, rows * cols, b * p * p, dtype=feat.dtype)
    for ch in range(c):
        for gi in range(rows):
            for gj in range(cols):
                block = feat[:, ch, gi * p : (gi + 1) * p, gj * p : (gj + 1) * p]  # (b, p, p)
                out[ch, gi * cols + gj] = block.reshape(-1)
    return out


def test_patchify_layout_matches_loop_reference():
    feat = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    assert torch.equal(patchify(feat, 4), slow_patchify(feat, 4))


def test_patchify_resizes_to_next_multiple_bilinearly():
    feat = torch.randn(2, 5, 13, 19)
    out = patchify(feat, 16)
    assert out.shape == (5, 1 * 2, 2 * 16 * 16)
    resized = F.interpolate(feat, size=(16, 32), mode="bilinear", align_corners=False)
    assert torch.equal(out, slow_patchify(resized, 16))
    assert patch_grid(100, 152, 16) == (7, 10)


def test_patchify_leaves_exact_multiples_untouched():
    feat = torch.randn(1, 2, 32, 16)
    out = patchify(feat, 16)
    assert torch.equal(out, slow_patchify(feat, 16))


def test_patchify_rejects_wrong_rank_and_patch_size():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(torch.randn(3, 16, 16), 16)
    with pytest.raises(ValueError, match="positive"):
        patchify(torch.randn(1, 1, 16, 16), 0)


# ---------------------------------------------------------------- patch_cka: PCKA's fused per-channel CKA


@pytest.fixture
def small_chunks(monkeypatch):
    """A few channels per chunk, so the tests go through several chunks as the real levels do."""
    monkeypatch.setattr(patches_module, "CPU_CHUNK_ELEMENTS", 400)


@pytest.mark.parametrize("centered", [True, False])
# Resized (by the CPU kernels) and already on the grid.
@pytest.mark.parametrize("shape", [(2, 5, 13, 19), (2, 3, 61, 70), (3, 4, 8, 16)])
def test_patch_cka_equals_linear_cka_of_the_patches_with_the_same_gradient(small_chunks, centered, shape):
    gen = torch.Generator().manual_seed(0)
    fs = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    ft = 0.5 * fs.detach() + torch.randn(*shape, generator=gen, dtype=torch.float64)
    path = patches_module._level_path(fs, ft, 4)
    assert path == {13: "kernel", 61: "kernel", 8: "direct"}[shape[2]]
    assert len(patches_module._channel_chunks(fs, 4)) > 1
    got = patch_cka(fs, ft, 4, centered)
    expected = linear_cka(patchify(fs, 4), patchify(ft, 4), centered=centered)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * weights).sum(), fs)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), fs)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)
    if fs.numel() < 2000:  # numerical Jacobians cost two evaluations per input element
        assert torch.autograd.gradcheck(lambda a: patch_cka(a, ft, 4, centered), (fs,))


def force_path(monkeypatch, path):
    """Send every level that needs a resize down ``path`` (``nchw`` is the GPU's; it runs on CPU too)."""
    choose = patches_module._level_path
    monkeypatch.setattr(
        patches_module, "_level_path", lambda s, t, p: "direct" if choose(s, t, p) == "direct" else path
    )


@pytest.mark.parametrize("path", ["nchw", "kernel"])
@pytest.mark.parametrize("chunk_elements", [400, 1 << 19])
# Both sides resized, only H, only W; a teacher already on the grid that the student is not; and
# both on the grid (the direct path).
@pytest.mark.parametrize(
    "size_s,size_t",
    [((13, 19), (13, 19)), ((61, 70), (64, 70)), ((64, 70), (61, 72)), ((61, 70), (64, 72)), ((16, 20), (16, 20))],
)
# Patch rows as they come (20 of them for 13 x 19), or padded with zero rows to a multiple of 8.
@pytest.mark.parametrize("row_padding", [0.0, 1.0])
def test_every_resize_path_and_chunking_gives_the_same_values_and_gradients(
    monkeypatch, path, chunk_elements, size_s, size_t, row_padding
):
    # 11 channels: one chunk, or chunks of a few (the last one short).
    gen = torch.Generator().manual_seed(3)
    fs = torch.randn(2, 11, *size_s, generator=gen, dtype=torch.float64).requires_grad_()
    ft = torch.randn(2, 11, *size_t, generator=gen, dtype=torch.float64)
    ft[..., : size_s[0], : size_s[1]] += fs.detach()[..., : size_t[0], : size_t[1]]
    for centered in (True, False):
        expected = linear_cka(patchify(fs, 4), patchify(ft, 4), centered=centered)
        (grad_expected,) = torch.autograd.grad(expected.sum(), fs)
        with monkeypatch.context() as patched:
            force_path(patched, path)
            patched.setattr(patches_module, "CPU_CHUNK_ELEMENTS", chunk_elements)
            patched.setattr(patches_module, "ROW_PADDING", row_padding)
            got = patch_cka(fs, ft, 4, centered=centered)
            (grad,) = torch.autograd.grad(got.sum(), fs)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)


def test_patch_rows_are_padded_to_a_multiple_of_8_on_cpu_only_where_that_adds_little():
    cpu, meta = torch.empty(0), torch.empty(0, device="meta")
    assert patches_module._padded_rows(70, cpu) == 72  # P3 of an 800 x 1216 image
    assert patches_module._padded_rows(63, cpu) == 64
    assert patches_module._padded_rows(20, cpu) == 20  # 24 would be 20% more work
    assert patches_module._padded_rows(72, cpu) == 72
    assert patches_module._padded_rows(70, meta) == 70  # measured on CPU (MKL) only


@pytest.mark.parametrize("path", ["nchw", "kernel"])
def test_padded_rows_are_zero_and_the_grams_exclude_them(monkeypatch, path):
    force_path(monkeypatch, path)
    monkeypatch.setattr(patches_module, "ROW_PADDING", 1.0)
    feat = torch.randn(2, 7, 13, 19) + 100.0  # 4 x 5 = 20 patches of 4 x 4, padded to 24
    offset = feat[:, :, 0, 0].contiguous()
    chunk = slice(1, 6)  # channels 1 to 5 of the map
    size = 2 * 5 * 16 * 20
    out = torch.full((size + 2 * 5 * 4 * 16,), float("nan"))  # the padding rows' worth more
    resized = torch.empty(size) if path == "nchw" else None
    resize = patches_module._resize_coefficients(feat, 4) if path == "kernel" else None
    rows = patches_module._patch_rows(feat, chunk, 4, offset, path, out, resized, 24, resize)
    assert rows.shape == (5, 24, 2 * 4 * 4)
    assert torch.equal(rows[:, 20:], torch.zeros(5, 4, 32))
    rows = rows[:, :20]
    if path == "kernel":  # each patch's pixels column by column: back to patchify's order
        rows = rows.reshape(5, 20, 2, 4, 4).transpose(-1, -2).reshape(5, 20, 32)
    expected = patchify(feat[:, chunk] - offset[:, chunk, None, None], 4)
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-4)


def test_chunks_split_the_channels_evenly_and_cover_them_once():
    p3 = torch.empty(2, 256, 100, 152)  # 112 x 160 once resized: 256 channels make 17.5 chunks' worth
    sizes = [c.stop - c.start for c in patches_module._channel_chunks(p3, 16)]
    assert len(sizes) == 18 and set(sizes) == {14, 15} and sum(sizes) == 256
    odd = torch.empty(1, 7, 5, 5)
    chunks = patches_module._channel_chunks(odd, 4)
    assert [i for chunk in chunks for i in range(chunk.start, chunk.stop)] == list(range(7))


@pytest.mark.parametrize("path", ["nchw", "kernel"])
@pytest.mark.parametrize("offset", [1e2, 1e4])
@pytest.mark.parametrize("centered", [True, False])
def test_patch_cka_of_offset_maps_in_float32_matches_float64(small_chunks, monkeypatch, path, offset, centered):
    force_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(1)
    fs = torch.randn(2, 6, 20, 28, generator=gen, dtype=torch.float64)
    ft = fs + torch.randn(fs.shape, generator=gen, dtype=torch.float64)
    fs32, ft32 = (fs + offset).float(), (ft - offset / 2).float()
    expected = linear_cka(patchify(fs32.double(), 8), patchify(ft32.double(), 8), centered=centered)
    torch.testing.assert_close(patch_cka(fs32, ft32, 8, centered).double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("path", ["nchw", "kernel"])
# On the grid; resized (a constant map resized is not exactly constant: rounding); only along W.
@pytest.mark.parametrize("size", [(16, 24), (20, 28), (16, 28)])
def test_patch_cka_of_a_constant_channel_is_zero_with_exactly_zero_gradient(small_chunks, monkeypatch, path, size):
    force_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(2)
    fs = torch.randn(2, 4, *size, generator=gen)
    fs[:, 1] = 3.7  # centred, a constant channel has no defined CKA
    fs.requires_grad_()
    ft = torch.randn(fs.shape, generator=gen)
    ft[:, 2] = -1e4  # nor a constant teacher channel
    value = patch_cka(fs, ft, 8)
    value.sum().backward()
    assert value[1].item() == 0.0 and value[2].item() == 0.0
    assert torch.equal(fs.grad[:, 1:3], torch.zeros_like(fs.grad[:, 1:3]))
    assert fs.grad[:, 0].abs().sum() > 0


def test_patch_cka_keeps_the_input_dtype_for_the_gradient_and_sends_none_to_the_teacher():
    fs = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    ft = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    value = patch_cka(fs, ft, 8)
    assert value.dtype == torch.float32
    value.sum().backward()
    assert fs.grad.dtype == torch.bfloat16 and ft.grad is None


@pytest.mark.parametrize(
    "shape_t,message",
    [((2, 3, 12, 19), r"different patch grids \(4x5 vs 3x5 patches of 4x4\)"),
     ((2, 4, 13, 19), r"student \(B, C\) = \(2, 3\) but teacher \(B, C\) = \(2, 4\)"),
     ((1, 3, 13, 19), r"student \(B, C\) = \(2, 3\) but teacher \(B, C\) = \(1, 3\)")],
)
def test_patch_cka_refuses_maps_it_cannot_pair(shape_t, message):
    # The rows and Grams are sized by the student's map: a teacher with fewer patches would be
    # compared against zero rows, one with more would not fit.
    with pytest.raises(ValueError, match=message):
        patch_cka(torch.randn(2, 3, 13, 19), torch.randn(*shape_t), 4)
