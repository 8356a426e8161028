"""common.patch_kernels: PCKA's compiled CPU resize-and-cut, against torch's resize and patchify, and its fallback."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common.patches as patches_module
from common import patch_kernels
from common.cka import linear_cka
from common.patches import patch_cka, patchify

REPO = Path(__file__).resolve().parents[1]


def test_cpu_levels_that_need_a_resize_take_the_compiled_kernels():
    # CI builds them (a C++ compiler and ninja are there): the fast path is the one tested.
    assert patch_kernels.load() is not None, "PCKA's CPU kernels did not build: see the RuntimeWarning"
    resized, on_grid = torch.empty(2, 3, 13, 19), torch.empty(2, 3, 16, 32)
    assert patches_module._level_path(resized, resized, 16) == "kernel"
    assert patches_module._level_path(on_grid, on_grid, 16) == "direct"


def dense(coefficients, size_in):
    """The resize as an (out, in) matrix, from its indices and weights."""
    index0, index1, weight0, weight1 = coefficients
    matrix = torch.zeros(len(index0), size_in, dtype=weight0.dtype)
    rows = torch.arange(len(index0))
    matrix.index_put_((rows, index0), weight0, accumulate=True)
    matrix.index_put_((rows, index1), weight1, accumulate=True)
    return matrix


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 2e-6)])
@pytest.mark.parametrize("size_in,size_out", [(13, 16), (19, 32), (100, 112), (152, 160), (25, 32), (1, 4), (16, 16)])
def test_resize_coefficients_resize_as_torch_does_along_either_axis(dtype, tol, size_in, size_out):
    coefficients = patch_kernels.resize_coefficients(size_in, size_out, dtype)
    index0, index1, weight0, weight1 = coefficients
    assert index0.dtype == index1.dtype == torch.int64 and weight0.dtype == weight1.dtype == dtype
    assert 0 <= index0.min() and index1.max() < size_in
    torch.testing.assert_close(weight0 + weight1, torch.ones(size_out, dtype=dtype), rtol=0, atol=tol)
    x = torch.randn(3, size_in, dtype=dtype)
    along_h = F.interpolate(x.view(3, 1, size_in, 1), size=(size_out, 1), mode="bilinear", align_corners=False)
    along_w = F.interpolate(x.view(3, 1, 1, size_in), size=(1, size_out), mode="bilinear", align_corners=False)
    resized = x @ dense(coefficients, size_in).T
    torch.testing.assert_close(resized, along_h.view(3, size_out), rtol=0, atol=tol)
    torch.testing.assert_close(resized, along_w.view(3, size_out), rtol=0, atol=tol)


def test_resize_coefficients_refuse_to_shrink():
    with pytest.raises(ValueError, match="up only: 20 -> 16"):
        patch_kernels.resize_coefficients(20, 16, torch.float32)


def kernel_rows(feat, chunk, p, offset, n_pad):
    b, _, h, w = feat.shape
    (gh, gw) = patches_module.patch_grid(h, w, p)
    rows = torch.full((chunk.stop - chunk.start, n_pad, b * p * p), float("nan"), dtype=feat.dtype)
    resize = patches_module._resize_coefficients(feat, p)
    patch_kernels.load().rows_forward(feat, chunk.start, offset, *resize, p, rows)
    return rows, resize


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("size", [(13, 19), (16, 19), (13, 16), (5, 3)])
def test_kernel_rows_are_patchify_of_the_centred_map_and_backward_is_their_adjoint(size, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    feat = (torch.randn(2, 6, *size, generator=gen, dtype=torch.float64) + 50.0).to(dtype)
    offset = feat[:, :, 0, 0].contiguous()
    chunk, p = slice(2, 5), 4
    n = patches_module.patch_grid(*size, p)[0] * patches_module.patch_grid(*size, p)[1]
    rows, resize = kernel_rows(feat, chunk, p, offset, n + 3)
    assert torch.equal(rows[:, n:], torch.zeros(3, 3, 2 * p * p))  # padding rows: zeros, not left as they were
    in_patchify_order = rows[:, :n].reshape(3, n, 2, p, p).transpose(-1, -2).reshape(3, n, 2 * p * p)
    expected = patchify(feat[:, chunk] - offset[:, chunk, None, None], p)
    torch.testing.assert_close(in_patchify_order, expected, rtol=0, atol=tol)
    # <rows(x), g> = <x, rows^T(g)>, and rows^T writes the chunk's channels only.
    grad_rows = torch.randn(3, n, 2 * p * p, generator=gen, dtype=torch.float64).to(dtype)
    grad_in = torch.full(feat.shape, float("nan"), dtype=dtype)
    patch_kernels.load().rows_backward(grad_rows, *resize, p, grad_in, chunk.start)
    assert grad_in[:, [0, 1, 5]].isnan().all() and not grad_in[:, chunk].isnan().any()
    zero = torch.zeros(2, 6, dtype=dtype)
    plain, _ = kernel_rows(feat, chunk, p, zero, n)
    torch.testing.assert_close((plain.double() * grad_rows.double()).sum(),
                               (feat[:, chunk].double() * grad_in[:, chunk].double()).sum(), rtol=tol, atol=0)


def test_kernels_refuse_arguments_that_would_reach_outside_their_tensors():
    kernels = patch_kernels.load()
    feat, offset = torch.randn(2, 4, 13, 19), torch.zeros(2, 4)
    along_h, along_w = patches_module._resize_coefficients(feat, 4)
    rows = torch.empty(2, 20, 32)
    kernels.rows_forward(feat, 2, offset, along_h, along_w, 4, rows)  # channels 2 and 3: fine
    with pytest.raises(RuntimeError, match="outside feat"):
        kernels.rows_forward(feat, 3, offset, along_h, along_w, 4, rows)
    bad_index = [along_h[0].clone(), along_h[1], along_h[2], along_h[3]]
    bad_index[0][5] = 13
    with pytest.raises(RuntimeError, match="source index 13 is outside the map"):
        kernels.rows_forward(feat, 0, offset, bad_index, along_w, 4, rows)
    with pytest.raises(RuntimeError, match="contiguous CPU"):
        kernels.rows_forward(feat.transpose(2, 3), 0, offset, along_h, along_w, 4, rows)
    with pytest.raises(RuntimeError, match="rows: a contiguous"):
        kernels.rows_forward(feat, 0, offset, along_h, along_w, 4, torch.empty(2, 19, 32))
    along_h_float64 = patches_module._resize_coefficients(feat.double(), 4)[0]
    with pytest.raises(RuntimeError, match="coefficient dtype"):
        kernels.rows_forward(feat, 0, offset, along_h_float64, along_w, 4, rows)
    with pytest.raises(RuntimeError, match="grad_rows: a contiguous"):
        kernels.rows_backward(torch.empty(2, 19, 32), along_h, along_w, 4, torch.empty(2, 4, 13, 19), 0)
    with pytest.raises(RuntimeError, match="patch size must be positive, got 0"):
        kernels.rows_forward(feat, 0, offset, along_h, along_w, 0, rows)
    with pytest.raises(RuntimeError, match="patch size must be positive, got -4"):
        kernels.rows_backward(rows, along_h, along_w, -4, torch.empty(2, 4, 13, 19), 0)
    meta = torch.device("meta")  # stands for a GPU tensor: a device pointer the kernels must not touch
    with pytest.raises(RuntimeError, match="offset: a contiguous CPU"):
        kernels.rows_forward(feat, 0, offset.to(meta), along_h, along_w, 4, rows)
    with pytest.raises(RuntimeError, match="rows: a contiguous CPU"):
        kernels.rows_forward(feat, 0, offset, along_h, along_w, 4, rows.to(meta))
    with pytest.raises(RuntimeError, match="grad_rows: a contiguous CPU"):
        kernels.rows_backward(torch.empty(2, 20, 32, device=meta), along_h, along_w, 4, torch.empty(2, 4, 13, 19), 0)


@pytest.fixture
def fresh_load():
    """``load`` caches its answer: forget it before and after, so the test's build failure stays in the test."""
    patch_kernels.load.cache_clear()
    yield
    patch_kernels.load.cache_clear()


def test_a_failed_build_warns_once_and_pcka_uses_torch_operators(monkeypatch, fresh_load):
    from torch.utils import cpp_extension

    def no_ninja(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    path = os.environ.get("PATH")
    with pytest.warns(RuntimeWarning, match=r"could not be built.*Ninja is required.*C\+\+ compiler"):
        assert patch_kernels.load() is None
    assert os.environ.get("PATH") == path  # pip's ninja was put first for the build only
    gen = torch.Generator().manual_seed(4)
    fs = torch.randn(2, 3, 13, 19, generator=gen, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 3, 13, 19, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the answer is cached
        assert patches_module._level_path(fs, ft, 4) == "nchw"
        got = patch_cka(fs, ft, 4)
    torch.testing.assert_close(got, linear_cka(patchify(fs, 4), patchify(ft, 4)), rtol=1e-12, atol=1e-12)


def test_a_failed_build_is_reported_by_the_compilers_first_error():
    output = RuntimeError(
        "Error building extension 'rcka_patch_kernels':\n[1/2] c++ -MMD -c patch_kernels.cpp\n"
        "FAILED: patch_kernels.o\npatch_kernels.cpp:120:3: error: no dispatcher found for the versioning attributes\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert patch_kernels._first_error(output) == (
        "patch_kernels.cpp:120:3: error: no dispatcher found for the versioning attributes")
    output = RuntimeError("[1/2] c++ -c patch_kernels.cpp\nfatal error: Python.h: No such file or directory\n"
                          "ninja: build stopped: subcommand failed.")
    assert patch_kernels._first_error(output) == "fatal error: Python.h: No such file or directory"
    assert patch_kernels._first_error(RuntimeError("Ninja is required to load C++ extensions.")) == (
        "Ninja is required to load C++ extensions")
    assert patch_kernels._first_error(OSError()) == "OSError"


def test_loading_the_kernels_prints_nothing():
    # torch's cpp_extension logs a probe of the CUDA toolkit when imported on a machine without
    # one; CPU runs and the benchmark (whose stderr must stay clean) would print it every time.
    result = subprocess.run(
        [sys.executable, "-c", "from common import patch_kernels; assert patch_kernels.load() is not None"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_pcka_on_channels_last_maps_takes_the_kernels_with_the_same_values_and_gradients():
    # Backbones run channels-last on GPUs and sometimes on CPU: the kernels read contiguous maps.
    gen = torch.Generator().manual_seed(5)
    fs = torch.randn(2, 5, 13, 19, generator=gen, dtype=torch.float64)
    ft = torch.randn(2, 5, 13, 19, generator=gen, dtype=torch.float64)
    fs_cl = fs.contiguous(memory_format=torch.channels_last).requires_grad_()
    fs = fs.requires_grad_()
    got = patch_cka(fs_cl, ft.contiguous(memory_format=torch.channels_last), 4)
    expected = linear_cka(patchify(fs, 4), patchify(ft, 4))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), fs_cl)
    (grad_expected,) = torch.autograd.grad(expected.sum(), fs)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)


def test_half_precision_maps_go_through_the_kernels_in_float32():
    gen = torch.Generator().manual_seed(6)
    fs = torch.randn(2, 4, 13, 19, generator=gen).to(torch.bfloat16).requires_grad_()
    ft = torch.randn(2, 4, 13, 19, generator=gen).to(torch.float16)
    assert patches_module._level_path(fs.float(), ft.float(), 4) == "kernel"
    got = patch_cka(fs, ft, 4)
    assert got.dtype == torch.float32
    expected = linear_cka(patchify(fs.double(), 4), patchify(ft.double(), 4))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    got.sum().backward()
    assert fs.grad.dtype == torch.bfloat16 and fs.grad.isfinite().all()


def test_a_float32_student_and_a_float64_teacher_are_compared_in_float64_as_linear_cka_does():
    gen = torch.Generator().manual_seed(7)
    fs = torch.randn(2, 4, 13, 19, generator=gen).requires_grad_()
    ft = torch.randn(2, 4, 13, 19, generator=gen, dtype=torch.float64)
    got = patch_cka(fs, ft, 4)
    expected = linear_cka(patchify(fs.double(), 4), patchify(ft, 4))  # resized in float64 too
    assert got.dtype == linear_cka(patchify(fs, 4), patchify(ft, 4)).dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), fs)
    (grad_expected,) = torch.autograd.grad(expected.sum(), fs)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, grad_expected, rtol=1e-6, atol=1e-9)
