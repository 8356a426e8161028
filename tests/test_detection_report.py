"""coco_detection/report.py: runs' done.json beside Table 3 (no detectron2 needed)."""
import json

import pytest

from coco_detection import report

AP = {"AP": 40.0, "AP50": 60.0, "AP75": 43.0, "APs": 23.0, "APm": 44.0, "APl": None}


def write_done(folder, seed, ap, config="retinanet_R101_to_R50_pcka", method="pcka"):
    folder.mkdir(parents=True)
    (folder / "done.json").write_text(json.dumps({"task": "coco_detection", "config": config, "method": method,
                                                  "seed": seed, "iterations": 180000, **AP, "AP": ap}))


def test_paper_csv_holds_table3_with_the_six_metrics():
    rows = report.load_paper_results()
    assert len(rows) == 27
    row = report.paper_row("retinanet_R101_to_R50_pcka", "pcka", rows)
    assert (row["pair"], row["AP"], row["APl"]) == ("retinanet_x101->retinanet_r50", 40.3, 54.9)
    assert report.paper_row("faster_rcnn_R50", "alone", rows)["AP"] == 38.4


def test_report_averages_seeds_and_prints_the_papers_row_below(tmp_path):
    write_done(tmp_path / "a" / "seed0", 0, 40.0)
    write_done(tmp_path / "a" / "seed1", 1, 41.0)
    text = report.main(report.get_args_parser().parse_args([str(tmp_path)]))
    lines = text.splitlines()
    ours = next(line for line in lines if line.startswith("| retinanet_R101_to_R50_pcka"))
    assert "| 40.5 ± 0.7 | 60.0 | 43.0 | 23.0 | 44.0 | — |" in ours
    assert lines[lines.index(ours) + 1].startswith("| ↳ paper: retinanet_x101->retinanet_r50 | PCKA |")


def test_a_malformed_done_json_names_the_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "done.json").write_text(json.dumps({"task": "coco_detection", "config": "x"}))
    with pytest.raises(ValueError, match="missing"):
        report.find_runs(tmp_path)
