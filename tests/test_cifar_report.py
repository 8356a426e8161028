"""Specification of cifar100/report.py and cifar100/paper_results.csv: runs on disk → table beside the paper."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cifar100.models import MODELS
from cifar100.report import (
    compare_with_paper,
    format_markdown,
    get_args_parser,
    load_paper_results,
    main,
    paper_top1,
    summarize,
)
from cifar100.train import run_identity_of_recipe
from common.run import RunError, find_runs

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data"  # copies of the paper's tables, see data/README.md
EPOCHS = 240
# The fixture's unfinished run ends in a truncated line on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*incomplete last line:UserWarning")

# (teacher, student, method, seed, last top-1, best top-1) of the finished runs the tests write.
FINISHED = [
    ("resnet110", "resnet20", "rcka", 0, 70.0, 70.5),
    ("resnet110", "resnet20", "rcka", 1, 71.0, 71.5),
    ("resnet110", "resnet20", "rcka", 2, 72.5, 73.0),
    ("resnet110", "resnet20", "kd", 0, 70.0, 70.4),
    ("resnet110", "resnet20", "kd", 1, 71.0, 71.2),
    ("resnet56", "resnet20", "kd", 0, 70.2, 70.9),
    ("resnet56", "resnet20", "kd", 1, 70.6, 70.7),
    ("resnet56", "resnet20", "rcka", 5, 71.3, 71.8),
    (None, "resnet110", "ce", 0, 74.0, 74.2),  # training a teacher
]


def identity_of(teacher, student, method, seed, epochs=EPOCHS, **changes):
    """The identity train.py gives this run with the recipe's settings (and ``changes``)."""
    identity = run_identity_of_recipe({"teacher": teacher, "student": student, "method": method, "seed": seed})
    return {**identity, "epochs": epochs, **changes}


def write_run(folder: Path, identity: dict, log_acc1: list[float], last_acc1=None, best_acc1=None,
              events=("start",)) -> Path:
    """A run folder as train.py writes it; done.json only when ``last_acc1`` is given (a finished run)."""
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"identity": identity, "args": {}, "git_commit": "0123abc"}))
    (folder / "invocations.jsonl").write_text("".join(json.dumps({"event": e, **({"message": "ValueError: boom"}
                                                                                 if e == "failed" else {})}) + "\n"
                                                      for e in events))
    with open(folder / "log.txt", "w") as f:
        for epoch, acc1 in enumerate(log_acc1):
            f.write(json.dumps({"epoch": epoch, "lr": 0.05, "train_loss": 1.5, "test_acc1": acc1}) + "\n")
    if last_acc1 is not None:
        done = {"task": "cifar100", "teacher": identity["teacher"], "student": identity["student"],
                "method": identity["method"], "seed": identity["seed"], "epochs": identity["epochs"],
                "last_acc1": last_acc1, "best_acc1": best_acc1, "best_epoch": identity["epochs"] - 3,
                "identity": identity, "git_commit": "0123abc"}
        (folder / "done.json").write_text(json.dumps(done, indent=2))
    return folder


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for teacher, student, method, seed, last, best in FINISHED:
        name = f"{teacher or 'none'}_{student}_{method}_seed{seed}"
        write_run(root / "cifar100" / name, identity_of(teacher, student, method, seed),
                  [50.0] * (EPOCHS - 1) + [last], last, best, events=("start", "finished"))
    # Killed at epoch 4, mid-line. Its accuracies are far from the others' so that counting it would show.
    unfinished = write_run(root / "cifar100" / "resnet110_resnet20_rcka_seed3",
                           identity_of("resnet110", "resnet20", "rcka", 3), [5.0, 8.0, 9.0, 11.0])
    with open(unfinished / "log.txt", "a") as f:
        f.write('{"epoch": 4, "lr": 0.05, "train_loss": 1.4, "test_ac')
    return root


def summary_rows(runs_dir: Path) -> dict[tuple, dict]:
    rows = summarize(find_runs(runs_dir))
    keyed = {(row["teacher"], row["student"], row["method"]): row for row in rows if not row["variant"]}
    return keyed


def test_means_and_sample_stds_over_seeds_match_hand_computed_values(runs_dir):
    rows = summary_rows(runs_dir)
    rcka = rows[("resnet110", "resnet20", "rcka")]
    assert rcka["seeds"] == [0, 1, 2]
    assert rcka["last_acc1_mean"] == pytest.approx(71.1667, abs=1e-4)  # (70.0 + 71.0 + 72.5) / 3
    assert rcka["last_acc1_std"] == pytest.approx(1.2583, abs=1e-4)  # sqrt(3.1667 / 2), ddof = 1
    assert rcka["best_acc1_mean"] == pytest.approx(71.6667, abs=1e-4)
    assert rcka["best_acc1_std"] == pytest.approx(1.2583, abs=1e-4)
    kd = rows[("resnet56", "resnet20", "kd")]
    assert kd["last_acc1_mean"] == pytest.approx(70.4) and kd["last_acc1_std"] == pytest.approx(0.2828, abs=1e-4)
    assert kd["best_acc1_mean"] == pytest.approx(70.8) and kd["best_acc1_std"] == pytest.approx(0.1414, abs=1e-4)
    single = rows[("resnet56", "resnet20", "rcka")]
    assert single["seeds"] == [5] and single["last_acc1_mean"] == 71.3 and single["last_acc1_std"] is None


def test_paper_column_prefers_table1_and_falls_back_to_the_crd_dkd_baselines(runs_dir):
    rows = summary_rows(runs_dir)
    rcka = rows[("resnet110", "resnet20", "rcka")]
    assert (rcka["paper"], rcka["paper_source"]) == (72.26, "rcka_table1")
    assert rcka["delta"] == pytest.approx(71.1667 - 72.26, abs=1e-4)
    kd = rows[("resnet56", "resnet20", "kd")]  # resnet56 → resnet20 is not in Table 1
    assert (kd["paper"], kd["paper_source"]) == (70.66, "crd_dkd_baselines")
    assert kd["delta"] == pytest.approx(70.4 - 70.66)
    nothing = rows[("resnet56", "resnet20", "rcka")]
    assert nothing["paper"] is None and nothing["delta"] is None
    assert [r["method"] for r in nothing["references"]] == ["ce", "kd", "dkd"]  # what the pair does have


def test_teacher_training_run_is_compared_with_the_papers_teacher_accuracy(runs_dir):
    row = summary_rows(runs_dir)[(None, "resnet110", "ce")]
    assert row["paper"] == 74.31 and row["delta"] == pytest.approx(-0.31)


def test_markdown_table_shows_pairs_seeds_mean_std_paper_and_delta(runs_dir):
    records = find_runs(runs_dir)
    text = format_markdown(summarize(records), records)
    lines = text.splitlines()
    assert lines[0] == "| pair | method | epochs | seeds | last top-1 | best top-1 | paper | Δ |"
    assert "| resnet110 | ce | 240 | 1 (0) | 74.00 ± — | 74.20 ± — | 74.31 | -0.31 |" in lines
    assert "| resnet110 → resnet20 | kd | 240 | 2 (0, 1) | 70.50 ± 0.71 | 70.80 ± 0.57 | 70.67 | -0.17 |" in lines
    assert "| resnet110 → resnet20 | rcka | 240 | 3 (0, 1, 2) | 71.17 ± 1.26 | 71.67 ± 1.26 | 72.26 | -1.09 |" in lines
    assert "| resnet56 → resnet20 | kd | 240 | 2 (0, 1) | 70.40 ± 0.28 | 70.80 ± 0.14 | 70.66† | -0.26 |" in lines
    assert ("| resnet56 → resnet20 | rcka | 240 | 1 (5) | 71.30 ± — | 71.80 ± — | none; pair: ce 69.06†, kd 70.66†, dkd 71.97† "
            "| — |") in lines
    assert "ddof=1" in text and "std is — for one seed" in text
    # Methods in a fixed order within a pair: kd before rcka; the model trained alone first.
    assert lines.index(next(line for line in lines if "| ce |" in line)) == 2


def test_unfinished_run_is_listed_in_progress_and_never_counted(runs_dir):
    records = find_runs(runs_dir)
    assert sum(r.state == "done" for r in records) == len(FINISHED)
    (unfinished,) = [r for r in records if r.state != "done"]
    assert (unfinished.state, unfinished.epochs_done) == ("in progress", 4)  # the truncated line is not an epoch
    rows = summarize(records)
    assert all(3 not in row["seeds"] for row in rows)
    text = format_markdown(rows, records)
    assert "resnet110 → resnet20, rcka, seed 3: in progress (epoch 4/240)" in text
    assert text.index("Not in the table") > text.index("| resnet110 → resnet20 | rcka |")


def test_failed_never_started_and_corrupt_runs_are_listed_and_never_counted(runs_dir):
    write_run(runs_dir / "failed", identity_of("resnet56", "resnet20", "kd", 7), [], events=("start", "failed"))
    write_run(runs_dir / "fresh", identity_of("resnet56", "resnet20", "kd", 8), [], events=("start",))
    corrupt = write_run(runs_dir / "corrupt", identity_of("resnet56", "resnet20", "kd", 9), [60.0], 60.0, 60.0)
    (corrupt / "done.json").write_text('{"task": "cifar1')
    records = find_runs(runs_dir)
    states = {r.path.name: r.state for r in records}
    assert (states["failed"], states["fresh"], states["corrupt"]) == ("failed", "not started", "corrupt")
    kd = summary_rows(runs_dir)[("resnet56", "resnet20", "kd")]
    assert kd["seeds"] == [0, 1]
    text = format_markdown(summarize(records), records)
    assert "seed 7: failed: ValueError: boom" in text and "seed 8: not started" in text
    assert "corrupt: " in text and "done.json is not valid JSON" in text


def test_runs_with_different_settings_are_different_rows_labelled_by_what_differs(runs_dir):
    for seed, centered in ((0, True), (1, True), (0, False)):
        write_run(runs_dir / f"variant{seed}{centered}",
                  identity_of("resnet110", "resnet20", "rcka", seed, cka_centered=centered, lr=0.1), [1.0], 60.0 + seed,
                  61.0)
    rows = [r for r in summarize(find_runs(runs_dir)) if (r["teacher"], r["method"]) == ("resnet110", "rcka")]
    labels = {r["variant"]: r["seeds"] for r in rows}
    recipe_centred = run_identity_of_recipe({"teacher": "resnet110", "student": "resnet20", "method": "rcka",
                                             "seed": 0})["cka_centered"]
    assert labels[""] == [0, 1, 2]
    assert sorted(len(seeds) for seeds in labels.values()) == [1, 2, 3]
    assert any("lr0.1" in label and "cka_centered" not in label for label in labels if label)
    flipped = "cka_centered" if not recipe_centred else "no_cka_centered"
    assert any(flipped in label for label in labels)


def test_unverified_data_is_never_compared_with_the_paper(runs_dir):
    write_run(runs_dir / "unverified", identity_of("resnet110", "resnet20", "kd", 0, data="unverified"), [1.0], 99.0,
              99.0)
    rows = summarize(find_runs(runs_dir))
    (row,) = [r for r in rows if r["variant"] == "data_unverified"]
    assert row["paper"] == 70.67 and row["delta"] is None and not row["verified"]
    records = find_runs(runs_dir)
    assert "not compared*" in format_markdown(rows, records)
    assert compare_with_paper(99.0, "resnet110", "resnet20", "kd", verified=False).startswith("not compared")


def test_result_line_names_the_nearest_published_numbers_when_the_paper_has_none():
    text = compare_with_paper(71.0, "resnet56", "resnet20", "rcka", verified=True)
    assert "no rcka number for this pair" in text and "kd 70.66†" in text and "dkd 71.97†" in text
    assert compare_with_paper(72.0, "resnet110", "resnet20", "rcka", verified=True) == "paper 72.26 (diff -0.26)"


def test_runs_of_different_length_are_never_averaged_together(runs_dir):
    write_run(runs_dir / "smoke", identity_of("resnet110", "resnet20", "rcka", 0, epochs=2), [10.0, 20.0], 20.0, 20.0)
    rows = [row for row in summarize(find_runs(runs_dir)) if (row["teacher"], row["method"]) == ("resnet110", "rcka")]
    assert [(row["epochs"], row["seeds"]) for row in rows] == [(2, [0]), (240, [0, 1, 2])]


def test_main_writes_the_markdown_and_a_png_beside_the_runs_and_says_where(runs_dir, tmp_path, capsys):
    out = tmp_path / "report.md"
    text = main(get_args_parser().parse_args([str(runs_dir), "--out", str(out)]))
    png = runs_dir / "report.png"  # the default place
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert out.read_text() == text
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {png}" in printed


@pytest.mark.parametrize("count", [1, 50])
def test_the_plot_stays_readable_with_one_run_and_with_fifty(tmp_path, count):
    from matplotlib.image import imread

    root = tmp_path / "runs"
    for seed in range(count):
        write_run(root / f"r{seed}", identity_of("resnet110", "resnet20", "rcka", 0, lr=0.01 * (seed + 1)), [1.0],
                  60.0 + seed % 7, 61.0)
    main(get_args_parser().parse_args([str(root), "--plot", str(tmp_path / "p.png")]))
    height, width = imread(tmp_path / "p.png").shape[:2]
    # One row is a short figure, not one bar filling a tall one; fifty rows get ~0.45 inch each at 120 dpi.
    assert width == 960 and (height < 400 if count == 1 else height > 50 * 0.45 * 120)


def test_paper_top1_looks_up_pairs_methods_and_models_trained_alone():
    assert paper_top1("resnet110", "resnet20", "rcka") == 72.26
    assert paper_top1("resnet56", "resnet20", "kd") == 70.66  # only in the CRD/DKD baselines
    assert paper_top1("wrn_40_2", "wrn_16_2", "dkd") == 76.24  # Table 1 (76.24) before the DKD README (76.23)
    assert paper_top1("ResNet50", "vgg8", "dkd") is None  # an empty cell stays empty
    assert paper_top1(None, "resnet32x4", "ce") == 79.42  # as a teacher
    assert paper_top1(None, "resnet20", "ce") == 69.06  # never a teacher: as a student trained alone
    assert paper_top1(None, "resnet20", "kd") is None
    assert paper_top1("resnet110", "resnet20", "pcka") is None


def test_paper_results_csv_is_tidy_with_zoo_names_and_provenance_comments():
    path = REPO / "cifar100" / "paper_results.csv"
    head = path.read_text().splitlines()[:20]
    assert any("2401.11824" in line for line in head) and any("Klayand/PCKA" in line for line in head)
    assert any("HobbitLong/RepDistiller" in line for line in head) and any("mdistiller" in line for line in head)
    rows = load_paper_results()
    assert {row["source"] for row in rows} == {"rcka_table1", "crd_dkd_baselines"}
    assert {row["teacher"] for row in rows} | {row["student"] for row in rows} <= set(MODELS)
    keys = [(row["teacher"], row["student"], row["method"], row["source"]) for row in rows]
    assert len(keys) == len(set(keys)), "one row per (pair, method, source)"


def test_paper_results_csv_holds_every_cell_of_both_reference_tables():
    ours = {"teacher": "teacher", "student": "ce", "KD": "kd", "DKD": "dkd", "FCKA": "fcka", "LCKA": "lcka",
            "RCKA": "rcka"}
    expected = set()
    with open(REFERENCE / "paper_table1_cifar100.csv") as f:
        for row in csv.DictReader(f):
            for pair, value in row.items():
                if "->" in pair and value.strip():
                    expected.add((*pair.split("->"), ours.get(row["method"], row["method"]), float(value),
                                  "rcka_table1"))
    with open(REFERENCE / "standard_cifar100_baselines.csv") as f:
        for row in csv.DictReader(f):
            for column in ("teacher", "student", "KD", "CRD", "DKD"):
                if row[column].strip():
                    expected.add((*row["pair"].split("->"), ours.get(column, column), float(row[column]),
                                  "crd_dkd_baselines"))
    got = {tuple(row[key] for key in ("teacher", "student", "method", "top1", "source"))
           for row in load_paper_results()}
    assert len(expected) == 256
    assert got == expected


def test_missing_runs_dir_error_names_the_path(tmp_path):
    with pytest.raises(RunError, match="no_such_dir"):
        find_runs(tmp_path / "no_such_dir")


def test_no_runs_error_says_what_a_run_folder_looks_like(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(RunError, match="no cifar100 runs found.*args.json.*log.txt.*done.json"):
        main(get_args_parser().parse_args([str(tmp_path / "empty")]))


def test_one_malformed_done_json_is_listed_and_skipped_not_fatal(runs_dir, capsys):
    done = runs_dir / "cifar100" / "resnet110_resnet20_kd_seed0" / "done.json"
    done.write_text(json.dumps({"student": "resnet20", "method": "kd", "seed": 0}))
    text = main(get_args_parser().parse_args([str(runs_dir)]))
    assert "resnet110_resnet20_kd_seed0" in text and "lacks or has no finite last_acc1, best_acc1" in text
    assert "| resnet110 → resnet20 | kd | 240 | 1 (1) |" in text


def test_cli_prints_the_table_and_writes_the_plot(runs_dir, tmp_path):
    plot = tmp_path / "plots" / "cifar.png"
    result = subprocess.run([sys.executable, "cifar100/report.py", str(runs_dir), "--plot", str(plot)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| resnet110 → resnet20 | rcka | 240 | 3 (0, 1, 2) | 71.17 ± 1.26 |" in result.stdout
    assert "in progress (epoch 4/240)" in result.stdout
    assert f"wrote {plot}" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_name_the_missing_dir_and_the_empty_one(tmp_path):
    missing = subprocess.run([sys.executable, "cifar100/report.py", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and str(tmp_path / "nope") in missing.stderr and "Traceback" not in missing.stderr
    empty = subprocess.run([sys.executable, "cifar100/report.py", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "no cifar100 runs found" in empty.stderr


def test_runs_of_another_task_under_the_same_folder_are_left_out(runs_dir):
    other = write_run(runs_dir / "imagenet_run", {**identity_of("resnet110", "resnet20", "kd", 0), "task": "imagenet"},
                      [1.0], 99.0, 99.0)
    records = find_runs(runs_dir)
    assert other in [r.path for r in records]
    text = main(get_args_parser().parse_args([str(runs_dir)]))
    assert "imagenet_run" not in text and "99.00" not in text
