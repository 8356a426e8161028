"""The public CIFAR-100 teacher zoo: where the checkpoints live, how to fetch them, what they claim.

The archive is mdistiller's release `checkpoints/cifar_teachers.tar` (the original CRD host is
down). It unpacks to ``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``; each file is a dict
whose "model" entry is the state_dict of our model of the same name. No checksum is published,
so train.py evaluates every teacher before distilling and compares with ``ZOO_TOP1``.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

ZOO_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
ZOO_ARCHIVE = "cifar_teachers.tar"

# Test top-1 (%) the zoo's teachers are published with (CRD README, HobbitLong/RepDistiller).
# One user measured a downloaded resnet110 at 70.27 (CRD issue #29): hence the check in train.py.
ZOO_TOP1 = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "ResNet50": 79.34,
}


class TeacherNotFoundError(FileNotFoundError):
    """No teacher checkpoint, and none could be fetched; the message lists the ways out."""


def zoo_checkpoint_path(zoo_dir: str | Path, name: str) -> Path:
    return Path(zoo_dir) / "cifar_teachers" / f"{name}_vanilla" / "ckpt_epoch_240.pth"


def _train_it_yourself(name: str) -> str:
    return (
        f"train it with this script: python cifar100/train.py --student {name} "
        f"--output_dir output/cifar100/teachers/{name}, then pass "
        f"--teacher_ckpt output/cifar100/teachers/{name}/student_best.pth"
    )


def download_zoo(zoo_dir: str | Path, url: str = ZOO_URL) -> None:
    """Download the archive (with a progress bar) into zoo_dir and unpack it there."""
    # torchvision's downloader follows GitHub's redirects and shows a tqdm progress bar.
    from torchvision.datasets.utils import download_url

    zoo_dir = Path(zoo_dir)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    archive = zoo_dir / ZOO_ARCHIVE
    if not archive.exists():
        download_url(url, str(zoo_dir), filename=ZOO_ARCHIVE)
    with tarfile.open(archive) as tar:
        # "data" refuses absolute paths, links out of zoo_dir and device files in a downloaded archive.
        tar.extractall(zoo_dir, filter="data")


def resolve_teacher_checkpoint(
    name: str,
    teacher_ckpt: str | None,
    zoo_dir: str | Path,
    download: bool = True,
    url: str = ZOO_URL,
) -> Path:
    """The checkpoint to load for teacher ``name``: --teacher_ckpt, else the zoo file (fetched if missing)."""
    if teacher_ckpt:
        path = Path(teacher_ckpt)
        if not path.is_file():
            raise TeacherNotFoundError(f"--teacher_ckpt {path} is not a file. Check the path, or {_train_it_yourself(name)}.")
        return path
    path = zoo_checkpoint_path(zoo_dir, name)
    if path.is_file():
        return path
    if name not in ZOO_TOP1:
        raise TeacherNotFoundError(
            f"the public zoo has no {name} teacher (it has {', '.join(sorted(ZOO_TOP1))}); {_train_it_yourself(name)}."
        )
    if download:
        try:
            download_zoo(zoo_dir, url)
        except (OSError, tarfile.TarError, RuntimeError) as err:
            raise TeacherNotFoundError(
                f"teacher {name} is not at {path} and downloading {url} failed ({err}). Either download "
                f"{ZOO_ARCHIVE} from that address yourself and unpack it into {zoo_dir} "
                f"(tar -xf {ZOO_ARCHIVE} -C {zoo_dir}), or {_train_it_yourself(name)}."
            ) from err
        if path.is_file():
            return path
        raise TeacherNotFoundError(f"{url} was unpacked into {zoo_dir} but holds no {path}; {_train_it_yourself(name)}.")
    raise TeacherNotFoundError(
        f"teacher {name} is not at {path} and downloading is off (--no_download). Download {url} and unpack "
        f"it into {zoo_dir}, or {_train_it_yourself(name)}."
    )
