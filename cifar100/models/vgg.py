"""VGG with batch normalisation for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, configurations A (vgg11), B (vgg13), D (vgg16) and E (vgg19), plus the distillation
community's one-conv-per-stage vgg8; every conv is followed by BN. Parameter names, shapes and
arithmetic follow the CIFAR-100 teacher zoo of CRD (HobbitLong/RepDistiller `models/vgg.py`) and
mdistiller (megvii-research/mdistiller `mdistiller/models/cifar/vgg.py`, the `*_bn` builders), so
`cifar_teachers.tar` checkpoints (vgg13_vanilla) load with `strict=True`.

The zoo's CIFAR layout, not the paper's: five conv stages `block0`..`block4` with a 2x2 max-pool
after each of the first three only (32 -> 16 -> 8 -> 4), so `block3` and `block4` both run at 4x4;
then global average pooling and a single linear classifier (no 4096-wide FC layers). The zoo adds a
fourth max-pool before `block4` only for 64x64 inputs (Tiny-ImageNet); these models are for 32x32
CIFAR images and leave that branch out, which also keeps them traceable by torch.fx.
"""

import torch
from torch import nn

# Conv widths of the five stages, per depth.
STAGE_WIDTHS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_stage(in_channels: int, widths: list[int]) -> nn.Sequential:
    """(conv3x3 with bias, BN, ReLU) per width.

    The checkpoints index these as `blockN.<i>`, counting the parameter-free ReLUs, so the
    order conv, BN, ReLU is fixed. The zoo applies the stage's last ReLU outside the Sequential;
    keeping it inside makes the stage's output the activated feature and changes no key.
    """
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, stage_widths: list[list[int]], num_classes: int = 100):
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in stage_widths[:-1]]
        self.block0 = _make_stage(in_channels[0], stage_widths[0])
        self.pool0 = nn.MaxPool2d(2)
        self.block1 = _make_stage(in_channels[1], stage_widths[1])
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _make_stage(in_channels[2], stage_widths[2])
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _make_stage(in_channels[3], stage_widths[3])
        self.block4 = _make_stage(in_channels[4], stage_widths[4])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(stage_widths[4][-1], num_classes)

        # The zoo's initialisation; it matters for students trained from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(STAGE_WIDTHS[8], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(STAGE_WIDTHS[11], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(STAGE_WIDTHS[13], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(STAGE_WIDTHS[16], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(STAGE_WIDTHS[19], num_classes)
