"""MobileNetV2 at width 0.5 for CIFAR (the distillation zoo's `MobileNetV2` = `mobile_half`).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, Table 2
(expansion 6, the seven bottleneck stages), at width multiplier 0.5. Parameter names, shapes and
arithmetic follow the CIFAR-100 zoo of CRD (HobbitLong/RepDistiller `models/mobilenetv2.py`) and
mdistiller (megvii-research/mdistiller `mdistiller/models/cifar/mobilenetv2.py`), so checkpoints
saved by those code bases load with `strict=True`.

Where that zoo departs from the paper (and from torchvision), we follow the zoo: the stem keeps
stride 2 even on 32x32 images (stages run at 16, 16, 8, 4, 4, 2, 2 pixels); the first stage
(expansion 1) still has its 1x1 expansion conv; ReLU, not ReLU6; the last 1x1 conv keeps 1280
channels at width 0.5; no dropout before the classifier.
"""

import torch
from torch import nn

# (expansion, output channels at width 1, blocks, first stride) per stage: the paper's Table 2.
_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU - 3x3 depthwise - BN - ReLU - 1x1 project - BN (linear bottleneck)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Made for 32x32 inputs: the final 2x2 map is averaged by a 2x2 pool, as in the zoo."""

    def __init__(self, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for expansion, channels, num_blocks, stride in _STAGES:
            out_channels = int(channels * width_mult)
            stage = [InvertedResidual(in_channels, out_channels, stride, expansion)]
            for _ in range(num_blocks - 1):
                stage.append(InvertedResidual(out_channels, out_channels, 1, expansion))
            self.blocks.append(nn.Sequential(*stage))
            in_channels = out_channels
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1)
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        # A one-element Sequential because the checkpoints name the weights `classifier.0.*`.
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))

        # The zoo's initialisation; it matters for students trained from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(width_mult=0.5, num_classes=num_classes)
