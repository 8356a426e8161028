"""JPEG decoding for ImageNet: PIL against torchvision.io.decode_jpeg (per image, batched, and on the GPU).

    python benchmarks/bench_imagenet_decode.py                           # generated ImageNet-sized JPEGs
    python benchmarks/bench_imagenet_decode.py --data_path /imagenet     # the first --images of train/

Images per second on one CPU thread (a DataLoader worker's view; workers scale it by their number), median of
--rounds rounds with the variants alternating:
  decode only       PIL open + RGB convert | decode_jpeg one at a time | decode_jpeg on a list (batched)
                    | decode_jpeg on a list with device="cuda" (nvJPEG; only when CUDA is available, includes the
                    copy of the decoded batch back to nothing: it stays on the GPU, as a GPU pipeline would keep it)
  train transform   imagenet/data.py's own ImageList: decode + RandomResizedCrop(224) + flip → uint8, for
                    --decoder pil and --decoder torchvision
  val transform     the same for Resize(256) + CenterCrop(224)
The ratios against PIL decide imagenet/train.py's default --decoder.
Generated images: 500 x 375 (ImageNet's median size), smooth colour fields plus noise, JPEG quality 90, ~100 KB,
close to ImageNet's average file size of 110 KB.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from imagenet.data import ImageList, train_transform, val_transform


def generated_jpegs(count: int, folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500] / 100.0
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0.5, 3, size=3)
        base = np.stack([np.sin(a * xx + i), np.cos(b * yy - i), np.sin(c * (xx + yy))], axis=-1)
        image = np.clip(127 + 80 * base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(image).save(path, quality=90)
        paths.append(str(path))
    return paths


def real_jpegs(data_path: str, count: int) -> list[str]:
    paths = sorted(str(p) for p in (Path(data_path) / "train").glob("*/*.JPEG"))[:count]
    if not paths:
        raise SystemExit(f"no {Path(data_path) / 'train'}/*/*.JPEG")
    return paths


def timed(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=None, help="ImageNet folder (default: generate JPEGs)")
    parser.add_argument("--images", type=int, default=64, help="images per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DataLoader worker)")
    bench = parser.parse_args()
    torch.set_num_threads(bench.threads)
    paths = real_jpegs(bench.data_path, bench.images) if bench.data_path else \
        generated_jpegs(bench.images, Path(tempfile.mkdtemp(prefix="bench_decode_")))
    encoded = [read_file(p) for p in paths]
    mean_kb = sum(e.numel() for e in encoded) / len(encoded) / 1024
    samples = [(p, 0) for p in paths]
    n = len(paths)

    def pil_decode():
        for p in paths:
            with Image.open(p) as image:
                image.convert("RGB").load()

    def tv_decode_each():
        for data in encoded:
            decode_jpeg(data, mode=ImageReadMode.RGB)

    def tv_decode_batched():
        decode_jpeg(encoded, mode=ImageReadMode.RGB)

    def cuda_decode_batched():
        decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()

    def pipeline(decoder, transform):
        dataset = ImageList(samples, transform, decoder, seed=0)
        return lambda: [dataset[(i, 0)] for i in range(n)]

    variants = {
        "decode: PIL": pil_decode,
        "decode: decode_jpeg per image": tv_decode_each,
        "decode: decode_jpeg batched": tv_decode_batched,
    }
    if torch.cuda.is_available():
        cuda_decode_batched()  # warm-up: nvJPEG initialisation
        variants["decode: decode_jpeg batched, cuda"] = cuda_decode_batched
    for decoder in ("pil", "torchvision"):
        variants[f"train transform: --decoder {decoder}"] = pipeline(decoder, train_transform(224, decoder))
        variants[f"val transform: --decoder {decoder}"] = pipeline(decoder, val_transform(256, 224, decoder))
    rates = {name: [] for name in variants}
    for _ in range(bench.rounds):
        for name, fn in variants.items():
            rates[name].append(timed(fn, n))
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{n} JPEGs ({'from ' + bench.data_path if bench.data_path else 'generated 500x375, q90'}, mean "
          f"{mean_kb:.0f} KB), {bench.threads} thread(s), torch {torch.__version__}, median of {bench.rounds} rounds")
    baselines = {"decode": "decode: PIL", "train transform": "train transform: --decoder pil",
                 "val transform": "val transform: --decoder pil"}
    for name, rate in median.items():
        base = median[baselines[name.split(":")[0]]]
        print(f"  {name:42s} {rate:8.1f} images/s   x{rate / base:.2f} vs PIL")


if __name__ == "__main__":
    main()
