"""coco_detection/train.py end to end on a tiny drawn-shapes COCO dataset, on CPU, with a ResNet-18 FPN at 128 px.

Needs detectron2, which has no release on the package index; without it these tests skip and say how to install it.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (it has no PyPI release): build it from "
                                         "source as coco_detection/README.md says to run the detection tests")

import torch  # noqa: E402
from detectron2.data import build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from coco_detection import train  # noqa: E402
from coco_detection.data import DatasetError  # noqa: E402
from coco_detection.distill import DistillError  # noqa: E402
from common.run import LOG_FILE, RunConflictError, read_run  # noqa: E402
from detection_fixtures import CONFIGS, REPO, distill_overrides, make_shapes_coco, tiny_overrides  # noqa: E402

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train_json, train_images = make_shapes_coco(root, "train", 8, seed=0)
    val_json, val_images = make_shapes_coco(root, "val", 4, seed=1)
    return ["--register_coco", "shapes_train", str(train_json), str(train_images),
            "--register_coco", "shapes_val", str(val_json), str(val_images)]


def parse(config, output_dir, shapes, *opts):
    return train.get_args_parser().parse_args(
        ["--config-file", str(CONFIGS / config), "--output_dir", str(output_dir), *shapes, *opts])


@pytest.fixture(scope="module")
def teacher(shapes, tmp_path_factory):
    """A RetinaNet trained alone for 6 iterations: the teacher of the distillation tests."""
    output_dir = tmp_path_factory.mktemp("runs") / "teacher"
    summary = train.main(parse("retinanet_R50.yaml", output_dir, shapes, *tiny_overrides(6)))
    return output_dir, summary


def student_args(output_dir, shapes, teacher_dir, max_iter, *opts, checkpoint_period=1000):
    return parse("retinanet_R101_to_R50_pcka.yaml", output_dir, shapes,
                 *tiny_overrides(max_iter, checkpoint_period), *distill_overrides(teacher_dir), *opts)


def test_training_alone_evaluates_with_coco_evaluator_to_the_six_box_ap_numbers(teacher):
    output_dir, summary = teacher
    assert all(key in summary for key in AP_KEYS)
    # COCOeval gives NaN (None here) for a size class without ground truth; the overall numbers always exist.
    assert all(isinstance(summary[key], float) and 0 <= summary[key] <= 100 for key in ("AP", "AP50", "AP75"))
    done = json.loads((output_dir / "done.json").read_text())
    assert done["method"] == "alone" and done["config"] == "retinanet_R50" and done["iterations"] == 6
    assert done["student"] == "RetinaNet R18" and done["teacher"] is None and done["seed"] == 0
    assert (output_dir / "model_final.pth").is_file() and (output_dir / "config.yaml").is_file()


def test_the_run_folder_is_common_runs_with_the_identity_in_args_json_and_done_json(teacher):
    output_dir, _ = teacher
    record = read_run(output_dir)  # what slurm/status.py and the reports see
    assert record.state == "done" and record.summary["identity"] == record.identity
    assert {"config_sha256", "seed", "method", "iterations"} <= record.identity.keys()
    events = [json.loads(line)["event"] for line in (output_dir / "invocations.jsonl").read_text().splitlines()]
    assert events[:2] == ["start", "finished"]
    # detectron2's text log is not the folder's JSON-lines log, which read_run parses.
    assert (output_dir / train.D2_LOG_FILE).is_file() and not (output_dir / LOG_FILE).exists()


def test_distilled_student_trains_with_loss_pcka_and_leaves_the_teacher_unchanged(teacher, shapes, tmp_path):
    teacher_dir, _ = teacher
    summary = train.main(student_args(tmp_path / "student", shapes, teacher_dir, 3))
    assert summary["method"] == "pcka" and all(key in summary for key in AP_KEYS)
    metrics = [json.loads(line) for line in (tmp_path / "student" / "metrics.json").read_text().splitlines()]
    pcka = [m["loss_pcka"] for m in metrics if "loss_pcka" in m]
    assert pcka and all(torch.isfinite(torch.tensor(pcka)))
    final = torch.load(tmp_path / "student" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    original = torch.load(teacher_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for key, value in original.items():
        assert torch.equal(final[f"teacher.{key}"], value), key
    student = torch.load(tmp_path / "student" / "student_final.pth", map_location="cpu", weights_only=True)["model"]
    assert student.keys() == original.keys()  # the student alone, loadable by the plain RetinaNet config


def test_pcka_alone_decreases_and_the_teacher_gets_no_gradient(teacher, shapes, tmp_path):
    teacher_dir, _ = teacher
    cfg = train.setup_cfg(student_args(tmp_path / "pcka_only", shapes, teacher_dir, 10))
    model = build_model(cfg)
    model.train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    batch = next(iter(build_detection_train_loader(cfg)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    values = []
    for step in range(5):
        with EventStorage(step):  # detectron2's heads log to it
            loss = model(batch)["loss_pcka"]
        assert torch.isfinite(loss)
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        optimizer.step()
    assert values[-1] < values[0], values
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    assert "instances" in outputs[0]  # inference is the student's detector output


@pytest.mark.slow
def test_resume_after_a_kill_continues_from_the_last_checkpoint(teacher, shapes, tmp_path):
    teacher_dir, _ = teacher
    output_dir = tmp_path / "killed"
    args = student_args(output_dir, shapes, teacher_dir, 8, checkpoint_period=2)
    argv = [sys.executable, "-m", "coco_detection.train", "--config-file", args.config_file,
            "--output_dir", str(output_dir), *shapes, *args.opts]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = output_dir / "last_checkpoint"
    deadline = time.time() + 240
    while time.time() < deadline and not (tag.is_file() and tag.read_text() >= "model_0000001.pth"):
        time.sleep(0.2)
        assert process.poll() is None, "the training process ended before it saved a checkpoint"
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = tag.read_text()
    assert last.startswith("model_") and not (output_dir / "done.json").exists()
    iteration = int(last[len("model_"):-len(".pth")])
    train.main(args)  # the same command again
    log = (output_dir / train.D2_LOG_FILE).read_text()
    assert f"Starting training from iteration {iteration + 1}" in log
    assert json.loads((output_dir / "done.json").read_text())["iterations"] == 8


def test_a_finished_run_says_so_and_a_different_config_in_its_folder_is_refused(teacher, shapes, capsys):
    output_dir, _ = teacher
    assert train.main(parse("retinanet_R50.yaml", output_dir, shapes, *tiny_overrides(6)))["AP"] is not None
    assert "Nothing to do" in capsys.readouterr().out
    with pytest.raises(RunConflictError, match=r"(?s)other settings.*iterations: 6 there, 7 now"):
        train.main(parse("retinanet_R50.yaml", output_dir, shapes, *tiny_overrides(7)))
    # Settings outside the identity (workers, periods) and another seed's folder are not conflicts of this one.
    assert train.main(parse("retinanet_R50.yaml", output_dir, shapes, *tiny_overrides(6),
                            "DATALOADER.NUM_WORKERS", "1"))["AP"] is not None


def test_detectron2_checkpoints_without_a_run_record_are_not_resumed(shapes, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "last_checkpoint").write_text("model_0000999.pth")
    with pytest.raises(RunConflictError, match="detectron2 checkpoints but no args.json"):
        train.main(parse("retinanet_R50.yaml", tmp_path / "foreign", shapes, *tiny_overrides(2)))


def test_a_failure_during_training_is_recorded_for_status_and_reports(shapes, tmp_path, monkeypatch):
    def boom(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(train.Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train.main(parse("retinanet_R50.yaml", tmp_path / "failed", shapes, *tiny_overrides(2)))
    record = read_run(tmp_path / "failed")
    assert record.state == "failed" and record.detail == "RuntimeError: boom"


def test_a_missing_teacher_config_is_a_clear_error(shapes, tmp_path):
    args = parse("retinanet_R101_to_R50_pcka.yaml", tmp_path / "run", shapes, *tiny_overrides(2),
                 "TEACHER.CONFIG_FILE", str(tmp_path / "nowhere.yaml"))
    with pytest.raises(DistillError, match="neither a file nor a config of detectron2's model zoo"):
        train.main(args)


@pytest.mark.parametrize("text,message", [
    ("MODEL: [unclosed\n  : : :\n", r"is not valid YAML \(.*line 1"),
    ("NOT_A_KEY: 3\n", r"does not fit detectron2's config \('Non-existent config key: NOT_A_KEY'\)"),
    ("SOLVER:\n  BASE_LR: fast\n", r"does not fit detectron2's config \(Type mismatch .*SOLVER.BASE_LR"),
    ('_BASE_: "missing-base.yaml"\n', r"does not fit detectron2's config \(.*missing-base.yaml"),
])
def test_a_corrupt_config_file_is_a_clear_error(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    args = train.get_args_parser().parse_args(["--config-file", str(config), "--output_dir", str(tmp_path / "run")])
    with pytest.raises(train.UsageError, match=message):
        train.main(args)
    assert not (tmp_path / "run").exists()


def test_a_malformed_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [')
    args = train.get_args_parser().parse_args(["--config-file", str(CONFIGS / "retinanet_R50.yaml"),
                                               "--register_coco", "bad_set", str(bad), str(tmp_path)])
    with pytest.raises(DatasetError, match="not valid JSON"):
        train.main(args)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DatasetError, match=r"images\[0\] lacks"):
        train.main(args)


def test_coco_without_detectron2_datasets_names_the_variable(tmp_path, monkeypatch):
    args = train.get_args_parser().parse_args(["--config-file", str(CONFIGS / "retinanet_R50.yaml"),
                                               "--output_dir", str(tmp_path), "MODEL.DEVICE", "cpu"])
    monkeypatch.chdir(tmp_path)  # detectron2 resolved the built-in COCO paths at import: ./datasets by default
    with pytest.raises(DatasetError, match="DETECTRON2_DATASETS"):
        train.main(args)


def test_slurm_launcher_accepts_the_task_and_shows_the_equivalent_command(shapes, tmp_path, capsys):
    from slurm import launch
    runs = launch.main(["coco_detection", "--config-file", str(CONFIGS / "retinanet_R50.yaml"), *shapes,
                        "--output_dir", str(tmp_path / "run"), "--num-gpus", "8", "--dry_run", "MODEL.DEVICE", "cpu"])
    (run, state, _), = runs
    assert state == "not submitted"
    command = list(run.command)
    assert command[command.index("--num-gpus") + 1] == "8" and command[-2:] == ["MODEL.DEVICE", "cpu"]
    assert command.count("--register_coco") == 2
