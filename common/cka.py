"""Centered kernel alignment (CKA) and the Hilbert-Schmidt independence criterion (HSIC).

Definitions follow Kornblith et al., "Similarity of Neural Network Representations Revisited"
(ICML 2019) and Gretton et al. (2005); the unbiased HSIC estimator is Song et al., "Feature
Selection via Dependence Maximization" (JMLR 2012), eq. (5).

Every function takes leading batch dimensions: representations are ``(..., n, p)`` (n samples,
p features) and Gram matrices ``(..., n, n)``; the result has shape ``(...)``.

Numerics, in one place:
  * Half-precision inputs (and inputs produced under autocast) are promoted to float32 and the
    maths runs with autocast disabled; float64 inputs stay float64 (``gradcheck`` uses them).
  * Centre before any product. Centring the Gram ``X X^T`` after forming it from uncentred X
    loses about eps * (mean/std)^2 of relative precision (float32, columns offset by 1e4 with
    std 1: CKA -0.06 for a true 0.74), and logits or post-ReLU features are not zero-mean. So
    every path that centres removes the offset from X first, O(np), small next to the O(n^2 p)
    Gram: the feature form and the RBF distances centre the columns (``center_columns``); the
    Gram form only subtracts one sample, as the Gram is centred afterwards anyway (O(n^2)),
    which finishes the centring and costs the same precision as zero-mean data.
    ``cka(K, L)`` on Gram matrices you built yourself can only centre the Grams: for offset
    data, pass ``gram_linear(center_columns(x))`` or use ``linear_cka``.
  * CKA is invariant to isotropic scaling, so each (centred) representation / Gram matrix is
    divided by its (detached) largest absolute entry before any product. This changes neither
    the value nor the gradient, and keeps the quartic norms ``||K||_F^2`` inside float32's range
    for large flattened features.
  * The only epsilon is ``EPS`` in ``_normalised_inner``. After the rescaling a non-zero matrix
    has squared norm >= 1, so the test ``< EPS`` catches exactly the zero ones: a constant
    representation, which subtracting a sample turns into exact zeros (``center_columns`` does
    that before taking the mean, so no rounding is left to amplify), or an all-zero one when
    uncentred. Its CKA is undefined; we return 0 with exactly zero gradient (``torch.where``, so no
    1/sqrt(EPS)-sized factor reaches the other side), instead of NaN.

Difference from the paper's released code (Klayand/PCKA): its "CKA" never centres; it is the
cosine similarity of the uncentred Gram matrices ``X X^T`` and ``Y Y^T``. That equals linear CKA
only for column-centred inputs. ``centered=True`` (the default here) is CKA as defined by the
theory the paper builds on; ``centered=False`` reproduces the released code.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "center_columns",
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "hsic",
    "cka",
    "cka_and_gradient",
    "cka_and_gradient_",
    "linear_cka",
]

# Squared-norm floor, relative to the data's scale (see the module docstring).
EPS = 1e-12


def _promote(t: Tensor) -> Tensor:
    """float64 stays float64; everything else is computed in float32."""
    if t.dtype == torch.float64:
        return t
    return t.float()


def _no_autocast(t: Tensor):
    if t.device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _positive_or_one(scale: Tensor) -> Tensor:
    """A scale to divide by: 1 where it is 0 (an all-zero matrix stays zero)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _rescale(t: Tensor, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Divide by the detached largest |entry| per batch element (CKA is scale invariant)."""
    return t / _positive_or_one(t.detach().abs().amax(dim=dims, keepdim=True))


def _check_representation(x: Tensor, name: str) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape (..., n, p) with n samples and p features; got shape "
            f"{tuple(x.shape)}. Flatten each sample's features into one vector first."
        )
    if x.shape[-2] < 2:
        raise ValueError(
            f"CKA needs at least 2 samples, {name} has n={x.shape[-2]} (shape {tuple(x.shape)}). "
            "Use a batch of 2 or more."
        )


def _check_gram(k: Tensor, name: str) -> None:
    if k.dim() < 2 or k.shape[-1] != k.shape[-2]:
        raise ValueError(f"{name} must be a square Gram matrix (..., n, n); got shape {tuple(k.shape)}.")
    if k.shape[-1] < 2:
        raise ValueError(f"CKA/HSIC need at least 2 samples; {name} is {tuple(k.shape)}.")


def _minus_first_sample(x: Tensor) -> Tensor:
    """``X - 1 x_0^T`` with x_0 detached: removes any offset exactly, changes no centred quantity."""
    return x - x[..., :1, :].detach()


def center_columns(x: Tensor) -> Tensor:
    """``H X`` for representations x (..., n, p): every feature minus its mean over the n samples.

    Computed as ``D - mean(D)`` with ``D = X - x_0``, x_0 the first sample (detached). Subtracting
    a sample first removes a common offset exactly, so the mean is taken of numbers of the data's
    own spread (accurate to eps * std, not eps * offset), and a feature that is constant over the
    samples becomes exactly 0. The shift changes neither value nor gradient (the result does not
    depend on x_0). Inputs are promoted as everywhere in this module.
    """
    _check_representation(x, "x")
    x = _promote(x)
    with _no_autocast(x):
        d = _minus_first_sample(x)
        # In place: the mean's backward needs no values of d, so autograd allows it.
        return d.sub_(d.mean(dim=-2, keepdim=True))


class _SymmetricGram(torch.autograd.Function):
    """``X X^T`` whose backward is one matmul, ``(G + G^T) X``, instead of autograd's two plus an add.

    For flattened stage features (n = batch, p = C*H*W in the tens of thousands) the backward
    matmuls dominate the loss's cost, so this removes about a third of it.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ x


def gram_linear(x: Tensor) -> Tensor:
    """Linear kernel Gram matrix ``K = X X^T`` of representations ``x`` (..., n, p)."""
    _check_representation(x, "x")
    x = _promote(x)
    with _no_autocast(x):
        if x.requires_grad:
            return _SymmetricGram.apply(x)
        return x @ x.transpose(-1, -2)


def _squared_distances(x: Tensor) -> Tensor:
    # ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j cancels catastrophically for offset data; distances do
    # not change under a shift, so take them between centred samples.
    x = center_columns(x)
    sq_norms = (x * x).sum(-1)
    gram = x @ x.transpose(-1, -2)
    # Rounding can make tiny distances negative; clamp them to 0. A sample is at distance exactly
    # 0 from itself (so k(x, x) = 1 exactly).
    d2 = (sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) - 2 * gram).clamp_min(0)
    n = d2.shape[-1]
    return d2.masked_fill(torch.eye(n, dtype=torch.bool, device=d2.device), 0.0)


def median_bandwidth(x: Tensor) -> Tensor:
    """Median heuristic: sqrt of the median squared distance between distinct samples, per batch element.

    Returned detached: the bandwidth is a hyperparameter of the kernel, not something to learn.
    A constant representation (all distances 0) gets bandwidth 1.
    """
    _check_representation(x, "x")
    x = _promote(x.detach())
    with _no_autocast(x):
        d2 = _squared_distances(x)
    n = d2.shape[-1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=d2.device)
    med = d2[..., off_diagonal].median(dim=-1).values
    return torch.where(med > 0, med, torch.ones_like(med)).sqrt()


def gram_rbf(x: Tensor, sigma: float | Tensor | None = None) -> Tensor:
    """Gaussian (RBF) Gram matrix ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))``.

    ``sigma=None`` uses the median heuristic (``median_bandwidth``). Kornblith et al. take the
    median over all entries including the zero diagonal; we take it over distinct pairs, which
    does not shrink with n.
    """
    _check_representation(x, "x")
    x = _promote(x)
    if sigma is None:
        sigma = median_bandwidth(x)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if (sigma <= 0).any():
        raise ValueError(f"RBF bandwidth sigma must be positive, got {sigma}.")
    with _no_autocast(x):
        d2 = _squared_distances(x)
        return torch.exp(-d2 / (2 * sigma[..., None, None] ** 2))


def center_gram(k: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 11^T / n``, computed from row/column means (H is never formed)."""
    _check_gram(k, "k")
    k = _promote(k)
    with _no_autocast(k):
        row_mean = k.mean(dim=-1, keepdim=True)
        col_mean = k.mean(dim=-2, keepdim=True)
        return k - row_mean - col_mean + row_mean.mean(dim=-2, keepdim=True)


def _hsic_unbiased_unnormalised(k: Tensor, l: Tensor) -> Tensor:
    """n(n-3) * HSIC_1 of Song et al. (2012), eq. (5), without the 1/(n(n-3)) factor."""
    n = k.shape[-1]
    k = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    l = l - torch.diag_embed(torch.diagonal(l, dim1=-2, dim2=-1))
    trace_kl = (k * l).sum(dim=(-2, -1))  # tr(K L) for symmetric K, L
    sum_k = k.sum(dim=(-2, -1))
    sum_l = l.sum(dim=(-2, -1))
    # 1^T K L 1 = (K 1) . (L 1)
    cross = (k.sum(dim=-1) * l.sum(dim=-1)).sum(dim=-1)
    return trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)


def hsic(k: Tensor, l: Tensor, unbiased: bool = False) -> Tensor:
    """HSIC of two Gram matrices over the same n samples.

    Biased (Gretton et al. 2005): ``tr(K H L H) / (n - 1)^2``.
    Unbiased (Song et al. 2012, eq. 5), n > 3:
    ``[tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``
    with K~, L~ the Gram matrices with zeroed diagonals.
    """
    _check_pair(k, l)
    k, l = _promote(k), _promote(l)
    n = k.shape[-1]
    with _no_autocast(k):
        if unbiased:
            if n < 4:
                raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got n={n}.")
            return _hsic_unbiased_unnormalised(k, l) / (n * (n - 3))
        # tr(K H L H) = <HKH, L>: only one of the two needs centring.
        return (center_gram(k) * l).sum(dim=(-2, -1)) / (n - 1) ** 2


def _check_pair(k: Tensor, l: Tensor) -> None:
    _check_gram(k, "k")
    _check_gram(l, "l")
    if k.shape != l.shape:
        raise ValueError(
            f"Gram matrices must have the same shape (same samples); got {tuple(k.shape)} and {tuple(l.shape)}."
        )


def _normalised_inner(inner: Tensor, sq_norm_a: Tensor, sq_norm_b: Tensor) -> Tensor:
    """``inner / sqrt(sq_norm_a * sq_norm_b)``; exactly 0, with exactly zero gradient, for a zero side.

    The clamp keeps the unused branch finite (so ``where`` passes a clean 0 back); ``where``, not
    the clamp alone, makes the gradient zero: through the clamp the inner product's gradient
    would still be multiplied by 1/sqrt(EPS) and cancel only in exact arithmetic.
    """
    degenerate = (sq_norm_a < EPS) | (sq_norm_b < EPS)
    value = inner * torch.rsqrt(sq_norm_a.clamp_min(EPS)) * torch.rsqrt(sq_norm_b.clamp_min(EPS))
    return torch.where(degenerate, torch.zeros_like(value), value)


def cka(k: Tensor, l: Tensor, centered: bool = True, unbiased: bool = False) -> Tensor:
    """CKA of two Gram matrices: ``<K~, L~>_F / (||K~||_F ||L~||_F)`` with K~ = HKH.

    ``centered=False`` skips the centring (the paper's released code). ``unbiased=True`` uses the
    unbiased HSIC estimator for all three terms ("debiased CKA", Kornblith et al. 2019, App. B);
    its value can fall slightly outside [0, 1] for finite n.
    """
    _check_pair(k, l)
    if unbiased and not centered:
        raise ValueError("unbiased=True implies centring (the estimator centres implicitly); use centered=True.")
    k, l = _promote(k), _promote(l)
    with _no_autocast(k):
        if unbiased:
            n = k.shape[-1]
            if n < 4:
                raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got n={n}.")
            k, l = _rescale(k), _rescale(l)
            return _normalised_inner(
                _hsic_unbiased_unnormalised(k, l),
                _hsic_unbiased_unnormalised(k, k),
                _hsic_unbiased_unnormalised(l, l),
            )
        if centered:
            k, l = center_gram(k), center_gram(l)
        # Rescale after centring, so that the EPS test is relative to the centred scale.
        k, l = _rescale(k), _rescale(l)
        return _normalised_inner(
            (k * l).sum(dim=(-2, -1)), (k * k).sum(dim=(-2, -1)), (l * l).sum(dim=(-2, -1))
        )


def cka_and_gradient(k: Tensor, l: Tensor, centered: bool = True) -> tuple[Tensor, Tensor]:
    """``cka(k, l, centered)`` and its gradient with respect to k, in closed form and without a graph.

    For hand-written backward passes that go through many small Grams at once (PCKA's fused op in
    ``common.patches``, which calls ``cka_and_gradient_`` on its own buffer). With K~ = HKH (or K),
    c = <K~, L~> / (|K~| |L~|): ``dc/dK = H (L~ / (|K~| |L~|) - c K~ / |K~|^2) H``, computed after
    the same rescaling as ``cka`` (so it cannot overflow) and exactly 0 where ``cka`` is 0 for a
    zero side. k and l are Gram matrices (positive semi-definite); they are not modified.
    """
    _check_pair(k, l)
    k, l = _promote(k), _promote(l)
    grams = torch.stack([k, l.to(k.dtype)])
    return cka_and_gradient_(grams, centered)


def cka_and_gradient_(grams: Tensor, centered: bool = True) -> tuple[Tensor, Tensor]:
    """``cka_and_gradient(grams[0], grams[1])`` computed in place in ``grams`` (2, ..., n, n).

    The Grams are overwritten and the gradient is returned as a view of ``grams[1]``. A level of
    PCKA has hundreds of small Grams, and every temporary the size of that stack costs a pass
    over memory (on CPU also fresh pages): this makes about five such passes, the textbook
    expression twenty. Specifically:
      * The scale of each Gram is its largest diagonal entry, which for a positive semi-definite
        matrix is its largest |entry| (Cauchy-Schwarz), so no pass is needed to find it.
      * <K, K>, <K, L> and <L, L> come from one batched 2 x 2 product of the flattened pair.
      * ``H (.) H`` of the gradient is left out: L~ and K~ are already centred, so it changes
        only rounding.
      * A degenerate pair gets exactly zero gradient through zero coefficients (the rescaled
        Grams are finite), not through a ``where`` over the matrices.
    """
    if grams.dim() < 3 or grams.shape[0] != 2:
        raise ValueError(f"grams must stack two Grams as (2, ..., n, n); got shape {tuple(grams.shape)}.")
    _check_gram(grams[0], "k")
    with torch.no_grad(), _no_autocast(grams):
        if centered:
            # H K H for symmetric K: subtract the row means, then the column means (the row means
            # transposed) less the grand mean, dividing by the scale in the same pass. The scale,
            # the largest diagonal entry of HKH, comes from K's diagonal and the means alone.
            row_mean = grams.mean(dim=-1, keepdim=True)
            col_term = row_mean.transpose(-1, -2) - row_mean.mean(dim=-2, keepdim=True)
            diagonal = torch.diagonal(grams, dim1=-2, dim2=-1) - row_mean[..., 0] - col_term[..., 0, :]
            scale = _positive_or_one(diagonal.amax(dim=-1))
            grams.sub_(row_mean)
            torch.addcdiv(col_term / -scale[..., None, None], grams, scale[..., None, None], out=grams)
        else:
            scale = _positive_or_one(torch.diagonal(grams, dim1=-2, dim2=-1).amax(dim=-1))
            grams.div_(scale[..., None, None])
        n2 = grams.shape[-1] * grams.shape[-2]
        flat = grams.reshape(2, -1, n2)  # a view: grams is contiguous in its last two dims
        inner = torch.bmm(flat.transpose(0, 1), flat.permute(1, 2, 0))  # (batch, 2, 2)
        squares = inner.diagonal(dim1=-2, dim2=-1)  # <K, K> and <L, L>, (batch, 2)
        # A degenerate pair gets zero coefficients (the factors are finite: the Grams are rescaled).
        defined = (squares >= EPS).all(dim=-1).to(inner.dtype)
        rsqrt = squares.clamp_min(EPS).rsqrt()
        rk_rl = rsqrt.prod(dim=-1) * defined
        value = (inner[:, 0, 1] * rk_rl).reshape(grams.shape[1:-2])
        coef_l = (rk_rl / scale[0].reshape(-1)).reshape(grams.shape[1:-2])
        coef_k = -value * (rsqrt[:, 0].square() / scale[0].reshape(-1)).reshape(grams.shape[1:-2])
        grad = grams[1].mul_(coef_l[..., None, None]).addcmul_(grams[0], coef_k[..., None, None])
    return value, grad


def linear_cka(x: Tensor, y: Tensor, centered: bool = True) -> Tensor:
    """Linear CKA of representations x (..., n, p) and y (..., n, q) of the same n samples.

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` after centring the columns (feature form), which
    equals ``cka(X X^T, Y Y^T)`` (Gram form). We evaluate whichever is cheaper: the feature form
    costs about n(pq + p^2 + q^2) multiply-adds, the Gram form n^2(p + q).
    ``centered=False`` reproduces the paper's released code (no centring).
    """
    _check_representation(x, "x")
    _check_representation(y, "y")
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"x and y must describe the same samples: shapes (..., n, p) and (..., n, q) with equal "
            f"leading dims and n; got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    x, y = _promote(x), _promote(y)
    if x.dtype != y.dtype:
        x, y = x.double(), y.double()
    n, p, q = x.shape[-2], x.shape[-1], y.shape[-1]
    if n * (p * q + p * p + q * q) >= n * n * (p + q):
        # Gram form: rescale the n x n Gram matrices, not the (much larger) n x p features.
        if centered:
            # Before the product, subtract one sample: that removes any offset exactly (a
            # constant representation becomes exact zeros) and leaves numbers of the data's own
            # spread; ``cka`` then centres the Grams, H (X - 1 x_0^T)(X - 1 x_0^T)^T H = HXX^TH.
            # One pass over X and none in backward, where a full column centring costs three
            # and two; for flattened stage features those passes cost as much as the Gram.
            x, y = _minus_first_sample(x), _minus_first_sample(y)
        return cka(gram_linear(x), gram_linear(y), centered=centered)
    if centered:
        # Before any product: see the module docstring (precision for offset inputs, exact zeros
        # for constant ones).
        x, y = center_columns(x), center_columns(y)
    with _no_autocast(x):
        x, y = _rescale(x), _rescale(y)
        xt, yt = x.transpose(-1, -2), y.transpose(-1, -2)
        cross, a, b = yt @ x, xt @ x, yt @ y
        return _normalised_inner((cross * cross).sum(dim=(-2, -1)), (a * a).sum(dim=(-2, -1)), (b * b).sum(dim=(-2, -1)))
