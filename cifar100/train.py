"""Knowledge distillation on CIFAR-100: RCKA (the paper's method), its FCKA and LCKA parts, and the KD and DKD baselines.

    python cifar100/train.py --teacher resnet56 --student resnet20             # RCKA, the paper's recipe
    python cifar100/train.py --teacher resnet32x4 --student resnet8x4 --method kd
    python cifar100/train.py --student resnet56                                 # train a teacher (plain CE)
    torchrun --nproc_per_node=4 cifar100/train.py --teacher resnet56 --student resnet20

Rerunning the same command resumes from output_dir/checkpoint.pth; a finished run says so and exits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
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
from cifar100.report import paper_top1
from cifar100.teachers import ZOO_TOP1, ZOO_URL, TeacherNotFoundError, resolve_teacher_checkpoint
from common import dist
from common.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_zoo_weights,
    rng_state,
    save_atomic,
    save_zoo_weights,
    set_rng_state,
)
from common.features import FeatureTaps
from common.logging import (
    MetricLogger,
    SmoothedValue,
    append_jsonl,
    git_state,
    read_jsonl,
    run_metadata,
    write_json_atomic,
)
from common.losses import METHODS, build_distillation_loss

# Students trained with LR 0.01 instead of 0.05 in the CRD/DKD recipe (they diverge at 0.05).
LIGHTWEIGHT_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


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
    parser.add_argument("--dkd_beta", type=float, default=8.0,
                        help="DKD non-target weight (DKD paper: 8 for most CIFAR pairs, see its configs)")
    parser.add_argument("--dkd_temperature", type=float, default=4.0, help="DKD temperature (DKD paper: 4)")
    parser.add_argument("--dkd_warmup", type=int, default=20,
                        help="epochs over which the DKD loss ramps up linearly (DKD paper: 20)")
    parser.add_argument("--fcka_weight", type=float, default=1.0,
                        help="weight of L_FCKA (the paper gives none; the first author's related code uses 1)")
    parser.add_argument("--lcka_intra_weight", type=float, default=15.0,
                        help="weight of L_Intra-LCKA, CKA of batch x batch logit Grams (first author's code: 15)")
    parser.add_argument("--lcka_inter_weight", type=float, default=15.0,
                        help="weight of L_Inter-LCKA, CKA of class x class logit Grams (first author's code: 15)")
    parser.add_argument("--fcka_stages", default="all",
                        help="stage outputs that FCKA compares, as indices into the stages after the stem "
                             "(comma-separated, negative from the end, e.g. '-1'), or 'all' (default, summed, as "
                             "the first author's related code does); the same indices are used for teacher and "
                             "student")
    parser.add_argument("--cka_centered", action=argparse.BooleanOptionalAction, default=True,
                        help="centre the Gram matrices (true CKA, default); --no-cka_centered reproduces the "
                             "paper's released code, which never centres")

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


def resolved_method(args: argparse.Namespace) -> str:
    return args.method or ("rcka" if args.teacher else "ce")


def default_output_dir(args: argparse.Namespace) -> str:
    """output/cifar100/<teacher>_<student>/<method>/seed<seed>: one folder per setting, so sweeps never collide."""
    pair = f"{args.teacher}_{args.student}" if args.teacher else args.student
    return os.path.join("output", "cifar100", pair, resolved_method(args), f"seed{args.seed}")


def derive_config(args: argparse.Namespace, world_size: int) -> dict:
    """Values that follow from the user's flags, kept apart from them (args is never modified)."""
    method = resolved_method(args)
    if method != "ce" and not args.teacher:
        raise UsageError(f"--method {method} distils from a teacher: pass --teacher ARCH (or use --method ce).")
    if args.batch_size % world_size:
        raise UsageError(f"--batch_size {args.batch_size} (the total batch) must be divisible by the {world_size} processes.")
    lr = args.lr if args.lr is not None else (0.01 if args.student in LIGHTWEIGHT_STUDENTS else 0.05)
    ce_weight = args.ce_weight if args.ce_weight is not None else (0.1 if method == "kd" else 1.0)
    output_dir = args.output_dir or default_output_dir(args)
    return {
        "method": method,
        "lr": lr,
        "ce_weight": ce_weight,
        "batch_size_per_process": args.batch_size // world_size,
        "world_size": world_size,
        "output_dir": output_dir,
    }


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
    # ------------------------------------------------------------ set-up
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = dist.init_distributed(device)
    cfg = derive_config(args, info.world_size)
    output_dir = Path(cfg["output_dir"])
    done_path = output_dir / "done.json"
    if done_path.exists() and not args.eval:
        summary = json.loads(done_path.read_text())
        dist.print_main(f"{output_dir} is finished (last top-1 {summary['last_acc1']:.2f}, best "
                        f"{summary['best_acc1']:.2f}); delete done.json to train again. Nothing to do.")
        dist.cleanup()
        return summary
    torch.manual_seed(args.seed)
    if dist.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        metadata = run_metadata(args)
        metadata["derived"] = cfg
        write_json_atomic(metadata, output_dir / "args.json")
    dist.print_main("derived settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))

    # ------------------------------------------------------------ data
    verify, download = not args.no_verify_data, not args.no_download
    if dist.is_main_process():
        ensure_cifar100(args.data_path, download=download, verify=verify)
    dist.barrier()
    per_process = cfg["batch_size_per_process"]
    if args.loader == "tensor":
        train_images, train_labels = load_cifar100(args.data_path, train=True, download=False, verify=False)
        test_images, test_labels = load_cifar100(args.data_path, train=False, download=False, verify=False)
        common_kw = dict(device=info.device, seed=args.seed, rank=info.rank, world_size=info.world_size,
                         channels_last=args.channels_last)
        train_loader = TensorLoader(train_images, train_labels, per_process, train=True, **common_kw)
        test_loader = TensorLoader(test_images, test_labels, 256, train=False, **common_kw)
    else:
        common_kw = dict(num_workers=args.num_workers, seed=args.seed, download=False, verify=False,
                         rank=info.rank, world_size=info.world_size)
        train_loader = build_torchvision_loader(args.data_path, True, per_process, **common_kw)
        test_loader = build_torchvision_loader(args.data_path, False, 256, **common_kw)

    # ------------------------------------------------------------ teacher and student
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student = build_model(args.student).to(info.device, memory_format=memory_format)
    teacher = None
    if args.teacher and cfg["method"] == "ce":
        dist.print_main(f"--method ce trains {args.student} alone: the teacher {args.teacher} is not loaded.")
    elif args.teacher:
        teacher = load_teacher(args, output_dir, info, test_loader, memory_format)
    criterion = build_distillation_loss(cfg["method"], vars(args)) if teacher is not None else None
    needs_features = criterion is not None and criterion.needs_features
    student_taps = teacher_taps = None
    if needs_features:
        stages_s, stages_t = select_stages(args.student, args.fcka_stages), select_stages(args.teacher, args.fcka_stages)
        if len(stages_s) != len(stages_t):
            raise UsageError(
                f"FCKA pairs stages one to one, but {args.student} has stages {stages_s} and {args.teacher} "
                f"{stages_t}; pick indices both have with --fcka_stages (e.g. '-1')."
            )
        student_taps, teacher_taps = FeatureTaps(student, stages_s), FeatureTaps(teacher, stages_t)
    model = student
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[info.device] if info.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None

    # ------------------------------------------------------------ loss, optimiser, schedule
    # A loss with parameters (a projector, say) trains with the student.
    params = list(student.parameters()) + (list(criterion.parameters()) if criterion is not None else [])
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=args.momentum,
                                weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_decay_epochs,
                                                        gamma=args.lr_decay_rate)

    # ------------------------------------------------------------ resume
    start_epoch, best_acc1, best_epoch = 0, 0.0, -1
    checkpoint_path = output_dir / "checkpoint.pth"
    resume_path = Path(args.resume) if args.resume else (checkpoint_path if checkpoint_path.exists() else None)
    if resume_path is not None and not args.eval:
        checkpoint = load_checkpoint(resume_path)
        check_same_run(checkpoint.get("args", {}), args, resume_path)
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch, best_acc1, best_epoch = checkpoint["epoch"] + 1, checkpoint["best_acc1"], checkpoint["best_epoch"]
        set_rng_state(checkpoint["rng"])
        if dist.is_main_process():
            truncate_log(output_dir / "log.txt", start_epoch)
        dist.print_main(f"resumed from {resume_path} at epoch {start_epoch}/{args.epochs} (best top-1 so far {best_acc1:.2f})")

    # ------------------------------------------------------------ evaluate-only exit
    if args.eval:
        if resume_path is None:
            raise UsageError(f"--eval needs weights: pass --resume PATH, or train first ({checkpoint_path} does not exist).")
        load_zoo_weights(student, resume_path, args.student)
        stats = evaluate(student, test_loader, info.device, args.amp)
        dist.print_main(f"{args.student} from {resume_path}: top-1 {stats['acc1']:.2f}  top-5 {stats['acc5']:.2f}")
        dist.cleanup()
        return stats

    # ------------------------------------------------------------ epoch loop
    dist.print_main(f"training {args.student} with {cfg['method']} for epochs {start_epoch}..{args.epochs - 1} "
                    f"in {output_dir}")
    stats = None
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        set_loader_epoch(train_loader, epoch)
        train_stats = train_one_epoch(model, teacher, criterion, student_taps, teacher_taps, train_loader, optimizer,
                                      epoch, info.device, args, cfg)
        lr_scheduler.step()
        dist.broadcast_buffers(student)
        stats = evaluate(student, test_loader, info.device, args.amp)
        if stats["acc1"] > best_acc1:
            best_acc1, best_epoch = stats["acc1"], epoch
            if dist.is_main_process():
                save_zoo_weights(student, output_dir / "student_best.pth", epoch, best_acc1)
        log = {"epoch": epoch, "lr": train_stats.pop("lr"),
               **{f"train_{k}": v for k, v in train_stats.items()},
               "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
               "best_acc1": best_acc1, "epoch_time": time.time() - start}
        if dist.is_main_process():
            append_jsonl(log, output_dir / "log.txt")
            save_atomic({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "best_acc1": best_acc1,
                         "best_epoch": best_epoch, "rng": rng_state(), "args": vars(args)}, checkpoint_path)
        dist.print_main(f"epoch {epoch}: test top-1 {stats['acc1']:.2f} top-5 {stats['acc5']:.2f} "
                        f"(best {best_acc1:.2f} at {best_epoch}), {log['epoch_time']:.0f}s")

    # ------------------------------------------------------------ final summary beside the paper
    if stats is None:  # resumed after the last epoch had been checkpointed but before done.json was written
        stats = evaluate(student, test_loader, info.device, args.amp)
    summary = {"task": "cifar100", "teacher": args.teacher, "student": args.student, "method": cfg["method"],
               "seed": args.seed, "epochs": args.epochs, "last_acc1": stats["acc1"], "last_acc5": stats["acc5"],
               "best_acc1": best_acc1, "best_epoch": best_epoch,
               "paper_acc1": paper_top1(args.teacher, args.student, cfg["method"]),
               "git_commit": git_state()["git_commit"], "output_dir": str(output_dir),
               "weights_sha256": state_dict_sha256(student)}
    if dist.is_main_process():
        save_zoo_weights(student, output_dir / "student_last.pth", args.epochs - 1, stats["acc1"])
        write_json_atomic(summary, done_path)
    paper = summary["paper_acc1"]
    pair = f"{args.teacher} -> {args.student}" if args.teacher else args.student
    paper_text = f"paper {paper:.2f} (diff {stats['acc1'] - paper:+.2f})" if paper is not None else "no paper number"
    dist.print_main(f"RESULT cifar100 {pair} {cfg['method']} seed {args.seed}: last top-1 {stats['acc1']:.2f}, "
                    f"best {best_acc1:.2f} (epoch {best_epoch}) | {paper_text}")
    dist.cleanup()
    return summary


def load_teacher(args, output_dir: Path, info, test_loader, memory_format) -> nn.Module:
    """Build, load and freeze the teacher; evaluate it against the accuracy its checkpoint claims."""
    path = resolve_teacher_checkpoint(args.teacher, args.teacher_ckpt, args.zoo_dir,
                                      download=not args.no_download, url=args.zoo_url)
    teacher = build_model(args.teacher)
    meta = load_zoo_weights(teacher, path, args.teacher)
    # no_grad rather than inference_mode: the teacher's outputs enter the student's loss, and
    # autograd cannot save inference tensors for backward.
    teacher.eval().requires_grad_(False).to(info.device, memory_format=memory_format)
    claimed = ZOO_TOP1.get(args.teacher) if not args.teacher_ckpt else meta.get("acc")
    cache = output_dir / "teacher_eval.json"
    if cache.exists():
        measured = json.loads(cache.read_text())["acc1"]
    else:
        measured = evaluate(teacher, test_loader, info.device, args.amp)["acc1"]
        if dist.is_main_process():
            write_json_atomic({"teacher": args.teacher, "checkpoint": str(path), "acc1": measured, "claimed": claimed}, cache)
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
    return teacher


class TeacherCheckError(RuntimeError):
    """--strict_teacher and the teacher's measured accuracy is below its claim."""


class UsageError(ValueError):
    """Flags that do not fit together; the message says which and what to pass instead."""


def truncate_log(path: Path, start_epoch: int) -> None:
    """Drop log lines of epochs >= start_epoch: a run killed after logging an epoch but before checkpointing it
    redoes that epoch, which would otherwise appear twice."""
    if not path.exists():
        return
    kept = [entry for entry in read_jsonl(path) if entry["epoch"] < start_epoch]
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in kept)


def state_dict_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights: equal on every rank of a correct DDP run, and across exact resumes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def set_loader_epoch(loader, epoch: int) -> None:
    """Reseed the epoch's shuffle (and, for TensorLoader, augmentation) from (seed, epoch)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def check_same_run(saved: dict, args: argparse.Namespace, path: Path) -> None:
    for key in ("teacher", "student", "method", "seed"):
        if key in saved and saved[key] != getattr(args, key):
            raise CheckpointError(
                f"{path} belongs to a run with --{key} {saved[key]}, not {getattr(args, key)}: pass another "
                "--output_dir (or delete that folder to start over)."
            )


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


@torch.no_grad()
def evaluate(model, loader, device, amp: bool) -> dict:
    """Top-1/top-5 (%) and mean CE over the whole test set; each rank sees a disjoint shard, sums are reduced."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        top5 = logits.topk(5, dim=1).indices
        correct = top5.eq(targets[:, None])
        sums += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum(),
                             F.cross_entropy(logits.float(), targets, reduction="sum"),
                             torch.tensor(len(targets), device=device)]).double()
    sums = dist.all_reduce_sum(sums)
    count = sums[3].item()
    return {"acc1": 100.0 * sums[0].item() / count, "acc5": 100.0 * sums[1].item() / count,
            "loss": sums[2].item() / count}


# Errors whose message already says what to do: print it without a traceback.
USER_ERRORS = (DatasetNotFoundError, DatasetIntegrityError, TeacherNotFoundError, TeacherCheckError,
               CheckpointError, FloatingPointError, UsageError)

if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
