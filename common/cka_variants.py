"""The CKA variants of the first author's related code, which RCKA's losses reproduce by default.

Source: github.com/Klayand/Distill_Knowledge at 5312bdf6d4d80db5fda7d322796bfc89390c75e2 (Zikai Zhou, the
paper's first author). Its ``distiller/CKA.py::CenterKernelAlignment(X, Y, with_l2_norm)`` (identical to
Klayand/PCKA's ``mmrazor/models/losses/cka_loss.py``) computes, from raw inputs and without centring,

    K = X X^T,  L = Y Y^T,  optionally K_ij <- K_ij / sqrt(K_ii) (rows only; "with_l2_norm"),
    CKA = tr(K L^T) / sqrt(tr(K K^T) tr(L L^T)),

the cosine similarity of the flattened matrices. The row normalisation leaves K asymmetric: row i of
K is ``x_i / ||x_i||`` against every sample, i.e. ``K = normalize(X) X^T``. Its feature term
(``distiller/CKASP.py::compute_spcka_loss``, used by ``DKCKA``) first forms the SP kernel of
flattened features (Tung & Mori 2019): ``G = A A^T`` with rows scaled to unit L2 norm, and then
compares the two SP kernels with the same CKA (no row normalisation), i.e. the cosine of ``G G^T``.

Here these are written for our numerics (``common.cka``): float32 accumulation under autocast,
float64 kept, leading batch dims, and ``common.cka.EPS`` as the only epsilon. A zero row (x_i = 0)
makes the related code divide 0 by 0 (NaN); here its normalised row is 0 and carries no gradient.

Centring (``centered=True``, our option; the related code never centres) always means one thing:
the inputs of ``CenterKernelAlignment`` are column-centred (each feature minus its mean over the
samples) before any Gram is formed. Without row normalisation this is exactly linear CKA as defined
(HKH); with it, the rows of the centred representation are normalised; for the SP feature term, the
two SP kernels (the inputs of the outer CKA) are centred, giving true linear CKA between the SP kernels.
"""
from __future__ import annotations

from torch import Tensor

from common.cka import EPS, _no_autocast, _promote, _rescale, cka, gram_linear, linear_cka

__all__ = ["row_normalise", "row_normalised_gram", "gram_cosine", "sp_kernel", "sp_cka"]


def row_normalise(x: Tensor) -> Tensor:
    """Each row of ``x`` (..., n, p) divided by its L2 norm (``F.normalize(x, dim=-1)``).

    The input is first divided by its (detached) largest |entry|, which changes nothing (each row is
    scale-free afterwards) but makes the floor relative to the data's scale: a row whose norm is
    below ``sqrt(EPS)`` of that entry counts as zero and stays (nearly) zero instead of 0/0.
    """
    x = _rescale(_promote(x))
    with _no_autocast(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS ** 0.5)


def row_normalised_gram(x: Tensor) -> Tensor:
    """``K_ij / sqrt(K_ii)`` for ``K = X X^T``, formed as ``normalize(X) X^T`` (no square root of K).

    Asymmetric: rows are scale-free, columns keep each sample's norm. Hence CKA on it is invariant
    to a common positive scale and to orthogonal transforms of the features, but not to rescaling
    single samples (a sample's scale still enters through its column).
    """
    x = _rescale(_promote(x))
    with _no_autocast(x):
        return row_normalise(x) @ x.transpose(-1, -2)


def gram_cosine(x: Tensor, y: Tensor, *, centered: bool = False, row_norm: bool = False) -> Tensor:
    """The related code's ``CenterKernelAlignment(X, Y, with_l2_norm=row_norm)`` for x (..., n, p), y (..., n, q).

    ``row_norm=False`` is ``common.cka.linear_cka`` (uncentred by default, as the related code);
    ``centered=True`` centres the columns of x and y first (see the module docstring).
    """
    if not row_norm:
        return linear_cka(x, y, centered=centered)
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"x and y must describe the same samples: shapes (..., n, p) and (..., n, q); got "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.dim() < 2 or x.shape[-2] < 2:
        raise ValueError(f"CKA needs (..., n, p) inputs with n >= 2 samples; got shape {tuple(x.shape)}.")
    x, y = _promote(x), _promote(y)
    if x.dtype != y.dtype:
        x, y = x.double(), y.double()
    if centered:
        with _no_autocast(x):
            x = x - x.mean(dim=-2, keepdim=True)
            y = y - y.mean(dim=-2, keepdim=True)
    # cka(..., centered=False) is the cosine of the flattened matrices, which needs no symmetry.
    return cka(row_normalised_gram(x), row_normalised_gram(y), centered=False)


def sp_kernel(features: Tensor) -> Tensor:
    """SP kernel of a batch of feature maps (batch, ...): ``A A^T`` (A = features flattened to (batch, -1))
    with each row scaled to unit L2 norm. (batch, batch), asymmetric like ``row_normalised_gram``."""
    if features.dim() < 2 or features.shape[0] < 2:
        raise ValueError(f"the SP kernel needs a batch of at least 2 samples; got shape {tuple(features.shape)}.")
    # gram_linear's symmetric backward costs one matmul with A (batch x C*H*W) instead of two.
    return row_normalise(gram_linear(features.flatten(1)))


def sp_cka(features_s: Tensor, features_t: Tensor, *, centered: bool = False) -> Tensor:
    """The related code's feature term ``CenterKernelAlignment(sp_kernel(F_t), sp_kernel(F_s), with_l2_norm=False)``:
    linear CKA of the two SP kernels taken as (batch, batch) representations; uncentred by default."""
    if features_s.shape[0] != features_t.shape[0]:
        raise ValueError(f"student batch {features_s.shape[0]} != teacher batch {features_t.shape[0]}.")
    return linear_cka(sp_kernel(features_s), sp_kernel(features_t), centered=centered)
