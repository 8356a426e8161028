"""cifar100/cka_map.py (and common/cka_map.py, cka_layers.py, cka_plot.py) on models, run folders and generated data."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar100 import cka_map as cifar_cka_map
from cifar100 import train
from cifar100.data import DatasetNotFoundError
from common.checkpoint import CheckpointError
from common.cka_layers import LayerError, merge_short_batches
from common.cka_map import CKAMapError, main
from common.cka_plot import Panel, figure_size
from cifar_fixtures import write_fake_cifar100, write_teacher_zoo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), n_train=128, n_test=40, seed=0)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return write_teacher_zoo(tmp_path_factory.mktemp("zoo"), "resnet8")


@pytest.fixture(scope="module")
def teacher_ckpt(zoo_dir):
    return zoo_dir / "cifar_teachers" / "resnet8_vanilla" / "ckpt_epoch_240.pth"


@pytest.fixture(scope="module")
def runs(cifar_root, zoo_dir, tmp_path_factory):
    """Run folders of cifar100/train.py: resnet8 distilled from the resnet8 zoo teacher with KD and with RCKA, 1 epoch."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("kd", "rcka"):
        train.main(train.get_args_parser().parse_args(
            ["--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu", "--epochs", "1",
             "--batch_size", "64", "--print_freq", "1000", "--output_dir", str(root / method), "--student", "resnet8",
             "--teacher", "resnet8", "--method", method, "--zoo_dir", str(zoo_dir)]))
    return {method: root / method for method in ("kd", "rcka")}


def run_map(cifar_root, out, *args):
    """cka_map in-process, as the command line would call it; returns the JSON record."""
    parsed = cifar_cka_map.get_args_parser().parse_args(
        [*args, "--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu",
         "--batch_size", "16", "--no_progress", "--output_dir", str(out)])
    return main(parsed, cifar_cka_map.TASK)


def test_model_compared_with_itself_has_unit_diagonal(cifar_root, teacher_ckpt, tmp_path):
    record = run_map(cifar_root, tmp_path, str(teacher_ckpt), str(teacher_ckpt), "--arch_a", "resnet8",
                     "--arch_b", "resnet8")
    matrix = np.array(record["panels"][0]["cka"])
    assert record["panels"][0]["rows"]["layers"] == ["layer1", "layer2", "layer3", "logits"]
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert (matrix[~np.eye(4, dtype=bool)] < 0.999).all()
    # 40 test images in batches of 16: the short last batch of 8 is kept as its own minibatch (>= 4 samples).
    assert (record["num_samples"], record["num_batches"]) == (40, 3)
    assert "unverified data" in record["data"]


def test_map_image_is_written_opens_and_has_expected_size(cifar_root, teacher_ckpt, tmp_path):
    record = run_map(cifar_root, tmp_path, str(teacher_ckpt), str(teacher_ckpt), "--arch_a", "resnet8",
                     "--arch_b", "resnet8", "--layers_a", "layer2,layer3,logits", "--layers_b", "layer3,fc", "--dpi", "80")
    panel = record["panels"][0]
    width, height = figure_size([Panel(np.array(panel["cka"]), panel["rows"]["layers"], panel["columns"]["layers"],
                                       "", "")])
    with Image.open(tmp_path / "cka_map.png") as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (round(width * 80), round(height * 80)) == tuple(record["png_size"])
        assert np.asarray(image.convert("L")).std() > 10  # not blank
    with open(tmp_path / "cka_map.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == ["layer3", "fc"] and [row[0] for row in table[1:]] == ["layer2", "layer3", "logits"]
    np.testing.assert_allclose(np.array([row[1:] for row in table[1:]], dtype=float), panel["cka"], atol=1e-6)
    # The fc layer's output is the logits: the two names give the same representation.
    assert panel["cka"][2][1] == pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "cka_map.json").read_text()) == record


def test_one_run_folder_maps_its_teacher_against_its_student(cifar_root, runs, tmp_path):
    # --which last: a run whose test accuracy never rises above 0 (one epoch on generated data) writes no
    # student_best.pth.
    record = run_map(cifar_root, tmp_path, str(runs["rcka"]), "--which", "last")
    rows, columns = record["models"]
    assert rows["label"] == "resnet8 (teacher)" and rows["checkpoint"].endswith("ckpt_epoch_240.pth")
    assert columns["label"] == "resnet8 rcka seed0" and columns["checkpoint"] == str(runs["rcka"] / "student_last.pth")


def test_compare_against_a_teacher_given_as_a_checkpoint(cifar_root, runs, teacher_ckpt, tmp_path):
    record = run_map(cifar_root, tmp_path, str(teacher_ckpt), "--arch_a", "resnet8", "--compare", str(runs["kd"]),
                     str(runs["rcka"]), "--which", "last", "--layers_a", "layer3,logits")
    assert [m["label"] for m in record["models"]] == ["resnet8 (ckpt_epoch_240.pth)", "resnet8 kd seed0",
                                                      "resnet8 rcka seed0"]
    assert [np.array(p["cka"]).shape for p in record["panels"]] == [(2, 4), (2, 4)]


def test_compare_kd_and_rcka_runs_of_train_py_from_the_command_line(cifar_root, runs, tmp_path):
    out = tmp_path / "kd_vs_rcka"
    result = subprocess.run(
        [sys.executable, str(REPO / "cifar100" / "cka_map.py"), "--compare", str(runs["kd"]), str(runs["rcka"]),
         "--which", "last", "--data_path", str(cifar_root), "--no_verify_data", "--no_download", "--device", "cpu",
         "--batch_size", "10", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "CKA map: 100%" in result.stderr  # the progress bar
    record = json.loads((out / "cka_map.json").read_text())
    assert [m["label"] for m in record["models"]] == ["resnet8 (teacher)", "resnet8 kd seed0", "resnet8 rcka seed0"]
    assert [p["csv"] for p in record["panels"]] == ["cka_map_a.csv", "cka_map_b.csv"]
    for panel in record["panels"]:
        assert np.array(panel["cka"]).shape == (4, 4) and np.isfinite(panel["cka"]).all()
        assert (out / panel["csv"]).is_file()
    with Image.open(out / "cka_map.png") as image:
        assert image.size == tuple(record["png_size"])
    assert str(out / "cka_map.png") in result.stdout


def test_bad_input_exits_with_a_clear_error_and_no_traceback(cifar_root, teacher_ckpt, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "cifar100" / "cka_map.py"), str(teacher_ckpt), str(teacher_ckpt), "--arch_a",
         "resnet8", "--arch_b", "resnet8", "--layers_b", "layer9", "--data_path", str(cifar_root), "--no_download"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: --layers_b: resnet8 has no layer(s) ['layer9']" in result.stderr
    assert "['layer1', 'layer2', 'layer3']" in result.stderr and "'logits'" in result.stderr


def test_unknown_architecture_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar_cka_map.get_args_parser().parse_args(["a.pth", "b.pth", "--arch_a", "resnet9000"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "invalid choice: 'resnet9000'" in err and "resnet20" in err and "wrn_40_2" in err


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,error,message", [
    ("missing path", CKAMapError, "does not exist: pass a run folder"),
    ("checkpoint without architecture", CKAMapError, "does not record its architecture: pass --arch_a ARCH"),
    ("corrupt checkpoint", CheckpointError, "corrupt or truncated"),
    ("checkpoint of another architecture", CheckpointError, "resnet20"),
    ("folder without weights", CKAMapError, "student_best.pth does not exist"),
    ("run without a teacher", CKAMapError, "does not come from a distillation run with a teacher"),
    ("three models", CKAMapError, "got 3 models"),
    ("missing dataset", DatasetNotFoundError, "To fix"),
])
def test_bad_input_gives_a_clear_error(case, error, message, cifar_root, teacher_ckpt, tmp_path):
    teacher = str(teacher_ckpt)
    args = {
        "missing path": [str(tmp_path / "nowhere"), teacher, "--arch_b", "resnet8"],
        "checkpoint without architecture": [teacher, teacher, "--arch_b", "resnet8"],
        "corrupt checkpoint": [str(write_bytes(tmp_path / "bad.pth", b"not a checkpoint")), teacher, "--arch_a",
                               "resnet8", "--arch_b", "resnet8"],
        "checkpoint of another architecture": [teacher, teacher, "--arch_a", "resnet20", "--arch_b", "resnet8"],
        "folder without weights": [teacher, str(tmp_path), "--arch_a", "resnet8", "--arch_b", "resnet8"],
        "run without a teacher": [str(tmp_path)],
        "three models": [teacher, teacher, teacher],
        "missing dataset": [teacher, teacher, "--arch_a", "resnet8", "--arch_b", "resnet8"],
    }[case]
    if case == "run without a teacher":
        torch.save({"model": {}}, tmp_path / "student_best.pth")
        (tmp_path / "args.json").write_text(json.dumps({"identity": {"student": "resnet8", "teacher": None,
                                                                     "method": "ce", "seed": 0}}))
    data = tmp_path / "empty" if case == "missing dataset" else cifar_root
    with pytest.raises(error, match=message):
        run_map(data, tmp_path / "out", *args)


def test_folder_without_best_weights_suggests_the_last_ones(tmp_path, runs, cifar_root):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("args.json", "student_last.pth"):
        (run / name).write_bytes((runs["kd"] / name).read_bytes())
    with pytest.raises(CKAMapError, match="Try --which last"):
        run_map(cifar_root, tmp_path / "out", str(run))


def test_short_batches_are_merged_into_a_neighbour():
    sizes = lambda sizes_in: [len(b) for b in merge_short_batches(torch.zeros(n, 2) for n in sizes_in)]  # noqa: E731
    assert sizes([8, 8, 3]) == [8, 11]
    assert sizes([2, 8, 8]) == [10, 8]
    assert sizes([8, 4]) == [8, 4]
    assert sizes([3]) == [3]  # nothing to merge with: MinibatchCKA then says it needs 4


def test_layer_whose_output_is_not_a_tensor_is_an_error():
    from common.cka_layers import compute_cka_maps

    class TupleOut(torch.nn.Module):
        def forward(self, x):
            return x, x

    model = torch.nn.Sequential(TupleOut())
    with pytest.raises(LayerError, match="outputs a tuple"):
        compute_cka_maps((model, ["0"]), [(model, ["0"])], [torch.zeros(4, 3)], progress=False)


def test_run_settings_are_the_flags_overlaid_with_the_resolved_identity(tmp_path):
    from common.cka_map import read_run_settings
    from common.run import RunFolder

    (tmp_path / "args.json").write_text(json.dumps({"args": {"student": "resnet8", "method": None, "zoo_dir": "z"},
                                                    "identity": {"student": "resnet8", "method": "rcka", "seed": 1}}))
    assert read_run_settings(RunFolder(tmp_path)) == {"student": "resnet8", "method": "rcka", "seed": 1, "zoo_dir": "z"}


def test_run_folder_without_an_identity_is_a_clear_error(tmp_path, teacher_ckpt, cifar_root):
    (tmp_path / "student_best.pth").write_bytes(teacher_ckpt.read_bytes())
    (tmp_path / "args.json").write_text(json.dumps({"args": {"student": "resnet8"}}))
    with pytest.raises(CKAMapError, match="cannot read the settings of run .*no \"identity\".*pass the file"):
        run_map(cifar_root, tmp_path / "out", str(tmp_path))


def test_teacher_other_than_the_one_the_run_learnt_from_is_refused(tmp_path, runs, cifar_root):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("args.json", "student_last.pth"):
        (run / name).write_bytes((runs["kd"] / name).read_bytes())
    other_zoo = write_teacher_zoo(tmp_path / "other_zoo", "resnet8", seed=7)
    record = json.loads((run / "args.json").read_text())
    record["args"]["zoo_dir"] = str(other_zoo)
    (run / "args.json").write_text(json.dumps(record))
    with pytest.raises(CKAMapError, match="is not the teacher resnet8 kd seed0 .* was distilled from: its sha256"):
        run_map(cifar_root, tmp_path / "out", str(run), "--which", "last")
