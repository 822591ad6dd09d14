"""Optuna backend: a study in an RDB or journal storage, K worker processes, resume on rerun.

The study's own attributes (``sofim_tune``) record what was tuned, so that ``export``,
``plot`` and ``show`` can read a study from its storage alone, and a rerun with a different
search space is refused instead of mixing two searches in one study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import multiprocessing.process
import os
import re
import signal
import socket
import sqlite3
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy
import optuna
import scipy.stats.qmc
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial, TrialState

from sofim_tune import interrupts
from sofim_tune.backends.views import (
    DEFERRED,
    RETRIED_REASONS,
    Deferred,
    ViewPruner,
    copy_new_system_attrs,
    fixed_view,
    logical_indices,
    settled_prefix,
    view_study,
)
from sofim_tune.errors import TrialPruned, UserInputError
from sofim_tune.files import read_head, redact_storage_message, redact_storage_url, storage_password
from sofim_tune.records import Confirmation, StudyRecord, TrialRecord
from sofim_tune.space import ParamRange, SearchSpace
from sofim_tune.spec import StudySpec
from sofim_tune.study import (
    EDGE_SHARE,
    RUN_FILE,
    RunOptions,
    check_resumable,
    check_run_folder,
    check_sampler,
    claim_run_folder,
    default_storage_url,
    describe_exit,
    effective_epochs,
    grid_axes,
    make_sampler,
    optuna_experimental,
    planned,
    read_run_file,
    record_from_metadata,
    sampler_seed,
    settings_to_enqueue,
    spread_devices,
    start_worker,
    storage_file,
    storage_from_run_file,
    study_metadata,
    torch_threads,
    train_in_parallel,
    trial_config,
    worker_context,
    worst_value,
)
from sofim_tune.batched import TrialBatch
from sofim_tune.trial import TrialConfig, TrialResult, prepare_trial, train_trial

ATTR = "sofim_tune"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed", TrialState.RUNNING: "running"}
# A worker whose trials all fail (a broken GPU, say) must not loop for ever.
MAX_CONSECUTIVE_FAILURES = 10
HEARTBEAT_SECONDS = 30
HEARTBEAT_RETRY_SECONDS = 5
GRACE_SECONDS = 120
POLL_SECONDS = 1.0
# How often a worker waiting for a trial's view checks whether it is complete: one light query.
VIEW_POLL_SECONDS = 0.05
_HOST = socket.gethostname()
# A trial asked for after the study already had its target finished or running; it is
# failed at once, and no record, count or sampler ever sees it.
SURPLUS = "surplus"
# SQLAlchemy's URL schemes whose driver is not installed with sofim-tune, and what installs it.
_DRIVER_PACKAGES = {"psycopg": "'sofim-tune[postgres]'", "psycopg2": "'sofim-tune[postgres]' (and write postgresql+psycopg://)", "MySQLdb": "mysqlclient", "pymysql": "pymysql"}
log = logging.getLogger("sofim_tune")
# A journal's first line is read to tell it from a user's file; no journal record is longer.
_JOURNAL_HEAD_BYTES = 64 * 1024
_SQLITE_HEADER = b"SQLite format 3\x00"
# Options of RunOptions that only the Ray backend uses, and what does their work with Optuna.
_RAY_ONLY_OPTIONS = {
    "cpus_per_trial": ("--cpus-per-trial", "with the Optuna backend use --threads-per-trial"),
    "gpus_per_trial": ("--gpus-per-trial", "with the Optuna backend use --gpus (its workers are spread over them)"),
    "max_concurrent": ("--max-concurrent", "with the Optuna backend use --workers"),
    "address": ("--address", "the Optuna backend runs its workers on this machine; to share a study between machines give each the same --storage"),
    "storage_path": ("--storage-path", "with the Optuna backend use --storage"),
}


class TrialFailed(Exception):
    """A trial's run failed; Optuna records it as FAIL and the study goes on."""


def storage_url(options: RunOptions) -> str:
    """The storage URL a run uses: ``--storage`` as given, or SQLite in the run folder."""
    return options.storage if options.storage is not None else default_storage_url(options.out_dir)


def check_storage(url: str) -> None:
    """Refuse a storage URL that could not keep a study, or whose file is not a storage; reads only.

    Checked before anything is written: a study must outlive its process (no in-memory
    SQLite), a password's ``@`` must be percent-encoded (a driver would read the rest as the
    host and print it), and a file that already exists must be a regular file holding an
    Optuna journal (``journal:PATH``) or an SQLite database that is empty or Optuna's
    (``sqlite:///PATH``). A new or empty file is fine.
    """
    shown = redact_storage_url(url)
    if "@" in storage_password(url):
        raise UserInputError(f"storage {shown}: its password holds an unescaped '@'; percent-encode it as %40 (and ':' as %3A, '/' as %2F)")
    if url.startswith("sqlite") and _in_memory(url):
        raise UserInputError(f"storage {shown} keeps the study in memory, which ends with this process, so it could not be resumed, exported or shown; give a file: sqlite:///PATH")
    file = storage_file(url)
    if file is None:
        return
    if url.startswith("journal:") and not str(file):
        raise UserInputError("storage journal: names no file; give journal:PATH")
    try:
        head = read_head(file, _JOURNAL_HEAD_BYTES)
    except UserInputError as exc:
        raise UserInputError(f"storage {shown}: {file}: {exc}") from None
    if head is None:
        return
    if not head:
        return
    if url.startswith("journal:"):
        if not _is_journal(head):
            raise UserInputError(f"storage {shown}: {file} is not an Optuna journal (its first line is no journal record), and sofim-tune writes into no other file; give a new, empty or journal file")
    elif not head.startswith(_SQLITE_HEADER):
        raise UserInputError(f"storage {shown}: {file} is not an SQLite database; give a new, empty or Optuna SQLite file")
    else:
        tables = _sqlite_tables(file)
        if tables and not {"studies", "version_info"} <= tables:
            raise UserInputError(f"storage {shown}: {file} holds a database that is not an Optuna storage (tables {', '.join(sorted(tables))}); give a new, empty or Optuna SQLite file")


def _in_memory(url: str) -> bool:
    """Whether an SQLite URL names an in-memory database (``sqlite://``, ``sqlite:///:memory:``, ``mode=memory``)."""
    match = re.match(r"sqlite(?:\+\w+)?://(?P<path>[^?]*)", url)
    if match is None:
        return False
    database = match["path"].removeprefix("/")
    return database in ("", ":memory:") or database.startswith("file::memory:") or "mode=memory" in url


def _is_journal(head: bytes) -> bool:
    """Whether the first bytes of a file start like an Optuna journal: records of one JSON object
    a line (``op_code``, ``worker_id``), the first creating a study."""
    lines = head.split(b"\n")[:-1]  # the last piece may be cut off by the read
    if not lines:
        return False
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if not (isinstance(record, dict) and type(record.get("op_code")) is int and isinstance(record.get("worker_id"), str)):
            return False
        if index == 0 and record["op_code"] != JournalOperation.CREATE_STUDY:
            return False
    return True


def _sqlite_tables(file: Path) -> set[str]:
    """The tables of an SQLite file, read without writing anything, unless a process was killed
    while it wrote: its hot journal must be rolled back before the file can be read, as SQLite
    does on any open for writing, and as the study's own storage would do next."""
    try:
        try:
            return _read_tables(file, "ro")
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) or not file.with_name(file.name + "-journal").is_file():
                raise
            return _read_tables(file, "rw")
    except sqlite3.Error as exc:
        raise UserInputError(f"storage sqlite:///{file}: cannot read it as an SQLite database: {exc}") from None


def _read_tables(file: Path, mode: str) -> set[str]:
    # As long as the storage waits for a lock: workers may be writing to it.
    with contextlib.closing(sqlite3.connect(f"{file.resolve().as_uri()}?mode={mode}", uri=True, timeout=300)) as db:
        return {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}


def open_storage(url: str, *, create: bool = True) -> BaseStorage:
    """An Optuna storage for ``url``: ``journal:PATH`` for a journal file, else an SQLAlchemy URL.

    The URL is checked first (:func:`check_storage`). RDB storages get a heartbeat, so that
    trials of a process that died on another host are failed and retried after
    ``GRACE_SECONDS``; SQLite waits for a lock instead of failing with "database is locked"
    when several workers write at once. With ``create=False`` a missing SQLite or journal
    file is an error instead of a new empty storage. No part of a password is ever in the
    message of the error raised.
    """
    check_storage(url)
    file = storage_file(url)
    try:
        if file is not None and not create and not file.is_file():
            raise UserInputError(f"cannot open storage {redact_storage_url(url)}: {file} does not exist")
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        if url.startswith("journal:"):
            return JournalStorage(JournalFileBackend(str(file)))
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 300}} if url.startswith("sqlite") else {}
        with optuna_experimental():  # the heartbeat
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=retry_interrupted,
            )
    except UserInputError:
        raise
    except ImportError as exc:
        # Optuna's RDBStorage re-raises the driver's ModuleNotFoundError as a plain ImportError.
        missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
        name = getattr(missing, "name", None) if isinstance(missing, ImportError) else None
        if name is None:
            raise UserInputError(f"cannot open storage {redact_storage_url(url)}: {redact_storage_message(str(exc), url)}") from None
        raise UserInputError(f"cannot open storage {redact_storage_url(url)}: its database driver ({name}) is not installed; pip install {_DRIVER_PACKAGES.get(name, name)}") from None
    except Exception as exc:  # noqa: BLE001 - the file system, SQLAlchemy and drivers raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"cannot open storage {redact_storage_url(url)}: {redact_storage_message(reason, url)}") from None


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Pruning on the per-epoch validation metric; one epoch is the smallest resource."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserInputError(f"unknown pruner {name!r}")


# Widening: a log bound moves by this factor, at most this often per bound, once this many
# trials completed, when the median of the best WIDEN_TOP_SHARE of them sits on it.
WIDEN_FACTOR = 10.0
WIDEN_LIMIT = 2
WIDEN_AFTER = 8
WIDEN_TOP_SHARE = 0.2
WIDEN_SAMPLERS = ("tpe", "random", "gp")


# Where a study records the range each parameter declares to Optuna (see declared_ranges).
DECLARED_PARAMS = "declared_params"


def active_ranges(space: SearchSpace, meta: Mapping[str, Any]) -> dict[str, ParamRange]:
    """The space's ranges with the study's widened bounds in place: where new trials draw."""
    return _with_bounds(space, meta.get("widened_params", {}))


def declared_ranges(space: SearchSpace, meta: Mapping[str, Any]) -> dict[str, ParamRange]:
    """The range each parameter declares to Optuna, the same in every trial of the study.

    A study records its :func:`outer_ranges` when it is created. One made by a release
    before this one recorded none: its trials declared the bounds in force when they drew,
    and new trials go on doing so, so that its trials stay comparable until it widens.
    """
    declared = meta.get(DECLARED_PARAMS)
    return active_ranges(space, meta) if declared is None else _with_bounds(space, declared)


def outer_ranges(space: SearchSpace) -> dict[str, ParamRange]:
    """Each parameter's range as wide as widening can ever make it: every log range widened
    :data:`WIDEN_LIMIT` times on each side; the others as the space gives them."""
    ranges = dict(space.params)
    for name, p in space.params.items():
        for _ in range(WIDEN_LIMIT if p.log else 0):
            p = dataclasses.replace(p, low=_widened(p, "low"), high=_widened(p, "high"))
        ranges[name] = p
    return ranges


def _with_bounds(space: SearchSpace, bounds: Mapping[str, Mapping[str, float]]) -> dict[str, ParamRange]:
    """The space's ranges, those named in ``bounds`` with its low and high instead."""
    return {name: dataclasses.replace(p, low=bounds[name]["low"], high=bounds[name]["high"]) if name in bounds else p for name, p in space.params.items()}


def _widened(p: ParamRange, side: str) -> float:
    """Where one widening moves the ``side`` bound of the log range ``p``: a factor of
    :data:`WIDEN_FACTOR` outwards; an integer range's stays an integer of at least 1."""
    old = getattr(p, side)
    new = old / WIDEN_FACTOR if side == "low" else old * WIDEN_FACTOR
    return max(1.0, float(round(new))) if p.type == "int" else new


def widenings(space: SearchSpace, meta: Mapping[str, Any], trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """The bounds a study moves, in order, given its settled trials in order of logical index.

    After each completed trial, once :data:`WIDEN_AFTER` have completed, the best
    :data:`WIDEN_TOP_SHARE` of the completed trials so far (at least three) are looked at. When
    the median of their values of a log-scaled parameter lies within ``study.EDGE_SHARE`` of a
    range's width of a bound, that bound moves a decade outwards, at most :data:`WIDEN_LIMIT`
    times per bound. Each move is ``{"param", "side", "from", "to", "after_trials"}``.

    A function of the trials alone, so that a trial's bounds follow from its fixed view
    (:mod:`sofim_tune.backends.views`) whichever worker draws it.
    """
    if not meta.get("widen", False) or meta["sampler"] not in WIDEN_SAMPLERS:
        return []
    ranges = dict(space.params)
    moves: list[dict[str, Any]] = []
    completed: list[FrozenTrial] = []
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        completed.append(trial)
        if len(completed) < WIDEN_AFTER:
            continue
        ranked = sorted(completed, key=lambda t: t.value, reverse=meta["direction"] == "maximize")  # type: ignore[arg-type, return-value]
        top = ranked[: max(3, round(WIDEN_TOP_SHARE * len(completed)))]
        for name, p in ranges.items():
            values = [t.params[name] for t in top if name in t.params]
            if not p.log or not values:
                continue
            middle, low, high = (math.log(v) for v in (statistics.median(values), p.low, p.high))
            for side, at_bound in (("low", middle - low <= EDGE_SHARE * (high - low)), ("high", high - middle <= EDGE_SHARE * (high - low))):
                if not at_bound or sum(1 for w in moves if (w["param"], w["side"]) == (name, side)) >= WIDEN_LIMIT:
                    continue
                old, new = getattr(p, side), _widened(p, side)
                moves.append({"param": name, "side": side, "from": old, "to": new, "after_trials": len(completed)})
                p = dataclasses.replace(p, **{side: new})
            ranges[name] = p
    return moves


def _bounds_after(space: SearchSpace, moves: Sequence[Mapping[str, Any]]) -> dict[str, ParamRange]:
    """The space's ranges with ``moves`` (see :func:`widenings`) applied."""
    ranges = dict(space.params)
    for move in moves:
        ranges[move["param"]] = dataclasses.replace(ranges[move["param"]], **{move["side"]: move["to"]})
    return ranges


def _study_bounds(space: SearchSpace, meta: Mapping[str, Any], view: Sequence[FrozenTrial]) -> dict[str, ParamRange]:
    """Where a trial with fixed view ``view`` draws: its view's widenings applied to the space
    (the recorded bounds, in a study older than declared ranges: see :func:`record_widenings`)."""
    if DECLARED_PARAMS not in meta:
        return active_ranges(space, meta)
    return _bounds_after(space, widenings(space, meta, view))


def record_widenings(study: optuna.Study, space: SearchSpace) -> list[dict[str, Any]]:
    """Store with the study the widenings of its settled trials (:func:`widenings`), for the
    report and best.json, and log the new ones; returns those.

    A study made before studies declared one range per parameter keeps the widenings it
    recorded and widens no further: its trials declared the bounds in force, and a replay
    that moved them could only take lr out of the sampler's model again.
    """
    meta = study.user_attrs[ATTR]
    if DECLARED_PARAMS not in meta:
        return []
    moves = widenings(space, meta, settled_prefix(study.get_trials(deepcopy=False)))
    recorded = meta.get("widenings", [])
    if moves == recorded:
        return []
    widened = {name: {"low": r.low, "high": r.high} for name, r in _bounds_after(space, moves).items() if r != space.params[name]}
    study.set_user_attr(ATTR, {**meta, "widened_params": widened, "widenings": moves})
    new = [move for move in moves if move not in recorded]
    for change in new:
        log.info("widened %s's %s bound from %g to %g: the best trials sit on it", change["param"], change["side"], change["from"], change["to"])
    return new


def _suggest(trial: optuna.Trial, p: ParamRange) -> float:
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, log=p.log)


def _distribution(p: ParamRange) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a range."""
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
    return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)


class WithinBounds(optuna.samplers.BaseSampler):
    """A sampler made to draw within a trial's current (possibly widened) bounds while every
    trial declares the same distribution for each parameter.

    Optuna's relative samplers (multivariate TPE, GP, CMA-ES) model only the parameters that
    every finished trial declared with the same distribution (their intersection search space),
    and drop one for good once a trial declared another. A trial that declared a widened range would thus leave ``lr`` to
    independent draws (uniformly random ones under GP) for the rest of the study, and TPE would
    no longer see that lr and rho go together. So every trial declares one distribution per
    parameter, its range in :func:`declared_ranges` (the outer range, as wide as widening can
    make it), and this wrapper gives the wrapped sampler the current ``bounds`` in its place:

    * whenever the sampler samples relatively at all (it infers a non-empty relative space),
      its relative space is every searched parameter over the current bounds. Its model then
      sees every finished trial, since bounds only widen and so hold every value drawn before,
      and it proposes within the current box; after a widening that box is wider.
    * an independent draw (the first trials, random search) is asked for over the current bounds.

    Draws are clamped to the current bounds, against float round-off only. The values stored
    are the values the trial ran with.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, bounds: Mapping[str, ParamRange]) -> None:
        self.sampler = sampler
        self.bounds = {name: _distribution(p) for name, p in bounds.items()}

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, optuna.distributions.BaseDistribution]:
        inferred = self.sampler.infer_relative_search_space(study, trial)
        return {**inferred, **self.bounds} if inferred else {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        return {name: _clamp(value, self.bounds.get(name)) for name, value in self.sampler.sample_relative(study, trial, search_space).items()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: optuna.distributions.BaseDistribution) -> Any:
        distribution = self.bounds.get(param_name, param_distribution)
        return _clamp(self.sampler.sample_independent(study, trial, param_name, distribution), distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class _PlannedSampler(optuna.samplers.BaseSampler):
    """A worker's sampler on the live study: it hands each trial the settings that
    :class:`_Planner` drew for it from the trial's fixed view, by trial id."""

    def __init__(self) -> None:
        self.planned: dict[int, dict[str, Any]] = {}

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, optuna.distributions.BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: optuna.distributions.BaseDistribution) -> Any:
        return self.planned[trial._trial_id][param_name]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A trial ready to start: its logical index, and the range each parameter declares."""

    index: int
    ranges: dict[str, ParamRange]


class _Planner:
    """One worker's bridge between the live study and each trial's fixed view
    (:mod:`sofim_tune.backends.views`): it waits for a trial's view, draws the trial's settings
    from it, and keeps it for the pruner (:meth:`pruner`)."""

    def __init__(self, spec: StudySpec, space: SearchSpace) -> None:
        self.spec, self.space = spec, space
        self.sampler = _PlannedSampler()
        self.views: dict[int, tuple[int, list[FrozenTrial]]] = {}

    def pruner(self) -> optuna.pruners.BasePruner:
        """The spec's pruner, judging each trial against its fixed view (``none`` judges nothing)."""
        pruner = make_pruner(self.spec.pruner, effective_epochs(self.spec, self.space))
        if isinstance(pruner, optuna.pruners.NopPruner):
            return pruner
        return ViewPruner(pruner, self.views, self.spec.name, self.spec.direction)

    def plan(self, trial: optuna.Trial, *, wait: bool) -> _Plan | None:
        """The trial's logical index and declared ranges, once its view is complete and its
        settings are drawn.

        None while the view is not complete and ``wait`` is false; with ``wait`` it waits.
        Raises :class:`Deferred` when the view waits on a queued trial (see :func:`_defer`).
        """
        study = trial.study
        while True:
            trials = study.get_trials(deepcopy=False)
            view = fixed_view(trials, trial.number, self.spec.lookahead)
            if isinstance(view, list):
                break
            if not wait:
                return None
            _wait_for(study, view)
        index = logical_indices(trials)[trial.number]
        self.views[trial._trial_id] = (index, view)
        frozen = next(t for t in trials if t.number == trial.number)
        meta = study.user_attrs[ATTR]
        declared = declared_ranges(self.space, meta)
        if not set(declared) <= set(frozen.system_attrs.get("fixed_params", {})):
            self.sampler.planned[trial._trial_id] = self._draw(study, frozen, meta, declared, view, index)
        return _Plan(index, declared)

    def _draw(self, study: optuna.Study, trial: FrozenTrial, meta: Mapping[str, Any], declared: Mapping[str, ParamRange], view: list[FrozenTrial], index: int) -> dict[str, Any]:
        """Settings for the trial with logical index ``index``, from its view alone.

        Grid and QMC points follow from the index; the other samplers draw in a view study
        (:func:`~sofim_tune.backends.views.view_study`) seeded by the index, within the bounds
        that the view's widenings give.
        """
        if self.spec.sampler == "grid":
            return _grid_point(grid_axes(self.space, self.spec.trials), self.spec.seed, index)
        bounds = _study_bounds(self.space, meta, view)
        if self.spec.sampler == "qmc":
            return _qmc_point(bounds, self.spec.seed, index)
        sampler = WithinBounds(make_sampler(self.spec.sampler, self.space, sampler_seed(self.spec.seed, index), self.spec.trials), bounds)
        drawn_in = view_study(view, index, self.spec.name, self.spec.direction, sampler=sampler)
        drawn = drawn_in.ask()
        values = {name: _suggest(drawn, p) for name, p in declared.items()}
        copy_new_system_attrs(drawn_in, drawn._trial_id, {}, study, trial._trial_id)
        return values


def _wait_for(study: optuna.Study, trial: FrozenTrial) -> None:
    """Wait on ``trial``, which a view waits for: while it runs, until it ends (checked every
    :data:`VIEW_POLL_SECONDS`: a worker idles for as long as it oversleeps); an interrupted trial
    not yet queued again (the run's recovery queues it) for a second."""
    if trial.state != TrialState.RUNNING:
        time.sleep(POLL_SECONDS)
        return
    checked = time.monotonic()
    while study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
        time.sleep(VIEW_POLL_SECONDS)
        if is_heartbeat_enabled(study._storage) and time.monotonic() - checked > HEARTBEAT_SECONDS:
            # A trial whose process died on another host ends only when a live worker fails
            # it, as study.optimize does between trials; every worker may be waiting here.
            with optuna_experimental():
                optuna.storages.fail_stale_trials(study)
            checked = time.monotonic()


def _grid_point(axes: Mapping[str, Sequence[float]], seed: int, index: int) -> dict[str, float]:
    """Point ``index`` of the grid ``axes``, in an order shuffled by ``seed``: every trial a new
    point until the grid is used up, as Optuna's grid sampler draws them, but by index."""
    names = sorted(axes)
    sizes = [len(axes[name]) for name in names]
    code = int(numpy.random.default_rng(seed).permutation(math.prod(sizes))[index % math.prod(sizes)])
    point = {}
    for name, size in zip(reversed(names), reversed(sizes)):
        code, position = divmod(code, size)
        point[name] = axes[name][position]
    return point


def _qmc_point(ranges: Mapping[str, ParamRange], seed: int, index: int) -> dict[str, Any]:
    """Point ``index`` of a scrambled Sobol sequence seeded by ``seed`` over ``ranges`` (log
    ranges on a log scale), as Optuna's QMC sampler draws them, but by index."""
    engine = scipy.stats.qmc.Sobol(len(ranges), scramble=True, seed=seed)
    if index:  # scipy refuses to skip no points
        engine.fast_forward(index)
    point: dict[str, Any] = {}
    for (name, p), unit in zip(sorted(ranges.items()), engine.random(1)[0]):
        low, high = (math.log(p.low), math.log(p.high)) if p.log else (p.low, p.high)
        value = low + float(unit) * (high - low)
        value = min(max(math.exp(value) if p.log else value, p.low), p.high)
        point[name] = int(round(value)) if p.type == "int" else value
    return point


def _clamp(value: Any, distribution: optuna.distributions.BaseDistribution | None) -> Any:
    """``value`` within a numeric distribution's bounds; as it is for anything else."""
    if isinstance(distribution, (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)):
        return min(max(value, distribution.low), distribution.high)
    return value


class OptunaReporter:
    """A :func:`~sofim_tune.trial.train_trial` reporter for an Optuna trial: it reports ``metric``
    after each epoch (step = the epoch, from 1) and stops the run when the study's pruner says so,
    so that a study of your own trains sofim-tune trials with pruning (the README's "Your own
    Optuna study" shows one). The run then ends with status ``pruned``; raise
    ``optuna.TrialPruned`` from the objective to tell Optuna.

    Args:
        trial: the Optuna trial the run belongs to.
        metric: a key of the run's metrics, ``val_accuracy`` (a fraction in [0, 1]) or ``val_loss``.
    """

    def __init__(self, trial: optuna.Trial, metric: str = "val_accuracy") -> None:
        self.trial, self.metric = trial, metric

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.trial.report(metrics[self.metric], step=epoch)
        if self.trial.should_prune():
            raise TrialPruned


class _NotRun(Exception):
    """The trial does not run: the study had its target when it was asked for (``surplus``),
    or it stepped back for a queued trial (``deferred``, see :func:`_defer`)."""


# Reasons of trials that never ran: no record, count or view has them.
NOT_RUN = (SURPLUS, DEFERRED)


def _is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """Whether ``target`` trials numbered below ``number`` finished or are running.

    Trial numbers are handed out atomically by the storage, so when several workers ask
    at once exactly the first ones run, and the study stops at its target, not beyond.
    """
    ahead = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(1 for t in ahead if t.number < number) >= target


def _start(trial: optuna.Trial, plan: _Plan, spec: StudySpec, space: SearchSpace, options: RunOptions, device: str) -> TrialConfig:
    """Set a planned trial's settings (see :class:`_Planner`) and build its run, seeded by its logical index."""
    # Declared as the same distributions in every trial; the planner drew within the current bounds (WithinBounds).
    searched = {name: _suggest(trial, p) for name, p in plan.ranges.items()}
    hyperparameters = space.to_hyperparameters(searched)
    trial.set_user_attr("hyperparameters", hyperparameters)
    return trial_config(spec, space, hyperparameters, seed=spec.seed + plan.index, device=device, options=options)


def _defer(trial: optuna.Trial) -> None:
    """Step a trial back for the queued trial its view waits on (:class:`Deferred`): it is
    queued again under its logical index, behind that one, and fails as ``deferred``."""
    trial.set_user_attr("reason", DEFERRED)
    retry_interrupted(trial.study, trial.study._storage.get_trial(trial._trial_id))


def _settle(trial: optuna.Trial, result: TrialResult, spec: StudySpec) -> tuple[TrialState, float | None]:
    """Record a finished run on its trial; the state and value the study is told."""
    trial.set_user_attr("seconds", round(result.seconds, 3))
    if "fisher_ratio" in result.metrics:
        trial.set_user_attr("fisher_ratio", result.metrics["fisher_ratio"])
    if result.status == "completed":
        return TrialState.COMPLETE, result.metrics[spec.metric]
    trial.set_user_attr("reason", result.status)
    if result.status == "diverged":
        # Pruned rather than failed, with the worst value at the epoch it diverged, so that
        # the sampler ranks it below trials that trained that far, not by its last good epoch.
        trial.set_user_attr("diverged_epoch", result.diverged_epoch)
        if result.diverged_epoch > result.epochs:  # the epoch it diverged in reported nothing yet
            trial.report(worst_value(spec.direction), step=result.diverged_epoch)
        return TrialState.PRUNED, None
    if result.status == "pruned":
        return TrialState.PRUNED, None
    trial.set_user_attr("error", result.error)
    return TrialState.FAIL, None


def _mark_failed(trial: optuna.Trial, reason: str, exc: BaseException | None = None) -> None:
    trial.set_user_attr("reason", reason)
    if exc is not None:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")


class _Objective:
    """One trial at a time, through ``study.optimize``."""

    def __init__(self, spec: StudySpec, space: SearchSpace, options: RunOptions, device: str, planner: _Planner) -> None:
        self.spec, self.space, self.options, self.device, self.planner = spec, space, options, device, planner

    def __call__(self, trial: optuna.Trial) -> float:
        if _is_surplus(trial.study, trial.number, self.spec.trials):
            trial.set_user_attr("reason", SURPLUS)
            trial.study.stop()
            raise _NotRun
        try:
            plan = self.planner.plan(trial, wait=True)
            config = _start(trial, plan, self.spec, self.space, self.options, self.device)  # type: ignore[arg-type]  # plan waited
            result = train_trial(config, OptunaReporter(trial, self.spec.metric))
        except Deferred:
            _defer(trial)
            raise _NotRun from None
        except KeyboardInterrupt:
            _mark_failed(trial, "interrupted")
            raise
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded on the trial; the study goes on
            _mark_failed(trial, "failed", exc)
            raise TrialFailed(str(exc)) from exc
        state, value = _settle(trial, result, self.spec)
        if state == TrialState.COMPLETE:
            return value  # type: ignore[return-value]
        if state == TrialState.PRUNED:
            raise optuna.TrialPruned(result.status)
        raise TrialFailed(result.error or "failed")


class _StopAfterFailures:
    def __init__(self, limit: int) -> None:
        self.limit, self.failures = limit, 0

    def count(self, trial: FrozenTrial) -> bool:
        """Count a finished trial; whether ``limit`` trials in a row have now failed."""
        if trial.user_attrs.get("reason") not in NOT_RUN:
            self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        return self.failures >= self.limit

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.count(trial):
            study.stop()


def retry_interrupted(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the settings of a trial that a dead or interrupted process left behind.

    A trial killed before it drew its settings has none yet, only the queued ones it took
    (the spec's first settings, ``--enqueue``, an earlier retry): those go back in the queue,
    or a resume, which skips settings queued before, would never try them.
    """
    settings = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    # The immediate predecessor, so that a retry that is itself interrupted is retried once too.
    study.enqueue_trial(settings, user_attrs={"retry_of": trial.number})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(trial: FrozenTrial, *, asking_done: bool) -> bool:
    """Whether a RUNNING trial was left by a process that is gone.

    A process of this host is asked directly. A trial that names no worker was asked for by a
    process that died inside ``study.ask`` (see ``_asking``): certainly so when no ask is under
    way (``asking_done``: the caller holds the ask lock); otherwise once ``GRACE_SECONDS`` have
    passed, since no live process takes that long between creating a trial and naming itself.
    Trials of other hosts are left to the RDB heartbeat.
    """
    worker = trial.user_attrs.get("worker")
    if worker is None:
        started = trial.datetime_start
        return asking_done or (started is not None and (datetime.now() - started).total_seconds() > GRACE_SECONDS)
    return worker.get("host") == _HOST and not _pid_alive(int(worker.get("pid", -1)))


def recover_interrupted(study: optuna.Study, url: str) -> int:
    """Fail trials left RUNNING by dead processes (see ``_orphaned``), and queue every interrupted trial once.

    Returns how many trials were queued.
    """
    storage = study._storage
    lock = _ask_lock(url)
    with _holding(lock):
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        if _orphaned(trial, asking_done=lock is not None):
            try:
                storage.set_trial_user_attr(trial._trial_id, "reason", "interrupted")
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                pass  # another process starting on this storage failed it first
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = 0
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("reason") in RETRIED_REASONS and trial.number not in retried:
            retry_interrupted(study, trial)
            retried.add(trial.number)
            queued += 1
    return queued


def open_study(spec: StudySpec, space: SearchSpace, url: str, *, claimed_by: Path | None = None) -> optuna.Study:
    """Create the study, or load it and check that it was made with the same space and metric.

    ``claimed_by``: the run folder whose run.json says the study is in ``url`` already; a
    storage without it was replaced or emptied, and is refused rather than given a new study.
    """
    storage = open_storage(url)
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if claimed_by is not None and spec.name not in names:
        raise UserInputError(
            f"{redact_storage_url(url)} does not hold study {spec.name!r} (it holds: {', '.join(names) or 'none'}), though {claimed_by / RUN_FILE} says it does; "
            "put the study's own storage back, or choose another --out"
        )
    if spec.name in names:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        meta = study.user_attrs.get(ATTR)
        if meta is None:
            raise UserInputError(f"study {spec.name!r} in {redact_storage_url(url)} was not made by sofim-tune; choose another study name (`name` in the --spec file)")
        check_resumable(meta, spec, space, f"study {spec.name!r} in {redact_storage_url(url)}")
        # What may change on a rerun: the target, widening, and how the rest is searched.
        current = {"trials": spec.trials, "widen": spec.widen, "sampler": spec.sampler, "pruner": spec.pruner, "lookahead": spec.lookahead}
        if any(meta.get(key) != value for key, value in current.items()):
            study.set_user_attr(ATTR, {**meta, **current})
        return study
    # load_if_exists: another process may create the same study between the check and here.
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.direction, load_if_exists=True)
    if ATTR not in study.user_attrs:
        declared = {name: {"low": p.low, "high": p.high} for name, p in outer_ranges(space).items()}
        study.set_user_attr(ATTR, {**study_metadata(spec, space, url), DECLARED_PARAMS: declared})
    return study


def _worker_study(spec: StudySpec, space: SearchSpace, url: str, planner: _Planner) -> optuna.Study:
    """The study as one worker sees it: its trials drawn and judged by ``planner``."""
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url), sampler=planner.sampler, pruner=planner.pruner())
    study.ask = _asking(study, _ask_lock(url), spec.trials)  # type: ignore[method-assign]  # study.optimize asks through it too
    return study


def _ask_lock(url: str) -> Path | None:
    """The lock file that makes asking one process at a time on an SQLite storage; None for others.

    SQLite reads a queued trial's state before it takes its write lock, so two workers that
    ask at the same instant could both take the same queued trial.
    """
    file = storage_file(url)
    return file.with_name(file.name + ".ask-lock") if url.startswith("sqlite:") and file is not None else None


@contextlib.contextmanager
def _holding(lock: Path | None) -> Iterator[None]:
    if lock is None:
        yield
        return
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class _TargetReached(Exception):
    """The study has its target of trials finished or running: a worker asks for no more."""


def _asking(study: optuna.Study, lock: Path | None, target: int) -> Callable[..., optuna.Trial]:
    """``study.ask`` that creates a trial only while the study is below ``target`` (finished and
    running), and names the asking worker on it before it lets go of the ask lock.

    Raises _TargetReached instead of creating a trial the study does not need: under the lock
    (SQLite) no worker ever creates one; elsewhere workers that ask in the same instant still
    can (:func:`_is_surplus` fails those). A process that holds the lock knows that an unnamed
    RUNNING trial's process died inside ``ask`` (see ``_orphaned``).
    """
    ask = study.ask

    def ask_and_name(*args: Any, **kwargs: Any) -> optuna.Trial:
        with _holding(lock):
            if _at_target(study, target):
                raise _TargetReached
            trial = ask(*args, **kwargs)
            trial.set_user_attr("worker", {"host": _HOST, "pid": os.getpid(), "threads": torch.get_num_threads()})
            return trial

    return ask_and_name


def _at_target(study: optuna.Study, target: int) -> bool:
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))) >= target


def _optimize(spec: StudySpec, space: SearchSpace, options: RunOptions, url: str, device: str, on_trial: Callable[[optuna.Study], None] | None, slots: int = 1) -> None:
    """One worker: run trials until the study has ``spec.trials`` finished ones.

    With ``slots`` > 1 the worker trains that many trials at once as one stacked model
    (:func:`_optimize_batched`).
    """
    if slots > 1:
        _optimize_batched(spec, space, options, url, device, on_trial, slots)
        return
    planner = _Planner(spec, space)
    study = _worker_study(spec, space, url, planner)
    # The study stops at its target when the next ask finds it reached (_asking).
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [_StopAfterFailures(MAX_CONSECUTIVE_FAILURES)]
    if on_trial is not None:
        callbacks.append(lambda s, _t: on_trial(s))
    with contextlib.suppress(_TargetReached), optuna_experimental():  # the heartbeat's stale check
        study.optimize(_Objective(spec, space, options, device, planner), timeout=options.timeout, catch=(TrialFailed, _NotRun), callbacks=callbacks)


def _optimize_batched(spec: StudySpec, space: SearchSpace, options: RunOptions, url: str, device: str, on_trial: Callable[[optuna.Study], None] | None, slots: int) -> None:
    """One worker training up to ``slots`` trials at once as one stacked model, by ask and tell.

    Each member is a trial of its own in the storage, recorded as a sequential trial is:
    the pruner sees its value every epoch, and a member that is pruned, diverges or
    finishes leaves its slot to a new trial from the sampler. A new trial whose fixed view
    is not complete yet (:class:`_Planner`) joins at a later epoch; the worker waits for it
    only when the batch has nothing else to train.
    """
    planner = _Planner(spec, space)
    study = _worker_study(spec, space, url, planner)
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    failures = _StopAfterFailures(MAX_CONSECUTIVE_FAILURES)
    batch: TrialBatch | None = None
    running: dict[int, optuna.Trial] = {}
    joining: optuna.Trial | None = None  # asked for, not yet in the batch
    stopping = False
    beats = _Heartbeats(study._storage, url) if is_heartbeat_enabled(study._storage) else None

    def tell(trial: optuna.Trial, state: TrialState, value: float | None = None) -> None:
        nonlocal stopping
        frozen = study.tell(trial, value, state=state)
        stopping = failures.count(frozen) or stopping
        if on_trial is not None:
            on_trial(study)

    def release(slot: int) -> optuna.Trial:
        trial = running.pop(slot)
        if beats is not None:
            beats.stop(trial)
        return trial

    def settle(slot: int, result: TrialResult) -> None:
        trial = release(slot)
        state, value = _settle(trial, result, spec)
        tell(trial, state, value)

    def step_back(trial: optuna.Trial) -> None:
        if beats is not None:
            beats.stop(trial)
        _defer(trial)
        study.tell(trial, state=TrialState.FAIL)

    try:
        while True:
            if beats is not None:
                # What study.optimize does before each trial: fail and requeue the trials of dead workers of any host.
                with optuna_experimental():
                    optuna.storages.fail_stale_trials(study)
            while not stopping and len(running) < slots and (deadline is None or time.monotonic() < deadline):
                if joining is None:
                    with warnings.catch_warnings():
                        # This loop records its trials' heartbeats itself (_Heartbeats).
                        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
                        try:
                            joining = study.ask()
                        except _TargetReached:
                            break
                    if _is_surplus(study, joining.number, spec.trials):
                        joining.set_user_attr("reason", SURPLUS)
                        study.tell(joining, state=TrialState.FAIL)
                        joining = None
                        break
                    if beats is not None:
                        beats.start(joining)
                try:
                    plan = planner.plan(joining, wait=not running)
                except Deferred:
                    step_back(joining)
                    joining = None
                    continue
                if plan is None:
                    break
                config = _start(joining, plan, spec, space, options, device)
                if batch is None:
                    batch = TrialBatch(prepare_trial(config), arch=config.arch, optimizer=config.optimizer, batch_size=config.batch_size, slots=slots)
                running[batch.add(config)], joining = joining, None
            if not running:
                if joining is not None:  # the deadline came while it waited for its view
                    step_back(joining)
                    joining = None
                return
            try:
                outcomes = batch.train_epoch()  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - every member fails, the study goes on with a new batch
                for slot in list(running):
                    trial = release(slot)
                    _mark_failed(trial, "failed", exc)
                    tell(trial, TrialState.FAIL)
                batch = None
                continue
            for slot, outcome in outcomes.items():
                trial = running[slot]
                if outcome.diverged:
                    settle(slot, batch.finish(slot))  # type: ignore[union-attr]
                    continue
                trial.report(outcome.metrics[spec.metric], step=outcome.epoch)  # type: ignore[index]
                if trial.should_prune():
                    settle(slot, batch.finish(slot, pruned=True))  # type: ignore[union-attr]
                elif outcome.done:
                    settle(slot, batch.finish(slot))  # type: ignore[union-attr]
    except BaseException as exc:
        _fail_left(study, [*running.values(), *([joining] if joining is not None else [])], exc)
        raise
    finally:
        if beats is not None:
            beats.close()


def _fail_left(study: optuna.Study, trials: Sequence[optuna.Trial], exc: BaseException) -> None:
    """Mark FAIL the trials a worker leaves as it stops on ``exc``: ``interrupted`` on Ctrl-C (the
    next run retries them), else ``failed`` with the error, so none is left RUNNING."""
    for trial in trials:
        try:
            if isinstance(exc, KeyboardInterrupt):
                _mark_failed(trial, "interrupted")
            else:
                _mark_failed(trial, "failed", exc)
            study.tell(trial, state=TrialState.FAIL)
        except Exception as tell_error:  # noqa: BLE001 - the storage may be what failed; recovery fails the trial later
            log.warning("trial %d stays RUNNING until a run's recovery fails it: the storage refused its failure too (%s)", trial.number, type(tell_error).__name__)


class _Heartbeats:
    """An RDB heartbeat every ``HEARTBEAT_SECONDS`` for each running member of a batch, from a thread.

    As ``study.optimize`` keeps one for its trial: an epoch of a large batch can outlast
    ``GRACE_SECONDS``, and a member beats from the moment it joins, because the stale check
    skips a trial that never beat (a worker killed in its first epoch would leave it RUNNING).
    """

    def __init__(self, storage: BaseStorage, url: str) -> None:
        self.storage, self.url = storage, url
        self.numbers: dict[int, int] = {}  # trial id -> trial number, of the members that beat
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sofim-tune-heartbeats", daemon=True)
        self.thread.start()

    def start(self, trial: optuna.Trial) -> None:
        self.storage.record_heartbeat(trial._trial_id)
        with self.lock:
            self.numbers[trial._trial_id] = trial.number

    def stop(self, trial: optuna.Trial) -> None:
        with self.lock:
            self.numbers.pop(trial._trial_id, None)

    def close(self) -> None:
        self.closed.set()
        self.thread.join()

    def _beat(self) -> None:
        """Beat every ``HEARTBEAT_SECONDS``; after a failed beat (a storage that blinked), say so
        and try again every ``HEARTBEAT_RETRY_SECONDS``, well within ``GRACE_SECONDS``."""
        failed = False
        while not self.closed.wait(HEARTBEAT_RETRY_SECONDS if failed else HEARTBEAT_SECONDS):
            with self.lock:
                members = sorted(self.numbers.items())
            failed = False
            for trial_id, number in members:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - a beat that failed is tried again; the thread must not end
                    failed = True
                    reason = redact_storage_message(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, self.url)
                    log.warning("heartbeat of trial %d failed (%s); trying again in %g s", number, reason, HEARTBEAT_RETRY_SECONDS)


def _worker_main(spec: StudySpec, space_definition: dict[str, Any], options: RunOptions, url: str, device: str, threads: int, slots: int, verbosity: int) -> None:
    """A worker process: ``verbosity`` is Optuna's in the process that started it, which a spawned
    worker (CUDA) would not inherit."""
    start_worker(threads)
    optuna.logging.set_verbosity(verbosity)
    try:
        with interrupts.catching():
            _optimize(spec, SearchSpace.from_dict(space_definition), options, url, device, None, slots)
    except KeyboardInterrupt:
        pass  # the trial is already marked failed and queued for retry on the next run
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_optuna_study(spec: StudySpec, space: SearchSpace, options: RunOptions, *, on_progress: Callable[[StudyRecord], None] | None = None) -> StudyRecord:
    """Run (or resume) the study of ``spec`` until it has ``spec.trials`` finished trials.

    Several workers (``options.workers``, or as :func:`planned` picks them) are
    processes sharing the storage, each pinned to a device from ``options.gpus``
    round-robin and running ``options.threads_per_trial`` torch threads; one worker runs
    in this process. Trials that a killed run or worker left behind are failed and their
    settings tried again. Returns the study as a :class:`StudyRecord`.
    """
    url = storage_url(options)
    check_run_folder(options.out_dir, backend="optuna", storage=url, study=spec.name)
    check_sampler(spec, space)
    # A bad URL, then a study there that cannot be resumed, are refused before run.json is written.
    claimed = (options.out_dir / RUN_FILE).is_file()
    study = open_study(spec, space, url, claimed_by=options.out_dir if claimed else None)
    claim_run_folder(options.out_dir, backend="optuna", storage=url, study=spec.name)
    recover_interrupted(study, url)
    for values in settings_to_enqueue(spec, space, options):
        study.enqueue_trial(values, skip_if_exists=True)

    def progress(s: optuna.Study) -> None:
        # Here, in the one main process, so that two workers never widen the same bound.
        record_widenings(s, space)
        if on_progress is not None:
            on_progress(record_from_study(s))

    progress(study)
    started = time.monotonic()
    options = planned(spec, space, options)  # tune() planned them already; a direct call has not
    workers = options.workers or 1
    devices = spread_devices(workers, options.gpus, options.device)
    if workers > 1 and finished_count(study) < spec.trials:
        _run_workers(spec, space, options, url, devices, lambda: progress(study))
        recover_interrupted(study, url)
    # One worker, or what a dead worker left undone: this process runs it.
    left = None if options.timeout is None else options.timeout - (time.monotonic() - started)
    if finished_count(study) < spec.trials and (left is None or left > 0):
        with torch_threads(options.threads_per_trial):
            _optimize(spec, space, dataclasses.replace(options, timeout=left), url, devices[0], progress, options.batch_trials or 1)
    return record_from_study(study)


def _run_workers(spec: StudySpec, space: SearchSpace, options: RunOptions, url: str, devices: list[str], poll: Callable[[], None]) -> None:
    """Run one worker process per device until they all stop.

    A worker that stops with an input error (exit code 2, its message already on stderr)
    stops the study. A worker killed from outside (the OOM killer, ``kill -9``) is
    reported with the trial it left, that trial is failed and queued again, and the other
    workers go on; whatever they leave undone, the caller finishes. Workers start one by one,
    ``poll`` is called while they do, and none starts once the study has its target of trials
    finished or running.
    """
    # Processes, not threads: each trial owns its interpreter, its CUDA context and its GIL.
    context = worker_context(devices)
    verbosity = optuna.logging.get_verbosity()
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    processes: list[multiprocessing.process.BaseProcess] = []
    reported: set[int] = set()
    polled = time.monotonic()
    try:
        for index, device in enumerate(devices):
            if time.monotonic() - polled >= POLL_SECONDS:
                poll()
                polled = time.monotonic()
                if _at_target(study, spec.trials):
                    break
            args = (spec, space.to_dict(), options, url, device, options.threads_per_trial or 1, options.batch_trials or 1, verbosity)
            processes.append(context.Process(target=_worker_main, args=args, name=f"sofim-tune-worker-{index}"))
            processes[-1].start()
        while True:
            running = any(p.is_alive() for p in processes)
            poll()
            for process in processes:
                if process.exitcode not in (None, 0, 2) and process.pid not in reported:
                    reported.add(process.pid)
                    _report_dead_worker(study, url, process)
            if not running:
                break
            time.sleep(POLL_SECONDS)
        stopped = [p.name for p in processes if p.exitcode == 2]
        if stopped:
            raise UserInputError(f"{', '.join(stopped)} stopped on an input error (printed above); fix it, then run the same command again to resume")
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches every worker; `kill -INT` reaches only this process,
        # so pass it on to the workers that are still training.
        for process in processes:
            process.join(timeout=2)
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join(timeout=30)
        raise
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()


def _report_dead_worker(study: optuna.Study, url: str, process: multiprocessing.process.BaseProcess) -> None:
    """Say which worker died, how, and which trial it left; fail and requeue that trial."""
    left = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("worker", {}).get("pid") == process.pid and t.user_attrs.get("worker", {}).get("host") == _HOST
    ]
    recover_interrupted(study, url)
    trials = f"trial {', '.join(map(str, left))}, which was marked failed and queued to run again" if left else "no trial"
    log.warning("%s (pid %s) %s; it left %s; the other workers go on", process.name, process.pid, describe_exit(process.exitcode), trials)


def _hyperparameters(trial: FrozenTrial, space: SearchSpace) -> dict[str, float]:
    """The optimizer's settings of a trial; empty for one that has not sampled them yet."""
    if "hyperparameters" in trial.user_attrs:
        return dict(trial.user_attrs["hyperparameters"])
    return space.to_hyperparameters(trial.params) if set(space.params) <= set(trial.params) else {}


def _trial_record(trial: FrozenTrial, space: SearchSpace) -> TrialRecord:
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("reason", "error", "diverged_epoch", "retry_of", "seconds", "fisher_ratio")}
    return TrialRecord(
        number=trial.number,
        state=_STATES[trial.state],  # type: ignore[arg-type]
        params=_hyperparameters(trial, space),
        value=trial.value if trial.state == TrialState.COMPLETE else None,
        intermediate={int(step): float(v) for step, v in trial.intermediate_values.items()},
        attrs=attrs,
        started=trial.datetime_start,
        finished=trial.datetime_complete,
    )


def record_from_study(study: optuna.Study) -> StudyRecord:
    """The read interface over an Optuna study made by sofim-tune."""
    meta = study.user_attrs.get(ATTR)
    if meta is None:
        raise UserInputError(f"study {study.study_name!r} was not made by sofim-tune")
    space = SearchSpace.from_dict(meta["space_definition"])
    trials = [_trial_record(t, space) for t in study.get_trials(deepcopy=False) if t.state in _STATES and t.user_attrs.get("reason") not in NOT_RUN]
    confirmations = [Confirmation(**c) for c in study.user_attrs.get("confirmations", [])]
    return record_from_metadata(meta, name=study.study_name, backend="optuna", trials=trials, confirmations=confirmations)


def load_optuna_record(url: str, name: str | None) -> StudyRecord:
    """Read a study from a storage; ``name`` may be omitted when the storage holds one study."""
    storage = open_storage(url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name is None:
        if len(names) != 1:
            raise UserInputError(f"{redact_storage_url(url)} holds {len(names)} studies ({', '.join(names) or 'none'}); name one with --study-name")
        name = names[0]
    if name not in names:
        raise UserInputError(f"no study {name!r} in {redact_storage_url(url)}; it holds: {', '.join(names) or 'none'}")
    return record_from_study(optuna.load_study(study_name=name, storage=storage))


class OptunaBackend:
    """The default backend: an Optuna study in an RDB or journal storage (see the module's docstring)."""

    name = "optuna"

    def check_options(self, options: RunOptions) -> None:
        """Refuse the options only Ray uses (naming the one that does apply) and a storage that
        cannot keep a study (:func:`check_storage`); reads only."""
        for field, (flag, instead) in _RAY_ONLY_OPTIONS.items():
            if getattr(options, field) is not None:
                raise UserInputError(f"{flag} applies to --backend ray; {instead}")
        if options.storage is not None:
            check_storage(options.storage)

    def run(self, spec: StudySpec, space: SearchSpace, options: RunOptions, *, on_progress: Callable[[StudyRecord], None] | None = None) -> StudyRecord:
        return run_optuna_study(spec, space, options, on_progress=on_progress)

    def load(self, run_dir: Path | None, *, storage: str | None = None, study: str | None = None) -> StudyRecord:
        """A study from ``storage`` when given, else from the storage the run folder names."""
        if storage is not None:
            return load_optuna_record(storage, study)
        if run_dir is None:
            raise UserInputError("name a run folder, or a storage with --storage (and --study-name)")
        meta = read_run_file(run_dir)
        if "***" in meta["storage"]:
            raise UserInputError(f"the storage of {run_dir} needs a password; pass it with --storage-env VAR (or --storage URL) and --study-name {meta['study']}")
        return load_optuna_record(storage_from_run_file(meta["storage"], run_dir), study or meta["study"])

    def confirm(self, configs: Sequence[TrialConfig], options: RunOptions, on_done: Callable[[int], None] | None = None) -> list[TrialResult]:
        """The runs on the study's workers (``options.workers`` at once, batched as the search was), results in order."""
        return train_in_parallel(configs, workers=options.workers or 1, threads=options.threads_per_trial, batch_trials=options.batch_trials or 1, on_done=on_done)

    def save_confirmations(self, record: StudyRecord, confirmations: list[Confirmation], options: RunOptions) -> StudyRecord:
        """Store the seed confirmations on the study, so that a later export or plot shows them."""
        study = optuna.load_study(study_name=record.name, storage=open_storage(storage_url(options)))
        study.set_user_attr("confirmations", [dataclasses.asdict(c) for c in confirmations])
        return dataclasses.replace(record, confirmations=list(confirmations))


BACKEND = OptunaBackend()
