"""Ray Tune backend: trials as Ray actors on one machine or a cluster, resume on rerun.

The search is Optuna's sampler inside Ray's ``OptunaSearch`` (:class:`_SofimSearch`, which
records trials in the sampler's study as the Optuna backend does: early-stopped and
diverged trials are pruned, errored ones failed); early stopping is a Ray scheduler (ASHA
for the ``hyperband`` and ``sha`` pruners). As with the Optuna backend, the study runs
until it has ``spec.trials`` finished (complete or pruned) trials: a trial that errors does
not count, and another one takes its place.

The run folder holds Ray's experiment folder (``ray/<name>``, unless ``--storage-path`` puts
it elsewhere) and ``ray_study.json``, which records what was tuned. ``export``, ``plot``
and ``show`` read the study from plain files alone (``ray_study.json``, the searcher's
``sofim_search.json``, and each trial folder's ``params.json``, ``result.json`` and
``error.txt``), never from Ray's pickled state, so that opening a run folder from
elsewhere runs no code from it. A rerun with another search space is refused instead of
mixing two searches in one experiment, and a rerun resumes the experiment that its run folder
records or none: one that would start another (a changed ``--storage-path``, or an experiment
that Ray cannot restore) is refused instead of orphaning it. The Optuna backend's options
(``--workers``, ``--threads-per-trial``, ``--gpus``, ``--storage``) are refused, as Ray would
ignore them.

With ``--batch-trials K`` each trial is a light :class:`~sofim_tune.backends.ray_member.BatchMember`
that a :class:`BatchServer` trains with up to K - 1 others as one stacked model, an epoch per
Tune step (see the section "Batched trials" below).
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
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sofim_tune.backends.ray_cluster import check_cluster_fits, cluster_address, connect
from sofim_tune.backends.ray_member import BatchMember, BatchServerActor
from sofim_tune.batched import TrialBatch
from sofim_tune.errors import UserInputError
from sofim_tune.files import MAX_JSON_BYTES, read_json, write_text_atomic
from sofim_tune.records import Confirmation, StudyRecord, TrialRecord
from sofim_tune.space import SearchSpace
from sofim_tune.spec import DEFAULT_LOOKAHEAD, StudySpec
from sofim_tune.study import (
    RunOptions,
    check_resumable,
    claim_run_folder,
    effective_epochs,
    failed_result,
    make_sampler,
    record_from_metadata,
    settings_to_enqueue,
    study_metadata,
    trial_config,
    worst_value,
)
from sofim_tune.trial import TrialConfig, TrialResult, prepare_trial, train_trial

METADATA_FILE = "ray_study.json"
# The searcher's account of every trial it handed out, as plain JSON next to Ray's state
# in the experiment folder (see _SofimSearch.save_to_dir).
SEARCH_FILE = "sofim_search.json"
# The most the reader takes of a trial's result.json (one line of a few hundred bytes per
# epoch: room for tens of thousands) and of SEARCH_FILE (about 250 bytes per trial: room for
# tens of thousands of trials). A larger file is read as one no trial wrote, as a malformed
# line is; params.json takes MAX_JSON_BYTES, and only the last MAX_JSON_BYTES of error.txt,
# whose last line is the message, are read.
MAX_RESULT_BYTES = MAX_SEARCH_FILE_BYTES = 16 * 2**20
# The config key that carries the Optuna trial number to the trainable: it seeds the
# trial (spec.seed + number, as in the Optuna backend) and numbers the trial records.
NUMBER_KEY = "trial_number"
# Ray reruns a failed trial from scratch this often: what it is for is a lost node or an
# OOM kill; a deterministic error just fails three times.
MAX_FAILURES = 2
# As in the Optuna backend: a search whose trials all fail (a broken GPU, say) stops after
# this many failures in a row instead of replacing them for ever.
MAX_CONSECUTIVE_FAILURES = 10
# Trial states Ray has left behind when it was stopped before the end.
_UNFINISHED = (Trial.PENDING, Trial.RUNNING, Trial.PAUSED)
_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"
# trial_0007_<id>: see _trial_dirname.
_TRIAL_DIR = re.compile(r"^trial_(\d+)_(\w+)$")


# "sofim_tune.errors.UserInputError: lr must be > 0": the class's short name and the message.
_QUALIFIED_ERROR = re.compile(r"^(?:\w+\.)*(\w+): (.*)$")


class TrialFailed(RuntimeError):
    """A trial's training failed; Ray records the trial as errored and retries it."""


# ---------------------------------------------------------------------------------------
# Inside a trial (runs in a Ray worker process)
# ---------------------------------------------------------------------------------------


class _RayReporter:
    """train_trial's reporter: one Ray result per epoch.

    Ray's scheduler stops a trial by ending its worker thread inside ``tune.report``;
    the reporter itself never raises ``TrialPruned``.
    """

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        tune.report({**metrics, "epoch": epoch})


def _worker_device(options: RunOptions) -> str:
    """The device of a trial or confirmation run inside a Ray worker.

    Ray hides the GPUs a task did not ask for (CUDA_VISIBLE_DEVICES), so "cuda" is the
    task's own (share of a) GPU.
    """
    return "cuda" if options.ray_gpus_per_trial > 0 else "cpu"


def _set_threads(options: RunOptions) -> None:
    # One intra-op thread per CPU the task reserved: more would steal the CPUs of the
    # tasks running beside it.
    torch.set_num_threads(max(1, int(options.ray_cpus_per_trial)))


def sofim_trial(config: dict[str, Any], *, spec: StudySpec, space: SearchSpace, options: RunOptions) -> None:
    """The function trainable: one training run with the settings Ray's searcher chose.

    ``Tuner.restore`` needs this trainable again, wrapped as :func:`run_ray_study` wraps it.
    """
    _set_threads(options)
    result = train_trial(_trial_run(config, spec, space, options), _RayReporter())
    if result.status == "diverged":
        tune.report(_diverged_row(spec, result))
    elif result.status == "failed":
        raise TrialFailed(result.error or "failed")


def _trial_run(config: Mapping[str, Any], spec: StudySpec, space: SearchSpace, options: RunOptions) -> TrialConfig:
    """The training run of the Ray trial with ``config`` (the searcher's values and the trial number)."""
    hyperparameters = space.to_hyperparameters({name: config[name] for name in space.params})
    return trial_config(spec, space, hyperparameters, seed=spec.seed + int(config[NUMBER_KEY]), device=_worker_device(options), options=options)


def _diverged_row(spec: StudySpec, result: TrialResult) -> dict[str, Any]:
    """The last result of a diverged trial.

    Ray requires the metric in every result: the same finite worst value as the Optuna
    backend's, so that ASHA ranks the trial last without a huge number flattening
    anything. The searcher leaves this row out of the sampler's study.
    """
    return {spec.metric: worst_value(spec.direction), "epoch": result.diverged_epoch, "reason": "diverged", "diverged_epoch": result.diverged_epoch}


def confirmation_run(config: TrialConfig, options: RunOptions) -> TrialResult:
    """One confirmation retrain, as a Ray task (see :meth:`RayBackend.confirm`)."""
    _set_threads(options)
    return train_trial(dataclasses.replace(config, device=_worker_device(options)))


# ---------------------------------------------------------------------------------------
# Batched trials (--batch-trials K): a server trains K trials as one stacked model
# ---------------------------------------------------------------------------------------

# A round of training waits this long at most for a member that has not asked for its next
# epoch; then the others train without it, and later rounds do not wait for it until it asks
# again. A member is late when Tune's driver is busy, or when its process is gone: a trial
# that ended (the driver tells the server in a moment), a process that died, or one that
# Tune dropped while it was starting. It is also a member's margin: a server that does not
# answer within an epoch's budget plus this, nor say within this that it is there, fails the
# member's trial (see BatchMember).
STRAGGLER_SECONDS = 10.0
# How often a server looks for members whose process died (a node lost, a process Tune
# dropped), to free their slots.
REAP_SECONDS = 5.0
# How long a study waits for its batch servers to start (torch's import, under load) before
# it says that the cluster has no room for them.
SERVER_START_SECONDS = 120.0
# The memory a member's process reserves: Ray's worker without torch (see ray_member.py).
MEMBER_MEMORY_BYTES = 256 * 2**20


@dataclass
class _Seat:
    """A member in a batch server: its slot, its Tune trial, and its process."""

    slot: int
    trial_id: str
    process_id: str  # the member's Ray actor id: one process trains one trial at a time
    process: Any  # the member's Ray actor handle, pinged to see whether it died


class BatchServer:
    """Up to ``slots`` trials of a Ray study trained as one :class:`~sofim_tune.batched.TrialBatch`.

    A threaded Ray actor that trains with one trial's resources: it holds ``--gpus-per-trial``
    itself, and its members hold ``--cpus-per-trial`` between them. Each trial is a :class:`~sofim_tune.backends.ray_member.BatchMember`
    that joins with its config and asks for one epoch per Tune step, under a key of its own
    (its trial and process). A round trains the members that asked, once every member that is
    not late has asked (see ``STRAGGLER_SECONDS``), so a member's epochs are its own: it
    reproduces the sequential trial whoever trains beside it. A member that finished or
    diverged leaves at once; a trial that Ray's scheduler stopped, or that errored, leaves
    when the driver says so (:class:`_ReleaseSlots`); a process that joins again (Tune
    reuses it for the next trial, or retries its trial) leaves its old seat; a member process
    that Tune stops leaves itself; and one whose process died is dropped within
    ``REAP_SECONDS``. The lock is held through a round's training: a join or leave waits for
    the epoch to end, as the batch cannot change in the middle of one.
    """

    def __init__(self, spec: StudySpec, space: SearchSpace, options: RunOptions, slots: int) -> None:
        _set_threads(options)
        self.spec, self.space, self.options, self.slots = spec, space, options, slots
        self.batch: TrialBatch | None = None
        self.seats: dict[str, _Seat] = {}  # by member key
        self.asking: set[str] = set()
        self.late: set[str] = set()
        self.answers: dict[str, dict[str, Any] | BaseException] = {}
        self.rounds = 0
        self.changed = threading.Condition()
        self.closed = threading.Event()
        threading.Thread(target=self._reap, name="sofim-tune-reaper", daemon=True).start()

    def close(self) -> None:
        """Stop looking for dead members (a server in a Ray actor ends with its process)."""
        self.closed.set()

    def free_slots(self) -> int:
        # Without the lock (a length is read atomically): a member looking for a slot need not wait for an epoch.
        return self.slots - len(self.seats)

    def join(self, member: str, trial_id: str, config: dict[str, Any], process_id: str, process: Any) -> bool:
        """Seat the member with ``config`` (its trial's); False when no slot is free."""
        run = _trial_run(config, self.spec, self.space, self.options)
        with self.changed:
            for earlier in [key for key, seat in self.seats.items() if seat.process_id == process_id]:
                self._drop(earlier)
            if len(self.seats) >= self.slots:
                return False
            if self.batch is None:
                self.batch = TrialBatch(prepare_trial(run), arch=run.arch, optimizer=run.optimizer, batch_size=run.batch_size, slots=self.slots)
            self.seats[member] = _Seat(self.batch.add(run), trial_id, process_id, process)
            self.changed.notify_all()
            return True

    def leave(self, member: str) -> None:
        """Free the member's slot (its process stops); nothing when it holds none."""
        with self.changed:
            self._drop(member)

    def trial_ended(self, trial_id: str) -> None:
        """Free the slots of the trial's members (Ray ended the trial); nothing when it has none here."""
        with self.changed:
            for member in [key for key, seat in self.seats.items() if seat.trial_id == trial_id]:
                self._drop(member)

    def epoch(self, member: str) -> dict[str, Any]:
        """Train the member one more epoch (with the others that ask) and return its Tune result."""
        with self.changed:
            if member not in self.seats:
                raise TrialFailed("the trial holds no slot of its batch server (the server restarted, or the trial ended)")
            self.asking.add(member)
            self.late.discard(member)
            this_round = self.rounds

            def ready() -> bool:
                return self.rounds != this_round or member not in self.seats or self.asking >= self.seats.keys() - self.late

            self.changed.notify_all()
            if not self.changed.wait_for(ready, timeout=STRAGGLER_SECONDS):
                self.late |= self.seats.keys() - self.asking
            if self.rounds == this_round and member in self.seats:
                self._train_round()
            answer = self.answers.pop(member, None)
        if answer is None:
            raise TrialFailed("the trial left its batch during the epoch")
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _train_round(self) -> None:
        """One epoch of every member that asked; their answers by member. Holds the lock throughout."""
        assert self.batch is not None
        asking = {self.seats[member].slot: member for member in self.asking if member in self.seats}
        self.asking.clear()
        self.rounds += 1
        try:
            outcomes = self.batch.train_epoch(asking)
        except Exception as exc:  # noqa: BLE001 - as the Optuna backend: every member fails, the study goes on with a new batch
            for member in asking.values():
                self.answers[member] = TrialFailed(f"{type(exc).__name__}: {exc}")
            self.seats.clear()  # the others find no slot at their next epoch, and Ray retries them too
            self.late.clear()
            self.batch = None
            return
        # In every result, so that a user sees how many trials shared each epoch.
        together = {"trained_together": len(outcomes)}
        for slot, outcome in outcomes.items():
            member = asking[slot]
            if outcome.done:
                del self.seats[member]
                result = self.batch.finish(slot)
            if outcome.diverged:
                self.answers[member] = {**_diverged_row(self.spec, result), **together, "done": True}
            else:
                self.answers[member] = {**outcome.metrics, "epoch": outcome.epoch, **together, "done": outcome.done}  # type: ignore[dict-item]

    def _drop(self, member: str) -> None:
        seat = self.seats.pop(member, None)
        self.asking.discard(member)
        self.late.discard(member)
        if seat is not None and self.batch is not None:
            self.batch.finish(seat.slot, pruned=True)
        self.changed.notify_all()

    def _reap(self) -> None:
        """Forever, every ``REAP_SECONDS``: drop the members whose process died.

        Pinged without the lock, and only a process that Ray says is dead counts: a live one
        may be busy (inside ``epoch``, or Tune's setup) and answer late.
        """
        while not self.closed.wait(REAP_SECONDS):
            with self.changed:
                pings = {member: seat.process.__ray_ready__.remote() for member, seat in self.seats.items() if member not in self.asking}
            if not pings:
                continue
            ray.wait(list(pings.values()), num_returns=len(pings), timeout=REAP_SECONDS)
            dead = []
            for member, ping in pings.items():
                try:
                    ray.get(ping, timeout=0)
                except ray.exceptions.ActorDiedError:
                    dead.append(member)
                except ray.exceptions.RayError:
                    pass  # not answered yet, or its node is unreachable for now
            with self.changed:
                for member in dead:
                    self._drop(member)


def _servers_to_start(options: RunOptions, slots: int, trials: int) -> int:
    """Batch servers for a new study: as many as the cluster's nodes hold (each needs one
    trial's resources), no more than its trials fill, nor than ``--max-concurrent`` trials fill.

    Raises:
        UserInputError: no node holds one trial's CPUs and GPUs together.
    """
    fitting = 0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            fits = [math.floor(resources.get(name, 0.0) / need + 1e-9) for name, need in (("CPU", options.ray_cpus_per_trial), ("GPU", options.ray_gpus_per_trial)) if need > 0]
            fitting += min(fits)
    if fitting == 0:
        raise UserInputError(f"no node of the Ray cluster holds --cpus-per-trial {options.ray_cpus_per_trial:g} and --gpus-per-trial {options.ray_gpus_per_trial:g} together, which a batch server needs")
    wanted = math.ceil(trials / slots)
    if options.max_concurrent is not None:
        wanted = min(wanted, math.ceil(options.max_concurrent / slots))
    return min(fitting, wanted)


def _member_resources(options: RunOptions, slots: int) -> dict[str, float]:
    """What each batched trial reserves: its share of its server's CPUs, and its process's memory.

    The members of a server reserve its CPUs between them, so that Ray runs a new trial only
    where an old one freed its share, as for sequential trials; Tune then hands the ended
    trial's process to the next one. Were the members free, Tune would start a process for
    every new trial (a second of CPU each) and drop most of them.
    """
    return {"cpu": options.ray_cpus_per_trial / slots, "memory": MEMBER_MEMORY_BYTES}


def _start_servers(spec: StudySpec, space: SearchSpace, options: RunOptions, slots: int, count: int) -> list[Any]:
    """``count`` batch servers of ``slots`` slots each, started and answering.

    Raises:
        UserInputError: they did not all start within ``SERVER_START_SECONDS`` (no room on the cluster).
    """
    server = ray.remote(BatchServerActor).options(
        # Its CPUs are reserved by its members (see _member_resources); its GPUs by itself, as CUDA needs them visible.
        num_cpus=0,
        num_gpus=options.ray_gpus_per_trial,
        # Every member may wait inside epoch() or join() at once, asking meanwhile whether the
        # server is there (see BatchMember), while leaves and ended trials come from the driver.
        max_concurrency=4 * slots + 4,
        # A server whose node died starts again elsewhere, empty: Ray retries its members' trials.
        max_restarts=-1,
        scheduling_strategy="SPREAD",
    )
    servers = [server.remote(spec, space, options, slots) for _ in range(count)]
    ready, _ = ray.wait([s.__ray_ready__.remote() for s in servers], num_returns=count, timeout=SERVER_START_SECONDS)
    if len(ready) < count:
        for s in servers:
            ray.kill(s)
        raise UserInputError(
            f"only {len(ready)} of {count} batch servers (each --cpus-per-trial {options.ray_cpus_per_trial:g}, --gpus-per-trial {options.ray_gpus_per_trial:g}) "
            f"started on the Ray cluster within {SERVER_START_SECONDS:g} s; free its resources, or lower --batch-trials or --max-concurrent"
        )
    return servers


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
# The searcher (runs in Ray's driver)
# ---------------------------------------------------------------------------------------

# What the searcher knows of a trial: "removed" is one Ray stopped before its first epoch
# (a pending trial it dropped); it is failed in the sampler's study and in no record.
Outcome = Literal["complete", "pruned", "failed", "removed"]
_OUTCOME_STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL, "removed": TrialState.FAIL}


class _SofimSearch(OptunaSearch):
    """Ray's OptunaSearch, told about trials the way the Optuna backend tells Optuna.

    Ray reports a trial that ASHA stopped early as complete, with the value of its last
    epoch, and a diverged trial's worst value as a result; the sampler would take both for
    real outcomes. Here a trial that reached ``epochs`` is COMPLETE, one stopped earlier
    or diverged PRUNED (with the epochs it trained as intermediate values), and one that
    errored FAIL.

    It also decides when the search is over: Ray's ``num_samples`` counts every trial,
    failed ones included, so the Tuner runs with no limit and this searcher hands out
    trials until ``target`` of them finished (complete or pruned), or
    ``MAX_CONSECUTIVE_FAILURES`` in a row failed. Its state is pickled with Ray's
    experiment, so a resumed run keeps counting.
    """

    def __init__(self, space: SearchSpace, *, metric: str, mode: str, points_to_evaluate: list[dict[str, float]] | None, sampler: optuna.samplers.BaseSampler, epochs: int, target: int) -> None:
        super().__init__(_DefineSpace(space), metric=metric, mode=mode, points_to_evaluate=points_to_evaluate, sampler=sampler)
        self.epochs = epochs
        self.target = target
        self.outcomes: dict[str, Outcome] = {}
        self.consecutive_failures = 0
        self.search_finished = False

    def _counts(self) -> tuple[int, int]:
        done = sum(1 for outcome in self.outcomes.values() if outcome in ("complete", "pruned"))
        live = sum(1 for trial_id in self._ot_trials if trial_id not in self.outcomes)
        return done, live

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if trial_id not in self._ot_trials:
            done, live = self._counts()
            if done >= self.target or self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                self.search_finished = True
                return Searcher.FINISHED
            if done + live >= self.target:
                return None  # enough trials running; ask again when one ends (it may fail)
        return super().suggest(trial_id)

    def _report(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """One epoch's value as the trial's intermediate value at step ``epoch``, as the Optuna backend reports it.

        A diverged trial's last row is there for Ray only; for the sampler the trial is
        pruned after the epochs it trained. An epoch reported already (a trial retried
        from scratch) keeps its first value.
        """
        value, epoch = result.get(self.metric), result.get("epoch")
        if result.get("reason") == "diverged" or not isinstance(value, (int, float)) or not math.isfinite(value) or epoch is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ot_trials[trial_id].report(float(value), step=int(epoch))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result=result, error=error)  # Ray's own warning
            return
        outcome: Outcome
        if error:
            outcome = "failed"
        elif not result or result.get("epoch") is None:
            outcome = "removed"  # stopped before its first epoch
        elif result.get("reason") == "diverged" or int(result.get("epoch", 0)) < self.epochs:
            outcome = "pruned"
        else:
            outcome = "complete"
        if result:
            # Ray does not pass on the result that made the scheduler stop a trial (at
            # max_t too, for ASHA): the last epoch is reported here.
            self._report(trial_id, result)
        value = result.get(self.metric) if outcome == "complete" and result else None
        if outcome == "complete" and not (isinstance(value, (int, float)) and math.isfinite(value)):
            outcome, value = "failed", None
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=_OUTCOME_STATES[outcome])
        except (ValueError, RuntimeError) as exc:
            logging.getLogger(__name__).warning("the searcher could not record trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
        self.outcomes[trial_id] = outcome
        if outcome == "failed":
            self.consecutive_failures += 1
        elif outcome != "removed":
            self.consecutive_failures = 0

    def summary(self) -> dict[str, Any]:
        """What :data:`SEARCH_FILE` holds: every trial handed out, with its outcome or ``running``."""
        trials = [
            {"number": ot_trial.number, "trial_id": trial_id, "state": self.outcomes.get(trial_id, "running"), "params": dict(ot_trial.params)}
            for trial_id, ot_trial in self._ot_trials.items()
        ]
        return {"target": self.target, "finished": self.search_finished, "trials": sorted(trials, key=lambda t: t["number"])}

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        # Ray saves the searcher together with the trials' states (and at the very end of
        # a run, interrupted or not), so the JSON always matches the experiment's state.
        super().save_to_dir(checkpoint_dir, session_str)
        write_text_atomic(Path(checkpoint_dir) / SEARCH_FILE, json.dumps(self.summary(), indent=1) + "\n")


# ---------------------------------------------------------------------------------------
# Reading trials back: one mapping for the live view and for the experiment folder
# ---------------------------------------------------------------------------------------

# How a trial stands before its rows are looked at: "ended" (by itself, by the
# scheduler or by the time budget), "failed" (errored for good) or "running" (not ended).
Standing = Literal["ended", "failed", "running"]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _time(seconds: Any) -> datetime | None:
    return datetime.fromtimestamp(float(seconds), tz=timezone.utc) if _present(seconds) else None


def _trial_record(
    standing: Standing, number: int, params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], error: str | None, space: SearchSpace, metric: str, epochs: int
) -> TrialRecord | None:
    """A Ray trial as a :class:`TrialRecord`; None for a trial that ended before it started.

    ``params`` are the searched values (the space's names); ``rows`` the trial's results
    in order (one per epoch, plus a last one for a diverged trial). An ended trial that
    reached ``epochs`` is complete; one that stopped earlier was stopped by the scheduler
    (or by ``--timeout``) and is pruned.
    """
    hyperparameters = space.to_hyperparameters({name: params[name] for name in space.params})
    last = rows[-1] if rows else {}
    # A run retried from scratch reports its epochs again; the latest attempt wins.
    intermediate = {int(r["epoch"]): float(r[metric]) for r in rows if r.get("reason") != "diverged" and _present(r.get(metric))}
    attrs: dict[str, Any] = {}
    value = None
    if _present(last.get("time_total_s")):
        attrs["seconds"] = round(float(last["time_total_s"]), 3)
    # As the Optuna backend records it: the last finished epoch's (SOFIM only).
    trained = [r for r in rows if r.get("reason") != "diverged"]
    if trained and _present(trained[-1].get("fisher_ratio")):
        attrs["fisher_ratio"] = float(trained[-1]["fisher_ratio"])
    if standing == "failed":
        state = "failed"
        attrs.update(reason="failed", error=error or "failed")
    elif standing == "running":
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
        number=number,
        state=state,  # type: ignore[arg-type]
        params=hyperparameters,
        value=value,
        intermediate=intermediate,
        attrs=attrs,
        started=started,
        finished=_time(last.get("timestamp")) if state != "running" else None,
    )


def _study_record(meta: Mapping[str, Any], trials: list[TrialRecord]) -> StudyRecord:
    confirmations = [Confirmation(**c) for c in meta.get("confirmations", [])]
    return record_from_metadata(meta, name=meta["name"], backend="ray", trials=trials, confirmations=confirmations)


def _error_message(text: str | None) -> str | None:
    """The last line of a trial's ``error.txt`` (Ray's text trace of its latest failure)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    match = _QUALIFIED_ERROR.match(lines[-1])
    if match is None:
        return lines[-1]
    name, message = match.groups()
    return message if name == TrialFailed.__name__ else f"{name}: {message}"


# Ray's newer console output prints a table to stdout even at verbose=0; the older one is
# silent at 0. Ray reads this variable in the driver when a run starts.
_CONSOLE_OUTPUT_VARIABLE = "RAY_AIR_NEW_OUTPUT"


@contextlib.contextmanager
def _old_console_output() -> Iterator[None]:
    """Ray's older (silent) console output while the block runs; a user's own setting wins.

    The variable is removed again afterwards: the process's environment is the caller's.
    """
    if _CONSOLE_OUTPUT_VARIABLE in os.environ:
        yield
        return
    os.environ[_CONSOLE_OUTPUT_VARIABLE] = "0"
    try:
        yield
    finally:
        os.environ.pop(_CONSOLE_OUTPUT_VARIABLE, None)


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


class _Files:
    """Plain files of an experiment folder, local or at a URI (``s3://...``): read as text, never unpickled."""

    def __init__(self, root: str) -> None:
        self.fs: Any = None
        self.root = root
        if _is_uri(root):
            import pyarrow.fs

            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(root)

    def folders(self) -> list[str]:
        if self.fs is None:
            path = Path(self.root)
            return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        return sorted(Path(i.path).name for i in infos if i.type == pyarrow.fs.FileType.Directory)

    def text(self, *parts: str, limit: int = MAX_JSON_BYTES, tail: bool = False) -> str | None:
        """The file's text, read no further than ``limit`` bytes; None when it does not exist, is
        not a regular file (a pipe would block), or is larger than ``limit``. With ``tail``, a
        larger file gives its last ``limit`` bytes instead."""
        data = self._bytes(parts, limit, tail)
        return None if data is None else data.decode("utf-8", errors="replace")

    def _bytes(self, parts: tuple[str, ...], limit: int, tail: bool) -> bytes | None:
        if self.fs is None:
            try:
                # O_NONBLOCK: opening a named pipe returns at once instead of waiting for a writer.
                stream = os.fdopen(os.open(Path(self.root, *parts), os.O_RDONLY | os.O_NONBLOCK), "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            with stream:
                info = os.fstat(stream.fileno())
                return _read_capped(stream, info.st_size, limit, tail) if stat.S_ISREG(info.st_mode) else None
        import pyarrow.fs

        path = "/".join((self.root.rstrip("/"), *parts))
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_file(path) as stream:
            return _read_capped(stream, stream.size(), limit, tail)

    def json(self, *parts: str, limit: int = MAX_JSON_BYTES) -> Any:
        text = self.text(*parts, limit=limit)
        try:
            return json.loads(text) if text is not None else None
        except (ValueError, RecursionError):
            return None  # a file written by something else (or nested too deep to parse); read as missing

    def rows(self, folder: str, metric: str) -> list[dict[str, Any]]:
        """``result.json``: one JSON object per line; a line cut short by a live writer, or one that
        no trial wrote (see :func:`_is_result_row`), is skipped, and so is a file larger than
        :data:`MAX_RESULT_BYTES`."""
        rows = []
        for line in (self.text(folder, "result.json", limit=MAX_RESULT_BYTES) or "").splitlines():
            with contextlib.suppress(ValueError, RecursionError):
                row = json.loads(line)
                if _is_result_row(row, metric):
                    rows.append(row)
        return rows


def _read_capped(stream: Any, size: int, limit: int, tail: bool) -> bytes | None:
    """At most ``limit`` bytes of a seekable ``stream`` of ``size`` bytes: all of it, its last
    ``limit`` bytes (``tail``), or None when it is larger (or grows larger while being read)."""
    if size > limit and not tail:
        return None
    stream.seek(max(size - limit, 0))
    data = stream.read(limit + 1)
    if len(data) > limit:
        return data[-limit:] if tail else None
    return data


# The numbers that _trial_record reads from a result row besides the metric.
_ROW_NUMBERS = ("epoch", "timestamp", "time_total_s", "time_this_iter_s", "fisher_ratio", "diverged_epoch")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_result_row(row: Any, metric: str) -> bool:
    """Whether ``row`` reads as a trial's result: an object whose numbers are finite numbers (the
    metric may be NaN), with the epoch of any metric and the epoch of any divergence."""
    if not isinstance(row, dict):
        return False
    if any(row.get(key) is not None and not (_is_number(row[key]) and math.isfinite(row[key])) for key in _ROW_NUMBERS):
        return False
    if row.get(metric) is not None and not (_is_number(row[metric]) and row.get("epoch") is not None):
        return False
    return row.get("reason") != "diverged" or row.get("diverged_epoch") is not None


def _holds_values(params: Any, space: SearchSpace) -> bool:
    """Whether ``params`` gives a number for every parameter of ``space``."""
    return isinstance(params, dict) and all(_is_number(params.get(name)) for name in space.params)


def _is_search_entry(entry: Any, space: SearchSpace) -> bool:
    """Whether an entry of :data:`SEARCH_FILE` reads as the searcher wrote it (see ``_SofimSearch.summary``)."""
    return isinstance(entry, dict) and isinstance(entry.get("trial_id"), str) and isinstance(entry.get("number"), int) and isinstance(entry.get("state"), str) and _holds_values(entry.get("params"), space)


def _search_finished(experiment: str) -> bool | None:
    """Whether the searcher ended the search (target reached, or too many failures in a row);
    None when the experiment has no :data:`SEARCH_FILE`."""
    search = _Files(experiment).json(SEARCH_FILE, limit=MAX_SEARCH_FILE_BYTES)
    return bool(search.get("finished")) if isinstance(search, dict) else None


def _read_trials(experiment: str, space: SearchSpace, metric: str, epochs: int, *, ended: bool) -> list[TrialRecord]:
    """The trials of a Ray experiment folder, from its plain files.

    Which trials belong to the experiment, and how each ended, is the searcher's account in
    :data:`SEARCH_FILE`, saved with Ray's own state. A trial that ended after the last save
    (the run is live, or was killed) is read from its folder: a last result marked
    ``done`` means it ended; an ``error.txt`` without one, that it failed. Folders of
    trials the account does not know are read the same way, unless their number belongs
    to a known trial (a run killed between two saves hands numbers out again on resume).
    ``ended``: the run returned and was not interrupted, so no trial is running (Ray's
    time budget stops trials without telling the searcher).
    """
    files = _Files(experiment)
    search = files.json(SEARCH_FILE, limit=MAX_SEARCH_FILE_BYTES)
    known: dict[str, dict[str, Any]] = {}
    if isinstance(search, dict) and isinstance(search.get("trials"), list):
        # An entry the searcher did not write is left out: its folder is read as a trial it does not know.
        known = {t["trial_id"]: t for t in search["trials"] if _is_search_entry(t, space)}
    folders: dict[str, tuple[int, str]] = {}
    for name in files.folders():
        match = _TRIAL_DIR.match(name)
        if match:
            folders[match.group(2)] = (int(match.group(1)), name)
    numbers = {int(t["number"]) for t in known.values()}
    unknown = [trial_id for trial_id, (number, _) in folders.items() if trial_id not in known and number not in numbers]

    records: dict[int, tuple[float, TrialRecord]] = {}
    for trial_id in [*known, *unknown]:
        number, folder = folders.get(trial_id, (None, None))
        entry = known.get(trial_id)
        rows = files.rows(folder, metric) if folder else []
        error = files.text(folder, "error.txt", tail=True) if folder else None
        if entry is not None:
            number, params, recorded = int(entry["number"]), entry["params"], entry["state"]
        else:
            config = files.json(folder, "params.json") if folder else None
            if not _holds_values(config, space):
                continue  # a trial that has not written its settings yet (or a file no trial wrote)
            params, recorded = config, None
        standing: Standing
        if recorded == "removed":
            continue
        if recorded == "failed":
            standing = "failed"
        elif recorded in ("complete", "pruned") or (rows and rows[-1].get("done")):
            standing = "ended"
        elif error is not None:
            standing = "failed"
        else:
            standing = "ended" if ended else "running"
        if standing == "failed" and not rows and error is None:
            continue  # never started
        record = _trial_record(standing, int(number), params, rows, _error_message(error), space, metric, epochs)  # type: ignore[arg-type]
        if record is not None:
            # Two unknown folders of one number: the later one is the trial's latest run.
            when = float(rows[-1].get("timestamp", 0.0)) if rows else 0.0
            if record.number not in records or when >= records[record.number][0]:
                records[record.number] = (when, record)
    return [record for _, record in records.values()]


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


def _standing(status: str) -> Standing:
    if status == Trial.ERROR:
        return "failed"
    return "running" if status in _UNFINISHED else "ended"


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
            record = _trial_record(_standing(trial.status), int(trial.config[NUMBER_KEY]), trial.config, rows, None, space, metric, epochs)
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


class _ReleaseSlots(tune.Callback):
    """Tells the batch servers that a trial ended, so that its slot takes the next one.

    Ray pickles it into the experiment and a resumed run (whose folder may have moved)
    starts servers of its own, so it holds nothing: it tells the servers of every study that
    this process runs (Tune's trial ids are unique).
    """

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        for servers in _SERVERS.values():
            for server in servers:
                server.trial_ended.remote(trial.trial_id)

    on_trial_error = on_trial_complete


# The batch servers of each running experiment, by its path.
_SERVERS: dict[str, list[Any]] = {}


# ---------------------------------------------------------------------------------------
# Checks before anything runs
# ---------------------------------------------------------------------------------------


def _refuse_optuna_options(options: RunOptions) -> None:
    """Refuse the Optuna backend's options, each with the Ray option that does its work.

    Ray places trials by what each reserves, so none of them means the same here: ignored,
    ``--gpus all`` would train every trial on the CPU. ``--device cuda`` is refused only where
    it would be ignored so, as a trial with ``--gpus-per-trial`` trains on its GPU.
    """
    gpu_instead = "a Ray trial gets its GPU from --gpus-per-trial (1: a GPU each, 0.25: four trials per GPU)"
    given = [
        ("--workers", options.workers is not None, "Ray runs as many trials at once as their resources allow; cap them with --max-concurrent"),
        ("--threads-per-trial", options.threads_per_trial is not None, "a Ray trial runs one torch thread per CPU it reserves; set --cpus-per-trial"),
        ("--gpus", bool(options.gpus), gpu_instead),
        (f"--device {options.device}", options.device.strip().lower().startswith("cuda") and options.ray_gpus_per_trial == 0, gpu_instead),
        ("--storage", options.storage is not None, "Ray keeps its experiment under --storage-path (default: --out/ray)"),
    ]
    for option, is_given, instead in given:
        if is_given:
            raise UserInputError(f"{option} is for the Optuna backend and does nothing with --backend ray: {instead}")


def _check_resource_numbers(options: RunOptions) -> None:
    if options.ray_cpus_per_trial < 0 or options.ray_gpus_per_trial < 0:
        raise UserInputError(f"--cpus-per-trial and --gpus-per-trial must be >= 0, got {options.ray_cpus_per_trial:g} and {options.ray_gpus_per_trial:g}")
    if options.ray_cpus_per_trial == 0 and options.ray_gpus_per_trial == 0:
        raise UserInputError("a trial needs some resources: --cpus-per-trial or --gpus-per-trial must be > 0")
    # Ray shares a GPU only in fractions of one; 1.5 GPUs cannot be placed.
    if options.ray_gpus_per_trial > 1 and not float(options.ray_gpus_per_trial).is_integer():
        raise UserInputError(f"--gpus-per-trial above 1 must be a whole number, got {options.ray_gpus_per_trial:g}")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise UserInputError(f"--max-concurrent must be >= 1, got {options.max_concurrent}")


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
    folder = Path(root)
    # The folders this check creates are removed again: the run folder must stay empty
    # until it is claimed, and Ray makes the experiment folder itself.
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / ".sofim-tune-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(f"cannot write Ray storage at {root}: {exc.strerror or exc}") from None
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


# ---------------------------------------------------------------------------------------
# Metadata in the run folder
# ---------------------------------------------------------------------------------------


# What a study's metadata must hold to be read back (study_metadata writes them all).
_METADATA_KEYS = ("name", "backend", "dataset", "arch", "optimizer", "space", "space_definition", "log_params", "metric", "direction", "sampler", "pruner", "epochs", "batch_size", "fixed", "trials", "storage", "created")


def _read_metadata(run_dir: Path) -> dict[str, Any] | None:
    """``ray_study.json`` of a run folder; None when there is none. A damaged one is one clear line."""
    path = run_dir / METADATA_FILE
    if not path.exists():
        return None
    meta = read_json(path, f"{path}: cannot read")
    missing = [key for key in _METADATA_KEYS if key not in meta] if isinstance(meta, dict) else ["everything: not a JSON object"]
    if missing:
        raise UserInputError(f"{path}: corrupted (missing {', '.join(missing[:3])}); rerun the study into a new --out")
    return meta


@contextlib.contextmanager
def _metadata_read_from(run_dir: Path) -> Iterator[None]:
    """A ``ray_study.json`` whose fields have the wrong types (edited by hand, say) is one line, not a traceback."""
    try:
        yield
    except UserInputError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise UserInputError(f"{run_dir / METADATA_FILE}: corrupted ({type(exc).__name__}: {exc}); rerun the study into a new --out") from None


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
    """The metadata of the experiment to resume, checked against this run; None to start anew.

    A run folder that records an experiment resumes that one or none: starting another (a
    changed ``--storage-path``, or one that Ray cannot restore, as it was killed before its
    first save) would orphan it and overwrite the record of its trials and confirmations.
    """
    restorable = tune.Tuner.can_restore(experiment)
    meta = _read_metadata(options.out_dir)
    if meta is not None and meta.get("backend") != "ray":
        raise UserInputError(f"{options.out_dir / METADATA_FILE} does not describe a Ray study; choose a new --out")
    if meta is None:
        if restorable:
            raise UserInputError(f"{experiment} holds a Ray experiment that {options.out_dir / METADATA_FILE} does not describe; use another --out or --storage-path")
        return None
    with _metadata_read_from(options.out_dir):
        return _resumable(meta, spec, space, options, experiment, restorable)


def _resumable(meta: dict[str, Any], spec: StudySpec, space: SearchSpace, options: RunOptions, experiment: str, restorable: bool) -> dict[str, Any]:
    """``meta``, the run folder's record, when this run can resume its experiment (see :func:`_existing_experiment`)."""
    recorded_experiment = _experiment_path(meta, options.out_dir)
    if recorded_experiment != experiment:
        resume = "leave --storage-path out" if meta.get("storage_path") is None else f"give --storage-path {meta['storage_path']}"
        raise UserInputError(f"{options.out_dir} holds the Ray experiment {recorded_experiment}, not {experiment}; to resume it, {resume}; to start afresh, choose a new --out")
    if not restorable:
        raise UserInputError(
            f"{options.out_dir} holds the Ray experiment {experiment}, which Ray cannot restore (it was stopped before its first save, or its files are gone); to start afresh, choose a new --out"
        )
    where = f"the Ray experiment in {experiment}"
    if (meta["trials"], meta["epochs"]) != (spec.trials, effective_epochs(spec, space)):
        # Ray restores the experiment's own number of trials and its scheduler's epochs.
        raise UserInputError(
            f"{where} runs {meta['trials']} trials of {meta['epochs']} epochs, and Ray cannot "
            f"change that on resume; use --trials {meta['trials']} --epochs {meta['epochs']}, or another --out"
        )
    recorded = _recorded_batch(meta)
    if options.batch_trials is not None and options.batch_trials != recorded:
        # Ray restores the experiment's own trainable: a batch member, or a trial of its own.
        raise UserInputError(f"{where} trains {recorded} trial{'s' if recorded > 1 else ''} per batch, and Ray cannot change that on resume; use --batch-trials {recorded}, or another --out")
    check_resumable(meta, spec, space, where)
    return meta


def _recorded_batch(meta: Mapping[str, Any]) -> int:
    """Trials per batch server of an experiment (1: no batching; so are experiments made before batching)."""
    return int(meta.get("batch_trials") or 1)


# ---------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------


def run_ray_study(spec: StudySpec, space: SearchSpace, options: RunOptions, *, on_progress: Callable[[StudyRecord], None] | None = None) -> StudyRecord:
    """Run (or resume) the study of ``spec`` as a Ray Tune experiment, to ``spec.trials`` finished trials.

    Each trial reserves ``options.ray_cpus_per_trial`` CPUs and ``options.ray_gpus_per_trial``
    GPUs (a fraction shares a GPU); at most ``options.max_concurrent`` run at once
    (default: as many as fit). A trial that errors (after Ray's retries) is failed and
    does not count: another one runs in its place, as in the Optuna backend, until
    ``MAX_CONSECUTIVE_FAILURES`` in a row failed. A rerun with the same run folder resumes
    the experiment: finished and failed trials are kept, unfinished ones run again.
    ``on_progress`` receives the study after every result. Returns the study as a
    :class:`StudyRecord`.

    Raises:
        UserInputError: bad resources, an unreachable cluster, storage that cannot be
            written, or an existing experiment made for another space, metric or budget.
        KeyboardInterrupt: the run was interrupted (Ctrl-C); Ray saved its state first.
    """
    _refuse_optuna_options(options)
    if spec.lookahead != DEFAULT_LOOKAHEAD:
        raise UserInputError("--lookahead is for the Optuna backend and does nothing with --backend ray: Ray Tune starts a trial whenever a slot frees, so its studies depend on timing (see the README's Reproducible studies)")
    _check_resource_numbers(options)
    enqueue = settings_to_enqueue(spec, space, options)
    root = _storage_root(options)
    experiment = f"{root.rstrip('/')}/{spec.name}"
    existing = _existing_experiment(spec, space, options, experiment)
    connect(options)
    check_cluster_fits(options)
    _check_writable(root)

    # Trials per batch server (1: none) and servers: on resume the experiment's own, as Ray
    # restores its trainable and its limit of trials at once.
    if existing is None:
        slots = options.batch_trials or 1
        server_count = _servers_to_start(options, slots, spec.trials) if slots > 1 else 0
    else:
        slots, server_count = _recorded_batch(existing), int(existing.get("batch_servers") or 0)
    epochs = effective_epochs(spec, space)
    if existing is None:
        pruner, scheduler = _scheduler(spec, epochs)
        meta = {
            **study_metadata(spec, space, experiment),
            "backend": "ray",
            "name": spec.name,
            "pruner": pruner,
            "batch_trials": slots,
            "batch_servers": server_count,
            # None: the experiment lives in the run folder, and moves with it.
            "storage_path": root if options.storage_path is not None else None,
        }
    else:
        # A restored experiment keeps its searcher, scheduler and settings to enqueue.
        meta = existing
    # "ended": the last run returned, not interrupted; until then trials may be running.
    meta = {**meta, "ended": False}

    key = experiment
    max_concurrent = options.max_concurrent
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        if slots > 1:
            _SERVERS[key] = _start_servers(spec, space, options, slots, server_count)
            # As many trials as the servers have slots: members of GPU-only trials reserve no CPU, and Ray would start them all.
            capacity = server_count * slots
            max_concurrent = capacity if options.max_concurrent is None else min(capacity, options.max_concurrent)
            trainable = tune.with_resources(tune.with_parameters(BatchMember, servers=_SERVERS[key], straggler_seconds=STRAGGLER_SECONDS), _member_resources(options, slots))
        else:
            trainable = tune.with_resources(
                tune.with_parameters(sofim_trial, spec=spec, space=space, options=options),
                {"cpu": options.ray_cpus_per_trial, "gpu": options.ray_gpus_per_trial},
            )
        # Recorded only now that Ray is ready to run the experiment: a folder that records one
        # resumes it or nothing (see _existing_experiment), so servers that found no room
        # must not leave a record behind.
        claim_run_folder(options.out_dir, backend="ray", storage=experiment, study=spec.name)
        _write_json(options.out_dir / METADATA_FILE, meta)
        if on_progress is not None:
            _LISTENERS[key] = _Listener(on_progress, meta, space)
        # Restoring, and at the end of fit(), Ray reads the experiment back and warns
        # about every trial without a result file; after an interruption that is each
        # trial that had not finished an epoch yet, which is expected.
        with _quiet(_ANALYSIS_LOGGER), _old_console_output():
            if existing is not None:
                # Errored trials stay failed: the searcher ran others in their place.
                tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
            else:
                tuner = tune.Tuner(trainable, tune_config=_tune_config(spec, space, options, scheduler, enqueue, max_concurrent), run_config=_run_config(spec, root, key, slots))
            grid = tuner.fit()
    finally:
        _LISTENERS.pop(key, None)
        for server in _SERVERS.pop(key, []):
            ray.kill(server)
        # Tune leaves its Ctrl-C handler installed after a run; without this, the first
        # Ctrl-C during the confirmation step afterwards would be swallowed.
        if main_thread:
            signal.signal(signal.SIGINT, sigint)

    # Ctrl-C makes Tune save its state and return as if done. Trials left neither ended
    # nor errored, or a search that had not finished without a time budget to explain
    # it, mean the run was interrupted.
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    finished = _search_finished(experiment)
    if finished is None:
        # No account: the experiment was made before the searcher kept one.
        finished = len(grid) >= spec.trials
    # A search that Ray's time budget ended stays ended: a restored experiment starts no
    # new trial, so a rerun (with or without --timeout) returns the same study.
    budget_spent = not finished and (options.timeout is not None or bool(meta.get("time_budget_spent")))
    interrupted = unfinished > 0 or not (finished or budget_spent)
    if interrupted:
        raise KeyboardInterrupt
    meta = {**meta, "ended": True, "time_budget_spent": budget_spent}
    _write_json(options.out_dir / METADATA_FILE, meta)
    record = _study_record(meta, _read_trials(experiment, space, spec.metric, epochs, ended=True))
    if on_progress is not None:
        on_progress(record)
    return record


def _tune_config(spec: StudySpec, space: SearchSpace, options: RunOptions, scheduler: TrialScheduler, enqueue: list[dict[str, float]], max_concurrent: int | None) -> tune.TuneConfig:
    mode = "max" if spec.direction == "maximize" else "min"
    search = _SofimSearch(
        space,
        metric=spec.metric,
        mode=mode,
        points_to_evaluate=enqueue or None,
        sampler=make_sampler(spec.sampler, space, spec.seed, spec.trials),
        epochs=effective_epochs(spec, space),
        target=spec.trials,
    )
    return tune.TuneConfig(
        search_alg=search,
        scheduler=scheduler,
        # No limit: the searcher ends the search once spec.trials trials finished, so
        # that failed trials are replaced (see _SofimSearch).
        num_samples=-1,
        max_concurrent_trials=max_concurrent,
        time_budget_s=options.timeout,
        trial_dirname_creator=_trial_dirname,
        # A worker keeps its process between trials, so the dataset it decoded (and moved
        # to its GPU) serves its next trial too.
        reuse_actors=True,
    )


def _run_config(spec: StudySpec, root: str, key: str, slots: int) -> tune.RunConfig:
    return tune.RunConfig(
        name=spec.name,
        storage_path=root,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        callbacks=[_LiveRecord(key), *([_ReleaseSlots()] if slots > 1 else [])],
        # A batched member has no state of its own to save: a trial that must run again starts over, as a sequential one does.
        checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
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
    with _metadata_read_from(run_dir):
        space = SearchSpace.from_dict(meta["space_definition"])
        experiment, metric, epochs = _experiment_path(meta, run_dir), str(meta["metric"]), int(meta["epochs"])
        _study_record(meta, [])  # every other field it records, checked before the trials are read
    return _study_record(meta, _read_trials(experiment, space, metric, epochs, ended=bool(meta.get("ended"))))


class RayBackend:
    """Ray Tune: trials as Ray actors on one machine or a cluster (see the module's docstring)."""

    name = "ray"

    def check_options(self, options: RunOptions) -> None:
        """No option that only the Optuna backend uses, resources that make sense, and a
        cluster that answers and accepts this machine's token."""
        _refuse_optuna_options(options)
        _check_resource_numbers(options)
        cluster_address(options)

    def run(self, spec: StudySpec, space: SearchSpace, options: RunOptions, *, on_progress: Callable[[StudyRecord], None] | None = None) -> StudyRecord:
        return run_ray_study(spec, space, options, on_progress=on_progress)

    def load(self, run_dir: Path | None, *, storage: str | None = None, study: str | None = None) -> StudyRecord:
        if run_dir is None:
            raise UserInputError("a Ray study is read from its run folder")
        return load_ray_record(run_dir)

    def confirm(self, configs: Sequence[TrialConfig], options: RunOptions, on_done: Callable[[int], None] | None = None) -> list[TrialResult]:
        """All runs at once, as Ray tasks with a trial's resources; results in the order of ``configs``
        (``on_done`` counts them in that order too, so it never runs ahead of the cluster).

        A task that errors (a lost node, bad settings) gives a ``failed`` result; the
        others are kept.
        """
        if not configs:
            return []
        _check_resource_numbers(options)
        connect(options)
        task = ray.remote(confirmation_run).options(num_cpus=options.ray_cpus_per_trial, num_gpus=options.ray_gpus_per_trial)
        refs = [task.remote(config, options) for config in configs]
        results = []
        try:
            for config, ref in zip(configs, refs, strict=True):
                try:
                    results.append(ray.get(ref))
                except (ray.exceptions.RayError, UserInputError) as exc:
                    # A RayTaskError carries the task's own exception.
                    results.append(failed_result(config, getattr(exc, "cause", None) or exc, _worker_device(options)))
                if on_done is not None:
                    on_done(len(results))
        except KeyboardInterrupt:
            # Ctrl-C: the runs still queued or running on the cluster are not wanted any more.
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        return results

    def save_confirmations(self, record: StudyRecord, confirmations: list[Confirmation], options: RunOptions) -> StudyRecord:
        """Store the seed confirmations in ``ray_study.json``, so that a later export or plot shows them."""
        meta = _read_metadata(options.out_dir)
        if meta is None:
            raise UserInputError(f"{options.out_dir} holds no Ray study (no {METADATA_FILE})")
        _write_json(options.out_dir / METADATA_FILE, {**meta, "confirmations": [dataclasses.asdict(c) for c in confirmations]})
        return dataclasses.replace(record, confirmations=list(confirmations))


BACKEND = RayBackend()
