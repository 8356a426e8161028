r"""Maximum mean discrepancy (MMD) and its relation to CKA, on which the paper builds.

MMD (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012) between samples x (m, d) and y (n, d)
under kernel k is the distance between their kernel mean embeddings:

    MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y).

The biased estimator averages every entry of each kernel matrix; the unbiased one (their eq. 3)
leaves the diagonals of k(x, x) and k(y, y) out.

CKA <-> MMD (the relation in Section 3 of the RCKA paper, restated with a proof)
-------------------------------------------------------------------------------
Let K~ and L~ be the centred Gram matrices of two representations of the same n samples, and
K^ = K~ / ||K~||_F, L^ = L~ / ||L~||_F their unit-Frobenius versions. Then

    ||K^ - L^||_F^2 = ||K^||^2 + ||L^||^2 - 2 <K^, L^> = 2 - 2 CKA,    i.e.
    CKA = 1 - 1/2 ||K^ - L^||_F^2.                                          (identity)

So maximising CKA is minimising the squared distance of the normalised Gram matrices (plus the
constant 1). The same identity holds for the uncentred Grams that the paper's code uses, with
cosine(K, L) in place of CKA (``gram_cosine_identity`` checks both).

That Gram distance bounds a mean-embedding discrepancy from above. Read row i of K^ as the
empirical kernel feature of sample i under the teacher, k^_i in R^n, and likewise l^_i for the
student. Their (linear-kernel, biased) MMD is the distance between the two mean embeddings:

    MMD^2({k^_i}, {l^_i}) = || (1/n) sum_i (k^_i - l^_i) ||^2 = (1/n^2) ||(K^ - L^) 1||^2
                          <= (1/n^2) ||K^ - L^||_op^2 ||1||^2 <= (1/n) ||K^ - L^||_F^2
                          = (2/n) (1 - CKA).                                 (bound)

Likewise the squared norms of the mean embeddings differ by at most the same distance:
|1^T K^ 1 - 1^T L^ 1| / n^2 <= ||K^ - L^||_F / n. With centred Grams every row sums to zero, so
both mean embeddings sit at the origin and the bound holds trivially; it is informative for the
uncentred Grams of the paper's code, where CKA -> 1 drives the mean-embedding gap to 0.
``gram_mmd2`` computes the left-hand side; the tests check the bound on random and adversarial
inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from common.cka import _no_autocast, _promote, center_gram, median_bandwidth

__all__ = ["mmd2", "gram_mmd2", "unit_gram", "gram_distance2"]


def _cross_sq_distances(x: Tensor, y: Tensor) -> Tensor:
    d2 = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2) - 2 * x @ y.transpose(-1, -2)
    return d2.clamp_min(0)


def mmd2(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float | Tensor | None = None,
) -> Tensor:
    """Squared MMD between samples x (..., m, d) and y (..., n, d).

    kernel="linear": k(a, b) = a.b (the biased estimate is ||mean(x) - mean(y)||^2).
    kernel="rbf": k(a, b) = exp(-||a - b||^2 / (2 sigma^2)); sigma=None uses the median heuristic
    on the pooled sample.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"unknown kernel {kernel!r}; choose 'linear' or 'rbf'.")
    if x.dim() < 2 or y.dim() < 2 or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"x and y must be (..., m, d) and (..., n, d) with the same d and leading dims; got "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    m, n = x.shape[-2], y.shape[-2]
    if unbiased and (m < 2 or n < 2):
        raise ValueError(f"the unbiased MMD estimator needs at least 2 samples on each side, got m={m}, n={n}.")
    x, y = _promote(x), _promote(y)
    with _no_autocast(x):
        # MMD does not change under a common shift of both samples (for both kernels); shifting by
        # the pooled mean first keeps x.y and ||x||^2 from cancelling catastrophically for offset
        # data (the same weakness as centring a Gram afterwards; see common.cka). Detached: the
        # result does not depend on the shift.
        shift = ((x.detach().sum(-2, keepdim=True) + y.detach().sum(-2, keepdim=True)) / (m + n)).to(x.dtype)
        x, y = x - shift, y - shift
        if kernel == "linear":
            kxx, kyy, kxy = x @ x.transpose(-1, -2), y @ y.transpose(-1, -2), x @ y.transpose(-1, -2)
        else:
            if sigma is None:
                sigma = median_bandwidth(torch.cat([x, y], dim=-2))
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
            scale = 2 * sigma[..., None, None] ** 2
            kxx = torch.exp(-_cross_sq_distances(x, x) / scale)
            kyy = torch.exp(-_cross_sq_distances(y, y) / scale)
            kxy = torch.exp(-_cross_sq_distances(x, y) / scale)
        if unbiased:
            diag_xx = torch.diagonal(kxx, dim1=-2, dim2=-1).sum(-1)
            diag_yy = torch.diagonal(kyy, dim1=-2, dim2=-1).sum(-1)
            term_x = (kxx.sum(dim=(-2, -1)) - diag_xx) / (m * (m - 1))
            term_y = (kyy.sum(dim=(-2, -1)) - diag_yy) / (n * (n - 1))
        else:
            term_x = kxx.mean(dim=(-2, -1))
            term_y = kyy.mean(dim=(-2, -1))
        return term_x + term_y - 2 * kxy.mean(dim=(-2, -1))


def unit_gram(k: Tensor, centered: bool = True) -> Tensor:
    """K~ / ||K~||_F (K~ = HKH when centered), the normalisation under which CKA = 1 - ||K^ - L^||^2 / 2."""
    k = _promote(k)
    if centered:
        k = center_gram(k)
    norm = torch.linalg.matrix_norm(k, ord="fro")
    if (norm == 0).any():
        raise ValueError("a Gram matrix is zero after centring (constant representation): it has no unit version.")
    return k / norm[..., None, None]


def gram_distance2(k: Tensor, l: Tensor, centered: bool = True) -> Tensor:
    """||K^ - L^||_F^2, which equals 2 (1 - CKA(K, L)) (see the module docstring)."""
    d = unit_gram(k, centered) - unit_gram(l, centered)
    return (d * d).sum(dim=(-2, -1))


def gram_mmd2(k: Tensor, l: Tensor, centered: bool = False) -> Tensor:
    """Linear MMD^2 between the rows of K^ and of L^ (empirical kernel features), = ||(K^ - L^) 1||^2 / n^2.

    Bounded above by ``gram_distance2(k, l) / n`` = 2 (1 - CKA) / n (see the module docstring).
    Defaults to uncentred Grams, where it is not identically zero.
    """
    d = unit_gram(k, centered) - unit_gram(l, centered)
    n = d.shape[-1]
    mean_row_gap = d.sum(dim=-2) / n
    return (mean_row_gap * mean_row_gap).sum(-1)
