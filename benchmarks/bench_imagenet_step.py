"""Cost of one ImageNet distillation step (Table 2's pairs): FLOPs per image and measured images/s, and from them the
wall time of a 100-epoch run on 8 GPUs, as an ESTIMATE.

    python benchmarks/bench_imagenet_step.py --steps 0                       # FLOPs and the FLOP-based estimate only
    python benchmarks/bench_imagenet_step.py --device cuda --batch_size 64   # one GPU at the recipe's 64 per GPU

  GFLOP/image   teacher forward + 3 x student forward (backward ~ 2 x forward), counted on the forward passes by
                torch.utils.flop_counter (its count for the backward of grouped convolutions, MobileNet's depthwise
                ones, is several times too high, so backward is not counted directly)
  FLOP estimate 100 epochs of 1,281,167 images + 50,000 validation images (forward only) at --reference_tflops
                sustained per GPU on --gpus GPUs. The default, 51 TFLOP/s, is what NVIDIA's published ResNet-50 v1.5
                mixed-precision training throughput on a DGX A100 implies (16,621 images/s on 8 A100-80GB with DALI,
                NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5, x 24.6 GFLOP per image).
  images/s      with --steps > 0: imagenet/train.py's own train_one_epoch on random uint8 images on this device
                (no data loading: bench_imagenet_decode.py measures that), median of --rounds; and the 100-epoch
                time on --gpus such devices if the step scales linearly and the data pipeline keeps up.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.features import FeatureTaps
from common.losses import build_distillation_loss
from imagenet import train
from imagenet.models import build_model

TRAIN_IMAGES, VAL_IMAGES, EPOCHS = 1_281_167, 50_000, 100


class RandomImages:
    def __init__(self, steps, batch_size, size, num_classes, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)


def measure(pair, method, bench, device):
    teacher_name, student_name = pair
    flags = ["--teacher", teacher_name, "--student", student_name, "--method", method, "--print_freq", "1000000",
             "--device", str(device)]
    args = train.get_args_parser().parse_args(flags)
    cfg = train.derive_config(args, 1, device.type)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    torch.manual_seed(0)
    student = build_model(student_name).to(device, memory_format=memory_format)
    teacher = build_model(teacher_name).eval().requires_grad_(False).to(device, memory_format=memory_format)
    criterion = build_distillation_loss(method, train.loss_settings(args, cfg))
    taps = (None, None)
    if criterion is not None and criterion.needs_features:
        taps = (FeatureTaps(student, train.select_stages(student_name, "all")),
                FeatureTaps(teacher, train.select_stages(teacher_name, "all")))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    prepare = lambda images: train.to_model_input(images, device, cfg["channels_last"])  # noqa: E731

    def steps(count):
        loader = RandomImages(count, bench.batch_size, 224, 1000)
        with contextlib.redirect_stdout(io.StringIO()):  # train_one_epoch's progress lines
            train.train_one_epoch(student, teacher if criterion is not None else None, criterion, *taps, loader,
                                  prepare, optimizer, 5, device, args, cfg)

    gflop = 3 * forward_gflop(student, device, memory_format)
    if criterion is not None:
        gflop += forward_gflop(teacher, device, memory_format)
    if bench.steps == 0:
        return gflop, forward_gflop(student, device, memory_format), None
    rates = []
    for _ in range(bench.rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        steps(bench.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(bench.steps * bench.batch_size / (time.perf_counter() - start))
    for tap in taps:
        if tap is not None:
            tap.remove()
    return gflop, forward_gflop(student, device, memory_format), statistics.median(rates)


def forward_gflop(model, device, memory_format) -> float:
    """GFLOP of one forward pass of one 224 x 224 image (a multiply-add counts 2)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device=device).contiguous(memory_format=memory_format))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8, help="per device (the recipe: 512 / 8 GPUs = 64)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=8, help="devices per run for the 100-epoch estimate")
    parser.add_argument("--methods", nargs="+", default=["ce", "kd", "rcka"])
    parser.add_argument("--reference_tflops", type=float, default=51.0,
                        help="sustained TFLOP/s per GPU for the FLOP-based estimate (see the docstring)")
    bench = parser.parse_args()
    device = torch.device(bench.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), batch "
          f"{bench.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {bench.rounds}")
    for pair in (("resnet34", "resnet18"), ("resnet50", "mobilenet_v1")):
        for method in bench.methods:
            gflop, student_gflop, rate = measure(pair, method, bench, device)
            work = EPOCHS * (TRAIN_IMAGES * gflop + VAL_IMAGES * student_gflop)  # GFLOP of a run
            flop_hours = work / (bench.reference_tflops * 1e3 * bench.gpus) / 3600
            line = (f"  {pair[0]} -> {pair[1]:13s} {method:5s} {gflop:6.2f} GFLOP/image   FLOP estimate: "
                    f"{flop_hours:5.1f} h on {bench.gpus} GPUs at {bench.reference_tflops:g} TFLOP/s each")
            if rate is not None:
                hours = EPOCHS * (TRAIN_IMAGES + VAL_IMAGES / 3) / (rate * bench.gpus) / 3600
                line += f"   measured {rate:8.1f} images/s -> {hours:7.1f} h on {bench.gpus} such devices"
            print(line)

if __name__ == "__main__":
    main()
