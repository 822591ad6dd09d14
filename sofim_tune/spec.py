"""Study specs: the budget and defaults of a study for one (dataset, architecture) pair.

A spec is a TOML file (format in DESIGN.md). The shipped ones live in ``studies/`` and are
named ``<dataset>-<arch>``; a user's own is loaded by path. Keys a file leaves out take
the defaults of a dataset without a spec (see :func:`load_spec`), so a user's file can be
as short as ``trials = 8``. Every :class:`StudySpec` is validated when built, and bad
values raise :class:`UserInputError` with one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sofim_tune.data import dataset_info, dataset_names
from sofim_tune.errors import UserInputError
from sofim_tune.space import (
    OPTIMIZER_HYPERPARAMETERS,
    as_integer,
    as_number,
    check_keys,
    input_error,
    is_shipped_name,
    read_source,
    require,
    shipped_names,
    space_names,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["METRICS", "PRUNERS", "SAMPLERS", "StudySpec", "load_spec", "spec_names"]

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp", "grid")
PRUNERS = ("hyperband", "median", "sha", "none")
#: Metrics a study may optimize, with the only direction that makes sense for each.
METRICS: dict[str, str] = {"val_accuracy": "maximize", "val_loss": "minimize"}

DEFAULT_TRIALS = 32
DEFAULT_SPACE = "sofim"

# A user's ImageFolder has no registry entry; a small CNN for a few epochs gives a study
# that finishes on one GPU without knowing how big the folder is.
_FOLDER_ARCH = "cnn"
_FOLDER_EPOCHS = 10
_FOLDER_BATCH_SIZE = 64

_PACKAGE = "sofim_tune.studies"
_SUFFIXES = (".toml",)
_DEFAULTS_SOURCE = "defaults"

# Names an ``enqueue`` entry may use: any optimizer's hyperparameters. Whether they fit
# the study's space is checked when they are enqueued (SearchSpace.from_hyperparameters),
# because a CLI override may swap the space after the spec is read.
_HYPERPARAMETER_NAMES = tuple(sorted({name for names in OPTIMIZER_HYPERPARAMETERS.values() for name in names}))


@dataclass(frozen=True)
class StudySpec:
    """Everything a study needs besides the search space's contents.

    Build it with :func:`load_spec`; construction and :meth:`replace` validate it.

    Attributes:
        name: study name (also the default run folder), default ``"<dataset>-<arch>"``,
            with a folder dataset's folder name in place of the dataset.
        dataset: a registry name (``"cifar100"``) or the path of an ImageFolder.
        arch: model architecture name (checked by the model registry, not here).
        search_space: a shipped space name (``"sofim"``) or the path of a ``.yaml`` file.
        epochs: training epochs per trial, >= 1.
        batch_size: examples per training step, >= 1.
        trials: trials the study runs, >= 1.
        sampler: one of :data:`SAMPLERS`.
        pruner: one of :data:`PRUNERS` (``"none"`` runs every trial to the end).
        metric: ``"val_accuracy"`` (fraction in [0, 1]) or ``"val_loss"``.
        direction: ``"maximize"`` for accuracy, ``"minimize"`` for loss.
        seed: base random seed, >= 0.
        val_fraction: share of the training set held out for validation, in (0, 1).
        enqueue: settings tried first, by the optimizer's names
            (e.g. ``{"lr": 0.1, "rho": 1.0, "beta1": 0.9}``).
        confirm_top: how many of the best trials are retrained before recommending, >= 1.
        confirm_seeds: fresh seeds per retrained trial, >= 1.
        source: the file it came from, or ``"defaults"``.
    """

    name: str
    dataset: str
    arch: str
    search_space: str
    epochs: int
    batch_size: int
    trials: int
    sampler: str = "tpe"
    pruner: str = "hyperband"
    metric: str = "val_accuracy"
    direction: str = "maximize"
    seed: int = 0
    val_fraction: float = 0.1
    enqueue: tuple[dict[str, float], ...] = ()
    confirm_top: int = 3
    confirm_seeds: int = 3
    source: str = ""

    def __post_init__(self) -> None:
        source = self.source or "study spec"
        for key in ("name", "arch"):
            _check_string(getattr(self, key), source, key)
        _check_dataset(self.dataset, source)
        _check_search_space(self.search_space, source)
        for key in ("epochs", "batch_size", "trials", "confirm_top", "confirm_seeds"):
            value = as_integer(getattr(self, key), source, key)
            require(value >= 1, source, key, f"must be >= 1 (got {value})")
        seed = as_integer(self.seed, source, "seed")
        require(seed >= 0, source, "seed", f"must be >= 0 (got {seed})")
        _check_choice(self.sampler, SAMPLERS, source, "sampler")
        _check_choice(self.pruner, PRUNERS, source, "pruner")
        _check_choice(self.metric, tuple(METRICS), source, "metric")
        require(
            self.direction == METRICS[self.metric],
            source,
            "direction",
            f"{self.metric} must be {METRICS[self.metric]}d, got {self.direction!r}",
        )
        val_fraction = as_number(self.val_fraction, source, "val_fraction")
        require(0 < val_fraction < 1, source, "val_fraction", f"must be in (0, 1) (got {val_fraction:g})")
        # Normalized copies: TOML gives lists and ints where the fields promise a tuple and floats.
        object.__setattr__(self, "val_fraction", val_fraction)
        object.__setattr__(self, "enqueue", _check_enqueue(self.enqueue, source))

    def replace(self, **overrides: Any) -> StudySpec:
        """A copy with ``overrides`` applied (None values ignored), validated.

        A new ``metric`` without a ``direction`` brings its own direction. Errors name the
        key and read ``"overrides of <source>: ..."``.
        """
        kept = {key: value for key, value in overrides.items() if value is not None}
        if "metric" in kept and "direction" not in kept and kept["metric"] in METRICS:
            kept["direction"] = METRICS[kept["metric"]]
        try:
            return dataclasses.replace(self, **kept)
        except UserInputError as exc:
            raise UserInputError(f"overrides of {exc}") from None


def spec_names() -> list[str]:
    """Names of the shipped specs, ``"<dataset>-<arch>"`` (``"cifar100-resnet18"``, ...)."""
    return shipped_names(_PACKAGE, _SUFFIXES)


def load_spec(dataset: str, arch: str | None = None, study: str | Path | None = None) -> StudySpec:
    """The spec for a study of ``dataset`` (a registry name or an ImageFolder path).

    ``study`` is a shipped spec name or a path to a ``.toml`` file. Without it, the shipped
    ``<dataset>-<arch>`` spec is used when there is one (``arch`` defaulting to the
    dataset's ``default_arch``), else defaults: the registry's ``default_epochs`` and
    ``default_batch_size`` (a folder: arch ``"cnn"``, 10 epochs, batch size 64),
    :data:`DEFAULT_TRIALS` trials, the ``"sofim"`` space.

    Raises :class:`UserInputError` when the file is missing or invalid, or names another
    dataset or arch than the one asked for.
    """
    defaults = _dataset_defaults(dataset)
    if study is None and dataset in dataset_names():
        shipped = f"{dataset}-{arch if arch is not None else defaults.arch}"
        if shipped in spec_names():
            study = shipped
    if study is None:
        table: dict[str, Any] = {}
        source = _DEFAULTS_SOURCE
    else:
        table, source = _read_table(study)
        _check_agrees(table, dataset, arch, source)

    if arch is None:
        arch = table.get("arch", defaults.arch)
    if "metric" in table and "direction" not in table and table["metric"] in METRICS:
        table["direction"] = METRICS[table["metric"]]
    merged: dict[str, Any] = {
        "name": f"{defaults.label}-{arch}",
        "search_space": DEFAULT_SPACE,
        "epochs": defaults.epochs,
        "batch_size": defaults.batch_size,
        "trials": DEFAULT_TRIALS,
        **table,
    }
    return StudySpec(**{**merged, "dataset": dataset, "arch": arch, "source": source})


class _DatasetDefaults(NamedTuple):
    label: str  # the dataset in the default study name
    arch: str
    epochs: int
    batch_size: int


def _dataset_defaults(dataset: str) -> _DatasetDefaults:
    if _is_folder(dataset):
        return _DatasetDefaults(Path(dataset).resolve().name, _FOLDER_ARCH, _FOLDER_EPOCHS, _FOLDER_BATCH_SIZE)
    info = dataset_info(dataset)  # raises for an unknown name
    return _DatasetDefaults(info.name, info.default_arch, info.default_epochs, info.default_batch_size)


def _is_folder(dataset: str) -> bool:
    # A registry name wins over a folder of the same name in the working directory.
    return dataset not in dataset_names() and Path(dataset).is_dir()


def _read_table(study: str | Path) -> tuple[dict[str, Any], str]:
    """The validated keys of a spec file, with relative paths made relative to the file."""
    file = read_source(study, _PACKAGE, _SUFFIXES, "study spec")
    try:
        table = tomllib.loads(file.text)
    except tomllib.TOMLDecodeError as exc:
        raise input_error(file.label, "", f"not valid TOML: {exc}") from None
    allowed = tuple(f.name for f in dataclasses.fields(StudySpec) if f.name != "source")
    check_keys(table, allowed, file.label)
    if file.folder is not None:
        # A user keeps a spec next to its space and images; paths in it start at its folder.
        if isinstance(table.get("search_space"), str) and not is_shipped_name(table["search_space"]):
            table["search_space"] = str(file.folder / table["search_space"])
        if isinstance(table.get("dataset"), str) and table["dataset"] not in dataset_names():
            table["dataset"] = str(file.folder / table["dataset"])
    return table, file.label


def _check_agrees(table: Mapping[str, Any], dataset: str, arch: str | None, source: str) -> None:
    """Raise when the file names another dataset or arch than the caller asked for."""
    if "dataset" in table:
        _check_string(table["dataset"], source, "dataset")
        same = (
            table["dataset"] == dataset
            if dataset in dataset_names()
            else Path(table["dataset"]).resolve() == Path(dataset).resolve()
        )
        require(same, source, "dataset", f"the spec is for {table['dataset']!r}, not {dataset!r}")
    if arch is not None and "arch" in table:
        require(table["arch"] == arch, source, "arch", f"the spec is for {table['arch']!r}, not {arch!r}")


def _check_string(value: Any, source: str, key: str) -> None:
    require(isinstance(value, str) and bool(value), source, key, f"expected a non-empty string, got {value!r}")


def _check_choice(value: Any, choices: tuple[str, ...], source: str, key: str) -> None:
    require(value in choices, source, key, f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def _check_dataset(dataset: Any, source: str) -> None:
    _check_string(dataset, source, "dataset")
    if not _is_folder(dataset):
        try:
            dataset_info(dataset)
        except UserInputError as exc:
            raise input_error(source, "dataset", str(exc)) from None


def _check_search_space(search_space: Any, source: str) -> None:
    _check_string(search_space, source, "search_space")
    if is_shipped_name(search_space):
        require(
            search_space in space_names(),
            source,
            "search_space",
            f"unknown search space {search_space!r}; shipped: {', '.join(space_names())}; or give a path to a .yaml file",
        )
    else:
        require(Path(search_space).is_file(), source, "search_space", f"no such file: {search_space}")


def _check_enqueue(enqueue: Any, source: str) -> tuple[dict[str, float], ...]:
    require(
        isinstance(enqueue, (list, tuple)),
        source,
        "enqueue",
        "expected an array of tables, e.g. [{lr = 0.1, rho = 1.0, beta1 = 0.9}]",
    )
    settings = []
    for index, setting in enumerate(enqueue):
        where = f"enqueue[{index}]"
        require(
            isinstance(setting, Mapping) and bool(setting),
            source,
            where,
            "expected a non-empty table of hyperparameters, e.g. {lr = 0.1, rho = 1.0, beta1 = 0.9}",
        )
        check_keys(setting, _HYPERPARAMETER_NAMES, source, f"{where}.")
        settings.append({key: as_number(value, source, f"{where}.{key}") for key, value in setting.items()})
    return tuple(settings)
