"""coco_detection/report.py: run folders as train.py writes them, beside Table 3 (no detectron2 needed)."""
import json

import pytest

from coco_detection import report
from common.run import RunError, read_run

AP = {"AP": 40.0, "AP50": 60.0, "AP75": 43.0, "APs": 23.0, "APm": 44.0, "APl": None}
CONFIG = "retinanet_R101_to_R50_pcka"


def identity_of(seed, config=CONFIG, method="pcka", config_sha256="a" * 64, iterations=180000):
    """The identity coco_detection/train.py gives a run (the hash stands for the resolved config less the seed)."""
    return {"task": "coco_detection", "config_file": f"{config}.yaml", "method": method,
            "teacher": "COCO-Detection/retinanet_R_101_FPN_3x.yaml", "student": "RetinaNet R50",
            "iterations": iterations, "seed": seed, "config_sha256": config_sha256}


def write_run(folder, identity, ap=None, events=("start",), metrics_iterations=()):
    """A run folder as train.py writes it; done.json only when ``ap`` is given (a finished run)."""
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"identity": identity, "args": {}}))
    (folder / "invocations.jsonl").write_text("".join(
        json.dumps({"event": e, **({"message": "RuntimeError: boom"} if e == "failed" else {})}) + "\n"
        for e in events))
    (folder / "metrics.json").write_text("".join(json.dumps({"iteration": i, "loss_pcka": 0.5}) + "\n"
                                                 for i in metrics_iterations))
    if ap is not None:
        done = {"task": "coco_detection", "config": identity["config_file"][:-len(".yaml")],
                "method": identity["method"], "teacher": identity["teacher"], "student": identity["student"],
                "seed": identity["seed"], "iterations": identity["iterations"], **AP, "AP": ap, "identity": identity}
        (folder / "done.json").write_text(json.dumps(done))
    return folder


def run_report(tmp_path, *flags):
    return report.main(report.get_args_parser().parse_args([str(tmp_path), "--plot", str(tmp_path / "r.png"),
                                                            *flags]))


def test_paper_csv_holds_table3_with_the_six_metrics():
    rows = report.load_paper_results()
    assert len(rows) == 27
    row = report.paper_row(CONFIG, "pcka", rows)
    assert (row["pair"], row["AP"], row["APl"]) == ("retinanet_x101->retinanet_r50", 40.3, 54.9)
    assert report.paper_row("faster_rcnn_R50", "alone", rows)["AP"] == 38.4


def test_seeds_of_one_identity_are_averaged_into_one_row_above_the_papers(tmp_path, capsys):
    write_run(tmp_path / "a" / "seed0", identity_of(0), ap=40.0)
    write_run(tmp_path / "a" / "seed1", identity_of(1), ap=41.0)
    lines = run_report(tmp_path).splitlines()
    ours = [line for line in lines if line.startswith(f"| {CONFIG}")]
    assert len(ours) == 1
    assert "| 2 (0, 1) | 40.5 ± 0.7 | 60.0 | 43.0 | 23.0 | 44.0 | — |" in ours[0]
    assert lines[lines.index(ours[0]) + 1].startswith("| ↳ paper: retinanet_x101->retinanet_r50 | PCKA |")
    assert (tmp_path / "r.png").stat().st_size > 0 and f"wrote {tmp_path / 'r.png'}" in capsys.readouterr().out


def test_runs_with_other_config_options_get_their_own_row_told_apart_by_the_config_hash(tmp_path):
    write_run(tmp_path / "recipe", identity_of(0), ap=40.0)
    write_run(tmp_path / "lr", identity_of(0, config_sha256="b" * 64), ap=39.0)
    text = run_report(tmp_path)
    assert f"| {CONFIG} (cfg aaaaaaaa) | pcka | 180000 | 1 (0) | 40.0 |" in text
    assert f"| {CONFIG} (cfg bbbbbbbb) | pcka | 180000 | 1 (0) | 39.0 |" in text


def test_failed_unfinished_and_damaged_runs_are_listed_and_not_counted(tmp_path):
    write_run(tmp_path / "done", identity_of(0), ap=40.0)
    write_run(tmp_path / "failed", identity_of(1), events=("start", "failed"))
    write_run(tmp_path / "running", identity_of(2), metrics_iterations=(19, 39))
    write_run(tmp_path / "waiting", identity_of(3))
    bad = write_run(tmp_path / "no_ap", identity_of(4), ap=41.0)
    (bad / "done.json").write_text(json.dumps({"task": "coco_detection", "config": CONFIG, "identity": {}}))
    text = run_report(tmp_path)
    assert "| 1 (0) | 40.0 |" in text  # only the finished run
    others = text.split("Not in the table")[1]
    assert f"- {CONFIG}, pcka, seed 1: failed: RuntimeError: boom — {tmp_path / 'failed'}" in others
    assert f"- {CONFIG}, pcka, seed 2: in progress (iteration 40/180000) — {tmp_path / 'running'}" in others
    assert f"seed 3: not started — {tmp_path / 'waiting'}" in others
    assert "seed 4: corrupt: done.json lacks" in others


def test_another_tasks_runs_under_the_same_root_are_left_out(tmp_path):
    write_run(tmp_path / "det", identity_of(0), ap=40.0)
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "args.json").write_text(json.dumps({"identity": {"task": "cifar100", "seed": 0}}))
    text = run_report(tmp_path)
    assert "cifar" not in text and "| 1 (0) | 40.0 |" in text


def test_progress_reads_the_last_iteration_of_detectron2s_metrics(tmp_path):
    folder = write_run(tmp_path / "run", identity_of(0), metrics_iterations=range(0, 100000, 20))
    with open(folder / "metrics.json", "a") as f:
        f.write('{"iteration": 1000')  # being written
    assert report.progress(read_run(folder)) == "iteration 99981/180000"
    assert report.progress(read_run(write_run(tmp_path / "new", identity_of(0)))) is None


def test_a_root_without_detection_runs_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="no coco_detection runs found"):
        run_report(tmp_path)


def test_slurm_status_shows_the_iteration_of_a_running_detection_job(tmp_path):
    import argparse

    from slurm.status import run_state
    from slurm.sweeps import Run

    folder = write_run(tmp_path / "running", identity_of(0), metrics_iterations=(19, 39))
    (folder / "slurm_job.json").write_text(json.dumps({"job_id": "7"}))
    run = Run("coco_detection", argparse.Namespace(output_dir=str(folder)), ())
    assert run_state(run, {"7": "RUNNING"}) == ("running", "job 7, iteration 40/180000")
