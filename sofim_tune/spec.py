"""Study specs: the budget and defaults of a study for one (dataset, architecture) pair.

A spec is a TOML file (format in docs/architecture.md). The shipped ones live in ``studies/`` and are
named ``<dataset>-<arch>``; a user's own is loaded by path. Keys a file leaves out take
the defaults of a dataset without a spec (see :func:`load_spec`), so a user's file can be
as short as ``trials = 8``. Every :class:`StudySpec` is validated when built, and bad
values raise :class:`UserInputError` with one line naming the file and the key.

A spec's ``name`` is also the default run folder (``runs/<name>``), so it must be one
safe path component: see :data:`NAME_PATTERN`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sofim_tune.choices import AUGMENT_MODES, PRUNERS, SAMPLERS, SCHEDULES
from sofim_tune.data import dataset_info, dataset_names
from sofim_tune.schedules import schedule_problem
from sofim_tune.errors import UserInputError
from sofim_tune.space import (
    OPTIMIZER_HYPERPARAMETERS,
    as_integer,
    as_number,
    check_keys,
    excerpt,
    input_error,
    is_shipped_name,
    not_a_file,
    one_line,
    read_source,
    require,
    shipped_names,
    space_names,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["METRICS", "NAME_PATTERN", "PRUNERS", "SAMPLERS", "StudySpec", "load_spec", "spec_names"]

#: Metrics a study may optimize, with the only direction that makes sense for each.
METRICS: dict[str, str] = {"val_accuracy": "maximize", "val_loss": "minimize"}

DEFAULT_TRIALS = 32
DEFAULT_SPACE = "sofim"
# Four trials at once fill two CPU cores or a GPU's worker (a trial waits for the one four
# before it); the sampler then misses the three trials just before each draw.
DEFAULT_LOOKAHEAD = 4

#: What a study name may be: one path component (it names the run folder), no ``..``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME_RULE = "use up to 128 letters, digits, '.', '_' and '-', starting with a letter or digit, without '..'"

_MAX_ARCH_LENGTH = 200
_MAX_PATH_LENGTH = 4096
_PATH_EXCERPT = 120  # characters of a path quoted in a message (paths are made absolute, so longer)
_MAX_ENQUEUE = 1000  # settings tried first; more than a study runs is a mistake
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

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
        name: study name (also the default run folder), matching :data:`NAME_PATTERN`;
            default ``"<dataset>-<arch>"``, with a folder dataset's folder name in place of
            the dataset and other characters than those allowed made ``-``
            (``"cifar100-tv-resnet50"`` for arch ``tv:resnet50``).
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
        seed: base random seed of the search (sampler, weights, batch order), >= 0.
        split_seed: seed of the train/validation split, >= 0. Separate from ``seed``, so
            that studies with different seeds select on the same validation images.
        val_fraction: share of the training set held out for validation, in (0, 1); the
            study's final images are as many again (``sofim_tune.data.final_images``).
        enqueue: settings tried first, by the optimizer's names
            (e.g. ``{"lr": 0.1, "rho": 1.0, "beta1": 0.9}``); at most 1000.
        confirm_top: how many of the best trials are retrained before recommending, >= 1.
        augment: training augmentation (``none``, ``crop``, ``flip``, ``crop-flip``); None
            takes the dataset's default.
        image_size: resize an ImageFolder to this square side (>= 8); None keeps its size.
        schedule, warmup_epochs, label_smoothing, decoupled_weight_decay: the training
            recipe (see :class:`sofim_tune.trial.TrialConfig`); every trial and every
            confirmation run trains with it, and best.json's ``fixed`` records it.
        widen: let the study widen a log-scaled bound of the space by a decade, at most
            twice per bound, when its best trials sit on it (Optuna backend; samplers
            ``tpe``, ``random`` and ``gp``).
        confirm_seeds: fresh seeds per confirmed candidate, >= 2 (each also draws its own
            train/validation split): the selection runs.
        final_runs: retrains of the chosen setting on new seeds, validated on the study's
            final images, >= 2; the recommendation's headline and interval come from them
            (``sofim_tune.selection``).
        lookahead: trials that may run at once, >= 1 (Optuna backend). Trial ``i`` is drawn
            from, and pruned against, the trials numbered at most ``i - lookahead`` and starts
            once they have all finished, so that the study is the same with any number of
            workers (see ``sofim_tune.backends.views``).
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
    split_seed: int = 0
    val_fraction: float = 0.1
    enqueue: tuple[dict[str, float], ...] = ()
    confirm_top: int = 2
    confirm_seeds: int = 3
    final_runs: int = 3
    widen: bool = True
    augment: str | None = None
    image_size: int | None = None
    schedule: str = "constant"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    decoupled_weight_decay: bool = False
    lookahead: int = DEFAULT_LOOKAHEAD
    source: str = ""

    def __post_init__(self) -> None:
        source = self.source or "study spec"
        _check_name(self.name, source)
        _check_string(self.arch, source, "arch", _MAX_ARCH_LENGTH)
        _check_dataset(self.dataset, source)
        _check_search_space(self.search_space, source)
        for key in ("epochs", "batch_size", "trials", "confirm_top", "confirm_seeds", "final_runs", "lookahead"):
            value = as_integer(getattr(self, key), source, key)
            require(value >= 1, source, key, f"must be >= 1 (got {value})")
        for key in ("seed", "split_seed"):
            seed = as_integer(getattr(self, key), source, key)
            require(seed >= 0, source, key, f"must be >= 0 (got {seed})")
        # A standard deviation and an interval need two runs at least.
        require(as_integer(self.confirm_seeds, source, "confirm_seeds") >= 2, source, "confirm_seeds", f"must be >= 2 (got {self.confirm_seeds})")
        require(as_integer(self.final_runs, source, "final_runs") >= 2, source, "final_runs", f"must be >= 2 (got {self.final_runs})")
        for key in ("widen", "decoupled_weight_decay"):
            require(isinstance(getattr(self, key), bool), source, key, f"expected true or false, got {excerpt(getattr(self, key))}")
        if self.augment is not None:
            _check_choice(self.augment, AUGMENT_MODES, source, "augment")
        if self.image_size is not None:
            require(as_integer(self.image_size, source, "image_size") >= 8, source, "image_size", f"must be >= 8 pixels (got {self.image_size})")
        _check_choice(self.schedule, SCHEDULES, source, "schedule")  # quotes a hostile value short
        problem = schedule_problem(self.schedule, as_integer(self.warmup_epochs, source, "warmup_epochs"), as_integer(self.epochs, source, "epochs"))
        if problem is not None:
            raise input_error(source, *problem)
        smoothing = as_number(self.label_smoothing, source, "label_smoothing")
        require(0 <= smoothing < 1, source, "label_smoothing", f"must be in [0, 1) (got {smoothing:g})")
        object.__setattr__(self, "label_smoothing", smoothing)
        _check_choice(self.sampler, SAMPLERS, source, "sampler")
        _check_choice(self.pruner, PRUNERS, source, "pruner")
        _check_choice(self.metric, tuple(METRICS), source, "metric")
        require(
            self.direction == METRICS[self.metric],
            source,
            "direction",
            f"{self.metric} must be {METRICS[self.metric]}d, got {excerpt(self.direction)}",
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
        if "direction" not in kept and isinstance(kept.get("metric"), str) and kept["metric"] in METRICS:
            kept["direction"] = METRICS[kept["metric"]]
        try:
            return dataclasses.replace(self, **kept)
        except UserInputError as exc:
            raise UserInputError(f"overrides of {exc}") from None


def spec_names() -> list[str]:
    """Names of the shipped specs, ``"<dataset>-<arch>"`` (``"cifar100-resnet18"``, ...)."""
    return shipped_names(_PACKAGE, _SUFFIXES)


def load_spec(dataset: str | None = None, arch: str | None = None, study: str | Path | None = None) -> StudySpec:
    """The spec for a study of ``dataset`` (a registry name or an ImageFolder path).

    ``study`` is a shipped spec name or a path to a ``.toml`` file. Without it, the shipped
    ``<dataset>-<arch>`` spec is used when there is one (``arch`` defaulting to the
    dataset's ``default_arch``), else defaults: the registry's ``default_epochs`` and
    ``default_batch_size`` (a folder: arch ``"cnn"``, 10 epochs, batch size 64),
    :data:`DEFAULT_TRIALS` trials, the ``"sofim"`` space.

    ``dataset`` may be None when ``study`` has a ``dataset`` key (a relative path in a
    user's file starts at the file's folder); the study is then for that dataset.

    Raises :class:`UserInputError` when neither names a dataset, when the file is missing
    or invalid, or when it names another dataset or arch than the one asked for.
    """
    if dataset is None and study is None:
        raise UserInputError("name a dataset with --dataset, or a study spec (--spec) that has a `dataset` key")
    defaults = _dataset_defaults(dataset) if dataset is not None else None
    if study is None and defaults is not None and dataset in dataset_names():
        shipped = f"{dataset}-{arch if arch is not None else defaults.arch}"
        if shipped in spec_names():
            study = shipped
    if study is None:
        table: dict[str, Any] = {}
        source = _DEFAULTS_SOURCE
    else:
        table, source = _read_table(study)
        if dataset is None:
            require(
                "dataset" in table,
                source,
                "dataset",
                "missing; name a dataset with --dataset, or add a `dataset` key to the study spec",
            )
            _check_string(table["dataset"], source, "dataset", _MAX_PATH_LENGTH)
            dataset = table["dataset"]
            defaults = _dataset_defaults(dataset, source)
        _check_agrees(table, dataset, arch, source)
    assert dataset is not None and defaults is not None

    if arch is None:
        arch = table.get("arch", defaults.arch)
    if "direction" not in table and isinstance(table.get("metric"), str) and table["metric"] in METRICS:
        table["direction"] = METRICS[table["metric"]]
    merged: dict[str, Any] = {
        "name": _default_name(defaults.label, arch),
        "search_space": DEFAULT_SPACE,
        "epochs": defaults.epochs,
        "batch_size": defaults.batch_size,
        "val_fraction": defaults.val_fraction,
        "trials": DEFAULT_TRIALS,
        **table,
    }
    return StudySpec(**{**merged, "dataset": dataset, "arch": arch, "source": source})


class _DatasetDefaults(NamedTuple):
    label: str  # the dataset in the default study name
    arch: str
    epochs: int
    batch_size: int
    val_fraction: float = 0.1


def _dataset_defaults(dataset: str, source: str | None = None) -> _DatasetDefaults:
    """Defaults for ``dataset``; an unknown one raises, naming ``source``'s ``dataset`` key if given."""
    if _is_folder(dataset):
        return _DatasetDefaults(Path(dataset).resolve().name, _FOLDER_ARCH, _FOLDER_EPOCHS, _FOLDER_BATCH_SIZE)
    if dataset not in dataset_names():
        message = _unknown_dataset(dataset)
        raise input_error(source, "dataset", message) if source else UserInputError(message)
    info = dataset_info(dataset)
    return _DatasetDefaults(info.name, info.default_arch, info.default_epochs, info.default_batch_size, info.default_val_fraction)


def _unknown_dataset(dataset: Any) -> str:
    # data.dataset_info's wording, with the name cut short.
    return f"unknown dataset {excerpt(dataset, _PATH_EXCERPT)}; choose one of {', '.join(dataset_names())} or give a path to an ImageFolder"


def _is_folder(dataset: str) -> bool:
    # A registry name wins over a folder of the same name in the working directory.
    return dataset not in dataset_names() and _is_dir(Path(dataset))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, a NUL
        return False


def _default_name(label: str, arch: Any) -> str:
    """``"<label>-<arch>"`` made a valid study name: runs of other characters become ``-``."""
    parts = (re.sub(r"[^A-Za-z0-9._-]+", "-", str(part)).strip("-") for part in (label, arch))
    name = re.sub(r"\.{2,}", ".", "-".join(parts)).lstrip("._-")[:128]
    return name or "study"


def _read_table(study: str | Path) -> tuple[dict[str, Any], str]:
    """The validated keys of a spec file, with relative paths made relative to the file."""
    file = read_source(study, _PACKAGE, _SUFFIXES, "study spec")
    try:
        table = tomllib.loads(file.text)
    except tomllib.TOMLDecodeError as exc:
        raise input_error(file.label, "", f"not valid TOML: {one_line(exc)}") from None
    except ValueError as exc:  # an int of more than 4300 digits (Python's limit)
        raise input_error(file.label, "", f"not valid TOML: {one_line(str(exc).split(';')[0])}") from None
    except RecursionError:  # tomllib is recursive: [[[[...]]]] thousands deep
        raise input_error(file.label, "", "not valid TOML: nested too deeply") from None
    allowed = tuple(f.name for f in dataclasses.fields(StudySpec) if f.name != "source")
    check_keys(table, allowed, file.label)
    if file.folder is not None:
        # A user keeps a spec next to its space and images; paths in it start at its folder.
        # (Not an empty one: that would name the folder itself.)
        if isinstance(table.get("search_space"), str) and table["search_space"] and not is_shipped_name(table["search_space"]):
            table["search_space"] = str(file.folder / table["search_space"])
        if isinstance(table.get("dataset"), str) and table["dataset"] and table["dataset"] not in dataset_names():
            table["dataset"] = str(file.folder / table["dataset"])
    return table, file.label


def _check_agrees(table: Mapping[str, Any], dataset: str, arch: str | None, source: str) -> None:
    """Raise when the file names another dataset or arch than the caller asked for."""
    if "dataset" in table:
        _check_string(table["dataset"], source, "dataset", _MAX_PATH_LENGTH)
        same = (
            table["dataset"] == dataset
            if dataset in dataset_names()
            else _same_path(table["dataset"], dataset)
        )
        require(same, source, "dataset", f"the spec is for {excerpt(table['dataset'], _PATH_EXCERPT)}, not {excerpt(dataset, _PATH_EXCERPT)}")
    if arch is not None and "arch" in table:
        require(table["arch"] == arch, source, "arch", f"the spec is for {excerpt(table['arch'])}, not {excerpt(arch)}")


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError, RuntimeError):  # too long, a NUL, a symlink loop
        return False


def _check_string(value: Any, source: str, key: str, limit: int = _MAX_PATH_LENGTH) -> None:
    require(isinstance(value, str) and bool(value), source, key, f"expected a non-empty string, got {excerpt(value)}")
    require(len(value) <= limit, source, key, f"too long: {len(value):,} characters, at most {limit:,}")
    require(
        _CONTROL_CHARACTERS.search(value) is None,
        source,
        key,
        f"{excerpt(value)} contains control characters (a newline, a tab, a NUL)",
    )


def _check_name(name: Any, source: str) -> None:
    _check_string(name, source, "name")
    require(
        NAME_PATTERN.fullmatch(name) is not None and ".." not in name,
        source,
        "name",
        f"{excerpt(name)} is not a safe study name (it names the run folder); {_NAME_RULE}",
    )


def _check_choice(value: Any, choices: tuple[str, ...], source: str, key: str) -> None:
    require(value in choices, source, key, f"unknown {key} {excerpt(value)}; choose one of {', '.join(choices)}")


def _check_dataset(dataset: Any, source: str) -> None:
    _check_string(dataset, source, "dataset")
    require(_is_folder(dataset) or dataset in dataset_names(), source, "dataset", _unknown_dataset(dataset))


def _check_search_space(search_space: Any, source: str) -> None:
    _check_string(search_space, source, "search_space")
    if is_shipped_name(search_space):
        require(
            search_space in space_names(),
            source,
            "search_space",
            f"unknown search space {excerpt(search_space)}; shipped: {', '.join(space_names())}; or give a path to a .yaml file",
        )
    else:
        problem = not_a_file(Path(search_space))
        require(problem is None, source, "search_space", f"{problem}: {excerpt(search_space, _PATH_EXCERPT)}")


def _check_enqueue(enqueue: Any, source: str) -> tuple[dict[str, float], ...]:
    require(
        isinstance(enqueue, (list, tuple)),
        source,
        "enqueue",
        "expected an array of tables, e.g. [{lr = 0.1, rho = 1.0, beta1 = 0.9}]",
    )
    require(
        len(enqueue) <= _MAX_ENQUEUE,
        source,
        "enqueue",
        f"at most {_MAX_ENQUEUE} settings, got {len(enqueue):,}",
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
