"""common.losses: PCKA against a per-channel loop, RCKA term by term, KD/DKD against independent formulas, golden values."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.losses import DKDLoss, KDLoss, PCKALoss, RCKALoss

GOLDEN = Path(__file__).parent / "data" / "golden_losses.json"


def np_cka(x, y, centered=True):
    """Textbook linear CKA with the explicit centring matrix (float64)."""
    k, l = x @ x.T, y @ y.T
    if centered:
        h = np.eye(len(x)) - 1.0 / len(x)
        k, l = h @ k @ h, h @ l @ h
    return np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))


def slow_pcka(feats_s, feats_t, p, intra_weight, inter_weight, centered=True):
    """The paper's released algorithm, one channel at a time: resize, cut patches, CKA per channel."""
    total = 0.0
    for fs, ft in zip(feats_s, feats_t):
        b, c, h, w = fs.shape
        size = (-(-h // p) * p, -(-w // p) * p)
        if size != (h, w):
            fs = F.interpolate(fs, size=size, mode="bilinear", align_corners=False)
            ft = F.interpolate(ft, size=size, mode="bilinear", align_corners=False)
        rows, cols = size[0] // p, size[1] // p
        intra, inter = [], []
        for ch in range(c):
            def patches(f):
                m = np.empty((rows * cols, b * p * p))
                for gi in range(rows):
                    for gj in range(cols):
                        m[gi * cols + gj] = f[:, ch, gi * p:(gi + 1) * p, gj * p:(gj + 1) * p].reshape(-1).double().numpy()
                return m
            xs, xt = patches(fs), patches(ft)
            intra.append(1 - np_cka(xs, xt, centered))
            inter.append(1 - np_cka(xs.T, xt.T, centered))
        total += intra_weight * np.mean(intra) + inter_weight * np.mean(inter)
    return total


def fpn_like(gen, batch=2, channels=6, sizes=((20, 30), (10, 15), (5, 8))):
    student = [torch.randn(batch, channels, *s, generator=gen, dtype=torch.float64) for s in sizes]
    teacher = [0.5 * s + torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in student]
    return student, teacher


@pytest.mark.parametrize("centered", [True, False])
def test_pcka_equals_loop_over_channels_reference(centered):
    gen = torch.Generator().manual_seed(0)
    fs, ft = fpn_like(gen)
    loss = PCKALoss(patch_size=4, intra_weight=10.0, inter_weight=2.0, centered=centered)
    expected = slow_pcka(fs, ft, 4, 10.0, 2.0, centered)
    assert loss(feats_s=fs, feats_t=ft).item() == pytest.approx(expected, rel=1e-9)


def test_pcka_accepts_dicts_and_pairs_levels_by_key():
    gen = torch.Generator().manual_seed(1)
    fs, ft = fpn_like(gen)
    names = ["p3", "p4", "p5"]
    loss = PCKALoss(patch_size=4)
    assert loss(feats_s=dict(zip(names, fs)), feats_t=dict(zip(names, ft))).item() == pytest.approx(loss(feats_s=fs, feats_t=ft).item(), rel=1e-12)
    with pytest.raises(ValueError, match="same keys"):
        loss(feats_s=dict(zip(names, fs)), feats_t=dict(zip(["p3", "p5", "p4"], ft)))


def test_pcka_is_zero_for_identical_maps_and_sends_no_gradient_to_teacher():
    gen = torch.Generator().manual_seed(2)
    fs, _ = fpn_like(gen)
    student = [f.clone().requires_grad_() for f in fs]
    teacher = [f.clone().requires_grad_() for f in fs]
    loss = PCKALoss(patch_size=4, inter_weight=1.0)(feats_s=student, feats_t=teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    (loss + sum(s.sum() for s in student)).backward()
    assert all(t.grad is None for t in teacher)


def test_pcka_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    fs, ft = fpn_like(gen, batch=2, channels=2, sizes=((6, 9),))
    fs = [f.requires_grad_() for f in fs]
    assert torch.autograd.gradcheck(lambda a: PCKALoss(patch_size=4, inter_weight=1.0)(feats_s=[a], feats_t=ft), (fs[0],))


def test_pcka_errors_name_the_level_and_the_fix():
    loss = PCKALoss(patch_size=16)
    with pytest.raises(ValueError, match="level 0.*same\n?.*channel count|level 0.*channel"):
        loss(feats_s=[torch.randn(2, 256, 32, 32)], feats_t=[torch.randn(2, 128, 32, 32)])
    with pytest.raises(ValueError, match="different patch grids"):
        loss(feats_s=[torch.randn(2, 8, 64, 64)], feats_t=[torch.randn(2, 8, 32, 32)])
    with pytest.raises(ValueError, match="at least 2"):
        loss(feats_s=[torch.randn(2, 8, 7, 10)], feats_t=[torch.randn(2, 8, 7, 10)])
    for centered in (True, False):  # uncentred too: the message names patches and the level
        with pytest.raises(ValueError, match=r"level 0: a \(7, 10\) map gives 1 patch of 16x16.*at least 2 patches"):
            PCKALoss(patch_size=16, centered=centered)(feats_s=[torch.randn(2, 8, 7, 10)], feats_t=[torch.randn(2, 8, 7, 10)])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        loss(feats_s=[torch.randn(2, 8, 32)], feats_t=[torch.randn(2, 8, 32)])
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        loss(feats_s=[torch.randn(2, 8, 32, 32)] * 2, feats_t=[torch.randn(2, 8, 32, 32)])


def rcka_inputs(seed=0, batch=16, classes=10):
    gen = torch.Generator().manual_seed(seed)
    feats_s = [torch.randn(batch, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(batch, 8, 4, 4, generator=gen, dtype=torch.float64)]
    feats_t = [torch.randn(batch, 16, 8, 8, generator=gen, dtype=torch.float64), torch.randn(batch, 32, 4, 4, generator=gen, dtype=torch.float64)]
    logits_s = torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    logits_t = logits_s + torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    return feats_s, feats_t, logits_s, logits_t


def test_rcka_equals_the_sum_of_its_terms_computed_independently():
    fs, ft, zs, zt = rcka_inputs()
    fcka = sum(1 - np_cka(a.flatten(1).numpy(), b.flatten(1).numpy()) for a, b in zip(fs, ft))
    intra = 1 - np_cka(zs.numpy(), zt.numpy())
    inter = 1 - np_cka(zs.numpy().T, zt.numpy().T)
    loss = RCKALoss(feature_weight=2.0, intra_weight=3.0, inter_weight=5.0)
    assert loss(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt).item() == pytest.approx(2 * fcka + 3 * intra + 5 * inter, rel=1e-10)
    terms = loss.terms(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt)
    assert set(terms) == {"fcka", "lcka_intra", "lcka_inter"}
    assert terms["lcka_inter"].item() == pytest.approx(5 * inter, rel=1e-10)


@pytest.mark.parametrize("only", ["fcka", "lcka_intra", "lcka_inter"])
def test_rcka_with_one_term_switched_on_equals_that_term_alone(only):
    fs, ft, zs, zt = rcka_inputs(1)
    weights = {"fcka": 0.0, "lcka_intra": 0.0, "lcka_inter": 0.0}
    weights[only] = 1.0
    single = RCKALoss(feature_weight=weights["fcka"], intra_weight=weights["lcka_intra"], inter_weight=weights["lcka_inter"])
    full = RCKALoss(1.0, 1.0, 1.0).terms(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt)
    terms = single.terms(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt)
    assert list(terms) == [only]
    assert single(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt).item() == pytest.approx(full[only].item(), rel=1e-12)


def test_lcka_only_needs_no_features():
    _, _, zs, zt = rcka_inputs(2)
    loss = RCKALoss(feature_weight=0.0)
    assert torch.isfinite(loss(logits_s=zs, logits_t=zt))
    with pytest.raises(ValueError, match="no features"):
        RCKALoss(feature_weight=1.0)(feats_s=[], feats_t=[], logits_s=zs, logits_t=zt)


def test_rcka_is_zero_for_identical_teacher_and_student_and_teacher_gets_no_gradient():
    fs, _, zs, _ = rcka_inputs(3)
    student_feats = [f.clone().requires_grad_() for f in fs]
    teacher_logits = zs.clone().requires_grad_()
    loss = RCKALoss()(feats_s=student_feats, feats_t=[f.clone() for f in fs], logits_s=zs.clone().requires_grad_(), logits_t=teacher_logits)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    loss.backward()
    assert teacher_logits.grad is None


def test_rcka_gradients_pass_gradcheck():
    fs, ft, zs, zt = rcka_inputs(4, batch=6, classes=5)
    fs = [f[:, :2, :2, :2].contiguous().requires_grad_() for f in fs]
    ft = [f[:, :3, :2, :2].contiguous() for f in ft]
    zs = zs.requires_grad_()
    fn = lambda a, b, z: RCKALoss(1.0, 2.0, 3.0)(feats_s=[a, b], feats_t=ft, logits_s=z, logits_t=zt)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fs[0], fs[1], zs))


def test_rcka_bad_inputs_are_clear_errors():
    fs, ft, zs, zt = rcka_inputs()
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        RCKALoss()(feats_s=fs, feats_t=ft[:1], logits_s=zs, logits_t=zt)
    with pytest.raises(ValueError, match="logits"):
        RCKALoss()(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt[:, :5])
    with pytest.raises(ValueError, match=">= 0"):
        RCKALoss(feature_weight=-1)


def test_kd_matches_hinton_formula_in_numpy():
    gen = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(8, 10, generator=gen, dtype=torch.float64), torch.randn(8, 10, generator=gen, dtype=torch.float64)
    t = 4.0

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(zs.numpy() / t), softmax(zt.numpy() / t)
    expected = np.sum(pt * (np.log(pt) - np.log(ps))) / 8 * t * t
    assert KDLoss(t)(logits_s=zs, logits_t=zt).item() == pytest.approx(expected, rel=1e-6)
    assert KDLoss(t)(logits_s=zs, logits_t=zs).item() == pytest.approx(0.0, abs=1e-6)


def reference_dkd(zs, zt, target, alpha, beta, t):
    """DKD as published (Zhao et al. 2022, Algorithm 1): masks and a -1000 logit offset."""
    gt = F.one_hot(target, zs.shape[1]).double()
    ps, pt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum() / len(zs) * t**2
    pt2 = F.softmax(zt / t - 1000.0 * gt, 1)
    log_ps2 = F.log_softmax(zs / t - 1000.0 * gt, 1)
    nckd = (pt2 * (torch.log(pt2 + 1e-300) - log_ps2) * (1 - gt)).sum() / len(zs) * t**2
    return alpha * tckd + beta * nckd


def test_dkd_matches_the_published_masked_formulation():
    gen = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(16, 10, generator=gen, dtype=torch.float64) * 3, torch.randn(16, 10, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (16,), generator=gen)
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
    assert loss(logits_s=zs, logits_t=zt, targets=target).item() == pytest.approx(reference_dkd(zs, zt, target, 1.0, 8.0, 4.0).item(), rel=1e-8)
    terms = loss.terms(logits_s=zs, logits_t=zt, targets=target)
    assert set(terms) == {"tckd", "nckd"} and all(v.item() >= 0 for v in terms.values())
    assert loss(logits_s=zs, logits_t=zs, targets=target).item() == pytest.approx(0.0, abs=1e-10)


def test_losses_are_finite_for_extreme_logits():
    zs = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]])
    zt = torch.tensor([[-80.0, 80.0, 0.0], [1e-8, 0.0, 0.0]])
    target = torch.tensor([0, 2])
    for value in (KDLoss()(logits_s=zs, logits_t=zt), DKDLoss()(logits_s=zs, logits_t=zt, targets=target),
                  RCKALoss(feature_weight=0)(logits_s=zs, logits_t=zt)):
        assert torch.isfinite(value)


# ---------------------------------------------------------------- golden values
def golden_inputs():
    rng = np.random.default_rng(2024)
    t = lambda *shape: torch.from_numpy(rng.normal(size=shape)).float()  # noqa: E731
    feats_s, feats_t = [t(8, 4, 8, 8), t(8, 8, 4, 4)], [t(8, 16, 8, 8), t(8, 32, 4, 4)]
    logits_s, logits_t = t(8, 10), t(8, 10)
    target = torch.from_numpy(rng.integers(0, 10, size=8))
    fpn_s, fpn_t = [t(2, 4, 24, 36), t(2, 4, 12, 18)], [t(2, 4, 24, 36), t(2, 4, 12, 18)]
    return feats_s, feats_t, logits_s, logits_t, target, fpn_s, fpn_t


def compute_golden():
    fs, ft, zs, zt, y, ps, pt = golden_inputs()
    return {
        "rcka": RCKALoss()(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt).item(),
        "rcka_uncentered": RCKALoss(centered=False)(feats_s=fs, feats_t=ft, logits_s=zs, logits_t=zt).item(),
        "pcka": PCKALoss(patch_size=8)(feats_s=ps, feats_t=pt).item(),
        "pcka_inter_uncentered": PCKALoss(patch_size=8, intra_weight=0, inter_weight=1, centered=False)(feats_s=ps, feats_t=pt).item(),
        "kd": KDLoss(4.0)(logits_s=zs, logits_t=zt).item(),
        "dkd": DKDLoss(1.0, 8.0, 4.0)(logits_s=zs, logits_t=zt, targets=y).item(),
    }


def test_loss_values_equal_the_stored_golden_values():
    """Refactors must not change the maths. Regenerate only for an intended change:
    RCKA_REGEN_GOLDEN=1 python -m pytest tests/test_losses.py -k golden"""
    values = compute_golden()
    if os.environ.get("RCKA_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(values, indent=2) + "\n")
    stored = json.loads(GOLDEN.read_text())
    assert set(stored) == set(values)
    for name, value in values.items():
        assert value == pytest.approx(stored[name], rel=1e-5, abs=1e-6), name


# ---------------------------------------------------------------- one interface
def test_every_method_builds_a_loss_called_with_the_same_keywords():
    from common.losses import METHODS, build_distillation_loss
    fs, ft, zs, zt = rcka_inputs(7)
    target = torch.randint(0, 10, (16,))
    settings = dict(kd_temperature=4.0, kd_weight=0.9, dkd_alpha=1.0, dkd_beta=8.0, dkd_temperature=4.0, dkd_warmup=20,
                    fcka_weight=1.0, lcka_intra_weight=15.0, lcka_inter_weight=15.0, cka_centered=False)
    expected_terms = {"ce": None, "kd": {"kd"}, "dkd": {"tckd", "nckd"}, "fcka": {"fcka"},
                      "lcka": {"lcka_intra", "lcka_inter"}, "rcka": {"fcka", "lcka_intra", "lcka_inter"}}
    assert set(METHODS) == set(expected_terms)
    for method in METHODS:
        loss = build_distillation_loss(method, settings)
        if expected_terms[method] is None:
            assert loss is None
            continue
        terms = loss.terms(logits_s=zs, logits_t=zt, feats_s=fs, feats_t=ft, targets=target, epoch=3)
        assert set(terms) == expected_terms[method], method
        assert loss.needs_features == (method in ("fcka", "rcka")), method
    with pytest.raises(ValueError, match="unknown method 'crd'"):
        build_distillation_loss("crd", settings)


def test_kd_weight_scales_the_kd_term():
    _, _, zs, zt = rcka_inputs(8)
    assert KDLoss(4.0, weight=0.9)(logits_s=zs, logits_t=zt).item() == pytest.approx(
        0.9 * KDLoss(4.0)(logits_s=zs, logits_t=zt).item(), rel=1e-12)


def test_dkd_ramps_up_linearly_over_its_warmup_epochs():
    _, _, zs, zt = rcka_inputs(9)
    target = torch.randint(0, 10, (16,))
    full = DKDLoss(warmup_epochs=0)(logits_s=zs, logits_t=zt, targets=target).item()
    loss = DKDLoss(warmup_epochs=20)
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
        assert loss(logits_s=zs, logits_t=zt, targets=target, epoch=epoch).item() == pytest.approx(ramp * full, rel=1e-12)


def test_a_loss_says_which_input_it_is_missing():
    _, _, zs, zt = rcka_inputs(10)
    with pytest.raises(ValueError, match="DKDLoss needs targets="):
        DKDLoss()(logits_s=zs, logits_t=zt)
    with pytest.raises(ValueError, match="KDLoss needs logits_t="):
        KDLoss()(logits_s=zs)
