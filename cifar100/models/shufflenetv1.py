"""ShuffleNet (v1) for CIFAR, 3 groups (the distillation zoo's `ShuffleV1`).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018, Table 1 with g = 3 (stages of 240, 480, 960 channels; 4, 8, 4 units).
Parameter names, shapes and arithmetic follow the CIFAR-100 zoo of CRD
(HobbitLong/RepDistiller `models/ShuffleNetv1.py`) and mdistiller
(megvii-research/mdistiller `mdistiller/models/cifar/ShuffleNetv1.py`), so checkpoints saved by
those code bases load with `strict=True`.

Where that zoo departs from the paper, we follow the zoo: the stem is a 1x1 conv to 24 channels
at full resolution (no 3x3 stride-2 conv, no max-pool), so the stages run at 16, 8 and 4 pixels;
a ReLU follows the depthwise conv's BN; the bottleneck width is a quarter of the unit's output
branch (for the concatenating first unit of a stage: (stage width - input width) / 4).
"""

import torch
from torch import nn


class ChannelShuffle(nn.Module):
    """Interleave the channels of `groups` groups: (g, C/g) -> (C/g, g).

    Written with unflatten/transpose/flatten rather than reading sizes off the tensor, so that
    torch.fx (and hence torchvision's create_feature_extractor) can trace it.
    """

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1, merged with the input.

    A stride-2 unit concatenates an average-pooled copy of its input, so its branch produces only
    `out_planes` = stage width - input width channels; a stride-1 unit adds its input.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int
    ):
        super().__init__()
        mid_planes = out_planes // 4
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.concat = stride == 2
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if self.concat else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        merged = torch.cat([out, shortcut], 1) if self.concat else out + shortcut
        return self.relu(merged)


class ShuffleNet(nn.Module):
    """Made for 32x32 inputs: the final 4x4 map is averaged by a 4x4 pool, as in the zoo."""

    def __init__(
        self,
        stage_planes: tuple[int, int, int] = (240, 480, 960),
        stage_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_stage(stage_planes[0], stage_blocks[0], groups)
        self.layer2 = self._make_stage(stage_planes[1], stage_blocks[1], groups)
        self.layer3 = self._make_stage(stage_planes[2], stage_blocks[2], groups)
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(stage_planes[2], num_classes)

    def _make_stage(self, planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        # The paper (and the zoo) does not group the very first 1x1 conv: 24 stem channels are too
        # few to split; the zoo detects that unit by its 24 input channels.
        first_groups = 1 if self.in_planes == 24 else groups
        blocks = [Bottleneck(self.in_planes, planes - self.in_planes, 2, groups, first_groups)]
        blocks += [Bottleneck(planes, planes, 1, groups, groups) for _ in range(num_blocks - 1)]
        self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def ShuffleV1(num_classes: int = 100) -> ShuffleNet:
    return ShuffleNet(num_classes=num_classes)
