"""PCKA's CPU kernels (``patch_kernels.cpp``): the bilinear resize fused with the cut into patch rows, and its adjoint.

Why compiled code: on CPU, PCKA's previous path needed five passes of torch's operators over a
feature map to do what PCKA asks before its Gram matmuls (centre, resize along H, transpose, resize
along W, copy into rows) and five more for the gradient. Each pass was fast, but together they took
as long as the matmuls, and in the phases where other tenants of the machine fill its caches 1.5x
longer. One pass each way, with a patch row of the map in cache, makes PCKA 12-30% faster on the
RetinaNet benchmark (``benchmarks/bench_losses.py``). GPUs take the ``nchw`` path of
``common.patches`` and never build this.

The kernels compute what ``F.interpolate(mode="bilinear", align_corners=False)`` computes, with the
source indices and weights of torch's CPU kernel (``resize_coefficients``), one axis after the
other (H, then W; torch blends along W first, so results differ by rounding). They run on torch's
own thread pool (``at::parallel_for``, linked against the OpenMP runtime torch already loaded), so
they neither fight torch's threads for cores nor spin while the matmuls run.

Built at first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about 30 s, then
cached in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). With GCC on x86-64
the build is portable: each kernel is compiled for AVX-512, AVX2 and plain x86-64, and the best is
picked on the node it runs on (other compilers and CPUs: one build for the compiler's default
target). Where the build fails, ``load`` warns once, naming the compiler's first error, and PCKA
uses torch's operators. torch releases from before mid-2026 (pytorch#190543; the pinned 2.14.1 has
the fix) lock a build with a file that a killed build leaves behind, and later builds wait for it
forever: delete ``<TORCH_EXTENSIONS_DIR>/rcka_patch_kernels_*/lock``.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load", "resize_coefficients"]

SOURCE = Path(__file__).with_name("patch_kernels.cpp")


@functools.lru_cache(maxsize=64)
def resize_coefficients(size_in: int, size_out: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear resizing (align_corners=False) of one axis from ``size_in`` up to ``size_out``, as torch does on CPU.

    Returns ``(index0, index1, weight0, weight1)``: output i blends inputs ``index0[i]`` and
    ``index1[i]`` with weights summing to 1, computed in ``dtype`` arithmetic as torch does:
    ``src = max(scale * (i + 0.5) - 0.5, 0)`` with ``scale = size_in / size_out``.

    Cached, and so shared (the kernels only read them): a PCKA step needs the same few axes for
    every map, and making them costs ~40 us of small ops each time.
    """
    if size_out < size_in:
        raise ValueError(f"resize_coefficients resizes up only: {size_in} -> {size_out}.")
    if dtype == torch.float32:
        scale = torch.tensor(size_in / size_out, dtype=dtype)  # torch: float(size_in) / size_out in float
    else:
        scale = torch.tensor(size_in, dtype=dtype) / size_out
    src = (scale * (torch.arange(size_out, dtype=dtype) + 0.5) - 0.5).clamp_min(0)
    index0 = src.floor().long().clamp_max(size_in - 1)
    index1 = torch.where(index0 < size_in - 1, index0 + 1, index0)
    weight1 = (src - index0.to(dtype)).clamp(0, 1)
    return index0, index1, 1 - weight1, weight1


@functools.cache
def load():
    """The compiled kernels (``rows_forward``, ``rows_backward``); None, with a warning, where they can't be built."""
    # Importing cpp_extension logs a probe of the CUDA toolkit on machines without one; these
    # kernels are CPU-only, and the line would land in every CPU run's (and benchmark's) stderr.
    probe_log = logging.getLogger("torch.utils.cpp_extension")
    level = probe_log.level
    probe_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        probe_log.setLevel(level)
    path = os.environ.get("PATH")
    try:
        try:  # pip's ninja (a dependency) first: another ninja on PATH would rebuild in turn with it
            import ninja

            os.environ["PATH"] = os.pathsep.join(filter(None, [ninja.BIN_DIR, path]))
        except ImportError:
            pass
        # -fopenmp links against libgomp, which resolves to the copy torch loaded: one thread pool.
        # The AVX2 and AVX-512 builds fuse multiply-adds (5% of PCKA's time on the benchmark), so
        # nodes of different CPU types differ in the last bits, as MKL's matmuls make them anyway.
        # One build per torch version: one cached against another torch's headers may not load.
        return cpp_extension.load(
            name="rcka_patch_kernels_" + re.sub(r"\W", "_", torch.__version__), sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, no Python headers, another platform's flags
        warnings.warn(
            "PCKA's CPU kernels could not be built, so PCKA on CPU uses torch's operators (the same values up "
            f"to rounding, about 1.5x slower): {_first_error(error)}. They need a C++ compiler (GCC or clang), "
            "ninja (pip install ninja) and the Python headers; see common/patch_kernels.py.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _first_error(error: Exception) -> str:
    """The line of a failed build that says what went wrong: the compiler's first error, else the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # Compilers write "file:line:col: error: ..." or "fatal error: ..."; torch's own first line
    # ("Error building extension ...") says nothing more than the warning does.
    return next((line for line in lines if "error:" in line.lower()), lines[-1]).rstrip(".")
