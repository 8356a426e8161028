"""CIFAR-100 runs beside the paper's numbers: mean ± std over seeds of the last and the best epoch's top-1.

    python cifar100/report.py [runs_dir] [--out report.md] [--plot report.png] [--paper_csv paper_results.csv]

Every folder under ``runs_dir`` that holds ``args.json`` or ``done.json`` is a run (the layout train.py writes).
Finished runs (with ``done.json``) are grouped by (teacher, student, method, epochs) and averaged; runs without
``done.json`` are listed apart with their progress from ``log.txt`` and never enter a mean.
``paper_top1`` is also what train.py prints its final accuracy beside.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from common.logging import read_jsonl

PAPER_CSV = Path(__file__).parent / "paper_results.csv"
PAPER_COLUMNS = ("teacher", "student", "method", "top1", "source")
# Table 1 of the RCKA paper is the number we reproduce; the CRD/DKD baselines cover pairs and methods it lacks.
SOURCE_PREFERENCE = ("rcka_table1", "crd_dkd_baselines")
METHOD_ORDER = ("ce", "kd", "dkd", "fcka", "lcka", "rcka")  # table order: baselines first, ours last
DONE_KEYS = ("student", "method", "seed", "last_acc1", "best_acc1")


def load_paper_results(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of ``paper_results.csv`` (``#`` lines are provenance comments), ``top1`` as a float."""
    path = Path(path) if path is not None else PAPER_CSV
    if not path.is_file():
        raise FileNotFoundError(f"paper results {path} not found; pass --paper_csv, or restore "
                                f"cifar100/paper_results.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader([line for line in f if not line.startswith("#")])
        missing = set(PAPER_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; the header must be {','.join(PAPER_COLUMNS)}")
        rows = list(reader)
    results = []
    for row in rows:
        try:
            top1 = float(row["top1"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: top1 {row['top1']!r} in row {row} is not a number; leave out empty "
                             f"cells") from None
        results.append({**{key: row[key] for key in PAPER_COLUMNS}, "top1": top1})
    return results


def paper_row(teacher: str | None, student: str, method: str, results: list[dict] | None = None) -> dict | None:
    """The paper's row for this run (source rcka_table1 before crd_dkd_baselines), or None.

    A model trained alone (no teacher, method ``ce``) is compared with the paper's accuracy for that architecture
    as a teacher or, where the papers never used it as one, as a student trained alone: the same experiment.
    """
    results = load_paper_results() if results is None else results
    if teacher is None:
        if method != "ce":
            return None
        candidates = [r for r in results if r["method"] == "teacher" and r["teacher"] == student]
        candidates = candidates or [r for r in results if r["method"] == "ce" and r["student"] == student]
    else:
        candidates = [r for r in results if (r["teacher"], r["student"], r["method"]) == (teacher, student, method)]
    ranked = sorted(candidates, key=lambda r: _rank(r["source"], SOURCE_PREFERENCE))
    return ranked[0] if ranked else None


def paper_top1(teacher: str | None, student: str, method: str, results: list[dict] | None = None) -> float | None:
    """The paper's CIFAR-100 top-1 (%) for this teacher → student pair and method, or None if it has none."""
    row = paper_row(teacher, student, method, results)
    return None if row is None else row["top1"]


def _rank(name: str, order: tuple[str, ...]) -> int:
    return order.index(name) if name in order else len(order)


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); repair it or delete the run folder") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}; repair it or delete the "
                         f"run folder")
    return obj


def _read_done(path: Path) -> dict[str, Any]:
    done = _read_json_object(path)
    missing = [key for key in DONE_KEYS if key not in done]
    if missing:
        raise ValueError(f"{path}: malformed done.json, missing {missing}; rerun the training command to rewrite it")
    if isinstance(done["seed"], bool) or not isinstance(done["seed"], int):
        raise ValueError(f"{path}: malformed done.json, seed = {done['seed']!r} is not an integer")
    for key in ("last_acc1", "best_acc1"):
        if isinstance(done[key], bool) or not isinstance(done[key], (int, float)) or not math.isfinite(done[key]):
            raise ValueError(f"{path}: malformed done.json, {key} = {done[key]!r} is not a finite number")
    return {"teacher": done.get("teacher"), "student": done["student"], "method": done["method"], "seed": done["seed"],
            "epochs": done.get("epochs"), "last_acc1": float(done["last_acc1"]), "best_acc1": float(done["best_acc1"]),
            "path": path.parent}


def _read_progress(folder: Path) -> dict[str, Any]:
    args_path = folder / "args.json"
    metadata = _read_json_object(args_path)
    args = metadata.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"{args_path}: malformed args.json, no \"args\" object; it is written by run_metadata(args)")
    log_path = folder / "log.txt"
    records = read_jsonl(log_path) if log_path.is_file() else []  # skips a killed run's truncated last line
    by_epoch = {}
    for record in records:
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{log_path}: a line without \"epoch\" ({record!r}); log.txt holds one object per epoch")
        by_epoch[record["epoch"]] = record  # a resumed run repeats epochs: the last line wins
    last = by_epoch[max(by_epoch)] if by_epoch else {}
    # Epochs counted, not the largest index, so that 0- and 1-based numbering both read right.
    # --method may be left to its default; train.py stores the method it chose under "derived".
    method = args.get("method") or (metadata.get("derived") or {}).get("method")
    return {"teacher": args.get("teacher"), "student": args.get("student"), "method": method,
            "seed": args.get("seed"), "epochs": args.get("epochs"), "epochs_done": len(by_epoch),
            "last_acc1": last.get("test_acc1"), "path": folder}


def find_runs(runs_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(finished, unfinished) runs under ``runs_dir``, searched recursively."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist; pass the output_dir of your runs or a "
                                f"folder above them")
    folders = sorted({path.parent for name in ("args.json", "done.json") for path in runs_dir.rglob(name)})
    if not folders:
        raise ValueError(f"no runs found under {runs_dir}: a run folder (train.py's output_dir) holds args.json "
                         f"(written at start), log.txt (one JSON line per epoch) and, once finished, done.json")
    finished = [_read_done(f / "done.json") for f in folders if (f / "done.json").is_file()]
    unfinished = [_read_progress(f) for f in folders if not (f / "done.json").is_file()]
    return finished, unfinished


def summarize(finished: list[dict], results: list[dict] | None = None) -> list[dict[str, Any]]:
    """One row per (teacher, student, method, epochs): seeds, mean and sample std (ddof=1) of last and best top-1,
    the paper's number and Δ = last mean − paper. Epochs are part of the key so a short test run never joins a
    full one. std is None for a single seed."""
    results = load_paper_results() if results is None else results
    groups: dict[tuple, list[dict]] = {}
    for run in finished:
        groups.setdefault((run["teacher"], run["student"], run["method"], run["epochs"]), []).append(run)

    def order(key: tuple) -> tuple:
        teacher, student, method, epochs = key
        return (teacher is not None, str(teacher), str(student), _rank(method, METHOD_ORDER), str(method), epochs or 0)

    rows = []
    for key in sorted(groups, key=order):
        runs = sorted(groups[key], key=lambda run: run["seed"])
        row = dict(zip(("teacher", "student", "method", "epochs"), key), seeds=[run["seed"] for run in runs])
        for name in ("last", "best"):
            values = [run[f"{name}_acc1"] for run in runs]
            row[f"{name}_mean"] = statistics.mean(values)
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        paper = paper_row(key[0], key[1], key[2], results)
        row["paper"] = None if paper is None else paper["top1"]
        row["paper_source"] = None if paper is None else paper["source"]
        row["delta"] = None if paper is None else row["last_mean"] - paper["top1"]
        rows.append(row)
    return rows


def pair_name(row: dict) -> str:
    return str(row["student"]) if row["teacher"] is None else f"{row['teacher']} → {row['student']}"


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {'—' if std is None else f'{std:.2f}'}"


def format_markdown(rows: list[dict], unfinished: list[dict]) -> str:
    lines = ["| pair | method | epochs | seeds | last top-1 | best top-1 | paper | Δ |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        seeds = f"{len(row['seeds'])} ({', '.join(str(seed) for seed in row['seeds'])})"
        paper = "—" if row["paper"] is None else f"{row['paper']:.2f}"
        paper += "†" if row["paper_source"] not in (None, "rcka_table1") else ""
        delta = "—" if row["delta"] is None else f"{row['delta']:+.2f}"
        last, best = _mean_std(row["last_mean"], row["last_std"]), _mean_std(row["best_mean"], row["best_std"])
        lines.append(f"| {pair_name(row)} | {row['method']} | {row['epochs']} | {seeds} | {last} | {best} | {paper} "
                     f"| {delta} |")
    if not rows:
        lines.append("| (no finished runs yet) | | | | | | | |")
    lines += ["",
              "- Top-1 (%) on the CIFAR-100 test set, mean ± sample std (ddof=1) over seeds; std is — for one seed.",
              "- paper: Table 1 of the RCKA paper (arXiv 2401.11824); † from the CRD/DKD baselines where Table 1 has "
              "no number (CRD reports the last epoch, DKD the best, mean of 5 runs). A model trained alone is "
              "compared with the paper's accuracy for it as a teacher, else as a student alone.",
              "- Δ = last top-1 mean − paper."]
    if unfinished:
        lines += ["", "In progress (not in the means above):", ""]
        for run in sorted(unfinished, key=lambda run: str(run["path"])):
            acc = "" if run["last_acc1"] is None else f", last test top-1 {run['last_acc1']:.2f}"
            lines.append(f"- {pair_name(run)}, {run['method']}, seed {run['seed']}: in progress "
                         f"(epoch {run['epochs_done']}/{run['epochs']}){acc} — {run['path']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path) -> None:
    """Bar chart: our last top-1 mean (std as error bar) beside the paper's number, per (pair, method)."""
    # The Agg canvas directly rather than pyplot: no global backend switch for whoever imports this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(rows))
    # NaN draws no error bar: one seed has no spread to show.
    stds = [math.nan if row["last_std"] is None else row["last_std"] for row in rows]
    ax.bar([i - 0.2 for i in x], [row["last_mean"] for row in rows], 0.4, yerr=stds, capsize=3,
           label="ours: last top-1, mean ± std")
    with_paper = [i for i, row in enumerate(rows) if row["paper"] is not None]
    ax.bar([i + 0.2 for i in with_paper], [rows[i]["paper"] for i in with_paper], 0.4, label="paper")
    # Bars from zero would hide the 0.5–2 point differences that matter here.
    values = [row["last_mean"] - (row["last_std"] or 0.0) for row in rows] + [rows[i]["paper"] for i in with_paper]
    ax.set_ylim(bottom=max(0.0, math.floor(min(values)) - 3))
    ax.set_xticks(list(x), [f"{pair_name(row)}\n{row['method']}" for row in rows], fontsize=8)
    ax.set_ylabel("CIFAR-100 test top-1 (%)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("CIFAR-100 runs beside the paper's numbers")
    parser.add_argument("runs_dir", nargs="?", default="output", help="folder searched recursively for run folders")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plot", default=None, help="bar chart PNG (default: <runs_dir>/report.png)")
    parser.add_argument("--paper_csv", default=None, help=f"the paper's numbers (default: {PAPER_CSV})")
    return parser


def main(args: argparse.Namespace) -> str:
    results = load_paper_results(args.paper_csv)
    finished, unfinished = find_runs(args.runs_dir)
    rows = summarize(finished, results)
    text = format_markdown(rows, unfinished)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if rows:
        plot(rows, args.plot or Path(args.runs_dir) / "report.png")
    return text


if __name__ == "__main__":
    parser = get_args_parser()
    cli_args = parser.parse_args()
    try:
        main(cli_args)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
