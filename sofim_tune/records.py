"""The one read interface over a finished or running study, shared by both backends.

Export (``recommend.py``) and plots (``report.py``) read a study only through
:class:`StudyRecord`, so the same code serves the Optuna and the Ray backend.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

TrialState = Literal["complete", "pruned", "failed", "running"]


@dataclass(frozen=True)
class TrialRecord:
    """One trial as both backends record it.

    Attributes:
        number: trial number, from 0, in order of creation.
        state: ``complete``, ``pruned`` (stopped early by the pruner or the scheduler, or
            diverged), ``failed`` (an exception) or ``running``.
        params: the optimizer's hyperparameters (``lr``, ``rho``, ``beta1``, ...), after
            mapping a reparameterized space back; what a user would pass to the optimizer.
        value: the final value of the study's metric, or None.
        intermediate: metric value per epoch (1-based), as reported during training.
        attrs: free-form facts recorded on the trial (``reason``: ``"diverged"`` or
            ``"pruned"``; ``error``: the message of a failure; ``diverged_epoch``;
            ``fisher_ratio``: SOFIM's median ‖m̂‖²/ρ over the trial's steps).
        started, finished: wall-clock times, when known.
    """

    number: int
    state: TrialState
    params: dict[str, float]
    value: float | None
    intermediate: dict[int, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    started: datetime | None = None
    finished: datetime | None = None

    @property
    def diverged(self) -> bool:
        return self.attrs.get("reason") == "diverged"


@dataclass(frozen=True)
class Confirmation:
    """A configuration retrained with fresh seeds: a candidate's *selection* runs, which choose
    the recommendation, or the chosen one's *final* runs, which measure it (``final``).

    Attributes:
        params: the candidate's hyperparameters.
        seeds: weight/batch-order seeds, one run each.
        values: the study's metric of each run, in seed order (a diverged or failed run
            counts as the worst finite value).
        test_accuracy: mean test accuracy over the runs, when the dataset has a test split.
        split_seeds: the train/validation split of each run (none of them the search's).
        neighbours: for ``"lr×0.5"`` and ``"lr×2"`` (the candidate with only lr changed),
            the metric of runs with the first seeds, in seed order.
        fisher_ratio: median over the runs of each run's median ‖m̂‖²/ρ (SOFIM only).
        curves: the metric after each epoch of each run, in seed order.
        final: True for the final runs: after the choice, on the study's final images, which no
            search or selection run scored (their ``split_seeds`` are the search's).
        image_hits: final runs only: per final image, how many of the runs classified it right;
            the headline interval's image term comes from them (``selection.headline_interval``).
        final_seed: the split seed that names the study's final images: selection runs kept
            them out of their validation, final runs validated on them. None for runs of a
            release before final runs, whose validation may include them.
    """

    params: dict[str, float]
    seeds: list[int]
    values: list[float]
    test_accuracy: float | None = None
    split_seeds: list[int] = field(default_factory=list)
    neighbours: dict[str, list[float]] = field(default_factory=dict)
    fisher_ratio: float | None = None
    curves: list[list[float]] = field(default_factory=list)
    final: bool = False
    image_hits: list[int] = field(default_factory=list)
    final_seed: int | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (n − 1 in the denominator); 0 for one run."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else 0.0


@dataclass(frozen=True)
class StudyRecord:
    """A study, read from its storage.

    Attributes:
        name: study name (``cifar100-resnet18``).
        backend: ``optuna`` or ``ray``.
        storage: where it lives, with any password replaced by ``***``.
        dataset, arch: what was tuned.
        optimizer: ``sofim``, ``sofim-tensor``, ``sgd-momentum`` or ``adamw``.
        space: the search space's name.
        log_params: hyperparameters searched on a log scale (for plot axes).
        metric, direction: what was optimized (``val_accuracy``, ``maximize``).
        sampler, pruner: search strategy and early stopping, by name.
        epochs, batch_size, fixed: training settings shared by every trial.
        trials: every trial, in number order.
        target_trials: how many finished trials the study aims for.
        confirmations: the selection runs of each candidate, then the chosen one's final runs
            (``Confirmation.final``), once the study was exported.
        created: when the study started.
        bounds: per searched optimizer hyperparameter, the ``(low, high)`` of the space
            (after any widening); empty when unknown.
        widenings: the bounds the study moved while it ran, in order.
    """

    name: str
    backend: str
    storage: str
    dataset: str
    arch: str
    optimizer: str
    space: str
    log_params: frozenset[str]
    metric: str
    direction: Literal["maximize", "minimize"]
    sampler: str
    pruner: str
    epochs: int
    batch_size: int
    fixed: dict[str, Any]
    trials: list[TrialRecord]
    target_trials: int
    confirmations: list[Confirmation] = field(default_factory=list)
    created: datetime | None = None
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    widenings: list[dict[str, Any]] = field(default_factory=list)

    def by_state(self, state: TrialState) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == state]

    def outcomes(self) -> list[TrialRecord]:
        """Every trial but the attempts that were interrupted (each is retried in its place):
        a study that was killed and resumed has the same outcomes as one that was not."""
        return [t for t in self.trials if t.attrs.get("reason") != "interrupted"]

    @property
    def finished(self) -> bool:
        """True once the study reached its target and nothing is running."""
        done = len(self.by_state("complete")) + len(self.by_state("pruned"))
        return done >= self.target_trials and not self.by_state("running")

    def completed(self) -> list[TrialRecord]:
        """The trials that completed with a value, in number order."""
        return [t for t in self.trials if t.state == "complete" and t.value is not None]

    def best_trial(self) -> TrialRecord | None:
        """The completed trial with the best value, or None."""
        completed = self.completed()
        if not completed:
            return None
        pick = max if self.direction == "maximize" else min
        return pick(completed, key=lambda t: t.value)
