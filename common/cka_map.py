"""Layer x layer CKA maps between a teacher and students (or any two models) over a whole test set.

Each task's ``cka_map.py`` is a thin entry: it describes its architectures, stages, test data and
teacher lookup in a :class:`CKAMapTask`, and calls :func:`main` here, which

1. resolves each model from a run folder written by the task's ``train.py`` (its ``student_best.pth``
   or ``student_last.pth``, architecture and teacher from ``args.json``) or from a checkpoint file
   (architecture from a flag);
2. taps the requested layers (default: every stage after the stem, and the logits) with forward hooks;
3. accumulates minibatch CKA for every (row layer, column layer) pair in one pass over the test set
   (``common.cka_accumulate``), with a progress bar;
4. writes the heatmap PNG, one CSV per panel and a JSON with all matrices (``common.cka_plot``).

Rows are always the teacher (or the first model); ``--compare`` draws two column models against it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from common.checkpoint import CheckpointError, load_zoo_weights
from common.cka_layers import LOGITS, LayerError, check_layers, compute_cka_maps
from common.cka_plot import Panel, panel_json, plot_cka_maps, write_cka_csv
from common.logging import git_state, write_json_atomic
from common.run import RunError, RunFolder, file_sha256

__all__ = ["CKAMapError", "CKAMapTask", "ModelSource", "add_arguments", "main", "resolve_source", "teacher_of"]



class CKAMapError(ValueError):
    """Bad input to a CKA map (a path, an architecture, layer names); the message says what to pass instead."""


@dataclass(frozen=True)
class CKAMapTask:
    """What a task supplies: its model zoo, and how to get its test images and a run's teacher."""

    name: str
    stages: Mapping[str, Sequence[str]]  # architecture -> stage module names, in order; its keys are the choices
    build_model: Callable[[str], nn.Module]
    # (args, device) -> (batches of normalised images, number of batches, a one-line description of the data)
    test_batches: Callable[[argparse.Namespace, torch.device], tuple[Iterable[Tensor], int, str]]
    # (the run's args from args.json, args) -> the teacher checkpoint that run was distilled from
    teacher_checkpoint: Callable[[dict, argparse.Namespace], Path]


@dataclass
class ModelSource:
    checkpoint: Path
    arch: str
    label: str  # names the model on the figure and in the files
    run_args: dict | None = None  # the "args" of the run folder's args.json, when there is one


def _check_arch(arch: str, task: CKAMapTask, flag: str) -> str:
    if arch not in task.stages:
        raise CKAMapError(f"{flag} {arch!r} is not a {task.name} architecture; choices: "
                          f"{', '.join(sorted(task.stages))}.")
    return arch


def read_run_settings(folder: RunFolder) -> dict | None:
    """A run's settings, or None where no run started in ``folder``.

    Its identity (the resolved settings: student, teacher, method, seed, teacher_sha256, ...) overlaid on its flags as
    given, which alone say where the teacher file was (teacher_ckpt, zoo_dir).
    """
    identity = folder.read_identity()  # RunError for a damaged args.json, or one without an identity
    if identity is None:
        return None
    flags = json.loads(folder.args_file.read_text(encoding="utf-8")).get("args")
    return {**(flags if isinstance(flags, dict) else {}), **identity}


def resolve_source(path: str, which: str, arch: str | None, flag: str, task: CKAMapTask) -> ModelSource:
    """A run folder (its student_<which>.pth) or a checkpoint file, with its architecture."""
    p = Path(path)
    if not p.exists():
        raise CKAMapError(f"{p} does not exist: pass a run folder written by {task.name}/train.py or a checkpoint file.")
    if p.is_file():
        if arch is None:
            raise CKAMapError(f"{p} is a checkpoint file, which does not record its architecture: pass {flag} ARCH "
                              f"(one of {', '.join(sorted(task.stages))}).")
        return ModelSource(p, _check_arch(arch, task, flag), f"{arch} ({p.name})")
    folder = RunFolder(p)
    weights = {"best": folder.best_weights, "last": folder.last_weights}
    checkpoint = weights[which]
    if not checkpoint.is_file():
        present = sorted(q.name for q in p.glob("*.pth"))
        other = "last" if which == "best" else "best"
        fix = f"Try --which {other}, or pass" if weights[other].is_file() else "Pass"
        raise CKAMapError(f"{checkpoint} does not exist (the folder holds {present or 'no .pth file'}). {fix} a run "
                          f"folder of {task.name}/train.py ({folder.last_weights.name} appears when a run finishes, "
                          f"{folder.best_weights.name} when an evaluation first beats 0% top-1) or a checkpoint file.")
    try:
        settings = read_run_settings(folder)
    except RunError as err:
        raise CKAMapError(f"cannot read the settings of run {p}: {err} To map its weights anyway, pass the file "
                          f"{checkpoint} with {flag} ARCH (and the teacher as the first argument).") from err
    recorded = settings.get("student") if settings else None
    if recorded is None and arch is None:
        raise CKAMapError(f"{p} has no {folder.args_file.name} naming its architecture: pass {flag} ARCH.")
    if recorded is not None and arch is not None and arch != recorded:
        raise CKAMapError(f"{flag} {arch} contradicts {folder.args_file}, which says the student is {recorded}; "
                          f"drop {flag} or pass another folder.")
    arch = _check_arch(arch or recorded, task, flag)
    label = f"{arch} {settings.get('method')} seed{settings.get('seed')}" if settings else f"{arch} ({p.name})"
    return ModelSource(checkpoint, arch, label, settings)


def teacher_of(students: Sequence[ModelSource], args: argparse.Namespace, task: CKAMapTask) -> ModelSource:
    """The teacher the run folders ``students`` were distilled from (the same one for all of them).

    The file is found as the run found it (the task's ``teacher_checkpoint``) and must have the sha256 the run
    recorded, so a map never shows a teacher other than the one the student learnt from.
    """
    found = {}
    for s in students:
        if not s.run_args or not s.run_args.get("teacher"):
            raise CKAMapError(f"{s.label} ({s.checkpoint}) does not come from a distillation run with a teacher: "
                              "pass the model to compare with (the teacher) as the first argument, with --arch_a.")
        try:
            path = Path(task.teacher_checkpoint(s.run_args, args))
        except FileNotFoundError as err:  # the task's own "teacher not found" error, which says how to get it
            raise CKAMapError(f"the teacher of {s.label} ({s.checkpoint.parent}): {err} Or pass the teacher "
                              "checkpoint as the first argument, with --arch_a.") from err
        recorded = s.run_args.get("teacher_sha256")
        if recorded and file_sha256(path) != recorded:
            raise CKAMapError(f"{path} is not the teacher {s.label} ({s.checkpoint.parent}) was distilled from: its "
                              f"sha256 differs from the run's record ({recorded[:12]}...). Pass that teacher's "
                              "checkpoint as the first argument, with --arch_a.")
        found[s.label] = (s.run_args["teacher"], recorded or str(path), path)
    if len({(arch, key) for arch, key, _ in found.values()}) > 1:
        raise CKAMapError(f"the runs were distilled from different teachers "
                          f"({ {label: str(path) for label, (_, _, path) in found.items()} }); pass the teacher to "
                          "compare against as the first argument, with --arch_a.")
    arch, _, path = next(iter(found.values()))
    return ModelSource(path, _check_arch(arch, task, "the run's teacher"), f"{arch} (teacher)")


def output_name(labels: Sequence[str]) -> str:
    """A folder name from model labels: 'resnet56 (teacher)', 'resnet20 kd seed0' -> resnet56-teacher__resnet20-kd-seed0"""
    return "__".join(re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-") for label in labels)


def add_arguments(parser: argparse.ArgumentParser, task: CKAMapTask) -> None:
    """The flags every task's cka_map.py shares; the task adds its data flags."""
    archs = sorted(task.stages)
    # ---- models
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"run folders of {task.name}/train.py or checkpoint files. Two: MODEL_A (rows, e.g. the "
                             "teacher) against MODEL_B (columns). One run folder: its teacher against its student. "
                             "With --compare: the teacher, or nothing to use the compared runs' teacher")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                        help="two students (run folders or checkpoints, e.g. a KD and an RCKA run), each drawn "
                             "against the same teacher, side by side on one colour scale")
    parser.add_argument("--arch_a", default=None, choices=archs, metavar="ARCH",
                        help="architecture of the rows' model, needed when it is a checkpoint file (a run folder's "
                             f"args.json names it); one of: {', '.join(archs)}")
    parser.add_argument("--arch_b", default=None, choices=archs, metavar="ARCH",
                        help="architecture of the columns' model(s), needed for checkpoint files")
    parser.add_argument("--which", default="best", choices=("best", "last"),
                        help="which weights of a run folder: student_best.pth (default) or student_last.pth")
    # ---- layers
    parser.add_argument("--layers_a", default=None, metavar="NAMES",
                        help=f"comma-separated layers of the rows' model: module names of named_modules() or "
                             f"'{LOGITS}'. Default: every stage after the stem (the ones FCKA distils), then the logits")
    parser.add_argument("--layers_b", default=None, metavar="NAMES",
                        help="the same for the columns' model(s)")
    # ---- estimate
    parser.add_argument("--batch_size", type=int, default=256,
                        help="images per minibatch of the unbiased HSIC estimate (at least 4; a short last batch "
                             "joins the one before it). The estimate does not depend on it beyond noise; larger "
                             "batches give less noise and need batch^2 memory per layer")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    # ---- output
    parser.add_argument("--output_dir", default=None,
                        help=f"where cka_map.png, cka_map.json and the CSVs go; default output/{task.name}/cka_map/"
                             "<models>, named after the models compared")
    parser.add_argument("--title", default=None, help="figure title (default: the models compared)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (e.g. in batch job logs)")


def _split_layers(spec: str | None) -> list[str] | None:
    return [name.strip() for name in spec.split(",") if name.strip()] if spec else None


def resolve_models(args: argparse.Namespace, task: CKAMapTask) -> tuple[ModelSource, list[ModelSource]]:
    """The rows' model and the columns' model(s), from the positional models and --compare."""
    if args.compare:
        if len(args.models) > 1:
            raise CKAMapError(f"--compare takes the two students; give at most one other model (the teacher), not "
                              f"{args.models}.")
        columns = [resolve_source(p, args.which, args.arch_b, "--arch_b", task) for p in args.compare]
        given = args.models[0] if args.models else None
    elif len(args.models) == 1:
        columns, given = [resolve_source(args.models[0], args.which, args.arch_b, "--arch_b", task)], None
    elif len(args.models) == 2:
        columns, given = [resolve_source(args.models[1], args.which, args.arch_b, "--arch_b", task)], args.models[0]
    else:
        raise CKAMapError(f"give one run folder (its teacher against its student), two models (rows against "
                          f"columns), or --compare RUN_A RUN_B; got {len(args.models)} models.")
    if given is not None:
        return resolve_source(given, args.which, args.arch_a, "--arch_a", task), columns
    rows = teacher_of(columns, args, task)
    if args.arch_a is not None and args.arch_a != rows.arch:
        raise CKAMapError(f"--arch_a {args.arch_a} contradicts the runs' teacher {rows.arch}; drop --arch_a, or pass "
                          "the teacher checkpoint as the first argument.")
    return rows, columns


def _load(source: ModelSource, task: CKAMapTask, device: torch.device) -> tuple[nn.Module, str]:
    """The model with its weights, and its title for the figure (label and recorded accuracy)."""
    model = task.build_model(source.arch)
    meta = load_zoo_weights(model, source.checkpoint, source.arch)
    acc = meta.get("acc")
    title = f"{source.label}, top-1 {acc:.2f}" if isinstance(acc, (int, float)) else source.label
    return model.to(device), title


def main(args: argparse.Namespace, task: CKAMapTask) -> dict:
    # ------------------------------------------------------------ models and layers
    if args.batch_size < 4:
        raise CKAMapError(f"--batch_size {args.batch_size}: the unbiased HSIC estimator needs at least 4 images "
                          "per batch.")
    rows, columns = resolve_models(args, task)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    (row_model, row_title), *loaded = [_load(s, task, device) for s in (rows, *columns)]
    row_layers = check_layers(row_model, rows.arch, _split_layers(args.layers_a), task.stages[rows.arch], "--layers_a")
    col_layers = [check_layers(model, s.arch, _split_layers(args.layers_b), task.stages[s.arch], "--layers_b")
                  for (model, _), s in zip(loaded, columns)]

    # ------------------------------------------------------------ one pass over the test set
    batches, total, description = task.test_batches(args, device)
    print(f"CKA of {rows.label} ({rows.checkpoint}) with " + " and ".join(f"{s.label} ({s.checkpoint})" for s in columns)
          + f" on {description}", flush=True)
    accumulators = compute_cka_maps((row_model, row_layers), [(m, layers) for (m, _), layers in zip(loaded, col_layers)],
                                    batches, total=total, progress=not args.no_progress)

    # ------------------------------------------------------------ figure, CSV, JSON
    output_dir = Path(args.output_dir or Path("output", task.name, "cka_map",
                                              output_name([rows.label, *(s.label for s in columns)])))
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_names = ["cka_map.csv"] if len(columns) == 1 else ["cka_map_a.csv", "cka_map_b.csv"]
    panels, records = [], []
    for (_, col_title), layers, acc, csv_name in zip(loaded, col_layers, accumulators, csv_names):
        panel = Panel(acc.compute().cpu().numpy(), row_layers, layers, row_title, col_title)
        write_cka_csv(output_dir / csv_name, panel)
        undefined_rows, undefined_cols = acc.degenerate()
        undefined = {"rows": [row_layers[i] for i in undefined_rows], "columns": [layers[i] for i in undefined_cols]}
        if undefined["rows"] or undefined["columns"]:
            print(f"WARNING: constant over the data, so CKA is undefined and drawn as 0: {undefined}", file=sys.stderr)
        panels.append(panel)
        records.append({**panel_json(panel), "csv": csv_name, "undefined_layers": undefined})
    first = accumulators[0]
    subtitle = f"{description}; {first.num_samples} images in {first.num_batches} minibatches"
    title = args.title or f"CKA between layers: {rows.label} vs " + " | ".join(s.label for s in columns)
    size = plot_cka_maps(panels, output_dir / "cka_map.png", title, subtitle, dpi=args.dpi)
    record = {"task": task.name, "title": title, "data": description, "num_samples": first.num_samples,
              "num_batches": first.num_batches, "batch_size": args.batch_size,
              "estimator": "linear CKA from minibatch means of the unbiased HSIC (Nguyen, Raghu & Kornblith, ICLR "
                           "2021, Sec. 3.1; Song et al. 2012, eq. 5)",
              "models": [{"label": s.label, "arch": s.arch, "checkpoint": str(s.checkpoint)} for s in (rows, *columns)],
              "panels": records, "png": "cka_map.png", "png_size": list(size), "argv": list(sys.argv),
              "git_commit": git_state()["git_commit"]}
    write_json_atomic(record, output_dir / "cka_map.json")
    for panel in panels:
        print(_table(panel))
    print(f"wrote {output_dir / 'cka_map.png'} ({size[0]}x{size[1]} px), {output_dir / 'cka_map.json'}, "
          + ", ".join(str(output_dir / name) for name in csv_names), flush=True)
    return record


def _table(panel: Panel) -> str:
    width = max(len(name) for name in [*panel.row_layers, *panel.col_layers, "rows"]) + 1
    lines = [f"{panel.row_title} (rows) vs {panel.col_title} (columns)",
             " " * width + "".join(f"{name:>{width}}" for name in panel.col_layers)]
    # Network order top to bottom here, as in the CSV (the figure puts the first layer at the bottom).
    lines += [f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row)
              for name, row in zip(panel.row_layers, panel.matrix)]
    return "\n".join(lines)


# Errors whose message says what to do: the task's entry prints them without a traceback.
USER_ERRORS = (CKAMapError, LayerError, CheckpointError)
