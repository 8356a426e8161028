"""Images per second of the CIFAR-100 training step, against baselines measured in the same run.

    python benchmarks/bench_cifar_step.py                       # generated data, CPU
    python benchmarks/bench_cifar_step.py --data_path ./data --device cuda --amp --channels_last

Runs cifar100/train.py's own ``train_one_epoch`` for --steps iterations of resnet56 -> resnet20,\n--rounds times with the variants alternating, and reports the median:
  rcka          RCKA loss, tensor data path (the default recipe)
  kd            the same step with the KD loss instead     -> what RCKA adds to a KD step (target <= 5%)
  rcka_pil      RCKA fed by the classic PIL DataLoader      -> the data path's share of a step
and each data path alone (no model), tensor vs PIL with --num_workers workers (target: >= 2x on CPU).
Without --data_path a small CIFAR-100 is generated in the true on-disk format (tests/cifar_fixtures.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cifar100 import train
from cifar100.data import TensorLoader, build_torchvision_loader, load_cifar100
from cifar100.models import build_model
from common.features import FeatureTaps

REPO = Path(__file__).resolve().parents[1]


class Limited:
    """The first `steps` batches of a loader, with a length (train_one_epoch's progress bar needs one)."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.steps)


def generated_cifar(n_train: int) -> Path:
    spec = importlib.util.spec_from_file_location("cifar_fixtures", REPO / "tests" / "cifar_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    root = Path(tempfile.mkdtemp(prefix="bench_cifar_"))
    fixtures.write_fake_cifar100(root, n_train=n_train, n_test=64, seed=0)
    return root


def loaders(bench, data_path, device):
    images, labels = load_cifar100(data_path, train=True, download=False, verify=False)
    tensor = TensorLoader(images, labels, bench.batch_size, train=True, device=device, seed=0,
                          channels_last=bench.channels_last)
    pil = build_torchvision_loader(data_path, True, bench.batch_size, bench.num_workers, seed=0,
                                   download=False, verify=False)
    return tensor, pil


def step_runner(method, loader, bench, device, data_path):
    """A function running `steps` iterations of train.py's train_one_epoch for this variant."""
    flags = ["--teacher", "resnet56", "--student", "resnet20", "--method", method, "--device", str(device),
             "--data_path", str(data_path), "--print_freq", "100000"] + (["--amp"] if bench.amp else [])
    args = train.get_args_parser().parse_args(flags)
    cfg = train.derive_config(args, world_size=1)
    memory_format = torch.channels_last if bench.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    student = build_model("resnet20").to(device, memory_format=memory_format)
    teacher = build_model("resnet56").eval().requires_grad_(False).to(device, memory_format=memory_format)
    student_taps = teacher_taps = None
    if method == "rcka":
        student_taps = FeatureTaps(student, train.select_stages("resnet20", "all"))
        teacher_taps = FeatureTaps(teacher, train.select_stages("resnet56", "all"))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = train.build_criterion(args, cfg)

    def run(steps):
        train.train_one_epoch(student, teacher, criterion, student_taps, teacher_taps, Limited(loader, steps),
                              optimizer, 0, device, args, cfg)

    return run


def loader_runner(loader, device):
    def run(steps):
        for images, _ in Limited(loader, steps):
            images.to(device, non_blocking=True)

    return run


def images_per_second(runners, bench, device):
    """Median throughput per variant over --rounds rounds that alternate the variants (the machine is noisy)."""
    for run in runners.values():
        run(bench.warmup)
    samples = {name: [] for name in runners}
    for _ in range(bench.rounds):
        for name, run in runners.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(bench.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(bench.steps * bench.batch_size / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=None, help="real CIFAR-100 (default: generate a small one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=2, help="workers of the PIL DataLoader")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--channels_last", action="store_true")
    bench = parser.parse_args()
    device = torch.device(bench.device)
    data_path = Path(bench.data_path) if bench.data_path else generated_cifar(bench.batch_size * (bench.steps + 8))
    tensor_loader, pil_loader = loaders(bench, data_path, device)

    results = images_per_second({
        "rcka": step_runner("rcka", tensor_loader, bench, device, data_path),
        "kd": step_runner("kd", tensor_loader, bench, device, data_path),
        "rcka_pil": step_runner("rcka", pil_loader, bench, device, data_path),
        "loader_tensor": loader_runner(tensor_loader, device),
        "loader_pil": loader_runner(pil_loader, device),
    }, bench, device)
    print()
    for name, value in results.items():
        print(f"{name:>14}: {value:10.1f} images/s")
    print(f"\ndevice {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {bench.batch_size}")
    print(f"RCKA step time / KD step time: {results['kd'] / results['rcka']:.3f} "
          f"(RCKA adds {100 * (results['kd'] / results['rcka'] - 1):+.1f}% to a KD step)")
    print(f"full step, tensor data path vs PIL DataLoader ({bench.num_workers} workers): "
          f"{results['rcka'] / results['rcka_pil']:.2f}x")
    print(f"data path alone, tensor vs PIL DataLoader ({bench.num_workers} workers): "
          f"{results['loader_tensor'] / results['loader_pil']:.2f}x")


if __name__ == "__main__":
    main()
