"""common.cka_accumulate (minibatch CKA over all layer pairs) against full-batch CKA and float64 numpy references."""
import numpy as np
import pytest
import torch

from common.cka import cka, gram_linear
from common.cka_accumulate import MinibatchCKA
from test_cka import np_hsic_unbiased  # the float64 textbook reference of Song et al. (2012), eq. 5


def layers(n, seed=0, dtype=torch.float64):
    """Four 'layers' of different shapes over the same n samples, related to each other but not identical."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    mix = lambda q: x @ torch.randn(6, q, generator=g, dtype=torch.float64)  # noqa: E731
    noise = lambda *shape: torch.randn(n, *shape, generator=g, dtype=torch.float64)  # noqa: E731
    out = [x, mix(12) + noise(12), (mix(2 * 3 * 3) + 2 * noise(18)).relu().reshape(n, 2, 3, 3), mix(5) ** 2 + 3.0]
    return [t.to(dtype) for t in out]


def accumulate(rows, cols, batch_size):
    acc = MinibatchCKA(len(rows), len(cols))
    for start in range(0, rows[0].shape[0], batch_size):
        acc.update([t[start:start + batch_size] for t in rows], [t[start:start + batch_size] for t in cols])
    return acc


def full_batch_unbiased_cka(a, b):
    flat = lambda t: t.reshape(t.shape[0], -1).double()  # noqa: E731
    return cka(gram_linear(flat(a)), gram_linear(flat(b)), unbiased=True).item()


def np_minibatch_cka(a, b, batch_size):
    """Nguyen et al. (2021), Sec. 3.1, from the textbook unbiased HSIC in float64 numpy: means over minibatches."""
    a, b = (t.reshape(t.shape[0], -1).double().numpy() for t in (a, b))
    terms = []
    for start in range(0, len(a), batch_size):
        x, y = a[start:start + batch_size], b[start:start + batch_size]
        k, l = x @ x.T, y @ y.T
        terms.append([np_hsic_unbiased(k, l), np_hsic_unbiased(k, k), np_hsic_unbiased(l, l)])
    kl, kk, ll = np.mean(terms, axis=0)
    return kl / np.sqrt(kk * ll)


def test_one_minibatch_of_all_samples_equals_full_batch_unbiased_cka():
    rows, cols = layers(40, seed=1), layers(40, seed=2)[1:]
    matrix = accumulate(rows, cols, batch_size=40).compute()
    expected = torch.tensor([[full_batch_unbiased_cka(a, b) for b in cols] for a in rows], dtype=torch.float64)
    assert matrix.shape == (4, 3)
    torch.testing.assert_close(matrix, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [4, 7, 25])
def test_minibatches_match_float64_numpy_reference(batch_size):
    # float32 features with a large mean (+3 in the last layer): the accumulator centres them and works in
    # float64, so it matches the float64 reference on the same float32 values closely.
    rows, cols = layers(100, seed=3, dtype=torch.float32), layers(100, seed=4, dtype=torch.float32)
    n_used = 100 - 100 % batch_size if 100 % batch_size < 4 else 100
    rows, cols = [t[:n_used] for t in rows], [t[:n_used] for t in cols]
    matrix = accumulate(rows, cols, batch_size).compute().numpy()
    expected = np.array([[np_minibatch_cka(a, b, batch_size) for b in cols] for a in rows])
    np.testing.assert_allclose(matrix, expected, rtol=1e-9, atol=1e-12)


def test_minibatch_estimate_agrees_with_full_batch_cka_on_many_samples():
    # Both estimate the same population CKA; with 2000 samples they agree to a few hundredths.
    rows, cols = layers(2000, seed=5), layers(2000, seed=5)
    noise = torch.randn(cols[1].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cols = [cols[1] + 2 * noise, cols[3]]
    matrix = accumulate(rows, cols, batch_size=100).compute()
    expected = torch.tensor([[full_batch_unbiased_cka(a, b) for b in cols] for a in rows], dtype=torch.float64)
    assert (matrix - expected).abs().max() < 0.03, (matrix, expected)
    assert matrix.min() < 0.9  # the comparison is not trivially between identical layers


def test_layer_against_itself_gives_one_and_the_matrix_is_symmetric():
    rows = layers(60, seed=6)
    matrix = accumulate(rows, rows, batch_size=20).compute()
    torch.testing.assert_close(matrix.diagonal(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-12)
    assert (matrix < 1 - 1e-3).sum() == 12  # off the diagonal, the layers differ


def test_layer_against_orthogonally_rotated_copy_gives_one():
    x = layers(60, seed=7)[1]
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    matrix = accumulate([x], [x @ q, 5.0 * (x @ q) + 1.0], batch_size=15).compute()
    torch.testing.assert_close(matrix, torch.ones(1, 2, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_cka_is_invariant_to_isotropic_scaling(scale):
    rows, cols = layers(48, seed=8), layers(48, seed=9)
    reference = accumulate(rows, cols, batch_size=16).compute()
    scaled = accumulate([scale * t for t in rows], cols, batch_size=16).compute()
    torch.testing.assert_close(scaled, reference, rtol=1e-10, atol=1e-12)


def test_constant_layer_gives_zero_and_is_reported():
    rows = layers(24, seed=10)
    constant = torch.full((24, 8), 7.3, dtype=torch.float64)
    acc = accumulate([rows[0], constant], [rows[1], torch.zeros(24, 3, dtype=torch.float64)], batch_size=8)
    matrix = acc.compute()
    assert torch.isfinite(matrix).all()
    assert matrix[1].abs().max() == 0 and matrix[:, 1].abs().max() == 0 and matrix[0, 0] > 0.1
    assert acc.degenerate() == ([1], [1])


def test_state_does_not_grow_with_the_number_of_samples():
    rows, cols = layers(400, seed=11), layers(400, seed=12)[:2]
    few, many = accumulate([t[:40] for t in rows], [t[:40] for t in cols], 20), accumulate(rows, cols, 20)
    state = lambda acc: sorted(t.numel() for t in [acc._cross, *acc._self, *acc._varying])  # noqa: E731
    assert state(few) == state(many) == sorted([4 * 2, 4, 2, 4 * 2, 2 * 2])
    assert (many.num_batches, many.num_samples) == (20, 400)


def test_minibatch_of_fewer_than_four_samples_is_an_error():
    acc = MinibatchCKA(1, 1)
    with pytest.raises(ValueError, match="at least 4 samples, got 3.*merge_short_batches"):
        acc.update([torch.randn(3, 5)], [torch.randn(3, 5)])


def test_mismatched_inputs_are_errors():
    acc = MinibatchCKA(2, 1)
    with pytest.raises(ValueError, match="expected 2 row and 1 column layers"):
        acc.update([torch.randn(8, 5)], [torch.randn(8, 5)])
    with pytest.raises(ValueError, match="same samples.*\\[8, 9\\]"):
        acc.update([torch.randn(8, 5), torch.randn(9, 5)], [torch.randn(8, 5)])
    with pytest.raises(RuntimeError, match="no minibatch"):
        acc.compute()
