"""Specification of the CIFAR-100 model zoo (`cifar100.models`).

The reference is `data/cifar_teacher_zoo_layout.json`, measured from the mdistiller model
definitions: matching it key for key is what lets the public teacher checkpoints load with
`strict=True`.
"""

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from cifar100.models import MODELS, STAGES, build_model

LAYOUT = json.loads((Path(__file__).parent / "data" / "cifar_teacher_zoo_layout.json").read_text())
NAMES = list(LAYOUT)
# The layout was measured on a 2x3x32x32 batch; its shapes start with that batch size.
BATCH = 2


@functools.cache
def _built(name: str) -> nn.Module:
    """One eval-mode model per name, shared by the tests that only read it."""
    torch.manual_seed(0)
    return build_model(name).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Batches of two gain nothing from intra-op threads, and on a busy 2-core machine their
    spin-waiting made this file ten times slower (13 s -> 130 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    # The shared models hold about 100M parameters; free them for the rest of the session.
    _built.cache_clear()


@functools.cache
def _images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_zoo_names_are_exactly_the_reference_architectures():
    assert sorted(MODELS) == sorted(LAYOUT)
    assert sorted(STAGES) == sorted(LAYOUT)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_equal_the_public_zoo(name):
    layout = {key: list(tensor.shape) for key, tensor in _built(name).state_dict().items()}
    assert layout == LAYOUT[name]["state_dict"]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_the_public_zoo(name):
    assert sum(p.numel() for p in _built(name).parameters()) == LAYOUT[name]["num_params"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_only_logits_of_the_zoo_shape(name):
    with torch.no_grad():
        logits = _built(name)(_images())
    assert isinstance(logits, torch.Tensor)
    assert list(logits.shape) == LAYOUT[name]["logits_shape"]


@pytest.mark.parametrize("name", NAMES)
def test_stages_traced_by_create_feature_extractor_have_the_zoo_feature_shapes(name):
    extractor = create_feature_extractor(_built(name), return_nodes=STAGES[name])
    with torch.no_grad():
        features = extractor(_images())
    assert list(features) == STAGES[name]
    assert [list(f.shape) for f in features.values()] == LAYOUT[name]["feat_shapes"][1:]


@pytest.mark.parametrize("name", NAMES)
def test_forward_hooks_on_stages_see_the_same_features_as_the_feature_extractor(name):
    model = _built(name)
    with torch.no_grad():
        traced = create_feature_extractor(model, return_nodes=STAGES[name])(_images())

    # Registered after tracing: torch.fx runs module hooks too, on its symbolic proxies.
    modules = dict(model.named_modules())
    hooked = {}

    def keep(stage):
        return lambda _module, _inputs, output: hooked.__setitem__(stage, output)

    handles = [modules[stage].register_forward_hook(keep(stage)) for stage in STAGES[name]]
    try:
        with torch.no_grad():
            logits = model(_images())
    finally:
        for handle in handles:
            handle.remove()
    assert list(hooked) == STAGES[name]
    for stage in STAGES[name]:
        torch.testing.assert_close(hooked[stage], traced[stage], rtol=0, atol=0)
    assert list(logits.shape) == LAYOUT[name]["logits_shape"]


@pytest.mark.parametrize("name", NAMES)
def test_zoo_format_checkpoint_loads_strictly_and_reproduces_logits(name, tmp_path):
    torch.manual_seed(1)
    saved = build_model(name).eval()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": saved.state_dict()}, path)

    torch.manual_seed(2)
    loaded = build_model(name).eval()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    loaded.load_state_dict(checkpoint["model"], strict=True)

    with torch.no_grad():
        torch.testing.assert_close(loaded(_images()), saved(_images()), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_build_model_honours_num_classes(name):
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(_images()).shape == (BATCH, 10)


def test_build_model_rejects_an_unknown_name_listing_every_choice_sorted():
    with pytest.raises(ValueError, match="nope") as error:
        build_model("nope")
    assert ", ".join(sorted(MODELS)) in str(error.value)
