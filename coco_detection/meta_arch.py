"""``DistillationDetector``: a detectron2 meta-architecture that trains a student detector against a frozen teacher.

    MODEL.META_ARCHITECTURE: "DistillationDetector"
    MODEL.DISTILL.STUDENT_META_ARCHITECTURE: "RetinaNet"        # or GeneralizedRCNN (Faster R-CNN), FCOS, ...
    TEACHER.CONFIG_FILE: "COCO-Detection/retinanet_R_101_FPN_3x.yaml"
    TEACHER.WEIGHTS: "detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl"

The student is built from the config as its own meta-architecture would build it, and the teacher from its own
config (``coco_detection.config.build_teacher_cfg``) with its weights, frozen: eval mode whatever ``train()`` is
called with, ``requires_grad`` off, run under ``no_grad``. In training, the student's forward gives detectron2's
loss dict; forward hooks (``common.features.FeatureTaps``) take its FPN maps (and, for KD, its head's class
logits) on the way, the teacher runs its backbone + FPN (and head) on the same batched images in its own input
format and normalisation, and ``coco_detection.distill`` adds ``loss_pcka`` (and ``loss_mimic``, ``loss_kd``).
Inference is the student's forward alone, so detectron2's evaluators and exporters see a plain detector.

This is the shape of mdistiller's ``detection/`` (a meta-architecture holding a frozen teacher), generalised to
any student meta-architecture by wrapping it rather than re-implementing its forward.
"""
from __future__ import annotations

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import ImageList
from torch import nn

from coco_detection.config import build_teacher_cfg
from coco_detection.distill import DistillError, FPNDistillLoss, dense_kd_loss, plan_levels, resolve_inter_weight
from common.features import FeatureTaps

__all__ = ["DistillationDetector", "load_teacher_weights"]


def _fpn_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{FPN output: (channels, stride)}, finest first."""
    shapes = model.backbone.output_shape()
    return {name: (spec.channels, spec.stride) for name, spec in sorted(shapes.items(), key=lambda kv: kv[1].stride)}


class _RecordingCheckpointer(DetectionCheckpointer):
    """Keeps what detectron2's loading left out (it only logs it): for a teacher, a missing weight is an error."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_teacher_weights(teacher: nn.Module, weights: str) -> None:
    """Loads the teacher's checkpoint, failing on any missing or mis-shaped weight (random teacher layers)."""
    checkpointer = _RecordingCheckpointer(teacher)
    checkpointer.load(weights)
    incompatible = checkpointer.incompatible
    if incompatible.missing_keys or incompatible.incorrect_shapes:
        shown = (incompatible.missing_keys + [k for k, *_ in incompatible.incorrect_shapes])[:5]
        raise DistillError(f"the teacher checkpoint {weights} does not fit the teacher config: "
                           f"{len(incompatible.missing_keys)} missing and {len(incompatible.incorrect_shapes)} "
                           f"mis-shaped weights (e.g. {shown}). Check that TEACHER.WEIGHTS was trained with "
                           f"TEACHER.CONFIG_FILE.")


@META_ARCH_REGISTRY.register()
class DistillationDetector(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        distill, pcka = cfg.MODEL.DISTILL, cfg.MODEL.PCKA
        arch = distill.STUDENT_META_ARCHITECTURE
        if arch == type(self).__name__ or arch not in META_ARCH_REGISTRY:
            raise DistillError(f"MODEL.DISTILL.STUDENT_META_ARCHITECTURE {arch!r} must name a detector of "
                               f"META_ARCH_REGISTRY, e.g. RetinaNet or GeneralizedRCNN.")
        self.student = META_ARCH_REGISTRY.get(arch)(cfg)

        teacher_cfg = build_teacher_cfg(cfg)
        self.teacher = META_ARCH_REGISTRY.get(teacher_cfg.MODEL.META_ARCHITECTURE)(teacher_cfg)
        self.teacher.to(torch.device(cfg.MODEL.DEVICE))
        load_teacher_weights(self.teacher, teacher_cfg.MODEL.WEIGHTS)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # The data loader gives images in the student's INPUT.FORMAT; a teacher trained elsewhere may want the
        # other channel order (detectron2's zoo uses BGR throughout, torchvision-style weights RGB).
        formats = (cfg.INPUT.FORMAT, teacher_cfg.INPUT.FORMAT)
        if formats[0] != formats[1] and set(formats) != {"RGB", "BGR"}:
            raise DistillError(f"student INPUT.FORMAT {formats[0]} and teacher INPUT.FORMAT {formats[1]}: only an "
                               f"RGB <-> BGR swap is supported between them.")
        self.swap_channels = formats[0] != formats[1]

        two_stage = isinstance(self.student, GeneralizedRCNN)
        levels, adapt = plan_levels(_fpn_shapes(self.student), _fpn_shapes(self.teacher), list(pcka.IN_FEATURES),
                                    pcka.NUM_LEVELS, distill.ADAPTER)
        self.distill_loss = FPNDistillLoss(
            levels, patch_size=pcka.PATCH_SIZE, intra_weight=pcka.INTRA_WEIGHT,
            inter_weight=resolve_inter_weight(pcka.INTER_WEIGHT, pcka.INTRA_WEIGHT, two_stage),
            centered=pcka.CENTERED, mimic_weight=distill.MIMIC_WEIGHT, adapt=adapt,
        ).to(torch.device(cfg.MODEL.DEVICE))

        self.kd_weight, self.kd_temperature = distill.KD_WEIGHT, distill.KD_TEMPERATURE
        if self.kd_weight > 0:
            if not (isinstance(self.student, DenseDetector) and isinstance(self.teacher, DenseDetector)):
                raise DistillError("MODEL.DISTILL.KD_WEIGHT > 0 distils the class logits of one-stage heads "
                                   "(RetinaNet, FCOS): both student and teacher must be such detectors.")
            if self.student.num_classes != self.teacher.num_classes:
                raise DistillError(f"KD: the student has {self.student.num_classes} classes, the teacher "
                                   f"{self.teacher.num_classes}.")
        taps = ["backbone", "head"] if self.kd_weight > 0 else ["backbone"]
        self._taps = FeatureTaps(self.student, taps)

    @property
    def device(self) -> torch.device:
        return self.student.device

    def train(self, mode: bool = True) -> "DistillationDetector":
        super().train(mode)
        self.teacher.eval()  # batch-norm statistics and dropout stay the teacher's
        return self

    def forward(self, batched_inputs):
        outputs = self.student(batched_inputs)
        recorded = self._taps.pop()  # cleared every call, so no map outlives its step
        if not self.training:
            return outputs
        feats_s = recorded[0]
        with torch.no_grad():
            images = self.teacher_images(batched_inputs)
            feats_t = self.teacher.backbone(images.tensor)
            logits_t = None
            if self.kd_weight > 0:
                logits_t = self.teacher.head([feats_t[f] for f in self.teacher.head_in_features])[0]
        losses = dict(outputs)
        losses.update(self.distill_loss.terms(feats_s, feats_t))
        if self.kd_weight > 0:
            logits_s = recorded[1][0]
            losses["loss_kd"] = self.kd_weight * dense_kd_loss(logits_s, logits_t, self.student.num_classes,
                                                               self.kd_temperature)
        return losses

    def teacher_images(self, batched_inputs) -> ImageList:
        """The batch as the teacher's own preprocess_image would make it: its channel order, mean, std, padding."""
        teacher = self.teacher
        images = [x["image"].to(teacher.pixel_mean.device) for x in batched_inputs]
        if self.swap_channels:
            images = [x.flip(0) for x in images]  # before normalising: mean and std are in the teacher's order
        images = [(x - teacher.pixel_mean) / teacher.pixel_std for x in images]
        return ImageList.from_tensors(images, teacher.backbone.size_divisibility,
                                      padding_constraints=teacher.backbone.padding_constraints)
