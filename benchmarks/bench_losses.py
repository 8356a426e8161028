"""Speed and memory of the CKA losses against baselines measured in the same run.

    python benchmarks/bench_losses.py            # CPU (or --device cuda)

1. PCKA forward+backward on RetinaNet-sized FPN levels (batch 2, 256 channels, P3-P6 of an
   800x1216 input), centred and uncentred, against
   * its matmul bound: the same run's time for the Gram matmuls alone on contiguous patch
     matrices of the same shapes (teacher and student Grams plus the student's backward matmul,
     ``torch.bmm``; FLOPs printed). PCKA / bound is what the rest costs: resize, rearranging
     copies, centring, the resize's backward. Target: <= 2x. (On CPU, PCKA resizes with its
     compiled kernels, ``common/patch_kernels.py``, built here before timing, and pads P3's 70
     patch rows to 72, where MKL's Gram kernel is faster; the bound keeps the matrices' own shapes.)
   * a per-channel Python loop of the same maths (the paper's released code loops over channels
     like this). Target: batched >= 20x faster on CPU, same value to 1e-5.
   PCKA and its bound are timed in alternating rounds and the ratio is the median of the rounds'
   ratios, so that load from other processes hits both alike. On CPU this is repeated in
   ``--processes`` fresh processes (default 5) and the median process is reported with the
   range: the same code's ratio differs from one process to the next (see "Allocator").
2. RCKA forward+backward on resnet32x4 -> resnet8x4 stage features and logits at batch 64 vs
   the KD loss on the same logits (what an RCKA step adds over a KD step) and vs a naive RCKA
   that materialises the n x n centring matrix H and always uses the Gram form (compared with the
   centred figure form of ``RCKALoss``); the default (authors') form is timed against KD as well.
   The three RCKA forms run in alternating rounds on the same inputs.

Allocator (CPU): both sides allocate their outputs afresh, and glibc serves blocks over 32 MiB,
and whatever its heap history decides, as new pages, whose faults cost this 2-core VM up to 2 us
per 4 KiB. So the same command's PCKA time can swing by a third from one process to the next
(92 to 142 ms seen). ``--keep_freed_memory`` re-runs the script with glibc told to keep freed
memory (``GLIBC_TUNABLES`` mmap and trim thresholds of 1 and 4 GiB), as PyTorch's CUDA caching
allocator does: steadier, and harder on the ratio, since the matmul bound loses its page faults
too (and so does the per-channel loop, which gains the most). Beyond the allocator, on the 2-vCPU
VM where this was developed, phases in which other tenants fill the shared caches slow PCKA's
memory-bound work by up to 1.5x while the matmuls do not change (with torch's five resize passes
per map, 74 or 115 ms for the same code and heap; the compiled kernels, one pass, suffer less):
hence the alternating rounds and the median over processes.

Peak memory: bytes one forward+backward needs beyond the inputs. CUDA: the caching allocator's
counter. CPU: growth of the resident set's high-water mark over one step, in a fresh process per
variant (Linux; n/a elsewhere). No profiler runs, so nothing but the results is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import patch_kernels
from common.cli import UsageError, resolve_device
from common.losses import KDLoss, PCKALoss, RCKALoss
from common.patches import patchify

KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
FPN_SIZES = [(100, 152), (50, 76), (25, 38), (13, 19)]  # P3-P6 of 800x1216
STAGES_32X4 = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]  # resnet32x4 and resnet8x4 stages after the stem
PCKA_VARIANTS = ("pcka_batched", "pcka_uncentred")  # timed against the matmul bound


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


def pcka_matmul_inputs(feats_s, feats_t, patch_size=16):
    """Contiguous patch matrices (C, patches, B*p*p) per level, and the n x n matrices backward multiplies by."""
    levels = []
    for fs, ft in zip(feats_s, feats_t):
        xs, xt = patchify(fs.detach(), patch_size).contiguous(), patchify(ft, patch_size).contiguous()
        levels.append((xs, xt, torch.randn(xs.shape[0], xs.shape[1], xs.shape[1], device=xs.device)))
    return levels


def pcka_matmuls(levels):
    """PCKA's irreducible work: K = Xs Xs^T, L = Xt Xt^T, and the student's backward G Xs, per level."""
    for xs, xt, g in levels:
        torch.bmm(xs, xs.transpose(1, 2))
        torch.bmm(xt, xt.transpose(1, 2))
        torch.bmm(g, xs)


def pcka_matmul_flops(levels):
    return sum(2 * xs.shape[0] * xs.shape[1] * xs.shape[1] * xs.shape[2] * 3 for xs, _, _ in levels)


VARIANTS = {
    # Centred, as the naive baselines are, so that their values can be compared.
    "pcka_batched": ("pcka", lambda s, t: PCKALoss(centered=True)(feats_s=s, feats_t=t)),
    "pcka_uncentred": ("pcka", lambda s, t: PCKALoss(centered=False)(feats_s=s, feats_t=t)),
    "pcka_loop": ("pcka", pcka_loop),
    "rcka": ("rcka", lambda s, t, zs, zt: RCKALoss(centered=True, logit_row_norm=False, feature_form="gram")(
        feats_s=s, feats_t=t, logits_s=zs, logits_t=zt)),
    "rcka_naive": ("rcka", rcka_naive),
    # The default loss (the authors' computation: uncentred, row-normalised logit Grams, SP feature kernels).
    "rcka_default": ("rcka", lambda s, t, zs, zt: RCKALoss()(feats_s=s, feats_t=t, logits_s=zs, logits_t=zt)),
    "kd": ("rcka", lambda s, t, zs, zt: KDLoss()(logits_s=zs, logits_t=zt)),
}


def step(variant, inputs):
    for item in inputs:  # as zero_grad(set_to_none=True) before a training step
        for tensor in item if isinstance(item, list) else [item]:
            tensor.grad = None
    value = VARIANTS[variant][1](*inputs)
    value.backward()
    return value.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_variant(variant, device, repeats):
    inputs = make_inputs(VARIANTS[variant][0], device)
    step(variant, inputs)  # warm-up
    times = [timed(lambda: step(variant, inputs), device) for _ in range(repeats)]
    return statistics.median(times), step(variant, inputs).item()


def time_alternating(variants, device, repeats):
    """Variants on the same inputs in alternating rounds (as PCKA and its bound): median seconds and values."""
    inputs = make_inputs(VARIANTS[variants[0]][0], device)
    for variant in variants:
        step(variant, inputs)  # warm-up
    times = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            times[variant].append(timed(lambda: step(variant, inputs), device))
    return {variant: (statistics.median(times[variant]), step(variant, inputs).item()) for variant in variants}


def time_against_bound(variants, device, repeats):
    """PCKA variants and their matmul bound in alternating rounds; per-round ratios to the bound."""
    inputs = make_inputs("pcka", device)
    levels = pcka_matmul_inputs(*inputs)
    pcka_matmuls(levels)
    for variant in variants:
        step(variant, inputs)  # warm-up
    times = {name: [] for name in (*variants, "matmuls")}
    for _ in range(repeats):
        times["matmuls"].append(timed(lambda: pcka_matmuls(levels), device))
        for variant in variants:
            times[variant].append(timed(lambda: step(variant, inputs), device))
    ratios = {v: statistics.median(a / b for a, b in zip(times[v], times["matmuls"])) for v in variants}
    return {name: statistics.median(t) for name, t in times.items()}, ratios, pcka_matmul_flops(levels)


def _python_env():
    """The environment for a child process of this script: the repo importable."""
    repo = str(Path(__file__).resolve().parents[1])
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def time_against_bound_in_processes(variants, processes, repeats, threads):
    """``time_against_bound`` in fresh CPU processes: per variant, the median ratio and its range.

    Each process makes its own inputs and heap; the process with the median ratio gives the
    reported times.
    """
    runs = []
    for _ in range(processes):
        child = subprocess.run(
            [sys.executable, __file__, "--bound_child", "--repeats", str(repeats), "--threads", str(threads)],
            capture_output=True, text=True, env=_python_env(), check=True,
        )
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    ratios = {v: statistics.median(run["ratios"][v] for run in runs) for v in variants}
    spread = {v: (min(run["ratios"][v] for run in runs), max(run["ratios"][v] for run in runs)) for v in variants}
    median_run = sorted(runs, key=lambda run: run["ratios"][variants[0]])[(len(runs) - 1) // 2]
    return median_run["seconds"], ratios, spread, median_run["flops"]


def _bound_child(repeats):
    seconds, ratios, flops = time_against_bound(PCKA_VARIANTS, torch.device("cpu"), repeats)
    print(json.dumps({"seconds": seconds, "ratios": ratios, "flops": flops}))


def _status_bytes(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def peak_memory(variant, device, threads):
    """Peak bytes allocated by one forward+backward, over what the inputs already hold.

    CUDA: the caching allocator's own counter. CPU: a fresh process (nothing freed earlier is still
    resident) makes the inputs, resets its resident set's high-water mark and reports how far one
    step raised it (``_peak_child``; Linux).
    """
    if device.type == "cuda":
        inputs = make_inputs(VARIANTS[variant][0], device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(variant, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not sys.platform.startswith("linux"):
        return None
    env = _python_env()
    env.pop("GLIBC_TUNABLES", None)  # memory that malloc keeps would hide the step's growth
    child = subprocess.run(
        [sys.executable, __file__, "--peak_child", variant, "--threads", str(threads)],
        capture_output=True, text=True, env=env, check=True,
    )
    return int(child.stdout.strip().splitlines()[-1])


def _peak_child(variant):
    patch_kernels.load()  # the compiled module's import is no part of a step
    inputs = make_inputs(VARIANTS[variant][0], torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the resident set's high-water mark (VmHWM), here to the inputs' level
    base = _status_bytes("VmRSS")
    step(variant, inputs)
    print(_status_bytes("VmHWM") - base)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per variant (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--keep_freed_memory", action="store_true",
                        help="Linux: measure with glibc keeping freed memory, as a caching allocator (see 'Allocator')")
    parser.add_argument("--processes", type=int, default=5,
                        help="CPU: fresh processes that each time PCKA against its matmul bound (median reported)")
    parser.add_argument("--peak_child", default=None, help=argparse.SUPPRESS)  # internal: CPU peak memory
    parser.add_argument("--bound_child", action="store_true", help=argparse.SUPPRESS)  # internal: one process's ratios
    args = parser.parse_args()
    if args.keep_freed_memory and KEEP_FREED_MEMORY not in os.environ.get("GLIBC_TUNABLES", ""):
        env = os.environ | {"GLIBC_TUNABLES": ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), KEEP_FREED_MEMORY]))}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # the tunables are read at start-up
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(args.peak_child)
        return
    if args.bound_child:
        _bound_child(args.repeats)
        return
    try:
        device = resolve_device(args.device)  # a device this machine lacks is a one-line error, not a CUDA traceback
    except UsageError as err:
        parser.error(str(err))
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}.")

    kernels = None  # how PCKA resizes on CPU, for the summary line
    if device.type == "cpu":  # build PCKA's kernels here, once (about 30 s the first time), not in every child
        kernels = "compiled CPU kernels" if patch_kernels.load() is not None else \
            "torch operators (the CPU kernels did not build)"
    results = {}
    processes = args.processes if device.type == "cpu" else 1  # the spread to measure is the CPU VM's
    if processes > 1:
        seconds, bound_ratio, spread, flops = time_against_bound_in_processes(
            PCKA_VARIANTS, processes, args.repeats, torch.get_num_threads())
    else:
        seconds, bound_ratio, flops = time_against_bound(PCKA_VARIANTS, device, args.repeats)
        spread = {v: (bound_ratio[v], bound_ratio[v]) for v in PCKA_VARIANTS}
    # The RCKA forms in alternating rounds too: their ratio is what is reported. Not KD: its few
    # kilobytes would be timed cold, after each RCKA step, where a training step has them hot.
    rcka_timed = time_alternating(["rcka", "rcka_naive", "rcka_default"], device, args.repeats)
    for variant in VARIANTS:
        if variant in PCKA_VARIANTS:
            value = step(variant, make_inputs("pcka", device)).item()
            results[variant] = {"seconds": seconds[variant], "value": value, "matmul_ratio": bound_ratio[variant]}
        elif variant in rcka_timed:
            time_s, value = rcka_timed[variant]
            results[variant] = {"seconds": time_s, "value": value}
        else:
            repeats = 1 if variant == "pcka_loop" and device.type == "cpu" else args.repeats
            time_s, value = time_variant(variant, device, repeats)
            results[variant] = {"seconds": time_s, "value": value}
        results[variant]["peak_bytes"] = peak_memory(variant, device, torch.get_num_threads())
        peak = results[variant]["peak_bytes"]
        peak_text = f"{peak / 2**20:8.1f} MiB" if peak is not None else "     n/a"
        print(f"{variant:>14}: {results[variant]['seconds'] * 1e3:9.2f} ms  value {value:.6f}  peak {peak_text}")
    results["pcka_matmuls"] = {"seconds": seconds["matmuls"], "flops": flops}
    print(f"{'pcka_matmuls':>14}: {seconds['matmuls'] * 1e3:9.2f} ms  ({flops / 1e9:.2f} GFLOP: teacher and student "
          f"Grams + student backward, torch.bmm, {flops / seconds['matmuls'] / 1e9:.1f} GFLOP/s)")

    def ratio(a, b, key):
        if results[a][key] is None or results[b][key] is None:
            return float("nan")
        return results[a][key] / max(results[b][key], 1e-12)

    pcka_gap = abs(results["pcka_batched"]["value"] - results["pcka_loop"]["value"])
    print()
    malloc = "malloc keeps freed memory" if KEEP_FREED_MEMORY in os.environ.get("GLIBC_TUNABLES", "") else "default malloc"
    path = f", PCKA resize by {kernels}" if kernels else ""
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {malloc}{path}")
    where = f"median of {processes} processes of {args.repeats} alternating rounds each" if processes > 1 else \
        f"median of {args.repeats} alternating rounds"
    print(f"PCKA  batched / its Gram matmuls alone: {bound_ratio['pcka_batched']:5.2f}x centred, "
          f"{bound_ratio['pcka_uncentred']:5.2f}x uncentred ({where}; target <= 2x)")
    if processes > 1:
        print("      per process: " + ", ".join(
            f"{low:.2f}-{high:.2f}x {name}" for name, (low, high) in
            (("centred", spread["pcka_batched"]), ("uncentred", spread["pcka_uncentred"]))))
    for variant in PCKA_VARIANTS:
        results[variant]["matmul_ratio_range"] = list(spread[variant])
    print(f"PCKA  batched vs per-channel loop: {ratio('pcka_loop', 'pcka_batched', 'seconds'):6.1f}x faster, "
          f"{ratio('pcka_loop', 'pcka_batched', 'peak_bytes'):5.2f}x less peak memory, |value gap| {pcka_gap:.2e}")
    print(f"RCKA  vs naive (explicit H, Gram form): {ratio('rcka_naive', 'rcka', 'seconds'):6.2f}x faster, "
          f"{ratio('rcka_naive', 'rcka', 'peak_bytes'):5.2f}x less peak memory, "
          f"value gap {abs(results['rcka']['value'] - results['rcka_naive']['value']):.2e}")
    print(f"RCKA  loss time / KD loss time (batch 64, resnet32x4 -> resnet8x4): {ratio('rcka', 'kd', 'seconds'):6.1f}x "
          f"({results['rcka']['seconds'] * 1e3:.2f} ms vs {results['kd']['seconds'] * 1e3:.2f} ms)")
    print(f"RCKA default (authors' form) time / KD loss time: {ratio('rcka_default', 'kd', 'seconds'):6.1f}x "
          f"({results['rcka_default']['seconds'] * 1e3:.2f} ms vs {results['kd']['seconds'] * 1e3:.2f} ms)")
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
