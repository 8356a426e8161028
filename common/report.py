"""Runs on disk → a table beside the paper's numbers, the part every task shares.

Only finished runs (``done.json``) enter a mean, and only runs of one identity are averaged together: the groups
are the runs' identities without the seed (``common.run``), with the epochs they actually trained. Runs that failed,
never started, are still going or whose folder is damaged are listed apart with why, and never counted. The task
supplies what is its own: the paper's table, the metric names, and how to label a variant.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from common.run import RunError, RunRecord, find_runs, finite_number

# Keys that name a run rather than a variant of the recipe.
NAMING_KEYS = ("task", "teacher", "student", "method", "seed")


def read_paper_csv(path: str | Path, columns: Sequence[str], numeric: Sequence[str],
                   allow_empty: bool = False) -> list[dict[str, Any]]:
    """The rows of a task's ``paper_results.csv`` (``#`` lines are provenance comments), the ``numeric`` columns
    as floats (None for an empty cell where ``allow_empty``, else an empty cell is an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper results {path} not found; pass --paper_csv, or restore it from the repository")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader([line for line in f if not line.startswith("#")])
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; the header must hold {','.join(columns)}")
        rows = list(reader)
    results = []
    for row in rows:
        parsed = {key: row[key] for key in columns}
        for key in numeric:
            if allow_empty and row[key] in ("", None):
                parsed[key] = None
                continue
            try:
                parsed[key] = float(row[key])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {key} {row[key]!r} in row {row} is not a number; leave out empty "
                                 f"cells") from None
        results.append(parsed)
    return results


def read_task_runs(runs_dir: str | Path, task: str, required: Sequence[str],
                   finite: Sequence[str] = ()) -> list[RunRecord]:
    """The runs of ``task`` under ``runs_dir`` (other tasks' runs are skipped; damaged folders are kept, as
    corrupt), a finished run whose done.json lacks a ``required`` key or a ``finite`` metric marked corrupt."""
    records = []
    for record in find_runs(runs_dir):
        identity = record.identity or record.summary or {}
        if record.state != "corrupt" and identity.get("task", task) != task:
            continue
        why = invalid_summary(record, required, finite) if record.state == "done" else None
        if why:
            record.state, record.detail = "corrupt", why
        records.append(record)
    if not records:
        raise RunError(f"no {task} runs found under {runs_dir}: a run folder (train.py's output_dir) holds args.json "
                       f"(written at start), log.txt (one JSON line per epoch) and, once finished, done.json")
    return records


def report_parser(description: str, default_runs_dir: str, paper_csv: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description)
    parser.add_argument("runs_dir", nargs="?", default=default_runs_dir, help="folder searched recursively for runs")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plot", default=None, help="bar chart PNG (default: <runs_dir>/report.png)")
    parser.add_argument("--paper_csv", default=None, help=f"the paper's numbers (default: {paper_csv})")
    return parser


def write_markdown(text: str, out: str | Path | None) -> None:
    """Print the report and, with ``out``, write it there too, saying where."""
    print(text, end="")
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out}")


def report_command(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser) -> None:
    """A report's ``__main__``: a missing folder, no runs or a bad paper table is one line, exit 1."""
    try:
        main(parser.parse_args())
    except (FileNotFoundError, ValueError, RunError) as err:
        sys.exit(f"error: {err}")


def group_finished(records: Iterable[RunRecord]) -> list[list[RunRecord]]:
    """Finished runs grouped by identity without the seed (epochs taken from done.json), in a stable order."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.state != "done":
            continue
        identity = {k: v for k, v in (record.identity or {}).items() if k != "seed"}
        identity["epochs"] = record.epochs
        groups.setdefault(repr(sorted(identity.items(), key=lambda kv: kv[0])), []).append(record)
    return [sorted(runs, key=lambda r: (r.summary.get("seed", 0), str(r.path))) for _, runs in sorted(groups.items())]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); std None for one value, which has no spread to show."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize_metrics(runs: Sequence[RunRecord], metrics: Sequence[str]) -> dict[str, Any]:
    """{"<metric>_mean", "<metric>_std"} over the runs' done.json values, plus "seeds"."""
    row: dict[str, Any] = {"seeds": [r.summary.get("seed") for r in runs]}
    for metric in metrics:
        values = [r.summary[metric] for r in runs if finite_number(r.summary.get(metric))]
        if len(values) != len(runs):
            row[f"{metric}_mean"] = row[f"{metric}_std"] = None
            continue
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
    return row


def invalid_summary(record: RunRecord, required: Sequence[str], finite: Sequence[str] = ()) -> str | None:
    """Why a done.json cannot be reported (a ``required`` key missing, a ``finite`` metric not a finite number),
    or None."""
    bad = [key for key in required if key not in record.summary]
    bad += [key for key in finite if key not in bad and not finite_number(record.summary.get(key))]
    return f"done.json lacks or has no finite {', '.join(bad)}" if bad else None


def mean_std_text(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {'—' if std is None else f'{std:.2f}'}"


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """``align``: one character per column, 'l' or 'r'."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def other_runs_lines(records: Iterable[RunRecord], describe: Callable[[RunRecord], str],
                     progress: Callable[[RunRecord], str | None] | None = None) -> list[str]:
    """One line per run that is not in the table: failed, never started, in progress, corrupt.

    ``progress``: how far a run in progress is, for a task that counts in other units than log.txt's epochs
    (detection: iterations); None or '' falls back to epochs.
    """
    lines = []
    for record in sorted(records, key=lambda r: (r.state, str(r.path))):
        if record.state == "done":
            continue
        if record.state == "in progress":
            epochs = (record.identity or {}).get("epochs", "?")
            where = (progress(record) if progress is not None else None) or f"epoch {record.epochs_done}/{epochs}"
            what = f"in progress ({where})"
        else:
            what = record.state
        detail = f": {record.detail}" if record.detail else ""
        lines.append(f"- {describe(record)}: {what}{detail} — {record.path}")
    return lines


def plot_bars(labels: Sequence[str], means: Sequence[float], stds: Sequence[float | None],
              paper: Sequence[float | None], path: str | Path, xlabel: str, title: str) -> Path:
    """Horizontal bars, ours (mean ± std) beside the paper's number, one row per label.

    Horizontal so that long labels stay readable; the height grows with the rows, so one run and fifty both give a
    legible figure; the axis starts a few points below the lowest value, since the differences that matter are
    0.5–2 points.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(labels)
    fig = Figure(figsize=(8.0, 1.6 + 0.45 * count))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(count))
    xerr = [math.nan if s is None else s for s in stds]
    height = 0.38
    ax.barh([i - height / 2 for i in y], means, height, xerr=xerr, capsize=3, label="ours: mean ± std over seeds")
    with_paper = [i for i in y if paper[i] is not None]
    ax.barh([i + height / 2 for i in with_paper], [paper[i] for i in with_paper], height, label="paper")
    values = [m - (s or 0.0) for m, s in zip(means, stds)] + [paper[i] for i in with_paper]
    top = [m + (s or 0.0) for m, s in zip(means, stds)] + [paper[i] for i in with_paper]
    ax.set_xlim(max(0.0, math.floor(min(values)) - 3), min(100.0, math.ceil(max(top)) + 2))
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # first row on top, as in the table
    ax.set_ylim(count - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.6 / (1.6 + 0.45 * count)), ncol=2, frameon=False,
              fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
