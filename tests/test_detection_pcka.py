"""The tensor side of detection distillation (coco_detection/distill.py): runs everywhere, without detectron2."""
import pytest
import torch

from coco_detection.distill import (
    DEFAULTS,
    DistillError,
    FPNDistillLoss,
    dense_kd_loss,
    method_name,
    plan_levels,
    resolve_inter_weight,
    select_levels,
)

RETINANET_FPN = {"p3": (256, 8), "p4": (256, 16), "p5": (256, 32), "p6": (256, 64), "p7": (256, 128)}
RCNN_FPN = {"p2": (256, 4), "p3": (256, 8), "p4": (256, 16), "p5": (256, 32), "p6": (256, 64)}


def fpn_maps(levels, batch=2, channels=8, size=64, seed=0):
    """FPN-like maps: halving sizes per level, as for a 32 x 32 input at strides 1, 2, 4, ..."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, channels, size >> i, size >> i, generator=g) for i, name in enumerate(levels)}


def test_defaults_are_the_released_codes_values():
    pcka = DEFAULTS["MODEL.PCKA"]
    assert (pcka["NUM_LEVELS"], pcka["PATCH_SIZE"], pcka["INTRA_WEIGHT"], pcka["CENTERED"]) == (4, 16, 10.0, False)
    assert pcka["IN_FEATURES"] == [] and pcka["INTER_WEIGHT"] < 0  # first four levels; inter term by detector kind
    distill = DEFAULTS["MODEL.DISTILL"]
    assert distill["MIMIC_WEIGHT"] == 0.0 and distill["KD_WEIGHT"] == 0.0 and distill["ADAPTER"] is False


def test_default_levels_are_the_first_four_in_stride_order():
    assert select_levels(list(RETINANET_FPN), [], 4) == ["p3", "p4", "p5", "p6"]
    assert select_levels(list(RCNN_FPN), [], 4) == ["p2", "p3", "p4", "p5"]
    assert select_levels(list(RCNN_FPN), ["p5", "p3"], 4) == ["p5", "p3"]


def test_unknown_or_too_many_levels_are_refused_with_the_available_names():
    with pytest.raises(DistillError, match=r"\['p2'\].*p3"):
        select_levels(list(RETINANET_FPN), ["p2"], 4)
    with pytest.raises(DistillError, match="only 5 outputs"):
        select_levels(list(RETINANET_FPN), [], 6)


def test_inter_term_is_on_for_two_stage_only_unless_set():
    assert resolve_inter_weight(-1.0, 10.0, two_stage=True) == 10.0
    assert resolve_inter_weight(-1.0, 10.0, two_stage=False) == 0.0
    assert resolve_inter_weight(3.0, 10.0, two_stage=False) == 3.0


def test_method_names_follow_table3_rows():
    assert method_name(10, 0, 0, 0) == "pcka"
    assert method_name(10, 10, 1, 0) == "pcka+mimic"
    assert method_name(0, 0, 0, 1) == "kd"
    assert method_name(0, 0, 0, 0) == "distill-none"


def test_channel_mismatch_is_an_error_that_names_the_adapter_switch():
    teacher = {name: (512, stride) for name, (_, stride) in RETINANET_FPN.items()}
    with pytest.raises(DistillError, match="MODEL.DISTILL.ADAPTER"):
        plan_levels(RETINANET_FPN, teacher)
    levels, adapt = plan_levels(RETINANET_FPN, teacher, adapter=True)
    assert levels == ["p3", "p4", "p5", "p6"] and adapt == {name: (256, 512) for name in levels}


def test_stride_mismatch_and_missing_teacher_level_are_errors():
    with pytest.raises(DistillError, match="stride"):
        plan_levels(RCNN_FPN, {name: (256, stride * 2) for name, (_, stride) in RCNN_FPN.items()})
    with pytest.raises(DistillError, match="no level"):
        plan_levels(RCNN_FPN, RETINANET_FPN)  # the teacher's FPN starts at p3


def test_pcka_on_fpn_maps_is_finite_zero_for_identical_maps_and_trains_the_student_only():
    levels = ["p3", "p4", "p5", "p6"]
    loss = FPNDistillLoss(levels, patch_size=4, intra_weight=10.0, inter_weight=10.0, centered=False)
    teacher = fpn_maps(levels, seed=1)
    assert loss.terms(teacher, teacher)["loss_pcka"].item() == pytest.approx(0.0, abs=1e-5)
    student = {k: v.clone().requires_grad_(True) for k, v in fpn_maps(levels, seed=2).items()}
    teacher = {k: v.requires_grad_(True) for k, v in teacher.items()}
    terms = loss.terms(student, teacher)
    assert set(terms) == {"loss_pcka"} and torch.isfinite(terms["loss_pcka"]) and terms["loss_pcka"] > 0
    terms["loss_pcka"].backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in student.values())
    assert all(v.grad is None for v in teacher.values())


def test_pcka_decreases_when_the_student_maps_are_optimised():
    levels = ["p3", "p4"]
    loss = FPNDistillLoss(levels, patch_size=4, intra_weight=10.0)
    teacher = fpn_maps(levels, seed=1)
    student = {k: v.clone().requires_grad_(True) for k, v in fpn_maps(levels, seed=2).items()}
    optimizer = torch.optim.Adam(student.values(), lr=0.05)
    values = []
    for _ in range(30):
        value = loss.terms(student, teacher)["loss_pcka"]
        values.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert values[-1] < 0.5 * values[0]


def test_mimic_is_the_mean_squared_error_averaged_over_levels():
    levels = ["p3", "p4"]
    loss = FPNDistillLoss(levels, intra_weight=0.0, mimic_weight=2.0)
    s, t = fpn_maps(levels, seed=1), fpn_maps(levels, seed=2)
    expected = 2.0 * sum(((s[n] - t[n]) ** 2).mean() for n in levels) / len(levels)
    terms = loss.terms(s, t)
    assert set(terms) == {"loss_mimic"}
    assert terms["loss_mimic"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_single_patch_level_adds_nothing_and_all_single_patch_levels_are_an_error():
    loss = FPNDistillLoss(["p5", "p6"], patch_size=16)
    s = {"p5": torch.randn(2, 8, 32, 32), "p6": torch.randn(2, 8, 8, 8)}
    t = {"p5": torch.randn(2, 8, 32, 32), "p6": torch.randn(2, 8, 8, 8)}
    only_p5 = FPNDistillLoss(["p5"], patch_size=16).terms({"p5": s["p5"]}, {"p5": t["p5"]})["loss_pcka"]
    assert loss.terms(s, t)["loss_pcka"].item() == pytest.approx(only_p5.item())
    with pytest.raises(DistillError, match="PATCH_SIZE"):
        FPNDistillLoss(["p6"], patch_size=16).terms({"p6": s["p6"]}, {"p6": t["p6"]})


def test_maps_of_different_sizes_are_an_error_naming_the_level():
    loss = FPNDistillLoss(["p3"], patch_size=4)
    with pytest.raises(DistillError, match="p3"):
        loss.terms({"p3": torch.randn(2, 8, 16, 16)}, {"p3": torch.randn(2, 8, 16, 20)})


def test_adapter_maps_student_channels_to_the_teachers():
    loss = FPNDistillLoss(["p3"], patch_size=4, adapt={"p3": (8, 16)})
    terms = loss.terms({"p3": torch.randn(2, 8, 16, 16)}, {"p3": torch.randn(2, 16, 16, 16)})
    assert torch.isfinite(terms["loss_pcka"])
    assert sum(p.numel() for p in loss.parameters()) == 8 * 16 + 16


def test_dense_kd_is_zero_at_a_match_positive_otherwise_and_checks_layout():
    g = torch.Generator().manual_seed(0)
    logits_t = [torch.randn(2, 9 * 3, 8, 8, generator=g), torch.randn(2, 9 * 3, 4, 4, generator=g)]
    assert dense_kd_loss(logits_t, logits_t, num_classes=3).item() == pytest.approx(0.0, abs=1e-6)
    logits_s = [torch.randn_like(z) for z in logits_t]
    assert dense_kd_loss(logits_s, logits_t, num_classes=3, temperature=2.0).item() > 0
    with pytest.raises(DistillError, match="head layout"):
        dense_kd_loss([torch.randn(2, 27, 8, 8)], [torch.randn(2, 18, 8, 8)], num_classes=3)
