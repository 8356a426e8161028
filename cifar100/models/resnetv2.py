"""ResNet18 and ResNet50 adapted to 32x32 CIFAR images.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016: the ImageNet ResNets
(four stages of 64/128/256/512 planes, BasicBlock or 4x Bottleneck), with the 7x7 stride-2 stem
and its max-pool replaced by one 3x3 stride-1 convolution, so the stages run at 32, 16, 8 and 4
pixels. Parameter names, shapes and arithmetic follow the CIFAR-100 teacher zoo of CRD
(HobbitLong/RepDistiller `models/resnetv2.py`) and mdistiller
(megvii-research/mdistiller `mdistiller/models/cifar/resnetv2.py`), so `cifar_teachers.tar`
checkpoints (ResNet50_vanilla) load with `strict=True`.

Unlike torchvision, the Bottleneck strides in its 3x3 convolution (ResNet v1.5) and the classifier
is called `linear`; both are fixed by the zoo's checkpoints.
"""

import torch
from torch import nn


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)
        # Not in-place, so a tap on the sum before the ReLU (a pre-activation feature) keeps it.
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.in_planes = 64
        self.layer1 = self._make_stage(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)

        # The zoo's initialisation; it matters for students trained from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [block(self.in_planes, planes, stride)]
        self.in_planes = planes * block.expansion
        blocks += [block(self.in_planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def ResNet18(num_classes: int = 100) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def ResNet50(num_classes: int = 100) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)
