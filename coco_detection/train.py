"""PCKA distillation of COCO detectors on detectron2 (the paper's Table 3), in detectron2's train_net.py conventions.

    python coco_detection/train.py --config-file coco_detection/configs/retinanet_R101_to_R50_pcka.yaml --num-gpus 8
    python coco_detection/train.py --config-file ... MODEL.DISTILL.MIMIC_WEIGHT 1.0          # "PCKA + mimic"
    python coco_detection/train.py --config-file ... --eval-only                              # evaluate the last checkpoint
    python coco_detection/train.py --config-file coco_detection/configs/retinanet_R50.yaml   # the student alone

Config options go at the end as detectron2's "KEY VALUE" pairs. The run folder (OUTPUT_DIR) defaults to
output/coco_detection/<config name>/<overrides>, so different settings never share one. Unlike detectron2's
train_net.py, rerunning the same command resumes from the folder's last checkpoint without --resume (the
project's convention, which SLURM requeueing relies on); --resume is accepted. The run folder's record (identity,
history of starts and ends, result) is common/run.py's: a finished run says so and exits, and a different config
in an existing run folder is refused with the settings that differ.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import weakref
from pathlib import Path

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import coco_detection.meta_arch  # noqa: F401  (registers DistillationDetector with META_ARCH_REGISTRY)
from coco_detection.config import add_distillation_config, build_teacher_cfg
from coco_detection.data import DatasetError, check_datasets, register_coco_datasets
from coco_detection.distill import DistillError, method_name, resolve_inter_weight
from common import dist
from common.checkpoint import atomic_write, save_atomic
from common.logging import write_json_atomic
from common.run import RunConflictError, RunError, RunFolder, file_sha256

TASK = "coco_detection"
# slurm/launch.py: a bare `launch.py coco_detection` submits Table 3's configs (slurm/sweeps.py, one run each), each
# on one node of 8 GPUs as the configs' batch of 16 assumes, one SLURM task starting the 8 processes itself
# (detectron2's launch; the launcher sets --num-gpus to --gpus_per_node). 48 h: a 2x schedule with a teacher; a
# run that needs longer is requeued at the limit and resumes from its last checkpoint.
DEFAULT_SWEEP = "table3"
SLURM_DEFAULTS = {"nodes": 1, "gpus_per_node": 8, "ntasks_per_node": 1, "cpus_per_task": 64, "timeout_min": 48 * 60}
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Files of this task in the run folder, beside common.run's (args.json, invocations.jsonl, done.json) and
# detectron2's own (config.yaml, metrics.json, model_*.pth, last_checkpoint, inference/).
D2_LOG_FILE = "detectron2_log.txt"  # detectron2's text log; see setup_process
EVAL_FILE = "eval.json"  # --eval-only's result
STUDENT_FILE = "student_final.pth"  # the distilled student alone
D2_LAST_CHECKPOINT = "last_checkpoint"  # detectron2's pointer to its newest model_*.pth
# Settings that do not change a run's result, left out of its identity so that they may change on resume.
NOT_IDENTITY = ("OUTPUT_DIR", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD",
                "TEST.EVAL_PERIOD", "VIS_PERIOD")


class UsageError(ValueError):
    """A command that cannot run as given; the message says what to change."""


# ---------------------------------------------------------------------------------------------------- arguments
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """detectron2's default_argument_parser (--config-file, --resume, --eval-only, --num-gpus, ..., opts) plus ours."""
    parser = default_argument_parser()
    if not add_help:
        # detectron2's parser always has -h; one used as a parent (slurm/launch.py) must not. argparse's own
        # "resolve" conflict handler removes an action together with its option strings.
        help_action = next(a for a in parser._actions if isinstance(a, argparse._HelpAction))
        parser._handle_conflict_resolve(None, [(s, help_action) for s in help_action.option_strings])
    parser.description = "PCKA knowledge distillation of COCO detectors (detectron2)"
    parser.add_argument("--output_dir", default=None,
                        help="run folder (= OUTPUT_DIR); default: OUTPUT_DIR if given among the options, else "
                             "output/coco_detection/<config name>/<options>")
    parser.add_argument("--register_coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset under NAME (repeatable); use it with "
                             "DATASETS.TRAIN \"('NAME',)\" / DATASETS.TEST \"('NAME',)\"")
    return parser


def _opts_pairs(opts) -> list[tuple[str, str]]:
    opts = list(opts or [])
    if len(opts) % 2:
        raise UsageError(f"config options come in KEY VALUE pairs; got an odd number: {opts}")
    return list(zip(opts[::2], opts[1::2]))


def default_output_dir(args: argparse.Namespace) -> str:
    """OUTPUT_DIR from the options if given, else output/coco_detection/<config name>/<options or 'default'>."""
    pairs = _opts_pairs(args.opts)
    given = [value for key, value in pairs if key == "OUTPUT_DIR"]
    if given:
        return given[-1]
    name = Path(args.config_file).stem if args.config_file else "no_config"
    tag = "_".join(f"{key}={value}" for key, value in pairs) or "default"
    tag = re.sub(r"[^A-Za-z0-9.=_-]+", "", tag)
    if len(tag) > 80:  # a folder name stays readable; the hash keeps different options apart
        tag = tag[:60] + "_" + hashlib.sha256(" ".join(map(str, args.opts)).encode()).hexdigest()[:12]
    return os.path.join("output", TASK, name, tag)


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """The frozen config of the run: detectron2 defaults + distillation keys + config file + options + OUTPUT_DIR."""
    if not args.config_file:
        raise UsageError("pass --config-file, e.g. coco_detection/configs/retinanet_R101_to_R50_pcka.yaml")
    if not Path(args.config_file).is_file():
        raise UsageError(f"config file {args.config_file} does not exist")
    register_coco_datasets(args.register_coco)
    cfg = get_cfg()
    add_distillation_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
    except yaml.YAMLError as err:
        raise UsageError(f"config file {args.config_file} is not valid YAML ({' '.join(str(err).split())}): fix it, "
                         f"or start from one of coco_detection/configs/") from None
    except (KeyError, AssertionError, ValueError, OSError) as err:
        # yacs: a key detectron2 and this task do not define, a value of the wrong type, a missing _BASE_ file.
        raise UsageError(f"config file {args.config_file} does not fit detectron2's config ({err}): fix it, or "
                         f"start from one of coco_detection/configs/") from None
    try:
        cfg.merge_from_list(list(args.opts or []))
    except (KeyError, AssertionError, ValueError) as err:
        raise UsageError(f"bad config option(s) {args.opts}: {err}") from None
    cfg.OUTPUT_DIR = args.output_dir or default_output_dir(args)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        raise UsageError("no GPU here: add MODEL.DEVICE cpu to the options (slow; for tests only)")
    cfg.freeze()
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return cfg


def is_distillation(cfg: CfgNode) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "DistillationDetector"


def resolved_method(cfg: CfgNode) -> str:
    """Table 3's row name: "alone" for a plain detector, else pcka, pcka+mimic, kd, ... from the weights."""
    if not is_distillation(cfg):
        return "alone"
    two_stage = cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE == "GeneralizedRCNN"
    inter = resolve_inter_weight(cfg.MODEL.PCKA.INTER_WEIGHT, cfg.MODEL.PCKA.INTRA_WEIGHT, two_stage)
    return method_name(cfg.MODEL.PCKA.INTRA_WEIGHT, inter, cfg.MODEL.DISTILL.MIMIC_WEIGHT, cfg.MODEL.DISTILL.KD_WEIGHT)


# ---------------------------------------------------------------------------------------------------- run folder
def student_name(cfg: CfgNode) -> str:
    """The student detector in words, e.g. "RetinaNet R50" (its meta-architecture and ResNet depth)."""
    arch = cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE if is_distillation(cfg) else cfg.MODEL.META_ARCHITECTURE
    return f"{arch} R{cfg.MODEL.RESNETS.DEPTH}"


def run_identity(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """What makes two runs the same experiment: the resolved config (less NOT_IDENTITY) and the teacher's bytes.

    The seed is a key of its own, left out of the config's hash, so that reports average runs that differ only in
    it; the readable keys (method, teacher, student, iterations) are in the hash too and only name the run.
    """
    resolved = cfg.clone()
    resolved.defrost()
    for key in (*NOT_IDENTITY, "SEED"):
        node, _, leaf = key.rpartition(".")
        target = resolved
        for part in filter(None, node.split(".")):
            target = target[part]
        target[leaf] = None
    identity = {"task": TASK, "config_file": Path(args.config_file).name, "method": resolved_method(cfg),
                "teacher": cfg.TEACHER.CONFIG_FILE if is_distillation(cfg) else None, "student": student_name(cfg),
                "iterations": cfg.SOLVER.MAX_ITER, "seed": cfg.SEED,
                "config_sha256": hashlib.sha256(resolved.dump().encode()).hexdigest()}
    teacher = cfg.TEACHER.WEIGHTS if is_distillation(cfg) else ""
    if teacher and Path(teacher).is_file():  # a URL names its file by hash already
        identity["teacher_sha256"] = file_sha256(teacher)
    return identity


# ---------------------------------------------------------------------------------------------------- trainer
class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically (temporary file + os.replace).

    fvcore writes model_XXXXXXX.pth and last_checkpoint in place, so a kill mid-write can leave a truncated
    checkpoint, or an empty last_checkpoint that makes --resume fail. Local paths only, which is what OUTPUT_DIR
    is on a cluster's shared file system.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: obj.state_dict() for k, obj in self.checkpointables.items()}}
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        save_atomic(data, path)
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, D2_LAST_CHECKPOINT), "w") as f:
            f.write(last_filename_basename)


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    def build_hooks(self):
        # DefaultTrainer.__init__ made a plain DetectionCheckpointer just before calling this; the hooks that save
        # must get the atomic one.
        self.checkpointer = AtomicCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR,
                                               trainer=weakref.proxy(self))
        return super().build_hooks()

    def resume_or_load(self, resume: bool = True) -> None:
        model = self.checkpointer.model
        model = getattr(model, "module", model)  # DDP
        if resume and self.checkpointer.has_checkpoint() or not is_distillation(self.cfg):
            super().resume_or_load(resume=resume)
            return
        # A new distillation run: MODEL.WEIGHTS initialises the student only (the teacher loaded its own).
        if self.cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(model.student).load(self.cfg.MODEL.WEIGHTS)
        self.start_iter = 0


def evaluate(cfg: CfgNode, args: argparse.Namespace) -> dict:
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
    return Trainer.test(cfg, model)


def box_ap(results: dict) -> dict[str, float | None]:
    """The six COCO box AP numbers (%, None where COCOeval gives NaN: no object of that size)."""
    if "bbox" not in results:
        raise RuntimeError(f"evaluation returned no box AP (got {list(results)}); check DATASETS.TEST")
    bbox = results["bbox"]
    return {key: None if bbox[key] is None or math.isnan(bbox[key]) else float(bbox[key]) for key in AP_KEYS}


# ---------------------------------------------------------------------------------------------------- main
def setup_process(cfg: CfgNode, args: argparse.Namespace) -> None:
    """detectron2's default_setup (logging, config.yaml in OUTPUT_DIR, seeds, cudnn) with its text log renamed.

    default_setup names that log OUTPUT_DIR/log.txt, which in this project's run folders is the JSON-lines log
    (common.run) that status and reports parse; a text log there would make every detection run read as damaged.
    """
    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    rank = comm.get_rank()
    log_file = os.path.join(output_dir, D2_LOG_FILE)
    setup_logger(log_file, distributed_rank=rank, name="fvcore")
    logger = setup_logger(log_file, distributed_rank=rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + collect_env_info())
    logger.info(f"Command line arguments: {args}")
    if comm.is_main_process():
        with atomic_write(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        logger.info(f"Running with full config:\n{cfg.dump()}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)  # each worker its own, deterministic seed
    if not args.eval_only:
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def run(args: argparse.Namespace, identity: dict) -> dict:
    """One process's work (detectron2's launch starts one per GPU)."""
    cfg = setup_cfg(args)
    setup_process(cfg, args)
    if args.eval_only:
        results = evaluate(cfg, args)
        if comm.is_main_process():
            write_json_atomic(results, Path(cfg.OUTPUT_DIR) / EVAL_FILE)
        return results
    trainer = Trainer(cfg)
    # Always resume: the folder's identity was checked, so a checkpoint in it is this run's (the project's
    # convention, which SLURM requeueing relies on; detectron2's --resume is accepted and changes nothing).
    trainer.resume_or_load(resume=True)
    trainer.train()
    # DefaultTrainer's EvalHook evaluates after the last iteration and keeps the result here (train() returns it
    # only with TEST.EXPECTED_RESULTS); a run resumed after that evaluation evaluates again.
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    if comm.is_main_process():
        finish(cfg, trainer, results, identity)
    comm.synchronize()
    return results


def finish(cfg: CfgNode, trainer: Trainer, results: dict, identity: dict) -> None:
    output_dir = Path(cfg.OUTPUT_DIR)
    model = trainer.checkpointer.model
    model = getattr(model, "module", model)
    if is_distillation(cfg):
        # The student alone, loadable by its plain config: MODEL.WEIGHTS .../student_final.pth
        save_atomic({"model": model.student.state_dict(), "iteration": trainer.iter}, output_dir / STUDENT_FILE)
    first = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    ap = box_ap(results.get(first, results) if first else results)
    summary = {"task": TASK, "config": Path(identity["config_file"]).stem, "method": identity["method"],
               "teacher": identity["teacher"], "student": identity["student"], "seed": identity["seed"],
               "iterations": identity["iterations"], "dataset": first, **ap, "identity": identity}
    RunFolder(output_dir).finish(summary)
    print(f"done: {summary['config']} {summary['method']}: " + ", ".join(
        f"{k} {'—' if v is None else f'{v:.1f}'}" for k, v in ap.items()))


def launch_settings(args: argparse.Namespace) -> tuple[int, int, str]:
    """(num_machines, machine_rank, dist_url): the flags, or SLURM's nodes when it started this with one task per node."""
    env = os.environ
    if "SLURM_JOB_ID" not in env or int(env.get("SLURM_NNODES", "1")) == 1 and args.num_machines == 1:
        return args.num_machines, args.machine_rank, args.dist_url
    if int(env.get("SLURM_NTASKS", "1")) != int(env.get("SLURM_NNODES", "1")):
        raise UsageError("under SLURM, run one task per node (--ntasks_per_node 1 with slurm/launch.py) and "
                         "--num-gpus = GPUs per node: detectron2's launch starts the per-GPU processes itself")
    host = dist.first_host(env["SLURM_JOB_NODELIST"])
    port = int(env.get("MASTER_PORT", dist.port_from_job_id(env["SLURM_JOB_ID"])))
    return int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"]), f"tcp://{host}:{port}"


def main(args: argparse.Namespace) -> dict:
    """Validates everything, then trains (or evaluates) on --num-gpus processes per machine; returns the AP numbers."""
    cfg = setup_cfg(args)
    if is_distillation(cfg):
        build_teacher_cfg(cfg)  # fails now, not after the data loader is built, if the teacher is misnamed
    folder = RunFolder(cfg.OUTPUT_DIR)
    identity = run_identity(cfg, args)
    if (folder.path / D2_LAST_CHECKPOINT).is_file() and not folder.args_file.is_file():
        # common.run knows its own files only; detectron2's checkpoints would otherwise be resumed as this run's.
        raise RunConflictError(f"{folder.path} holds detectron2 checkpoints but no {folder.args_file.name}, so "
                               f"whether they belong to this run is unknown; pass another --output_dir, or delete "
                               f"{folder.path} to start over.")
    decision = folder.decide(identity, extendable=())  # MAX_ITER shapes the LR schedule: it may not grow
    num_machines, machine_rank, dist_url = launch_settings(args)
    if args.eval_only:
        launch(run, args.num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
               args=(args, identity))
        result = folder.path / EVAL_FILE
        return json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {}
    if decision.state == "finished":
        summary = folder.read_done()
        ap = f"AP {summary['AP']:.1f}" if isinstance(summary.get("AP"), (int, float)) else "no AP recorded"
        print(f"{folder.path} is finished ({ap}); delete {folder.done_file.name} to train again. Nothing to do.")
        return summary
    main_machine = machine_rank == 0  # every machine runs main(); one writes the run's record
    if main_machine:
        folder.start(identity, args, decision)
    if (folder.path / D2_LAST_CHECKPOINT).is_file():
        print(f"resuming {folder.path} from its last checkpoint")
    with folder.recording(main_process=main_machine):
        launch(run, args.num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
               args=(args, identity))
    return folder.read_done() or {}


# Errors whose message already says what to do: printed without a traceback.
USER_ERRORS = (UsageError, DistillError, DatasetError, RunError)


def cli() -> None:
    args = get_args_parser().parse_args()
    try:
        main(args)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: rerun the same command to resume from the last checkpoint "
                         "(SOLVER.CHECKPOINT_PERIOD)") from None


if __name__ == "__main__":
    cli()
