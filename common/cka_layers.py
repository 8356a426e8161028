"""CKA between the tapped layers of models, over a whole dataset in one pass.

Layers are module names of ``model.named_modules()`` (hooked with ``common.features.FeatureTaps``) or
"logits", the model's output. Each tap is flattened to (batch, features), so layers of any shape and
width can be compared; the estimator is ``common.cka_accumulate.MinibatchCKA``.
"""
from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from common.cka_accumulate import MIN_BATCH, MinibatchCKA
from common.features import FeatureTaps

__all__ = ["LOGITS", "LayerError", "check_layers", "merge_short_batches", "compute_cka_maps"]

# The user-facing name of a model's output; it is tapped as the root module ("" in named_modules()).
LOGITS = "logits"


class LayerError(ValueError):
    """A layer name the model does not have, or a layer whose output cannot be compared."""


def check_layers(model: nn.Module, arch: str, layers: Sequence[str] | None, stages: Sequence[str],
                 flag: str) -> list[str]:
    """The layers to tap (default: the stages, then the logits), each a module name of ``model`` or "logits"."""
    if not layers:
        return [*stages, LOGITS]
    modules = [name for name, _ in model.named_modules() if name]
    unknown = [name for name in layers if name != LOGITS and name not in modules]
    if unknown:
        hints = {name: difflib.get_close_matches(name, modules, n=3) for name in unknown}
        raise LayerError(f"{flag}: {arch} has no layer(s) {unknown} (closest module names: {hints}). Valid names: its "
                         f"stages {list(stages)}, '{LOGITS}', or any module name of model.named_modules(), e.g. "
                         f"{modules[:4]}.")
    if len(set(layers)) != len(layers):
        raise LayerError(f"{flag}: duplicate layer names in {list(layers)}.")
    return list(layers)


def merge_short_batches(batches: Iterable[Tensor], minimum: int = MIN_BATCH) -> Iterator[Tensor]:
    """Yield ``batches``, each one shorter than ``minimum`` joined to its neighbour (in practice: a short last
    batch to the one before it), so that every sample counts and every minibatch has a defined unbiased HSIC."""
    pending = None
    for batch in batches:
        if pending is None:
            pending = batch
        elif len(pending) < minimum or len(batch) < minimum:
            pending = torch.cat([pending, batch])
        else:
            yield pending
            pending = batch
    if pending is not None:
        yield pending


def _flatten(output, layer: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise LayerError(f"layer {layer!r} outputs a {type(output).__name__}, not a tensor; tap a module that returns "
                         "one tensor.")
    return output.reshape(output.shape[0], -1)


@torch.inference_mode()
def compute_cka_maps(rows: tuple[nn.Module, Sequence[str]], columns: Sequence[tuple[nn.Module, Sequence[str]]],
                     batches: Iterable[Tensor], total: int | None = None, progress: bool = True) -> list[MinibatchCKA]:
    """One pass over ``batches``: CKA of every row layer with every layer of each column model.

    ``rows`` and each of ``columns`` is ``(model, layer names)``; models are put in eval mode and
    each runs once per batch. Returns one accumulator per column model (``.compute()`` gives the matrix).
    """
    models = [rows, *columns]
    taps = [FeatureTaps(model.eval(), ["" if name == LOGITS else name for name in layers]) for model, layers in models]
    accumulators = [MinibatchCKA(len(rows[1]), len(layers)) for _, layers in columns]
    try:
        for images in tqdm(merge_short_batches(batches), total=total, desc="CKA map", unit="batch",
                           disable=not progress, file=sys.stderr):
            features = []
            for (model, layers), tap in zip(models, taps):
                model(images)
                features.append([_flatten(out, name) for out, name in zip(tap.pop(), layers)])
            for accumulator, column_features in zip(accumulators, features[1:]):
                accumulator.update(features[0], column_features)
    finally:
        for tap in taps:
            tap.remove()
    return accumulators


