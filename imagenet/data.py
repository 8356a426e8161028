"""ImageNet-1k data: the ImageFolder layout checked with clear errors, the standard transforms, loaders.

Layout (torchvision's ImageFolder, as torchvision's references/classification and every KD code base expect):

    <data_path>/train/<wnid>/*.JPEG      1000 class folders, ~1.28 M images
    <data_path>/val/<wnid>/*.JPEG        the same 1000 folders, 50 images each

Labels are the index of the folder name in sorted order, which is the order torchvision's pretrained weights use.

Transforms (torchvision references/classification, the recipe of the torchvision V1 weights and of DKD's ImageNet
configs): training RandomResizedCrop(224) + horizontal flip; validation Resize(256) + CenterCrop(224); bilinear with
antialiasing. The loaders yield **uint8** images (4x less to pin and copy than float); ``to_model_input`` converts
and normalises them on the training device.

Two decoders give the same transforms: ``pil`` (PIL open + resize, the textbook path) and ``torchvision``
(``torchvision.io.decode_image`` + the same transforms on uint8 tensors). ``benchmarks/bench_imagenet_decode.py``
measures both, and batched and GPU ``decode_jpeg``; the default is the faster one (see its docstring).

Augmentation randomness is a function of (seed, epoch, image index): the sampler hands each worker the epoch with
the index. So a run draws the same crops whatever the number of workers, and a resumed run draws exactly what an
uninterrupted one would have (worker RNG streams would otherwise restart at a resume).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from common.dist import DistributedEvalSampler

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DECODERS", "DatasetLayoutError", "ImageList", "build_loaders",
           "check_layout", "list_images", "to_model_input"]

# The normalisation torchvision's ImageNet weights were trained with (weights.transforms()).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODERS = ("torchvision", "pil")

_SORT_VAL = (
    "To sort the official validation images into class folders: put ILSVRC2012_img_val.tar and "
    "ILSVRC2012_devkit_t12.tar.gz in {root} and run\n"
    "    python -c \"import torchvision; torchvision.datasets.ImageNet('{root}', split='val')\"\n"
    "which extracts them into {root}/val/<wnid>/ using the devkit's labels (or use the well-known valprep.sh "
    "script that moves each ILSVRC2012_val_*.JPEG into its wnid folder)."
)


class DatasetLayoutError(FileNotFoundError):
    """The data folder is not in ImageFolder's train/<class>/, val/<class>/ layout; the message says how to fix it."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def check_layout(data_path: str | os.PathLike, num_classes: int) -> list[str]:
    """The class names (folder names, sorted), after checking train/ and val/ hold the same ``num_classes``
    class folders; raises DatasetLayoutError naming the problem and the fix."""
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"--data_path {root} does not exist. Pass the folder that holds ImageNet's train/ "
                                 f"and val/ class folders (ImageFolder layout).")
    classes = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            present = sorted(p.name for p in root.iterdir())[:10]
            raise DatasetLayoutError(
                f"{split_dir} does not exist ({root} holds {present}). Expected {root}/train/<class>/*.JPEG and "
                f"{root}/val/<class>/*.JPEG (ImageFolder layout)."
                + ("\n" + _SORT_VAL.format(root=root) if split == "val" else ""))
        folders = _class_folders(split_dir)
        loose = [entry.name for entry in os.scandir(split_dir) if entry.is_file() and _is_image(entry.name)]
        if loose:
            archive = "validation" if split == "val" else "training"
            message = (f"{split_dir} holds {len(loose)} images directly (e.g. {sorted(loose)[0]}) instead of one "
                       f"folder per class: this is the flat layout of the raw {archive} archive.")
            raise DatasetLayoutError(message + "\n" + (_SORT_VAL.format(root=root) if split == "val" else
                                     "Extract each per-class tar of ILSVRC2012_img_train.tar into train/<wnid>/."))
        if not folders:
            raise DatasetLayoutError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.JPEG.")
        classes[split] = folders
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DatasetLayoutError(
            f"train/ and val/ under {root} have different class folders (only in train: {only_train[:5]}"
            f"{' ...' if len(only_train) > 5 else ''}; only in val: {only_val[:5]}{' ...' if len(only_val) > 5 else ''}"
            f"), so their labels would not agree. Both need the same folders.")
    if len(classes["train"]) != num_classes:
        raise DatasetLayoutError(
            f"{root} has {len(classes['train'])} class folders but the models are built for --num_classes "
            f"{num_classes} (ImageNet-1k has 1000). Check the data, or pass --num_classes {len(classes['train'])} "
            f"for another dataset (the torchvision teachers then do not fit).")
    return classes["train"]


def list_images(split_dir: str | os.PathLike, classes: list[str], subset: int | None = None) -> list[tuple[str, int]]:
    """(path, label) for every image, classes in order, files sorted; the first ``subset`` of each class if given."""
    samples = []
    for label, name in enumerate(classes):
        files = sorted(entry.name for entry in os.scandir(Path(split_dir) / name)
                       if entry.is_file() and _is_image(entry.name))
        if not files:
            raise DatasetLayoutError(f"{Path(split_dir) / name} holds no images ({', '.join(IMG_EXTENSIONS)}).")
        samples += [(os.path.join(split_dir, name, f), label) for f in files[:subset]]
    return samples


def _epoch_seed(seed: int, epoch: int, index: int) -> int:
    # A hash rather than seed + epoch + index, so neighbouring (epoch, index) pairs get unrelated streams.
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest(), "little") >> 1


class ImageList(Dataset):
    """Images from (path, label) pairs, decoded with ``decoder`` and transformed to uint8 (3, H, W) tensors.

    Items are looked up by ``(index, epoch)`` (what ``EpochSampler`` yields) or by a plain index (epoch 0); the
    transform's randomness is seeded from (seed, epoch, index).

    Paths and labels are kept in two numpy arrays, not a list of 1.28 M Python tuples: workers read them without
    touching reference counts, so the forked workers' copy-on-write pages stay shared instead of growing every
    worker's memory by the whole list as it is read.
    """

    def __init__(self, samples: list[tuple[str, int]], transform, decoder: str, seed: int = 0) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; decoders: {', '.join(DECODERS)}")
        self.paths = np.array([path for path, _ in samples])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform, self.decoder, self.seed = transform, decoder, seed

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(str(path), int(label)) for path, label in zip(self.paths, self.labels)]

    def load(self, path: str):
        if self.decoder == "pil":
            with Image.open(path) as image:
                return image.convert("RGB")
        # decode_image reads JPEG and PNG (ImageNet's training set has one PNG and some CMYK JPEGs in disguise).
        return decode_image(read_file(path), mode=ImageReadMode.RGB)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = str(self.paths[index]), int(self.labels[index])
        image = self.load(path)
        # fork_rng: with num_workers=0 this runs in the training process, whose RNG must not change.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_epoch_seed(self.seed, epoch, index))
            image = self.transform(image)
        return image, label


class EpochSampler(Sampler):
    """``DistributedSampler``'s shuffled shard, each index paired with the epoch (see the module docstring)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int) -> None:
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, self.epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def train_transform(crop_size: int, decoder: str):
    to_uint8 = v2.PILToTensor() if decoder == "pil" else v2.Identity()
    return v2.Compose([v2.RandomResizedCrop(crop_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                       v2.RandomHorizontalFlip(), to_uint8])


def val_transform(resize_size: int, crop_size: int, decoder: str):
    to_uint8 = v2.PILToTensor() if decoder == "pil" else v2.Identity()
    return v2.Compose([v2.Resize(resize_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                       v2.CenterCrop(crop_size), to_uint8])


def build_loaders(data_path, classes: list[str], *, batch_size: int, val_batch_size: int, num_workers: int,
                  decoder: str, subset: int | None, train_crop_size: int, val_resize_size: int, val_crop_size: int,
                  seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """(train_loader, val_loader) for this process: a shuffled shard of train (``set_epoch`` each epoch, last
    incomplete batch dropped), and every validation image exactly once over all processes."""
    root = Path(data_path).expanduser()
    train_set = ImageList(list_images(root / "train", classes, subset), train_transform(train_crop_size, decoder),
                          decoder, seed)
    val_set = ImageList(list_images(root / "val", classes, subset),
                        val_transform(val_resize_size, val_crop_size, decoder), decoder, seed)
    if len(train_set) < batch_size * world_size:
        raise DatasetLayoutError(f"{root / 'train'} has {len(train_set)} images (with --subset {subset}), fewer than "
                                 f"one total batch of {batch_size * world_size}; lower --batch_size or raise --subset.")
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=EpochSampler(train_set, rank, world_size, seed),
                              drop_last=True, **common)
    val_loader = DataLoader(val_set, batch_size=val_batch_size,
                            sampler=DistributedEvalSampler(val_set, rank, world_size), **common)
    return train_loader, val_loader


def val_fingerprint(val_loader: DataLoader) -> str:
    """What the validation accuracy depends on besides the model: the images and their transform."""
    dataset = val_loader.dataset
    digest = hashlib.sha256("\n".join(f"{os.path.relpath(p, os.path.dirname(os.path.dirname(os.path.dirname(p))))}"
                                      f",{label}" for p, label in dataset.samples).encode())
    digest.update(repr(dataset.transform).encode() + dataset.decoder.encode())
    return f"{len(dataset)}images-{digest.hexdigest()[:12]}"


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) from the loader → normalised float32 on ``device`` (the conversion runs there)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std
