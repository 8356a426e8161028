"""Knowledge distillation on ImageNet-1k (the paper's Table 2): RCKA, its FCKA and LCKA parts, KD and DKD.

    python imagenet/train.py --data_path /imagenet --teacher resnet34 --student resnet18              # RCKA
    python imagenet/train.py --data_path /imagenet --teacher resnet50 --student mobilenet_v1 --method dkd
    torchrun --nproc_per_node=8 imagenet/train.py --data_path /imagenet --teacher resnet34 --student resnet18
    python slurm/launch.py imagenet --data_path /imagenet          # Table 2's RCKA rows on SLURM, 8 GPUs per run

Teachers are torchvision's IMAGENET1K_V1 weights (downloaded by torchvision's URL when missing) or --teacher_ckpt.
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
from imagenet.data import DECODERS, DatasetLayoutError, build_loaders, check_layout, to_model_input, val_fingerprint
from imagenet.models import MODELS, STAGES, build_model
from imagenet.report import compare_with_paper, paper_reference
from imagenet.teachers import (
    TeacherNotFoundError,
    cached_teacher_top1,
    default_url,
    published_top1,
    resolve_teacher_checkpoint,
    store_teacher_top1,
)

# ---- the recipe of Table 2's baselines (DKD's ImageNet configs, megvii-research/mdistiller configs/imagenet/*,
# which follow torchvision's references/classification ResNet recipe)
BASE_LR, BASE_BATCH = 0.2, 512  # SOLVER.LR at SOLVER.BATCH_SIZE; other total batches scale linearly (Goyal et al.)
# DKD's beta per pair: configs/imagenet/r34_r18/dkd.yaml (0.5) and r50_mv1/dkd.yaml (2.0); ALPHA is the default 1.
DKD_BETA = {("resnet34", "resnet18"): 0.5, ("resnet50", "mobilenet_v1"): 2.0}
DKD_BETA_DEFAULT = 0.5

# ---- what `python slurm/launch.py imagenet` submits when no run is named (slurm/launch.py applies these)
DEFAULT_SWEEP = "table2_rcka"  # slurm/sweeps.py: Table 2's pairs x rcka x seeds 0 1 2
# One node with 8 GPUs per run, as the Table 2 baselines trained (total batch 512 = 8 x 64 per GPU). 12 h: about 3x
# our estimate of a run on 8 A100s (imagenet/README.md: 1.6 h of compute for resnet34 -> resnet18, longer where storage
# or the data loader bounds it); a run that needs longer is requeued at the limit and resumes from its last epoch.
SLURM_DEFAULTS = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 10, "timeout_min": 12 * 60}

# Settings that change a run's result besides the loss's own (common.losses.METHOD_SETTINGS); every other flag
# (paths, workers, device, print frequency, compile, channels_last) may differ between the starts of one run.
RECIPE_SETTINGS = ("epochs", "batch_size", "momentum", "weight_decay", "lr_decay_epochs", "lr_decay_rate",
                   "num_classes", "subset", "train_crop_size", "val_resize_size", "val_crop_size", "decoder")
EXTENDABLE = ("epochs",)
FULL_VAL_IMAGES = 50_000


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RCKA knowledge distillation on ImageNet-1k", add_help=add_help)

    # ---- model
    parser.add_argument("--student", default="resnet18", choices=sorted(MODELS), metavar="ARCH",
                        help="student: resnet18 (Table 2 with --teacher resnet34) or mobilenet_v1 (with resnet50)")
    parser.add_argument("--teacher", default=None, choices=sorted(MODELS), metavar="ARCH",
                        help="teacher: resnet34 or resnet50 (torchvision's IMAGENET1K_V1 weights); without it the "
                             "student is trained alone with CE (Table 2's 'student' column)")
    parser.add_argument("--num_classes", type=int, default=1000,
                        help="classes (ImageNet-1k: 1000); must equal the number of class folders")

    # ---- teacher and distillation
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="loss: ce (student alone), kd (Hinton), dkd (Zhao et al.), fcka / lcka (the paper's "
                             "feature / logit CKA parts), rcka (both, the paper's method). Default: rcka with a "
                             "teacher, ce without")
    parser.add_argument("--teacher_ckpt", default=None,
                        help="teacher weights in torchvision's format (a state_dict, or {'model': state_dict}); "
                             "default: torchvision's IMAGENET1K_V1 file for --teacher")
    parser.add_argument("--weights_dir", default=None,
                        help="where torchvision's teacher files are (or are downloaded to); default torch's hub "
                             "cache, $TORCH_HOME/hub/checkpoints, where torchvision keeps them")
    parser.add_argument("--teacher_url", default=None,
                        help="download the teacher from here instead of torchvision's URL (a mirror); the file "
                             "name's hash prefix is checked as torchvision does")
    parser.add_argument("--teacher_eval_cache", default=os.path.join("output", "imagenet", "teacher_eval"),
                        help="folder of the teachers' measured validation accuracies, keyed by checkpoint sha256 "
                             "and validation set, so a sweep measures each teacher once")
    parser.add_argument("--strict_teacher", action="store_true",
                        help="stop, instead of warning, when the teacher's top-1 on the full validation set is "
                             "more than 1 point below its published one")
    parser.add_argument("--ce_weight", type=float, default=None,
                        help="weight of the cross-entropy term. Default 0.5 for kd (mdistiller configs/imagenet "
                             "kd.yaml: CE_WEIGHT 0.5), 1.0 for every other method (dkd.yaml: CE_WEIGHT 1.0)")
    parser.add_argument("--kd_weight", type=float, default=0.5, help="weight of the KD term (kd.yaml: KD_WEIGHT 0.5)")
    parser.add_argument("--kd_temperature", type=float, default=1.0, help="KD temperature (kd.yaml: TEMPERATURE 1)")
    parser.add_argument("--dkd_alpha", type=float, default=1.0,
                        help="DKD target-class weight (dkd.yaml leaves ALPHA at mdistiller's default, 1.0)")
    parser.add_argument("--dkd_beta", type=float, default=None,
                        help="DKD non-target weight. Default per pair, from DKD's configs/imagenet: 0.5 for "
                             "resnet34->resnet18 (r34_r18/dkd.yaml), 2.0 for resnet50->mobilenet_v1 (r50_mv1)")
    parser.add_argument("--dkd_temperature", type=float, default=1.0, help="DKD temperature (dkd.yaml: T 1.0)")
    parser.add_argument("--dkd_warmup", type=int, default=1,
                        help="epochs over which the DKD loss ramps up linearly (dkd.yaml: WARMUP 1)")
    add_cka_arguments(parser)  # weights and forms of RCKA's CKA terms: common/losses.py, with sources
    parser.add_argument("--fcka_stages", default="all",
                        help="stage outputs FCKA compares, as indices into the four stages after the stem (strides "
                             "4, 8, 16, 32: layer1..layer4 of the ResNets, stage1..stage4 of MobileNet-V1; see "
                             "imagenet/models.py), comma-separated, negative from the end (e.g. '-1'), or 'all' "
                             "(default, summed, as the related code's spcka_loss does over features[1:]; the paper "
                             "does not say which stages it used on ImageNet)")

    # ---- optimisation
    parser.add_argument("--lr", type=float, default=None,
                        help=f"SGD learning rate for the total batch. Default {BASE_LR} x batch_size / {BASE_BATCH} "
                             f"(mdistiller configs/imagenet: LR {BASE_LR} at batch {BASE_BATCH}; linear scaling rule "
                             f"of Goyal et al. 2017 for other batches)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (configs/imagenet: 0.9)")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay (configs/imagenet: 1e-4)")
    parser.add_argument("--batch_size", type=int, default=BASE_BATCH,
                        help=f"TOTAL batch size, split evenly over processes so the recipe does not change with the "
                             f"number of GPUs (configs/imagenet: {BASE_BATCH})")

    # ---- schedule
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (configs/imagenet: 100)")
    parser.add_argument("--lr_decay_epochs", type=int, nargs="+", default=[30, 60, 90],
                        help="epochs at which the LR is multiplied by --lr_decay_rate (configs/imagenet: 30 60 90)")
    parser.add_argument("--lr_decay_rate", type=float, default=0.1, help="LR decay factor (configs/imagenet: 0.1)")

    # ---- data
    parser.add_argument("--data_path", default="./data/imagenet",
                        help="folder holding train/<class>/*.JPEG and val/<class>/*.JPEG (ImageFolder layout)")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="only the first N images of each class (sorted by name), in train and val, for quick "
                             "runs; recorded in the run's identity (ImageNet val has 50 per class)")
    parser.add_argument("--train_crop_size", type=int, default=224,
                        help="RandomResizedCrop size for training (torchvision references/classification: 224)")
    parser.add_argument("--val_resize_size", type=int, default=256,
                        help="validation Resize (shorter side) before the centre crop (torchvision references: 256)")
    parser.add_argument("--val_crop_size", type=int, default=224,
                        help="validation CenterCrop size (torchvision references: 224)")
    parser.add_argument("--decoder", default="torchvision", choices=DECODERS,
                        help="image decoding: torchvision (torchvision.io.decode_image + tensor transforms; default, "
                             "1.4x PIL's images/s for the training transform on one CPU thread, measured by "
                             "benchmarks/bench_imagenet_decode.py) or pil (the textbook path)")
    parser.add_argument("--num_workers", type=int, default=8,
                        help="DataLoader workers per process (the SLURM default gives each process 10 CPUs)")
    parser.add_argument("--val_batch_size", type=int, default=128,
                        help="validation batch per process (configs/imagenet: 128)")
    parser.add_argument("--no_download", action="store_true",
                        help="never download the teacher; fail with instructions instead")

    # ---- run
    parser.add_argument("--output_dir", default=None,
                        help="run folder; default output/imagenet/<teacher>_<student>/<method>[-<settings that "
                             "differ from the recipe>]/seed<seed>, so sweeps never collide and a rerun resumes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and augmentation")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (the CKA maths stays in float32); default: on with CUDA, off on CPU")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format; default: on with CUDA (faster convolutions), off on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate the student and exit: --resume if given, else output_dir/checkpoint.pth")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to resume from (default: output_dir/checkpoint.pth when it exists); a "
                             "zoo-format or torchvision-format file with --eval")
    parser.add_argument("--print_freq", type=int, default=100, help="console progress every N iterations")
    return parser


class TeacherCheckError(RuntimeError):
    """--strict_teacher and the teacher's measured accuracy is below its published one."""


def resolved_method(args: argparse.Namespace) -> str:
    return args.method or ("rcka" if args.teacher else "ce")


def validate_args(args: argparse.Namespace) -> None:
    """Flags that are wrong on their own, caught before anything is loaded."""
    check_flags(args, [
        (args.subset is None or args.subset >= 1, f"--subset {args.subset}: pass a number of images per class >= 1"),
        (args.num_classes >= 2, f"--num_classes {args.num_classes}: pass 2 or more"),
        (min(args.train_crop_size, args.val_crop_size) >= 16, "--train_crop_size / --val_crop_size: pass 16 or more"),
        (args.val_resize_size >= args.val_crop_size,
         f"--val_resize_size {args.val_resize_size} must be >= --val_crop_size {args.val_crop_size}"),
        (args.val_batch_size >= 1, f"--val_batch_size {args.val_batch_size}: pass 1 or more"),
    ])
    method = resolved_method(args)
    if method != "ce" and not args.teacher:
        raise UsageError(f"--method {method} distils from a teacher: pass --teacher resnet34 or resnet50 (or use "
                         f"--method ce).")
    if method != "ce" and not args.teacher_ckpt and default_url(args.teacher) is None:
        raise UsageError(f"--teacher {args.teacher}: torchvision's {args.teacher} weights are not among the paper's "
                         f"teachers (resnet34, resnet50); pass --teacher_ckpt FILE with its weights.")
    if method in ("fcka", "rcka"):
        stages_s = select_stages(args.student, args.fcka_stages)
        stages_t = select_stages(args.teacher, args.fcka_stages)
        if len(stages_s) != len(stages_t):
            raise UsageError(f"FCKA pairs stages one to one, but {args.student} has stages {stages_s} and "
                             f"{args.teacher} {stages_t}; pick indices both have with --fcka_stages (e.g. '-1').")


def select_stages(arch: str, spec: str) -> list[str]:
    names = STAGES[arch]
    if spec == "all":
        return names
    try:
        return [names[int(i)] for i in spec.split(",")]
    except (ValueError, IndexError):
        raise UsageError(f"--fcka_stages {spec!r} does not fit {arch}, whose stages are {names} (indices "
                         f"0..{len(names) - 1}, or negative from the end); use 'all' or e.g. '-1'.") from None


def derive_config(args: argparse.Namespace, world_size: int, device_type: str = "cuda") -> dict:
    """Values that follow from the user's flags, kept apart from them (args is never modified)."""
    method = resolved_method(args)
    if args.batch_size % world_size:
        raise UsageError(f"--batch_size {args.batch_size} (the total batch) must be divisible by the {world_size} "
                         f"processes.")
    if args.batch_size // world_size < 2:
        raise UsageError(f"--batch_size {args.batch_size} over {world_size} processes gives fewer than 2 samples per "
                         f"process; CKA needs at least 2: pass --batch_size {2 * world_size} or more.")
    teacher = args.teacher if method != "ce" else None
    scaled = args.lr is None and args.batch_size != BASE_BATCH
    return {
        "method": method,
        "teacher": teacher,
        "lr": args.lr if args.lr is not None else BASE_LR * args.batch_size / BASE_BATCH,
        "lr_rule": ("given" if args.lr is not None else
                    f"{BASE_LR} x {args.batch_size}/{BASE_BATCH} (linear scaling)" if scaled else "recipe"),
        "ce_weight": args.ce_weight if args.ce_weight is not None else (0.5 if method == "kd" else 1.0),
        "dkd_beta": args.dkd_beta if args.dkd_beta is not None else DKD_BETA.get((teacher, args.student),
                                                                                  DKD_BETA_DEFAULT),
        "amp": args.amp if args.amp is not None else device_type == "cuda",
        "channels_last": args.channels_last if args.channels_last is not None else device_type == "cuda",
        "batch_size_per_process": args.batch_size // world_size,
        "world_size": world_size,
    }


def loss_settings(args: argparse.Namespace, cfg: dict) -> dict:
    return {**vars(args), "dkd_beta": cfg["dkd_beta"]}


def run_identity(args: argparse.Namespace, cfg: dict, teacher_sha256: str | None) -> dict:
    """The resolved settings that change this run's result: what decides new / resume / finished / conflict."""
    method = cfg["method"]
    identity = {"task": "imagenet", "teacher": cfg["teacher"], "student": args.student, "method": method,
                "seed": args.seed, "lr": cfg["lr"], "ce_weight": cfg["ce_weight"], "amp": cfg["amp"],
                **{key: getattr(args, key) for key in RECIPE_SETTINGS}}
    if cfg["teacher"] is not None:
        identity["teacher_sha256"] = teacher_sha256
    settings = loss_settings(args, cfg)
    identity.update({key: settings[key] for key in METHOD_SETTINGS[method]})
    if method in ("fcka", "rcka"):
        identity["fcka_stages"] = args.fcka_stages
    return identity


def recipe_args(identity: dict) -> argparse.Namespace:
    """The flags of the paper's recipe for the identity's pair, method and seed."""
    return get_args_parser(add_help=False).parse_args(
        ["--student", identity["student"], "--seed", str(identity["seed"]), "--method", identity["method"]]
        + (["--teacher", identity["teacher"]] if identity.get("teacher") else []))


def run_identity_of_recipe(identity: dict) -> dict:
    """The identity the paper's recipe (on GPUs) gives this run's pair, method and seed; reports label the rest."""
    args = recipe_args(identity)
    return run_identity(args, derive_config(args, 1, "cuda"), identity.get("teacher_sha256"))


def default_output_dir(args: argparse.Namespace) -> str:
    """output/imagenet/<pair>/<method>[-<what differs from the recipe>]/seed<seed>; a --teacher_ckpt adds the first
    8 hex digits of its sha256. The recipe's settings (on GPUs) give the plain name."""
    # Without --device the recipe's device (GPUs): the launcher names runs on a login node without one.
    cfg = derive_config(args, 1, torch.device(args.device).type if args.device else "cuda")
    teacher_sha = _teacher_ckpt_sha256(args) if cfg["teacher"] else None
    identity = run_identity(args, cfg, teacher_sha)
    suffix = folder_suffix(identity, run_identity_of_recipe(identity), ignore=("teacher_sha256", *EXTENDABLE))
    if args.teacher_ckpt and cfg["teacher"]:
        suffix = "-".join(filter(None, [suffix, f"teacher{teacher_sha[:8]}"]))
    pair = f"{cfg['teacher']}_{args.student}" if cfg["teacher"] else args.student
    method_dir = f"{cfg['method']}-{suffix}" if suffix else cfg["method"]
    return os.path.join("output", "imagenet", pair, method_dir, f"seed{args.seed}")


def _teacher_ckpt_sha256(args: argparse.Namespace) -> str | None:
    if not args.teacher_ckpt:
        return None  # torchvision's file: its hash is checked against the run folder's at start
    if not Path(args.teacher_ckpt).is_file():
        raise TeacherNotFoundError(f"--teacher_ckpt {args.teacher_ckpt} is not a file; check the path.")
    return file_sha256(args.teacher_ckpt)


def main(args: argparse.Namespace) -> dict:
    # ------------------------------------------------------------ set-up: every check before any expensive work
    validate_args(args)
    device = resolve_device(args.device)
    info = dist.init_distributed(device)
    try:
        cfg = derive_config(args, info.world_size, info.device.type)
        classes = check_layout(args.data_path, args.num_classes)
        if args.eval:
            return evaluate_only(args, cfg, info, classes)
        run = RunFolder(args.output_dir or default_output_dir(args))
        run.check_writable()
        teacher, teacher_path, teacher_sha256, teacher_meta = None, None, None, {}
        if cfg["teacher"]:
            if dist.is_main_process():  # one download per job; the others wait and find the file
                resolve_teacher_checkpoint(args.teacher, args.teacher_ckpt, args.weights_dir, args.teacher_url,
                                           download=not args.no_download)
            dist.barrier()
            teacher_path = resolve_teacher_checkpoint(args.teacher, args.teacher_ckpt, args.weights_dir,
                                                      args.teacher_url, download=False)
            teacher_sha256 = file_sha256(teacher_path)
            teacher = build_model(args.teacher, args.num_classes)
            teacher_meta = load_zoo_weights(teacher, teacher_path, args.teacher)  # fails here on a mismatch
        elif args.teacher:
            dist.print_main(f"--method ce trains {args.student} alone: the teacher {args.teacher} is not loaded.")
        identity = run_identity(args, cfg, teacher_sha256)
        decision = run.decide(identity, EXTENDABLE)
        checkpoint = run.read_checkpoint(identity, EXTENDABLE, args.resume) if decision.state != "finished" else None
        if decision.state == "finished":
            summary = run.read_done()
            scores = ", ".join(f"{name} {summary[key]:.2f}" for name, key in (("last top-1", "last_acc1"),
                               ("last top-5", "last_acc5"), ("best top-1", "best_acc1"))
                               if isinstance(summary.get(key), (int, float)))
            dist.print_main(f"{run.path} is finished ({scores}); delete {run.done_file.name} to train again. "
                            f"Nothing to do.")
            return summary
        if dist.is_main_process():
            run.start(identity, args, decision, extra={"derived": cfg})
        dist.print_main(f"learning rate {cfg['lr']:g} ({cfg['lr_rule']}) for the total batch {args.batch_size} = "
                        f"{info.world_size} x {cfg['batch_size_per_process']}")
        dist.print_main("derived settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        for key, (old, new) in decision.extended.items():
            dist.print_main(f"--{key} changed from {old} to {new}: training on from the last checkpoint")
        with run.recording(main_process=dist.is_main_process()):
            return train(args, cfg, info, run, identity, classes, teacher, teacher_path, teacher_sha256,
                         teacher_meta, checkpoint)
    finally:
        dist.cleanup()


def make_loaders(args, cfg, info, classes, val_batch_size=None):
    return build_loaders(
        args.data_path, classes, batch_size=cfg["batch_size_per_process"],
        val_batch_size=val_batch_size or args.val_batch_size, num_workers=args.num_workers, decoder=args.decoder,
        subset=args.subset, train_crop_size=args.train_crop_size, val_resize_size=args.val_resize_size,
        val_crop_size=args.val_crop_size, seed=args.seed, rank=info.rank, world_size=info.world_size,
        pin_memory=info.device.type == "cuda")


def train(args, cfg, info, run, identity, classes, teacher, teacher_path, teacher_sha256, teacher_meta,
          checkpoint) -> dict:
    torch.manual_seed(args.seed)
    # ------------------------------------------------------------ data
    train_loader, val_loader = make_loaders(args, cfg, info, classes)
    dist.print_main(f"data: {len(train_loader.dataset)} training images in {len(classes)} classes, "
                    f"{len(val_loader.dataset)} validation images ({args.decoder} decoder, {args.num_workers} "
                    f"workers per process)" + (f", --subset {args.subset} per class" if args.subset else ""))
    prepare = lambda images: to_model_input(images, info.device, cfg["channels_last"])  # noqa: E731

    # ------------------------------------------------------------ teacher and student
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    student = build_model(args.student, args.num_classes).to(info.device, memory_format=memory_format)
    if teacher is not None:
        check_teacher(args, cfg, run, info, teacher, teacher_path, teacher_sha256, teacher_meta, val_loader, prepare,
                      memory_format)
    criterion = build_distillation_loss(cfg["method"], loss_settings(args, cfg))
    student_taps = teacher_taps = None
    if criterion is not None and criterion.needs_features:
        student_taps = FeatureTaps(student, select_stages(args.student, args.fcka_stages))
        teacher_taps = FeatureTaps(teacher, select_stages(args.teacher, args.fcka_stages))
    model = student
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[info.device] if info.device.type == "cuda"
                                                    else None)
    if args.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None

    # ------------------------------------------------------------ loss, optimiser, schedule
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
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, teacher, criterion, student_taps, teacher_taps, train_loader, prepare,
                                      optimizer, epoch, info.device, args, cfg)
        lr_scheduler.step()
        dist.broadcast_buffers(student)
        stats = evaluate_classifier(student, val_loader, info.device, cfg["amp"], prepare)
        if best_epoch < 0 or stats["acc1"] > best_acc1:  # the first epoch is the best so far even at 0 %
            best_acc1, best_epoch = stats["acc1"], epoch
            if dist.is_main_process():
                save_zoo_weights(student, run.best_weights, epoch, best_acc1)
        log = {"epoch": epoch, "lr": train_stats.pop("lr"), **{f"train_{k}": v for k, v in train_stats.items()},
               "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
               "best_acc1": best_acc1, "epoch_time": time.time() - start}
        if dist.is_main_process():
            run.append_log(log)
            save_training_state(run.checkpoint, model=student, criterion=criterion, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, epoch=epoch, best_acc1=best_acc1, best_epoch=best_epoch,
                                identity=identity)
        dist.print_main(f"epoch {epoch}: val top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f} "
                        f"(best {best_acc1:.2f} at {best_epoch}), {log['epoch_time']:.0f}s")

    # ------------------------------------------------------------ final summary beside the paper
    if stats is None:  # resumed after the last epoch had been checkpointed but before done.json was written
        stats = evaluate_classifier(student, val_loader, info.device, cfg["amp"], prepare)
    full = args.subset is None and args.num_classes == 1000
    paper = paper_reference(cfg["teacher"], args.student, cfg["method"])
    summary = {"task": "imagenet", "teacher": cfg["teacher"], "student": args.student, "method": cfg["method"],
               "seed": args.seed, "epochs": args.epochs, "last_acc1": stats["acc1"], "last_acc5": stats["acc5"],
               "best_acc1": best_acc1, "best_epoch": best_epoch, "subset": args.subset,
               "paper_acc1": paper["top1"] if paper else None, "paper_acc5": paper["top5"] if paper else None,
               "identity": identity, "git_commit": git_state()["git_commit"], "output_dir": str(run.path),
               "weights_sha256": state_dict_sha256(student)}
    if info.distributed:  # every rank: a correct DDP run ends with the same weights everywhere
        print(f"rank {info.rank}/{info.world_size}: final weights sha256 {summary['weights_sha256']}", flush=True)
    if dist.is_main_process():
        save_zoo_weights(student, run.last_weights, args.epochs - 1, stats["acc1"])
        run.finish(summary)
    pair = f"{cfg['teacher']} -> {args.student}" if cfg["teacher"] else args.student
    paper_text = compare_with_paper(stats["acc1"], stats["acc5"], cfg["teacher"], args.student, cfg["method"], full)
    dist.print_main(f"RESULT imagenet {pair} {cfg['method']} seed {args.seed}: last top-1 {stats['acc1']:.2f} top-5 "
                    f"{stats['acc5']:.2f}, best top-1 {best_acc1:.2f} (epoch {best_epoch}) | {paper_text}")
    return summary


def evaluate_only(args: argparse.Namespace, cfg: dict, info, classes: list[str]) -> dict:
    """--eval: the student's validation accuracy from --resume or the run folder's checkpoint; writes nothing."""
    path = Path(args.resume) if args.resume else RunFolder(args.output_dir or default_output_dir(args)).checkpoint
    if not path.is_file():
        raise UsageError(f"--eval needs weights: {path} does not exist; pass --resume PATH (a checkpoint.pth, a "
                         f"zoo-format or a torchvision-format file), or train first.")
    student = build_model(args.student, args.num_classes)
    load_zoo_weights(student, path, args.student)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    student.to(info.device, memory_format=memory_format)
    _, val_loader = make_loaders(args, cfg, info, classes)
    stats = evaluate_classifier(student, val_loader, info.device, cfg["amp"],
                                lambda images: to_model_input(images, info.device, cfg["channels_last"]))
    dist.print_main(f"{args.student} from {path}: top-1 {stats['acc1']:.2f}  top-5 {stats['acc5']:.2f} on "
                    f"{len(val_loader.dataset)} validation images")
    return stats


def check_teacher(args, cfg, run, info, teacher, path, sha256, meta, val_loader, prepare, memory_format) -> None:
    """Freeze the teacher and measure its validation top-1 beside the published one: once per checkpoint and
    validation set (cached under --teacher_eval_cache by the file's sha256), then copied into the run folder."""
    # no_grad rather than inference_mode: the teacher's outputs enter the student's loss, and autograd cannot save
    # inference tensors for backward.
    teacher.eval().requires_grad_(False).to(info.device, memory_format=memory_format)
    published = published_top1(args.teacher) if not args.teacher_ckpt else meta.get("acc")
    val_key = val_fingerprint(val_loader)
    cached = cached_teacher_top1(args.teacher_eval_cache, sha256, val_key)
    if cached is not None:
        measured, source = cached["acc1"], f"cached in {args.teacher_eval_cache}"
    else:
        start = time.time()
        stats = evaluate_classifier(teacher, val_loader, info.device, cfg["amp"], prepare)
        measured, source = stats["acc1"], f"measured in {time.time() - start:.0f}s"
        if dist.is_main_process():
            store_teacher_top1(args.teacher_eval_cache, sha256, val_key,
                               {"teacher": args.teacher, "checkpoint": str(path), "acc1": stats["acc1"],
                                "acc5": stats["acc5"], "published": published, "amp": cfg["amp"]})
    if dist.is_main_process():
        run.write_teacher_eval(sha256, {"teacher": args.teacher, "checkpoint": str(path), "acc1": measured,
                                        "published": published, "val": val_key})
    images = len(val_loader.dataset)
    message = f"teacher {args.teacher} ({path}): val top-1 {measured:.2f} on {images} images ({source})"
    if published is not None:
        message += f", published {float(published):.2f}"
        if images != FULL_VAL_IMAGES:
            message += f" on the full 50,000 (not comparable: this validation set has {images})"
        elif measured < float(published) - 1.0:
            warning = (f"{message}: more than 1 point below. The file may be corrupt or not the published one "
                       "(delete it to download again, or check --teacher_ckpt), or the validation folder is not "
                       "ImageNet-1k's val sorted into its 1000 class folders.")
            if args.strict_teacher:
                raise TeacherCheckError(warning + " (stopping: --strict_teacher)")
            message = "WARNING: " + warning
    dist.print_main(message)


def train_one_epoch(model, teacher, criterion, student_taps, teacher_taps, loader, prepare, optimizer, epoch, device,
                    args, cfg):
    model.train()
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.4f}"))
    header = f"Epoch [{epoch}/{args.epochs}]"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"])
    for step, (images, targets) in enumerate(metric_logger.log_every(loader, args.print_freq, header)):
        images, targets = prepare(images), targets.to(device, non_blocking=True)
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
                f"{ {k: v.item() for k, v in terms.items()} }). Lower --lr, try --no-amp, or check the teacher "
                "checkpoint; the last good state is in checkpoint.pth.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss_value, **{k: v.item() for k, v in terms.items()})
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    dist.print_main(f"Averaged stats: {metric_logger}")
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


# Errors whose message already says what to do: print it without a traceback.
USER_ERRORS = (DatasetLayoutError, TeacherNotFoundError, TeacherCheckError, CheckpointError, FloatingPointError,
               UsageError, RunError)


def cli(argv: list[str] | None = None) -> None:
    run_command(main, get_args_parser().parse_args(argv), USER_ERRORS)


if __name__ == "__main__":
    cli()
