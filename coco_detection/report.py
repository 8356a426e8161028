"""COCO detection runs beside the paper's Table 3: AP, AP50, AP75, APs, APm, APl (mean over seeds).

    python coco_detection/report.py [runs_dir] [--out report.md] [--paper_csv paper_results.csv]

Every folder under ``runs_dir`` with ``done.json`` (written by coco_detection/train.py) is a finished run; runs are
grouped by (config, method, iterations) and averaged over seeds. Each group is printed above the paper's row for
the pair it stands in for: our teachers come from detectron2's model zoo, the paper's from mmdetection's, so the
paper's row is a reference point, not the same experiment (coco_detection/README.md).
No detectron2 needed.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

PAPER_CSV = Path(__file__).parent / "paper_results.csv"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
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


def find_runs(runs_dir: str | Path) -> list[dict]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist; pass a folder above your run folders")
    runs = []
    for path in sorted(runs_dir.rglob("done.json")):
        try:
            done = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); rerun the training command to rewrite it") from None
        missing = [k for k in ("config", "method", "seed", "iterations", *METRICS) if k not in done]
        if done.get("task") != "coco_detection":
            continue  # another task's run under the same root
        if missing:
            raise ValueError(f"{path}: malformed done.json, missing {missing}")
        runs.append({**done, "path": path.parent})
    return runs


def summarize(runs: list[dict], results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["method"], run["iterations"]), []).append(run)
    rows = []
    for (config, method, iterations), group in sorted(groups.items()):
        row = {"config": config, "method": method, "iterations": iterations,
               "seeds": sorted(run["seed"] for run in group)}
        for metric in METRICS:
            values = [run[metric] for run in group if run[metric] is not None]
            row[metric] = statistics.mean(values) if values else None
        row["AP_std"] = statistics.stdev([r["AP"] for r in group]) if len(group) > 1 else None
        row["paper"] = paper_row(config, method, results)
        rows.append(row)
    return rows


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def format_markdown(rows: list[dict]) -> str:
    lines = ["| run | method | iterations | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---:|---|" + "---:|" * len(METRICS)]
    for row in rows:
        ap = _cell(row["AP"]) + ("" if row["AP_std"] is None else f" ± {row['AP_std']:.1f}")
        cells = [ap] + [_cell(row[m]) for m in METRICS[1:]]
        lines.append(f"| {row['config']} | {row['method']} | {row['iterations']} | "
                     f"{', '.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
        paper = row["paper"]
        if paper is not None:
            lines.append(f"| ↳ paper: {paper['pair']} | {paper['method']} | | | "
                         + " | ".join(_cell(paper[m]) for m in METRICS) + " |")
    if not rows:
        lines.append("| (no finished runs yet) |" + " |" * (3 + len(METRICS)))
    lines += ["", "- COCO box AP (%) on the first DATASETS.TEST split, mean over seeds (± sample std of AP).",
              "- ↳ paper: Table 3 (arXiv 2401.11824) for the pair ours stands in for; its teachers are mmdetection's "
              "(Cascade Mask R-CNN X101, RetinaNet X101-64x4d), ours detectron2's zoo models: a reference, not the "
              "same experiment."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("COCO detection runs beside the paper's Table 3")
    parser.add_argument("runs_dir", nargs="?", default="output/coco_detection", help="searched recursively")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--paper_csv", default=None, help=f"the paper's numbers (default: {PAPER_CSV})")
    return parser


def main(args: argparse.Namespace) -> str:
    text = format_markdown(summarize(find_runs(args.runs_dir), load_paper_results(args.paper_csv)))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    parser = get_args_parser()
    cli_args = parser.parse_args()
    try:
        main(cli_args)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
