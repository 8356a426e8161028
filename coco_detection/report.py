"""COCO detection runs beside the paper's Table 3: AP (mean ± std over seeds), AP50, AP75, APs, APm, APl.

    python coco_detection/report.py [runs_dir] [--out report.md] [--plot report.png] [--paper_csv paper_results.csv]

The generic part (finding run folders, grouping finished runs by identity without the seed, means, listing runs
that are not finished) is ``common.report``; this module holds what is the detection task's own: Table 3, the
metric names, and how far a detectron2 run is. Each row is printed above the paper's row for the pair it stands
in for: our teachers come from detectron2's model zoo, the paper's from mmdetection's, so the paper's row is a
reference point, not the same experiment (coco_detection/README.md). No detectron2 needed.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from common.report import (
    group_finished,
    markdown_table,
    other_runs_lines,
    plot_bars,
    read_paper_csv,
    read_task_runs,
    report_command,
    report_parser,
    summarize_metrics,
    write_markdown,
)
from common.run import RunRecord

TASK = "coco_detection"
PAPER_CSV = Path(__file__).parent / "paper_results.csv"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Keys a done.json of train.py has; the size-class APs may be null (COCOeval has no number without such objects).
DONE_KEYS = ("config", "method", "seed", "iterations", *METRICS)
# detectron2's per-iteration JSON lines in the run folder (its JSONWriter): how far a run is.
METRICS_FILE = "metrics.json"
# Our config (its file name) -> the Table 3 pair it stands in for.
PAPER_PAIR = {
    "retinanet_R50": "retinanet_x101->retinanet_r50",
    "retinanet_R101_to_R50_pcka": "retinanet_x101->retinanet_r50",
    "faster_rcnn_R50": "cascade_mask_rcnn_x101->faster_rcnn_r50",
    "faster_rcnn_R101_to_R50_pcka": "cascade_mask_rcnn_x101->faster_rcnn_r50",
    "faster_rcnn_X101_to_R50_pcka": "cascade_mask_rcnn_x101->faster_rcnn_r50",
}
# Our method name (train.resolved_method) -> Table 3's.
PAPER_METHOD = {"alone": "student", "pcka": "PCKA", "pcka+mimic": "PCKA+mimic", "kd": "KD"}


def load_paper_results(path: str | Path | None = None) -> list[dict]:
    """Table 3's rows (``#`` lines are provenance), metrics as floats or None where the paper has no number."""
    return read_paper_csv(path if path is not None else PAPER_CSV, ("pair", "method", *METRICS), METRICS,
                          allow_empty=True)


def paper_row(config: str, method: str, results: list[dict]) -> dict | None:
    pair, paper_method = PAPER_PAIR.get(config), PAPER_METHOD.get(method)
    return next((r for r in results if r["pair"] == pair and r["method"] == paper_method), None)


def progress(record: RunRecord) -> str | None:
    """How far a started run is, "iteration N/M", from the last line of detectron2's metrics.json; else None.

    Read from the file's end, since it grows all run long; slurm/status.py asks every task's report for this.
    """
    try:
        with open(Path(record.path) / METRICS_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            iteration = json.loads(line)["iteration"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the seek, or being written
        return f"iteration {iteration + 1}/{(record.identity or {}).get('iterations', '?')}"
    return None


def describe(record: RunRecord) -> str:
    identity = record.identity or {}
    config = Path(identity.get("config_file", "?")).stem
    return f"{config}, {identity.get('method', '?')}, seed {identity.get('seed', '?')}"


def summarize(records: list[RunRecord], results: list[dict]) -> list[dict[str, Any]]:
    """One row per identity (seeds averaged): config, method, iterations, seeds, {metric}_mean/_std, paper row."""
    rows = []
    for runs in group_finished(records):
        summary = runs[0].summary
        identity = runs[0].identity or {}
        row = {"config": summary["config"], "method": summary["method"], "iterations": summary["iterations"],
               "config_sha256": identity.get("config_sha256"), "paths": [str(r.path) for r in runs],
               **summarize_metrics(runs, METRICS)}
        row["paper"] = paper_row(row["config"], row["method"], results)
        rows.append(row)
    rows.sort(key=lambda r: (r["config"], r["method"], r["iterations"], str(r["config_sha256"])))
    # Rows that read alike but differ in other config options (e.g. SOLVER.BASE_LR) are told apart by that hash.
    names = [(r["config"], r["method"], r["iterations"]) for r in rows]
    for row, name in zip(rows, names):
        row["variant"] = f"cfg {str(row['config_sha256'])[:8]}" if names.count(name) > 1 else ""
    return rows


def _cell(mean: float | None, std: float | None = None) -> str:
    # One decimal, Table 3's precision.
    if mean is None:
        return "—"
    return f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}")


def row_label(row: dict) -> str:
    return f"{row['config']}{' (' + row['variant'] + ')' if row['variant'] else ''}"


def format_markdown(rows: list[dict], records: list[RunRecord]) -> str:
    cells = []
    for row in rows:
        seeds = f"{len(row['seeds'])} ({', '.join(str(seed) for seed in row['seeds'])})"
        cells.append((row_label(row), row["method"], row["iterations"], seeds,
                      _cell(row["AP_mean"], row["AP_std"]), *(_cell(row[f"{m}_mean"]) for m in METRICS[1:])))
        paper = row["paper"]
        if paper is not None:
            cells.append((f"↳ paper: {paper['pair']}", paper["method"], "", "", *(_cell(paper[m]) for m in METRICS)))
    empty = [("(no finished runs yet)", *[""] * (3 + len(METRICS)))]
    lines = markdown_table(("run", "method", "iterations", "seeds", *METRICS), "llrl" + "r" * len(METRICS),
                           cells or empty)
    lines += ["",
              "- COCO box AP (%) on the first DATASETS.TEST split, mean over seeds (AP: ± sample std, ddof=1; none "
              "for one seed). A metric is — where a run of that row has no number for it (no objects of that size).",
              "- Runs with different settings are never averaged together; rows that read alike differ in other "
              "config options (cfg: the hash of the resolved config).",
              "- ↳ paper: Table 3 (arXiv 2401.11824) for the pair ours stands in for; its teachers are mmdetection's "
              "(Cascade Mask R-CNN X101, RetinaNet X101-64x4d), ours detectron2's zoo models: a reference, not the "
              "same experiment."]
    others = other_runs_lines(records, describe, progress)
    if others:
        lines += ["", "Not in the table (only finished runs are counted):", "", *others]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    return report_parser("COCO detection runs beside the paper's Table 3", "output/coco_detection", PAPER_CSV)


def read_records(runs_dir: str | Path) -> list[RunRecord]:
    """This task's run folders under runs_dir (another task's are skipped), with unusable results marked corrupt."""
    records = read_task_runs(runs_dir, TASK, DONE_KEYS, ("AP",))
    for record in records:
        if record.state == "not started" and progress(record):
            record.state = "in progress"  # common.run looks for checkpoint.pth; detectron2 names its own
    return records


def main(args: argparse.Namespace) -> str:
    results = load_paper_results(args.paper_csv)
    records = read_records(args.runs_dir)
    rows = summarize(records, results)
    text = format_markdown(rows, records)
    write_markdown(text, args.out)
    plotted = [row for row in rows if row["AP_mean"] is not None]
    if plotted:
        path = plot_bars([f"{row_label(r)}  {r['method']}" for r in plotted], [r["AP_mean"] for r in plotted],
                         [r["AP_std"] for r in plotted], [(r["paper"] or {}).get("AP") for r in plotted],
                         args.plot or Path(args.runs_dir) / "report.png", "COCO box AP (%)",
                         "COCO detection: ours vs the paper's Table 3")
        print(f"wrote {path}")
    return text


if __name__ == "__main__":
    report_command(main, get_args_parser())
