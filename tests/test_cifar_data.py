"""CIFAR-100 loading, verification, download errors and the two input pipelines, on generated data."""

from __future__ import annotations

import http.server
import math
import pickle
import pickletools
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from cifar_fixtures import FINE_LABEL_NAMES, tiny_cifar100, write_fake_cifar100, written_md5s  # noqa: F401
from torchvision import datasets, transforms

import cifar100.data as data
from cifar100.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DatasetIntegrityError,
    DatasetNotFoundError,
    TensorLoader,
    build_torchvision_loader,
    load_cifar100,
    load_cifar100_classes,
)

N_TRAIN, N_TEST = 500, 200
PY3_ONLY_OPCODES = {
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "FRAME",
    "STACK_GLOBAL",
    "MEMOIZE",
}


@pytest.fixture
def unverified_torchvision(monkeypatch):
    """torchvision's CIFAR100 with only its MD5 comparison relaxed to an existence check.

    Everything else (paths, unpickling, reshaping, meta) is torchvision's own code.
    """
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())


# ---------------------------------------------------------------------------------------------
# On-disk format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_generated_files_are_python2_protocol2_pickles(tiny_cifar100, name):
    raw = (tiny_cifar100 / "cifar-100-python" / name).read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert ops[0] == ("PROTO", 2)
    assert not PY3_ONLY_OPCODES & {op for op, _ in ops}
    if name != "meta":
        assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops


def test_split_loads_with_str_keys_under_latin1_and_bytes_keys_under_bytes(tiny_cifar100):
    path = tiny_cifar100 / "cifar-100-python" / "train"
    with open(path, "rb") as f:
        latin1 = pickle.load(f, encoding="latin1")
    with open(path, "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    keys = {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    assert set(latin1) == keys
    assert set(as_bytes) == {k.encode() for k in keys}
    for entry, key in ((latin1, "data"), (as_bytes, b"data")):
        assert isinstance(entry[key], np.ndarray)
        assert entry[key].dtype == np.uint8 and entry[key].shape == (N_TRAIN, 3072)
    np.testing.assert_array_equal(latin1["data"], as_bytes[b"data"])
    assert latin1["fine_labels"] == as_bytes[b"fine_labels"]
    assert isinstance(latin1["batch_label"], str) and isinstance(as_bytes[b"batch_label"], bytes)
    assert [s.encode() for s in latin1["filenames"]] == as_bytes[b"filenames"]


def test_meta_loads_under_both_encodings(tiny_cifar100):
    path = tiny_cifar100 / "cifar-100-python" / "meta"
    with open(path, "rb") as f:
        latin1 = pickle.load(f, encoding="latin1")
    with open(path, "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    assert latin1["fine_label_names"] == FINE_LABEL_NAMES
    assert as_bytes[b"fine_label_names"] == [s.encode() for s in FINE_LABEL_NAMES]
    assert len(latin1["coarse_label_names"]) == 20


def test_torchvision_rejects_generated_files_only_for_their_md5(tiny_cifar100, monkeypatch):
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        datasets.CIFAR100(tiny_cifar100, train=True, download=False)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    assert len(datasets.CIFAR100(tiny_cifar100, train=True, download=False)) == N_TRAIN


@pytest.mark.parametrize("train", [True, False])
def test_load_cifar100_matches_torchvision(tiny_cifar100, unverified_torchvision, train):
    images, labels = load_cifar100(tiny_cifar100, train=train, download=False, verify=False)
    reference = datasets.CIFAR100(tiny_cifar100, train=train, download=False)
    assert images.dtype == torch.uint8 and images.shape == (len(reference), 3, 32, 32)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), reference.data)
    assert labels.tolist() == reference.targets
    assert load_cifar100_classes(tiny_cifar100, download=False, verify=False) == reference.classes


def test_load_cifar100_accepts_python3_pickles_with_bytes_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": rows, b"fine_labels": [3, 1, 4, 1]}, f, protocol=4)
    images, labels = load_cifar100(tmp_path, train=False, download=False, verify=False)
    assert torch.equal(images, torch.from_numpy(rows.reshape(4, 3, 32, 32)))
    assert labels.tolist() == [3, 1, 4, 1]


def test_unpickling_refuses_foreign_globals(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    # A pickle that would call os.getcwd() on load.
    (folder / "test").write_bytes(b"\x80\x02cos\ngetcwd\n)R.")
    with pytest.raises(DatasetIntegrityError, match="os.getcwd.*refusing") as info:
        load_cifar100(tmp_path, train=False, download=False, verify=False)
    assert "delete" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Verification and missing data
# ---------------------------------------------------------------------------------------------


def test_verify_reports_md5_mismatch_with_file_and_fix(tiny_cifar100):
    actual = written_md5s(tiny_cifar100)["train"]
    with pytest.raises(DatasetIntegrityError) as info:
        load_cifar100(tiny_cifar100, train=True, download=False)
    message = str(info.value)
    assert str(tiny_cifar100 / "cifar-100-python" / "train") in message
    assert actual in message and data.CIFAR100_FILE_MD5["train"] in message
    assert "--no_verify_data" in message and "download again" in message


def test_published_checksums_come_from_torchvision():
    assert data.CIFAR100_URL == datasets.CIFAR100.url
    assert data.CIFAR100_ARCHIVE_MD5 == datasets.CIFAR100.tgz_md5
    assert data.CIFAR100_FILE_MD5 == {
        "train": datasets.CIFAR100.train_list[0][1],
        "test": datasets.CIFAR100.test_list[0][1],
        "meta": datasets.CIFAR100.meta["md5"],
    }


def _assert_helpful_not_found(message: str, root: Path) -> None:
    assert str(root / "cifar-100-python" / "train") in message
    assert "cifar-100-python.tar.gz" in message and "--data_path" in message


def test_missing_data_without_network_raises_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar100(tmp_path, train=True)
    assert isinstance(info.value, FileNotFoundError)
    _assert_helpful_not_found(str(info.value), tmp_path)
    assert data.CIFAR100_URL in str(info.value) and "name resolution" in str(info.value)


def test_missing_data_with_download_disabled(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar100(tmp_path, train=True, download=False)
    _assert_helpful_not_found(str(info.value), tmp_path)


class _NotFoundHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_download_through_torchvision_from_loopback_404(tmp_path, monkeypatch):
    """Runs torchvision's real downloader against a local server that has no archive."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFoundHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/cifar-100-python.tar.gz"
        monkeypatch.setattr(data, "CIFAR100_URL", url)
        with pytest.raises(DatasetNotFoundError) as info:
            load_cifar100(tmp_path, train=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    # The chained HTTPError holds the 404 response open until collected.
    cause = info.value.__cause__
    assert isinstance(cause, urllib.error.HTTPError)
    cause.close()
    assert url in str(info.value) and "404" in str(info.value)
    assert str(tmp_path / "cifar-100-python" / "test") in str(info.value)


def test_download_uses_torchvision_url_and_archive_md5(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        write_fake_cifar100(download_root, n_train=10, n_test=10)

    monkeypatch.setattr(data, "download_and_extract_archive", fake_download)
    images, _ = load_cifar100(tmp_path, train=True, verify=False)
    assert calls == [(datasets.CIFAR100.url, datasets.CIFAR100.filename, datasets.CIFAR100.tgz_md5)]
    assert images.shape == (10, 3, 32, 32)
    load_cifar100(tmp_path, train=True, verify=False)
    assert len(calls) == 1, "files already present must not be downloaded again"


# ---------------------------------------------------------------------------------------------
# TensorLoader versus torchvision
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_split(tiny_cifar100):
    return load_cifar100(tiny_cifar100, train=True, download=False, verify=False)


@pytest.fixture(scope="module")
def test_split(tiny_cifar100):
    return load_cifar100(tiny_cifar100, train=False, download=False, verify=False)


def test_eval_batches_equal_torchvision_to_tensor_normalize(tiny_cifar100, test_split):
    ours = list(TensorLoader(*test_split, batch_size=64, train=False))
    theirs = list(
        build_torchvision_loader(tiny_cifar100, train=False, batch_size=64, num_workers=0, seed=0, verify=False)
    )
    assert len(ours) == len(theirs) == math.ceil(N_TEST / 64)
    for (x, y), (x_ref, y_ref) in zip(ours, theirs):
        assert x.dtype == torch.float32 and x.shape == x_ref.shape
        torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)
        assert torch.equal(y, y_ref)


def test_normalisation_constants():
    assert CIFAR100_MEAN == (0.5071, 0.4867, 0.4408)
    assert CIFAR100_STD == (0.2675, 0.2565, 0.2761)


def _marked_image() -> torch.Tensor:
    """Every pixel non-zero and locating itself: R = 100 + row, G = 100 + column."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([100 + rows, 100 + cols, torch.full_like(rows, 200)]).to(torch.uint8)


def _all_crops(image: torch.Tensor) -> torch.Tensor:
    """All 81 offsets x 2 flips of the zero-padded image, indexed (row * 9 + col) * 2 + flip."""
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image
    crops = []
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            crops += [crop, crop.flip(-1)]
    return torch.stack(crops)


def _crop_codes(outputs: torch.Tensor) -> torch.Tensor:
    """Recover (offset, flip) of each augmented marked image from its always-in-bounds centre."""
    centre = outputs[:, :, 16, 16].long()
    flip = (outputs[:, 1, 16, 17].long() - centre[:, 1]) < 0
    dy = centre[:, 0] - 112
    dx = torch.where(flip, centre[:, 1] - 111, centre[:, 1] - 112)
    return (dy * 9 + dx) * 2 + flip.long()


def _chi_square_bounds(df: int, z: float = 3.29) -> tuple[float, float]:
    # Wilson-Hilferty approximation of the chi-square quantiles at about p = 5e-4 in each tail.
    def quantile(zz):
        return df * (1 - 2 / (9 * df) + zz * math.sqrt(2 / (9 * df))) ** 3

    return quantile(-z), quantile(z)


def _check_uniform_exact_crops(outputs: torch.Tensor, image: torch.Tensor) -> None:
    codes = _crop_codes(outputs)
    assert codes.min() >= 0 and codes.max() < 162
    # Each output is exactly the crop/flip its centre pixel claims, zero padding included.
    assert torch.equal(outputs, _all_crops(image)[codes])
    counts = torch.bincount(codes, minlength=162).double()
    expected = len(outputs) / 162
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    low, high = _chi_square_bounds(161)
    assert low < chi2 < high, f"chi-square {chi2:.1f} outside ({low:.1f}, {high:.1f})"


DRAWS = 162 * 40


def test_tensor_loader_crop_flip_distribution_matches_torchvision():
    image = _marked_image()
    loader = TensorLoader(
        image.expand(DRAWS, -1, -1, -1).contiguous(), torch.arange(DRAWS), batch_size=1024, train=True, seed=3
    )
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    ours = torch.cat([((x * std + mean) * 255).round().to(torch.uint8) for x, _ in loader])
    assert ours.shape == (DRAWS, 3, 32, 32)
    _check_uniform_exact_crops(ours, image)

    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = torch.stack([augment(pil) for _ in range(DRAWS)])
    _check_uniform_exact_crops(theirs, image)


# ---------------------------------------------------------------------------------------------
# TensorLoader randomness, sharding, layout
# ---------------------------------------------------------------------------------------------


def _epoch(loader: TensorLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))


def test_same_seed_and_epoch_replay_identical_batches(train_split):
    first = TensorLoader(*train_split, batch_size=128, train=True, seed=7)
    history = [_epoch(first, e) for e in range(3)]
    resumed = TensorLoader(*train_split, batch_size=128, train=True, seed=7)
    assert _same(_epoch(resumed, 2), history[2])
    assert _same(_epoch(first, 1), history[1])
    assert not torch.equal(history[0][0][1], history[1][0][1]), "epochs must shuffle differently"
    assert not torch.equal(history[0][0][0], history[1][0][0])
    other_seed = TensorLoader(*train_split, batch_size=128, train=True, seed=8)
    assert not torch.equal(_epoch(other_seed, 0)[0][1], history[0][0][1])


def test_eval_loader_is_ordered_and_unaugmented(test_split):
    images, labels = test_split
    loader = TensorLoader(images, labels, batch_size=64, train=False, seed=1)
    a, b = _epoch(loader, 0), _epoch(loader, 5)
    assert _same(a, b)
    assert torch.equal(torch.cat([y for _, y in a]), labels)


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_counts_batches(train_split, drop_last):
    loader = TensorLoader(*train_split, batch_size=96, train=True, drop_last=drop_last)
    batches = list(loader)
    assert len(batches) == len(loader) == (N_TRAIN // 96 if drop_last else math.ceil(N_TRAIN / 96))
    assert all(len(y) == 96 for _, y in batches[: N_TRAIN // 96])


def test_train_shards_are_disjoint_strides_of_one_padded_permutation(train_split):
    images, _ = train_split
    index_labels = torch.arange(N_TRAIN)
    world_size = 3
    single = torch.cat([y for _, y in _epoch(TensorLoader(images, index_labels, 50, train=True, seed=4), 2)])
    shards = []
    for rank in range(world_size):
        loader = TensorLoader(images, index_labels, 50, train=True, seed=4, rank=rank, world_size=world_size)
        assert len(loader) == math.ceil(math.ceil(N_TRAIN / world_size) / 50)
        shards.append(torch.cat([y for _, y in _epoch(loader, 2)]))
    assert len({len(s) for s in shards}) == 1
    order = torch.stack(shards, dim=1).flatten()
    padding = len(order) - N_TRAIN
    assert torch.equal(order[:N_TRAIN], single), "ranks must interleave the single-process permutation"
    assert torch.equal(order[N_TRAIN:], single[:padding])


def test_augmentation_does_not_depend_on_world_size(train_split):
    images, _ = train_split
    index_labels = torch.arange(N_TRAIN)

    def by_sample(world_size):
        xs, ys = [], []
        for rank in range(world_size):
            loader = TensorLoader(images, index_labels, 64, train=True, seed=5, rank=rank, world_size=world_size)
            for x, y in _epoch(loader, 1):
                xs.append(x)
                ys.append(y)
        return torch.cat(xs)[torch.cat(ys).argsort()]

    assert torch.equal(by_sample(1), by_sample(2))


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_eval_shards_cover_every_sample_exactly_once(test_split, world_size):
    images, _ = test_split
    index_labels = torch.arange(N_TEST)
    seen = []
    for rank in range(world_size):
        loader = TensorLoader(images, index_labels, 16, train=False, rank=rank, world_size=world_size)
        shard = torch.cat([y for _, y in loader])
        assert torch.equal(shard, torch.arange(rank, N_TEST, world_size))
        assert loader.num_samples == len(shard)
        seen.append(shard)
    assert torch.equal(torch.cat(seen).sort().values, index_labels)


def test_eval_refuses_drop_last(test_split):
    with pytest.raises(ValueError, match="drop_last"):
        TensorLoader(*test_split, batch_size=16, train=False, drop_last=True)


def test_torchvision_loader_shards_match(tiny_cifar100):
    seen = []
    for rank in range(3):
        loader = build_torchvision_loader(
            tiny_cifar100, False, 16, 0, 0, verify=False, rank=rank, world_size=3
        )
        seen += list(loader.sampler)
    assert sorted(seen) == list(range(N_TEST))
    train = build_torchvision_loader(tiny_cifar100, True, 16, 2, 0, verify=False, rank=1, world_size=2)
    assert isinstance(train.sampler, torch.utils.data.DistributedSampler)
    assert train.persistent_workers and len(train.sampler) == N_TRAIN // 2


def test_torchvision_train_loader_is_seeded(tiny_cifar100):
    # Two workers: with num_workers=0 the transforms draw from the global torch RNG instead.
    def first_batch(seed):
        loader = build_torchvision_loader(tiny_cifar100, True, 32, 2, seed, verify=False)
        return next(iter(loader))

    x1, y1 = first_batch(11)
    x2, y2 = first_batch(11)
    assert x1.shape == (32, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first_batch(12)[1], y1)


def test_channels_last(train_split):
    kwargs = dict(batch_size=64, train=True, seed=2)
    dense = _epoch(TensorLoader(*train_split, **kwargs), 0)
    nhwc = _epoch(TensorLoader(*train_split, channels_last=True, **kwargs), 0)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in nhwc)
    assert _same(dense, nhwc)


def test_generated_images_depend_on_class(test_split):
    images, labels = test_split
    means = images.float().mean(dim=(2, 3))
    same = (means[labels == labels[0]] - means[0]).abs().max()
    different = (means[labels != labels[0]] - means[0]).abs().max()
    assert same < different
