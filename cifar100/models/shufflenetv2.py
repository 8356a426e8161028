"""ShuffleNet V2 1x for CIFAR (the distillation zoo's `ShuffleV2`).

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
ECCV 2018, Table 5 at 1x (stages of 116, 232, 464 channels; 1024-channel last conv). Parameter
names, shapes and arithmetic follow the CIFAR-100 zoo of CRD (HobbitLong/RepDistiller
`models/ShuffleNetv2.py`) and mdistiller (megvii-research/mdistiller
`mdistiller/models/cifar/ShuffleNetv2.py`), so checkpoints saved by those code bases load with
`strict=True`.

Where that zoo departs from the paper, we follow the zoo: the stem is a 1x1 conv to 24 channels
at full resolution (no 3x3 stride-2 conv, no max-pool), so the stages run at 16, 8 and 4 pixels.
Each stage is one downsampling unit followed by 3, 7, 3 basic units, as in the paper.
"""

import torch
from torch import nn

from .shufflenetv1 import ChannelShuffle


class BasicBlock(nn.Module):
    """Split channels in half, transform the second half, concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        # Fixed here, not computed from x.size(), so that torch.fx can trace the block.
        self.split = channels // 2
        branch = channels - self.split
        self.conv1 = nn.Conv2d(branch, branch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(branch)
        self.conv2 = nn.Conv2d(branch, branch, 3, padding=1, groups=branch, bias=False)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = nn.Conv2d(branch, branch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x[:, : self.split], x[:, self.split :]
        out = self.relu(self.bn1(self.conv1(transformed)))
        out = self.bn2(self.conv2(out))
        out = self.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class DownBlock(nn.Module):
    """Two stride-2 branches, each producing half of the output channels, concatenated, shuffled.

    Left: depthwise 3x3 (conv1), 1x1 (conv2).
    Right: 1x1 (conv3), depthwise 3x3 (conv4), 1x1 (conv5).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid_channels = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(mid_channels, mid_channels, 3, 2, 1, groups=mid_channels, bias=False)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)
        self.relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = self.relu(self.bn2(self.conv2(left)))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = self.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """Made for 32x32 inputs: the final 4x4 map is averaged by a 4x4 pool, as in the zoo."""

    def __init__(
        self,
        stage_channels: tuple[int, int, int] = (116, 232, 464),
        stage_blocks: tuple[int, int, int] = (3, 7, 3),
        last_channels: int = 1024,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_channels = (24,) + tuple(stage_channels[:-1])
        self.layer1 = _make_stage(in_channels[0], stage_channels[0], stage_blocks[0])
        self.layer2 = _make_stage(in_channels[1], stage_channels[1], stage_blocks[1])
        self.layer3 = _make_stage(in_channels[2], stage_channels[2], stage_blocks[2])
        self.conv2 = nn.Conv2d(stage_channels[2], last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _make_stage(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    blocks = [BasicBlock(out_channels) for _ in range(num_blocks)]
    return nn.Sequential(DownBlock(in_channels, out_channels), *blocks)


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
