"""The ImageNet-1k architectures of the paper's Table 2: torchvision's ResNet-18/34/50 and MobileNet-V1.

    model = build_model("resnet34")                 # torchvision's, untrained; teachers load their V1 weights
    model = build_model("mobilenet_v1")             # ours: the KD literature's MobileNet-V1 (see below)

``forward(x)`` returns logits only; FCKA taps the modules named in ``STAGES`` with forward hooks
(``common.features.FeatureTaps``), so torchvision's models are used unmodified and their ``state_dict`` is
exactly torchvision's: the published ``ResNet34_Weights.IMAGENET1K_V1`` / ``ResNet50_Weights.IMAGENET1K_V1`` files
load with ``strict=True``.

Stages and FCKA. Every architecture here has four stages after its stem, at strides 4, 8, 16 and 32 (56, 28, 14
and 7 pixels for a 224 input): torchvision's ``layer1`` .. ``layer4`` for the ResNets, and ``stage1`` .. ``stage4``
for MobileNet-V1, cut at the same strides. FCKA compares them one to one, summed over all four by default (as
on CIFAR-100 and in the first author's related code); the paper does not say which stages it used on ImageNet.
FCKA's Gram matrices are batch x batch, so stages with different channel counts (ResNet-50's 256..2048 against
MobileNet-V1's 128..1024) need no adapter. ``--fcka_stages`` in train.py overrides the choice.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18, resnet34, resnet50

__all__ = ["MODELS", "STAGES", "MobileNetV1", "build_model", "mobilenet_v1"]


class _DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (Howard et al. 2017, Fig. 3)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class MobileNetV1(nn.Module):
    """MobileNet-V1 (Howard et al., arXiv 1704.04861, Table 1) at width 1.0 for 224 x 224 inputs: 4.23 M parameters.

    This is the network the ImageNet KD literature distils ResNet-50 into (CRD, ReviewKD, DKD and the RCKA paper's
    Table 2, where it trains to about 70.1 % top-1 alone): a full 3x3 conv with stride 2, then 13 depthwise-separable
    blocks, global average pooling and one linear layer. We group the blocks into four stages that end where the
    resolution halves next (strides 4, 8, 16, 32, like torchvision's ResNet ``layer1`` .. ``layer4``), so FCKA
    can pair stages of a ResNet teacher and this student one to one:

        stem    conv 3->32 s2, dw-sep 32->64                112 x 112
        stage1  dw-sep 64->128 s2, 128->128                  56 x 56
        stage2  dw-sep 128->256 s2, 256->256                 28 x 28
        stage3  dw-sep 256->512 s2, 5 x 512->512             14 x 14
        stage4  dw-sep 512->1024 s2, 1024->1024               7 x 7

    ReLU, not ReLU6 (as the paper and the KD code bases use); activations are not in-place, so a tapped stage
    output is never overwritten.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()),
            _DepthwiseSeparable(32, 64, 1),
        )
        self.stage1 = nn.Sequential(_DepthwiseSeparable(64, 128, 2), _DepthwiseSeparable(128, 128, 1))
        self.stage2 = nn.Sequential(_DepthwiseSeparable(128, 256, 2), _DepthwiseSeparable(256, 256, 1))
        self.stage3 = nn.Sequential(_DepthwiseSeparable(256, 512, 2),
                                    *[_DepthwiseSeparable(512, 512, 1) for _ in range(5)])
        self.stage4 = nn.Sequential(_DepthwiseSeparable(512, 1024, 2), _DepthwiseSeparable(1024, 1024, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.fc(self.avgpool(x).flatten(1))


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes)


def _torchvision(builder):
    def build(num_classes: int = 1000) -> nn.Module:
        return builder(weights=None, num_classes=num_classes)

    build.__name__ = builder.__name__
    return build


MODELS = {
    "resnet18": _torchvision(resnet18),
    "resnet34": _torchvision(resnet34),
    "resnet50": _torchvision(resnet50),
    "mobilenet_v1": mobilenet_v1,
}

# The modules whose outputs FCKA compares (see the module docstring): four per architecture, strides 4 .. 32.
_RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]
STAGES = {
    "resnet18": _RESNET_STAGES,
    "resnet34": _RESNET_STAGES,
    "resnet50": _RESNET_STAGES,
    "mobilenet_v1": ["stage1", "stage2", "stage3", "stage4"],
}


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; ImageNet architectures: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)
