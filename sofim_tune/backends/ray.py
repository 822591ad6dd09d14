"""Ray Tune backend: trials as Ray actors on one machine or a cluster, resume on rerun.

The search is Optuna's sampler inside Ray's ``OptunaSearch``; early stopping is a Ray
scheduler (ASHA for the ``hyperband`` and ``sha`` pruners). The run folder holds Ray's
experiment folder (``ray/<name>``, unless ``--storage-path`` puts it elsewhere) and
``ray_study.json``, which records what was tuned, so that ``export``, ``plot`` and ``show``
read the study from the folder alone, and a rerun with another search space is refused
instead of mixing two searches in one experiment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from sofim_tune.backends.optuna import make_sampler, record_from_metadata, study_metadata
from sofim_tune.errors import UserInputError
from sofim_tune.records import Confirmation, StudyRecord, TrialRecord
from sofim_tune.recommend import write_text_atomic
from sofim_tune.space import SearchSpace
from sofim_tune.spec import StudySpec
from sofim_tune.trial import train_trial
from sofim_tune.tuning import RunOptions, check_resumable, claim_run_folder, effective_epochs, trial_config

METADATA_FILE = "ray_study.json"
# The config key that carries the Optuna trial number to the trainable: it seeds the
# trial (spec.seed + number, as in the Optuna backend) and numbers the trial records.
NUMBER_KEY = "trial_number"
# Ray reruns a failed trial from scratch this often: what it is for is a lost node or an
# OOM kill; a deterministic error just fails three times.
MAX_FAILURES = 2
# How long to wait for a TCP connection to a cluster's address, in seconds. ray.init
# itself retries an unreachable GCS for minutes and then calls sys.exit.
CONNECT_TIMEOUT_S = 10.0
_DEFAULT_CLIENT_PORT = 10001
_DEFAULT_GCS_PORT = 6379
# Trial states Ray has left behind when it was stopped before the end.
_UNFINISHED = (Trial.PENDING, Trial.RUNNING, Trial.PAUSED)
_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"


# "sofim_tune.errors.UserInputError: lr must be > 0": the class's short name and the message.
_QUALIFIED_ERROR = re.compile(r"^(?:\w+\.)*(\w+): (.*)$")


class TrialFailed(RuntimeError):
    """A trial's training failed; Ray records the trial as errored and retries it."""


# ---------------------------------------------------------------------------------------
# Inside a trial (runs in a Ray worker process)
# ---------------------------------------------------------------------------------------


def _worst(direction: str) -> float:
    """A finite value below (maximize) or above (minimize) any real metric value.

    Ray requires the metric in every result, so a diverged trial reports this: the
    scheduler and the sampler then rank it below every trial that trained. Finite,
    because ASHA interpolates percentiles and inf - inf is NaN.
    """
    return -1e300 if direction == "maximize" else 1e300


class _RayReporter:
    """train_trial's reporter: one Ray result per epoch.

    Ray's scheduler stops a trial by ending its worker thread inside ``tune.report``;
    the reporter itself never raises ``TrialPruned``.
    """

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        tune.report({**metrics, "epoch": epoch})


def sofim_trial(config: dict[str, Any], *, spec: StudySpec, space: SearchSpace, options: RunOptions) -> None:
    """The function trainable: one training run with the settings Ray's searcher chose."""
    number = int(config[NUMBER_KEY])
    hyperparameters = space.to_hyperparameters({name: config[name] for name in space.params})
    # Ray hides the GPUs a trial did not ask for (CUDA_VISIBLE_DEVICES), so "cuda" is the
    # trial's own (share of a) GPU.
    device = "cuda" if options.gpus_per_trial > 0 else "cpu"
    # One intra-op thread per CPU the trial reserved: more would steal the CPUs of the
    # trials running beside it.
    torch.set_num_threads(max(1, int(options.cpus_per_trial)))
    run = trial_config(spec, space, hyperparameters, seed=spec.seed + number, device=device, options=options)
    result = train_trial(run, _RayReporter())
    if result.status == "diverged":
        tune.report({
            spec.metric: _worst(spec.direction),
            "epoch": result.diverged_epoch,
            "reason": "diverged",
            "diverged_epoch": result.diverged_epoch,
        })
    elif result.status == "failed":
        raise TrialFailed(result.error or "failed")


def _trial_dirname(trial: Trial) -> str:
    """``trial_0007_<id>``: folders sort in trial order; the id keeps them unique when a run
    killed between two saves hands a number out again on resume."""
    return f"trial_{int(trial.config[NUMBER_KEY]):04d}_{trial.trial_id}"


class _DefineSpace:
    """OptunaSearch's define-by-run space: the study's ranges, plus the trial number.

    A class rather than a closure, because OptunaSearch pickles its space with its state.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, int]:
        for p in self.space.params.values():
            if p.type == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                trial.suggest_float(p.name, p.low, p.high, log=p.log)
        return {NUMBER_KEY: trial.number}


# ---------------------------------------------------------------------------------------
# Reading trials back: one mapping for the live view and for the experiment folder
# ---------------------------------------------------------------------------------------


def _present(value: Any) -> bool:
    # Results read back through pandas carry NaN where a key was missing from a row.
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _time(seconds: Any) -> datetime | None:
    return datetime.fromtimestamp(float(seconds), tz=timezone.utc) if _present(seconds) else None


def _trial_record(
    status: str, config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], error: str | None, space: SearchSpace, metric: str, epochs: int
) -> TrialRecord | None:
    """A Ray trial as a :class:`TrialRecord`; None for a trial stopped before it started.

    ``rows`` are the trial's results in order (one per epoch, plus a last one for a
    diverged trial). A finished trial that reached ``epochs`` is complete; one that
    stopped earlier was stopped by the scheduler (or by ``--timeout``) and is pruned.
    """
    params = space.to_hyperparameters({name: config[name] for name in space.params})
    last = rows[-1] if rows else {}
    # A run retried from scratch reports its epochs again; the latest attempt wins.
    intermediate = {int(r["epoch"]): float(r[metric]) for r in rows if r.get("reason") != "diverged" and _present(r.get(metric))}
    attrs: dict[str, Any] = {}
    value = None
    if _present(last.get("time_total_s")):
        attrs["seconds"] = round(float(last["time_total_s"]), 3)
    if status == Trial.ERROR:
        state = "failed"
        attrs.update(reason="failed", error=error or "failed")
    elif status in _UNFINISHED:
        state = "running"
    elif last.get("reason") == "diverged":
        state = "pruned"
        attrs.update(reason="diverged", diverged_epoch=int(last["diverged_epoch"]))
    elif intermediate and max(intermediate) >= epochs:
        state, value = "complete", intermediate[max(intermediate)]
    elif intermediate:
        state = "pruned"
        attrs["reason"] = "pruned"
    else:
        return None
    first = rows[0] if rows else {}
    started = _time(first["timestamp"] - first.get("time_this_iter_s", 0.0)) if _present(first.get("timestamp")) else None
    return TrialRecord(
        number=int(config[NUMBER_KEY]),
        state=state,  # type: ignore[arg-type]
        params=params,
        value=value,
        intermediate=intermediate,
        attrs=attrs,
        started=started,
        finished=_time(last.get("timestamp")) if state != "running" else None,
    )


def _study_record(meta: Mapping[str, Any], trials: list[TrialRecord]) -> StudyRecord:
    confirmations = [Confirmation(**c) for c in meta.get("confirmations", [])]
    return record_from_metadata(meta, name=meta["name"], backend="ray", trials=trials, confirmations=confirmations)


def _trial_error(trial: Trial) -> str | None:
    """The last line of a trial's error trace, read from the experiment folder's text file.

    The text, not Ray's pickled copy of the exception: a run folder may come from elsewhere,
    and nothing from it is unpickled to read an error message.
    """
    lines = [line.strip() for line in (trial.get_error() or "").splitlines() if line.strip()]
    if not lines:
        return None
    match = _QUALIFIED_ERROR.match(lines[-1])
    if match is None:
        return lines[-1]
    name, message = match.groups()
    return message if name == TrialFailed.__name__ else f"{name}: {message}"


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only errors from ``logger_name`` while the block runs."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_trials(experiment: str, space: SearchSpace, metric: str, epochs: int) -> tuple[list[TrialRecord], int, bool]:
    """The trials of a Ray experiment folder: records, how many Ray created, any unfinished."""
    try:
        # Ray warns about every trial without a result file; after an interruption that
        # is each trial that had not finished an epoch yet, which is expected.
        with _quiet(_ANALYSIS_LOGGER):
            analysis = tune.ExperimentAnalysis(experiment)
    except (ValueError, FileNotFoundError):
        return [], 0, False  # started, but Ray saved no state yet
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows = frame.to_dict("records") if frame is not None and not frame.empty else []
        error = _trial_error(trial) if trial.status == Trial.ERROR else None
        record = _trial_record(trial.status, trial.config, rows, error, space, metric, epochs)
        if record is not None:
            records.append(record)
    unfinished = any(t.status in _UNFINISHED for t in analysis.trials)
    return records, len(analysis.trials), unfinished


# ---------------------------------------------------------------------------------------
# Live view
# ---------------------------------------------------------------------------------------


@dataclass
class _Listener:
    on_progress: Callable[[StudyRecord], None]
    meta: dict[str, Any]
    space: SearchSpace


# Ray pickles the run's callbacks into the experiment and restores them on resume; the
# callback holds only a key into this table, so that a listener that cannot be pickled
# (the CLI's live view) works, and a resumed run reports to the listener of this process.
_LISTENERS: dict[str, _Listener] = {}


class _LiveRecord(tune.Callback):
    """Calls the run's ``on_progress`` with the study as Ray's driver sees it now.

    Trials that finished before a resume show their last result only; the record
    :func:`run_ray_study` returns at the end is read from the experiment folder.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key, "_rows": {}}

    def _publish(self, trials: list[Trial]) -> None:
        listener = _LISTENERS.get(self.key)
        if listener is None:
            return
        metric, space = listener.meta["metric"], listener.space
        epochs = int(listener.meta["epochs"])
        records = []
        for trial in trials:
            rows = self._rows.get(trial.trial_id) or ([trial.last_result] if trial.has_reported_at_least_once else [])
            record = _trial_record(trial.status, trial.config, rows, None, space, metric, epochs)
            if record is not None:
                records.append(record)
        listener.on_progress(_study_record(listener.meta, records))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any) -> None:
        self._rows.setdefault(trial.trial_id, []).append(dict(result))
        self._publish(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._publish(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._publish(trials)


# ---------------------------------------------------------------------------------------
# Checks before anything runs
# ---------------------------------------------------------------------------------------


def _check_resource_numbers(options: RunOptions) -> None:
    if options.cpus_per_trial < 0 or options.gpus_per_trial < 0:
        raise UserInputError(f"--cpus-per-trial and --gpus-per-trial must be >= 0, got {options.cpus_per_trial:g} and {options.gpus_per_trial:g}")
    if options.cpus_per_trial == 0 and options.gpus_per_trial == 0:
        raise UserInputError("a trial needs some resources: --cpus-per-trial or --gpus-per-trial must be > 0")
    # Ray shares a GPU only in fractions of one; 1.5 GPUs cannot be placed.
    if options.gpus_per_trial > 1 and not float(options.gpus_per_trial).is_integer():
        raise UserInputError(f"--gpus-per-trial above 1 must be a whole number, got {options.gpus_per_trial:g}")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise UserInputError(f"--max-concurrent must be >= 1, got {options.max_concurrent}")


def _probe_target(address: str) -> tuple[str, int]:
    """The host and port that ``ray.init(address)`` would connect to first."""
    if address.startswith("ray://"):
        host, _, port = address.removeprefix("ray://").partition(":")
        return host, int(port or _DEFAULT_CLIENT_PORT)
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        # Ray's own lookup: RAY_ADDRESS, then the cluster a `ray start` on this machine
        # recorded. It fails at once when there is none; a stale one is probed below.
        address = canonicalize_bootstrap_address_or_die("auto")
    host, _, port = address.rpartition(":")
    if not host:
        return address, _DEFAULT_GCS_PORT
    return host.strip("[]"), int(port)  # [::1]:6379 is an IPv6 host


def _check_reachable(address: str) -> None:
    """Raise UserInputError within about CONNECT_TIMEOUT_S when ``address`` cannot be reached."""
    try:
        host, port = _probe_target(address)
    except ValueError:
        raise UserInputError(f"cannot reach Ray at {address}: not an address (use auto, HOST:6379 or ray://HOST:10001)") from None
    except ConnectionError as exc:
        raise UserInputError(f"cannot reach Ray at {address}: {str(exc).splitlines()[0]}") from None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        # "auto" names no host; say which one it found.
        label = f"{address} ({host}:{port})" if address == "auto" else address
        raise UserInputError(f"cannot reach Ray at {label}: {exc.strerror or exc or type(exc).__name__}") from None


def _connect(options: RunOptions) -> None:
    """Connect to the cluster of ``options.address`` (or RAY_ADDRESS), or start a local Ray.

    A Ray already initialized in this process (by the caller, or by an earlier study) is
    used as it is.
    """
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return
    try:
        # Without an address this starts Ray on this machine with all its CPUs and GPUs.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"cannot reach Ray at {address or 'a new local instance'}: {str(exc).splitlines()[0]}") from None


def _check_cluster_fits(options: RunOptions) -> None:
    """Raise UserInputError when no node of the cluster can hold one trial."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if options.cpus_per_trial > cpus:
        raise UserInputError(f"--cpus-per-trial {options.cpus_per_trial:g}: no node of the Ray cluster has that many CPUs (the largest has {cpus:g})")
    if options.gpus_per_trial > gpus:
        having = f"the largest has {gpus:g}" if gpus else "the cluster has no GPUs"
        raise UserInputError(f"--gpus-per-trial {options.gpus_per_trial:g}: no node of the Ray cluster has that many GPUs ({having})")


def _is_uri(path: str) -> bool:
    return "://" in path


def _storage_root(options: RunOptions) -> str:
    """Where Ray keeps the experiment folder: ``--storage-path``, or ``out_dir/ray``."""
    if options.storage_path is None:
        return str(options.out_dir.resolve() / "ray")
    return options.storage_path if _is_uri(options.storage_path) else str(Path(options.storage_path).expanduser().resolve())


def _check_writable(root: str) -> None:
    """A local storage folder must exist or be creatable, and take files; URIs pass."""
    if _is_uri(root):
        return
    probe = Path(root) / ".sofim-tune-probe"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(f"cannot write Ray storage at {root}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------
# Metadata in the run folder
# ---------------------------------------------------------------------------------------


def _read_metadata(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METADATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read: {exc}") from None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _experiment_path(meta: Mapping[str, Any], run_dir: Path) -> str:
    """The experiment folder; a default one moves with the run folder."""
    root = meta.get("storage_path")
    if root is None:
        return str(run_dir.resolve() / "ray" / meta["name"])
    return f"{root.rstrip('/')}/{meta['name']}"


def _scheduler(spec: StudySpec, epochs: int) -> tuple[str, TrialScheduler]:
    """Ray's early stopping for ``spec.pruner``, and the name the study records for it.

    One epoch is the smallest resource; ASHA is the asynchronous form of successive
    halving, the rule under Optuna's hyperband and sha pruners.
    """
    mode = "max" if spec.direction == "maximize" else "min"
    if spec.pruner in ("hyperband", "sha"):
        return "asha", ASHAScheduler(time_attr="epoch", metric=spec.metric, mode=mode, max_t=epochs, grace_period=1, reduction_factor=3)
    if spec.pruner == "median":
        return "median", MedianStoppingRule(time_attr="epoch", metric=spec.metric, mode=mode, grace_period=1, min_samples_required=5)
    return "none", FIFOScheduler()


def _existing_experiment(spec: StudySpec, space: SearchSpace, options: RunOptions, experiment: str) -> dict[str, Any] | None:
    """The metadata of the experiment to resume, checked against this run; None to start anew."""
    if not tune.Tuner.can_restore(experiment):
        return None
    meta = _read_metadata(options.out_dir)
    if meta is None or meta.get("backend") != "ray":
        raise UserInputError(f"{experiment} holds a Ray experiment that {options.out_dir / METADATA_FILE} does not describe; use another --out or --storage-path")
    where = f"the Ray experiment in {experiment}"
    if (meta["trials"], meta["epochs"]) != (spec.trials, effective_epochs(spec, space)):
        # Ray restores the experiment's own number of trials and its scheduler's epochs.
        raise UserInputError(
            f"{where} runs {meta['trials']} trials of {meta['epochs']} epochs, and Ray cannot "
            f"change that on resume; use --trials {meta['trials']} --epochs {meta['epochs']}, or another --out"
        )
    check_resumable(meta, spec, space, where)
    return meta


# ---------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------


def run_ray_study(spec: StudySpec, space: SearchSpace, options: RunOptions, *, on_progress: Callable[[StudyRecord], None] | None = None) -> StudyRecord:
    """Run (or resume) the study of ``spec`` as a Ray Tune experiment of ``spec.trials`` trials.

    Each trial reserves ``options.cpus_per_trial`` CPUs and ``options.gpus_per_trial``
    GPUs (a fraction shares a GPU); at most ``options.max_concurrent`` run at once
    (default: as many as fit). A rerun with the same run folder resumes the experiment:
    finished trials are kept, unfinished and errored ones run again. ``on_progress``
    receives the study after every result. Returns the study as a :class:`StudyRecord`.

    Raises:
        UserInputError: bad resources, an unreachable cluster, storage that cannot be
            written, or an existing experiment made for another space, metric or budget.
        KeyboardInterrupt: the run was interrupted (Ctrl-C); Ray saved its state first.
    """
    _check_resource_numbers(options)
    enqueue = [space.from_hyperparameters(settings) for settings in (*spec.enqueue, *options.enqueue)]
    root = _storage_root(options)
    experiment = f"{root.rstrip('/')}/{spec.name}"
    existing = _existing_experiment(spec, space, options, experiment)
    _connect(options)
    _check_cluster_fits(options)
    _check_writable(root)

    claim_run_folder(options.out_dir, backend="ray", storage=experiment, study=spec.name)
    epochs = effective_epochs(spec, space)
    if existing is None:
        pruner, scheduler = _scheduler(spec, epochs)
        meta = {
            **study_metadata(spec, space, experiment),
            "backend": "ray",
            "name": spec.name,
            "pruner": pruner,
            # None: the experiment lives in the run folder, and moves with it.
            "storage_path": root if options.storage_path is not None else None,
        }
        _write_json(options.out_dir / METADATA_FILE, meta)
    else:
        # A restored experiment keeps its searcher, scheduler and settings to enqueue.
        meta = existing

    trainable = tune.with_resources(
        tune.with_parameters(sofim_trial, spec=spec, space=space, options=options),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    key = experiment
    if on_progress is not None:
        _LISTENERS[key] = _Listener(on_progress, meta, space)
    # Ray's newer console output prints a table to stdout even at verbose=0; the older
    # one is silent at 0. A user's own setting wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        # Restoring, and at the end of fit(), Ray reads the experiment back (see
        # _read_trials on why quietly).
        with _quiet(_ANALYSIS_LOGGER):
            if existing is not None:
                tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, restart_errored=True)
            else:
                tuner = tune.Tuner(trainable, tune_config=_tune_config(spec, space, options, scheduler, enqueue), run_config=_run_config(spec, root, key))
            tuner.fit()
    finally:
        _LISTENERS.pop(key, None)
        # Tune leaves its Ctrl-C handler installed after a run; without this, the first
        # Ctrl-C during the confirmation step afterwards would be swallowed.
        if main_thread:
            signal.signal(signal.SIGINT, sigint)

    trials, created, unfinished = _read_trials(experiment, space, spec.metric, epochs)
    record = _study_record(meta, trials)
    # Ctrl-C makes Tune save its state and return as if done: trials left unfinished, or
    # fewer trials than asked without a time budget to explain it, mean it was interrupted.
    if unfinished or (created < spec.trials and options.timeout is None):
        raise KeyboardInterrupt
    if on_progress is not None:
        on_progress(record)
    return record


def _tune_config(spec: StudySpec, space: SearchSpace, options: RunOptions, scheduler: TrialScheduler, enqueue: list[dict[str, float]]) -> tune.TuneConfig:
    mode = "max" if spec.direction == "maximize" else "min"
    search = OptunaSearch(
        _DefineSpace(space),
        metric=spec.metric,
        mode=mode,
        points_to_evaluate=enqueue or None,
        sampler=make_sampler(spec.sampler, space, spec.seed, spec.trials),
    )
    return tune.TuneConfig(
        search_alg=search,
        scheduler=scheduler,
        num_samples=spec.trials,
        max_concurrent_trials=options.max_concurrent,
        time_budget_s=options.timeout,
        trial_dirname_creator=_trial_dirname,
        # A worker keeps its process between trials, so the dataset it decoded (and moved
        # to its GPU) serves its next trial too.
        reuse_actors=True,
    )


def _run_config(spec: StudySpec, root: str, key: str) -> tune.RunConfig:
    return tune.RunConfig(
        name=spec.name,
        storage_path=root,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        callbacks=[_LiveRecord(key)],
        verbose=0,
    )


def load_ray_record(run_dir: Path) -> StudyRecord:
    """Read the study of a run folder made by the Ray backend, finished or interrupted.

    Raises:
        UserInputError: the folder holds no Ray study.
    """
    run_dir = Path(run_dir)
    meta = _read_metadata(run_dir)
    if meta is None or meta.get("backend") != "ray":
        raise UserInputError(f"{run_dir} holds no Ray study (no {METADATA_FILE})")
    space = SearchSpace.from_dict(meta["space_definition"])
    trials, _, _ = _read_trials(_experiment_path(meta, run_dir), space, meta["metric"], int(meta["epochs"]))
    return _study_record(meta, trials)


def save_confirmations(record: StudyRecord, confirmations: list[Confirmation], options: RunOptions) -> StudyRecord:
    """Store the seed confirmations in ``ray_study.json``, so that a later export or plot shows them."""
    meta = _read_metadata(options.out_dir)
    if meta is None:
        raise UserInputError(f"{options.out_dir} holds no Ray study (no {METADATA_FILE})")
    _write_json(options.out_dir / METADATA_FILE, {**meta, "confirmations": [dataclasses.asdict(c) for c in confirmations]})
    return dataclasses.replace(record, confirmations=list(confirmations))
