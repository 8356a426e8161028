"""imagenet/data.py: the ImageFolder layout with clear errors, --subset, loaders that cover validation exactly once,
augmentation that depends only on (seed, epoch, index), and both decoders."""
import os

import pytest
import torch

from imagenet.data import (
    DatasetLayoutError,
    ImageList,
    build_loaders,
    check_layout,
    list_images,
    to_model_input,
    train_transform,
    val_transform,
)
from imagenet_fixtures import WNIDS, write_fake_imagenet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_imagenet(tmp_path_factory.mktemp("imagenet"), classes=4, train_per_class=6, val_per_class=3)


def loaders(data, **kw):
    settings = dict(batch_size=4, val_batch_size=5, num_workers=0, decoder="torchvision", subset=None,
                    train_crop_size=32, val_resize_size=36, val_crop_size=32, seed=0)
    return build_loaders(data, list(WNIDS[:4]), **{**settings, **kw})


def test_layout_gives_the_sorted_class_folders(data):
    assert check_layout(data, 4) == sorted(WNIDS[:4])


def test_flat_validation_folder_says_how_to_sort_it(tmp_path):
    root = write_fake_imagenet(tmp_path, classes=2, train_per_class=1, val_per_class=2)
    for folder in (root / "val").iterdir():  # the raw ILSVRC2012_img_val.tar: every image directly in val/
        for image in folder.iterdir():
            image.rename(root / "val" / image.name)
        folder.rmdir()
    with pytest.raises(DatasetLayoutError) as err:
        check_layout(root, 2)
    message = str(err.value)
    assert "directly" in message and "ILSVRC2012_devkit_t12.tar.gz" in message and "split='val'" in message


@pytest.mark.parametrize("damage,expected", [
    (lambda root: os.rename(root / "val", root / "validation"), "val does not exist"),
    (lambda root: os.rename(root / "val" / WNIDS[1], root / "val" / "n99999999"), "different class folders"),
    (lambda root: None, "--num_classes 1000"),
])
def test_bad_layouts_name_the_problem(tmp_path, damage, expected):
    root = write_fake_imagenet(tmp_path, classes=2, train_per_class=1, val_per_class=1)
    damage(root)
    with pytest.raises(DatasetLayoutError, match=expected):
        check_layout(root, 1000 if "num_classes" in expected else 2)


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        check_layout(tmp_path / "nowhere", 1000)


def test_subset_takes_the_first_n_images_of_each_class(data):
    samples = list_images(data / "train", list(WNIDS[:4]), subset=2)
    assert len(samples) == 8 and [label for _, label in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [os.path.basename(p) for p, _ in samples[:2]] == [f"{WNIDS[0]}_0.JPEG", f"{WNIDS[0]}_1.JPEG"]


def test_validation_shards_cover_every_image_exactly_once(data):
    seen = []
    for rank in range(3):
        _, val = loaders(data, rank=rank, world_size=3)
        seen += list(val.sampler)
    assert sorted(seen) == list(range(12))


def test_loaders_yield_uint8_crops_and_drop_the_last_short_batch(data):
    train, val = loaders(data)
    images, labels = next(iter(train))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert len(train) == 24 // 4 and sum(len(y) for _, y in val) == 12


def test_augmentation_depends_on_seed_epoch_and_index_only(data):
    samples = list_images(data / "train", list(WNIDS[:4]))
    dataset = ImageList(samples, train_transform(32, "torchvision"), "torchvision", seed=0)
    torch.manual_seed(123)
    a = dataset[(5, 3)][0]
    torch.manual_seed(456)  # the process RNG does not matter ...
    assert torch.equal(a, dataset[(5, 3)][0])
    assert not torch.equal(a, dataset[(5, 4)][0])  # ... the epoch does
    state = torch.get_rng_state()
    dataset[(1, 0)]
    assert torch.equal(state, torch.get_rng_state())  # and the training process's RNG is left alone


def test_both_decoders_give_nearly_the_same_validation_pixels(data):
    samples = list_images(data / "val", list(WNIDS[:4]))
    pil = ImageList(samples, val_transform(36, 32, "pil"), "pil")[0][0].float()
    tv = ImageList(samples, val_transform(36, 32, "torchvision"), "torchvision")[0][0].float()
    assert pil.shape == tv.shape == (3, 32, 32)
    assert (pil - tv).abs().mean() < 3  # libjpeg versions and resize rounding differ by a few levels


def test_model_input_is_normalised_float(data):
    images = torch.full((2, 3, 4, 4), 124, dtype=torch.uint8)
    x = to_model_input(images, torch.device("cpu"), channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert abs(x[0, 0, 0, 0].item() - (124 / 255 - 0.485) / 0.229) < 1e-5


def test_a_worker_process_draws_the_same_crops_as_the_main_process(data):
    batches = []
    for workers in (0, 1):
        train, _ = loaders(data, num_workers=workers)
        train.sampler.set_epoch(1)
        batches.append(list(train))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches))
