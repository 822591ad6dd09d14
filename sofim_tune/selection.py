"""Choosing what to recommend and measuring it: rank the search's trials, retrain the best
candidates and their lr × 2 neighbour on fresh seeds and fresh splits, pick by a criterion that
a cliff cannot fool, then measure the chosen setting on runs that played no part in the choice.

The protocol (the README's "How the recommendation is chosen" says the same):

1. Candidates: the ``top`` best distinct completed trials of the search.
2. Each candidate is retrained once per confirmation seed. Run ``i`` uses weight seed
   ``seeds[i]`` and its own train/validation split ``split_seeds[i]``, never the search's
   split, and the spread over runs includes the spread over splits. (An ImageFolder with its
   own ``val/`` validates every run on it; best.json then says so.)
3. A candidate's neighbour, lr × 2 with everything else unchanged, is trained with the
   first :data:`NEIGHBOUR_SEEDS` of those seeds and splits: the best mean's first, and the
   next candidate's only where the one before falls off a cliff, since a neighbour can only
   lower a score (step 4) and a candidate whose mean is already beaten cannot win. On digits
   the good settings lie next to a cliff on the side of larger lr; lr × ½ never fell far and
   was dropped (``benchmarks/recommendation_quality.py``'s ablation).
4. The recommendation is the candidate with the best *robust score*: its own mean, unless its
   neighbour falls more than :data:`CLIFF_SHARE` (2%) of that mean below it; then that
   neighbour's mean plus the 2%. Among flat candidates the best mean wins, and a candidate on
   a cliff (2 × lr loses many points) loses to a slightly worse but flat one.
5. The *final runs* (:func:`final_runs`) retrain the chosen setting on seeds no earlier run
   used, and validate it on the study's *final images* (``sofim_tune.data.final_images``):
   images of the search's training part that no search or selection run scored. The
   headline mean and interval (:func:`headline_interval`) come from these runs alone, so
   the choice among noisy candidates (the winner's curse) does not bias them; the
   selection runs' means stay in best.json under ``selection``.

What the protocol may cost is bounded (:func:`plan_confirmation`): everything after the
search trains at most :data:`PROTOCOL_SHARE` (half) of the epochs the search trained; fewer
seeds, then fewer candidates, then no neighbour, then fewer final runs are run rather than more.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sofim_tune.errors import NothingFound, UserInputError
from sofim_tune.records import Confirmation, StudyRecord, TrialRecord

__all__ = [
    "CLIFF_SHARE",
    "CRITERION",
    "ConfirmationPlan",
    "NEIGHBOURS",
    "NEIGHBOUR_SEEDS",
    "PROTOCOL_SHARE",
    "Measurement",
    "best_confirmation",
    "confirm_top",
    "confirmation_seeds",
    "current_confirmations",
    "current_final",
    "distinct_ranked",
    "final_runs",
    "final_seeds",
    "headline_interval",
    "interval95",
    "no_completed_trial",
    "neighbour_settings",
    "pick_recommended",
    "plan_confirmation",
    "regime",
    "robust_score",
    "worst_neighbour",
]

# Neighbours along the axis that matters most for every optimizer here: the learning rate.
NEIGHBOURS: dict[str, float] = {"lr×2": 2.0}
NEIGHBOUR_SEEDS = 1
CRITERION = "the candidate's mean, or its neighbour's mean (lr × 2) plus 2% of its mean where that is lower, over fresh seeds and splits"
#: Everything after the search trains at most this share of the epochs the search trained.
PROTOCOL_SHARE = 0.5
# How far a neighbour may fall below a candidate's mean, as a share of it, before the
# candidate counts as on a cliff: about 2 points of accuracy near 97%.
CLIFF_SHARE = 0.02
# Seeds far from those of search trials (spec.seed + logical index); see confirmation_seeds.
_CONFIRM_SEED_BASE = 1_000_003
# Final runs' seeds lie this far above the selection runs', more than any plan's selection seeds.
_FINAL_SEED_OFFSET = 500_000
# ‖m̂‖²/ρ below this, SOFIM steps like SGD with averaged momentum; above its inverse, a
# normalised step. One decade either side of 1, where both terms of ρ + ‖m̂‖² matter.
_REGIME_DECADE = 0.1


@dataclass(frozen=True)
class Measurement:
    """What one confirmation run measured.

    Attributes:
        value: the study's metric, finite even for a diverged or failed run (its worst value).
        test_accuracy: accuracy on the test split, or None (not measured, or no test split).
        fisher_ratio: the run's median ‖m̂‖²/ρ (SOFIM only), or None.
        curve: the metric after each epoch, as far as the run got.
        image_correct: a final run's outcome per final image (1: right), when the metric is
            an accuracy; empty otherwise.
    """

    value: float
    test_accuracy: float | None = None
    fisher_ratio: float | None = None
    curve: tuple[float, ...] = ()
    image_correct: tuple[int, ...] = ()


def no_completed_trial(study: StudyRecord) -> NothingFound:
    """The error for a study that has nothing to recommend yet."""
    return NothingFound(f"study {study.name!r} has no completed trial yet; wait for one to finish or run more trials")


def distinct_ranked(study: StudyRecord) -> list[TrialRecord]:
    """Completed trials best first, keeping the best of trials with identical params."""
    sign = -1.0 if study.direction == "maximize" else 1.0
    ranked = sorted(study.completed(), key=lambda t: (sign * t.value, t.number))
    seen: set[tuple[tuple[str, float], ...]] = set()
    distinct = []
    for trial in ranked:
        key = tuple(sorted(trial.params.items()))
        if key not in seen:
            seen.add(key)
            distinct.append(trial)
    return distinct


def confirmation_seeds(search_seed: int, trials: int, search_split_seed: int, count: int) -> tuple[list[int], list[int]]:
    """Weight seeds and split seeds for ``count`` confirmation runs of a study.

    No weight seed equals a search trial's (``search_seed + index`` for ``trials``
    trials), and no split seed equals the search's ``search_split_seed``.
    """
    base = max(_CONFIRM_SEED_BASE, search_seed + trials)
    seeds = [base + i for i in range(count)]
    splits = [seed for seed in range(base, base + count + 1) if seed != search_split_seed][:count]
    return seeds, splits


def final_seeds(search_seed: int, trials: int, count: int) -> list[int]:
    """Weight seeds of ``count`` final runs: none a search trial's (as :func:`confirmation_seeds`)
    and none a selection run's."""
    base = max(_CONFIRM_SEED_BASE, search_seed + trials) + _FINAL_SEED_OFFSET
    return [base + i for i in range(count)]


@dataclass(frozen=True)
class ConfirmationPlan:
    """What may run after the search: ``top`` candidates × ``seeds`` selection runs each, plus
    neighbours on ``neighbour_seeds`` of those seeds (at most each candidate's; usually the
    chosen one's alone, see :func:`confirm_top`), then ``final_runs`` runs of the chosen one;
    every run trains ``run_epochs``. ``runs`` and ``epochs`` are the most this can train."""

    top: int
    seeds: int
    neighbour_seeds: int
    final_runs: int
    run_epochs: int

    @property
    def selection_runs(self) -> int:
        return self.top * (self.seeds + len(NEIGHBOURS) * self.neighbour_seeds)

    @property
    def runs(self) -> int:
        return self.selection_runs + self.final_runs

    @property
    def epochs(self) -> int:
        return self.runs * self.run_epochs


def plan_confirmation(search_epochs: float, run_epochs: int, *, top: int, seeds: int, final: int) -> ConfirmationPlan:
    """The most of ``top`` candidates × ``seeds`` selection runs (and their neighbours), and
    ``final`` final runs, that trains at most :data:`PROTOCOL_SHARE` of ``search_epochs`` in all.

    Over the budget, selection seeds go first (down to 2), then candidates (down to 1), then
    the neighbours, then final runs (down to 2, the fewest an interval needs). One candidate
    on two seeds and two final runs always run, even where that alone exceeds the budget.

    Args:
        search_epochs: epochs the search trained, every trial's (pruned ones included);
            ``math.inf`` for no bound.
        run_epochs: epochs of one run, >= 1.
        top, seeds, final: the most candidates, seeds per candidate and final runs (the
            spec's ``confirm_top``, ``confirm_seeds`` and ``final_runs``).
    """
    allowed = PROTOCOL_SHARE * search_epochs
    plan = ConfirmationPlan(top, seeds, min(NEIGHBOUR_SEEDS, seeds), final, run_epochs)
    while plan.epochs > allowed and plan.seeds > 2:
        plan = dataclasses.replace(plan, seeds=plan.seeds - 1, neighbour_seeds=min(plan.neighbour_seeds, plan.seeds - 1))
    while plan.epochs > allowed and plan.top > 1:
        plan = dataclasses.replace(plan, top=plan.top - 1)
    if plan.epochs > allowed:
        plan = dataclasses.replace(plan, neighbour_seeds=0)
    while plan.epochs > allowed and plan.final_runs > 2:
        plan = dataclasses.replace(plan, final_runs=plan.final_runs - 1)
    return plan


def neighbour_settings(params: dict[str, float]) -> dict[str, dict[str, float]]:
    """The candidate's neighbours (:data:`NEIGHBOURS`): lr scaled, everything else unchanged."""
    return {label: {**params, "lr": params["lr"] * factor} for label, factor in NEIGHBOURS.items()}


def confirm_top(
    study: StudyRecord,
    evaluate: Callable[[list[tuple[dict[str, float], int, int]]], Sequence[Measurement]],
    *,
    top: int = 3,
    seeds: Sequence[int],
    split_seeds: Sequence[int],
    neighbour_seeds: int = NEIGHBOUR_SEEDS,
    final_seed: int | None = None,
    evaluate_neighbours: Callable[[list[tuple[dict[str, float], int, int]]], Sequence[Measurement]] | None = None,
) -> list[Confirmation]:
    """Retrain the ``top`` best distinct completed configurations, then the neighbours of
    those that the rule (:func:`robust_score`) could still pick: first the neighbours of the
    candidate it picks on the means alone, and of the next only where that one's fall (see
    :func:`plan_confirmation` for ``top`` and ``neighbour_seeds`` within a budget).

    Args:
        evaluate: ``evaluate(jobs) -> measurements`` trains each ``(params, seed,
            split_seed)`` job once (all at once, so that a backend can run them in
            parallel) and returns one :class:`Measurement` per job, in order. It is called
            once for the candidates' own runs, then once per candidate whose neighbours run.
        top: how many candidates, >= 1 (fewer when fewer distinct ones completed).
        seeds, split_seeds: one run per pair per candidate; at least one pair.
        neighbour_seeds: how many of the first pairs the neighbours run with (0: none).
        final_seed: the split seed whose final images ``evaluate`` keeps out of validation,
            recorded on each confirmation.
        evaluate_neighbours: as ``evaluate``, for the neighbours' runs (so that progress can
            name them); default ``evaluate``.

    Returns:
        One Confirmation per candidate, best search value first; ``neighbours`` is empty on
        those the rule ruled out on their own means.
    """
    if top < 1:
        raise UserInputError(f"top must be >= 1, got {top}")
    if not seeds or len(seeds) != len(split_seeds):
        raise UserInputError("confirmation needs at least one seed, and one split seed per seed")
    pairs = list(zip(seeds, split_seeds, strict=True))
    candidates = [dict(trial.params) for trial in distinct_ranked(study)[:top]]
    measured = iter(evaluate([(params, seed, split) for params in candidates for seed, split in pairs]))
    confirmations = [_summarised(params, [next(measured) for _ in pairs], seeds, split_seeds, final_seed) for params in candidates]
    # A neighbour can only lower a candidate's robust score, so its mean bounds the score from
    # above: running the neighbours of whichever candidate the rule would pick now, until the
    # pick's own have run, picks what running every candidate's would, for fewer runs.
    with_neighbours: set[int] = set()
    while neighbour_seeds:
        chosen = best_confirmation(confirmations, study.direction)
        if chosen in with_neighbours or "lr" not in confirmations[chosen].params:
            break
        with_neighbours.add(chosen)
        labels = list(neighbour_settings(confirmations[chosen].params).items())
        measured = iter((evaluate_neighbours or evaluate)([(neighbour, seed, split) for _, neighbour in labels for seed, split in pairs[:neighbour_seeds]]))
        neighbours = {label: [next(measured).value for _ in pairs[:neighbour_seeds]] for label, _ in labels}
        confirmations[chosen] = dataclasses.replace(confirmations[chosen], neighbours=neighbours)
    return confirmations


def _summarised(params: dict[str, float], own: list[Measurement], seeds: Sequence[int], split_seeds: Sequence[int], final_seed: int | None) -> Confirmation:
    tests = [m.test_accuracy for m in own if m.test_accuracy is not None]
    ratios = [m.fisher_ratio for m in own if m.fisher_ratio is not None]
    return Confirmation(
        params=params,
        seeds=list(seeds),
        values=[m.value for m in own],
        test_accuracy=statistics.fmean(tests) if tests else None,
        split_seeds=list(split_seeds),
        fisher_ratio=statistics.median(ratios) if ratios else None,
        curves=[list(m.curve) for m in own],
        final_seed=final_seed,
    )


def best_confirmation(confirmations: Sequence[Confirmation], direction: str) -> int:
    """The index of the confirmation with the best :func:`robust_score` (ties: the earlier one,
    which ranked better in the search)."""
    sign = 1.0 if direction == "maximize" else -1.0
    return max(range(len(confirmations)), key=lambda i: (sign * robust_score(confirmations[i], direction), -i))


def robust_score(confirmation: Confirmation, direction: str) -> float:
    """The candidate's mean, or its worse neighbour's mean plus :data:`CLIFF_SHARE` of the
    candidate's mean where that is worse (see the module doc); in the metric's units.

    Every stored neighbour counts, so a confirmation made by an earlier release (lr × ½ and
    lr × 2) is scored as that release scored it."""
    mean = confirmation.mean
    worst = worst_neighbour(confirmation, direction)
    if worst is None:
        return mean
    allowance = CLIFF_SHARE * abs(mean)
    if direction == "maximize":
        return min(mean, worst[1] + allowance)
    return max(mean, worst[1] - allowance)


def worst_neighbour(confirmation: Confirmation, direction: str) -> tuple[str, float] | None:
    """The candidate's neighbour with the worst mean for ``direction``: its label and that
    mean; None where no neighbour ran."""
    means = {label: statistics.fmean(values) for label, values in confirmation.neighbours.items() if values}
    if not means:
        return None
    label = (min if direction == "maximize" else max)(means, key=means.__getitem__)
    return label, means[label]


def current_confirmations(study: StudyRecord) -> list[Confirmation]:
    """The study's stored selection runs while they still belong to its top trials, else none.

    A confirmation retrained the configurations that ranked best when it ran; once a
    better trial has joined the study (it was extended), they no longer say anything
    about what to recommend.
    """
    stored = [c for c in study.confirmations if not c.final]
    top = [t.params for t in distinct_ranked(study)[: len(stored)]]
    return stored if [c.params for c in stored] == top else []


def current_final(study: StudyRecord, params: dict[str, float]) -> Confirmation | None:
    """The study's stored final runs of ``params``, if any."""
    return next((c for c in study.confirmations if c.final and c.params == params), None)


def final_runs(params: dict[str, float], evaluate: Callable[[list[tuple[dict[str, float], int, int]]], Sequence[Measurement]], *, seeds: Sequence[int], split_seed: int) -> Confirmation:
    """Retrain the chosen ``params`` once per seed of ``seeds`` (at least 2), each validated on
    the study's final images (the search's ``split_seed`` names them); the headline numbers.

    Args:
        evaluate: as :func:`confirm_top`'s, for ``(params, seed, split_seed)`` jobs; each
            :class:`Measurement` carries its ``image_correct``.
    """
    if len(seeds) < 2:
        raise UserInputError(f"the final runs need at least two seeds for an interval, got {len(seeds)}")
    measured = list(evaluate([(dict(params), seed, split_seed) for seed in seeds]))
    tests = [m.test_accuracy for m in measured if m.test_accuracy is not None]
    ratios = [m.fisher_ratio for m in measured if m.fisher_ratio is not None]
    # A run that never reported its images (its worker died) classified none of them right.
    images = max((len(m.image_correct) for m in measured), default=0)
    rows = [m.image_correct or (0,) * images for m in measured]
    return Confirmation(
        params=dict(params),
        seeds=list(seeds),
        values=[m.value for m in measured],
        test_accuracy=statistics.fmean(tests) if tests else None,
        split_seeds=[split_seed] * len(seeds),
        fisher_ratio=statistics.median(ratios) if ratios else None,
        curves=[list(m.curve) for m in measured],
        final=True,
        final_seed=split_seed,
        image_hits=[sum(column) for column in zip(*rows, strict=True)] if images else [],
    )


def pick_recommended(study: StudyRecord, confirmations: Sequence[Confirmation]) -> tuple[dict[str, float], Confirmation | None]:
    """The configuration to recommend, and its confirmation.

    With confirmations, the one with the best :func:`robust_score` (ties: the better
    search rank); without, the best completed trial's params.

    Raises:
        UserInputError: no confirmation and no completed trial.
    """
    if confirmations:
        chosen = confirmations[best_confirmation(confirmations, study.direction)]
        return dict(chosen.params), chosen
    best = study.best_trial()
    if best is None:
        raise no_completed_trial(study)
    return dict(best.params), None


def interval95(values: Sequence[float]) -> tuple[float, float]:
    """The 95% Student-t confidence interval of the mean of ``values`` (at least 2)."""
    from scipy import stats

    if len(values) < 2:
        raise UserInputError("an interval needs at least two runs")
    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def headline_interval(values: Sequence[float], image_hits: Sequence[int]) -> tuple[float, float]:
    """The 95% interval of the final runs' mean accuracy, over seeds *and* images.

    All final runs validate on the same final images, so their spread says nothing about
    which images happened to be final; on 431 digits images that alone is worth about
    ±0.8 points. With ``image_hits`` (per image, how many of the ``len(values)`` runs got it
    right) the runs × images table is analysed as a two-way random-effects design without
    replication: the mean's variance is ``(MS_seeds + MS_images − MS_residual) / (runs ×
    images)``, each variance component at least 0, and its degrees of freedom
    Satterthwaite's. Without ``image_hits`` (a loss metric, files of earlier releases, no run
    that reported its images), or with a single final image, it is :func:`interval95` over the
    runs: seeds only.

    Args:
        values: each final run's accuracy in [0, 1], at least 2.
        image_hits: per final image, the count of runs that classified it right, 0..runs.
    """
    from scipy import stats

    if len(image_hits) < 2:
        return interval95(values)
    runs, images = len(values), len(image_hits)
    if runs < 2:
        raise UserInputError("an interval needs at least two runs")
    mean = statistics.fmean(values)
    ms_seeds = images * sum((v - mean) ** 2 for v in values) / (runs - 1)
    ms_images = runs * sum((h / runs - mean) ** 2 for h in image_hits) / (images - 1)
    # Outcomes are 0 or 1, so the total sum of squares is runs × images × mean × (1 − mean).
    ss_total = runs * images * mean * (1 - mean)
    ms_residual = max(ss_total - (runs - 1) * ms_seeds - (images - 1) * ms_images, 0.0) / ((runs - 1) * (images - 1))
    # A component whose mean square falls below the residual's is estimated as 0: its mean
    # square then drops out, and the residual's takes its place.
    used = [ms > ms_residual for ms in (ms_seeds, ms_images)]
    squares = [(ms_seeds, runs - 1, used[0]), (ms_images, images - 1, used[1]), (ms_residual, (runs - 1) * (images - 1), True)]
    weights = [1.0, 1.0, 1.0 - sum(used)]
    total = sum(w * ms for w, (ms, _, keep) in zip(weights, squares) if keep)
    if total <= 0:
        return mean, mean
    # Satterthwaite's degrees of freedom for that sum of mean squares.
    dof = total**2 / sum((w * ms) ** 2 / df for w, (ms, df, keep) in zip(weights, squares) if keep and w * ms != 0)
    half = float(stats.t.ppf(0.975, dof)) * math.sqrt(total / (runs * images))
    return mean - half, mean + half


def regime(fisher_ratio: float) -> str:
    """``sgd-like`` (‖m̂‖²/ρ < 0.1), ``normalised`` (> 10) or ``mixed``: what SOFIM's step is doing."""
    if fisher_ratio < _REGIME_DECADE:
        return "sgd-like"
    if fisher_ratio > 1 / _REGIME_DECADE:
        return "normalised"
    return "mixed"
