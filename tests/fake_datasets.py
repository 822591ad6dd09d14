"""Tiny datasets written in the real on-disk formats that torchvision reads.

Each writer fills a folder as the download would (a few random images per split) and
returns the images and labels it wrote, as N×C×H×W ``uint8`` and ``int64`` arrays, so
tests can check the round trip. CIFAR and SVHN files are checked against md5 sums kept
in class attributes; the writers compute the sums of what they wrote and patch those
attributes with pytest's ``monkeypatch`` (undone after the test).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision import datasets


@dataclass
class FakeSplits:
    """What a writer put on disk: images N×C×H×W uint8 and labels N int64 per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _random_split(rng: np.random.Generator, n: int, channels: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    # Every class appears when n >= classes, so label handling is exercised throughout.
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    return images, labels.astype(np.int64)


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are Python 2 pickles


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> FakeSplits:
    """``root/cifar-10-batches-py``: data_batch_1..5 (``per_batch`` images each), test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = _random_split(rng, 5 * per_batch, 3, 32, 10)
    test_images, test_labels = _random_split(rng, n_test, 3, 32, 10)
    batches = [(f"data_batch_{i + 1}", slice(i * per_batch, (i + 1) * per_batch)) for i in range(5)]
    for name, part in [*batches, ("test_batch", slice(None))]:
        images, labels = (test_images, test_labels) if name == "test_batch" else (train_images[part], train_labels[part])
        _pickle(
            folder / name,
            {
                "batch_label": name,
                "labels": labels.tolist(),
                "data": images.reshape(len(images), 3 * 32 * 32),  # rows are R, G, B planes
                "filenames": [f"{name}_{i}.png" for i in range(len(images))],
            },
        )
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072})
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[name, _md5(folder / name)] for name, _ in batches])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")})
    return FakeSplits(train_images, train_labels, test_images, test_labels)


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch, n_train: int = 20, n_test: int = 6, seed: int = 1) -> FakeSplits:
    """``root/cifar-100-python``: train, test (fine and coarse labels) and meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _random_split(rng, n_train, 3, 32, 100)
    test = _random_split(rng, n_test, 3, 32, 100)
    for name, (images, labels) in (("train", train), ("test", test)):
        _pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(images))],
                "batch_label": f"{name} batch",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": images.reshape(len(images), 3 * 32 * 32),
            },
        )
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": _md5(folder / "meta")})
    return FakeSplits(*train, *test)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file: zero bytes, type 0x08 (unsigned byte), number of dims, big-endian int32 sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder_name: str = "MNIST", n_train: int = 20, n_test: int = 6, seed: int = 2) -> FakeSplits:
    """``root/<folder_name>/raw``: the four uncompressed idx-ubyte files, which torchvision reads as they are."""
    rng = np.random.default_rng(seed)
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    train = _random_split(rng, n_train, 1, 28, 10)
    test = _random_split(rng, n_test, 1, 28, 10)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return FakeSplits(*train, *test)


def write_fashion_mnist(root: Path, **kwargs: int) -> FakeSplits:
    """``root/FashionMNIST/raw``, same format as MNIST."""
    return write_mnist(root, folder_name="FashionMNIST", **kwargs)


def write_svhn(root: Path, monkeypatch: pytest.MonkeyPatch, n_train: int = 20, n_test: int = 6, seed: int = 3) -> FakeSplits:
    """``root/train_32x32.mat`` and ``test_32x32.mat``: X is H×W×C×N uint8, y is N×1 in 1..10 with 10 for digit 0."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = _random_split(rng, n_train, 3, 32, 10)
    test = _random_split(rng, n_test, 3, 32, 10)
    split_list = {key: list(value) for key, value in datasets.SVHN.split_list.items()}
    for split, (images, labels) in (("train", train), ("test", test)):
        path = root / f"{split}_32x32.mat"
        stored = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": stored})
        split_list[split][2] = _md5(path)
    monkeypatch.setattr(datasets.SVHN, "split_list", split_list)
    return FakeSplits(*train, *test)


def write_fake_dataset(name: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSplits:
    """Write the registry dataset ``name`` (not digits) into ``root`` as ``load_data(data_dir=root)`` expects."""
    if name == "mnist":
        return write_mnist(root)
    if name == "fashion-mnist":
        return write_fashion_mnist(root)
    writers = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn}
    return writers[name](root, monkeypatch)


def write_image_folder(
    root: Path, classes: list[str], per_class: int, *, size: tuple[int, int] = (16, 16), seed: int = 0, mode: str = "RGB"
) -> dict[str, np.ndarray]:
    """Random PNGs ``root/<class>/<i>.png`` of ``size`` (width, height) pixels in PIL ``mode``.

    ``mode`` is ``"RGB"`` or a single-band 8-bit mode, ``"L"`` (grayscale) or ``"P"`` (grayscale
    pixels stored through a palette of the 256 greys).

    Returns:
        Each file's path (as a string) mapped to its pixels, H×W×C uint8 (C = 3 for RGB, else 1).
    """
    channels = 3 if mode == "RGB" else 1
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            path = root / name / f"{i}.png"
            _save(pixels, path, mode)
            written[str(path)] = pixels
    return written


def _save(pixels: np.ndarray, path: Path, mode: str) -> None:
    """Save H×W×C uint8 ``pixels`` as a PNG in PIL ``mode`` (RGB, L, or P with a grey palette)."""
    if mode == "P":  # palette index k is grey level k
        image = Image.frombytes("P", (pixels.shape[1], pixels.shape[0]), np.ascontiguousarray(pixels[..., 0]).tobytes())
        image.putpalette([level for level in range(256) for _ in range(3)])
    else:
        image = Image.fromarray(pixels if mode == "RGB" else pixels[..., 0])
    image.save(path)


@dataclass
class PatternImages:
    """A small learnable grayscale dataset: images N×1×S×S uint8, labels N int64, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


PATTERN_CLASSES = ["blob-left", "blob-right", "stripe-falling", "stripe-rising"]  # sorted, as ImageFolder numbers them
"""Mirror pairs (blob left/right, stripe / and \\): a horizontal flip turns one class into the other."""


def pattern_images(per_class: int, *, size: int = 28, noise: float = 60.0, seed: int = 0) -> PatternImages:
    """Grayscale images of four classes whose pattern moves a few pixels and drowns in noise.

    Ordered by class, then index, which is the order an ImageFolder lists the files that
    :func:`write_pattern_folder` writes.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images, labels = [], []
    for label in range(len(PATTERN_CLASSES)):
        for _ in range(per_class):
            cy, cx = size / 2 + rng.uniform(-4, 4, size=2)
            strength = rng.uniform(90, 180)
            if label < 2:  # a blob left or right of the centre
                side = -1 if label == 0 else 1
                pattern = np.exp(-((yy - cy) ** 2 + (xx - cx - side * size / 4) ** 2) / (2 * (size / 9) ** 2))
            else:  # a stripe falling (\) or rising (/) through the centre; y grows downwards
                slope = 1 if label == 2 else -1
                distance = np.abs((yy - cy) - slope * (xx - cx)) / np.sqrt(2)
                pattern = np.exp(-(distance**2) / (2 * (size / 14) ** 2))
            pixels = 30 + strength * pattern + rng.normal(0, noise, (size, size))
            images.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[None])
            labels.append(label)
    return PatternImages(np.stack(images), np.array(labels, dtype=np.int64), list(PATTERN_CLASSES))


def write_pattern_folder(root: Path, data: PatternImages, *, mode: str = "L") -> None:
    """``root/<class>/<index, zero-padded>.png``: ImageFolder lists them in ``data``'s order."""
    for index, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        _save(image.transpose(1, 2, 0), folder / f"{index:05d}.png", mode)
