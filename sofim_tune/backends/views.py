"""Fixed views: what each trial of a reproducible study is drawn from and judged against.

Trials run in parallel, yet a study's result must not depend on which worker finishes
first. So the trial with logical index ``i`` (see :func:`logical_indices`) draws its settings
from, and is pruned against, only the trials with index at most ``i - lookahead``, and it
starts only once every one of those has settled (completed, pruned or failed). Every input
of trial ``i`` is fixed before it starts, so the same spec, seed and data give the same
trials, values and pruning decisions with 1, 2 or 8 workers, batched or not, and after an
interruption and a resume.

The cost, stated in the README ("Reproducible studies"): at most ``lookahead`` trials run at
once, and a trial's sampler does not see the ``lookahead - 1`` trials just before it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

DEFERRED = "deferred"
"""The reason recorded on a trial that stepped back for a queued one (see :class:`Deferred`)."""

RETRIED_REASONS = ("interrupted", DEFERRED)
"""A trial failed for one of these reasons is tried again under the same logical index."""


class Deferred(Exception):
    """A trial's view waits on a queued trial that no worker runs yet.

    The trial steps back (failed as :data:`DEFERRED` and queued again) so that its worker
    takes the queued trial: the lowest unsettled index always has a complete view, so a
    study never waits on itself, even with one worker.
    """


def logical_indices(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Each trial's logical index, by trial number.

    A retry (user attribute ``retry_of``) takes the index of the trial it retries; every
    other trial takes the next index in the order of trial numbers. A study that was
    interrupted, retried what it left and went on thus has the same indices as one that
    ran without a stop.
    """
    indices: dict[int, int] = {}
    fresh = 0
    for trial in sorted(trials, key=lambda t: t.number):
        retried = trial.user_attrs.get("retry_of")
        if retried in indices:
            indices[trial.number] = indices[retried]
        else:
            indices[trial.number] = fresh
            fresh += 1
    return indices


def settled(trial: FrozenTrial) -> bool:
    """Whether a trial's outcome is final: completed, pruned, or failed for good (not to be retried)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("reason") not in RETRIED_REASONS


def latest_attempts(trials: Sequence[FrozenTrial]) -> dict[int, FrozenTrial]:
    """The latest trial (the highest number) of each logical index."""
    indices = logical_indices(trials)
    latest: dict[int, FrozenTrial] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        latest[indices[trial.number]] = trial
    return latest


def settled_prefix(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The settled attempts of indices 0, 1, 2, ... up to the first index that has not settled."""
    latest = latest_attempts(trials)
    prefix = []
    while len(prefix) in latest and settled(latest[len(prefix)]):
        prefix.append(latest[len(prefix)])
    return prefix


def fixed_view(trials: Sequence[FrozenTrial], number: int, lookahead: int) -> list[FrozenTrial] | FrozenTrial:
    """The view of trial ``number``: the settled attempt of every index up to its own index
    minus ``lookahead``, in index order.

    Returns instead the trial it waits for, while one of those is running or failed and about
    to be queued again; raises :class:`Deferred` when one is queued and no worker has it.
    """
    indices = logical_indices(trials)
    latest = latest_attempts(trials)
    view = []
    for index in range(indices[number] - lookahead + 1):
        trial = latest[index]
        if settled(trial):
            view.append(trial)
        elif trial.state == TrialState.WAITING:
            raise Deferred(f"trial {number} waits for trial {trial.number}, which is queued")
        else:
            return trial
    return view


def view_study(
    view: Sequence[FrozenTrial],
    index: int,
    name: str,
    direction: str,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """An in-memory study that holds ``view`` as trials 0, 1, ... and failed empty trials up to
    ``index``, so that the next trial it creates is numbered ``index``.

    Trial numbers are what Hyperband hashes to choose a trial's bracket, so a trial is in the
    same bracket whichever view it is seen in. The study has the real study's name for the same
    reason. Nothing is logged: a view study is made for every draw and every pruning decision.
    """
    storage = InMemoryStorage()
    with _silenced(_IN_MEMORY_LOGGER):
        storage.create_new_study(directions=[StudyDirection.MAXIMIZE if direction == "maximize" else StudyDirection.MINIMIZE], study_name=name)
    study = optuna.Study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    for trial in view:
        study.add_trial(trial)
    for _ in range(len(view), index):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    return study


# Optuna's in-memory storage logs every study it creates, at INFO.
_IN_MEMORY_LOGGER = "optuna.storages._in_memory"


@contextlib.contextmanager
def _silenced(name: str) -> Iterator[None]:
    """Drop what logger ``name`` logs within the block, and only there."""
    logger = logging.getLogger(name)
    drop_all = _DropAll()
    logger.addFilter(drop_all)
    try:
        yield
    finally:
        logger.removeFilter(drop_all)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def copy_new_system_attrs(source: optuna.Study, source_trial_id: int, before: Mapping[str, Any], target: optuna.Study, target_trial_id: int) -> None:
    """Copy to a real trial the system attributes that a sampler or pruner set on its copy in a
    view study (Hyperband's rung values, CMA-ES's generation) since they were ``before``, so
    that later views see them."""
    for key, value in source._storage.get_trial_system_attrs(source_trial_id).items():
        if key not in before or before[key] != value:
            target._storage.set_trial_system_attr(target_trial_id, key, value)


def _detached(trial: FrozenTrial) -> FrozenTrial:
    """A copy of ``trial`` made of plain values: a live trial reads its system attributes
    through its study, which copying it into a view study would copy along (storage and all)."""
    return FrozenTrial(
        number=trial.number,
        state=trial.state,
        value=None,
        values=trial.values,
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete,
        params=dict(trial.params),
        distributions=dict(trial.distributions),
        user_attrs=dict(trial.user_attrs),
        system_attrs=dict(trial.system_attrs),
        intermediate_values=dict(trial.intermediate_values),
        trial_id=trial._trial_id,
    )


# View studies a pruner keeps: more than the trials a worker runs at once (its batch slots).
_JUDGED_KEPT = 256


class ViewPruner(optuna.pruners.BasePruner):
    """The study's pruner, asked about each trial in a view study made of the trial's fixed view
    and a copy of the trial, instead of in the live study.

    ``views`` maps a trial's id to its logical index and fixed view; a worker fills it in as
    each of its trials starts. A trial's view study is made once, at its first report, and its
    copy there takes each new epoch's value, so that pruning makes no garbage per epoch.
    """

    def __init__(self, pruner: optuna.pruners.BasePruner, views: dict[int, tuple[int, list[FrozenTrial]]], name: str, direction: str) -> None:
        self.pruner, self.views, self.name, self.direction = pruner, views, name, direction
        self._judged: dict[int, tuple[optuna.Study, int]] = {}  # trial id -> its view study, its copy's id

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if trial._trial_id not in self._judged:
            if len(self._judged) >= _JUDGED_KEPT:  # the oldest: a trial long finished
                del self._judged[next(iter(self._judged))]
            index, view = self.views[trial._trial_id]
            judged = view_study(view, index, self.name, self.direction)
            self._judged[trial._trial_id] = (judged, judged._storage.create_new_trial(judged._study_id, template_trial=_detached(trial)))
        judged, copy_id = self._judged[trial._trial_id]
        copy = judged._storage.get_trial(copy_id)
        for step, value in trial.intermediate_values.items():
            if step not in copy.intermediate_values:
                judged._storage.set_trial_intermediate_value(copy_id, step, value)
        before = dict(judged._storage.get_trial_system_attrs(copy_id))
        decision = self.pruner.prune(judged, judged._storage.get_trial(copy_id))
        copy_new_system_attrs(judged, copy_id, before, study, trial._trial_id)
        return decision
