"""Sizes of CE and of each weighted RCKA term at the start of training, under each CKA variant.

    python benchmarks/loss_terms_at_init.py                        # random teachers: about a minute on CPU
    python benchmarks/loss_terms_at_init.py --teacher_steps 2000   # also briefly trained teachers (CPU only, slow:
                                                                   # 40 resnet56 steps took 800 s on a loaded 2-core box)

On the real CIFAR architectures (``cifar100.models.build_model``) at batch 64, with the default
weights (1 for features, 15 per logit term), for centred vs uncentred CKA x logit Gram rows
normalised or not x feature term ``sp`` (the first author's related code) or ``gram`` (the paper's
figure). The logit terms depend only on (centring, row normalisation), the feature term only on
(centring, form), so two tables cover all eight variants.

What it measures with, honestly: no trained teacher or real CIFAR-100 image exists on this machine.
Images are the generated CIFAR-format data of ``tests/cifar_fixtures.py`` (class colour + oriented
stripes + noise), read through ``cifar100.data`` and normalised with the CIFAR-100 mean/std.
Students are freshly initialised, in train mode (as at step 0). Teachers are either
  * ``random``: freshly initialised, BatchNorm statistics estimated on 4 batches, then eval mode;
  * ``trained``: the same, then trained with SGD for ``--teacher_steps`` steps on the generated
    training images (batch 64, LR 0.05, momentum 0.9), then eval mode. Its accuracy on the
    generated test images is printed: it stands in for a trained teacher's confident, class-
    structured logits, not for the zoo's teachers.
Numbers with the real zoo teachers on CIFAR-100 will differ; the ratios between variants are the point.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from cifar100.data import CIFAR100_MEAN, CIFAR100_STD, load_cifar100
from cifar100.models import STAGES, build_model
from common.features import FeatureTaps
from common.losses import RCKALoss
from tests.cifar_fixtures import write_fake_cifar100

PAIRS = ["resnet56:resnet20", "resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2", "vgg13:vgg8"]
LOGIT_VARIANTS = [(False, True), (False, False), (True, True), (True, False)]  # (centered, row_norm)
FEATURE_VARIANTS = [(False, "sp"), (False, "gram"), (True, "sp"), (True, "gram")]  # (centered, form)


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def calibrate_batchnorm(model, images, batches=4, batch_size=64):
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    for i in range(batches):
        model(images[i * batch_size:(i + 1) * batch_size])
    model.eval()


def train_teacher(model, images, labels, steps, batch_size, seed):
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model, images, labels):
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item() * 100


def measure(teacher, student, arch_t, arch_s, images, labels):
    taps_t, taps_s = FeatureTaps(teacher, STAGES[arch_t]), FeatureTaps(student, STAGES[arch_s])
    with torch.no_grad():
        logits_t = teacher(images)
    student.train()
    logits_s = student(images)
    feats_t, feats_s = taps_t.pop(), taps_s.pop()
    taps_t.remove()
    taps_s.remove()
    if len(feats_t) != len(feats_s):
        raise ValueError(f"{arch_t} and {arch_s} have different stage counts")
    row = {"ce": F.cross_entropy(logits_s, labels).item()}
    with torch.no_grad():
        for centered, row_norm in LOGIT_VARIANTS:
            terms = RCKALoss(feature_weight=0, centered=centered, logit_row_norm=row_norm).terms(logits_s=logits_s, logits_t=logits_t)
            row[("intra", centered, row_norm)] = terms["lcka_intra"].item()
            row[("inter", centered, row_norm)] = terms["lcka_inter"].item()
        for centered, form in FEATURE_VARIANTS:
            loss = RCKALoss(intra_weight=0, inter_weight=0, centered=centered, feature_form=form)
            row[("fcka", centered, form)] = loss.terms(feats_s=feats_s, feats_t=feats_t)["fcka"].item()
    return row


def name(centered, option):
    return ("centred" if centered else "uncentred") + " / " + {True: "row-norm", False: "plain"}.get(option, option)


def print_tables(rows):
    header_l = " | ".join(f"{term} {name(c, r)}" for term in ("intra", "inter") for c, r in LOGIT_VARIANTS)
    print("\nLogit terms (weight 15 each):\n")
    print(f"| pair | teacher | CE | {header_l} |")
    print("|" + "---|" * (3 + 2 * len(LOGIT_VARIANTS)))
    for (pair, kind), row in rows.items():
        cells = " | ".join(f"{row[(term, c, r)]:.2f}" for term in ("intra", "inter") for c, r in LOGIT_VARIANTS)
        print(f"| {pair} | {kind} | {row['ce']:.2f} | {cells} |")
    print("\nFeature term (weight 1, summed over the stages):\n")
    print(f"| pair | teacher | CE | {' | '.join(name(c, f) for c, f in FEATURE_VARIANTS)} |")
    print("|" + "---|" * (3 + len(FEATURE_VARIANTS)))
    for (pair, kind), row in rows.items():
        cells = " | ".join(f"{row[('fcka', c, f)]:.3f}" for c, f in FEATURE_VARIANTS)
        print(f"| {pair} | {kind} | {row['ce']:.2f} | {cells} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=PAIRS, help="teacher:student pairs (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=64, help="the CIFAR recipe's batch (64)")
    parser.add_argument("--teacher_steps", type=int, default=0,
                        help="SGD steps of the 'trained' teachers on generated images; 0 measures random teachers only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as root:
        write_fake_cifar100(root, n_train=5000, n_test=500, seed=args.seed)
        train_x, train_y = load_cifar100(root, train=True, download=False, verify=False)
        test_x, test_y = load_cifar100(root, train=False, download=False, verify=False)
    train_x, test_x = normalise(train_x), normalise(test_x)
    images, labels = test_x[:args.batch_size], test_y[:args.batch_size]

    rows = {}
    for pair in args.pairs:
        arch_t, arch_s = pair.split(":")
        student = build_model(arch_s)
        teacher = build_model(arch_t)
        calibrate_batchnorm(teacher, train_x, batch_size=args.batch_size)
        rows[(pair, "random")] = measure(teacher, student, arch_t, arch_s, images, labels)
        if args.teacher_steps > 0:
            start = time.perf_counter()
            train_teacher(teacher, train_x, train_y, args.teacher_steps, args.batch_size, args.seed)
            acc = accuracy(teacher, test_x, test_y)
            print(f"{arch_t}: {args.teacher_steps} steps in {time.perf_counter() - start:.0f} s, "
                  f"top-1 {acc:.1f}% on the generated test images")
            rows[(pair, f"trained ({acc:.0f}%)")] = measure(teacher, student, arch_t, arch_s, images, labels)
    print(f"\nbatch {args.batch_size}, students freshly initialised, generated CIFAR-format images, torch {torch.__version__}")
    print_tables(rows)


if __name__ == "__main__":
    main()
