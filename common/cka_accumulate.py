"""Minibatch CKA between every pair of layers of two models, accumulated over a whole dataset.

Full-batch CKA over N samples needs the N x N Gram matrices: 800 MB each in float64 for the
CIFAR-100 test set, and out of reach for ImageNet. Nguyen, Raghu & Kornblith, "Do Wide and Deep
Networks Learn the Same Things?" (ICLR 2021), Section 3.1, average the *unbiased* HSIC estimator
of Song et al. (2012, eq. 5; ``common.cka``) over k minibatches X_i, Y_i of the same samples:

    CKA_minibatch = (1/k sum_i HSIC_1(K_i, L_i))
                    / sqrt((1/k sum_i HSIC_1(K_i, K_i)) * (1/k sum_i HSIC_1(L_i, L_i))),
    K_i = X_i X_i^T,  L_i = Y_i Y_i^T,

    HSIC_1(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)),

with K~, L~ the Gram matrices with zeroed diagonals and n the minibatch size. Each minibatch term
is unbiased, so their mean is too, and the estimate converges to the population CKA that
full-batch debiased CKA (Kornblith et al. 2019, App. B) also estimates. It is *not* equal to
full-batch CKA on the same N samples; it is equal to it when there is one minibatch of all N.
Because the unbiased estimator does not depend on the minibatch size, using it (and not the
biased one, whose bias shrinks as 1/n) makes the map independent of the batch size up to noise.

Memory is O(layers^2 + layers * n^2), independent of N: per minibatch we form each layer's
n x n Gram matrix once and get the HSIC terms of all (row layer, column layer) pairs from three
batched matmuls (``_unbiased_hsic_matrix``), then add them to float64 running sums.

Numerics: features are centred per minibatch (HSIC_1 is exactly invariant to subtracting the
minibatch mean of the features, and centring removes the cancellation that large activation
means would cause) and the Gram matrices are formed in float64. A layer that is constant over the
data (e.g. a dead ReLU stage) has no defined CKA; like ``common.cka`` we report 0 for it, and
``degenerate()`` names it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from common.cka import EPS

__all__ = ["MIN_BATCH", "MinibatchCKA"]

# HSIC_1 divides by n(n-3) and (n-1)(n-2): it needs n >= 4 samples per minibatch.
MIN_BATCH = 4


def _zero_diagonal_grams(features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Linear Gram matrices of minibatch-centred, flattened features, diagonals zeroed: (L, n, n) float64.

    Also returns, per layer, (||X_c||_F^2, ||X||_F^2), (L, 2): how much of the layer varies across
    the minibatch against its size, to recognise a constant representation.
    """
    n = features[0].shape[0]
    grams = torch.empty(len(features), n, n, dtype=torch.float64, device=features[0].device)
    varying = torch.empty(len(features), 2, dtype=torch.float64, device=features[0].device)
    for i, f in enumerate(features):
        # Layers differ in width, so each is flattened and multiplied on its own; the HSIC terms
        # of all pairs below are batched.
        x = f.detach().reshape(n, -1).double()
        varying[i, 1] = x.square().sum()
        x = x - x.mean(dim=0, keepdim=True)
        varying[i, 0] = x.square().sum()
        torch.matmul(x, x.T, out=grams[i])
    grams.diagonal(dim1=-2, dim2=-1).zero_()
    return grams, varying


def _unbiased_hsic_matrix(k: Tensor, l: Tensor) -> Tensor:
    """n(n-3) * HSIC_1(k[a], l[b]) for all a, b: (A, B) from zero-diagonal Grams k (A, n, n), l (B, n, n)."""
    n = k.shape[-1]
    trace_kl = k.reshape(k.shape[0], -1) @ l.reshape(l.shape[0], -1).T  # tr(K L) = <K, L> for symmetric K
    row_k, row_l = k.sum(dim=-1), l.sum(dim=-1)  # K 1, L 1: (A, n), (B, n)
    sum_k, sum_l = row_k.sum(dim=-1), row_l.sum(dim=-1)  # 1^T K 1, 1^T L 1
    cross = row_k @ row_l.T  # 1^T K L 1 = (K 1) . (L 1)
    return trace_kl + torch.outer(sum_k, sum_l) / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)


def _unbiased_hsic_self(k: Tensor) -> Tensor:
    """n(n-3) * HSIC_1(k[a], k[a]) for each a: the diagonal of ``_unbiased_hsic_matrix(k, k)``, in O(A n^2)."""
    n = k.shape[-1]
    row = k.sum(dim=-1)
    total = row.sum(dim=-1)
    return (k * k).sum(dim=(-2, -1)) + total * total / ((n - 1) * (n - 2)) - 2.0 * (row * row).sum(dim=-1) / (n - 2)


class MinibatchCKA:
    """Running minibatch CKA between ``num_rows`` layers of one model and ``num_cols`` of another.

        acc = MinibatchCKA(len(layers_a), len(layers_b))
        for images in batches:
            acc.update(features_a(images), features_b(images))  # lists of (n, ...) tensors
        matrix = acc.compute()  # (num_rows, num_cols) float64, on the features' device

    Every minibatch counts equally (Nguyen et al.'s mean over minibatches); it must hold at least
    ``MIN_BATCH`` samples. ``common.cka_map.merge_short_batches`` folds a short last batch into
    the one before it.
    """

    def __init__(self, num_rows: int, num_cols: int) -> None:
        if num_rows < 1 or num_cols < 1:
            raise ValueError(f"need at least one layer on each side, got {num_rows} x {num_cols}.")
        self.num_rows, self.num_cols = num_rows, num_cols
        self.num_batches = 0
        self.num_samples = 0
        # float64 sums over minibatches: HSIC_1 of every (row, column) pair, of each layer with
        # itself, and each layer's (||X_c||^2, ||X||^2).
        self._cross: Tensor | None = None
        self._self: list[Tensor] = []
        self._varying: list[Tensor] = []

    @torch.no_grad()
    def update(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> None:
        """Add one minibatch: ``rows[a]`` and ``cols[b]`` are layer outputs (n, ...) for the same n samples."""
        if len(rows) != self.num_rows or len(cols) != self.num_cols:
            raise ValueError(
                f"expected {self.num_rows} row and {self.num_cols} column layers, got {len(rows)} and {len(cols)}."
            )
        sizes = sorted({t.shape[0] if t.dim() else 0 for t in (*rows, *cols)})
        if len(sizes) != 1:
            raise ValueError(f"all layer outputs must describe the same samples; got batch sizes {sizes}.")
        n = sizes[0]
        if n < MIN_BATCH:
            raise ValueError(
                f"the unbiased HSIC estimator needs minibatches of at least {MIN_BATCH} samples, got {n}. "
                "Use a larger batch, or merge a short last batch into the previous one "
                "(common.cka_map.merge_short_batches)."
            )
        (k, var_k), (l, var_l) = _zero_diagonal_grams(rows), _zero_diagonal_grams(cols)
        scale = 1.0 / (n * (n - 3))
        terms = [_unbiased_hsic_matrix(k, l) * scale, _unbiased_hsic_self(k) * scale, _unbiased_hsic_self(l) * scale]
        if self._cross is None:
            self._cross, self._self, self._varying = terms[0], terms[1:], [var_k, var_l]
        else:
            self._cross += terms[0]
            for total, term in zip(self._self + self._varying, terms[1:] + [var_k, var_l]):
                total += term
        self.num_batches += 1
        self.num_samples += n

    def _defined(self) -> tuple[Tensor, Tensor]:
        """Per side, which layers have a defined CKA: not constant over the data, HSIC_1(K, K) > 0.

        A constant layer is recognised by its centred part: sum ||X_c||^2 <= EPS * sum ||X||^2
        (common.cka's one floor, here relative to the layer's own magnitude, so a layer's scale
        does not matter). Centring a constant in float64 leaves ~1e-32 of it, far below EPS.
        """
        self._require_data()
        return tuple(
            (var[:, 0] > EPS * var[:, 1]) & (self_hsic > 0) for self_hsic, var in zip(self._self, self._varying)
        )

    def degenerate(self) -> tuple[list[int], list[int]]:
        """Indices of the row and column layers whose CKA is undefined (constant over the data): reported as 0."""
        return tuple((~ok).nonzero().flatten().tolist() for ok in self._defined())

    def compute(self) -> Tensor:
        """The (num_rows, num_cols) CKA matrix, float64. The 1/k of the means cancels in the ratio."""
        ok_rows, ok_cols = self._defined()
        self_rows, self_cols = (torch.where(ok, s, torch.ones_like(s)) for ok, s in zip((ok_rows, ok_cols), self._self))
        matrix = self._cross / torch.outer(self_rows.sqrt(), self_cols.sqrt())
        return torch.where(ok_rows[:, None] & ok_cols[None, :], matrix, torch.zeros_like(matrix))

    def _require_data(self) -> None:
        if self._cross is None:
            raise RuntimeError("MinibatchCKA has seen no minibatch: call update() before compute().")
