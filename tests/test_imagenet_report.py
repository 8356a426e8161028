"""imagenet/report.py: Table 2 as data, and finished runs beside it (mean ± std over seeds; subsets never compared)."""
import json

from common.run import RunFolder, read_run
from imagenet import report, train


def test_paper_results_hold_table2_with_top1_and_top5():
    rows = report.load_paper_results()
    assert report.paper_reference("resnet34", "resnet18", "rcka", rows)[("top1")] == 72.34
    assert report.paper_reference("resnet50", "mobilenet_v1", "dkd", rows)["top5"] == 91.05
    assert report.paper_reference(None, "mobilenet_v1", "ce", rows)["top1"] == 70.13
    assert report.paper_reference("resnet50", "mobilenet_v1", "RKD", rows) is None  # empty cell: no row
    assert {r["source"] for r in rows} == {"rcka_table2"}


def fake_run(root, seed, last, subset=None):
    args = train.get_args_parser().parse_args(["--teacher", "resnet34", "--seed", str(seed)]
                                              + (["--subset", str(subset)] if subset else []))
    cfg = train.derive_config(args, 8, "cuda")
    identity = train.run_identity(args, cfg, "ab" * 32)
    folder = RunFolder(root / f"s{seed}{subset or ''}")
    folder.path.mkdir(parents=True)
    (folder.args_file).write_text(json.dumps({"identity": identity}))
    folder.finish({"student": "resnet18", "teacher": "resnet34", "method": "rcka", "seed": seed, "epochs": 100,
                   "last_acc1": last, "last_acc5": last + 18, "best_acc1": last + 0.1, "identity": identity})
    return read_run(folder.path)


def test_seeds_are_averaged_and_compared_with_table2(tmp_path):
    records = [fake_run(tmp_path, 0, 72.0), fake_run(tmp_path, 1, 72.5), fake_run(tmp_path, 0, 40.0, subset=10)]
    rows = report.summarize(records)
    full, subset = rows
    assert full["variant"] == "" and full["seeds"] == [0, 1] and full["last_acc1_mean"] == 72.25
    assert round(full["delta_top1"], 2) == -0.09 and full["paper_top5"] == 90.68
    assert subset["variant"] == "subset10" and subset["delta_top1"] is None
    text = report.format_markdown(rows, records)
    assert "72.34 / 90.68" in text and "not compared*" in text and "72.25 ± 0.35" in text
