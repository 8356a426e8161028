"""The runs a launch describes: named sweeps (pairs from the task's paper_results.csv x methods x seeds),
--pairs/--methods/--seeds restrictions, and the Run record each one becomes."""
from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.losses import METHODS


SWEEP_SEEDS = (0, 1, 2)


REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sweep:
    task: str
    source: str  # the rows of <task>/paper_results.csv (column `source`) whose teacher/student pairs are swept
    methods: tuple[str, ...]
    help: str
    seeds: tuple[int, ...] = SWEEP_SEEDS
    # A task whose runs are config files (detectron2's --config-file): one run per file of <task>/configs/,
    # instead of pairs x methods x seeds.
    configs: tuple[str, ...] = ()


# A task's DEFAULT_SWEEP (in its train.py, beside its recipe) names the one a bare `launch.py TASK` submits.
SWEEPS = {
    "table1": Sweep("cifar100", "rcka_table1", METHODS,
                    "the paper's Table 1 pairs x ce, kd, dkd, fcka, lcka, rcka (ce: each student alone, once)"),
    "table1_rcka": Sweep("cifar100", "rcka_table1", ("rcka",), "the paper's Table 1 pairs x rcka (its RCKA column)"),
    "baselines13": Sweep("cifar100", "crd_dkd_baselines", ("kd", "dkd", "rcka"),
                         "the 13 standard CRD/DKD pairs x kd, dkd, rcka"),
    # ImageNet: one seed by default, as Table 2 and the KD papers it compares with report single runs (a run takes
    # a node of 8 GPUs for hours); --seeds 0 1 2 for more.
    "table2": Sweep("imagenet", "rcka_table2", ("ce", "kd", "dkd", "rcka"),
                    "the paper's Table 2 pairs (resnet34->resnet18, resnet50->mobilenet_v1) x ce, kd, dkd, rcka "
                    "(ce: each student alone), seed 0", seeds=(0,)),
    "table2_rcka": Sweep("imagenet", "rcka_table2", ("rcka",),
                         "the paper's Table 2 pairs x rcka (its RCKA column), seed 0", seeds=(0,)),
    # COCO: one run per config, as Table 3 reports single runs (each takes an 8-GPU node for a day or more).
    "table3": Sweep("coco_detection", "", (),
                    "Table 3's detectors: the three PCKA pairs and the two students alone (one run each)", seeds=(),
                    configs=("retinanet_R101_to_R50_pcka", "faster_rcnn_R101_to_R50_pcka",
                             "faster_rcnn_X101_to_R50_pcka", "retinanet_R50", "faster_rcnn_R50")),
}
# The settings a sweep varies; a task needs these flags for --sweep, --pairs and --methods.
VARIED = ("teacher", "student", "method", "seed")


class LaunchError(ValueError):
    """Flags or a task that cannot be launched; the message says what to pass instead."""



@dataclass(frozen=True)
class Run:
    task: str
    args: argparse.Namespace  # the task's flags for this run; output_dir absolute
    command: tuple[str, ...]  # the equivalent command line, without SLURM

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def name(self) -> str:
        return os.path.relpath(self.args.output_dir)


def sweep_pairs(sweep: Sweep) -> list[tuple[str, str]]:
    """The (teacher, student) pairs of a sweep, in the order of the task's paper_results.csv."""
    rows = importlib.import_module(f"{sweep.task}.report").load_paper_results()
    pairs = list(dict.fromkeys((row["teacher"], row["student"]) for row in rows if row["source"] == sweep.source))
    if not pairs:
        raise LaunchError(f"{sweep.task}/paper_results.csv has no rows with source {sweep.source!r}")
    return pairs


def _choices(parser: argparse.ArgumentParser, dest: str) -> Sequence[str] | None:
    return next((a.choices for a in parser._actions if a.dest == dest), None)


def varied_settings(args: argparse.Namespace, task: str, task_parser: argparse.ArgumentParser) -> list[dict]:
    """One dict of overrides per run: pairs x methods x seeds, or [{}] for a single run of the flags as given."""
    sweep = None
    if args.sweep is not None:
        if args.sweep not in SWEEPS:
            raise LaunchError(f"unknown sweep {args.sweep!r}; sweeps: " + "; ".join(
                f"{name} ({s.task}): {s.help}" for name, s in SWEEPS.items()))
        sweep = SWEEPS[args.sweep]
        if sweep.task != task:
            raise LaunchError(f"sweep {args.sweep!r} is a {sweep.task} sweep: python slurm/launch.py {sweep.task} ...")
        if sweep.configs:
            return config_settings(args.sweep, sweep, args)
    if args.pairs is None and args.methods is None and args.seeds is None and sweep is None:
        return [{}]
    missing = [dest for dest in VARIED if not hasattr(args, dest)]
    if missing and hasattr(args, "config_file"):
        raise _config_runs_only(task, args)
    if missing:
        raise LaunchError(f"task {task!r} has no --{', --'.join(missing)}: --sweep/--pairs/--methods/--seeds "
                          f"do not apply; submit its runs one by one")
    given = {dest for dest in VARIED if getattr(args, dest) != task_parser.get_default(dest)}
    pairs = [_parse_pair(p, task_parser) for p in args.pairs] if args.pairs else (sweep_pairs(sweep) if sweep else None)
    methods = args.methods or (list(sweep.methods) if sweep else None)
    seeds = args.seeds or (list(sweep.seeds) if sweep else None)
    for varied, dests, instead in ((pairs, {"teacher", "student"}, "--pairs"), (methods, {"method"}, "--methods"),
                                   (seeds, {"seed"}, "--seeds")):
        if varied and given & dests:
            flags = ", ".join(f"--{d}" for d in sorted(given & dests))
            raise LaunchError(f"{flags} and {instead} (or --sweep) both set the same thing: pass only {instead}")
    method_choices = _choices(task_parser, "method")
    unknown = [m for m in methods or () if method_choices and m not in method_choices]
    if unknown:
        raise LaunchError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(method_choices)}")
    settings = []
    for teacher, student in pairs or [(args.teacher, args.student)]:
        for method in methods or [args.method]:
            for seed in seeds or [args.seed]:
                # ce trains the student alone: no teacher, and one run per student whatever the pair.
                settings.append({"teacher": None if method == "ce" else teacher, "student": student,
                                 "method": method, "seed": seed})
    return settings


def _config_runs_only(task: str, args: argparse.Namespace) -> LaunchError:
    """The error for --pairs/--methods/--seeds given to a task whose runs are config files."""
    given = [flag for flag, value in (("--pairs", args.pairs), ("--methods", args.methods), ("--seeds", args.seeds))
             if value is not None]
    return LaunchError(f"{', '.join(given)} do not apply to {task}, whose runs are config files: name one with "
                       f"--config-file (its seed with the config option SEED N), or submit its sweep "
                       f"({', '.join(name for name, s in SWEEPS.items() if s.task == task)})")


def config_settings(sweep_name: str, sweep: Sweep, args: argparse.Namespace) -> list[dict]:
    """One run per config file of the sweep (absolute paths, so a job finds them wherever it starts)."""
    if args.pairs is not None or args.methods is not None or args.seeds is not None:
        raise _config_runs_only(sweep.task, args)
    if getattr(args, "config_file", None):
        raise LaunchError(f"--config-file and --sweep both name the runs: pass only one (sweep {sweep_name}: "
                          f"{', '.join(sweep.configs)})")
    paths = [REPO / sweep.task / "configs" / f"{config}.yaml" for config in sweep.configs]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise LaunchError(f"the sweep's config files are missing: {', '.join(missing)}")
    return [{"config_file": str(path)} for path in paths]


def _parse_pair(text: str, task_parser: argparse.ArgumentParser) -> tuple[str, str]:
    teacher, sep, student = text.partition(":")
    if not sep or not teacher or not student:
        raise LaunchError(f"--pairs takes TEACHER:STUDENT, e.g. resnet56:resnet20; got {text!r}")
    archs = _choices(task_parser, "student")
    bad = [a for a in (teacher, student) if archs and a not in archs]
    if bad:
        raise LaunchError(f"unknown architecture(s) {', '.join(bad)} in --pairs {text}; choices: {', '.join(archs)}")
    return teacher, student
