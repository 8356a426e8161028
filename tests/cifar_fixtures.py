"""Writes small CIFAR-100 look-alikes in the exact on-disk format of the published files.

The real ``cifar-100-python/{train,test,meta}`` are Python 2 pickles (protocol 2) whose dict keys,
strings and numpy raw buffers are Python 2 ``str``. That detail decides how they load under
Python 3: ``encoding='latin1'`` yields ``str`` keys, ``encoding='bytes'`` yields ``bytes`` keys,
and numpy arrays survive both. Python 3's pickler cannot produce Python 2 ``str``, so
:class:`_Python2Pickler` emits it by hand; data written here therefore exercises the same loading
code paths as the real dataset. Only the MD5s differ, which is why tests pass ``verify=False``.

Import from test modules (this directory is on ``sys.path`` under pytest's default import mode)::

    from cifar_fixtures import tiny_cifar100, write_fake_cifar100
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets.utils import calculate_md5

__all__ = [
    "FINE_LABEL_NAMES",
    "COARSE_LABEL_NAMES",
    "write_fake_cifar100",
    "written_md5s",
    "tiny_cifar100",
]

BASE_FOLDER = "cifar-100-python"

# The published CIFAR-100 class names in label order (alphabetical, as in the real meta file).
FINE_LABEL_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
COARSE_LABEL_NAMES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things "
    "large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals "
    "non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2"
).split()
assert len(FINE_LABEL_NAMES) == 100 and len(COARSE_LABEL_NAMES) == 20


class _Python2Pickler(pickle._Pickler):
    """Protocol-2 pickler writing ``str``/``bytes`` and uint8 arrays as Python 2 would.

    Built on the pure-Python ``pickle._Pickler`` because its per-type ``dispatch`` table can be
    extended; the C pickler's cannot.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file) -> None:
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def _save_py2_global(self, module: str, name: str) -> None:
        # The module path numpy 1.x (which wrote the real files) used; numpy 2 still resolves it.
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))

    def save_ndarray(self, arr: np.ndarray) -> None:
        if arr.dtype != np.uint8:
            raise TypeError(f"only uint8 arrays occur in CIFAR files, got {arr.dtype}")
        # ndarray.__reduce__ as numpy 1.x emitted it: _reconstruct(ndarray, (0,), 'b'), then BUILD
        # with the state (version, shape, dtype, is_fortran, raw bytes as a Python 2 str).
        self._save_py2_global("numpy.core.multiarray", "_reconstruct")
        self._save_py2_global("numpy", "ndarray")
        self.save((0,))
        self.save("b")
        self.write(pickle.TUPLE3 + pickle.REDUCE)
        self.memoize(arr)
        self.write(pickle.MARK)
        self.save(1)
        self.save(arr.shape)
        self._save_uint8_dtype()
        self.save(False)
        self.save(np.ascontiguousarray(arr).tobytes())
        self.write(pickle.TUPLE + pickle.BUILD)

    def _save_uint8_dtype(self) -> None:
        # dtype('u1', 0, 1) with numpy 1.x's version-3 state, the way the real files spell uint8.
        self._save_py2_global("numpy", "dtype")
        self.save(("u1", 0, 1))
        self.write(pickle.REDUCE)
        self.save((3, "|", None, None, None, -1, -1, 0))
        self.write(pickle.BUILD)

    dispatch[np.ndarray] = save_ndarray


def _pickle_py2(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f).dump(obj)


def _make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class-dependent colour plus oriented stripes plus noise, as CIFAR rows (N, 3072)."""
    n = len(labels)
    palette = np.random.default_rng(1234).integers(50, 206, size=(100, 3))
    angle = (labels % 8) * (np.pi / 8)
    freq = 1.5 + (labels // 8) % 4
    phase = rng.uniform(0, 2 * np.pi, size=n)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    coord = xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None]
    stripes = np.sin(2 * np.pi * freq[:, None, None] / 32 * coord + phase[:, None, None])
    images = palette[labels][:, :, None, None] + 45 * stripes[:, None] + rng.normal(0, 12, size=(n, 3, 32, 32))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


def _split_dict(n: int, batch_label: str, rng: np.random.Generator) -> dict:
    fine = rng.permutation(np.arange(n) % 100)
    return {
        "filenames": [f"{FINE_LABEL_NAMES[c]}_s_{i:06d}.png" for i, c in enumerate(fine)],
        "batch_label": batch_label,
        "fine_labels": [int(c) for c in fine],
        # Synthetic superclass assignment; nothing in the project reads coarse labels.
        "coarse_labels": [int(c) // 5 for c in fine],
        "data": _make_images(fine, rng),
    }


def write_fake_cifar100(root: str | Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """Write ``<root>/cifar-100-python/{train,test,meta}`` and return ``root`` as a Path."""
    root = Path(root)
    folder = root / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _pickle_py2(_split_dict(n_train, "training batch 1 of 1", rng), folder / "train")
    _pickle_py2(_split_dict(n_test, "testing batch 1 of 1", rng), folder / "test")
    meta = {"fine_label_names": list(FINE_LABEL_NAMES), "coarse_label_names": list(COARSE_LABEL_NAMES)}
    _pickle_py2(meta, folder / "meta")
    return root


def written_md5s(root: str | Path) -> dict[str, str]:
    """MD5 of each file :func:`write_fake_cifar100` wrote under ``root``."""
    folder = Path(root) / BASE_FOLDER
    return {name: calculate_md5(folder / name) for name in ("train", "test", "meta")}


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide fake CIFAR-100 root (500 train / 200 test images); treat it as read-only."""
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar100"), n_train=500, n_test=200, seed=0)


def write_teacher_zoo(root: str | Path, arch: str = "resnet8", seed: int = 123, acc: float | None = 1.0) -> Path:
    """A teacher zoo laid out like the unpacked public archive: root/cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth."""
    import torch

    from cifar100.models import build_model

    path = Path(root) / "cifar_teachers" / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    checkpoint = {"model": build_model(arch).state_dict()}
    if acc is not None:
        checkpoint["acc"] = acc
    torch.save(checkpoint, path)
    return Path(root)
