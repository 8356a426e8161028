"""common.patches.patchify: layout, resizing, errors."""
import pytest
import torch
import torch.nn.functional as F

from common.patches import patch_grid, patchify


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
