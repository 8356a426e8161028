"""common.features.FeatureTaps: hooks return stage outputs without changing the model's forward."""
import pytest
import torch
from torch import nn

from common.features import FeatureTaps


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def test_taps_return_outputs_of_named_modules_in_order_and_forward_is_unchanged():
    torch.manual_seed(0)
    net = small_net()
    x = torch.randn(2, 3, 8, 8)
    plain = net(x)
    with FeatureTaps(net, ["2", "0"]) as taps:
        logits = net(x)
        deep, shallow = taps.pop()
    assert torch.equal(logits, plain)
    assert deep.shape == (2, 8, 4, 4) and shallow.shape == (2, 4, 8, 8)
    assert torch.equal(shallow, net[0](x))
    # Removed on exit: no hooks left behind.
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_tapped_features_carry_gradients():
    net = small_net()
    taps = FeatureTaps(net, ["2.1"])
    net(torch.randn(2, 3, 8, 8))
    (feat,) = taps.pop()
    feat.sum().backward()
    assert net[0].weight.grad is not None


def test_unknown_tap_names_list_close_matches():
    with pytest.raises(ValueError, match=r"no submodule.*'2\.1'|closest"):
        FeatureTaps(small_net(), ["2.9"])


def test_pop_before_forward_is_a_clear_error_and_pop_clears():
    net = small_net()
    taps = FeatureTaps(net, ["0"])
    with pytest.raises(RuntimeError, match="forward pass"):
        taps.pop()
    net(torch.randn(1, 3, 8, 8))
    taps.pop()
    with pytest.raises(RuntimeError):
        taps.pop()
