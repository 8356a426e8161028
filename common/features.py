"""Taps on intermediate layers of any model, so a model can be distilled without editing it.

``FeatureTaps`` records the outputs of named submodules with forward hooks. Hooks (rather than
torchvision's FX-based ``create_feature_extractor``) work on every model, traceable or not,
wrapped in DDP or not, including detectron2's, and leave ``forward(x)`` returning logits.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["FeatureTaps"]


class FeatureTaps:
    """Forward hooks on ``model``'s submodules ``names`` (as in ``named_modules()``).

    After a forward pass, ``pop()`` returns the recorded outputs in the order of ``names`` and
    clears them, so features never outlive the step that made them.

        taps = FeatureTaps(model, ["layer1", "layer2", "layer3"])
        logits = model(images)
        feats = taps.pop()
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            hints = {n: difflib.get_close_matches(n, list(modules), n=3) for n in unknown}
            raise ValueError(
                f"{type(model).__name__} has no submodule(s) {unknown}; closest names: {hints}. "
                "Names are those of model.named_modules()."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tap names in {list(names)}.")
        self.names = list(names)
        self._outputs: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in self.names]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            self._outputs[name] = output

        return hook

    def pop(self) -> list[Tensor]:
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(
                f"taps {missing} recorded nothing: run a forward pass of the model first, and check "
                "that these modules are used by its forward()."
            )
        outputs = [self._outputs[n] for n in self.names]
        self._outputs.clear()
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
