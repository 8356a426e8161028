"""common.mmd against numpy, and the CKA <-> MMD identity and bound of its docstring."""
import numpy as np
import pytest
import torch

from common.cka import cka, gram_linear, gram_rbf, linear_cka
from common.mmd import gram_distance2, gram_mmd2, mmd2, unit_gram


def np_mmd2(x, y, kernel, unbiased, sigma=None):
    def k(a, b):
        if kernel == "linear":
            return a @ b.T
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    if unbiased:
        return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


@pytest.fixture
def rng():
    return np.random.default_rng(1)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd2_matches_numpy(rng, kernel, unbiased):
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
    got = mmd2(torch.from_numpy(x), torch.from_numpy(y), kernel=kernel, unbiased=unbiased, sigma=1.7)
    assert got.item() == pytest.approx(np_mmd2(x, y, kernel, unbiased, 1.7), rel=1e-10)


def test_biased_linear_mmd2_is_squared_distance_of_means(rng):
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(30, 4)) + 1.0
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2)
    assert mmd2(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(expected, rel=1e-10)


def test_mmd2_of_identical_samples_is_zero_and_rbf_median_default_runs(rng):
    x = torch.from_numpy(rng.normal(size=(10, 3)))
    assert mmd2(x, x, kernel="rbf").item() == pytest.approx(0.0, abs=1e-12)
    assert mmd2(x, x + 3.0, kernel="rbf").item() > 0.1


def test_unbiased_mmd2_is_unbiased_for_equal_distributions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 5, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(20000, 5, 2, generator=gen, dtype=torch.float64)
    est = mmd2(x, y, kernel="rbf", unbiased=True, sigma=1.0)
    assert abs(est.mean().item()) < 4 * est.std().item() / np.sqrt(len(est))
    assert mmd2(x, y, kernel="rbf", sigma=1.0).mean().item() > 0.05  # the biased one is not


@pytest.mark.parametrize("centered", [True, False])
def test_cka_equals_one_minus_half_squared_distance_of_unit_grams(rng, centered):
    for _ in range(10):
        x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 7)) + rng.normal(size=(15, 1))
        k, l = gram_linear(torch.from_numpy(x)), gram_rbf(torch.from_numpy(y))
        assert cka(k, l, centered=centered).item() == pytest.approx(
            1 - 0.5 * gram_distance2(k, l, centered=centered).item(), abs=1e-12
        )


def test_gram_discrepancy_bounds_the_mean_embedding_mmd(rng):
    worst = 0.0
    for trial in range(200):
        n = int(rng.integers(3, 40))
        x = rng.normal(size=(n, int(rng.integers(1, 10)))) + rng.normal() * 3
        # Adversarial mixes: nearly aligned, unrelated, and sign-flipped representations.
        y = [x + 0.01 * rng.normal(size=x.shape), rng.normal(size=(n, 5)), -x * rng.uniform(0.1, 10)][trial % 3]
        k, l = gram_linear(torch.from_numpy(x)), gram_linear(torch.from_numpy(y))
        lhs = gram_mmd2(k, l).item()
        rhs = gram_distance2(k, l, centered=False).item() / n
        assert rhs == pytest.approx(2 * (1 - cka(k, l, centered=False).item()) / n, abs=1e-12)
        assert lhs <= rhs + 1e-12
        worst = max(worst, lhs / rhs if rhs > 0 else 0)
        # The mean-embedding norms differ by at most ||K^ - L^||_F / n.
        kh, lh = unit_gram(k, centered=False), unit_gram(l, centered=False)
        assert abs((kh.sum() - lh.sum()).item()) / n**2 <= np.sqrt(rhs * n) / n + 1e-12
    assert worst > 0.1  # the bound is not vacuous on these inputs


def test_centred_gram_rows_have_zero_mean_embedding(rng):
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))
    k, l = gram_linear(torch.from_numpy(x)), gram_linear(torch.from_numpy(y))
    assert gram_mmd2(k, l, centered=True).item() == pytest.approx(0.0, abs=1e-20)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(cka(k, l).item(), rel=1e-10)


def test_mmd_errors_are_clear():
    with pytest.raises(ValueError, match="unknown kernel"):
        mmd2(torch.randn(3, 2), torch.randn(3, 2), kernel="poly")
    with pytest.raises(ValueError, match="same d"):
        mmd2(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="constant representation"):
        unit_gram(torch.ones(4, 4))
