"""Layer x layer CKA maps of ImageNet models on the validation set: what distillation did to the student's layers.

    python imagenet/cka_map.py output/imagenet/resnet34_resnet18/rcka/seed0 --data_path /data/imagenet
    python imagenet/cka_map.py --compare output/imagenet/resnet34_resnet18/kd/seed0 \\
                                         output/imagenet/resnet34_resnet18/rcka/seed0 --max_samples 10000

The same command as cifar100/cka_map.py (common/cka_map.py does the work); this file holds what is ImageNet's: the
models, the validation images as train.py evaluates them (Resize 256 + CenterCrop 224), and the teachers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import cka_map
from imagenet.data import DatasetLayoutError, build_loaders, check_layout, to_model_input
from imagenet.models import STAGES, build_model
from imagenet.teachers import TeacherNotFoundError, resolve_teacher_checkpoint


def test_batches(args: argparse.Namespace, device: torch.device):
    """The validation images, normalised as train.py evaluates them, in batches on ``device``."""
    classes = check_layout(args.data_path, args.num_classes)
    if args.max_samples is not None and args.max_samples < 4:
        raise cka_map.CKAMapError(f"--max_samples {args.max_samples}: CKA needs at least 4 images.")
    _, val_loader = build_loaders(args.data_path, classes, batch_size=1, val_batch_size=args.batch_size,
                                  num_workers=args.num_workers, decoder="torchvision", subset=None, train_crop_size=224,
                                  val_resize_size=args.val_resize_size, val_crop_size=args.val_crop_size, seed=0)
    total = len(val_loader.dataset) if args.max_samples is None else min(args.max_samples, len(val_loader.dataset))
    batches_total = -(-total // args.batch_size)

    def batches():
        seen = 0
        for images, _ in val_loader:
            images = images[: total - seen]
            seen += len(images)
            yield to_model_input(images, device, channels_last=False)
            if seen >= total:
                return

    return batches(), batches_total, f"ImageNet validation images in {args.data_path}, {total} images"


def teacher_checkpoint(run_args: dict, args: argparse.Namespace) -> Path:
    """The teacher a train.py run distilled from: its --teacher_ckpt, else torchvision's published weights."""
    return resolve_teacher_checkpoint(run_args["teacher"], run_args.get("teacher_ckpt"),
                                      run_args.get("weights_dir") or args.weights_dir, download=not args.no_download)


def make_task(args: argparse.Namespace) -> cka_map.CKAMapTask:
    return cka_map.CKAMapTask(name="imagenet", stages=STAGES,
                              build_model=lambda arch: build_model(arch, num_classes=args.num_classes),
                              test_batches=test_batches, teacher_checkpoint=teacher_checkpoint)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Layer x layer CKA maps of ImageNet models", add_help=add_help)
    cka_map.add_arguments(parser, make_task(argparse.Namespace(num_classes=1000)))
    # ---- data
    parser.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root holding val/<wnid>/*.JPEG")
    parser.add_argument("--num_classes", type=int, default=1000,
                        help="classes of the models (1000 for ImageNet-1k; as the runs' --num_classes)")
    parser.add_argument("--val_resize_size", type=int, default=256, help="validation resize (train.py's recipe)")
    parser.add_argument("--val_crop_size", type=int, default=224, help="validation centre crop (train.py's recipe)")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers decoding the JPEGs")
    parser.add_argument("--max_samples", type=int, default=None,
                        help="use only the first N validation images (default: all 50000; 10000 gives a good map)")
    parser.add_argument("--weights_dir", default=None,
                        help="where torchvision's teacher weights are, for runs whose args.json does not say")
    parser.add_argument("--no_download", action="store_true", help="never download teacher weights")
    return parser


USER_ERRORS = (*cka_map.USER_ERRORS, DatasetLayoutError, TeacherNotFoundError)

if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        cka_map.main(args, make_task(args))
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
