"""What a detector distils through its FPN: which levels, their pairing with the teacher's, and the losses.

Plain torch, no detectron2, so that it is tested everywhere; ``coco_detection/meta_arch.py`` feeds it the FPN
maps of detectron2 models. Three terms, each off at weight 0:

* ``loss_pcka``: PCKA (paper Sec. 4.2) on the selected FPN levels, ``common.losses.PCKALoss``: intra term
  (patch x patch Grams per channel) plus the optional inter term. The released code (Klayand/PCKA, on
  mmrazor) uses the first four FPN levels, 16 x 16 patches, weight 10 and uncentred CKA; it adds the inter
  term for two-stage detectors only, multiplied by the intra weight. Those are the defaults here.
* ``loss_mimic``: FPN feature imitation, the "mimic" of Table 3's "Ours + mimic" rows. The paper does not
  define it and its code does not release it. We implement the plainest form of feature imitation (FitNets;
  Li et al. 2017, "Mimicking very efficient networks for object detection"), on whole FPN maps: the mean
  squared error between student and teacher maps of the same levels, averaged over levels, weight 1 when
  switched on. It needs no extra parameters when the channels agree (256 in every
  detectron2 FPN), so it adds nothing at inference.
* ``loss_kd``: KD on the class logits of one-stage heads (RetinaNet, FCOS: per-class sigmoids, not a
  softmax), the Table 3 "KD" row: the Bernoulli KL divergence between teacher and student class probabilities
  at temperature T, summed over classes, averaged over anchor positions, times T^2 (Hinton's scaling). It is
  0 when the student matches the teacher.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.losses import PCKALoss
from common.patches import patch_grid

__all__ = ["DEFAULTS", "DistillError", "FPNDistillLoss", "dense_kd_loss", "method_name", "plan_levels", "resolve_inter_weight"]

# The config defaults (coco_detection/config.py turns them into detectron2 CfgNodes). Kept here as plain data
# so that their values are tested without detectron2. Each says where it comes from.
DEFAULTS = {
    "MODEL.PCKA": {
        # [] = the first NUM_LEVELS FPN outputs in stride order (released code: first four: p2-p5 for
        # Faster R-CNN, p3-p6 for RetinaNet); or names, e.g. ["p3", "p4"].
        "IN_FEATURES": [],
        "NUM_LEVELS": 4,
        "PATCH_SIZE": 16,  # released code
        "INTRA_WEIGHT": 10.0,  # released code
        # < 0: the released code's choice, the intra weight for two-stage detectors and 0 (off) for one-stage.
        "INTER_WEIGHT": -1.0,
        "CENTERED": False,  # released code: uncentred Grams; True for CKA as defined
    },
    "MODEL.DISTILL": {
        # The detectron2 meta-architecture of the student (any in META_ARCH_REGISTRY).
        "STUDENT_META_ARCHITECTURE": "RetinaNet",
        # When teacher and student FPN channels differ: False = stop with an error; True = a learned 1x1 conv
        # per level on the student side (FitNets' regressor), used in training only.
        "ADAPTER": False,
        "MIMIC_WEIGHT": 0.0,  # off; 1.0 for the "+ mimic" rows (our choice, the paper gives none)
        "KD_WEIGHT": 0.0,  # off; the Table 3 "KD" baseline (one-stage heads only)
        "KD_TEMPERATURE": 1.0,  # sigmoid class scores are already soft; T = 1 as in dense-detector KD
    },
    "TEACHER": {
        # A detectron2 config: a path, or a model-zoo name such as COCO-Detection/retinanet_R_101_FPN_3x.yaml.
        "CONFIG_FILE": "",
        # Its weights: a path, a URL, or detectron2://... (the model zoo).
        "WEIGHTS": "",
    },
}


class DistillError(ValueError):
    """A teacher/student pairing that cannot be distilled as configured; the message says what to change."""


def select_levels(names: Sequence[str], requested: Sequence[str], num_levels: int) -> list[str]:
    """The FPN levels to distil: ``requested`` if given (checked against ``names``), else the first ``num_levels``.

    ``names`` are the FPN outputs in stride order (finest first), as detectron2's backbones list them.
    """
    names = list(names)
    if requested:
        unknown = [name for name in requested if name not in names]
        if unknown:
            raise DistillError(f"MODEL.PCKA.IN_FEATURES names {unknown}, but the student's FPN outputs are {names}; "
                               f"pick among those, or leave IN_FEATURES empty for the first {num_levels}.")
        if len(set(requested)) != len(requested):
            raise DistillError(f"MODEL.PCKA.IN_FEATURES lists a level twice: {list(requested)}.")
        return list(requested)
    if num_levels < 1:
        raise DistillError(f"MODEL.PCKA.NUM_LEVELS must be at least 1, got {num_levels}.")
    if num_levels > len(names):
        raise DistillError(f"MODEL.PCKA.NUM_LEVELS is {num_levels} but the student's FPN has only {len(names)} "
                           f"outputs ({names}); lower it.")
    return names[:num_levels]


def plan_levels(
    student: Mapping[str, tuple[int, int]],
    teacher: Mapping[str, tuple[int, int]],
    requested: Sequence[str] = (),
    num_levels: int = 4,
    adapter: bool = False,
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Checks a pairing before any training: (levels, {level: (student channels, teacher channels)} to adapt).

    ``student`` / ``teacher``: {FPN output name: (channels, stride)} in stride order, i.e. detectron2's
    ``backbone.output_shape()``. Levels pair by name and must have the same stride, so that both maps have the
    same size for the same padded batch.
    """
    levels = select_levels(list(student), requested, num_levels)
    missing = [name for name in levels if name not in teacher]
    if missing:
        raise DistillError(f"the teacher's FPN has no level(s) {missing} (it has {list(teacher)}); choose levels "
                           f"both have with MODEL.PCKA.IN_FEATURES.")
    adapted = {}
    for name in levels:
        (c_s, stride_s), (c_t, stride_t) = student[name], teacher[name]
        if stride_s != stride_t:
            raise DistillError(f"FPN level {name}: student stride {stride_s} but teacher stride {stride_t}; their "
                               f"maps differ in size, so they cannot be compared. Pair levels of equal stride.")
        if c_s != c_t:
            if not adapter:
                raise DistillError(
                    f"FPN level {name}: the student has {c_s} channels, the teacher {c_t}; PCKA and mimic pair "
                    f"channels one to one. Give both the same MODEL.FPN.OUT_CHANNELS, or set "
                    f"MODEL.DISTILL.ADAPTER True for a learned 1x1 conv from the student's channels to the "
                    f"teacher's (used in training only).")
            adapted[name] = (c_s, c_t)
    return levels, adapted


def resolve_inter_weight(inter_weight: float, intra_weight: float, two_stage: bool) -> float:
    """MODEL.PCKA.INTER_WEIGHT < 0 means the released code's choice: on (at the intra weight) for two-stage only."""
    if inter_weight >= 0:
        return float(inter_weight)
    return float(intra_weight) if two_stage else 0.0


def method_name(intra_weight: float, inter_weight: float, mimic_weight: float, kd_weight: float) -> str:
    """The Table 3 row a set of weights reproduces: pcka, pcka+mimic, kd, mimic, ...; "distill-none" if all are 0."""
    parts = [name for name, weight in (("pcka", intra_weight + max(inter_weight, 0.0)), ("kd", kd_weight),
                                       ("mimic", mimic_weight)) if weight > 0]
    return "+".join(parts) if parts else "distill-none"


def dense_kd_loss(logits_s: Sequence[Tensor], logits_t: Sequence[Tensor], num_classes: int,
                  temperature: float = 1.0) -> Tensor:
    """KD for sigmoid class heads: T^2 * mean over anchor positions of sum_k KL(Bern(p_t,k) || Bern(p_s,k)).

    Inputs are per-level (N, A*K, H, W) maps, detectron2's layout for RetinaNet and FCOS heads.
    """
    if len(logits_s) != len(logits_t):
        raise DistillError(f"KD: the student head gives {len(logits_s)} levels, the teacher's {len(logits_t)}.")
    total, positions = None, 0
    for zs, zt in zip(logits_s, logits_t):
        if zs.shape != zt.shape:
            raise DistillError(
                f"KD on class logits needs the same head layout: student {tuple(zs.shape)} vs teacher "
                f"{tuple(zt.shape)} (anchors x classes, H, W). Use the same anchors and NUM_CLASSES for both, or "
                f"set MODEL.DISTILL.KD_WEIGHT 0.")
        if zs.shape[1] % num_classes:
            raise DistillError(f"KD: {zs.shape[1]} logit channels are not a multiple of {num_classes} classes.")
        zs, zt = zs.float() / temperature, zt.detach().float() / temperature
        # KL(Bern(q) || Bern(p)) = BCE(p; q) - BCE(q; q): the teacher's entropy makes it 0 at a perfect match.
        kl = (F.binary_cross_entropy_with_logits(zs, torch.sigmoid(zt), reduction="sum")
              - F.binary_cross_entropy_with_logits(zt, torch.sigmoid(zt), reduction="sum"))
        total = kl if total is None else total + kl
        positions += zs.numel() // num_classes
    return total / max(positions, 1) * temperature ** 2


class FPNDistillLoss(nn.Module):
    """The distillation terms on paired FPN maps: ``terms(feats_s, feats_t)`` -> {"loss_pcka", "loss_mimic"}.

    ``feats_s`` / ``feats_t`` are {level: (B, C, H, W)} for the planned levels. ``adapt`` maps a level to its
    (student channels, teacher channels); those levels get a learned 1x1 conv on the student side.
    """

    def __init__(self, levels: Sequence[str], patch_size: int = 16, intra_weight: float = 10.0,
                 inter_weight: float = 0.0, centered: bool = False, mimic_weight: float = 0.0,
                 adapt: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        if mimic_weight < 0:
            raise DistillError(f"MODEL.DISTILL.MIMIC_WEIGHT must be >= 0, got {mimic_weight}.")
        self.levels = list(levels)
        self.pcka = PCKALoss(patch_size=patch_size, intra_weight=intra_weight, inter_weight=inter_weight,
                             centered=centered)
        self.mimic_weight = mimic_weight
        self.adapters = nn.ModuleDict({name: nn.Conv2d(c_s, c_t, kernel_size=1)
                                       for name, (c_s, c_t) in (adapt or {}).items()})

    def terms(self, feats_s: Mapping[str, Tensor], feats_t: Mapping[str, Tensor]) -> dict[str, Tensor]:
        student, teacher = {}, {}
        for name in self.levels:
            fs, ft = feats_s[name], feats_t[name].detach()
            if name in self.adapters:
                fs = self.adapters[name](fs)
            if fs.shape != ft.shape:
                raise DistillError(
                    f"FPN level {name}: student map {tuple(fs.shape)} vs teacher map {tuple(ft.shape)}. Both "
                    f"models must see the same padded batch: give them the same backbone strides and "
                    f"MODEL.*.SIZE_DIVISIBILITY / padding.")
            student[name], teacher[name] = fs, ft
        terms = {}
        if self.pcka.intra_weight > 0 or self.pcka.inter_weight > 0:
            # A level whose map is one patch has a 1 x 1 Gram: the released code's uncentred CKA of it is exactly 1,
            # so its term is 0 with no gradient, and (centred) CKA is undefined. Such levels are left out, which
            # is the same sum. It happens on real batches: a square 800 x 800 batch makes p6 13 x 13, one patch.
            size = self.pcka.patch_size
            multi = [n for n in self.levels if math.prod(patch_grid(*student[n].shape[-2:], size)) >= 2]
            if not multi:
                sizes = {n: tuple(student[n].shape[-2:]) for n in self.levels}
                raise DistillError(f"every FPN level is a single {size}x{size} patch ({sizes}); PCKA needs at least "
                                   f"2 in some level. Lower MODEL.PCKA.PATCH_SIZE or use larger images.")
            # Names kept as dict keys, so an error names the FPN level.
            pairs_s, pairs_t = {n: student[n] for n in multi}, {n: teacher[n] for n in multi}
            terms["loss_pcka"] = sum(self.pcka.terms(feats_s=pairs_s, feats_t=pairs_t).values())
        if self.mimic_weight > 0:
            mse = [F.mse_loss(student[n].float(), teacher[n].float()) for n in self.levels]
            terms["loss_mimic"] = self.mimic_weight * torch.stack(mse).mean()
        return terms
