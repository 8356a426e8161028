"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2: a 3x3 stem and
three stages of 6n+2 layers at 32, 16 and 8 pixels. Parameter names, shapes and arithmetic follow
the CIFAR-100 teacher zoo of CRD (HobbitLong/RepDistiller `models/resnet.py`) and mdistiller
(megvii-research/mdistiller `mdistiller/models/cifar/resnet.py`), so `cifar_teachers.tar`
checkpoints load with `strict=True` and reach their published accuracy.

Where the zoo departs from the paper, we follow the zoo: a shortcut that changes shape is a
strided 1x1 convolution + BN ("option B"), not the paper's zero-padding identity ("option A"), and
the "x4" variants widen the stem to 32 and the stages to 64/128/256, which gives resnet8x4 and
resnet32x4 a projection shortcut in the first block of stage 1 too.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Not in-place, so a tap on the sum before the ReLU (a pre-activation feature) keeps it.
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """Stem + three stages of BasicBlocks; `widths` = (stem, stage1, stage2, stage3) channels.

    Made for 32x32 inputs: the final 8x8 map is averaged by an 8x8 pool, as in the zoo.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. 20, 32, 56), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem, *stage_widths = widths

        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(stem, stage_widths[0], blocks_per_stage, stride=1)
        self.layer2 = _make_stage(stage_widths[0], stage_widths[1], blocks_per_stage, stride=2)
        self.layer3 = _make_stage(stage_widths[1], stage_widths[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(stage_widths[2], num_classes)

        # The zoo's initialisation; it matters for students trained from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_planes, planes, stride)]
    blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, (16, 16, 32, 64), num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, (16, 16, 32, 64), num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, (16, 16, 32, 64), num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes)
