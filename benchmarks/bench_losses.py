"""Speed and memory of the CKA losses against baselines measured in the same run.

    python benchmarks/bench_losses.py            # CPU (or --device cuda)

1. PCKA forward+backward on RetinaNet-sized FPN levels (batch 2, 256 channels, P3-P6 of an
   800x1216 input) vs a per-channel Python loop of the same maths (the paper's released code
   loops over channels like this). Target: batched >= 20x faster on CPU, same value to 1e-5.
2. RCKA forward+backward on resnet32x4 -> resnet8x4 stage features and logits at batch 64 vs
   the KD loss on the same logits (what an RCKA step adds over a KD step) and vs a naive RCKA
   that materialises the n x n centring matrix H and always uses the Gram form (compared with the
   centred figure form of ``RCKALoss``); the default (authors') form is timed against KD as well.

Peak memory: bytes allocated by one forward+backward beyond the inputs (see ``peak_memory``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from common.losses import KDLoss, PCKALoss, RCKALoss

FPN_SIZES = [(100, 152), (50, 76), (25, 38), (13, 19)]  # P3-P6 of 800x1216
STAGES_32X4 = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]  # resnet32x4 and resnet8x4 stages after the stem


# ---------------------------------------------------------------- baselines written here, on purpose naive
def pcka_loop(feats_s, feats_t, patch_size=16, weight=10.0):
    """One channel at a time, as the released code does; centred Grams so values match ours."""
    total = 0.0
    for fs, ft in zip(feats_s, feats_t):
        b, c, h, w = fs.shape
        size = (-(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size)
        fs = F.interpolate(fs, size=size, mode="bilinear", align_corners=False)
        ft = F.interpolate(ft.detach(), size=size, mode="bilinear", align_corners=False)
        rows, cols = size[0] // patch_size, size[1] // patch_size
        per_channel = []
        for ch in range(c):
            def patches(f):
                x = f[:, ch].reshape(b, rows, patch_size, cols, patch_size)
                return x.permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)

            xs, xt = patches(fs), patches(ft)
            k, l = xs @ xs.T, xt @ xt.T
            n = k.shape[0]
            h_mat = torch.eye(n) - 1.0 / n
            k, l = h_mat @ k @ h_mat, h_mat @ l @ h_mat
            per_channel.append(1 - (k * l).sum() / (k.norm() * l.norm()))
        total = total + weight * torch.stack(per_channel).mean()
    return total


def rcka_naive(feats_s, feats_t, logits_s, logits_t, wf=1.0, wi=15.0, we=15.0):
    def cka(x, y):
        n = x.shape[0]
        h_mat = torch.eye(n, device=x.device) - 1.0 / n
        k, l = h_mat @ (x @ x.T) @ h_mat, h_mat @ (y @ y.T) @ h_mat
        return (k * l).sum() / (k.norm() * l.norm())

    fcka = sum(1 - cka(a.flatten(1), b.detach().flatten(1)) for a, b in zip(feats_s, feats_t))
    return wf * fcka + wi * (1 - cka(logits_s, logits_t.detach())) + we * (1 - cka(logits_s.T, logits_t.detach().T))


# ---------------------------------------------------------------- inputs and variants
def make_inputs(case, device):
    gen = torch.Generator().manual_seed(0)
    if case == "pcka":
        s = [torch.randn(2, 256, h, w, generator=gen) for h, w in FPN_SIZES]
        t = [0.5 * a + torch.randn(a.shape, generator=gen) for a in s]
        return [a.to(device).requires_grad_() for a in s], [a.to(device) for a in t]
    s = [torch.randn(64, *shape, generator=gen) for shape in STAGES_32X4]
    t = [torch.randn(64, *shape, generator=gen) for shape in STAGES_32X4]
    zs, zt = torch.randn(64, 100, generator=gen), torch.randn(64, 100, generator=gen)
    return [a.to(device).requires_grad_() for a in s], [a.to(device) for a in t], zs.to(device).requires_grad_(), zt.to(device)


VARIANTS = {
    # Centred, as the naive baselines are, so that their values can be compared.
    "pcka_batched": ("pcka", lambda s, t: PCKALoss(centered=True)(feats_s=s, feats_t=t)),
    "pcka_loop": ("pcka", pcka_loop),
    "rcka": ("rcka", lambda s, t, zs, zt: RCKALoss(centered=True, logit_row_norm=False, feature_form="gram")(
        feats_s=s, feats_t=t, logits_s=zs, logits_t=zt)),
    "rcka_naive": ("rcka", rcka_naive),
    # The default loss (the authors' computation: uncentred, row-normalised logit Grams, SP feature kernels).
    "rcka_default": ("rcka", lambda s, t, zs, zt: RCKALoss()(feats_s=s, feats_t=t, logits_s=zs, logits_t=zt)),
    "kd": ("rcka", lambda s, t, zs, zt: KDLoss()(logits_s=zs, logits_t=zt)),
}


def step(variant, inputs):
    value = VARIANTS[variant][1](*inputs)
    value.backward()
    return value.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(variant, device, repeats):
    inputs = make_inputs(VARIANTS[variant][0], device)
    step(variant, inputs)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(variant, inputs)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), step(variant, inputs).item()


def peak_memory(variant, device):
    """Peak bytes allocated by one forward+backward, over what the inputs already hold.

    CUDA: the caching allocator's own counter. CPU: torch's profiler memory timeline (a private
    API; if a torch release drops it we report None rather than a made-up number).
    """
    inputs = make_inputs(VARIANTS[variant][0], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(variant, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(variant, inputs)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    return max(sum(row) for row in sizes) if sizes else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for variant in VARIANTS:
        repeats = 1 if variant == "pcka_loop" and device.type == "cpu" else args.repeats
        seconds, value = time_variant(variant, device, repeats)
        results[variant] = {"seconds": seconds, "value": value, "peak_bytes": peak_memory(variant, device)}
        peak = results[variant]["peak_bytes"]
        peak_text = f"{peak / 2**20:8.1f} MiB" if peak is not None else "     n/a"
        print(f"{variant:>14}: {seconds * 1e3:9.2f} ms  value {value:.6f}  peak {peak_text}")

    def ratio(a, b, key):
        if results[a][key] is None or results[b][key] is None:
            return float("nan")
        return results[a][key] / max(results[b][key], 1e-12)

    pcka_gap = abs(results["pcka_batched"]["value"] - results["pcka_loop"]["value"])
    print()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"PCKA  batched vs per-channel loop: {ratio('pcka_loop', 'pcka_batched', 'seconds'):6.1f}x faster, "
          f"{ratio('pcka_loop', 'pcka_batched', 'peak_bytes'):5.2f}x less peak memory, |value gap| {pcka_gap:.2e}")
    print(f"RCKA  vs naive (explicit H, Gram form): {ratio('rcka_naive', 'rcka', 'seconds'):6.2f}x faster, "
          f"{ratio('rcka_naive', 'rcka', 'peak_bytes'):5.2f}x less peak memory, "
          f"value gap {abs(results['rcka']['value'] - results['rcka_naive']['value']):.2e}")
    print(f"RCKA  loss time / KD loss time (batch 64, resnet32x4 -> resnet8x4): {ratio('rcka', 'kd', 'seconds'):6.1f}x "
          f"({results['rcka']['seconds'] * 1e3:.2f} ms vs {results['kd']['seconds'] * 1e3:.2f} ms)")
    print(f"RCKA default (authors' form) time / KD loss time: {ratio('rcka_default', 'kd', 'seconds'):6.1f}x "
          f"({results['rcka_default']['seconds'] * 1e3:.2f} ms vs {results['kd']['seconds'] * 1e3:.2f} ms)")
    print(json.dumps({"device": str(device), "results": results}))


if __name__ == "__main__":
    main()
