"""imagenet/cka_map.py: the shared CKA-map command on ImageNet run folders (generated ImageFolder, tiny crops)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.cka_map import main
from imagenet import cka_map as imagenet_cka_map
from imagenet import train
from imagenet_fixtures import write_fake_imagenet, write_torchvision_teacher

SMALL = ["--num_classes", "4", "--val_resize_size", "18", "--val_crop_size", "16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_imagenet(tmp_path_factory.mktemp("imagenet"), classes=4, train_per_class=4, val_per_class=3)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two 1-epoch runs of imagenet/train.py distilling resnet34 into resnet18, with KD and with RCKA."""
    root = tmp_path_factory.mktemp("runs")
    teacher = write_torchvision_teacher(root / "resnet34.pth", "resnet34", 4)
    for method in ("kd", "rcka"):
        train.main(train.get_args_parser().parse_args(
            ["--data_path", str(data), "--output_dir", str(root / method), "--epochs", "1", "--teacher", "resnet34",
             "--teacher_ckpt", str(teacher), "--method", method, "--subset", "2", "--train_crop_size", "16",
             "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--print_freq", "1000",
             "--teacher_eval_cache", str(root / "cache"), *SMALL]))
    return {"kd": root / "kd", "rcka": root / "rcka", "teacher": teacher}


def run_map(data, out, *argv):
    args = imagenet_cka_map.get_args_parser().parse_args(
        [*argv, "--data_path", str(data), "--num_workers", "0", "--device", "cpu", "--batch_size", "4",
         "--no_progress", "--output_dir", str(out), *SMALL])
    return main(args, imagenet_cka_map.make_task(args))


def test_a_model_against_itself_has_a_unit_diagonal_over_its_stages_and_logits(data, runs, tmp_path):
    teacher = str(runs["teacher"])
    record = run_map(data, tmp_path, teacher, teacher, "--arch_a", "resnet34", "--arch_b", "resnet34")
    panel = record["panels"][0]
    assert panel["rows"]["layers"] == ["layer1", "layer2", "layer3", "layer4", "logits"]
    np.testing.assert_allclose(np.diag(np.array(panel["cka"])), 1.0, atol=1e-5)


def test_compare_kd_and_rcka_runs_against_their_teacher(data, runs, tmp_path):
    record = run_map(data, tmp_path, "--compare", str(runs["kd"]), str(runs["rcka"]), "--which", "last")
    teacher, kd, rcka = record["models"]
    assert (kd["label"], rcka["label"]) == ("resnet18 kd seed0", "resnet18 rcka seed0")
    assert teacher["checkpoint"] == str(runs["teacher"])  # the teacher the runs recorded (sha256 checked)
    for name in ("cka_map.png", "cka_map.json", "cka_map_a.csv", "cka_map_b.csv"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "cka_map.json").read_text())["panels"][1]["cka"] == record["panels"][1]["cka"]
