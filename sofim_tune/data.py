"""Datasets by name: metadata in a registry, loading into device-resident tensors.

A dataset is decoded once into ``uint8`` images on the training device; every epoch then
costs one index permutation and, per batch, one gather, an optional vectorised augmentation
(see :data:`AUGMENT_MODES`), and the normalisation, all on the device. ImageFolders too
large for :data:`MEMORY_BUDGET_BYTES`, or for the memory this process may allocate, are
streamed from disk through a ``DataLoader`` instead and give batches of the same format;
one that would not fit even so is refused before any image is decoded (:func:`folder_memory`).

A user's ImageFolder keeps what its images are: grayscale stays one channel, and images
that all share one square size keep it. Only mixed or colour modes become RGB, and only
differing, non-square or out-of-range sizes (or an ``image_size`` the caller asks for) are
resized; :attr:`DatasetInfo.preprocessing` says, in words, what was done. A folder needs at
least 2 classes, and is refused when a directory symlink reaches one of its folders twice.

Normalisation uses the per-channel mean and standard deviation of the training split
(after the validation hold-out), computed exactly from pixel histograms, so a user's
ImageFolder is treated like a registry dataset, and like the same pixels given to
:func:`data_from_tensors`; validation and test splits reuse them.

Randomness (shuffling, crops, flips) comes from the ``generator`` passed to
:meth:`Split.batches`, on whatever device that generator lives; the draws are moved to
the data's device. The same generator device and seed give the same batches.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sofim_tune.choices import AUGMENT_MODES
from sofim_tune.errors import UserInputError
from sofim_tune.parallelism import allocatable_memory

# Training augmentations (AUGMENT_MODES): ``crop`` is a random crop of the 4-pixel reflect-padded
# image (a shift of up to 4 pixels), ``flip`` a horizontal flip with probability 0.5, ``crop-flip``
# both. A flip suits photos of objects (CIFAR) and never digits or letters, whose mirror image is
# another symbol or none.


def check_augment(mode: object) -> str:
    """``mode`` when it is one of :data:`AUGMENT_MODES`; else :class:`UserInputError` listing them."""
    if not isinstance(mode, str) or mode not in AUGMENT_MODES:
        raise UserInputError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENT_MODES)}")
    return mode


@dataclass(frozen=True)
class DatasetInfo:
    """What models and studies need to know about a dataset.

    Attributes:
        name: registry name (``"cifar100"``) or, for a user's ImageFolder, its path.
        num_classes: number of labels.
        channels: image channels (1 or 3).
        image_size: side of the square images in pixels, as the model sees them.
        default_arch: architecture used when the user names none.
        augment: the augmentation a training run uses unless it names another, one of
            :data:`AUGMENT_MODES`; ``batches(augment=True)`` applies it. ``True`` and
            ``False`` (the switch this used to be) mean ``"crop-flip"`` and ``"none"``.
        default_epochs: epochs per trial in a study without a spec file.
        default_batch_size: batch size in a study without a spec file.
        default_val_fraction: share of the training data a study validates on: large enough
            that one example is at most 0.25 points of accuracy (at least 400 examples).
        preprocessing: what loading does to the images, in words
            (``"grayscale, native 28x28, no resize"``); sizes are width x height.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    default_arch: str
    augment: str = "none"
    default_epochs: int = 10
    default_batch_size: int = 128
    default_val_fraction: float = 0.1
    preprocessing: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):
            object.__setattr__(self, "augment", "crop-flip" if self.augment else "none")
        check_augment(self.augment)
        if not self.preprocessing:
            side = self.image_size
            object.__setattr__(self, "preprocessing", f"{_colour_word(self.channels)}, native {side}x{side}, no resize")


def _colour_word(channels: int) -> str:
    return "grayscale" if channels == 1 else "RGB" if channels == 3 else f"{channels} channels"


# Default augmentations follow each field's practice, and a digit is never mirrored.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        # 8x8 images: a 4-pixel shift would move half the digit out of the frame.
        DatasetInfo(
            # 30% of the 1,437 training images: 431 validation images, 0.23 points each.
            "digits", 10, 1, 8, "mlp", augment="none", default_epochs=10, default_batch_size=64, default_val_fraction=0.3,
            preprocessing="grayscale, native 8x8, no resize (pixel values 0..16 scaled to 0..255)",
        ),
        # MNIST digits are size-normalised and centred by their centre of mass, in training and
        # test images alike: shifts teach an invariance the test never asks for, and "none" keeps
        # studies comparable with those run before augmentation was a choice.
        DatasetInfo("mnist", 10, 1, 28, "cnn", augment="none", default_epochs=5, default_batch_size=128),
        # Centred items too, and every shoe points the same way: a flip would only add
        # images the validation and test splits never show. Unchanged from before.
        DatasetInfo("fashion-mnist", 10, 1, 28, "cnn", augment="none", default_epochs=10, default_batch_size=128),
        # Photos of objects: crop and flip are the standard CIFAR recipe (He et al. 2016).
        DatasetInfo("cifar10", 10, 3, 32, "resnet18", augment="crop-flip", default_epochs=30, default_batch_size=256),
        DatasetInfo("cifar100", 100, 3, 32, "resnet18", augment="crop-flip", default_epochs=30, default_batch_size=256),
        # House-number digits: a shift keeps the label (neighbouring digits are already in the
        # frame), a mirror does not (a mirrored 2, 3 or 7 is no digit).
        DatasetInfo("svhn", 10, 3, 32, "resnet18", augment="crop", default_epochs=15, default_batch_size=256),
    )
}


def dataset_names() -> list[str]:
    """Names accepted by ``--dataset`` besides a path to an ImageFolder."""
    return list(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Registry entry for ``name``; raises :class:`UserInputError` listing valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UserInputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or give a path to an ImageFolder") from None


MEMORY_BUDGET_BYTES = 2 * 2**30
"""Largest decoded ImageFolder (all loaded splits, ``uint8``) kept in memory; larger ones stream."""

DEFAULT_IMAGE_SIZE = 32
"""Side in pixels of an ImageFolder none of whose image headers could be read."""

MAX_IMAGE_SIZE = 1024
"""Largest side in pixels an ImageFolder may be resized to (``image_size``): one RGB image is
3 MiB at this side, a batch of 256 as float32 3 GiB."""

MAX_AUTO_IMAGE_SIZE = 256
"""Largest side an ImageFolder keeps or is resized to when the caller names no ``image_size``;
larger images are resized to it (and ``preprocessing`` says so), so that a folder of photos
does not train at full resolution by accident. An explicit ``image_size`` may exceed it."""

_MIN_IMAGE_SIZE = 8  # reflect padding by 4 needs more than 4 pixels, and the CNN pools twice
_MIN_CROP_SIDE = 16  # an ImageFolder smaller than this defaults to no crop: 4 pixels would be a quarter of it
_CROP_PADDING = 4
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed, so every study scores on the same digits test images
_STATS_SAMPLE = 10_000  # images decoded for the statistics of a streamed ImageFolder
_STATS_SEED = 0
_DECODE_BATCH = 256  # images per DataLoader batch when decoding or sampling statistics
_MIN_STD = 1 / 255  # a constant channel would otherwise divide by zero
_LOADER_WORKERS = min(8, os.cpu_count() or 1)
_PARALLEL_DECODE_MIN = 512  # below this many images, starting workers costs more than it saves


def default_data_dir() -> Path:
    """Folder that holds downloaded datasets: ``$SOFIM_TUNE_DATA``, else ``~/.cache/sofim-tune/data``."""
    env = os.environ.get("SOFIM_TUNE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sofim-tune" / "data"


# ----------------------------------------------------------------------------- splits


class Split(Protocol):
    """One of the train, validation and test parts of a dataset, resident or streamed."""

    def __len__(self) -> int:
        """Number of samples."""
        ...

    def batches(
        self, batch_size: int, *, shuffle: bool, augment: str | bool, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of ``(x, y)`` batches; see :meth:`TensorSplit.batches`."""
        ...


@dataclass(frozen=True)
class _Placement:
    """What every split of a dataset shares: its device, normalisation and default augmentation."""

    device: torch.device
    mean: Tensor
    std: Tensor
    augment: str


class _SplitBase:
    """Normalisation, shuffling and augmentation shared by resident and streamed splits."""

    def __init__(self, placement: _Placement) -> None:
        self.device = placement.device
        self.mean = placement.mean
        self.std = placement.std
        self.augment = placement.augment
        # (x/255 - mean)/std folded into one multiply-add per element.
        shape = (1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * self.std)).view(shape).to(self.device)
        self._shift = (-self.mean / self.std).view(shape).to(self.device)

    @property
    def augmentable(self) -> bool:
        """Whether ``batches(augment=True)`` changes images: the dataset's default is not ``"none"``."""
        return self.augment != "none"

    def _mode(self, augment: str | bool) -> str:
        """The augmentation that ``batches(augment=...)`` asks for, checked before any work."""
        if isinstance(augment, bool):
            return self.augment if augment else "none"
        return check_augment(augment)

    def _finish(self, x: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
        """Augment and normalise a ``uint8`` batch already on the device."""
        return random_augment(x, mode, generator).float().mul_(self._scale).add_(self._shift)


class TensorSplit(_SplitBase):
    """A split held as ``uint8`` images on the device.

    Attributes:
        images: ``uint8`` tensor N×C×H×W on ``device``, pixel values 0..255.
        labels: ``int64`` tensor N on ``device``, class indices 0..num_classes-1.
        mean, std: float32 CPU tensors of C values in [0, 1]: the training split's
            per-channel pixel statistics (pixels scaled to [0, 1]) that normalise batches.
        augment: the dataset's default augmentation (``info.augment``), which
            ``batches(augment=True)`` applies.
    """

    def __init__(self, images: Tensor, labels: Tensor, placement: _Placement) -> None:
        super().__init__(placement)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, *, shuffle: bool, augment: str | bool, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of batches, the last one partial when ``batch_size`` does not divide the split.

        Args:
            batch_size: samples per batch, at least 1.
            shuffle: visit samples in the order of a permutation drawn from ``generator``;
                otherwise in stored order.
            augment: one of :data:`AUGMENT_MODES`, applied per sample: ``"crop"`` a random
                crop of the 4-pixel reflect-padded image, ``"flip"`` a horizontal flip with
                probability 0.5, ``"crop-flip"`` both, ``"none"`` nothing. ``True`` means
                the dataset's default (:attr:`augment`), ``False`` means ``"none"``.
            generator: source of all randomness, on any device (draws are moved to the
                split's device); ``None`` uses the global CPU generator.

        Yields:
            ``x``: float32 N×C×H×W on the split's device, ``(pixel/255 - mean)/std``;
            ``y``: int64 N on the split's device.

        Raises:
            UserInputError: a batch size below 1 or an unknown augmentation.
        """
        _check_batch_size(batch_size)
        mode = self._mode(augment)
        order = _permutation(len(self), generator).to(self.device) if shuffle else None
        for start in range(0, len(self), batch_size):
            if order is None:
                x, y = self.images[start : start + batch_size], self.labels[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                x, y = self.images[index], self.labels[index]
            yield self._finish(x, mode, generator), y


class StreamedSplit(_SplitBase):
    """A split of an ImageFolder decoded from disk every epoch by a ``DataLoader``.

    Used when the decoded ImageFolder would exceed :data:`MEMORY_BUDGET_BYTES`; batches,
    order and augmentation equal those of a :class:`TensorSplit` of the same images.
    """

    def __init__(self, files: _ImageFiles, indices: Tensor, placement: _Placement) -> None:
        super().__init__(placement)
        self.files = files
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def batches(
        self, batch_size: int, *, shuffle: bool, augment: str | bool, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Same contract as :meth:`TensorSplit.batches`."""
        _check_batch_size(batch_size)
        mode = self._mode(augment)
        indices = self.indices[_permutation(len(self), generator)] if shuffle else self.indices
        pin = self.device.type == "cuda"
        for x, y in _read(self.files, indices, batch_size, pin_memory=pin):
            x = x.to(self.device, non_blocking=pin)
            yield self._finish(x, mode, generator), y.to(self.device, non_blocking=pin)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _permutation(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randperm(n, generator=generator, device=_draw_device(generator))


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor | None) -> Tensor:
    """Crop each image of its reflect-padded self at a given offset, mirrored where asked.

    Equivalent to padding ``x`` by 4 pixels on every side (reflect mode), taking the
    H×W window whose top-left corner is ``(dy[i], dx[i])`` for image ``i`` and mirroring
    it left-right where ``flip[i]``, but done as one gather without the padded copy.

    Args:
        x: N×C×H×W tensor of any dtype, H and W larger than 4.
        dy, dx: int64 tensors of N offsets in 0..8 (4 = no shift), on ``x``'s device.
        flip: bool tensor of N, on ``x``'s device; ``None`` mirrors none.
    """
    n, c, h, w = x.shape
    rows = dy[:, None] - _CROP_PADDING + torch.arange(h, device=x.device)
    cols = dx[:, None] - _CROP_PADDING + torch.arange(w, device=x.device)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = _reflect(rows, h), _reflect(cols, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _reflect(index: Tensor, size: int) -> Tensor:
    """Map positions in -4..size+3 onto 0..size-1 as reflect padding does (edge not repeated)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _random_flips(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator, device=_draw_device(generator)).bool().to(device)


def _random_offsets(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    offsets = torch.randint(0, 2 * _CROP_PADDING + 1, (2, n), generator=generator, device=_draw_device(generator))
    return offsets.to(device)


def random_crop_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """:func:`crop_flip` with offsets uniform in 0..8 and flips with probability 0.5 from ``generator``."""
    flip = _random_flips(len(x), generator, x.device)  # drawn first: the order batches have always used
    dy, dx = _random_offsets(len(x), generator, x.device)
    return crop_flip(x, dy, dx, flip)


def random_augment(x: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    """A batch N×C×H×W augmented as ``mode`` (one of :data:`AUGMENT_MODES`) says, from ``generator``.

    ``"none"`` returns ``x`` itself; ``"crop"`` shifts (as :func:`crop_flip` without flips),
    ``"flip"`` mirrors each image left-right with probability 0.5 and never shifts,
    ``"crop-flip"`` is :func:`random_crop_flip`.
    """
    check_augment(mode)
    if mode == "none" or len(x) == 0:
        return x
    if mode == "flip":
        flip = _random_flips(len(x), generator, x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
    if min(x.shape[-2:]) <= _CROP_PADDING:
        raise UserInputError(f"augmentation {mode!r} crops with {_CROP_PADDING}-pixel padding and needs images larger than {_CROP_PADDING}x{_CROP_PADDING}")
    if mode == "crop-flip":
        return random_crop_flip(x, generator)
    dy, dx = _random_offsets(len(x), generator, x.device)
    return crop_flip(x, dy, dx, None)


# ----------------------------------------------------------------------------- pools
# A pool is a not-yet-placed set of samples: a split is made from it once the
# validation hold-out and the normalisation statistics are known.


@dataclass
class _TensorPool:
    images: Tensor  # uint8 N×C×H×W on the CPU
    labels: Tensor  # int64 N on the CPU

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> _TensorPool:
        return _TensorPool(self.images[index], self.labels[index])

    def stats_chunks(self) -> Iterator[Tensor]:
        yield self.images

    def to_split(self, placement: _Placement) -> TensorSplit:
        return TensorSplit(self.images, self.labels, placement)


@dataclass
class _FilePool:
    files: _ImageFiles
    indices: Tensor  # int64 positions in files.samples

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, index: Tensor) -> _FilePool:
        return _FilePool(self.files, self.indices[index])

    def stats_chunks(self) -> Iterator[Tensor]:
        # Decoding is the cost here, so statistics come from a fixed random sample.
        indices = self.indices
        if len(indices) > _STATS_SAMPLE:
            sample = torch.randperm(len(indices), generator=torch.Generator().manual_seed(_STATS_SEED))
            indices = indices[sample[:_STATS_SAMPLE].sort().values]
        return (x for x, _ in _read(self.files, indices, _DECODE_BATCH))

    def decode(self) -> _TensorPool:
        batches = list(_read(self.files, self.indices, _DECODE_BATCH))
        return _TensorPool(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))

    def to_split(self, placement: _Placement) -> StreamedSplit:
        return StreamedSplit(self.files, self.indices, placement)


_Pool = _TensorPool | _FilePool


def _holdout(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random split of ``range(n)`` into sorted (kept, held-out) index tensors.

    The held-out part has ``round(n * fraction)`` elements, at least 1 and at most ``n - 1``.
    """
    if n < 2:
        raise UserInputError(f"cannot hold out a validation split from {n} sample(s); the dataset needs at least 2")
    held = min(max(round(n * fraction), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


# Mixed into the study's split seed, so that the final images are not the first images of the
# search's training part in the order that drew its validation split.
_FINAL_SEED_SALT = 0x5F1A1


def final_images(n: int, fraction: float, final_seed: int, *, fixed_validation: bool = False) -> Tensor:
    """The sorted indices, in a training pool of ``n`` images, of a study's *final* images.

    The final runs (README, "How the recommendation is chosen") validate on them, and no
    search or selection run scores them: they are drawn from the search's training part
    (``_holdout(n, fraction, final_seed)``'s kept part; all of the pool when the dataset brings
    its own ``val/``), as many as one validation split holds.
    """
    kept, held = _holdout(n, fraction, final_seed)
    candidates = torch.arange(n) if fixed_validation else kept
    if len(candidates) <= len(held):
        raise UserInputError(f"cannot hold out {len(held)} final images from {n} sample(s) besides the validation split; use a smaller val_fraction or more data")
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(final_seed ^ _FINAL_SEED_SALT))
    return candidates[order[: len(held)]].sort().values


def _split_indices(n: int, fraction: float, split_seed: int, final_seed: int | None, final: bool, fixed_validation: bool) -> tuple[Tensor, Tensor | None]:
    """(training, validation) indices of a pool of ``n`` images; validation None means the
    dataset's own ``val/`` validates (see :func:`load_data` for the rules)."""
    if final_seed is None:
        return (torch.arange(n), None) if fixed_validation else _holdout(n, fraction, split_seed)
    held_out = final_images(n, fraction, final_seed, fixed_validation=fixed_validation)
    rest = _complement(n, held_out)
    if final:
        return rest, held_out
    if fixed_validation:
        return torch.arange(n), None
    if split_seed == final_seed:  # the search's own split: the final images lie in its training part
        return _holdout(n, fraction, split_seed)
    _, held = _holdout(len(rest), len(held_out) / len(rest), split_seed)
    held = rest[held]
    return _complement(n, held), held


def _complement(n: int, index: Tensor) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[index] = False
    return mask.nonzero().flatten()


def _channel_stats(chunks: Iterable[Tensor], channels: int) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and std (float32, pixels scaled to [0, 1]) of ``uint8`` NCHW chunks.

    Pixel histograms keep the sums exact and independent of chunk order, so resident
    and streamed copies of the same images get identical statistics.
    """
    histogram = torch.zeros(channels, 256, dtype=torch.int64)
    for x in chunks:
        for c in range(channels):
            histogram[c] += torch.bincount(x[:, c].reshape(-1), minlength=256).cpu()
    levels = torch.arange(256, dtype=torch.float64) / 255
    count = histogram.sum(1)
    mean = (histogram * levels).sum(1) / count
    var = (histogram * levels**2).sum(1) / count - mean**2
    std = var.clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return mean.float(), std.float()


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedData:
    """A dataset's splits, ready for training.

    Attributes:
        info: registry entry, or the ImageFolder's description.
        train: training split; ``batches(augment=True)`` applies ``info.augment``.
        val: validation split, held out from the training data unless the folder has ``val/``.
        test: official test split; only when loaded with ``with_test=True``.
    """

    info: DatasetInfo
    train: Split
    val: Split
    test: Split | None = None


def data_from_tensors(
    info: DatasetInfo,
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    *,
    device: torch.device | str = "cpu",
) -> LoadedData:
    """Tensors you already hold, ready for :func:`sofim_tune.train_trial` (its ``data=``).

    Images are ``uint8`` N×C×H×W with pixel values 0..255 and labels ``int64`` class indices
    below ``info.num_classes``; batches are normalised with the training images' statistics,
    exactly as :func:`load_data` normalises the same pixels read from an ImageFolder, and
    augmented as ``info.augment`` says unless a run names another mode.
    """
    mean, std = _channel_stats(_TensorPool(train_images, train_labels).stats_chunks(), info.channels)
    placement = _Placement(torch.device(device), mean, std, augment=info.augment)
    return LoadedData(info=info, train=TensorSplit(train_images, train_labels, placement), val=TensorSplit(val_images, val_labels, placement))


def load_data(
    dataset: str,
    *,
    device: torch.device | str = "cpu",
    data_dir: str | Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    with_test: bool = False,
    image_size: int | None = None,
    final_seed: int | None = None,
    final: bool = False,
) -> LoadedData:
    """Load a registry dataset or an ImageFolder onto ``device``.

    Args:
        dataset: a name from :func:`dataset_names`, or a path to an ImageFolder: a folder
            of class subfolders, or one with ``train/`` and optionally ``val/`` and ``test/``
            each laid out that way.
        device: where images live and batches are produced.
        data_dir: folder of the torchvision datasets; default :func:`default_data_dir`.
        download: let torchvision download missing files into ``data_dir``.
        val_fraction: share of the training data held out for validation, in (0, 1); for an
            ImageFolder with ``val/``, only the share of ``train/`` that is final (``final_seed``).
        split_seed: seed of the validation hold-out.
        with_test: also load the test split (``digits``: a fixed 20% of the images, the
            same for every ``split_seed``; ImageFolder: ``test/``, which must exist).
        final_seed: the split seed of a study's search, whose final images
            (:func:`final_images`) this load keeps out of validation: the search's own split
            (``split_seed == final_seed``) is unchanged, since they lie in its training part;
            any other split seed draws its validation images from the rest of the pool, and
            an ImageFolder with ``val/`` validates on it. None: no final images (as before).
        final: validate on the final images instead, and train on every other image of the
            pool (``final_seed`` required). The final runs load this way.
        image_size: ImageFolder images are resized to this square side in pixels (8 to
            :data:`MAX_IMAGE_SIZE`); by default they keep their size when all share one square size, and
            are resized to the median side otherwise (see :func:`dataset_info_for`). For a
            registry dataset only its own size is accepted.

    Raises:
        UserInputError: unknown name, missing files, bad folder (fewer than 2 classes, a
            folder reached twice through a symlink), bad fraction or image size, an
            ImageFolder larger than the memory this process may allocate; one line each.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserInputError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    train: _Pool
    test: _Pool | None = None
    val: _Pool | None = None
    if dataset == "digits":
        info = dataset_info_for(dataset, image_size)
        train, digits_test = _digits_pools()
        test = digits_test if with_test else None
    elif dataset in DATASETS:
        info = dataset_info_for(dataset, image_size)
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        train = _torchvision_pool(dataset, root, train=True, download=download)
        test = _torchvision_pool(dataset, root, train=False, download=download) if with_test else None
    else:
        info, train, val, test = _folder_data(Path(dataset), image_size, with_test)
    if final and final_seed is None:
        raise UserInputError("final runs need the study's split seed (final_seed) to know which images are final")
    kept, held = _split_indices(len(train), val_fraction, split_seed, final_seed, final, fixed_validation=val is not None)
    if held is not None:
        train, val = train.subset(kept), train.subset(held)
    mean, std = _channel_stats(train.stats_chunks(), info.channels)
    placement = _Placement(torch.device(device), mean, std, augment=info.augment)
    return LoadedData(
        info=info,
        train=train.to_split(placement),
        val=val.to_split(placement),
        test=test.to_split(placement) if test is not None else None,
    )


def dataset_info_for(dataset: str, image_size: int | None = None) -> DatasetInfo:
    """Registry entry for a name, or the description of an ImageFolder at a path.

    A folder is described from its image headers alone (no pixel is decoded), over the
    files of every split it has (``train/``, ``val/``, ``test/``, or the folder itself):

    - ``channels``: 1 when every image is single-band (modes ``1``, ``L``, ``LA``, 16- and
      32-bit grayscale, or a palette of greys), else 3: colour or mixed folders become RGB.
    - ``image_size``: ``image_size`` when given; else the images' own side when all share
      one square size; else (sizes differ, or are not square) the lower median of all
      widths and heights. A side below 8 is raised to 8 and one above :data:`MAX_AUTO_IMAGE_SIZE`
      lowered to it. Images of another size are resized (bilinear, antialiased).
    - ``augment``: ``"crop"`` (never a flip, which would change a digit or a letter), or
      ``"none"`` below 16 pixels, where a 4-pixel shift is a quarter of the image.
    - ``preprocessing``: all of this, in words; ``default_arch`` is ``"cnn"``.

    Unreadable files are left out here and named when the images are decoded.
    """
    if dataset in DATASETS:
        info = DATASETS[dataset]
        if image_size is not None and image_size != info.image_size:
            raise UserInputError(
                f"{dataset} images are {info.image_size}x{info.image_size}; an image size applies only to ImageFolder datasets"
            )
        return info
    return _folder_plan(Path(dataset), image_size).info


def _digits_file() -> Path | None:
    """The CSV file inside the installed scikit-learn that its ``load_digits`` reads; None when its folder holds none.

    Read directly because importing scikit-learn takes about a second, paid by every spawned
    or Ray worker; ``find_spec`` locates the package without importing it.
    """
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise UserInputError("the digits dataset ships with scikit-learn, which is not installed; pip install scikit-learn")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1797×8×8 pixels in 0..16 (float64) and their labels (int64)."""
    path = _digits_file()
    if path is None:
        # An editable scikit-learn keeps its data files elsewhere; its own loader finds them.
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target.astype(np.int64)
    # Each row: 64 pixels in row-major order, then the label, as load_digits parses it.
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits_pools() -> tuple[_TensorPool, _TensorPool]:
    """scikit-learn's 1797 8×8 digits as (train, fixed test) pools, pixels 0..16 rescaled to 0..255."""
    pixels, labels = _digits_arrays()
    images = torch.from_numpy(np.rint(pixels * (255 / 16))).to(torch.uint8).unsqueeze(1)
    full = _TensorPool(images, torch.from_numpy(labels))
    train, test = _holdout(len(full), _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
    return full.subset(train), full.subset(test)


@dataclass(frozen=True)
class _TorchvisionSource:
    class_name: str  # in torchvision.datasets
    title: str  # as messages name it
    layout: str  # axis order of the dataset object's .data: "NHW", "NHWC" or "NCHW"
    labels_attr: str
    split_arg: bool  # selects train/test with split="train"/"test" rather than train=True/False


_TORCHVISION: dict[str, _TorchvisionSource] = {
    "mnist": _TorchvisionSource("MNIST", "MNIST", "NHW", "targets", split_arg=False),
    "fashion-mnist": _TorchvisionSource("FashionMNIST", "Fashion-MNIST", "NHW", "targets", split_arg=False),
    "cifar10": _TorchvisionSource("CIFAR10", "CIFAR-10", "NHWC", "targets", split_arg=False),
    "cifar100": _TorchvisionSource("CIFAR100", "CIFAR-100", "NHWC", "targets", split_arg=False),
    "svhn": _TorchvisionSource("SVHN", "SVHN", "NCHW", "labels", split_arg=True),
}


def _torchvision_pool(name: str, root: Path, *, train: bool, download: bool) -> _TensorPool:
    """The official train or test set of a torchvision dataset, read from its arrays without per-sample work."""
    source = _TORCHVISION[name]
    split = {"split": "train" if train else "test"} if source.split_arg else {"train": train}
    import torchvision.datasets  # see _ImageFiles: not at import time

    try:
        raw = getattr(torchvision.datasets, source.class_name)(str(root), download=download, **split)
    except (RuntimeError, OSError) as error:
        if download:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserInputError(f"downloading {source.title} into {root} failed: {reason}") from error
        raise UserInputError(
            f"{source.title} not found in {root}; run the same command again with --download (download=True in Python), "
            "or point --data-dir at a folder that has it"
        ) from error
    images = torch.as_tensor(raw.data)
    if source.layout == "NHW":
        images = images.unsqueeze(1)
    elif source.layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(getattr(raw, source.labels_attr)), dtype=torch.int64)
    return _TensorPool(images.contiguous(), labels)


# ----------------------------------------------------------------------------- ImageFolder


@dataclass(frozen=True)
class _FolderLayout:
    train: Path
    val: Path | None
    test: Path | None


def _folder_layout(root: Path) -> _FolderLayout:
    root = root.expanduser()
    if not root.is_dir():
        raise UserInputError(
            f"{str(root)!r} is neither a dataset name ({', '.join(DATASETS)}) nor an existing folder"
        )
    if (root / "train").is_dir():
        val, test = root / "val", root / "test"
        return _FolderLayout(root / "train", val if val.is_dir() else None, test if test.is_dir() else None)
    return _FolderLayout(root, None, None)


def has_fixed_validation(dataset: str) -> bool:
    """Whether ``dataset`` brings its own validation images (an ImageFolder with ``val/``), so
    that no split seed changes which images validate."""
    return dataset not in DATASETS and _folder_layout(Path(dataset)).val is not None


def has_test_split(dataset: str) -> bool:
    """Whether ``dataset`` has a test split: every registry dataset does; an ImageFolder
    only with a ``test/`` folder beside ``train/``."""
    return dataset in DATASETS or _folder_layout(Path(dataset)).test is not None


def _class_names(folder: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes  # see _ImageFiles: not at import time

    try:
        return find_classes(folder)[0]
    except FileNotFoundError:
        raise UserInputError(
            f"no class folders in {folder}; an ImageFolder has one subfolder of images per class"
        ) from None


_SINGLE_BAND_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
"""PIL modes of one colour band (an alpha band aside): such an image becomes ``L``, losing only its alpha."""


@dataclass(frozen=True)
class _Header:
    mode: str  # PIL mode as stored
    grey: bool  # one colour band: a single-band mode, or a palette of greys
    size: tuple[int, int]  # width, height


def _header(path: str) -> _Header | None:
    """Mode and size from the file's header (PIL decodes no pixels on open); None when unreadable."""
    try:
        with Image.open(path) as image:
            return _Header(image.mode, _is_grey(image), image.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _is_grey(image: Image.Image) -> bool:
    if image.mode in _SINGLE_BAND_MODES:
        return True
    palette = image.palette if image.mode == "P" else None  # read with the header, no pixels decoded
    if palette is None or palette.mode != "RGB":
        return False
    colours = bytes(palette.palette)
    return len(colours) % 3 == 0 and colours[0::3] == colours[1::3] == colours[2::3]


@functools.lru_cache(maxsize=4)
def _headers(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> tuple[_Header | None, ...]:
    # ``stamps`` (each file's modification time and size) only key the cache, so that a
    # file rewritten since is read again.
    return tuple(_header(path) for path in paths)


def _stamp(path: str) -> tuple[int, int]:
    try:
        status = os.stat(path)
    except OSError:
        return (-1, -1)
    return (status.st_mtime_ns, status.st_size)


def _folder_headers(files: Sequence[_ImageFiles]) -> list[_Header | None]:
    """The headers of every image of ``files``, read once per process for unchanged files
    (a ``stat`` per file, some 30 times cheaper than opening it)."""
    paths = tuple(path for f in files for path, _ in f.samples)
    return list(_headers(paths, tuple(_stamp(path) for path in paths)))


def _describe_sizes(sizes: Counter[tuple[int, int]]) -> str:
    def text(size: tuple[int, int]) -> str:
        return f"{size[0]}x{size[1]}"

    if len(sizes) == 1:
        return text(next(iter(sizes)))
    ordered = sorted(sizes, key=lambda size: (size[0] * size[1], size))
    return f"{len(sizes)} sizes, {text(ordered[0])} to {text(ordered[-1])}"


def _describe_modes(modes: Counter[str], grey: bool) -> str:
    names = ", ".join(sorted(modes))
    if any(mode.startswith("I;16") for mode in modes):
        names += "; 16-bit values scaled to 8 bits"
    if grey:
        return "grayscale" if set(modes) == {"L"} else f"grayscale (modes {names})"
    if set(modes) == {"RGB"}:
        return "RGB"
    mixed = len(modes) > 1 and any(mode in _SINGLE_BAND_MODES for mode in modes)
    return f"RGB (mixed modes: {names})" if mixed else f"RGB (modes {names})"


def _choose_side(sizes: Counter[tuple[int, int]], image_size: int | None) -> tuple[int, str]:
    """The square side images are brought to, and what that does to them, in words."""
    if image_size is not None:
        if set(sizes) == {(image_size, image_size)}:
            return image_size, f"native {image_size}x{image_size}, no resize"
        found = f"; images are {_describe_sizes(sizes)}" if sizes else ""
        return image_size, f"resized to {image_size}x{image_size} (image size asked for{found})"
    if not sizes:
        return DEFAULT_IMAGE_SIZE, f"resized to {DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE} (no image header could be read)"
    (width, height), *others = sizes
    if not others and width == height and _MIN_IMAGE_SIZE <= width <= MAX_AUTO_IMAGE_SIZE:
        return width, f"native {width}x{height}, no resize"
    # The median of every width and height: the typical image's scale, one rule for mixed
    # sizes and for a uniform non-square size (models take one square side).
    side = statistics.median_low(s for (w, h), count in sizes.items() for s in (w, h) for _ in range(count))
    if others:
        reasons = [f"sizes differ: {_describe_sizes(sizes)}; median side {side}"]
    elif width != height:
        reasons = [f"images are {width}x{height}, not square; median side {side}"]
    else:
        reasons = [f"images are {width}x{height}"]
    if side > MAX_AUTO_IMAGE_SIZE:
        side = MAX_AUTO_IMAGE_SIZE
        reasons.append(f"capped at {MAX_AUTO_IMAGE_SIZE} unless an image size is asked for")
    elif side < _MIN_IMAGE_SIZE:
        side = _MIN_IMAGE_SIZE
        reasons.append(f"raised to the {_MIN_IMAGE_SIZE}-pixel minimum")
    return side, f"resized to {side}x{side} ({'; '.join(reasons)})"


def check_image_size(image_size: int) -> int:
    """``image_size`` when it is a side an ImageFolder may be resized to, at least 8 and at
    most :data:`MAX_IMAGE_SIZE` pixels; else :class:`UserInputError` (``--image-size``)."""
    if not _MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise UserInputError(f"image size (--image-size) must be at least {_MIN_IMAGE_SIZE} and at most {MAX_IMAGE_SIZE} pixels, got {image_size}")
    return image_size


@dataclass(frozen=True)
class _FolderPlan:
    """An ImageFolder's description and its listed splits, each set to decode as ``info`` says."""

    info: DatasetInfo
    layout: _FolderLayout
    train: _ImageFiles
    val: _ImageFiles | None
    test: _ImageFiles | None  # None also when test/ exists but lists no images


def _folder_plan(root: Path, image_size: int | None) -> _FolderPlan:
    """List every split of the folder and decide, from the image headers, how to decode it."""
    if image_size is not None:
        check_image_size(image_size)
    layout = _folder_layout(root)
    train = _image_files(layout.train)
    val = _image_files(layout.val) if layout.val is not None else None
    test = None
    if layout.test is not None:
        # Only a run that evaluates on test/ must find it well formed (see _folder_data);
        # for the others its images, when it has any, only count towards the decision.
        try:
            test = _image_files(layout.test)
        except UserInputError:
            pass
    listed = [files for files in (train, val, test) if files is not None]
    headers = [h for h in _folder_headers(listed) if h is not None]
    grey = bool(headers) and all(h.grey for h in headers)
    side, size_text = _choose_side(Counter(h.size for h in headers), image_size)
    modes_text = _describe_modes(Counter(h.mode for h in headers), grey) if headers else "RGB"
    info = DatasetInfo(
        name=str(root.expanduser().resolve()),
        num_classes=len(train.classes),
        channels=1 if grey else 3,
        image_size=side,
        default_arch="cnn",
        augment="crop" if side >= _MIN_CROP_SIDE else "none",
        preprocessing=f"{modes_text}, {size_text}",
    )
    for files in listed:
        files.mode, files.side = ("L" if grey else "RGB"), side
    return _FolderPlan(info, layout, train, val, test)


def _folder_data(root: Path, image_size: int | None, with_test: bool) -> tuple[DatasetInfo, _Pool, _Pool | None, _Pool | None]:
    """(info, train, val or None, test or None) of an ImageFolder, decoded when they fit the memory budget."""
    plan = _folder_plan(root, image_size)
    if with_test and plan.layout.test is None:
        raise UserInputError(f"{root} has no test/ folder; add one laid out like train/ to evaluate on a test set")
    test = (plan.test or _image_files(plan.layout.test)) if with_test and plan.layout.test is not None else None
    for files in (plan.val, test):
        if files is not None and files.classes != plan.train.classes:
            raise UserInputError(f"{files.root} has classes {files.classes} but {plan.train.root} has {plan.train.classes}; they must match")
    info = plan.info
    pools = [_FilePool(files, torch.arange(len(files))) if files is not None else None for files in (plan.train, plan.val, test)]
    images = sum(len(p) for p in pools if p is not None)
    resident = _keep_decoded(root, images, info.channels, info.image_size)
    placed = [p.decode() if resident and p is not None else p for p in pools]
    return info, placed[0], placed[1], placed[2]  # type: ignore[return-value]  # train is never None


def folder_memory(images: int, channels: int, side: int, *, resident: bool) -> int:
    """Bytes of memory that loading and batching an ImageFolder takes at least, roughly.

    ``images × channels × side²`` bytes for the decoded images, twice over while they are
    decoded and joined, when they are kept in memory (``resident``); the decoded batches in
    flight (each DataLoader worker prefetches two); and one batch as the float32 copy that
    normalisation makes, besides its ``uint8`` gather. Batches count as :data:`_DECODE_BATCH`
    images. The model's own memory comes on top.
    """
    image = channels * side * side
    batch = min(images, _DECODE_BATCH) * image
    workers = _loader_workers(images)
    in_flight = min(2 * workers + 1, math.ceil(images / _DECODE_BATCH)) * batch
    return (2 * images * image if resident else 0) + in_flight + batch * (1 + 4)


def _loader_workers(images: int) -> int:
    return _LOADER_WORKERS if images >= _PARALLEL_DECODE_MIN else 0


def _keep_decoded(root: Path, images: int, channels: int, side: int) -> bool:
    """Whether to decode an ImageFolder into memory (else it streams); UserInputError when
    even streaming it needs more memory than this process may allocate (see :func:`folder_memory`)."""
    memory = allocatable_memory()
    if images * channels * side * side <= MEMORY_BUDGET_BYTES and (memory is None or folder_memory(images, channels, side, resident=True) <= memory):
        return True
    need = folder_memory(images, channels, side, resident=False)
    if memory is not None and need > memory:
        raise UserInputError(
            f"{root} at {side}x{side} needs about {_gib(need)} of memory ({images} images of {channels} channel{'s' if channels > 1 else ''}, "
            f"decoded in batches of {_DECODE_BATCH} and copied as float32), more than the {_gib(memory)} available; choose a smaller --image-size"
        )
    return False


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _image_files(folder: Path) -> _ImageFiles:
    classes = _class_names(folder)
    if len(classes) < 2:
        raise UserInputError(
            f"{folder} has one class folder ({classes[0]!r}); a classifier needs at least 2 classes, one subfolder of images each"
        )
    _refuse_folders_listed_twice(folder)
    try:
        return _ImageFiles(folder)
    except FileNotFoundError as error:  # a class folder without images
        raise UserInputError(f"no images in some class folders of {folder}: {error}") from None


def _refuse_folders_listed_twice(folder: Path) -> None:
    """UserInputError when a directory symlink makes ImageFolder reach a folder of ``folder``
    twice: a link back up (``a/up -> ..``), which it would follow until the path is too long,
    or a link to another folder of the dataset, whose images would count under two labels.

    ImageFolder follows directory symlinks, and so do we where each folder is reached once:
    a class folder that links to images kept elsewhere, outside the dataset, is fine.
    """
    reached = {os.path.realpath(folder): str(folder)}
    for parent, dirs, _ in os.walk(folder, followlinks=True):
        for name in dirs:
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if real in reached:
                raise UserInputError(
                    f"{path} and {reached[real]} are one folder ({real}), reached twice through a symbolic link; "
                    "its images would count twice: remove the link"
                )
            reached[real] = path


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as ``L`` or ``RGB``; 16-bit grayscale is scaled to 8 bits (PIL would clip it)."""
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    return image if image.mode == mode else image.convert(mode)


class _ImageFiles(Dataset):
    """An ImageFolder's images as (uint8 C×S×S tensor, label), label -1 for a file PIL cannot decode.

    The files and classes are torchvision's ``ImageFolder`` listing. Every image is converted to
    ``mode`` (``"L"``: C = 1, ``"RGB"``: C = 3) and, unless it already is ``side`` pixels square,
    resized to that; :func:`_folder_plan` sets both.

    torchvision is imported here and in the other functions that read its datasets, not with
    this module: importing it loads ``torch._dynamo`` (1.6 s on this project's machine), which
    every command, worker and digits study would otherwise pay without using it.
    """

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        listing = ImageFolder(str(root))
        self.root, self.samples, self.classes = listing.root, listing.samples, listing.classes
        self.mode = "RGB"
        self.side = DEFAULT_IMAGE_SIZE

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as file:
                image = _to_mode(file, self.mode)
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            # Marked rather than raised: raised in a DataLoader worker, the error would
            # reach the user as a multi-line traceback instead of one line naming the file.
            return torch.zeros(1 if self.mode == "L" else 3, self.side, self.side, dtype=torch.uint8), -1
        if image.size != (self.side, self.side):
            image = image.resize((self.side, self.side), Image.Resampling.BILINEAR)  # antialiased, as torchvision's Resize
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image), label


def _read(files: _ImageFiles, indices: Tensor, batch_size: int, *, pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Decode ``files`` at ``indices``, in that order, as (uint8 N×C×S×S, int64 N) CPU batches."""
    loader = DataLoader(
        files,
        batch_size=batch_size,
        sampler=indices.tolist(),
        num_workers=_loader_workers(len(indices)),
        pin_memory=pin_memory,
        # Its own generator seeds the workers, leaving the global RNG (and so the
        # model's dropout, say) where the resident path would leave it.
        generator=torch.Generator(),
    )
    for start, (x, y) in zip(range(0, len(indices), batch_size), loader):
        bad = (y < 0).nonzero()
        if len(bad):
            path = files.samples[int(indices[start + int(bad[0, 0])])][0]
            raise UserInputError(f"cannot decode image {path}; remove or replace the file")
        yield x, y
