"""common/run.py on its own: the decision a start makes, the record it keeps, how reports read a folder."""
from __future__ import annotations

import json

import pytest
import torch

from common.run import Decision, RunConflictError, RunFolder, folder_suffix, identity_differences, read_run

IDENTITY = {"task": "t", "method": "rcka", "seed": 0, "lr": 0.05, "epochs": 2, "stages": ["a", "b"]}


def test_a_new_folder_is_new_and_the_same_identity_resumes_however_it_was_built(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.decide(IDENTITY).state == "new"
    folder.start(IDENTITY, {"lr": 0.05}, Decision("new"))
    (folder.checkpoint).write_bytes(b"x")
    spelled_differently = {**IDENTITY, "stages": ("a", "b")}  # a tuple where the stored JSON has a list
    assert folder.decide(spelled_differently).state == "resume"


def test_another_identity_is_a_conflict_that_lists_every_differing_key(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start(IDENTITY, {}, Decision("new"))
    with pytest.raises(RunConflictError) as info:
        folder.decide({**IDENTITY, "lr": 0.1, "seed": 1})
    message = str(info.value)
    assert "  lr: 0.05 there, 0.1 now" in message and "  seed: 0 there, 1 now" in message
    assert identity_differences(IDENTITY, {**IDENTITY, "lr": 0.1}) == [("lr", 0.05, 0.1)]


def test_a_checkpoint_resumes_with_more_epochs_but_not_fewer_than_it_has_trained(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    torch.save({"epoch": 2, "optimizer": {}, "identity": {**IDENTITY, "epochs": 5}}, folder.checkpoint)
    assert folder.read_checkpoint({**IDENTITY, "epochs": 3})["epoch"] == 2  # 3 trained, 3 asked: resumable
    with pytest.raises(RunConflictError, match=r"checkpoint.pth has already trained 3 epochs; --epochs 2 cannot "
                                               r"undo that: pass --epochs 3 or more"):
        folder.read_checkpoint({**IDENTITY, "epochs": 2})


def test_recording_marks_a_failed_or_interrupted_run_and_never_hides_the_error(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start(IDENTITY, {}, Decision("new"))
    with pytest.raises(ValueError, match="boom"), folder.recording():
        raise ValueError("boom")
    record = read_run(folder.path)
    assert (record.state, record.detail) == ("failed", "ValueError: boom")
    folder.start(IDENTITY, {}, Decision("resume"))
    with pytest.raises(KeyboardInterrupt), folder.recording():
        raise KeyboardInterrupt
    events = [json.loads(line)["event"] for line in folder.history_file.read_text().splitlines()]
    assert events == ["start", "failed", "start", "interrupted"]
    with pytest.raises(RuntimeError), folder.recording(main_process=False):  # other ranks write nothing
        raise RuntimeError("rank 1")
    assert len(folder.history_file.read_text().splitlines()) == 4


def test_folder_suffix_names_what_differs_from_the_recipe_readably_and_uniquely():
    recipe = {"lr": 0.05, "amp": False, "data": "verified", "stages": [1, 2]}
    assert folder_suffix(recipe, recipe) == ""
    assert folder_suffix({**recipe, "lr": 0.1, "amp": True}, recipe) == "lr0.1-amp"
    assert folder_suffix({**recipe, "data": "unverified"}, recipe) == "data_unverified"
    long_a = folder_suffix({**recipe, **{f"weight_{i}": i for i in range(20)}}, recipe)
    long_b = folder_suffix({**recipe, **{f"weight_{i}": i + 1 for i in range(20)}}, recipe)
    assert len(long_a) <= 60 and long_a != long_b
