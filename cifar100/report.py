"""CIFAR-100 runs beside the paper's numbers: mean ± std over seeds of the last and the best epoch's top-1.

    python cifar100/report.py [runs_dir] [--out report.md] [--plot report.png] [--paper_csv paper_results.csv]

The generic part (finding runs, grouping by identity, means, listing runs that are not finished) is
``common.report``; this module holds what is CIFAR-100's own: the paper's table and how to compare with it.
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
PAPER_COLUMNS = ("teacher", "student", "method", "top1", "source")
# Table 1 of the RCKA paper is the number we reproduce; the CRD/DKD baselines cover pairs and methods it lacks.
SOURCE_PREFERENCE = ("rcka_table1", "crd_dkd_baselines")
METRICS = ("last_acc1", "best_acc1")
DONE_KEYS = ("student", "method", "seed", "last_acc1", "best_acc1")
UNVERIFIED = "not compared: data not MD5-verified as the published CIFAR-100 (--no_verify_data)"


def load_paper_results(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of ``paper_results.csv`` (``#`` lines are provenance comments), ``top1`` as a float."""
    return read_paper_csv(path if path is not None else PAPER_CSV, PAPER_COLUMNS, ("top1",))


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


def pair_references(teacher: str | None, student: str, results: list[dict] | None = None) -> list[dict]:
    """Every published number for this pair (one per method, preferred source first), in METHODS order."""
    rows = []
    for method in METHODS:
        row = paper_row(teacher, student, method, results) if teacher is not None else None
        if row is not None:
            rows.append(row)
    return rows


def _paper_text(row: dict) -> str:
    return f"{row['top1']:.2f}" + ("" if row["source"] == "rcka_table1" else "†")


def compare_with_paper(acc1: float, teacher: str | None, student: str, method: str, verified: bool,
                       results: list[dict] | None = None) -> str:
    """What the RESULT line says beside our number."""
    if not verified:
        return UNVERIFIED
    row = paper_row(teacher, student, method, results)
    if row is not None:
        return f"paper {_paper_text(row)} (diff {acc1 - row['top1']:+.2f})" + (
            "" if row["source"] == "rcka_table1" else f" († from {row['source']})")
    others = pair_references(teacher, student, results)
    if others:
        listed = ", ".join(f"{r['method']} {_paper_text(r)}" for r in others)
        return f"the paper has no {method} number for this pair; published for it: {listed} († CRD/DKD baselines)"
    return "no published number for this pair"


def variant_label(identity: dict) -> str:
    """What differs from the paper's recipe for this pair and method ('' for the recipe itself)."""
    from cifar100.train import run_identity_of_recipe  # train imports this module: import on use

    recipe = run_identity_of_recipe(identity)
    return folder_suffix(identity, recipe, ignore=("teacher_sha256", "epochs"))


def describe(record: RunRecord) -> str:
    identity = record.identity or {}
    pair = identity.get("student", "?") if not identity.get("teacher") else f"{identity['teacher']} → {identity['student']}"
    return f"{pair}, {identity.get('method', '?')}, seed {identity.get('seed', '?')}"


def summarize(records: list[RunRecord], results: list[dict] | None = None) -> list[dict[str, Any]]:
    """One row per identity (seeds averaged): pair, method, variant, epochs, seeds, last/best mean ± std, the
    paper's number and Δ = last mean − paper (none for runs on unverified data)."""
    results = load_paper_results() if results is None else results
    rows = []
    for runs in group_finished(records):
        identity = runs[0].identity or {}
        teacher, student, method = identity.get("teacher"), identity.get("student"), identity.get("method")
        row = {"teacher": teacher, "student": student, "method": method, "epochs": runs[0].epochs,
               "variant": variant_label(identity) if identity else "", "paths": [str(r.path) for r in runs],
               "verified": identity.get("data") != "unverified", **summarize_metrics(runs, METRICS)}
        paper = paper_row(teacher, student, method, results)
        row["paper"] = None if paper is None else paper["top1"]
        row["paper_source"] = None if paper is None else paper["source"]
        row["delta"] = (row["last_acc1_mean"] - paper["top1"]
                        if paper is not None and row["verified"] and row["last_acc1_mean"] is not None else None)
        row["references"] = [] if paper is not None else pair_references(teacher, student, results)
        rows.append(row)

    def order(row: dict) -> tuple:
        method = row["method"]
        return (row["teacher"] is not None, str(row["teacher"]), str(row["student"]),
                METHODS.index(method) if method in METHODS else len(METHODS), row["variant"], row["epochs"] or 0)

    return sorted(rows, key=order)


def pair_name(row: dict) -> str:
    return str(row["student"]) if row["teacher"] is None else f"{row['teacher']} → {row['student']}"


def row_label(row: dict) -> str:
    return f"{row['method']}{'-' + row['variant'] if row['variant'] else ''}"


def format_markdown(rows: list[dict], records: list[RunRecord]) -> str:
    cells = []
    for row in rows:
        seeds = f"{len(row['seeds'])} ({', '.join(str(seed) for seed in row['seeds'])})"
        if not row["verified"]:
            paper = "not compared*"
        elif row["paper"] is not None:
            paper = f"{row['paper']:.2f}" + ("†" if row["paper_source"] != "rcka_table1" else "")
        elif row["references"]:
            paper = "none; pair: " + ", ".join(f"{r['method']} {_paper_text(r)}" for r in row["references"])
        else:
            paper = "—"
        delta = "—" if row["delta"] is None else f"{row['delta']:+.2f}"
        cells.append((pair_name(row), row_label(row), row["epochs"], seeds,
                      mean_std_text(row["last_acc1_mean"], row["last_acc1_std"]),
                      mean_std_text(row["best_acc1_mean"], row["best_acc1_std"]), paper, delta))
    lines = markdown_table(("pair", "method", "epochs", "seeds", "last top-1", "best top-1", "paper", "Δ"),
                           "llrlrrrr", cells or [("(no finished runs yet)", "", "", "", "", "", "", "")])
    lines += ["",
              "- Top-1 (%) on the CIFAR-100 test set, mean ± sample std (ddof=1) over seeds; std is — for one seed.",
              "- method: a suffix names what differs from the paper's recipe for that pair (e.g. rcka-lr0.1); runs "
              "with different settings are never averaged together.",
              "- paper: Table 1 of the RCKA paper (arXiv 2401.11824); † from the CRD/DKD baselines where Table 1 has "
              "no number (CRD reports the last epoch, DKD the best, mean of 5 runs). Where neither has this method "
              "for the pair, the pair's published numbers for other methods are shown instead. A model trained "
              "alone is compared with the paper's accuracy for it as a teacher, else as a student alone.",
              f"- *{UNVERIFIED}.",
              "- Δ = last top-1 mean − paper."]
    others = other_runs_lines(records, describe)
    if others:
        lines += ["", "Not in the table (only finished runs are counted):", "", *others]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    return report_parser("CIFAR-100 runs beside the paper's numbers", "output", PAPER_CSV)


def main(args: argparse.Namespace) -> str:
    results = load_paper_results(args.paper_csv)
    records = read_task_runs(args.runs_dir, "cifar100", DONE_KEYS, ("last_acc1", "best_acc1"))
    rows = summarize(records, results)
    text = format_markdown(rows, records)
    write_markdown(text, args.out)
    plotted = [row for row in rows if row["last_acc1_mean"] is not None]
    if plotted:
        path = plot_bars([f"{pair_name(r)}  {row_label(r)}" for r in plotted], [r["last_acc1_mean"] for r in plotted],
                         [r["last_acc1_std"] for r in plotted],
                         [r["paper"] if r["verified"] else None for r in plotted],
                         args.plot or Path(args.runs_dir) / "report.png", "CIFAR-100 test top-1 (%), last epoch",
                         "CIFAR-100: ours vs the paper")
        print(f"wrote {path}")
    return text


if __name__ == "__main__":
    report_command(main, get_args_parser())
