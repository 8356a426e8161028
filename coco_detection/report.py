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
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from common.report import (
    group_finished,
    invalid_summary,
    markdown_table,
    other_runs_lines,
    plot_bars,
    summarize_metrics,
)
from common.run import RunError, RunRecord, find_runs

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
    path = Path(path) if path is not None else PAPER_CSV
    if not path.is_file():
        raise FileNotFoundError(f"paper results {path} not found; pass --paper_csv or restore "
                                f"coco_detection/paper_results.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader([line for line in f if not line.startswith("#")])
        missing = {"pair", "method", *METRICS} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rows = list(reader)
    try:
        return [{"pair": r["pair"], "method": r["method"],
                 **{m: float(r[m]) if r[m] not in ("", None) else None for m in METRICS}} for r in rows]
    except ValueError as err:
        raise ValueError(f"{path}: a metric is not a number ({err})") from None


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
    identity = record.identity or (record.summary or {}).get("identity") or {}
    config = Path(identity.get("config_file", "?")).stem
    return f"{config}, {identity.get('method', '?')}, seed {identity.get('seed', '?')}"


def summarize(records: list[RunRecord], results: list[dict]) -> list[dict[str, Any]]:
    """One row per identity (seeds averaged): config, method, iterations, seeds, {metric}_mean/_std, paper row."""
    rows = []
    for runs in group_finished(records):
        summary = runs[0].summary
        identity = runs[0].identity or summary.get("identity") or {}
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
    parser = argparse.ArgumentParser("COCO detection runs beside the paper's Table 3")
    parser.add_argument("runs_dir", nargs="?", default="output/coco_detection", help="searched recursively")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plot", default=None, help="bar chart PNG of AP (default: <runs_dir>/report.png)")
    parser.add_argument("--paper_csv", default=None, help=f"the paper's numbers (default: {PAPER_CSV})")
    return parser


def read_records(runs_dir: str | Path) -> list[RunRecord]:
    """This task's run folders under runs_dir (another task's are skipped), with unusable results marked corrupt."""
    records = []
    for record in find_runs(runs_dir):
        task = (record.identity or (record.summary or {}).get("identity") or record.summary or {}).get("task")
        if record.state != "corrupt" and task != TASK:
            continue
        if record.state == "done":
            missing = [key for key in DONE_KEYS if key not in record.summary]
            why = invalid_summary(record, ("AP",)) or (f"done.json lacks {', '.join(missing)}" if missing else None)
            if why:
                record.state, record.detail = "corrupt", why
        elif record.state == "not started" and progress(record):
            record.state = "in progress"  # common.run looks for checkpoint.pth; detectron2 names its own
        records.append(record)
    return records


def main(args: argparse.Namespace) -> str:
    results = load_paper_results(args.paper_csv)
    records = read_records(args.runs_dir)
    if not records:
        raise RunError(f"no detection runs found under {args.runs_dir}: a run folder (train.py's OUTPUT_DIR) holds "
                       f"args.json from its start and done.json once finished")
    rows = summarize(records, results)
    text = format_markdown(rows, records)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    plotted = [row for row in rows if row["AP_mean"] is not None]
    if plotted:
        path = plot_bars([f"{row_label(r)}  {r['method']}" for r in plotted], [r["AP_mean"] for r in plotted],
                         [r["AP_std"] for r in plotted], [(r["paper"] or {}).get("AP") for r in plotted],
                         args.plot or Path(args.runs_dir) / "report.png", "COCO box AP (%)",
                         "COCO detection: ours vs the paper's Table 3")
        print(f"wrote {path}")
    return text


if __name__ == "__main__":
    parser = get_args_parser()
    cli_args = parser.parse_args()
    try:
        main(cli_args)
    except (FileNotFoundError, ValueError, RunError) as err:
        sys.exit(f"error: {err}")
