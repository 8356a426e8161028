"""CIFAR-100 data: loading the published files, a device-resident loader, and the classic loader.

Two input pipelines produce the same distribution of training batches:

* :class:`TensorLoader` (the default) keeps the whole uint8 split as one tensor on the training
  device and does crop/flip/normalise batched there. CIFAR-100 is 150 MB as uint8, so this
  removes the DataLoader workers and the per-image PIL work that otherwise bound small-model
  training throughput.
* :func:`build_torchvision_loader` is the textbook ``torchvision.datasets.CIFAR100`` +
  ``transforms`` + ``DataLoader`` pipeline, kept to compare against (``--loader torchvision``).

Files are expected in torchvision's layout, ``<root>/cifar-100-python/{train,test,meta}``, so a
directory prepared by torchvision works unchanged.
"""

from __future__ import annotations

import math
import pickle
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchvision import datasets, transforms
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR100_URL",
    "CIFAR100_ARCHIVE",
    "CIFAR100_ARCHIVE_MD5",
    "CIFAR100_BASE_FOLDER",
    "CIFAR100_FILE_MD5",
    "DatasetNotFoundError",
    "DatasetIntegrityError",
    "ensure_cifar100",
    "load_cifar100",
    "load_cifar100_classes",
    "TensorLoader",
    "build_torchvision_loader",
]

# Per-channel mean/std of the CIFAR-100 training images scaled to [0, 1]. These are the values of
# the CRD code base (HobbitLong/RepDistiller, datasets/cifar100.py) on which the CIFAR-100 KD
# benchmarks reported by the paper are built; keeping them makes teacher checkpoints trained
# with that code base usable here without re-normalising.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

# Read from torchvision rather than retyped, so the URL and checksums stay the ones torchvision
# itself trusts.
_TV_CIFAR100 = datasets.CIFAR100
CIFAR100_URL: str = _TV_CIFAR100.url
CIFAR100_ARCHIVE: str = _TV_CIFAR100.filename
CIFAR100_ARCHIVE_MD5: str = _TV_CIFAR100.tgz_md5
CIFAR100_BASE_FOLDER: str = _TV_CIFAR100.base_folder
CIFAR100_FILE_MD5: dict[str, str] = {
    **{name: md5 for name, md5 in _TV_CIFAR100.train_list + _TV_CIFAR100.test_list},
    _TV_CIFAR100.meta["filename"]: _TV_CIFAR100.meta["md5"],
}
_TRAIN_FILE: str = _TV_CIFAR100.train_list[0][0]
_TEST_FILE: str = _TV_CIFAR100.test_list[0][0]
_META_FILE: str = _TV_CIFAR100.meta["filename"]
_CLASSES_KEY: str = _TV_CIFAR100.meta["key"]

_IMAGE_SHAPE = (3, 32, 32)


class DatasetNotFoundError(FileNotFoundError):
    """The CIFAR-100 files are not on disk and could not be downloaded."""


class DatasetIntegrityError(RuntimeError):
    """A CIFAR-100 file is present but its MD5 differs from the published one."""


def _split_file(train: bool) -> str:
    return _TRAIN_FILE if train else _TEST_FILE


def _not_found_message(folder: Path, missing: Sequence[str], download_error: BaseException | None) -> str:
    root = folder.parent
    lines = [f"CIFAR-100 not found: {', '.join(str(folder / m) for m in missing)} missing."]
    if download_error is None:
        lines.append("Downloading was disabled (download=False).")
    else:
        lines.append(f"Downloading {CIFAR100_URL} failed: {type(download_error).__name__}: {download_error}")
    lines.append(
        f"To fix: download {CIFAR100_ARCHIVE} from {CIFAR100_URL} on a machine with network access "
        f"and extract it into {root} (giving {folder}/{{{_TRAIN_FILE},{_TEST_FILE},{_META_FILE}}}), "
        f"or pass --data_path pointing at a directory that already contains {CIFAR100_BASE_FOLDER}/."
    )
    return "\n".join(lines)


def _verify_md5(path: Path) -> None:
    expected = CIFAR100_FILE_MD5[path.name]
    actual = calculate_md5(path)
    if actual != expected:
        raise DatasetIntegrityError(
            f"{path}: MD5 is {actual} but the published CIFAR-100 '{path.name}' has MD5 {expected}. "
            f"The file is corrupt or incomplete: delete {path.parent} (and {path.parent.parent / CIFAR100_ARCHIVE} "
            f"if present) and download again. If this is generated test data rather than the real "
            f"dataset, pass --no_verify_data (verify=False) to skip the check."
        )


def ensure_cifar100(
    root: str | Path,
    download: bool = True,
    verify: bool = True,
    files: Sequence[str] = (_TRAIN_FILE, _TEST_FILE, _META_FILE),
) -> Path:
    """Make sure ``files`` exist under ``<root>/cifar-100-python`` and return that folder.

    Missing files trigger a download of the official archive with torchvision's own downloader
    (which checks the archive MD5) when ``download`` is true. Files that are present are never
    overwritten: a checksum mismatch is reported, not silently "repaired", so a user's data is
    not replaced behind their back. Under DDP call this on one rank first and barrier, because
    concurrent downloads into the same folder race.
    """
    folder = Path(root).expanduser() / CIFAR100_BASE_FOLDER
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        if not download:
            raise DatasetNotFoundError(_not_found_message(folder, missing, None))
        try:
            download_and_extract_archive(
                CIFAR100_URL, download_root=str(folder.parent), filename=CIFAR100_ARCHIVE, md5=CIFAR100_ARCHIVE_MD5
            )
        # URLError/HTTPError and socket errors are OSErrors; torchvision raises RuntimeError for an
        # archive that fails its MD5, and tarfile its own errors for a truncated archive.
        except (OSError, RuntimeError, tarfile.TarError, EOFError) as e:
            raise DatasetNotFoundError(_not_found_message(folder, missing, e)) from e
        still_missing = [name for name in files if not (folder / name).is_file()]
        if still_missing:
            raise DatasetNotFoundError(
                f"{CIFAR100_ARCHIVE} was downloaded and extracted into {folder.parent}, but "
                f"{', '.join(str(folder / m) for m in still_missing)} is still missing. Delete "
                f"{folder.parent / CIFAR100_ARCHIVE} and {folder} and try again."
            )
    if verify:
        for name in files:
            _verify_md5(folder / name)
    return folder


class _CifarUnpickler(pickle.Unpickler):
    # The published files only reference numpy's array reconstruction. Refusing every other global
    # keeps an unverified (--no_verify_data) pickle from running arbitrary code on load.
    _ALLOWED_GLOBALS = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"{module}.{name} is referenced by this pickle but never by a CIFAR-100 file; "
                f"refusing to load it. Re-download the dataset."
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle with str keys, whatever Python wrote it.

    The published files are Python 2 pickles whose keys and numpy raw buffers are Python 2 ``str``:
    ``encoding='latin1'`` maps those to ``str`` without mangling the array bytes (numpy re-encodes
    them with latin1). A file re-pickled under Python 3 may carry ``bytes`` keys instead, so those
    are decoded here too.
    """
    with open(path, "rb") as f:
        entry = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a pickled dict (CIFAR-100 python format), got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _require_key(entry: dict[str, Any], key: str, path: Path) -> Any:
    if key not in entry:
        raise KeyError(f"{path}: key '{key}' missing (keys: {sorted(entry)}); not a CIFAR-100 python-format file")
    return entry[key]


def load_cifar100(
    root: str | Path, train: bool, download: bool = True, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)`` fine labels."""
    folder = ensure_cifar100(root, download=download, verify=verify, files=(_split_file(train),))
    path = folder / _split_file(train)
    try:
        return _load_split(path)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        # Only reachable for files that skipped the MD5 check (--no_verify_data): the published ones load.
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        raise DatasetIntegrityError(
            f"{path} cannot be read as a CIFAR-100 file ({type(err).__name__}: {message}). It is damaged or not the "
            f"published file: delete {folder} and rerun to download it again, or drop --no_verify_data to check "
            f"it against the published MD5."
        ) from None


def _load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _unpickle(path)
    data = _require_key(entry, "data", path)
    labels = _require_key(entry, "fine_labels", path)
    if isinstance(data, (bytes, str)):
        data = np.frombuffer(data.encode("latin1") if isinstance(data, str) else data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.size % math.prod(_IMAGE_SHAPE) != 0:
        raise ValueError(
            f"{path}: 'data' must be uint8 rows of {math.prod(_IMAGE_SHAPE)} values, got {data.dtype} {data.shape}"
        )
    # Rows are the R, G and B planes of one image back to back, i.e. already CHW.
    data = data.reshape(-1, *_IMAGE_SHAPE)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} fine_labels")
    # The unpickled array may be a read-only view of the pickle's buffer; torch needs it writable.
    images = torch.from_numpy(np.require(data, dtype=np.uint8, requirements=("C", "W")))
    return images, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def load_cifar100_classes(root: str | Path, download: bool = True, verify: bool = True) -> list[str]:
    """Return the 100 fine class names in label order, from the ``meta`` file."""
    folder = ensure_cifar100(root, download=download, verify=verify, files=(_META_FILE,))
    path = folder / _META_FILE
    return list(_require_key(_unpickle(path), _CLASSES_KEY, path))


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence hashes the pair, so (seed, epoch + 1) and (seed + 1, epoch) give unrelated streams,
    # unlike DistributedSampler's seed + epoch.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


class TensorLoader:
    """Device-resident CIFAR loader yielding ``(normalised float images, int64 labels)`` batches.

    The uint8 split lives on ``device`` as one tensor; each batch is gathered from it and, when
    augmenting, randomly cropped (32x32 from the image zero-padded by 4, as
    ``transforms.RandomCrop(32, padding=4)`` on the uint8 image) and horizontally flipped with
    p=0.5 in one batched gather, then normalised with ``mean``/``std``.

    Randomness: like ``DistributedSampler``, call :meth:`set_epoch` before iterating each epoch.
    The epoch's permutation and every crop offset and flip come from a CPU ``torch.Generator``
    seeded from ``(seed, epoch)`` only, so a run resumed at an epoch boundary replays bit-identical
    batches without any saved loader state, on any device. Augmentation parameters are drawn per
    position of the global (all-rank) epoch order, so the crop and flip a sample gets do not
    depend on ``world_size`` (only the few padding repeats differ).

    Sharding (``world_size > 1``): rank ``r`` takes positions ``r, r + world_size, ...`` of the
    epoch order.

    * ``train=True``: the shuffled order is padded by repeating its start to a multiple of
      ``world_size`` (as ``DistributedSampler`` does), so every rank yields the same number of
      samples and batches and collectives stay in step; a few samples are seen twice per epoch.
    * ``train=False``: no shuffle, no augmentation, no padding. The shards cover every sample
      exactly once across ranks, so metrics summed over ranks are exact; shard sizes, and hence
      batch counts, may differ by one, so evaluation must all-reduce its sums once after the loop,
      not per batch. ``drop_last`` is refused here because it would skip test samples.

    No host synchronisation happens per batch: the epoch's indices and augmentation parameters
    are moved to the device once (non-blocking, from pinned memory on CUDA) in ``__iter__``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augment: bool | None = None,
        channels_last: bool = False,
        padding: int = 4,
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                "images must be uint8 (N, 3, H, W) as returned by load_cifar100, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not train and drop_last:
            raise ValueError(
                "drop_last=True with train=False would leave test samples unevaluated; pass drop_last=False"
            )
        if len(images) == 0:
            raise ValueError("images is empty")

        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.padding = padding
        self.epoch = 0

        self.dataset_size = len(images)
        if train:
            self._global_size = math.ceil(self.dataset_size / world_size) * world_size
        else:
            self._global_size = self.dataset_size
        # Length of range(rank, global_size, world_size).
        self.num_samples = max(0, math.ceil((self._global_size - rank) / world_size))

        height, width = images.shape[2:]
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)
        self._channels = torch.arange(images.shape[1], device=self.device).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample indices, crop offsets (row, col) and flip flags for the epoch."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        if self.train:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        extra = self._global_size - self.dataset_size
        if extra:
            order = torch.cat([order, order.repeat(math.ceil(extra / self.dataset_size))[:extra]])
        shard = slice(self.rank, self._global_size, self.world_size)
        indices = self._to_device(order[shard])
        if not self.augment:
            return indices, None, None
        # Draws for the padding repeats come after those for the real positions, so a sample's
        # crop and flip at a given position are the same for every world_size.
        offsets, flips = self._draw_augmentation(self.dataset_size, generator)
        if extra:
            extra_offsets, extra_flips = self._draw_augmentation(extra, generator)
            offsets, flips = torch.cat([offsets, extra_offsets]), torch.cat([flips, extra_flips])
        return indices, self._to_device(offsets[shard]), self._to_device(flips[shard])

    def _draw_augmentation(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator)
        flips = torch.randint(0, 2, (count,), generator=generator, dtype=torch.bool)
        return offsets, flips

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        rows = offsets[:, :1] + self._rows
        # A flip is a crop read right-to-left, so it folds into the column indices of the same gather.
        cols = offsets[:, 1:] + torch.where(flips[:, None], self._cols.flip(0), self._cols)
        batch = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1)
        return padded[batch, self._channels, rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, offsets, flips = self._epoch_plan()
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = indices[batch]
            x = self.images.index_select(0, idx)
            if offsets is not None:
                x = self._crop_flip(x, offsets[batch], flips[batch])
            if self.channels_last:
                # Converting the uint8 batch moves a quarter of the bytes; .float() keeps the layout.
                x = x.contiguous(memory_format=torch.channels_last)
            # Same operations in the same order as ToTensor + Normalize, so both paths agree bitwise.
            x = x.float().div_(255).sub_(self._mean).div_(self._std)
            yield x, self.labels.index_select(0, idx)


class _PreverifiedCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR100 with its MD5 checks left to :func:`ensure_cifar100`.

    ``ensure_cifar100`` has already checked the files (or been told not to by --no_verify_data),
    so this avoids hashing them twice and lets generated data through when asked to.
    """

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        self.classes = load_cifar100_classes(self.root, download=False, verify=False)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def build_torchvision_loader(
    root: str | Path,
    train: bool,
    batch_size: int,
    num_workers: int,
    seed: int,
    *,
    download: bool = True,
    verify: bool = True,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD,
) -> DataLoader:
    """The classic per-image pipeline: ``datasets.CIFAR100`` + PIL transforms + ``DataLoader``.

    Sharding matches :class:`TensorLoader`: a ``DistributedSampler`` for training (call
    ``loader.sampler.set_epoch``), and for evaluation a strided, unpadded shard that covers every
    test sample exactly once across ranks. Single-process training shuffles with a generator seeded
    by ``seed``, which also seeds the workers' augmentation RNGs, so a run is reproducible from its
    start (not from a resumed epoch). With ``num_workers=0`` the transforms run in the main process
    and draw from the global torch RNG, which ``seed`` does not touch.
    """
    if not train and drop_last:
        raise ValueError("drop_last=True with train=False would leave test samples unevaluated; pass drop_last=False")
    ensure_cifar100(root, download=download, verify=verify, files=(_split_file(train), _META_FILE))
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if train:
        transform = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *normalize]
        )
    else:
        transform = transforms.Compose(normalize)
    dataset = _PreverifiedCIFAR100(str(Path(root).expanduser()), train=train, transform=transform, download=False)

    generator = torch.Generator().manual_seed(seed)
    if train and world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = range(rank, len(dataset), world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        # Seeds the workers' base seed, hence the per-worker augmentation RNG.
        generator=generator,
    )
