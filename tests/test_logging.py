"""Specification of common/logging.py: log.txt as JSON lines, run metadata, console progress."""
from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.logging import (
    MetricLogger,
    SmoothedValue,
    append_jsonl,
    read_jsonl,
    run_metadata,
    write_json_atomic,
)


def test_jsonl_append_then_read_gives_the_records_in_order(tmp_path):
    path = tmp_path / "log.txt"
    records = [{"epoch": epoch, "test_acc1": 50.0 + epoch, "train_loss": 1.0 / (epoch + 1)} for epoch in range(3)]
    for record in records:
        append_jsonl(record, path)
    assert read_jsonl(path) == records
    assert path.read_text().count("\n") == 3


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "log.txt"
    append_jsonl({"epoch": 0}, path)
    with open(path, "a") as f:
        f.write('{"epoch": 1, "test_ac')  # the run was killed mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert read_jsonl(path) == [{"epoch": 0}]


def test_append_after_a_truncated_line_does_not_fuse_with_it(tmp_path):
    path = tmp_path / "log.txt"
    append_jsonl({"epoch": 0}, path)
    with open(path, "a") as f:
        f.write('{"epoch": 1, "test_ac')
    with pytest.warns(UserWarning, match="incomplete last line"):
        append_jsonl({"epoch": 1}, path)  # the resumed run logs epoch 1 again
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]


def test_damage_before_the_last_line_is_an_error_with_the_line_number(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_json_writers_accept_paths_and_scalar_tensors_and_reject_other_objects(tmp_path):
    write_json_atomic({"output_dir": Path("/runs/a"), "acc": torch.tensor(71.5)}, tmp_path / "args.json")
    assert json.loads((tmp_path / "args.json").read_text()) == {"output_dir": "/runs/a", "acc": 71.5}
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        append_jsonl({"x": object()}, tmp_path / "log.txt")
    assert not (tmp_path / "log.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["args.json"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_run_metadata_records_the_commit_of_a_git_checkout_and_whether_it_is_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text("print('hello')\n")
    git(repo, "add", "train.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
        "commit", "-q", "-m", "first")
    sha = git(repo, "rev-parse", "HEAD")

    metadata = run_metadata(argparse.Namespace(lr=0.05, seed=0), repo_dir=repo)
    assert metadata["git_commit"] == sha and metadata["git_dirty"] is False
    assert metadata["args"] == {"lr": 0.05, "seed": 0}
    assert metadata["torch"] == torch.__version__ and metadata["world_size"] == 1
    for key in ("hostname", "python", "torchvision", "cuda", "gpu", "start_time"):
        assert key in metadata
    json.dumps(metadata)  # writable as is into args.json

    (repo / "train.py").write_text("print('changed')\n")
    assert run_metadata({"lr": 0.05}, repo_dir=repo)["git_dirty"] is True


def test_run_metadata_outside_a_git_checkout_says_unknown(tmp_path):
    metadata = run_metadata(argparse.Namespace(), repo_dir=tmp_path)
    assert metadata["git_commit"] == "unknown" and metadata["git_dirty"] is None


def test_metric_logger_prints_progress_with_eta_and_a_total(capsys):
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.4f}"))
    for step in logger.log_every(range(25), print_freq=10, header="Epoch: [3]"):
        logger.update(loss=torch.tensor(1.0 / (step + 1)), lr=0.1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("  ")[1] for line in lines[:-1]] == ["[ 0/25]", "[10/25]", "[20/25]", "[24/25]"]
    assert all("eta: 0:00:00" in line and "loss: " in line and "lr: 0.1000" in line for line in lines[:-1])
    assert "time: " in lines[0] and "data: " in lines[0]
    assert lines[-1].startswith("Epoch: [3] Total time: 0:00:00")
    assert logger.loss.count == 25 and logger.lr.global_avg == pytest.approx(0.1)


def test_smoothed_value_statistics():
    meter = SmoothedValue(window_size=3)
    assert math.isnan(meter.global_avg)
    for value in [1.0, 2.0, 3.0, 10.0]:
        meter.update(value)
    meter.update(0.0, n=4)  # a batch of four with mean 0
    assert meter.median == 3.0 and meter.max == 10.0 and meter.value == 0.0
    assert meter.avg == pytest.approx(13 / 3)
    assert meter.global_avg == pytest.approx(16 / 8)


def test_metric_logger_rejects_non_numeric_values():
    with pytest.raises(TypeError, match="'name'"):
        MetricLogger().update(name="resnet56")


def test_unknown_meter_is_an_attribute_error():
    with pytest.raises(AttributeError, match="acc1"):
        MetricLogger(stream=io.StringIO()).acc1


def test_common_logging_does_not_shadow_the_standard_library_logging():
    code = (
        "import common.logging, common.dist, common.checkpoint, logging, sys\n"
        "assert logging is not common.logging and callable(logging.getLogger)\n"
        "assert sys.modules['logging'].__file__ != common.logging.__file__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
