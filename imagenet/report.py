"""ImageNet runs beside the paper's Table 2: mean ± std over seeds of the last epoch's top-1 / top-5 and best top-1.

    python imagenet/report.py [runs_dir] [--out report.md] [--plot report.png] [--paper_csv paper_results.csv]

The generic part (finding runs, grouping by identity, means, listing runs that are not finished) is
``common.report``; this module holds what is ImageNet's own: Table 2 and how to compare with it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.losses import METHODS
from common.report import (
    group_finished,
    markdown_table,
    mean_std_text,
    other_runs_lines,
    plot_bars,
    read_paper_csv,
    read_task_runs,
    report_command,
    report_parser,
    summarize_metrics,
    write_markdown,
)
from common.run import RunRecord, folder_suffix

PAPER_CSV = Path(__file__).parent / "paper_results.csv"
PAPER_COLUMNS = ("teacher", "student", "method", "top1", "top5", "source")
SUBSET = "not compared: trained or evaluated on a --subset or another class count, not full ImageNet-1k"
METRICS = ("last_acc1", "last_acc5", "best_acc1")
DONE_KEYS = ("student", "method", "seed", "last_acc1", "last_acc5", "best_acc1")


def load_paper_results(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of ``paper_results.csv`` (``#`` lines are provenance comments), top1 / top5 as floats."""
    return read_paper_csv(path if path is not None else PAPER_CSV, PAPER_COLUMNS, ("top1", "top5"))


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


def is_full_imagenet(identity: dict) -> bool:
    return identity.get("subset") is None and identity.get("num_classes", 1000) == 1000


def variant_label(identity: dict) -> str:
    """What differs from the paper's recipe for this pair and method ('' for the recipe itself)."""
    from imagenet.train import run_identity_of_recipe  # train imports this module: import on use

    return folder_suffix(identity, run_identity_of_recipe(identity), ignore=("teacher_sha256", "epochs"))


def describe(record: RunRecord) -> str:
    identity = record.identity or {}
    student, teacher = identity.get("student", "?"), identity.get("teacher")
    pair = f"{teacher} → {student}" if teacher else student
    return f"{pair}, {identity.get('method', '?')}, seed {identity.get('seed', '?')}"


def summarize(records: list[RunRecord], results: list[dict] | None = None) -> list[dict[str, Any]]:
    """One row per identity (seeds averaged): pair, method, variant, epochs, seeds, metrics' mean ± std, Table 2's
    top-1 / top-5 and Δ = last mean − paper (none for runs on a subset)."""
    results = load_paper_results() if results is None else results
    rows = []
    for runs in group_finished(records):
        identity = runs[0].identity or {}
        teacher, student, method = identity.get("teacher"), identity.get("student"), identity.get("method")
        row = {"teacher": teacher, "student": student, "method": method, "epochs": runs[0].epochs,
               "variant": variant_label(identity) if identity else "", "paths": [str(r.path) for r in runs],
               "full": is_full_imagenet(identity), **summarize_metrics(runs, METRICS)}
        paper = paper_reference(teacher, student, method, results)
        row["paper_top1"] = None if paper is None else paper["top1"]
        row["paper_top5"] = None if paper is None else paper["top5"]
        comparable = paper is not None and row["full"]
        row["delta_top1"] = (row["last_acc1_mean"] - paper["top1"]
                             if comparable and row["last_acc1_mean"] is not None else None)
        row["delta_top5"] = (row["last_acc5_mean"] - paper["top5"]
                             if comparable and row["last_acc5_mean"] is not None else None)
        rows.append(row)

    def order(row: dict) -> tuple:
        method = row["method"]
        return (str(row["teacher"] or ""), str(row["student"]),
                METHODS.index(method) if method in METHODS else len(METHODS), row["variant"], row["epochs"] or 0)

    return sorted(rows, key=order)


def pair_name(row: dict) -> str:
    return str(row["student"]) if row["teacher"] is None else f"{row['teacher']} → {row['student']}"


def row_label(row: dict) -> str:
    return f"{row['method']}{'-' + row['variant'] if row['variant'] else ''}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def format_markdown(rows: list[dict], records: list[RunRecord]) -> str:
    cells = []
    for row in rows:
        seeds = f"{len(row['seeds'])} ({', '.join(str(seed) for seed in row['seeds'])})"
        if not row["full"]:
            paper = "not compared*"
        elif row["paper_top1"] is not None:
            paper = f"{row['paper_top1']:.2f} / {row['paper_top5']:.2f}"
        else:
            paper = "—"
        cells.append((pair_name(row), row_label(row), row["epochs"], seeds,
                      mean_std_text(row["last_acc1_mean"], row["last_acc1_std"]),
                      mean_std_text(row["last_acc5_mean"], row["last_acc5_std"]),
                      mean_std_text(row["best_acc1_mean"], row["best_acc1_std"]), paper,
                      f"{_signed(row['delta_top1'])} / {_signed(row['delta_top5'])}"))
    lines = markdown_table(("pair", "method", "epochs", "seeds", "last top-1", "last top-5", "best top-1",
                            "paper top-1 / top-5", "Δ"), "llrlrrrrr",
                           cells or [("(no finished runs yet)", "", "", "", "", "", "", "", "")])
    lines += ["",
              "- Top-1 / top-5 (%) on the ImageNet-1k validation set (50,000 images), mean ± sample std (ddof=1) "
              "over seeds; std is — for one seed.",
              "- method: a suffix names what differs from the paper's recipe for that pair (e.g. rcka-subset50); runs "
              "with different settings are never averaged together.",
              "- paper: Table 2 of the RCKA paper (arXiv 2401.11824); a student trained alone (ce) is compared with "
              "the table's 'student' column.",
              f"- *{SUBSET}.",
              "- Δ = last-epoch mean − paper, top-1 / top-5."]
    others = other_runs_lines(records, describe)
    if others:
        lines += ["", "Not in the table (only finished runs are counted):", "", *others]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    return report_parser("ImageNet runs beside the paper's Table 2", "output/imagenet", PAPER_CSV)


def main(args: argparse.Namespace) -> str:
    results = load_paper_results(args.paper_csv)
    records = read_task_runs(args.runs_dir, "imagenet", DONE_KEYS, METRICS)
    rows = summarize(records, results)
    text = format_markdown(rows, records)
    write_markdown(text, args.out)
    plotted = [row for row in rows if row["last_acc1_mean"] is not None]
    if plotted:
        path = plot_bars([f"{pair_name(r)}  {row_label(r)}" for r in plotted], [r["last_acc1_mean"] for r in plotted],
                         [r["last_acc1_std"] for r in plotted],
                         [r["paper_top1"] if r["full"] else None for r in plotted],
                         args.plot or Path(args.runs_dir) / "report.png", "ImageNet-1k val top-1 (%), last epoch",
                         "ImageNet-1k: ours vs the paper's Table 2")
        print(f"wrote {path}")
    return text


if __name__ == "__main__":
    report_command(main, get_args_parser())
