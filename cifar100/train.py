"""Knowledge distillation on CIFAR-100: RCKA (the paper's method), its FCKA and LCKA parts, and the KD and DKD baselines.

    python cifar100/train.py --teacher resnet56 --student resnet20             # RCKA, the paper's recipe
    python cifar100/train.py --teacher resnet32x4 --student resnet8x4 --method kd
    python cifar100/train.py --student resnet56                                 # train a teacher (plain CE)
    torchrun --nproc_per_node=4 cifar100/train.py --teacher resnet56 --student resnet20

Rerunning the same command resumes from output_dir/checkpoint.pth; a finished run says so and exits.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cifar100.data import (
    DatasetIntegrityError,
    DatasetNotFoundError,
    TensorLoader,
    build_torchvision_loader,
    ensure_cifar100,
    load_cifar100,
)
from cifar100.models import MODELS, STAGES, build_model
from cifar100.report import compare_with_paper, paper_row
from cifar100.teachers import ZOO_TOP1, ZOO_URL, TeacherNotFoundError, resolve_teacher_checkpoint
from common import dist
from common.cli import UsageError, check_flags, resolve_device, run_command
from common.checkpoint import (
    CheckpointError,
    load_zoo_weights,
    restore_training_state,
    save_training_state,
    save_zoo_weights,
)
from common.evaluation import evaluate_classifier, state_dict_sha256
from common.features import FeatureTaps
from common.logging import MetricLogger, SmoothedValue, git_state
from common.losses import METHOD_SETTINGS, METHODS, add_cka_arguments, build_distillation_loss
from common.run import RunError, RunFolder, file_sha256, folder_suffix

# Students trained with LR 0.01 instead of 0.05 in the CRD/DKD recipe (they diverge at 0.05).
LIGHTWEIGHT_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

# What `python slurm/launch.py cifar100` submits when no run is named (slurm/launch.py applies these): the paper's
# Table 1 RCKA column, 9 pairs x seeds 0 1 2 (CIFAR-100's seed spread of 0.5-1.5 points needs the mean), each run on
# one GPU; the tensor loader needs few CPUs. 12 h holds 240 epochs of these small models on any recent GPU; a run
# that needs longer is requeued at the limit and resumes from its last epoch.
DEFAULT_SWEEP = "table1_rcka"
SLURM_DEFAULTS = {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 4, "timeout_min": 12 * 60}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RCKA knowledge distillation on CIFAR-100", add_help=add_help)

    # ---- model
    parser.add_argument("--student", default="resnet20", choices=sorted(MODELS), metavar="ARCH",
                        help=f"student architecture, one of: {', '.join(sorted(MODELS))}")
    parser.add_argument("--teacher", default=None, choices=sorted(MODELS), metavar="ARCH",
                        help="teacher architecture; without it the student is trained alone with CE "
                             "(this is how to make your own teachers)")

    # ---- teacher and distillation
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="loss: ce (student alone), kd (Hinton), dkd (Zhao et al.), fcka / lcka (the paper's "
                             "feature / logit CKA rows), rcka (both, the paper's method). Default: rcka with a "
                             "teacher, ce without")
    parser.add_argument("--teacher_ckpt", default=None,
                        help="teacher weights (zoo format: {'model': state_dict}); default: the public zoo file "
                             "under --zoo_dir, downloaded when missing")
    parser.add_argument("--zoo_dir", default="./checkpoints",
                        help="where the public teacher zoo is (or is unpacked to): "
                             "<zoo_dir>/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth")
    parser.add_argument("--zoo_url", default=ZOO_URL, help="the public teacher archive (mdistiller release)")
    parser.add_argument("--strict_teacher", action="store_true",
                        help="stop, instead of warning, when the teacher's test top-1 is more than 1 point below "
                             "the accuracy its checkpoint claims")
    parser.add_argument("--ce_weight", type=float, default=None,
                        help="weight of the cross-entropy term. Default 0.1 for kd (CRD/DKD KD recipe), 1.0 for "
                             "every other method")
    parser.add_argument("--kd_weight", type=float, default=0.9, help="weight of the KD term (CRD/DKD recipe: 0.9)")
    parser.add_argument("--kd_temperature", type=float, default=4.0, help="KD temperature (CRD/DKD recipe: 4)")
    parser.add_argument("--dkd_alpha", type=float, default=1.0, help="DKD target-class weight (DKD paper: 1)")
    parser.add_argument("--dkd_beta", type=float, default=None,
                        help="DKD non-target weight. Default per pair, from DKD's released configs "
                             "(mdistiller configs/cifar100/dkd): 2 for resnet56->resnet20 and resnet110->resnet32, 6 "
                             "for vgg13->vgg8, vgg13->MobileNetV2, wrn_40_2->wrn_16_2, wrn_40_2->wrn_40_1, 8 otherwise")
    parser.add_argument("--dkd_temperature", type=float, default=4.0, help="DKD temperature (DKD paper: 4)")
    parser.add_argument("--dkd_warmup", type=int, default=20,
                        help="epochs over which the DKD loss ramps up linearly (DKD paper: 20)")
    add_cka_arguments(parser)  # weights and forms of RCKA's CKA terms: common/losses.py, with sources
    parser.add_argument("--fcka_stages", default="all",
                        help="stage outputs that FCKA compares, as indices into the stages after the stem "
                             "(comma-separated, negative from the end, e.g. '-1'), or 'all' (default, summed, as "
                             "the related code's spcka_loss does over features[1:]); the same indices are used for "
                             "teacher and student")

    # ---- optimisation
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD learning rate for the total batch. Default 0.05, or 0.01 for MobileNetV2 / "
                             "ShuffleV1 / ShuffleV2 students (CRD/DKD recipe)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (CRD/DKD recipe: 0.9)")
    parser.add_argument("--weight_decay", type=float, default=5e-4, help="weight decay (CRD/DKD recipe: 5e-4)")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="TOTAL batch size, split evenly over processes so the recipe does not change with "
                             "the number of GPUs (CRD/DKD recipe: 64)")

    # ---- schedule
    parser.add_argument("--epochs", type=int, default=240, help="training epochs (CRD/DKD recipe: 240)")
    parser.add_argument("--lr_decay_epochs", type=int, nargs="+", default=[150, 180, 210],
                        help="epochs at which the LR is multiplied by --lr_decay_rate (CRD/DKD recipe: 150 180 210)")
    parser.add_argument("--lr_decay_rate", type=float, default=0.1, help="LR decay factor (CRD/DKD recipe: 0.1)")

    # ---- data
    parser.add_argument("--data_path", default="./data",
                        help="folder holding cifar-100-python/ (downloaded there when missing)")
    parser.add_argument("--no_download", action="store_true",
                        help="never download the dataset or the teacher zoo; fail with instructions instead")
    parser.add_argument("--no_verify_data", action="store_true",
                        help="skip the MD5 check of the dataset files (for generated test data only)")
    parser.add_argument("--loader", default="tensor", choices=("tensor", "torchvision"),
                        help="tensor: whole dataset on the training device, augmentation batched there (fast, "
                             "default); torchvision: the classic PIL + DataLoader path, for comparison")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader workers for --loader torchvision")

    # ---- run
    parser.add_argument("--output_dir", default=None,
                        help="run folder; default output/cifar100/<teacher>_<student>/<method>/seed<seed>, so "
                             "sweeps never collide and a rerun resumes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and augmentation")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (the CKA maths stays in float32)")
    parser.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster on GPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate the student and exit: --resume if given, else output_dir/checkpoint.pth")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to resume from (default: output_dir/checkpoint.pth when it exists); a "
                             "zoo-format file with --eval")
    parser.add_argument("--print_freq", type=int, default=100, help="console progress every N iterations")
    return parser


# Per-pair baseline settings of the published recipes, applied as defaults and recorded in the run's identity.
# DKD's beta: megvii-research/mdistiller configs/cifar100/dkd/*.yaml @ a08d46f (CFG.DKD.BETA = 8.0 elsewhere).
DKD_BETA = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
}
DKD_BETA_DEFAULT = 8.0
# Settings that change a run's result besides the loss's own (common.losses.METHOD_SETTINGS); every other flag
# (paths, workers, device, print frequency, compile, channels_last) may differ between the starts of one run.
RECIPE_SETTINGS = ("epochs", "batch_size", "momentum", "weight_decay", "lr_decay_epochs", "lr_decay_rate", "loader",
                   "amp")
# May grow when a run is resumed: the LR schedule is indexed by epoch, so training on from epoch k is exactly what
# a run asked for more epochs from the start would have done.
EXTENDABLE = ("epochs",)


def resolved_method(args: argparse.Namespace) -> str:
    return args.method or ("rcka" if args.teacher else "ce")


def validate_args(args: argparse.Namespace) -> None:
    """Flags that are wrong on their own, caught before anything is loaded."""
    check_flags(args)
    method = resolved_method(args)
    if method != "ce" and not args.teacher:
        raise UsageError(f"--method {method} distils from a teacher: pass --teacher ARCH (or use --method ce).")
    if method in ("fcka", "rcka"):
        stages_s, stages_t = select_stages(args.student, args.fcka_stages), select_stages(args.teacher, args.fcka_stages)
        if len(stages_s) != len(stages_t):
            raise UsageError(
                f"FCKA pairs stages one to one, but {args.student} has stages {stages_s} and {args.teacher} "
                f"{stages_t}; pick indices both have with --fcka_stages (e.g. '-1')."
            )


def derive_config(args: argparse.Namespace, world_size: int) -> dict:
    """Values that follow from the user's flags, kept apart from them (args is never modified)."""
    method = resolved_method(args)
    if args.batch_size % world_size:
        raise UsageError(f"--batch_size {args.batch_size} (the total batch) must be divisible by the {world_size} "
                         f"processes.")
    if args.batch_size // world_size < 2:
        raise UsageError(f"--batch_size {args.batch_size} over {world_size} processes gives "
                         f"{args.batch_size // world_size} sample(s) per process; CKA needs at least 2: pass "
                         f"--batch_size {2 * world_size} or more.")
    teacher = args.teacher if method != "ce" else None
    return {
        "method": method,
        "teacher": teacher,
        "lr": args.lr if args.lr is not None else (0.01 if args.student in LIGHTWEIGHT_STUDENTS else 0.05),
        "ce_weight": args.ce_weight if args.ce_weight is not None else (0.1 if method == "kd" else 1.0),
        "dkd_beta": args.dkd_beta if args.dkd_beta is not None else DKD_BETA.get((teacher, args.student),
                                                                                  DKD_BETA_DEFAULT),
        "batch_size_per_process": args.batch_size // world_size,
        "world_size": world_size,
    }


def loss_settings(args: argparse.Namespace, cfg: dict) -> dict:
    """The flags the losses read, with the derived values in place of their defaults."""
    return {**vars(args), "dkd_beta": cfg["dkd_beta"]}


def run_identity(args: argparse.Namespace, cfg: dict, teacher_sha256: str | None) -> dict:
    """The resolved settings that change this run's result: what decides new / resume / finished / conflict."""
    method = cfg["method"]
    identity = {"task": "cifar100", "teacher": cfg["teacher"], "student": args.student, "method": method,
                "seed": args.seed, "lr": cfg["lr"], "ce_weight": cfg["ce_weight"],
                **{key: getattr(args, key) for key in RECIPE_SETTINGS},
                "data": "unverified" if args.no_verify_data else "cifar-100-python md5-verified"}
    if cfg["teacher"] is not None:
        identity["teacher_sha256"] = teacher_sha256
    settings = loss_settings(args, cfg)
    identity.update({key: settings[key] for key in METHOD_SETTINGS[method]})
    if method in ("fcka", "rcka"):
        identity["fcka_stages"] = args.fcka_stages
    return identity


def run_identity_of_recipe(identity: dict) -> dict:
    """The identity the paper's recipe gives this run's pair, method and seed: what its variant is measured from."""
    argv = ["--student", identity["student"], "--seed", str(identity["seed"]), "--method", identity["method"]]
    recipe_args = get_args_parser(add_help=False).parse_args(
        argv + (["--teacher", identity["teacher"]] if identity.get("teacher") else []))
    return run_identity(recipe_args, derive_config(recipe_args, 1), identity.get("teacher_sha256"))


def default_output_dir(args: argparse.Namespace) -> str:
    """output/cifar100/<pair>/<method>[-<what differs from the recipe>]/seed<seed>.

    Settings of the paper's recipe get the plain name, so a rerun of the README's command resumes; every other
    setting gets its own readable folder (e.g. rcka-lcka_intra_weight5), so sweeps and ablations never collide. A
    --teacher_ckpt adds the first 8 hex digits of its sha256. Epochs are not in the name: a run may be extended.
    """
    cfg = derive_config(args, 1)
    teacher_sha = _teacher_ckpt_sha256(args) if cfg["teacher"] else None
    identity = run_identity(args, cfg, teacher_sha)
    suffix = folder_suffix(identity, run_identity_of_recipe(identity), ignore=("teacher_sha256", *EXTENDABLE))
    if teacher_sha is not None:
        suffix = "-".join(filter(None, [suffix, f"teacher{teacher_sha[:8]}"]))
    pair = f"{cfg['teacher']}_{args.student}" if cfg["teacher"] else args.student
    method_dir = f"{cfg['method']}-{suffix}" if suffix else cfg["method"]
    return os.path.join("output", "cifar100", pair, method_dir, f"seed{args.seed}")


def _teacher_ckpt_sha256(args: argparse.Namespace) -> str | None:
    if not args.teacher_ckpt:
        return None  # the public zoo file: its hash is checked against the run folder's at start
    if not Path(args.teacher_ckpt).is_file():
        raise TeacherNotFoundError(f"--teacher_ckpt {args.teacher_ckpt} is not a file; check the path.")
    return file_sha256(args.teacher_ckpt)


def select_stages(arch: str, spec: str) -> list[str]:
    names = STAGES[arch]
    if spec == "all":
        return names
    try:
        indices = [int(i) for i in spec.split(",")]
        return [names[i] for i in indices]
    except (ValueError, IndexError):
        raise UsageError(
            f"--fcka_stages {spec!r} does not fit {arch}, whose stages are {names} (indices 0..{len(names) - 1}, "
            "or negative from the end); use 'all' or e.g. '-1'."
        ) from None


def main(args: argparse.Namespace) -> dict:
    # ------------------------------------------------------------ set-up: every check before any expensive work
    validate_args(args)
    device = resolve_device(args.device)
    info = dist.init_distributed(device)
    try:
        cfg = derive_config(args, info.world_size)
        if args.eval:
            return evaluate_only(args, info)
        run = RunFolder(args.output_dir or default_output_dir(args))
        run.check_writable()
        if dist.is_main_process():  # cheap when present (MD5 of 160 MB), and the first thing a new user lacks
            ensure_cifar100(args.data_path, download=not args.no_download, verify=not args.no_verify_data)
        dist.barrier()
        teacher, teacher_path, teacher_sha256, teacher_meta = None, None, None, {}
        if cfg["teacher"]:
            teacher_path = resolve_teacher_checkpoint(args.teacher, args.teacher_ckpt, args.zoo_dir,
                                                      download=not args.no_download, url=args.zoo_url)
            teacher_sha256 = file_sha256(teacher_path)
            teacher = build_model(args.teacher)
            teacher_meta = load_zoo_weights(teacher, teacher_path, args.teacher)  # fails here on a mismatch
        elif args.teacher:
            dist.print_main(f"--method ce trains {args.student} alone: the teacher {args.teacher} is not loaded.")
        identity = run_identity(args, cfg, teacher_sha256)
        decision = run.decide(identity, EXTENDABLE)
        checkpoint = run.read_checkpoint(identity, EXTENDABLE, args.resume) if decision.state != "finished" else None
        if decision.state == "finished":
            summary = run.read_done()
            scores = ", ".join(f"{name} top-1 {summary[key]:.2f}" for name, key in (("last", "last_acc1"),
                               ("best", "best_acc1")) if isinstance(summary.get(key), (int, float)))
            dist.print_main(f"{run.path} is finished ({scores}); delete {run.done_file.name} to train again. "
                            f"Nothing to do.")
            return summary
        if dist.is_main_process():
            run.start(identity, args, decision, extra={"derived": cfg})
        dist.print_main("derived settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        for key, (old, new) in decision.extended.items():
            dist.print_main(f"--{key} changed from {old} to {new}: training on from the last checkpoint")
        with run.recording(main_process=dist.is_main_process()):
            return train(args, cfg, info, run, identity, teacher, teacher_path, teacher_sha256, teacher_meta,
                         checkpoint)
    finally:
        dist.cleanup()


def train(args, cfg, info, run, identity, teacher, teacher_path, teacher_sha256, teacher_meta, checkpoint) -> dict:
    torch.manual_seed(args.seed)
    # ------------------------------------------------------------ data
    per_process = cfg["batch_size_per_process"]
    if args.loader == "tensor":
        train_images, train_labels = load_cifar100(args.data_path, train=True, download=False, verify=False)
        test_images, test_labels = load_cifar100(args.data_path, train=False, download=False, verify=False)
        common_kw = dict(device=info.device, seed=args.seed, rank=info.rank, world_size=info.world_size,
                         channels_last=args.channels_last)
        # drop_last: a short last batch could hold a single sample, for which CKA is undefined; every process
        # also takes the same number of steps.
        train_loader = TensorLoader(train_images, train_labels, per_process, train=True, drop_last=True, **common_kw)
        test_loader = TensorLoader(test_images, test_labels, 256, train=False, **common_kw)
    else:
        common_kw = dict(num_workers=args.num_workers, seed=args.seed, download=False, verify=False,
                         rank=info.rank, world_size=info.world_size)
        train_loader = build_torchvision_loader(args.data_path, True, per_process, drop_last=True, **common_kw)
        test_loader = build_torchvision_loader(args.data_path, False, 256, **common_kw)
    if len(train_loader) == 0:
        raise UsageError(f"the training set gives no full batch of {per_process} per process: lower --batch_size.")

    # ------------------------------------------------------------ teacher and student
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student = build_model(args.student).to(info.device, memory_format=memory_format)
    if teacher is not None:
        check_teacher(args, run, info, teacher, teacher_path, teacher_sha256, teacher_meta, test_loader,
                      memory_format)
    criterion = build_distillation_loss(cfg["method"], loss_settings(args, cfg))
    student_taps = teacher_taps = None
    if criterion is not None and criterion.needs_features:
        student_taps = FeatureTaps(student, select_stages(args.student, args.fcka_stages))
        teacher_taps = FeatureTaps(teacher, select_stages(args.teacher, args.fcka_stages))
    model = student
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[info.device] if info.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None

    # ------------------------------------------------------------ loss, optimiser, schedule
    # A loss with parameters (a projector, say) trains and is checkpointed with the student.
    params = list(student.parameters()) + (list(criterion.parameters()) if criterion is not None else [])
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=args.momentum, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_decay_epochs,
                                                        gamma=args.lr_decay_rate)

    # ------------------------------------------------------------ resume
    start_epoch, best_acc1, best_epoch = 0, 0.0, -1
    if checkpoint is not None:
        start_epoch, best_acc1, best_epoch = restore_training_state(
            checkpoint, model=student, criterion=criterion, optimizer=optimizer, lr_scheduler=lr_scheduler)
        if dist.is_main_process():
            run.repair_log(start_epoch)
        dist.print_main(f"resumed from {args.resume or run.checkpoint} at epoch {start_epoch}/{args.epochs} (best "
                        f"top-1 so far {best_acc1:.2f})")

    # ------------------------------------------------------------ epoch loop
    dist.print_main(f"training {args.student} with {cfg['method']} for epochs {start_epoch}..{args.epochs - 1} "
                    f"in {run.path}")
    stats = None
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        set_loader_epoch(train_loader, epoch)
        train_stats = train_one_epoch(model, teacher, criterion, student_taps, teacher_taps, train_loader, optimizer,
                                      epoch, info.device, args, cfg)
        lr_scheduler.step()
        dist.broadcast_buffers(student)
        stats = evaluate_classifier(student, test_loader, info.device, args.amp)
        if best_epoch < 0 or stats["acc1"] > best_acc1:
            best_acc1, best_epoch = stats["acc1"], epoch
            if dist.is_main_process():
                save_zoo_weights(student, run.best_weights, epoch, best_acc1)
        log = {"epoch": epoch, "lr": train_stats.pop("lr"),
               **{f"train_{k}": v for k, v in train_stats.items()},
               "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
               "best_acc1": best_acc1, "epoch_time": time.time() - start}
        if dist.is_main_process():
            run.append_log(log)
            save_training_state(run.checkpoint, model=student, criterion=criterion, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, epoch=epoch, best_acc1=best_acc1, best_epoch=best_epoch,
                                identity=identity)
        dist.print_main(f"epoch {epoch}: test top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f} "
                        f"(best {best_acc1:.2f} at {best_epoch}), {log['epoch_time']:.0f}s")

    # ------------------------------------------------------------ final summary beside the paper
    if stats is None:  # resumed after the last epoch had been checkpointed but before done.json was written
        stats = evaluate_classifier(student, test_loader, info.device, args.amp)
    verified = not args.no_verify_data
    paper = paper_row(cfg["teacher"], args.student, cfg["method"])
    summary = {"task": "cifar100", "teacher": cfg["teacher"], "student": args.student, "method": cfg["method"],
               "seed": args.seed, "epochs": args.epochs, "last_acc1": stats["acc1"], "last_acc5": stats["acc5"],
               "best_acc1": best_acc1, "best_epoch": best_epoch, "data_verified": verified,
               "paper_acc1": paper["top1"] if paper is not None and verified else None,
               "identity": identity, "git_commit": git_state()["git_commit"], "output_dir": str(run.path),
               "weights_sha256": state_dict_sha256(student)}
    if dist.is_main_process():
        save_zoo_weights(student, run.last_weights, args.epochs - 1, stats["acc1"])
        run.finish(summary)
    pair = f"{cfg['teacher']} -> {args.student}" if cfg["teacher"] else args.student
    dist.print_main(f"RESULT cifar100 {pair} {cfg['method']} seed {args.seed}: last top-1 {stats['acc1']:.2f}, "
                    f"best {best_acc1:.2f} (epoch {best_epoch}) | "
                    f"{compare_with_paper(stats['acc1'], cfg['teacher'], args.student, cfg['method'], verified)}")
    return summary


def evaluate_only(args: argparse.Namespace, info) -> dict:
    """--eval: the student's test accuracy from --resume (zoo file or checkpoint) or the run folder's checkpoint.
    Needs no teacher and writes nothing."""
    path = Path(args.resume) if args.resume else RunFolder(args.output_dir or default_output_dir(args)).checkpoint
    if not path.is_file():
        raise UsageError(f"--eval needs weights: {path} does not exist; pass --resume PATH (a checkpoint.pth or a "
                         f"zoo-format file), or train first.")
    student = build_model(args.student)
    load_zoo_weights(student, path, args.student)
    student.to(info.device)
    ensure_cifar100(args.data_path, download=not args.no_download, verify=not args.no_verify_data)
    images, labels = load_cifar100(args.data_path, train=False, download=False, verify=False)
    loader = TensorLoader(images, labels, 256, train=False, device=info.device, seed=0, rank=info.rank,
                          world_size=info.world_size)
    stats = evaluate_classifier(student, loader, info.device, args.amp)
    dist.print_main(f"{args.student} from {path}: top-1 {stats['acc1']:.2f}  top-5 {stats['acc5']:.2f}")
    return stats


def check_teacher(args, run, info, teacher, path, sha256, meta, test_loader, memory_format) -> None:
    """Freeze the teacher and compare its test accuracy with the one its checkpoint claims (measured once per
    checkpoint file: the cache is keyed by its sha256)."""
    # no_grad rather than inference_mode: the teacher's outputs enter the student's loss, and
    # autograd cannot save inference tensors for backward.
    teacher.eval().requires_grad_(False).to(info.device, memory_format=memory_format)
    claimed = ZOO_TOP1.get(args.teacher) if not args.teacher_ckpt else meta.get("acc")
    cached = run.read_teacher_eval(sha256)
    if cached is not None:
        measured = cached["acc1"]
    else:
        measured = evaluate_classifier(teacher, test_loader, info.device, args.amp)["acc1"]
        if dist.is_main_process():
            run.write_teacher_eval(sha256, {"teacher": args.teacher, "checkpoint": str(path), "acc1": measured,
                                            "claimed": claimed})
    message = f"teacher {args.teacher} ({path}): test top-1 {measured:.2f}"
    if claimed is not None:
        message += f", claimed {float(claimed):.2f}"
        if measured < float(claimed) - 1.0:
            warning = (f"{message}: more than 1 point below the claim. The file may be corrupt or not the "
                       "published one; delete it to download again, or check --teacher_ckpt.")
            if args.strict_teacher:
                raise TeacherCheckError(warning + " (stopping: --strict_teacher)")
            message = "WARNING: " + warning
    dist.print_main(message)


class TeacherCheckError(RuntimeError):
    """--strict_teacher and the teacher's measured accuracy is below its claim."""


def set_loader_epoch(loader, epoch: int) -> None:
    """Reseed the epoch's shuffle (and, for TensorLoader, augmentation) from (seed, epoch)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def train_one_epoch(model, teacher, criterion, student_taps, teacher_taps, loader, optimizer, epoch, device, args, cfg):
    model.train()
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.4f}"))
    header = f"Epoch [{epoch}/{args.epochs}]"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    for step, (images, targets) in enumerate(metric_logger.log_every(loader, args.print_freq, header)):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
            terms = {"ce": cfg["ce_weight"] * F.cross_entropy(logits, targets)}
            if criterion is not None:
                with torch.no_grad():
                    logits_t = teacher(images)
                terms.update(criterion.terms(
                    logits_s=logits, logits_t=logits_t, targets=targets, epoch=epoch,
                    feats_s=student_taps.pop() if student_taps else None,
                    feats_t=teacher_taps.pop() if teacher_taps else None))
        loss = sum(terms.values())
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"loss is {loss_value} at epoch {epoch}, iteration {step} (terms: "
                f"{ {k: v.item() for k, v in terms.items()} }). Lower --lr, try without --amp, or check the teacher "
                "checkpoint; the last good state is in checkpoint.pth."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss_value, **{k: v.item() for k, v in terms.items()})
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    dist.print_main(f"Averaged stats: {metric_logger}")
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


# Errors whose message already says what to do: print it without a traceback.
USER_ERRORS = (DatasetNotFoundError, DatasetIntegrityError, TeacherNotFoundError, TeacherCheckError,
               CheckpointError, FloatingPointError, UsageError, RunError)


def cli(argv: list[str] | None = None) -> None:
    run_command(main, get_args_parser().parse_args(argv), USER_ERRORS)


if __name__ == "__main__":
    cli()
