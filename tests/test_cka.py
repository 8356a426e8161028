"""common.cka against independent float64 numpy computations of the textbook formulas, and its known properties."""
import numpy as np
import pytest
import torch

from common.cka import center_columns, center_gram, cka, gram_linear, gram_rbf, hsic, linear_cka, median_bandwidth


# ---------------------------------------------------------------- independent references (numpy, float64)
def np_centering_matrix(n):
    return np.eye(n) - np.ones((n, n)) / n


def np_linear_cka_feature_form(x, y, centered=True):
    if centered:
        x = x - x.mean(0, keepdims=True)
        y = y - y.mean(0, keepdims=True)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_cka_gram_form(k, l, centered=True):
    if centered:
        h = np_centering_matrix(k.shape[0])
        k, l = h @ k @ h, h @ l @ h
    return np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))


def np_hsic_biased(k, l):
    n = k.shape[0]
    h = np_centering_matrix(n)
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def np_hsic_unbiased(k, l):
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    term = np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ kt @ lt @ one)
    return term / (n * (n - 3))


def np_rbf(x, sigma):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------- agreement with the references
@pytest.mark.parametrize("n,p,q", [(20, 5, 7), (16, 300, 40), (200, 3, 4), (8, 64, 64)])
@pytest.mark.parametrize("centered", [True, False])
def test_linear_cka_matches_numpy_feature_and_gram_forms(rng, n, p, q, centered):
    x = rng.normal(size=(n, p)) + rng.normal(size=p)  # non-zero column means, so centring matters
    y = x[:, :1] @ rng.normal(size=(1, q)) + rng.normal(size=(n, q))
    expected_feature = np_linear_cka_feature_form(x, y, centered)
    expected_gram = np_cka_gram_form(x @ x.T, y @ y.T, centered)
    assert expected_feature == pytest.approx(expected_gram, rel=1e-10)
    assert linear_cka(t64(x), t64(y), centered=centered).item() == pytest.approx(expected_feature, rel=1e-10)
    assert cka(gram_linear(t64(x)), gram_linear(t64(y)), centered=centered).item() == pytest.approx(expected_gram, rel=1e-10)


def test_linear_cka_in_float32_matches_float64(rng):
    x, y = rng.normal(size=(64, 500)), rng.normal(size=(64, 30))
    expected = np_linear_cka_feature_form(x, y)
    got = linear_cka(t64(x).float(), t64(y).float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_centering_uncentred_and_centred_differ_for_offset_logits(rng):
    # The reference README's example: a shared offset inflates the uncentred similarity.
    base = rng.normal(size=(32, 10))
    x, y = base + 5.0, rng.normal(size=(32, 10)) + 5.0
    assert linear_cka(t64(x), t64(y), centered=False) > linear_cka(t64(x), t64(y), centered=True) + 0.3


def test_center_gram_equals_hkh(rng):
    k = rng.normal(size=(9, 9))
    k = k + k.T
    h = np_centering_matrix(9)
    np.testing.assert_allclose(center_gram(t64(k)).numpy(), h @ k @ h, atol=1e-12)


def test_hsic_biased_and_unbiased_match_numpy(rng):
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 6))
    k, l = x @ x.T, np_rbf(y, 1.3)
    assert hsic(t64(k), t64(l)).item() == pytest.approx(np_hsic_biased(k, l), rel=1e-10)
    assert hsic(t64(k), t64(l), unbiased=True).item() == pytest.approx(np_hsic_unbiased(k, l), rel=1e-10)


def test_gram_rbf_matches_numpy_and_median_heuristic(rng):
    x = rng.normal(size=(15, 3))
    np.testing.assert_allclose(gram_rbf(t64(x), sigma=0.7).numpy(), np_rbf(x, 0.7), atol=1e-12)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    sigma = np.sqrt(np.median(d2[~np.eye(15, dtype=bool)]))
    assert median_bandwidth(t64(x)).item() == pytest.approx(sigma, rel=1e-10)
    np.testing.assert_allclose(gram_rbf(t64(x)).numpy(), np_rbf(x, sigma), atol=1e-12)


def test_unbiased_cka_matches_numpy(rng):
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 8))
    k, l = x @ x.T, y @ y.T
    expected = np_hsic_unbiased(k, l) / np.sqrt(np_hsic_unbiased(k, k) * np_hsic_unbiased(l, l))
    assert cka(t64(k), t64(l), unbiased=True).item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- properties
def test_cka_of_a_representation_with_itself_is_one(rng):
    x = t64(rng.normal(size=(25, 13)))
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert cka(gram_rbf(x), gram_rbf(x)).item() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transform_and_isotropic_scaling(rng):
    x, y = rng.normal(size=(40, 10)), rng.normal(size=(40, 6))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base = linear_cka(t64(x), t64(y)).item()
    assert linear_cka(t64(x @ q), t64(y)).item() == pytest.approx(base, rel=1e-10)
    assert linear_cka(t64(3.7 * x), t64(0.01 * y)).item() == pytest.approx(base, rel=1e-10)
    # RBF CKA with the median heuristic is scale invariant too (the bandwidth scales along).
    assert cka(gram_rbf(t64(5 * x)), gram_rbf(t64(y))).item() == pytest.approx(
        cka(gram_rbf(t64(x)), gram_rbf(t64(y))).item(), rel=1e-10
    )


def test_cka_is_not_invariant_to_arbitrary_invertible_linear_maps(rng):
    # With n > p an invertible but non-orthogonal map changes CKA (Kornblith et al. 2019, Sec. 3).
    x = rng.normal(size=(50, 5))
    y = x + 0.1 * rng.normal(size=(50, 5))
    a = np.diag([100.0, 1.0, 1.0, 1.0, 0.01]) @ rng.normal(size=(5, 5))
    assert abs(np.linalg.det(a)) > 1e-6
    assert linear_cka(t64(x), t64(y)).item() > 0.95
    assert linear_cka(t64(x), t64(y)).item() - linear_cka(t64(x @ a), t64(y)).item() > 0.1


def test_cka_values_lie_in_unit_interval(rng):
    for _ in range(20):
        n = rng.integers(3, 30)
        x, y = rng.normal(size=(n, rng.integers(1, 20))), rng.normal(size=(n, rng.integers(1, 20)))
        for centered in (True, False):
            v = linear_cka(t64(x), t64(y), centered=centered).item()
            assert -1e-12 <= v <= 1 + 1e-12


def test_rbf_cka_tends_to_linear_cka_as_sigma_grows(rng):
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 6)) + np.linspace(0, 3, 30)[:, None]
    lin = linear_cka(t64(x), t64(y)).item()
    gaps = []
    for factor in (1.0, 10.0, 1000.0):
        sx, sy = factor * median_bandwidth(t64(x)), factor * median_bandwidth(t64(y))
        gaps.append(abs(cka(gram_rbf(t64(x), sx), gram_rbf(t64(y), sy)).item() - lin))
    assert gaps[2] < 1e-5
    assert gaps[0] > gaps[1] > gaps[2]


def test_unbiased_hsic_is_unbiased_over_many_draws():
    # Linear kernel: the population HSIC is ||Cov(x, y)||_F^2. For y = x A + noise with
    # x ~ N(0, I), Cov(x, y) = A. Average the estimator over many independent samples of n = 8.
    gen = torch.Generator().manual_seed(0)
    draws, n, p, q = 40000, 8, 3, 2
    a = torch.tensor([[1.0, 0.5], [0.0, -1.0], [0.3, 0.2]], dtype=torch.float64)
    x = torch.randn(draws, n, p, generator=gen, dtype=torch.float64)
    y = x @ a + torch.randn(draws, n, q, generator=gen, dtype=torch.float64)
    k, l = gram_linear(x), gram_linear(y)
    truth = (a * a).sum().item()
    unbiased = hsic(k, l, unbiased=True)
    stderr = unbiased.std().item() / np.sqrt(draws)
    assert abs(unbiased.mean().item() - truth) < 4 * stderr
    # The biased estimator is off by far more than its standard error at this n.
    biased = hsic(k, l)
    assert abs(biased.mean().item() - truth) > 10 * biased.std().item() / np.sqrt(draws)


def test_batched_equals_looped(rng):
    x, y = t64(rng.normal(size=(3, 4, 10, 7))), t64(rng.normal(size=(3, 4, 10, 5)))
    batched = linear_cka(x, y)
    assert batched.shape == (3, 4)
    k, l = gram_linear(x), gram_rbf(y)
    batched_gram = cka(k, l)
    batched_hsic = hsic(k, l, unbiased=True)
    for i in range(3):
        for j in range(4):
            assert batched[i, j].item() == pytest.approx(linear_cka(x[i, j], y[i, j]).item(), rel=1e-12)
            assert batched_gram[i, j].item() == pytest.approx(cka(k[i, j], l[i, j]).item(), rel=1e-12)
            assert batched_hsic[i, j].item() == pytest.approx(hsic(k[i, j], l[i, j], unbiased=True).item(), rel=1e-12)
    # The bandwidth is chosen per batch element too.
    assert torch.allclose(gram_rbf(y)[1, 2], gram_rbf(y[1, 2]))


@pytest.mark.parametrize("n,p,q", [(6, 3, 4), (5, 20, 30)])  # exercises the feature and the Gram path
@pytest.mark.parametrize("centered", [True, False])
def test_linear_cka_gradients_pass_gradcheck(rng, n, p, q, centered):
    x = t64(rng.normal(size=(n, p))).requires_grad_()
    y = t64(rng.normal(size=(n, q))).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cka(a, b, centered=centered), (x, y))


def test_gram_cka_hsic_and_rbf_gradients_pass_gradcheck(rng):
    x = t64(rng.normal(size=(6, 3))).requires_grad_()
    y = t64(rng.normal(size=(6, 2))).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cka(gram_rbf(a, 1.5), gram_linear(b)), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: cka(gram_linear(a), gram_linear(b), unbiased=True), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: hsic(gram_linear(a), gram_linear(b), unbiased=True), (x, y))


def test_constant_representation_gives_zero_with_zero_gradient_not_nan():
    x = torch.ones(8, 5, requires_grad=True)
    y = torch.randn(8, 3)
    value = linear_cka(x, y)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    k = torch.ones(8, 8, requires_grad=True)
    v = cka(k, gram_linear(y))
    v.backward()
    assert v.item() == 0.0 and torch.isfinite(k.grad).all()


def test_large_float32_features_do_not_overflow(rng):
    # Flattened stage features with large activations: ||K||_F^2 would overflow float32 unscaled.
    x, y = rng.normal(size=(64, 16384)) * 1e4, rng.normal(size=(64, 4096)) * 1e4
    expected = np_cka_gram_form(x @ x.T, y @ y.T)
    got = linear_cka(t64(x).float(), t64(y).float())
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- hard inputs: offsets, constants
def offset_pair(rng, n, p, q):
    x = rng.normal(size=(n, p))
    y = x[:, : min(p, q)] @ rng.normal(size=(min(p, q), q)) + rng.normal(size=(n, q))
    return x, y


@pytest.mark.parametrize(
    "precision,offset",
    [("float32", 1e2), ("float32", 1e4), ("float32 under bf16 autocast", 1e2), ("float32 under bf16 autocast", 1e4),
     # bf16 spaces numbers near 1e4 by 64, so std-1 data would round to a constant there.
     ("bf16 under bf16 autocast", 1e2)],
)
@pytest.mark.parametrize("n,p,q", [(64, 1000, 100), (64, 20, 10)])  # the Gram and the feature path
@pytest.mark.parametrize("centered", [True, False])
def test_cka_of_offset_inputs_matches_float64(rng, offset, n, p, q, centered, precision):
    # Logits and post-ReLU features are not zero-mean. Columns offset by 1e4 with std 1 made the
    # Gram path return -0.06 for a true 0.74 when it centred X X^T after forming it.
    x, y = offset_pair(rng, n, p, q)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    xf, yf = t64(x + offset).to(dtype), t64(y + offset * np.linspace(0.5, 2, q)).to(dtype)
    # The reference sees the same rounded inputs: only the computation's error is measured.
    expected = np_linear_cka_feature_form(xf.double().numpy(), yf.double().numpy(), centered)
    if precision.endswith("autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear_cka(xf, yf, centered=centered)
    else:
        got = linear_cka(xf, yf, centered=centered)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("offset", [1e2, 1e4])
def test_gram_of_centred_columns_is_accurate_for_offset_inputs(rng, offset):
    x, y = offset_pair(rng, 32, 500, 50)
    xf, yf = t64(x + offset).float(), t64(y - offset).float()
    expected = np_cka_gram_form(*(a.double().numpy() @ a.double().numpy().T for a in (xf, yf)))
    got = cka(gram_linear(center_columns(xf)), gram_linear(center_columns(yf)))
    assert got.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("offset", [1e2, 1e4])
def test_rbf_kernels_of_offset_inputs_match_float64(rng, offset):
    x = rng.normal(size=(19, 8))  # n(n-1)/2 odd: one middle distance, no averaging
    xf = t64(x + offset).float()
    x64 = xf.double().numpy()
    d2 = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    sigma = np.sqrt(np.median(d2[~np.eye(19, dtype=bool)]))
    assert median_bandwidth(xf).item() == pytest.approx(sigma, rel=1e-4)
    np.testing.assert_allclose(gram_rbf(xf, sigma=1.5).double().numpy(), np_rbf(x64, 1.5), atol=1e-5)
    np.testing.assert_allclose(gram_rbf(xf).double().numpy(), np_rbf(x64, sigma), atol=1e-5)
    y = t64(rng.normal(size=(19, 3)))
    expected = np_cka_gram_form(np_rbf(x64, sigma), np_rbf(y.numpy(), median_bandwidth(y).item()))
    assert cka(gram_rbf(xf), gram_rbf(y.float())).item() == pytest.approx(expected, abs=1e-4)


def test_center_columns_subtracts_the_mean_and_zeroes_constant_columns_exactly(rng):
    x = rng.normal(size=(9, 4)) + 1e3
    x[:, 2] = 0.1  # constant: its float32 mean is not exactly 0.1, a naive x - mean leaves rounding
    x32 = t64(x).float()
    got = center_columns(x32)
    x64 = x32.double().numpy()
    np.testing.assert_allclose(got.double().numpy(), x64 - x64.mean(0), atol=1e-5)
    assert torch.equal(got[:, 2], torch.zeros(9))


@pytest.mark.parametrize("n,p", [(8, 5), (64, 1000), (16, 3)])
def test_constant_representation_has_exactly_zero_value_and_gradient_in_float32(rng, n, p):
    # Every sample the same (values differ across features): no defined CKA. Before, the
    # rounding left by centring was rescaled to O(1) and leaked a gradient of ~1e-2.
    x = (torch.ones(n, 1) * t64(rng.normal(size=(1, p))).float()).requires_grad_()
    y = t64(rng.normal(size=(n, 50))).float().requires_grad_()
    value = linear_cka(x, y)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))
    # The same through the RBF kernel: all distances are exactly 0, the centred Gram exactly 0.
    x.grad = y.grad = None
    value = cka(gram_rbf(x, sigma=1.0), gram_rbf(y))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))


@pytest.mark.parametrize("n,p", [(8, 5), (64, 1000)])
def test_uncentred_cka_of_an_all_zero_input_is_zero_with_zero_gradient(rng, n, p):
    x = torch.zeros(n, p, requires_grad=True)
    y = t64(rng.normal(size=(n, 50))).float().requires_grad_()
    value = linear_cka(x, y, centered=False)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))


def test_uncentred_cka_of_a_nonzero_constant_input_is_the_cosine_of_the_grams(rng):
    # Uncentred, a constant representation is not degenerate: its Gram is c 11^T.
    x, y = np.full((10, 4), 3.0), rng.normal(size=(10, 6)) + 2.0
    expected = np_cka_gram_form(x @ x.T, y @ y.T, centered=False)
    assert linear_cka(t64(x).float(), t64(y).float(), centered=False).item() == pytest.approx(expected, abs=1e-6)


def test_autocast_inputs_are_computed_in_float32(rng):
    x, y = rng.normal(size=(32, 64)), rng.normal(size=(32, 16))
    expected = np_linear_cka_feature_form(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cka(t64(x).bfloat16(), t64(y).bfloat16())
        got_gram = cka(gram_linear(t64(x).float()), gram_linear(t64(y).float()))
    assert got.dtype == torch.float32 and got_gram.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=2e-2)  # bf16 inputs carry ~3 significant digits
    assert got_gram.item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- errors
def test_fewer_than_two_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        cka(torch.ones(1, 1), torch.ones(1, 1))


def test_cka_and_gradient_of_huge_grams_is_finite_and_exact(rng):
    # Entries ~1e28: their squares overflow float32. Each Gram is scaled by its largest diagonal
    # entry (for a PSD matrix, its largest |entry|) before any product.
    from common.cka import cka_and_gradient

    x, y = t64(rng.normal(size=(4, 7, 5))), t64(rng.normal(size=(4, 7, 3)) + 1.0)
    k, l = gram_linear(x), gram_linear(y)
    for centered in (True, False):
        k64 = k.clone().requires_grad_()
        expected = cka(k64, l, centered=centered)
        (grad_expected,) = torch.autograd.grad(expected.sum(), k64)
        value, grad = cka_and_gradient((k * 1e28).float(), (l * 1e27).float(), centered)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double() * 1e28, grad_expected, rtol=1e-4, atol=1e-6)


def test_cka_and_gradient_in_place_overwrites_the_stack_and_leaves_the_inputs(rng):
    from common.cka import cka_and_gradient, cka_and_gradient_

    k, l = gram_linear(t64(rng.normal(size=(3, 6, 4)))), gram_linear(t64(rng.normal(size=(3, 6, 2))))
    k_before, l_before = k.clone(), l.clone()
    value, grad = cka_and_gradient(k, l, True)
    assert torch.equal(k, k_before) and torch.equal(l, l_before)
    grams = torch.stack([k, l])
    value_, grad_ = cka_and_gradient_(grams, True)
    assert grad_.data_ptr() == grams[1].data_ptr()
    torch.testing.assert_close(value_, value, rtol=0, atol=0)
    torch.testing.assert_close(grad_, grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(2, \.\.\., n, n\)"):
        cka_and_gradient_(torch.zeros(3, 4, 4))


def test_mismatched_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(torch.randn(5, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="same shape"):
        cka(torch.eye(4), torch.eye(5))
    with pytest.raises(ValueError, match="square"):
        hsic(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., n, p\)"):
        linear_cka(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="n >= 4"):
        hsic(torch.eye(3), torch.eye(3), unbiased=True)


@pytest.mark.parametrize("centered", [True, False])
def test_cka_and_gradient_equals_cka_and_its_autograd_gradient(rng, centered):
    from common.cka import cka_and_gradient

    x, y = t64(rng.normal(size=(3, 9, 5)) + 2.0), t64(rng.normal(size=(3, 9, 4)))
    k, l = gram_linear(x).requires_grad_(), gram_linear(y)
    value = cka(k, l, centered=centered)
    (grad,) = torch.autograd.grad(value.sum(), k)
    got_value, got_grad = cka_and_gradient(k.detach(), l, centered)
    torch.testing.assert_close(got_value, value.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, grad, rtol=1e-10, atol=1e-14)
    # A zero side: value 0 and gradient exactly 0, as cka.
    zero_value, zero_grad = cka_and_gradient(torch.zeros_like(k.detach()), l, centered)
    assert torch.equal(zero_value, torch.zeros(3, dtype=torch.float64)) and torch.equal(zero_grad, torch.zeros_like(zero_grad))
