"""Loading, splitting, batching and augmenting datasets (CPU, no downloads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_datasets import write_fake_dataset, write_image_folder

from sofim_tune import data
from sofim_tune.data import (
    AUGMENT_MODES,
    DATASETS,
    DatasetInfo,
    StreamedSplit,
    TensorSplit,
    crop_flip,
    data_from_tensors,
    dataset_info_for,
    default_data_dir,
    load_data,
)
from sofim_tune.errors import UserInputError

TORCHVISION_DATASETS = ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"]


def rows(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, bytes]]:
    """Samples as a sorted list of (label, pixel bytes): compares splits as multisets."""
    return sorted((int(y), x.cpu().numpy().tobytes()) for x, y in zip(images, labels))


def epoch(split, batch_size: int = 7, *, shuffle: bool = False, augment: bool | str = False, seed: int | None = None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batches = list(split.batches(batch_size, shuffle=shuffle, augment=augment, generator=generator))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), [len(y) for _, y in batches]


def to_pixels(x: torch.Tensor, split) -> torch.Tensor:
    """Undo the normalisation of a batch: uint8 pixels again."""
    return (x * split.std.view(1, -1, 1, 1) + split.mean.view(1, -1, 1, 1)).mul(255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", with_test=True)


def test_digits_shapes_and_sizes(digits):
    assert digits.info == DATASETS["digits"]
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1294, 144, 359)
    x, y = next(digits.train.batches(64, shuffle=True, augment=False, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(epoch(digits.train)[1].tolist()) == set(range(10))


def test_digits_splits_are_disjoint_and_cover_the_dataset(digits):
    from sklearn.datasets import load_digits

    parts = [digits.train, digits.val, digits.test]
    seen = [x.numpy().tobytes() for part in parts for x in part.images]
    assert len(seen) == len(set(seen)) == 1797
    expected = torch.from_numpy(np.rint(load_digits().images * (255 / 16))).to(torch.uint8).unsqueeze(1)
    all_images = torch.cat([part.images for part in parts])
    all_labels = torch.cat([part.labels for part in parts])
    assert rows(all_images, all_labels) == rows(expected, torch.from_numpy(load_digits().target))


def test_digits_loads_without_importing_scikit_learn():
    # Importing scikit-learn costs more than a second of every study's start; the data file is enough.
    code = "import sys; from sofim_tune.data import load_data; d = load_data('digits'); print(len(d.train), 'sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1294", "False"]


def test_digits_from_scikit_learns_own_loader_when_its_folder_has_no_data_file(monkeypatch):
    # An editable scikit-learn keeps its data files out of its package folder.
    from_file = data._digits_pools()
    monkeypatch.setattr(data, "_digits_file", lambda: None)
    from_loader = data._digits_pools()
    for a, b in zip(from_file, from_loader):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_digits_without_scikit_learn_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match="scikit-learn, which is not installed; pip install scikit-learn"):
        data._digits_pools()


def test_digits_val_follows_split_seed_but_test_is_fixed(digits):
    same = load_data("digits", with_test=True, split_seed=0)
    other = load_data("digits", with_test=True, split_seed=1)
    assert torch.equal(same.val.images, digits.val.images)
    assert not torch.equal(other.val.images, digits.val.images)
    assert torch.equal(other.test.images, digits.test.images) and torch.equal(other.test.labels, digits.test.labels)


def test_test_split_only_on_request():
    assert load_data("digits").test is None


def test_val_fraction_sets_the_validation_size():
    loaded = load_data("digits", val_fraction=0.25)
    assert len(loaded.val) == round(0.25 * 1438) and len(loaded.train) + len(loaded.val) == 1438


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_out_of_range(fraction):
    with pytest.raises(UserInputError, match="val_fraction"):
        load_data("digits", val_fraction=fraction)


def test_normalisation_uses_train_statistics(digits):
    x, _, _ = epoch(digits.train, 500)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    assert torch.equal(digits.val.mean, digits.train.mean) and torch.equal(digits.test.std, digits.train.std)
    expected = digits.train.images.double() / 255
    assert torch.allclose(digits.train.mean.double(), expected.mean().view(1), atol=1e-6)
    assert torch.allclose(digits.train.std.double(), expected.std(unbiased=False).view(1), atol=1e-6)
    assert torch.equal(to_pixels(epoch(digits.val)[0], digits.val), digits.val.images)


# ----------------------------------------------------------------------------- batching


def test_shuffled_epoch_covers_every_sample_once(digits):
    x, y, sizes = epoch(digits.val, 10, shuffle=True, seed=3)
    assert sizes == [10] * 14 + [4]  # the last, partial batch is kept
    assert rows(to_pixels(x, digits.val), y) == rows(digits.val.images, digits.val.labels)
    assert not torch.equal(y, digits.val.labels)  # shuffled, not stored order


def test_same_seed_same_batches(digits):
    first, again, other = (epoch(digits.train, 32, shuffle=True, seed=s) for s in (5, 5, 6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_global_rng_when_no_generator(digits):
    torch.manual_seed(11)
    first = epoch(digits.val, 16, shuffle=True)
    torch.manual_seed(11)
    assert torch.equal(first[1], epoch(digits.val, 16, shuffle=True)[1])


def test_bad_batch_size(digits):
    with pytest.raises(UserInputError, match="batch size"):
        next(digits.val.batches(0, shuffle=False, augment=False))


def test_augmentation_ignored_when_dataset_disallows_it(digits):
    assert digits.train.augment == "none" and not digits.train.augmentable
    assert torch.equal(epoch(digits.val, augment=True, seed=1)[0], epoch(digits.val)[0])


# ----------------------------------------------------------------------------- augmentation


def test_crop_flip_matches_padding_then_cropping():
    x = torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 8, 4, 2, 4, 7]), torch.tensor([8, 0, 4, 5, 4, 1])
    flip = torch.tensor([False, True, False, True, True, False])
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    out = crop_flip(x, dy, dx, flip)
    for i in range(6):
        window = padded[i, :, dy[i] : dy[i] + 10, dx[i] : dx[i] + 12]
        assert torch.equal(out[i], window.flip(-1) if flip[i] else window)
    assert torch.equal(out[2], x[2]) and torch.equal(out[4], x[4].flip(-1))  # centre offset: identity, mirror


def test_augmented_batches_are_crops_and_flips_of_the_originals(tmp_path, monkeypatch):
    write_fake_dataset("cifar10", tmp_path, monkeypatch)
    train = load_data("cifar10", data_dir=tmp_path).train
    assert train.augment == "crop-flip"
    augmented, labels, sizes = epoch(train, 5, augment=True, seed=0)
    assert augmented.shape == (len(train), 3, 32, 32) and sizes == [5, 5, 5, 3]
    assert torch.equal(labels, train.labels)
    augmented = to_pixels(augmented, train)
    padded = F.pad(train.images.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    flips = 0
    for i, image in enumerate(augmented):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)  # 9×9 crops, C×32×32 each
        plain = (windows == image).flatten(2).all(-1)
        mirrored = (windows.flip(-1) == image).flatten(2).all(-1)
        assert plain.any() or mirrored.any(), f"sample {i} is not a crop or a flipped crop"
        flips += int(mirrored.any() and not plain.any())
    assert 0 < flips < len(train)  # flips happen, but not always
    assert not torch.equal(augmented, train.images)


# ----------------------------------------------------------------------------- augmentation modes


def hand_made_split(count: int = 64) -> TensorSplit:
    """``count`` copies of one asymmetric 6×6 image whose 36 pixels all differ, normalised by
    statistics of their own so that batches map back to pixels exactly."""
    image = (torch.arange(36, dtype=torch.uint8) * 7).view(1, 1, 6, 6)
    info = DatasetInfo("hand-made", 2, 1, 6, "mlp")
    images = image.expand(count, 1, 6, 6).contiguous()
    return data_from_tensors(info, images, torch.zeros(count, dtype=torch.int64), images, torch.zeros(count, dtype=torch.int64)).train


def crops(image: torch.Tensor) -> list[torch.Tensor]:
    """The 81 windows of the 4-pixel reflect-padded C×H×W image: every shift a crop can give."""
    padded = F.pad(image[None].float(), (4, 4, 4, 4), mode="reflect")[0].to(image.dtype)
    h, w = image.shape[-2:]
    return [padded[:, dy : dy + h, dx : dx + w] for dy in range(9) for dx in range(9)]


def augmented(split: TensorSplit, mode: str) -> torch.Tensor:
    return to_pixels(epoch(split, 16, augment=mode, seed=0)[0], split)


def is_one_of(image: torch.Tensor, candidates: list[torch.Tensor]) -> bool:
    return any(torch.equal(image, candidate) for candidate in candidates)


def test_augment_none_returns_the_images_unchanged():
    split = hand_made_split()
    assert torch.equal(augmented(split, "none"), split.images)


def test_augment_flip_mirrors_some_images_and_never_shifts():
    split = hand_made_split()
    image = split.images[0]
    out = augmented(split, "flip")
    assert all(is_one_of(x, [image, image.flip(-1)]) for x in out)
    mirrored = sum(torch.equal(x, image.flip(-1)) for x in out)
    assert 0 < mirrored < len(out)


def test_augment_crop_shifts_and_never_mirrors():
    split = hand_made_split()
    image = split.images[0]
    out = augmented(split, "crop")
    windows = crops(image)
    assert all(is_one_of(x, windows) for x in out), "a crop output is not a shift of the padded image"
    assert not any(torch.equal(x, image.flip(-1)) for x in out)
    assert len({x.numpy().tobytes() for x in out}) > 10  # many different shifts


def test_augment_crop_flip_does_both():
    split = hand_made_split()
    image = split.images[0]
    out = augmented(split, "crop-flip")
    windows = crops(image)
    assert all(is_one_of(x, windows + [w.flip(-1) for w in windows]) for x in out)
    assert any(not is_one_of(x, windows) for x in out), "no image was mirrored"


def test_augment_true_means_the_dataset_default_and_a_mode_overrides_it(digits):
    assert torch.equal(epoch(digits.val, augment=True, seed=1)[0], epoch(digits.val)[0])  # digits: "none"
    assert not torch.equal(epoch(digits.val, augment="crop", seed=1)[0], epoch(digits.val)[0])


@pytest.mark.parametrize("bad", ["mirror", "Crop", "", None, 1])
def test_bad_augment_value_lists_the_choices(bad, digits):
    with pytest.raises(UserInputError, match="none, crop, flip, crop-flip"):
        next(digits.val.batches(8, shuffle=False, augment=bad))


def test_dataset_info_takes_a_mode_or_the_old_switch():
    assert DatasetInfo("x", 2, 3, 32, "cnn", augment=True).augment == "crop-flip"
    assert DatasetInfo("x", 2, 3, 32, "cnn", augment=False).augment == "none"
    assert DatasetInfo("x", 2, 3, 32, "cnn").preprocessing == "RGB, native 32x32, no resize"
    with pytest.raises(UserInputError, match="unknown augmentation 'rotate'"):
        DatasetInfo("x", 2, 3, 32, "cnn", augment="rotate")


@pytest.mark.parametrize(
    "name, mode", [("digits", "none"), ("mnist", "none"), ("fashion-mnist", "none"), ("svhn", "crop"), ("cifar10", "crop-flip"), ("cifar100", "crop-flip")]
)
def test_registry_default_augmentations(name, mode):
    assert DATASETS[name].augment == mode and mode in AUGMENT_MODES


@pytest.mark.parametrize("name", ["svhn", "mnist", "fashion-mnist"])
def test_digits_and_letters_are_never_flipped(name, tmp_path, monkeypatch):
    assert "flip" not in DATASETS[name].augment
    write_fake_dataset(name, tmp_path, monkeypatch)
    train = load_data(name, data_dir=tmp_path).train
    out = to_pixels(epoch(train, 5, augment=True, seed=0)[0], train)
    for image, original in zip(out, train.images):
        assert is_one_of(image, crops(original)), "a training image was mirrored"


# ----------------------------------------------------------------------------- torchvision datasets


@pytest.mark.parametrize("name", TORCHVISION_DATASETS)
def test_torchvision_dataset_round_trip(name, tmp_path, monkeypatch):
    fake = write_fake_dataset(name, tmp_path, monkeypatch)
    loaded = load_data(name, data_dir=tmp_path, with_test=True, split_seed=4)
    info = DATASETS[name]
    assert loaded.info == info
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (18, 2, 6)
    for split in (loaded.train, loaded.val, loaded.test):
        assert isinstance(split, TensorSplit) and split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (info.channels, info.image_size, info.image_size)
        x, y = next(split.batches(4, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)))
        assert x.shape == (min(4, len(split)), info.channels, info.image_size, info.image_size) and x.dtype == torch.float32
        assert y.dtype == torch.int64
    train_and_val = rows(torch.cat([loaded.train.images, loaded.val.images]), torch.cat([loaded.train.labels, loaded.val.labels]))
    assert train_and_val == rows(torch.from_numpy(fake.train_images), torch.from_numpy(fake.train_labels))
    # The official test set keeps its order: a pixel-exact, label-exact round trip.
    assert torch.equal(loaded.test.images, torch.from_numpy(fake.test_images))
    assert torch.equal(loaded.test.labels, torch.from_numpy(fake.test_labels))


def test_svhn_label_ten_is_digit_zero(tmp_path, monkeypatch):
    import scipy.io

    write_fake_dataset("svhn", tmp_path, monkeypatch)
    stored = scipy.io.loadmat(tmp_path / "test_32x32.mat")["y"][:, 0]
    assert 10 in stored and 0 not in stored
    loaded = load_data("svhn", data_dir=tmp_path, with_test=True)
    assert torch.equal(loaded.test.labels, torch.from_numpy(stored.astype(np.int64) % 10))


@pytest.mark.parametrize("name", TORCHVISION_DATASETS)
def test_missing_files_say_how_to_download(name, tmp_path):
    with pytest.raises(UserInputError) as raised:
        load_data(name, data_dir=tmp_path, download=False)  # nothing is fetched: the message says how
    message = str(raised.value)
    assert "\n" not in message and "--download" in message and str(tmp_path) in message
    assert "run the same command again with --download" in message and "download=True" in message


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFIM_TUNE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("SOFIM_TUNE_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "sofim-tune" / "data"


def test_data_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFIM_TUNE_DATA", str(tmp_path))
    write_fake_dataset("mnist", tmp_path, monkeypatch)
    assert len(load_data("mnist").train) == 18


def test_registry_dataset_rejects_another_image_size():
    assert dataset_info_for("cifar10", 32) == DATASETS["cifar10"]
    with pytest.raises(UserInputError, match="ImageFolder"):
        dataset_info_for("cifar10", 64)


# ----------------------------------------------------------------------------- ImageFolder


def image_rows(written: dict[str, np.ndarray], classes: list[str]) -> list[tuple[int, bytes]]:
    """rows() of PNGs written by write_image_folder, labelled by sorted class name."""
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in written.values()])
    labels = torch.tensor([sorted(classes).index(Path(path).parent.name) for path in written])
    return rows(images, labels)


def test_image_folder_with_train_val_test(tmp_path):
    classes = ["cat", "ant", "dog"]
    train = write_image_folder(tmp_path / "train", classes, 4, seed=0)
    val = write_image_folder(tmp_path / "val", classes, 2, seed=1)
    test = write_image_folder(tmp_path / "test", classes, 1, seed=2)
    loaded = load_data(str(tmp_path), with_test=True, image_size=16)
    assert loaded.info.name == str(tmp_path.resolve())
    assert (loaded.info.num_classes, loaded.info.channels, loaded.info.image_size) == (3, 3, 16)
    assert loaded.info.default_arch == "cnn" and loaded.info.augment == "crop"
    assert loaded.info.preprocessing == "RGB, native 16x16, no resize"
    for split, written in ((loaded.train, train), (loaded.val, val), (loaded.test, test)):
        assert isinstance(split, TensorSplit)
        assert rows(split.images, split.labels) == image_rows(written, classes)
    x, y = next(loaded.train.batches(5, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (5, 3, 16, 16) and y.dtype == torch.int64


def test_image_folder_of_mixed_sizes_and_modes_becomes_rgb_at_the_median_side(tmp_path):
    write_image_folder(tmp_path / "a", ["x"], 1, size=(20, 12))
    from PIL import Image

    Image.new("L", (9, 30), color=77).save(tmp_path / "a" / "x" / "grey.png")
    (tmp_path / "b").mkdir()
    Image.new("RGB", (40, 40), color=(10, 20, 30)).save(tmp_path / "b" / "flat.jpg", quality=100)
    loaded = load_data(str(tmp_path), val_fraction=0.3)
    images = torch.cat([loaded.train.images, loaded.val.images])
    # Sides 9, 12, 20, 30, 40, 40: the lower median is 20.
    assert images.shape == (3, 3, 20, 20)
    assert any(bool((image == 77).all()) for image in images)  # the grey image, in all three channels
    assert loaded.info.image_size == 20 and loaded.info.num_classes == 2 and loaded.info.channels == 3
    assert loaded.info.preprocessing == "RGB (mixed modes: L, RGB), resized to 20x20 (sizes differ: 3 sizes, 20x12 to 40x40; median side 20)"


def test_single_image_folder_is_split_by_seed(tmp_path):
    written = write_image_folder(tmp_path, ["a", "b"], 10)
    first = load_data(str(tmp_path), image_size=16, split_seed=0)
    again = load_data(str(tmp_path), image_size=16, split_seed=0)
    other = load_data(str(tmp_path), image_size=16, split_seed=1)
    assert (len(first.train), len(first.val)) == (18, 2)
    assert rows(torch.cat([first.train.images, first.val.images]), torch.cat([first.train.labels, first.val.labels])) == image_rows(
        written, ["a", "b"]
    )
    assert torch.equal(first.val.images, again.val.images)
    assert not torch.equal(first.val.images, other.val.images)


def test_train_folder_without_val_holds_out_validation(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], 5)
    loaded = load_data(str(tmp_path), image_size=16, val_fraction=0.2)
    assert (len(loaded.train), len(loaded.val)) == (8, 2)
    with pytest.raises(UserInputError, match="test/"):
        load_data(str(tmp_path), image_size=16, with_test=True)


def test_dataset_info_for_folder_reads_headers_only(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b", "c"], 1)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    info = dataset_info_for(str(tmp_path), image_size=24)
    assert (info.num_classes, info.channels, info.image_size, info.default_arch, info.augment) == (3, 3, 24, "cnn", "crop")
    assert info.preprocessing == "RGB, resized to 24x24 (image size asked for; images are 16x16)"
    native = dataset_info_for(str(tmp_path))
    assert native.image_size == 16 and native.preprocessing == "RGB, native 16x16, no resize"


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserInputError, match=match) as raised:
        load_data(*args, **kwargs)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_folder_errors(tmp_path):
    one_line_error("neither a dataset name", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    one_line_error("no class folders", str(tmp_path / "empty"))
    write_image_folder(tmp_path / "no_images", ["a"], 1)
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    (tmp_path / "no_images" / "cls" / "notes.txt").write_text("hi")
    one_line_error("no images", str(tmp_path / "no_images"))
    write_image_folder(tmp_path / "mismatch" / "train", ["a", "b"], 2)
    write_image_folder(tmp_path / "mismatch" / "val", ["a", "c"], 1)
    one_line_error("must match", str(tmp_path / "mismatch"))
    one_line_error("at least 8", str(tmp_path / "mismatch"), image_size=4)


def test_a_folder_of_one_class_is_refused(tmp_path):
    write_image_folder(tmp_path / "flat", ["only"], 4)
    one_line_error("at least 2 classes", str(tmp_path / "flat"))
    write_image_folder(tmp_path / "split" / "train", ["only"], 4)
    write_image_folder(tmp_path / "split" / "val", ["only"], 2)
    one_line_error("at least 2 classes", str(tmp_path / "split"))


def test_a_symlink_back_up_the_folder_is_refused_before_it_multiplies_the_images(tmp_path):
    write_image_folder(tmp_path / "loop", ["a", "b"], 12, size=(8, 8))
    (tmp_path / "loop" / "a" / "up").symlink_to("..")
    message = one_line_error("symbolic link", str(tmp_path / "loop"))
    assert str(tmp_path / "loop" / "a" / "up") in message


def test_a_symlink_to_another_class_folder_is_refused(tmp_path):
    write_image_folder(tmp_path / "twice", ["a", "b"], 3, size=(8, 8))
    (tmp_path / "twice" / "a" / "more").symlink_to(tmp_path / "twice" / "b", target_is_directory=True)
    one_line_error("reached twice through a symbolic link", str(tmp_path / "twice"))


def test_class_folders_linked_from_outside_the_dataset_are_followed(tmp_path):
    store = write_image_folder(tmp_path / "store", ["a", "b"], 3, size=(8, 8))
    (tmp_path / "linked").mkdir()
    for name in ("a", "b"):
        (tmp_path / "linked" / name).symlink_to(tmp_path / "store" / name, target_is_directory=True)
    loaded = load_data(str(tmp_path / "linked"), val_fraction=0.3)
    assert len(loaded.train) + len(loaded.val) == len(store) == 6 and loaded.info.num_classes == 2


def test_image_size_is_bounded(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], 1, size=(8, 8))
    for size in (data.MAX_IMAGE_SIZE + 1, 100_000):
        one_line_error(f"at most {data.MAX_IMAGE_SIZE} pixels, got {size}", str(tmp_path), image_size=size)
        with pytest.raises(UserInputError, match=f"at most {data.MAX_IMAGE_SIZE}"):
            dataset_info_for(str(tmp_path), size)
    assert dataset_info_for(str(tmp_path), data.MAX_IMAGE_SIZE).image_size == data.MAX_IMAGE_SIZE


def test_folder_memory_counts_the_images_the_decoding_and_a_float_batch():
    # 10 RGB images of 100x100 kept in memory: twice their bytes while joined, one decoded
    # batch (no DataLoader worker below 512 images) and that batch as uint8 and float32.
    image = 3 * 100 * 100
    assert data.folder_memory(10, 3, 100, resident=True) == 2 * 10 * image + 10 * image + 5 * 10 * image
    assert data.folder_memory(10, 3, 100, resident=False) == 10 * image + 5 * 10 * image
    many = 10_000
    workers = data._LOADER_WORKERS
    assert data.folder_memory(many, 1, 8, resident=False) == (2 * workers + 1) * 256 * 64 + 5 * 256 * 64


def test_a_folder_larger_than_the_memory_streams_or_is_refused(tmp_path, monkeypatch):
    write_image_folder(tmp_path, ["a", "b"], 5, size=(16, 16))
    resident = data.folder_memory(10, 3, 16, resident=True)
    streamed = data.folder_memory(10, 3, 16, resident=False)
    monkeypatch.setattr(data, "allocatable_memory", lambda: resident)
    assert isinstance(load_data(str(tmp_path)).train, TensorSplit)
    monkeypatch.setattr(data, "allocatable_memory", lambda: resident - 1)
    assert isinstance(load_data(str(tmp_path)).train, StreamedSplit)
    monkeypatch.setattr(data, "allocatable_memory", lambda: streamed - 1)
    message = one_line_error("more than the", str(tmp_path))
    assert "16x16" in message and "10 images of 3 channels" in message and "--image-size" in message


def test_corrupt_image_is_named(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], 3)
    broken = tmp_path / "b" / "9.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert str(broken) in one_line_error("cannot decode image", str(tmp_path))


# ----------------------------------------------------------------------------- ImageFolder: channels and sizes


@pytest.mark.parametrize("mode, modes_text", [("L", "grayscale"), ("P", "grayscale (modes P)")])
def test_grayscale_folder_stays_one_channel_at_its_native_size(mode, modes_text, tmp_path):
    classes = ["2", "3", "7"]
    train = write_image_folder(tmp_path / "train", classes, 4, size=(28, 28), mode=mode)
    val = write_image_folder(tmp_path / "val", classes, 2, size=(28, 28), seed=1, mode=mode)
    loaded = load_data(str(tmp_path))
    assert (loaded.info.channels, loaded.info.image_size) == (1, 28)
    assert loaded.info.preprocessing == f"{modes_text}, native 28x28, no resize"
    assert loaded.info.augment == "crop"
    for split, written in ((loaded.train, train), (loaded.val, val)):
        assert split.images.shape[1:] == (1, 28, 28)
        assert rows(split.images, split.labels) == image_rows(written, classes)  # pixel for pixel
    assert len(loaded.train.mean) == 1
    x, _ = next(loaded.train.batches(4, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (4, 1, 28, 28)


def test_mixed_folder_becomes_rgb_at_its_native_size(tmp_path):
    grey = write_image_folder(tmp_path / "a", ["grey"], 3, size=(20, 20), mode="L")
    colour = write_image_folder(tmp_path / "a", ["colour"], 3, size=(20, 20), mode="RGB")
    loaded = load_data(str(tmp_path / "a"), val_fraction=0.5)
    assert (loaded.info.channels, loaded.info.image_size) == (3, 20)
    assert loaded.info.preprocessing == "RGB (mixed modes: L, RGB), native 20x20, no resize"
    expected = {**{path: np.repeat(pixels, 3, axis=-1) for path, pixels in grey.items()}, **colour}
    both = (torch.cat([loaded.train.images, loaded.val.images]), torch.cat([loaded.train.labels, loaded.val.labels]))
    assert rows(*both) == image_rows(expected, ["grey", "colour"])


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    levels = np.arange(0, 256, 17, dtype=np.uint16).repeat(16)[: 16 * 16].reshape(16, 16)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(levels * 257).save(tmp_path / name / "0.png")  # 16-bit: level k stored as 257k
    assert Image.open(tmp_path / "a" / "0.png").mode == "I;16"
    loaded = load_data(str(tmp_path))
    assert loaded.info.channels == 1 and loaded.info.preprocessing == "grayscale (modes I;16; 16-bit values scaled to 8 bits), native 16x16, no resize"
    assert torch.equal(loaded.train.images[0, 0], torch.from_numpy(levels.astype(np.uint8)))


@pytest.mark.parametrize(
    "size, side, text",
    [
        ((20, 12), 12, "resized to 12x12 (images are 20x12, not square; median side 12)"),
        ((300, 300), 256, "resized to 256x256 (images are 300x300; capped at 256 unless an image size is asked for)"),
        ((6, 6), 8, "resized to 8x8 (images are 6x6; raised to the 8-pixel minimum)"),
    ],
)
def test_folder_is_resized_only_when_it_must_be(size, side, text, tmp_path):
    write_image_folder(tmp_path, ["a", "b"], 2, size=size, mode="L")
    loaded = load_data(str(tmp_path), val_fraction=0.5)
    assert loaded.train.images.shape[1:] == (1, side, side)
    assert loaded.info.image_size == side and loaded.info.preprocessing == f"grayscale, {text}"
    assert loaded.info.augment == ("crop" if side >= 16 else "none")  # no 4-pixel crop of an 8-pixel image


def test_explicit_image_size_resizes_a_grayscale_folder(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], 2, size=(28, 28), mode="L")
    loaded = load_data(str(tmp_path), image_size=32, val_fraction=0.5)
    assert loaded.train.images.shape[1:] == (1, 32, 32)
    assert loaded.info.preprocessing == "grayscale, resized to 32x32 (image size asked for; images are 28x28)"


# ----------------------------------------------------------------------------- streaming fallback


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_streamed_fallback_gives_the_same_batches(mode, tmp_path, monkeypatch):
    write_image_folder(tmp_path / "train", ["a", "b", "c"], 6, size=(20, 14), mode=mode)
    write_image_folder(tmp_path / "val", ["a", "b", "c"], 2, seed=1, mode=mode)
    resident = load_data(str(tmp_path), image_size=12)
    monkeypatch.setattr(data, "MEMORY_BUDGET_BYTES", 0)
    streamed = load_data(str(tmp_path), image_size=12)
    assert isinstance(streamed.train, StreamedSplit) and isinstance(streamed.val, StreamedSplit)
    assert isinstance(resident.train, TensorSplit) and resident.train.images.shape[1] == (3 if mode == "RGB" else 1)
    assert len(streamed.train) == len(resident.train) == 18 and len(streamed.val) == 6
    assert torch.equal(streamed.train.mean, resident.train.mean) and torch.equal(streamed.train.std, resident.train.std)
    for args in ({"shuffle": True, "augment": "crop-flip", "seed": 7}, {"shuffle": False, "augment": False}):
        for split in ("train", "val"):
            a = epoch(getattr(resident, split), 4, **args)
            b = epoch(getattr(streamed, split), 4, **args)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_streamed_fallback_names_a_corrupt_image(tmp_path, monkeypatch):
    write_image_folder(tmp_path, ["a", "b"], 2)
    broken = tmp_path / "a" / "2.png"
    broken.write_bytes(b"garbage")
    monkeypatch.setattr(data, "MEMORY_BUDGET_BYTES", 0)
    assert str(broken) in one_line_error("cannot decode image", str(tmp_path))
