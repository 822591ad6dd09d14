"""The study layer: what both backends share, below them and above the trial.

Run options, run folders, the metadata a study records about itself, resume checks,
samplers, the TrialConfig of a trial, and the :class:`Backend` protocol through which the
pipeline (``tuning.py``, ``runs.py``) reaches a backend. Backends import this module;
it imports no backend.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy
import torch

from sofim_tune.errors import UserInputError
from sofim_tune.files import read_json, redact_storage_url, write_text_atomic
from sofim_tune.models import build_model
from sofim_tune.parallelism import Parallelism, plan
from sofim_tune.records import Confirmation, StudyRecord, TrialRecord
from sofim_tune.space import OPTIMIZER_HYPERPARAMETERS, SearchSpace
from sofim_tune.spec import StudySpec
from sofim_tune.batched import TrialBatch, batch_problem
from sofim_tune.data import dataset_info_for, final_images, has_fixed_validation
from sofim_tune.trial import TrialConfig, TrialResult, prepare_trial, resolve_device, train_trial

if TYPE_CHECKING:
    import optuna

RUN_FILE = "run.json"
# A value within this share of a range's width (in log units for log ranges) of a bound sits
# on it: best.json names such bounds, and a study widens them.
EDGE_SHARE = 0.05
# A storage that run.json names without a scheme is a file inside the run folder, so the
# folder can be moved or copied with its study.
DEFAULT_STORAGE_FILE = "study.db"
log = logging.getLogger("sofim_tune")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class RunOptions:
    """How and where a study runs; the what (dataset, budget, space) is the :class:`StudySpec`.

    Attributes:
        out_dir: the run folder (storage, best.json, report.html, plots/).
        storage: Optuna storage URL (``sqlite:///...``, ``postgresql://...``, ``journal:PATH``);
            None means SQLite at ``out_dir/study.db``. For Ray: ignored.
        workers: Optuna worker processes sharing the storage, >= 1; None picks them
            (:func:`parallelism_for`: one per physical core on the CPU, one thread each).
        threads_per_trial: torch intra-op threads of each worker, >= 1; None picks them.
        batch_trials: trials each worker trains at once as one stacked model
            (``sofim_tune.batched``), >= 1; None or 1 trains one at a time.
        parallelism: what was chosen for the three and why, in words (set by :func:`planned`,
            which leaves options that have it alone).
        gpus: GPU indices to spread workers over, round-robin; empty means ``device``.
        timeout: stop starting new trials after this many seconds (> 0); None runs to the
            target. Ray: Ray's time budget: running trials are stopped (they count as
            pruned) and the study ends; a rerun does not continue it.
        enqueue: settings (the optimizer's names) to try before sampling.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for trials not pinned to a GPU.
        data_dir, download: where torchvision datasets live, and whether to fetch them.
        export: retrain the top settings, write best.json and the report at the end.
        address, gpus_per_trial, cpus_per_trial, max_concurrent, storage_path: Ray only; None
            means not given (the Optuna backend refuses any of them that is given, and the
            Ray backend refuses ``workers``, ``threads_per_trial``, ``gpus`` and ``storage``).
            :attr:`ray_cpus_per_trial` and :attr:`ray_gpus_per_trial` give the values in force.
    """

    out_dir: Path
    storage: str | None = None
    workers: int | None = None
    threads_per_trial: int | None = None
    batch_trials: int | None = None
    parallelism: str | None = None
    gpus: tuple[int, ...] = ()
    timeout: float | None = None
    enqueue: tuple[Mapping[str, float], ...] = ()
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    export: bool = True
    address: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    max_concurrent: int | None = None
    storage_path: str | None = None

    @property
    def ray_cpus_per_trial(self) -> float:
        """CPUs a Ray trial reserves: ``cpus_per_trial``, 1 when not given."""
        return 1.0 if self.cpus_per_trial is None else self.cpus_per_trial

    @property
    def ray_gpus_per_trial(self) -> float:
        """The share of a GPU a Ray trial reserves: ``gpus_per_trial``, 0 when not given."""
        return 0.0 if self.gpus_per_trial is None else self.gpus_per_trial


class Backend(Protocol):
    """What the pipeline needs of a search backend (``sofim_tune.backends.get_backend``)."""

    name: str

    def check_options(self, options: RunOptions) -> None:
        """Raise UserInputError for run options this backend cannot use, before any other work."""

    def run(self, spec: StudySpec, space: SearchSpace, options: RunOptions, *, on_progress: Callable[[StudyRecord], None] | None = None) -> StudyRecord:
        """Run (or resume) the study of ``spec`` to ``spec.trials`` finished trials."""

    def load(self, run_dir: Path | None, *, storage: str | None = None, study: str | None = None) -> StudyRecord:
        """Read a study back from its run folder (or, for Optuna, from ``storage``)."""

    def confirm(self, configs: Sequence[TrialConfig], options: RunOptions, on_done: Callable[[int], None] | None = None) -> list[TrialResult]:
        """Train each configuration once, in order, where the backend runs its trials;
        ``on_done(n)`` after each run that ends, ``n`` the runs ended so far."""

    def save_confirmations(self, record: StudyRecord, confirmations: list[Confirmation], options: RunOptions) -> StudyRecord:
        """Store the seed confirmations with the study, so that export and plot find them."""


# ---------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------


def default_storage_url(out_dir: Path) -> str:
    return f"sqlite:///{out_dir.resolve() / DEFAULT_STORAGE_FILE}"


def storage_file(url: str) -> Path | None:
    """The local file behind a journal or SQLite URL; None for a database server."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:")).expanduser()
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def run_file_storage(url: str, out_dir: Path) -> str:
    """How run.json names a storage: relative to the folder when the file lies inside it.

    Also makes a relative SQLite or journal path absolute, so that the folder's commands
    work from any working directory. Any password is redacted.
    """
    file = storage_file(url)
    if file is None:
        return redact_storage_url(url)
    file = file.resolve()
    scheme = "journal:" if url.startswith("journal:") else ""
    try:
        return scheme + str(file.relative_to(out_dir.resolve()))
    except ValueError:
        return (scheme or "sqlite:///") + str(file)


def storage_from_run_file(value: str, run_dir: Path) -> str:
    """Inverse of :func:`run_file_storage`: a URL the backend can open."""
    if "://" in value:
        return value
    if value.startswith("journal:"):
        return f"journal:{run_dir.resolve() / value.removeprefix('journal:')}"  # an absolute path stays itself
    return f"sqlite:///{run_dir.resolve() / value}"


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder: backend, storage (see :func:`run_file_storage`), study."""
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"{run_dir} is a file, not a run folder")
    if not run_file.exists():
        raise UserInputError(f"{run_dir} holds no sofim-tune study (no {RUN_FILE}); give the folder that `sofim-tune run --out` wrote")
    instead = "pass the study's storage with --storage and --study-name"
    try:
        meta = read_json(run_file, f"{run_file} is corrupted")
    except UserInputError as exc:
        raise UserInputError(f"{exc}; {instead}") from None
    if not (isinstance(meta, dict) and all(isinstance(meta.get(key), str) for key in ("backend", "storage", "study"))):
        raise UserInputError(f"{run_file} is corrupted: it lacks the backend, storage or study; {instead}")
    return meta


def check_run_folder(out_dir: Path, *, backend: str, storage: str | None, study: str) -> None:
    """Refuse a run folder that cannot hold this study; writes nothing.

    The folder may be missing, empty, or a run folder of the same study (same backend,
    storage and name; ``storage=None`` when the caller does not know it yet). A file, a
    folder of other files (a user's own ``best.json``, say) or a run folder of another
    study is refused, so nothing a user owns is overwritten.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir} is a file; give a folder for the run")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / RUN_FILE).is_file():
        if storage is not None and _only_storage(out_dir, storage):
            return  # a run stopped between creating its storage and writing run.json
        raise UserInputError(f"--out {out_dir} is not empty and is not a sofim-tune run folder (no {RUN_FILE}); choose a new or empty folder")
    try:
        current = read_run_file(out_dir)
    except UserInputError:
        current = None
    if current is None or (current["backend"], current["study"]) != (backend, study):
        raise UserInputError(f"{out_dir} already holds another study ({out_dir / RUN_FILE}); choose another --out")
    if storage is not None and current["storage"] != run_file_storage(storage, out_dir):
        raise UserInputError(f"{out_dir} keeps this study in another storage ({current['storage']}); leave --storage out, or choose another --out")
    # run.json is written after the storage is created, so a storage file it names was there.
    file = storage_file(storage_from_run_file(current["storage"], out_dir)) if backend == "optuna" else None
    if file is not None and not file.exists():
        raise UserInputError(f"{out_dir} is the run folder of study {study!r}, but {file} is missing; put it back, or choose another --out")


def _only_storage(out_dir: Path, storage: str) -> bool:
    """Whether ``out_dir`` holds nothing but the file of ``storage`` (and SQLite's side files)."""
    file = storage_file(storage)
    if file is None or file.resolve().parent != out_dir.resolve():
        return False
    own = {file.name + suffix for suffix in ("", "-journal", "-wal", "-shm")}
    return all(entry.name in own for entry in out_dir.iterdir())


def claim_run_folder(out_dir: Path, *, backend: str, storage: str, study: str) -> None:
    """Write the folder's ``run.json``; call :func:`check_run_folder` before writing anything."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create run folder {out_dir}: {exc.strerror}") from None
    claim = {"backend": backend, "storage": run_file_storage(storage, out_dir), "study": study}
    write_text_atomic(out_dir / RUN_FILE, json.dumps(claim, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# What a study records about itself, and the checks on resume
# ---------------------------------------------------------------------------------------


def effective_epochs(spec: StudySpec, space: SearchSpace) -> int:
    """Epochs per trial: a space may pin them, else the spec's."""
    return int(space.fixed.get("epochs", spec.epochs))


def effective_batch_size(spec: StudySpec, space: SearchSpace) -> int:
    """Examples per step: a space may pin it, else the spec's."""
    return int(space.fixed.get("batch_size", spec.batch_size))


def decoupled_weight_decay(spec: StudySpec, optimizer: str) -> bool:
    """Whether ``optimizer`` decays weights decoupled: the spec's choice for SOFIM; AdamW
    always does. SGD cannot, and a spec that asks for it with SGD is refused."""
    if optimizer == "sgd-momentum" and spec.decoupled_weight_decay:
        raise UserInputError(f"{spec.source or 'the study'} asks for decoupled weight decay, which SGD does not have; pass --coupled-weight-decay for SGD")
    return True if optimizer == "adamw" else spec.decoupled_weight_decay


def recipe(spec: StudySpec, space: SearchSpace) -> dict[str, Any]:
    """The training recipe every trial of the study shares, augmentation resolved to its mode."""
    return {
        "augment": spec.augment or dataset_info_for(spec.dataset, spec.image_size).augment,
        "image_size": spec.image_size,
        "schedule": spec.schedule,
        "warmup_epochs": spec.warmup_epochs,
        "label_smoothing": spec.label_smoothing,
        "decoupled_weight_decay": decoupled_weight_decay(spec, space.optimizer),
    }


def study_metadata(spec: StudySpec, space: SearchSpace, url: str) -> dict[str, Any]:
    """What a study records about itself when it begins (read back by :func:`record_from_metadata`)."""
    return {
        "dataset": spec.dataset,
        "arch": spec.arch,
        "optimizer": space.optimizer,
        "space": space.name,
        "space_fingerprint": space.fingerprint(),
        "space_definition": space.to_dict(),
        "log_params": sorted(space.log_hyperparameters),
        "metric": spec.metric,
        "direction": spec.direction,
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "epochs": effective_epochs(spec, space),
        "batch_size": effective_batch_size(spec, space),
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "val_fraction": spec.val_fraction,
        "fixed": dict(space.fixed),
        "recipe": recipe(spec, space),
        "trials": spec.trials,
        "widen": spec.widen,
        "lookahead": spec.lookahead,
        "storage": redact_storage_url(url),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record_from_metadata(meta: Mapping[str, Any], *, name: str, backend: str, trials: list[TrialRecord], confirmations: list[Confirmation]) -> StudyRecord:
    """A StudyRecord from the metadata that :func:`study_metadata` wrote; shared by both backends."""
    return StudyRecord(
        name=name,
        backend=backend,
        storage=meta["storage"],
        dataset=meta["dataset"],
        arch=meta["arch"],
        optimizer=meta["optimizer"],
        space=meta["space"],
        log_params=frozenset(meta["log_params"]),
        metric=meta["metric"],
        direction=meta["direction"],
        sampler=meta["sampler"],
        pruner=meta["pruner"],
        epochs=meta["epochs"],
        batch_size=meta["batch_size"],
        fixed={**meta["fixed"], **meta.get("recipe", {})},
        trials=sorted(trials, key=lambda t: t.number),
        target_trials=meta["trials"],
        confirmations=confirmations,
        created=datetime.fromisoformat(meta["created"]),
        bounds=search_bounds(meta),
        widenings=list(meta.get("widenings", [])),
    )


def search_bounds(meta: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """The bounds of the searched optimizer hyperparameters, widened ones included."""
    params = {**meta["space_definition"]["params"], **meta.get("widened_params", {})}
    return {name: (float(p["low"]), float(p["high"])) for name, p in params.items() if name != "lr_over_rho"}


def check_resumable(meta: Mapping[str, Any], spec: StudySpec, space: SearchSpace, where: str) -> None:
    """Refuse to resume a study whose trials could not be compared with the new ones.

    ``meta`` is what the backend stored when the study began (:func:`study_metadata`);
    ``where`` names the study in the message.
    """
    if meta["space_fingerprint"] != space.fingerprint():
        raise UserInputError(f"{where} was made with a different search space ({meta['space']}); use another --out, or the same space")
    if meta["metric"] != spec.metric or meta["direction"] != spec.direction:
        raise UserInputError(f"{where} optimizes {meta['metric']} ({meta['direction']}), not {spec.metric} ({spec.direction})")
    wanted = {
        "dataset": spec.dataset,
        "arch": spec.arch,
        "epochs": effective_epochs(spec, space),
        "batch_size": effective_batch_size(spec, space),
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "val_fraction": spec.val_fraction,
        "recipe": recipe(spec, space),
    }
    for key, value in wanted.items():
        if meta.get(key, value) != value:
            raise UserInputError(f"{where} was run with {key}={meta[key]}, not {value}; trials with different settings cannot be compared: use another --out")


# ---------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------


def trial_config(
    spec: StudySpec,
    space: SearchSpace,
    hyperparameters: Mapping[str, float],
    *,
    seed: int,
    device: str,
    options: RunOptions,
    evaluate_test: bool = False,
    split_seed: int | None = None,
    final: bool = False,
) -> TrialConfig:
    """The TrialConfig of one trial; both backends, the selection and the final runs build it here.

    Search trials train on the spec's split (``split_seed=None``). Selection runs pass their
    own, so that they are not scored on the images that selected them, and keep the study's
    final images out of their validation; ``final`` runs validate on exactly those.
    """
    optimizer_keys = {k: v for k, v in space.fixed.items() if k not in ("batch_size", "epochs")}
    return TrialConfig(
        dataset=spec.dataset,
        arch=spec.arch,
        optimizer=space.optimizer,
        hyperparameters={**optimizer_keys, **hyperparameters},
        epochs=effective_epochs(spec, space),
        batch_size=effective_batch_size(spec, space),
        seed=seed,
        device=device,
        data_dir=options.data_dir,
        download=options.download,
        val_fraction=spec.val_fraction,
        split_seed=spec.split_seed if split_seed is None else split_seed,
        final_seed=None if split_seed is None and not final else spec.split_seed,
        final=final,
        evaluate_test=evaluate_test,
        augment=spec.augment,
        image_size=spec.image_size,
        schedule=spec.schedule,
        warmup_epochs=spec.warmup_epochs,
        label_smoothing=spec.label_smoothing,
        decoupled_weight_decay=decoupled_weight_decay(spec, space.optimizer),
    )


# The settings each optimizer's users start from: a spec's settings are completed with them, and
# they are tried first themselves when a spec names none for the optimizer.
FIRST_SETTINGS: dict[str, dict[str, float]] = {
    "sofim": {"lr": 0.1, "rho": 1.0, "beta1": 0.9, "weight_decay": 5e-4},
    "sofim-tensor": {"lr": 0.1, "rho": 1.0, "beta1": 0.9, "weight_decay": 5e-4},
    "sgd-momentum": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "weight_decay": 1e-2},
}


def settings_to_enqueue(spec: StudySpec, space: SearchSpace, options: RunOptions) -> list[dict[str, float]]:
    """The sampler's values of the settings to try first: the spec's, then ``options.enqueue``.

    A spec's settings are meant for the optimizer whose names they use (SOFIM's, in the
    shipped specs). Each is completed with :data:`FIRST_SETTINGS` for the names the space
    searches and it lacks (``weight_decay`` for a ``-wd`` space), and left out when it names
    another optimizer's hyperparameters or does not fit the space (``--space adamw``, or a
    space that fixes what the setting gives). When none is left, the optimizer's usual first
    settings are tried, if they fit. Settings the user passed (``--enqueue best.json``)
    must fit the space.
    """
    takes = set(OPTIMIZER_HYPERPARAMETERS[space.optimizer])
    first = FIRST_SETTINGS.get(space.optimizer, {})
    searched = set(space.to_hyperparameters({name: p.low for name, p in space.params.items()}))
    candidates = [settings for settings in spec.enqueue if set(settings) <= takes] or [first]
    fitting = []
    for settings in candidates:
        completed = {name: settings.get(name, first.get(name)) for name in searched}
        if None in completed.values():
            continue
        try:
            fitting.append(space.from_hyperparameters(completed))
        except UserInputError:
            continue
    return [*fitting, *(space.from_hyperparameters(settings) for settings in options.enqueue)]


def worst_value(direction: str) -> float:
    """The finite value that a diverged or failed run counts as: below any real accuracy
    (maximize) or above any real loss (minimize).

    Finite and modest, so that a sampler that standardises values (GP, TPE's ranking) or a
    scheduler that interpolates percentiles (ASHA) is not flattened by it.
    """
    return 0.0 if direction == "maximize" else 1e6


def parallelism_for(spec: StudySpec, space: SearchSpace, options: RunOptions) -> Parallelism:
    """How many trials of this study run at once, with how many threads (see :mod:`sofim_tune.parallelism`).

    Loads the study's data on the CPU (cached for this process and the workers it forks),
    which also checks that its trials can start, as :func:`check_sampler` checks its sampler,
    and (``options.export``) that its final images can be drawn: UserInputError otherwise.
    """
    if options.workers is not None and options.workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {options.workers}")
    if options.threads_per_trial is not None and options.threads_per_trial < 1:
        raise UserInputError(f"--threads-per-trial must be >= 1, got {options.threads_per_trial}")
    if options.batch_trials is not None and options.batch_trials < 1:
        raise UserInputError(f"--batch-trials must be >= 1, got {options.batch_trials}")
    check_sampler(spec, space)
    some_settings = space.to_hyperparameters({name: p.low for name, p in space.params.items()})
    config = trial_config(spec, space, some_settings, seed=spec.seed, device="cpu", options=options)
    data = prepare_trial(config)
    if options.export:
        # Refused now rather than after the search: a validation share of a half or more
        # leaves too few training images to draw the final images from (a folder with val/
        # draws them from all of train/).
        fixed = has_fixed_validation(spec.dataset)
        final_images(len(data.train) + (0 if fixed else len(data.val)), spec.val_fraction, spec.split_seed, fixed_validation=fixed)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(spec.arch or data.info.default_arch, data.info).parameters())
    info = data.info
    return plan(
        on_gpu=bool(options.gpus) or resolve_device(options.device).type == "cuda",
        gpus=len(options.gpus) or 1,
        model_parameters=parameters,
        data_bytes=(len(data.train) + len(data.val)) * info.channels * info.image_size**2,
        trials=spec.trials,
        workers=options.workers,
        threads=options.threads_per_trial,
        batch_trials=options.batch_trials,
        batch_problem=batch_problem(config, data),
        lookahead=spec.lookahead,
    )


def planned(spec: StudySpec, space: SearchSpace, options: RunOptions) -> RunOptions:
    """``options`` with the workers, threads per trial and batch size of :func:`parallelism_for`
    filled in and its reason in ``parallelism``; options this returned before come back as they are.

    A ``--batch-trials`` the model cannot use is warned about once, here.
    """
    if options.parallelism is not None:
        return options
    chosen = parallelism_for(spec, space, options)
    if chosen.refused_batch is not None:
        log.warning("--batch-trials %d: %s; trials run one at a time", options.batch_trials, chosen.refused_batch)
    return dataclasses.replace(options, workers=chosen.workers, threads_per_trial=chosen.threads, batch_trials=chosen.batch_trials, parallelism=chosen.reason)


def spread_devices(workers: int, gpus: Sequence[int], device: str) -> list[str]:
    """One device per worker: GPUs round-robin (several workers may share one), else ``device``."""
    if not gpus:
        return [device] * workers
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(workers)]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: unchanged) for a block, then restored."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_context(devices: Sequence[str]) -> multiprocessing.context.BaseContext:
    """How to start worker processes for trials on ``devices``.

    Fork on the CPU: a forked worker starts in milliseconds with torch, the study's code
    and its decoded data already in memory, where a spawned one pays seconds of imports
    and the data load again. Spawn when a trial may touch CUDA, which cannot be forked.
    """
    on_cpu = all(resolve_device(device).type == "cpu" for device in devices)
    return multiprocessing.get_context("fork" if on_cpu and "fork" in multiprocessing.get_all_start_methods() else "spawn")


def start_worker(threads: int) -> None:
    """First thing in a worker process: its torch threads, and death with its parent.

    A forked worker would otherwise keep its parent's thread count. And a worker whose
    sofim-tune was killed (``kill -9``) must not go on training unseen: on Linux it gets
    SIGKILL too, and the rerun retries what it left.
    """
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
            os._exit(1)


def failed_result(config: TrialConfig, error: BaseException | str, device: str) -> TrialResult:
    """A run that never returned (its worker died, its task raised) as the failed run it is."""
    if isinstance(error, BaseException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        error = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return TrialResult(status="failed", metrics={}, history=[], epochs=0, seconds=0.0, device=device, arch=config.arch or "", config=config, error=error)


def train_in_parallel(
    configs: Sequence[TrialConfig], *, workers: int, threads: int | None, batch_trials: int = 1, on_done: Callable[[int], None] | None = None
) -> list[TrialResult]:
    """Train every config, ``workers`` at a time with ``threads`` each; results in order.
    ``on_done(n)`` follows every job that ends (one run, or a batch's runs), ``n`` the runs
    ended so far.

    With ``batch_trials`` > 1, configs that share their data (dataset and split) and that
    the batched path can train go through one :class:`~sofim_tune.batched.TrialBatch` of that
    many slots; the rest run one by one (``train_trial``). One worker trains in this
    process. A worker that dies (the OOM killer), or a job that raises outside any one run,
    fails the runs it had not returned; the others are kept, as ``train_trial`` keeps the
    others when one run fails.
    """
    jobs = _jobs(configs, batch_trials)
    workers = min(workers, len(jobs))
    results: dict[int, TrialResult] = {}
    report = on_done or (lambda ended: None)
    if workers <= 1:
        with torch_threads(threads):
            for indices, slots in jobs:
                results.update(zip(indices, _train_job([configs[i] for i in indices], slots), strict=True))
                report(len(results))
        return [results[i] for i in range(len(configs))]
    context = worker_context([config.device for config in configs])
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker, initargs=(threads or 1,)) as pool:
        futures = {pool.submit(_train_job, [configs[i] for i in indices], slots): indices for indices, slots in jobs}
        for future in concurrent.futures.as_completed(futures):
            indices = futures[future]
            try:
                results.update(zip(indices, future.result(), strict=True))
            except Exception as exc:  # noqa: BLE001 - a dead worker (BrokenProcessPool), or what _train_job let through
                results.update((i, failed_result(configs[i], exc, configs[i].device)) for i in indices)
            report(len(results))
    return [results[i] for i in range(len(configs))]


def _jobs(configs: Sequence[TrialConfig], batch_trials: int) -> list[tuple[list[int], int]]:
    """Which configs train together (their indices) and with how many slots (1: one by one)."""
    if batch_trials <= 1:
        return [([i], 1) for i in range(len(configs))]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, config in enumerate(configs):
        shared = (config.dataset, config.arch, config.optimizer, config.batch_size, config.device, config.val_fraction, config.split_seed, config.final_seed, config.final, config.image_size, config.data_dir)
        groups.setdefault(shared, []).append(index)
    return [(indices, min(batch_trials, len(indices))) for indices in groups.values()]


def _train_job(configs: list[TrialConfig], slots: int) -> list[TrialResult]:
    """Configs that share their data: one by one, or ``slots`` at a time as one batched model.

    An error in a batch (a CUDA out-of-memory, say) fails the members it held, as
    ``train_trial`` fails its run; the rest go on in a new batch.
    """
    data = prepare_trial(dataclasses.replace(configs[0], evaluate_test=any(c.evaluate_test for c in configs))) if slots > 1 else None
    if data is None or any(batch_problem(config, data) for config in configs):
        return [train_trial(config) for config in configs]
    waiting = list(range(len(configs)))
    slot_of: dict[int, int] = {}
    results: dict[int, TrialResult] = {}
    batch: TrialBatch | None = None
    while waiting or slot_of:
        try:
            if batch is None:
                batch = TrialBatch(data, arch=configs[0].arch, optimizer=configs[0].optimizer, batch_size=configs[0].batch_size, slots=slots)
            while waiting and batch.free_slots:
                slot_of[batch.add(configs[waiting[0]])] = waiting[0]
                waiting.pop(0)
            for slot, outcome in batch.train_epoch().items():
                if outcome.done:
                    results[slot_of[slot]] = batch.finish(slot)
                    del slot_of[slot]
        except Exception as exc:  # noqa: BLE001 - recorded on the members it hit; the others go on
            failing = list(slot_of.values()) or [waiting.pop(0)]  # nothing in the batch yet: the config it could not take
            results.update((index, failed_result(configs[index], exc, configs[index].device)) for index in failing)
            slot_of.clear()
            batch = None
    return [results[i] for i in range(len(configs))]


# ---------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------


def sampler_seed(base: int, index: int) -> int:
    """The seed of the sampler that draws the trial with logical index ``index`` of a study seeded ``base``.

    It depends on these two alone, so a trial draws the same settings whichever worker
    draws them and whenever, and a resumed or extended study draws new ones for new trials.
    """
    return int(numpy.random.SeedSequence([base, index]).generate_state(1)[0])


MAX_GRID_POINTS = 100_000
"""The most points ``--sampler grid`` may have: Optuna's grid sampler builds the list of all of
them up front in every worker (about 10 MB at this size), and walks it for every trial."""


def grid_points_per_axis(space: SearchSpace, trials: int) -> int:
    """Values per parameter of the grid for ``trials``: the fewest (at least 2) whose grid has
    ``trials`` points; UserInputError when that grid has more than :data:`MAX_GRID_POINTS`."""
    axes = max(1, len(space.params))
    per_axis = 2
    while per_axis**axes < trials and per_axis**axes <= MAX_GRID_POINTS:
        per_axis += 1
    if max(trials, per_axis**axes) > MAX_GRID_POINTS:
        raise UserInputError(
            f"--sampler grid builds all of its points up front: --trials {trials} needs at least {max(trials, per_axis**axes):,} of them, "
            f"more than the limit of {MAX_GRID_POINTS:,}; give fewer --trials or another --sampler"
        )
    return per_axis


def check_sampler(spec: StudySpec, space: SearchSpace) -> None:
    """Refuse a sampler that cannot be built for this study (a grid too large); writes nothing."""
    if spec.sampler == "grid":
        grid_points_per_axis(space, spec.trials)


def grid_axes(space: SearchSpace, trials: int) -> dict[str, list[float]]:
    """Evenly spaced values per parameter (geometric for log ranges), at least ``trials`` points in all.

    Rounding up, so that a grid never has fewer points than the study has trials to run; a
    grid of more than :data:`MAX_GRID_POINTS` is refused (:func:`grid_points_per_axis`).
    """
    per_axis = grid_points_per_axis(space, trials)
    axes = {}
    for name, p in space.params.items():
        if p.log:
            low, high = math.log(p.low), math.log(p.high)
            values = [math.exp(low + (high - low) * i / (per_axis - 1)) for i in range(per_axis)]
        else:
            values = [p.low + (p.high - p.low) * i / (per_axis - 1) for i in range(per_axis)]
        # exp(log(x)) can land an ulp outside the range; the ends are the bounds themselves.
        values[0], values[-1] = p.low, p.high
        axes[name] = sorted({int(round(v)) for v in values}) if p.type == "int" else values
    return axes


def make_sampler(name: str, space: SearchSpace, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``--sampler``; see :func:`sampler_seed` for ``seed``."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        with optuna_experimental():
            return optuna.samplers.QMCSampler(scramble=True, seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_axes(space, trials), seed=seed)
    raise UserInputError(f"unknown sampler {name!r}")


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Optuna's ExperimentalWarning silenced in a block, and only there: the heartbeat that
    recovers trials of dead processes and the QMC sampler are marked experimental, and
    sofim-tune uses them on purpose."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        yield


def describe_exit(exitcode: int) -> str:
    """``was killed by SIGKILL`` or ``exited with code 3``: how a worker process ended."""
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
