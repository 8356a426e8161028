"""detectron2 config keys of the distillation (MODEL.PCKA, MODEL.DISTILL, TEACHER) and the teacher's own config.

    cfg = get_cfg(); add_distillation_config(cfg); cfg.merge_from_file("coco_detection/configs/...yaml")

The default values live in ``coco_detection.distill.DEFAULTS`` with their sources.
"""
from __future__ import annotations

import copy
from pathlib import Path

import detectron2
from detectron2.config import CfgNode, get_cfg

from coco_detection.distill import DEFAULTS, DistillError

__all__ = ["add_distillation_config", "build_teacher_cfg", "zoo_config_path"]


def add_distillation_config(cfg: CfgNode) -> None:
    """Adds the distillation keys with their defaults, in place (detectron2's add_*_config convention)."""
    for path, values in DEFAULTS.items():
        node = cfg
        for part in path.split("."):
            if part not in node:
                node[part] = CfgNode()
            node = node[part]
        for key, value in values.items():
            node[key] = copy.deepcopy(value)


def zoo_config_path(name: str) -> Path:
    """A model-zoo config name (``COCO-Detection/retinanet_R_101_FPN_3x.yaml``) -> the file in detectron2's package.

    The same file ``detectron2.model_zoo.get_config_file`` returns, found without pkg_resources (which
    setuptools >= 81 no longer ships, and which that module imports).
    """
    return Path(detectron2.__file__).parent / "model_zoo" / "configs" / name


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's full detectron2 config from TEACHER.CONFIG_FILE, with TEACHER.WEIGHTS as its MODEL.WEIGHTS."""
    name = cfg.TEACHER.CONFIG_FILE
    if not name:
        raise DistillError("TEACHER.CONFIG_FILE is empty: name the teacher's detectron2 config, a path (e.g. a "
                           "trained teacher's output/config.yaml) or a model-zoo name such as "
                           "COCO-Detection/retinanet_R_101_FPN_3x.yaml.")
    path = Path(name).expanduser()
    if not path.is_file():
        path = zoo_config_path(name)
        if not path.is_file():
            raise DistillError(f"TEACHER.CONFIG_FILE {name!r} is neither a file nor a config of detectron2's model "
                               f"zoo (looked in {zoo_config_path('')}); check the path or the zoo name.")
    teacher = get_cfg()
    add_distillation_config(teacher)  # a teacher trained by coco_detection/train.py may carry these keys
    teacher.merge_from_file(str(path))
    if teacher.MODEL.META_ARCHITECTURE == "DistillationDetector":
        raise DistillError(f"the teacher config {path} is itself a distillation config; point TEACHER.CONFIG_FILE "
                           f"to a plain detector's config (the student's config of that run, with its weights).")
    if cfg.TEACHER.WEIGHTS:
        teacher.MODEL.WEIGHTS = cfg.TEACHER.WEIGHTS
    if not teacher.MODEL.WEIGHTS or "ImageNetPretrained" in teacher.MODEL.WEIGHTS:
        raise DistillError(f"no trained weights for the teacher: set TEACHER.WEIGHTS to its checkpoint (a path, a "
                           f"URL or detectron2://<zoo name>/<id>/model_final_<hash>.pkl); its config {path} only "
                           f"names {teacher.MODEL.WEIGHTS or 'none'}.")
    teacher.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher.freeze()
    return teacher
