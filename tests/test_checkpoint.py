"""Specification of common/checkpoint.py: atomic saves, explained load failures, RNG states, the zoo format."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from torch import nn

from common.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_zoo_weights,
    rng_state,
    save_atomic,
    save_zoo_weights,
    set_rng_state,
    unwrap_model,
)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10))


def other_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10), nn.Linear(10, 10))


def test_save_atomic_replaces_the_file_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 1}, path)
    save_atomic({"epoch": 2}, path)
    assert load_checkpoint(path) == {"epoch": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_crash_during_save_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 1, "w": torch.arange(1000)}, path)

    def half_write_then_die(obj, f):
        f.write(b"PK\x03\x04 half of a zip archive")
        raise KeyboardInterrupt  # a Ctrl-C or a preemption signal in the middle of writing

    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()

    restored = load_checkpoint(path)
    assert restored["epoch"] == 1 and torch.equal(restored["w"], torch.arange(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_missing_checkpoint_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.pth"):
        load_checkpoint(tmp_path / "nothing_here.pth")


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_checkpoint_error_names_the_path_and_the_fix(tmp_path, keep_fraction):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"model": small_net().state_dict(), "epoch": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "Delete it" in message
    assert "Traceback" not in message


def test_garbage_file_is_reported_as_corrupt_not_as_a_pickle_error(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_every_file_of_random_bytes_is_a_corrupt_checkpoint_never_a_traceback(tmp_path):
    # torch's unpickler fails on garbage in several ways (UnpicklingError, IndexError, KeyError, ...); 200 fixed
    # draws hit each of them.
    path = tmp_path / "checkpoint.pth"
    for seed in range(200):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(CheckpointError, match="corrupt") as info:
            load_checkpoint(path)
        assert "weights_only=False" not in str(info.value)


def test_intact_file_with_arbitrary_objects_says_how_to_load_it_if_trusted(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"acc": np.float64(71.5)}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["acc"] == 71.5


def test_rng_round_trip_reproduces_random_numpy_and_torch_draws(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_atomic({"rng": rng_state()}, tmp_path / "rng.pth")

    def draws():
        return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()

    first = draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])  # weights_only=True must accept the state
    assert draws() == first


def test_restoring_cuda_rng_states_without_cuda_does_not_fail(monkeypatch):
    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as saved on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state(state)


def test_zoo_weights_round_trip(tmp_path):
    model = small_net()
    save_zoo_weights(model, tmp_path / "student_best.pth", epoch=239, acc=73.5)
    raw = torch.load(tmp_path / "student_best.pth", weights_only=True)
    assert set(raw) == {"model", "epoch", "acc"} and raw["epoch"] == 239

    fresh = small_net()
    info = load_zoo_weights(fresh, tmp_path / "student_best.pth", "small_net")
    assert info == {"epoch": 239, "acc": 73.5}
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_wrong_architecture_error_names_the_architecture_the_file_and_the_keys(tmp_path):
    path = tmp_path / "resnet56.pth"
    save_zoo_weights(other_net(), path, epoch=239, acc=72.3)
    with pytest.raises(CheckpointError) as info:
        load_zoo_weights(small_net(), path, "resnet20")
    message = str(info.value)
    assert "'resnet20'" in message and str(path) in message
    assert "unexpected in the file (2): 4.weight, 4.bias" in message
    assert "0.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3)" in message
    assert "--teacher" in message


def test_long_key_lists_are_cut_to_five(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(12)}, path)
    with pytest.raises(CheckpointError, match=r"\.\.\. and 7 more"):
        load_zoo_weights(small_net(), path, "small_net")


@pytest.mark.parametrize("layout", ["model", "state_dict", "bare"])
def test_zoo_loader_accepts_known_layouts_and_strips_the_ddp_prefix(tmp_path, layout):
    model = small_net()
    state_dict = {f"module.{key}": value for key, value in model.state_dict().items()}
    stored = state_dict if layout == "bare" else {layout: state_dict, "epoch": 10}
    torch.save(stored, tmp_path / "w.pth")
    fresh = small_net()
    load_zoo_weights(fresh, tmp_path / "w.pth", "small_net")
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_crd_style_best_acc_tensor_is_reported_as_a_number(tmp_path):
    torch.save({"model": small_net().state_dict(), "best_acc": torch.tensor(69.06), "epoch": 240}, tmp_path / "w.pth")
    info = load_zoo_weights(small_net(), tmp_path / "w.pth", "small_net")
    assert info["acc"] == pytest.approx(69.06) and info["epoch"] == 240


def test_file_without_weights_lists_its_keys(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="top-level keys are epoch, optimizer"):
        load_zoo_weights(small_net(), tmp_path / "w.pth", "small_net")


def test_unwrap_model_sees_through_compile_and_data_parallel():
    model = small_net()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(model) is model


def test_checkpoint_of_a_compiled_model_loads_into_a_plain_one(tmp_path):
    model = small_net()
    torch.save({"model": torch.compile(model).state_dict()}, tmp_path / "w.pth")
    load_zoo_weights(small_net(), tmp_path / "w.pth", "small_net")


def test_failed_save_of_an_unpicklable_object_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        save_atomic({"lock": threading.Lock()}, tmp_path / "x.pth")
    assert list(tmp_path.iterdir()) == []


def test_training_state_round_trip_restores_everything_a_resume_needs(tmp_path):
    from common.checkpoint import restore_training_state, save_training_state

    torch.manual_seed(0)
    model, criterion = small_net(), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(criterion.parameters()), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)
    model(torch.randn(4, 3, 3, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_training_state(tmp_path / "checkpoint.pth", model=model, criterion=criterion, optimizer=optimizer,
                        lr_scheduler=scheduler, epoch=3, best_acc1=42.0, best_epoch=2, identity={"seed": 0})
    expected_draw = torch.rand(3)
    fresh_model, fresh_criterion = small_net(), nn.Linear(2, 2)
    fresh_optimizer = torch.optim.SGD(list(fresh_model.parameters()) + list(fresh_criterion.parameters()), lr=0.1,
                                      momentum=0.9)
    fresh_scheduler = torch.optim.lr_scheduler.MultiStepLR(fresh_optimizer, milestones=[1], gamma=0.1)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["identity"] == {"seed": 0}
    assert restore_training_state(checkpoint, model=fresh_model, criterion=fresh_criterion, optimizer=fresh_optimizer,
                                  lr_scheduler=fresh_scheduler) == (4, 42.0, 2)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the saved run was
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(criterion.weight, fresh_criterion.weight)
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
