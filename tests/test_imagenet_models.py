"""imagenet/models.py: MobileNet-V1 as the KD literature uses it, torchvision's ResNets unchanged, FCKA's stages."""
import pytest
import torch
from torchvision.models import resnet34

from common.features import FeatureTaps
from imagenet.models import MODELS, STAGES, build_model

STAGE_SHAPES_224 = {  # (channels, height = width) of the four stages for one 224 x 224 image
    "resnet18": [(64, 56), (128, 28), (256, 14), (512, 7)],
    "resnet34": [(64, 56), (128, 28), (256, 14), (512, 7)],
    "resnet50": [(256, 56), (512, 28), (1024, 14), (2048, 7)],
    "mobilenet_v1": [(128, 56), (256, 28), (512, 14), (1024, 7)],
}


def test_mobilenet_v1_has_the_literatures_4_2_million_parameters():
    # Howard et al. (2017), Table 1 and the CRD/ReviewKD/DKD ImageNet student: 4.2 M parameters at width 1.0.
    model = build_model("mobilenet_v1")
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 13  # a full conv, then 13 depthwise-separable blocks
    assert sum(1 for c in convs if c.groups > 1) == 13


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_stage_has_the_documented_shape_and_the_logits_1000_classes(arch):
    model = build_model(arch).eval()
    with FeatureTaps(model, STAGES[arch]) as taps, torch.no_grad():
        logits = model(torch.zeros(1, 3, 224, 224))
        features = taps.pop()
    assert logits.shape == (1, 1000)
    assert [(f.shape[1], f.shape[2]) for f in features] == STAGE_SHAPES_224[arch]
    assert all(f.shape[2] == f.shape[3] for f in features)


def test_resnets_are_torchvisions_so_its_weights_load_strictly():
    build_model("resnet34").load_state_dict(resnet34(weights=None).state_dict(), strict=True)


def test_a_small_input_runs_through_every_model_for_the_cpu_tests():
    for arch in MODELS:
        assert build_model(arch, num_classes=4)(torch.zeros(2, 3, 16, 16)).shape == (2, 4)


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, mobilenet_v1"):
        build_model("resnet101")
