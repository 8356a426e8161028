"""Datasets: detectron2's registered COCO splits, and COCO-format json + image folders named on the command line.

    DETECTRON2_DATASETS=/data python coco_detection/train.py ...                     # coco_2017_train / _val
    python coco_detection/train.py --register_coco shapes_train ann.json images/ ... DATASETS.TRAIN "('shapes_train',)"

Everything is checked before the model is built, so a wrong path fails in a second with the fix, not after the
teacher has loaded.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["DatasetError", "check_coco_json", "check_datasets", "register_coco_datasets"]


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what is wrong and how to fix it."""


_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "bbox", "category_id"),
    "categories": ("id", "name"),
}


def check_coco_json(path: str | os.PathLike) -> dict:
    """Loads a COCO-format instances json and checks what detectron2's loader and COCOeval rely on."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist; check the path.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); a COCO-format file is one JSON object with "
                           f"'images', 'annotations' and 'categories' lists.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories', got a "
                           f"{type(data).__name__}.")
    for key, fields in _REQUIRED.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: no '{key}' list; a COCO-format instances file needs 'images', "
                               f"'annotations' and 'categories' lists.")
        for i, entry in enumerate(entries):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DatasetError(f"{path}: {key}[{i}] lacks {missing}; every entry of '{key}' needs {list(fields)}.")
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is empty; list the object classes there.")
    images = {image["id"] for image in data["images"]}
    categories = {category["id"] for category in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{path}: annotations[{i}].bbox is {bbox!r}; COCO boxes are [x, y, width, height].")
        if ann["image_id"] not in images:
            raise DatasetError(f"{path}: annotations[{i}] refers to image_id {ann['image_id']}, which 'images' lacks.")
        if ann["category_id"] not in categories:
            raise DatasetError(f"{path}: annotations[{i}] has category_id {ann['category_id']}, which "
                               f"'categories' lacks.")
    return data


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> list[str]:
    """Registers each (name, json, image folder) with detectron2 after checking it; returns the names."""
    names = []
    for name, json_file, image_root in specs:
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == str(json_file):
                continue  # registered by an earlier call in this process (main() checks, then run() trains)
            raise DatasetError(f"--register_coco {name}: detectron2 already has a dataset of that name; choose "
                               f"another (the built-in COCO splits need no registering, see DETECTRON2_DATASETS).")
        data = check_coco_json(json_file)
        if not Path(image_root).is_dir():
            raise DatasetError(f"--register_coco {name}: image folder {image_root} does not exist.")
        absent = [img["file_name"] for img in data["images"] if not (Path(image_root) / img["file_name"]).is_file()]
        if absent:
            raise DatasetError(f"--register_coco {name}: {len(absent)} image(s) of {json_file} are not in "
                               f"{image_root} (e.g. {absent[:3]}); file_name is relative to the image folder.")
        register_coco_instances(name, {}, str(json_file), str(image_root))
        names.append(name)
    return names


def check_datasets(names: Iterable[str]) -> None:
    """Every dataset the config uses is registered and, for json-backed ones, on disk."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetError(f"dataset {name!r} is not registered with detectron2; use coco_2017_train / "
                               f"coco_2017_val (with DETECTRON2_DATASETS) or register yours with "
                               f"--register_coco {name} ANNOTATIONS.json IMAGE_DIR.")
        metadata = MetadataCatalog.get(name)
        json_file, image_root = metadata.get("json_file"), metadata.get("image_root")
        if json_file and not Path(json_file).is_file():
            root = os.environ.get("DETECTRON2_DATASETS")
            raise DatasetError(f"dataset {name}: {json_file} does not exist. detectron2 looks for COCO under "
                               f"$DETECTRON2_DATASETS/coco/{{annotations,train2017,val2017}} (now "
                               f"{root!r}, default ./datasets): set it to the folder that holds coco/.")
        if image_root and not Path(image_root).is_dir():
            raise DatasetError(f"dataset {name}: image folder {image_root} does not exist (DETECTRON2_DATASETS "
                               f"is {os.environ.get('DETECTRON2_DATASETS')!r}).")
