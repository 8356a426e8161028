"""ImageNet runs beside the paper's Table 2: mean ± std over seeds of the last epoch's top-1 / top-5 and best top-1.

    python imagenet/report.py [runs_dir] [--out report.md] [--plot report.png] [--paper_csv paper_results.csv]

The generic part (finding runs, grouping by identity, means, listing runs that are not finished) is
``common.report``; this module holds what is ImageNet's own: Table 2 and how to compare with it.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

PAPER_CSV = Path(__file__).parent / "paper_results.csv"
PAPER_COLUMNS = ("teacher", "student", "method", "top1", "top5", "source")
SUBSET = "not compared: trained or evaluated on a --subset or another class count, not full ImageNet-1k"


def load_paper_results(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of ``paper_results.csv`` (``#`` lines are provenance comments), top1 / top5 as floats."""
    path = Path(path) if path is not None else PAPER_CSV
    if not path.is_file():
        raise FileNotFoundError(f"paper results {path} not found; pass --paper_csv, or restore "
                                f"imagenet/paper_results.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader([line for line in f if not line.startswith("#")])
        missing = set(PAPER_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; the header must be {','.join(PAPER_COLUMNS)}")
        rows = list(reader)
    results = []
    for row in rows:
        try:
            numbers = {key: float(row[key]) for key in ("top1", "top5")}
        except (TypeError, ValueError):
            raise ValueError(f"{path}: top1/top5 of row {row} is not a number; leave out empty cells") from None
        results.append({**{key: row[key] for key in PAPER_COLUMNS}, **numbers})
    return results


def paper_reference(teacher: str | None, student: str, method: str,
                    results: list[dict] | None = None) -> dict | None:
    """Table 2's row for this run, or None. A student trained alone (ce, no teacher) is the table's 'student'
    column of the pair it appears in."""
    results = load_paper_results() if results is None else results
    if teacher is None:
        return next((r for r in results if r["method"] == "ce" and r["student"] == student), None) \
            if method == "ce" else None
    return next((r for r in results if (r["teacher"], r["student"], r["method"]) == (teacher, student, method)), None)


def compare_with_paper(acc1: float, acc5: float, teacher: str | None, student: str, method: str, full: bool,
                       results: list[dict] | None = None) -> str:
    """What the RESULT line says beside our numbers."""
    if not full:
        return SUBSET
    row = paper_reference(teacher, student, method, results)
    if row is None:
        return "Table 2 has no number for this pair and method"
    return (f"paper top-1 {row['top1']:.2f} (diff {acc1 - row['top1']:+.2f}), top-5 {row['top5']:.2f} "
            f"(diff {acc5 - row['top5']:+.2f})")
