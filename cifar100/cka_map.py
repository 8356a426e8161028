"""Layer x layer CKA maps of CIFAR-100 models on the test set: what distillation did to the student's layers.

    python cifar100/cka_map.py output/cifar100/resnet56_resnet20/rcka/seed0     # the run's teacher vs its student
    python cifar100/cka_map.py TEACHER.pth RUN_DIR --arch_a resnet56              # any two models (rows vs columns)
    python cifar100/cka_map.py --compare output/cifar100/resnet56_resnet20/kd/seed0 \\
                                         output/cifar100/resnet56_resnet20/rcka/seed0   # KD vs RCKA, one scale

Writes cka_map.png (heatmaps with a colour bar), cka_map.json and one CSV per panel; see
common/cka_map.py for what is computed and how.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cifar100.data import DatasetIntegrityError, DatasetNotFoundError, TensorLoader, load_cifar100
from cifar100.models import STAGES, build_model
from cifar100.teachers import ZOO_URL, TeacherNotFoundError, resolve_teacher_checkpoint
from common import cka_map


def test_batches(args: argparse.Namespace, device: torch.device):
    """The test split, normalised as train.py evaluates it (no augmentation), in batches on ``device``."""
    images, labels = load_cifar100(args.data_path, train=False, download=not args.no_download,
                                   verify=not args.no_verify_data)
    if args.max_samples is not None:
        if args.max_samples < 4:
            raise cka_map.CKAMapError(f"--max_samples {args.max_samples}: CKA needs at least 4 images.")
        images, labels = images[: args.max_samples], labels[: args.max_samples]
    loader = TensorLoader(images, labels, args.batch_size, train=False, device=device)
    if args.no_verify_data:
        description = f"unverified data in {args.data_path} (MD5 not checked), {len(images)} test images"
    else:
        description = f"CIFAR-100 test set, {len(images)} images"
    return (x for x, _ in loader), len(loader), description


def teacher_checkpoint(run_args: dict, args: argparse.Namespace) -> Path:
    """The teacher a train.py run distilled from: its --teacher_ckpt, else the public zoo file."""
    return resolve_teacher_checkpoint(run_args["teacher"], run_args.get("teacher_ckpt"),
                                      run_args.get("zoo_dir") or args.zoo_dir, download=not args.no_download,
                                      url=run_args.get("zoo_url") or ZOO_URL)


TASK = cka_map.CKAMapTask(name="cifar100", stages=STAGES, build_model=build_model, test_batches=test_batches,
                          teacher_checkpoint=teacher_checkpoint)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Layer x layer CKA maps of CIFAR-100 models", add_help=add_help)
    cka_map.add_arguments(parser, TASK)
    # ---- data
    parser.add_argument("--data_path", default="./data",
                        help="folder holding cifar-100-python/ (downloaded there when missing)")
    parser.add_argument("--no_download", action="store_true",
                        help="never download the dataset or the teacher zoo; fail with instructions instead")
    parser.add_argument("--no_verify_data", action="store_true",
                        help="skip the MD5 check of the dataset files (for generated test data only; the figure "
                             "then says the data is unverified)")
    parser.add_argument("--max_samples", type=int, default=None,
                        help="use only the first N test images (a quick look); default: all 10000")
    parser.add_argument("--zoo_dir", default="./checkpoints",
                        help="the public teacher zoo, for runs whose args.json does not say where it was")
    return parser


USER_ERRORS = (*cka_map.USER_ERRORS, DatasetNotFoundError, DatasetIntegrityError, TeacherNotFoundError)

if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        cka_map.main(args, TASK)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
