"""The CIFAR-100 model zoo of the distillation literature (CRD / RepDistiller, mdistiller).

Every model's `state_dict` has the keys and shapes of the public teacher checkpoints
(mdistiller's `cifar_teachers.tar`, weights under "model"), so they load with `strict=True`:

    model = build_model("resnet32x4")
    model.load_state_dict(torch.load(path, map_location="cpu")["model"])

`forward(x)` returns logits only. Intermediate features are taken from outside, by the module
names in `STAGES`, with torchvision's `create_feature_extractor` (every model here traces with
torch.fx) or with forward hooks on those modules:

    from torchvision.models.feature_extraction import create_feature_extractor
    taps = create_feature_extractor(model, return_nodes=STAGES["resnet32x4"])
    features = taps(images)  # {"layer1": ..., "layer2": ..., "layer3": ...}

ReLUs are never in-place, so a tapped tensor is not overwritten by a later activation.
All models expect 32x32 inputs: their final pooling windows are sized for it, as in the zoo.
"""

from torch import nn

from .mobilenetv2 import mobile_half
from .resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from .resnetv2 import ResNet18, ResNet50
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

# Names as the zoo spells them (checkpoint folders are `<name>_vanilla`): "vgg13" is the zoo's
# vgg13_bn, "MobileNetV2" its mobile_half (width 0.5).
MODELS = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "ResNet18": ResNet18,
    "ResNet50": ResNet50,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
}

# Stage features after the stem, in order: the zoo's feats[1:] (its feats[0] is the stem output),
# equal to them value for value. Each is the output of a module, so the names serve both as
# create_feature_extractor return_nodes and as forward-hook targets. Notes:
# - wrn: a stage's output is the pre-activation residual sum (the BN-ReLU comes in the next stage),
#   as in the zoo.
# - vgg: each blockN ends with its ReLU, so its output is the activated feature the zoo taps.
# - MobileNetV2: the zoo taps after stages 1, 2, 4 and 6 of the seven bottleneck stages
#   (0-based indices into `blocks`), i.e. at the last block of each resolution 16, 8, 4, 2.
_CIFAR_RESNET_STAGES = ["layer1", "layer2", "layer3"]
_WRN_STAGES = ["block1", "block2", "block3"]
_VGG_STAGES = ["block1", "block2", "block3", "block4"]
STAGES: dict[str, list[str]] = {
    **{name: list(_CIFAR_RESNET_STAGES) for name in MODELS if name.startswith("resnet")},
    "ResNet18": ["layer1", "layer2", "layer3", "layer4"],
    "ResNet50": ["layer1", "layer2", "layer3", "layer4"],
    **{name: list(_WRN_STAGES) for name in MODELS if name.startswith("wrn")},
    **{name: list(_VGG_STAGES) for name in MODELS if name.startswith("vgg")},
    "MobileNetV2": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
    "ShuffleV1": ["layer1", "layer2", "layer3"],
    "ShuffleV2": ["layer1", "layer2", "layer3"],
}


def build_model(name: str, num_classes: int = 100) -> nn.Module:
    """A freshly initialised model from the zoo, by its zoo name (see MODELS)."""
    if name not in MODELS:
        choices = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown CIFAR model {name!r}; valid choices: {choices}")
    return MODELS[name](num_classes=num_classes)


__all__ = ["MODELS", "STAGES", "build_model"]
