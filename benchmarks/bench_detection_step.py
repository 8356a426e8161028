"""What PCKA costs in a RetinaNet R50-FPN training step: the student alone vs distilled, measured in the same run.

    python benchmarks/bench_detection_step.py [--size 512] [--batch 2] [--steps 3] [--device cpu]

Both models are randomly initialised (the cost does not depend on the weights), the teacher is a second RetinaNet
R50-FPN, and the batch is synthetic (random pixels, 5 boxes per image). Prints the step times, and PCKA's share of
the distilled step: the forward + backward of loss_pcka alone, timed on the same FPN maps. Needs detectron2.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import coco_detection.meta_arch  # noqa: F401  (registers DistillationDetector)
from coco_detection.config import add_distillation_config

CONFIG = Path(__file__).resolve().parents[1] / "coco_detection" / "configs" / "retinanet_R101_to_R50_pcka.yaml"


def make_cfg(device: str, size: int, teacher_config: str = "", teacher_weights: str = "", distill: bool = False):
    cfg = get_cfg()
    add_distillation_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = device, ""
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    if not distill:
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.TEACHER.CONFIG_FILE, cfg.TEACHER.WEIGHTS = teacher_config, teacher_weights
    return cfg


def synthetic_batch(batch: int, size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=g) * size * 0.6
        wh = torch.rand(5, 2, generator=g) * size * 0.3 + 16
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 80, (5,), generator=g)
        inputs.append({"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                       "instances": instances, "height": size, "width": size})
    return inputs


def time_steps(model, batch, steps: int, device: str) -> float:
    """Median seconds of forward + backward + SGD step, after one warm-up step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(steps + 1):
        with EventStorage(step):
            start = time.perf_counter()
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def time_pcka(model, batch, steps: int, device: str) -> float:
    """Median seconds of loss_pcka's forward + backward on this batch's FPN maps."""
    with torch.no_grad():
        images = model.teacher_images(batch)
        feats_t = model.teacher.backbone(images.tensor)
        feats_s = {k: v.clone() for k, v in model.student.backbone(model.student.preprocess_image(batch).tensor).items()}
    times = []
    for _ in range(steps + 1):
        leaves = {k: v.detach().requires_grad_(True) for k, v in feats_s.items()}
        start = time.perf_counter()
        model.distill_loss.terms(leaves, feats_t)["loss_pcka"].backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels (COCO trains at 800)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (the paper: 2 per GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = synthetic_batch(args.batch, args.size)

    alone = build_model(make_cfg(args.device, args.size))
    alone.train()
    with tempfile.TemporaryDirectory() as tmp:
        # The teacher: a random RetinaNet R50-FPN written in detectron2's checkpoint format, with its config.
        teacher_cfg = make_cfg(args.device, args.size)
        (Path(tmp) / "teacher.yaml").write_text(teacher_cfg.dump())
        torch.save({"model": build_model(teacher_cfg).state_dict()}, Path(tmp) / "teacher.pth")
        distilled = build_model(make_cfg(args.device, args.size, str(Path(tmp) / "teacher.yaml"),
                                         str(Path(tmp) / "teacher.pth"), distill=True))
    distilled.train()

    t_alone = time_steps(alone, batch, args.steps, args.device)
    t_distilled = time_steps(distilled, batch, args.steps, args.device)
    t_pcka = time_pcka(distilled, batch, args.steps, args.device)
    levels = distilled.distill_loss.levels
    print(f"RetinaNet R50-FPN step, {args.batch} x {args.size}x{args.size}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps; PCKA on {levels}, patch "
          f"{distilled.distill_loss.pcka.patch_size}, intra weight {distilled.distill_loss.pcka.intra_weight}")
    print(f"  student alone:                   {t_alone:8.3f} s")
    print(f"  distilled (teacher + PCKA):      {t_distilled:8.3f} s   ({t_distilled / t_alone:.2f}x the student alone)")
    print(f"  loss_pcka forward + backward:    {t_pcka:8.3f} s   = {100 * t_pcka / t_distilled:.1f}% of the distilled "
          f"step, {100 * t_pcka / t_alone:.1f}% of the student's step")
    print(f"  teacher forward and the rest:    {t_distilled - t_alone - t_pcka:8.3f} s")


if __name__ == "__main__":
    main()
