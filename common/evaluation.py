"""Evaluating a classifier over a (sharded) test set, and a fingerprint of its weights.

Both are the same for every classification task: the task passes its loader and, where its loader yields raw
images, the function that turns a batch into model input on the device.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common import dist

__all__ = ["evaluate_classifier", "state_dict_sha256"]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, device: torch.device, amp: bool,
                        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Top-1 / top-5 (%) and mean cross-entropy over the whole test set.

    Each process evaluates its shard (a sampler that gives every sample to exactly one process, such as
    ``dist.DistributedEvalSampler``) and the counts are summed over processes, so the result is that of the
    whole set. ``prepare`` maps a loader batch to model input on ``device`` (default: move it there). Pass the
    unwrapped model, not DDP: shards may differ in length.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        images = prepare(images) if prepare is not None else images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5.eq(targets[:, None])
        sums += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum(),
                             F.cross_entropy(logits.float(), targets, reduction="sum"),
                             torch.tensor(len(targets), device=device)]).double()
    sums = dist.all_reduce_sum(sums)
    count = sums[3].item()
    if count == 0:
        raise ValueError("the test set is empty: nothing to evaluate")
    return {"acc1": 100.0 * sums[0].item() / count, "acc5": 100.0 * sums[1].item() / count,
            "loss": sums[2].item() / count}


def state_dict_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights: equal on every rank of a correct DDP run, and across exact resumes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
