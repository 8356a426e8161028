"""A tiny COCO-format detection dataset of drawn shapes, and small detectron2 configs that train on it on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "circle"}]
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "coco_detection" / "configs"


def make_shapes_coco(root: Path, name: str, num_images: int, size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Images with 1-3 filled rectangles or circles on noise, and their boxes; returns (json, image folder)."""
    rng = np.random.default_rng(seed)
    image_dir = root / name
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        canvas = Image.fromarray(pixels)
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            category = int(rng.integers(1, 3))
            colour = tuple(int(c) for c in rng.integers(120, 256, 3))
            box = [int(x), int(y), int(x + w), int(y + h)]
            (draw.rectangle if category == 1 else draw.ellipse)(box, fill=colour)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                                "iscrowd": 0})
        file_name = f"{image_id:04d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return json_path, image_dir


def tiny_overrides(max_iter: int, checkpoint_period: int = 1000) -> list[str]:
    """Options that make a config of coco_detection/configs train in seconds on CPU on the shapes dataset."""
    return [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        # Random init: trainable BN (FrozenBN's identity statistics let random activations blow up), nothing frozen.
        "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.RETINANET.NUM_CLASSES", "2", "MODEL.RETINANET.NUM_CONVS", "1",
        # Report every box, so that even an untrained detector gives COCOeval numbers rather than "no predictions".
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "('shapes_val',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.002",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
        "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period), "TEST.EVAL_PERIOD", "0",
    ]


def distill_overrides(teacher_dir: Path) -> list[str]:
    """The teacher trained by train.py in teacher_dir; PCKA levels and patches that fit 128-pixel images."""
    return ["TEACHER.CONFIG_FILE", str(teacher_dir / "config.yaml"), "TEACHER.WEIGHTS",
            str(teacher_dir / "model_final.pth"), "MODEL.PCKA.IN_FEATURES", "['p3', 'p4', 'p5']",
            "MODEL.PCKA.PATCH_SIZE", "2"]
