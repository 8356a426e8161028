"""Wide residual networks WRN-d-k (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation blocks
(BN-ReLU-conv3x3, BN-ReLU-conv3x3) in three stages of (d-4)/6 blocks with 16k, 32k and 64k
channels. Parameter names, shapes and arithmetic follow the CIFAR-100 teacher zoo of CRD
(HobbitLong/RepDistiller `models/wrn.py`) and mdistiller
(megvii-research/mdistiller `mdistiller/models/cifar/wrn.py`), so `cifar_teachers.tar`
checkpoints (wrn_40_2_vanilla) load with `strict=True`.

Two details of that zoo, kept here because the weights depend on them: when a block changes the
channel count, its 1x1 shortcut (`convShortcut`, named by the checkpoints) reads the *activated*
input BN-ReLU(x), not x; and the zoo trains without dropout, so there is none.
Stage outputs (`block1`..`block3`) are pre-activation sums; the final BN-ReLU runs after `block3`.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        # Not in-place: the block input is also the identity shortcut and may be a tapped feature.
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage; the extra `layer` level exists because the checkpoint keys have it."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        blocks = [BasicBlock(in_planes, out_planes, stride)]
        blocks += [BasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Made for 32x32 inputs: the final 8x8 map is averaged by an 8x8 pool, as in the zoo."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)

        # The zoo's initialisation (normal with std sqrt(2 / fan_out), zero biases); it matters
        # for students trained from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
