"""The selection protocol: candidates, neighbours, the robust criterion, seeds, intervals, regime."""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest
import torch
from scipy import stats

from sofim_tune import SOFIM
from sofim_tune.errors import UserInputError
from sofim_tune.records import Confirmation, StudyRecord, TrialRecord
from sofim_tune.recommend import build_recommendation
from sofim_tune.selection import (
    NEIGHBOUR_SEEDS,
    PROTOCOL_SHARE,
    Measurement,
    best_confirmation,
    confirm_top,
    confirmation_seeds,
    interval95,
    neighbour_settings,
    CLIFF_SHARE,
    pick_recommended,
    plan_confirmation,
    regime,
    robust_score,
)

from study_records import make_study


@pytest.fixture
def study() -> StudyRecord:
    return make_study(30)


def cliff_and_plateau(study: StudyRecord) -> tuple[StudyRecord, dict[str, float], dict[str, float]]:
    """Two completed trials: a sharp peak (best search value) and a flat plateau just below."""
    sharp = {"lr": 1.0, "rho": 1.0, "beta1": 0.9}
    flat = {"lr": 0.01, "rho": 1.0, "beta1": 0.9}
    trials = [
        TrialRecord(number=0, state="complete", params=sharp, value=0.99),
        TrialRecord(number=1, state="complete", params=flat, value=0.97),
    ]
    return dataclasses.replace(study, trials=trials, confirmations=[]), sharp, flat


def landscape(params: dict[str, float]) -> float:
    """A synthetic objective: a cliff just above lr = 1, a gentle plateau around lr = 0.01."""
    if params["lr"] >= 1.0:
        return 0.985 if params["lr"] < 1.5 else 0.60  # 2 × lr falls off the cliff
    return 0.975


def evaluate_landscape(jobs):
    return [Measurement(landscape(params) + 1e-4 * (seed % 3)) for params, seed, _ in jobs]


def test_a_flat_candidate_beats_a_sharp_one_with_a_higher_mean(study):
    cliffy, sharp, flat = cliff_and_plateau(study)
    confirmations = confirm_top(cliffy, evaluate_landscape, top=2, seeds=[1, 2, 3, 4, 5], split_seeds=[11, 12, 13, 14, 15])
    by_params = {tuple(sorted(c.params.items())): c for c in confirmations}
    sharp_c, flat_c = by_params[tuple(sorted(sharp.items()))], by_params[tuple(sorted(flat.items()))]
    assert sharp_c.mean > flat_c.mean  # the sharp one wins on its own mean ...
    assert robust_score(sharp_c, "maximize") == pytest.approx(0.60 + 1e-4 * statistics.fmean(s % 3 for s in [1, 2, 3]) + CLIFF_SHARE * sharp_c.mean)
    params, chosen = pick_recommended(cliffy, confirmations)
    assert params == flat and chosen is flat_c  # ... but its 2 × lr neighbour loses 38 points
    rec = build_recommendation(cliffy, confirmations=confirmations)
    assert rec.selection["chosen"] == confirmations.index(flat_c)
    assert rec.selection["why"].startswith("candidate 1 has a better mean, but its lr×2 neighbour scores 0.60")
    assert rec.selection["candidates"][0]["neighbours"]["lr×2"] == pytest.approx(0.60, abs=1e-3)


def test_among_flat_candidates_the_best_mean_wins_and_a_cliff_costs_what_it_loses():
    def confirmation(mean: float, half: float, double: float) -> Confirmation:
        return Confirmation(params={"lr": mean}, seeds=[1, 2], values=[mean - 0.001, mean + 0.001], neighbours={"lr×0.5": [half], "lr×2": [double]})

    # Neighbours 1.5 points down: within 2% of 0.97, so the mean is the score.
    flat = confirmation(0.97, 0.955, 0.965)
    assert robust_score(flat, "maximize") == pytest.approx(0.97)
    # A neighbour 5 points down: the score is that neighbour plus the 2% allowance.
    cliff = confirmation(0.98, 0.975, 0.93)
    assert robust_score(cliff, "maximize") == pytest.approx(0.93 + 0.02 * 0.98)
    assert robust_score(cliff, "maximize") < robust_score(flat, "maximize")
    # Losses are minimized: the worse neighbour is the higher one, the allowance is subtracted.
    loss = Confirmation(params={"lr": 1.0}, seeds=[1, 2], values=[0.5, 0.5], neighbours={"lr×0.5": [0.52], "lr×2": [0.7]})
    assert robust_score(loss, "minimize") == pytest.approx(0.7 - 0.02 * 0.5)
    assert robust_score(Confirmation(params={"lr": 1.0}, seeds=[1, 2], values=[0.5, 0.5]), "minimize") == 0.5


def test_neighbours_change_lr_only_and_run_on_the_first_seeds(study):
    cliffy, sharp, _ = cliff_and_plateau(study)
    jobs_seen = []

    def evaluate(jobs):
        jobs_seen.extend(jobs)
        return [Measurement(0.5) for _ in jobs]

    confirm_top(cliffy, evaluate, top=1, seeds=[1, 2, 3, 4, 5], split_seeds=[11, 12, 13, 14, 15])
    assert neighbour_settings(sharp) == {"lr×2": {**sharp, "lr": 2.0}}
    own = [(seed, split) for params, seed, split in jobs_seen if params == sharp]
    assert own == [(1, 11), (2, 12), (3, 13), (4, 14), (5, 15)]
    for neighbour in neighbour_settings(sharp).values():
        assert [(seed, split) for params, seed, split in jobs_seen if params == neighbour] == own[:NEIGHBOUR_SEEDS]


def test_only_the_leading_candidates_neighbour_runs_when_it_is_flat(study):
    flat = [TrialRecord(number=i, state="complete", params={"lr": 0.01 * (i + 1), "rho": 1.0, "beta1": 0.9}, value=0.97 - 0.001 * i) for i in range(3)]
    plateau = dataclasses.replace(study, trials=flat, confirmations=[])
    calls = []

    def evaluate(jobs):
        calls.append(jobs)
        return [Measurement(0.9 + params["lr"] + 1e-4 * seed) for params, seed, _ in jobs]  # flat, larger lr a little better

    confirmations = confirm_top(plateau, evaluate, top=3, seeds=[1, 2], split_seeds=[3, 4])
    assert [len(jobs) for jobs in calls] == [6, 1]  # the own runs at once, then one neighbour
    leader = best_confirmation(confirmations, "maximize")
    assert confirmations[leader].params["lr"] == pytest.approx(0.03) and calls[1][0][0]["lr"] == pytest.approx(0.06)
    assert [bool(c.neighbours) for c in confirmations] == [False, False, True]
    assert pick_recommended(plateau, confirmations)[1] is confirmations[leader]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_running_only_the_neighbours_that_could_win_picks_what_running_all_would(study, direction):
    rng = random.Random(direction)
    for _ in range(300):
        lrs = rng.sample([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0], 3)
        trials = [TrialRecord(number=i, state="complete", params={"lr": lr, "rho": 1.0, "beta1": 0.9}, value=0.5 - 0.01 * i) for i, lr in enumerate(lrs)]
        case = dataclasses.replace(study, trials=trials, confirmations=[], direction=direction)
        # Each setting's score, from a few coarse levels so that ties and cliffs both happen.
        scores = {lr: rng.choice([0.90, 0.95, 0.96, 0.97, 0.5]) for lr in [*lrs, *(2 * lr for lr in lrs)]}

        def evaluate(jobs):
            return [Measurement(scores[params["lr"]]) for params, _, _ in jobs]

        lazy = confirm_top(case, evaluate, top=3, seeds=[1, 2], split_seeds=[3, 4])
        every = [dataclasses.replace(c, neighbours={label: [scores[n["lr"]]] for label, n in neighbour_settings(c.params).items()}) for c in lazy]
        assert pick_recommended(case, lazy)[0] == pick_recommended(case, every)[0]
        assert pick_recommended(case, lazy)[1].neighbours  # best.json always says what the pick's neighbour scored


@pytest.mark.parametrize(
    "search_epochs, run_epochs, top, seeds, planned",
    [
        (400, 10, 2, 3, (2, 3, 1, 3)),  # 2 × (3 + 1) + 3 runs = 110 epochs, within 200
        (220, 10, 2, 3, (2, 3, 1, 3)),  # exactly half
        (219, 10, 2, 3, (2, 2, 1, 3)),  # 110 > 109.5: one selection seed fewer, 90 epochs
        (170, 10, 2, 3, (1, 2, 1, 3)),  # 90 > 85: one candidate, 60 epochs
        (110, 10, 2, 3, (1, 2, 0, 3)),  # 60 > 55: no neighbour, 50 epochs
        (90, 10, 2, 3, (1, 2, 0, 2)),  # 50 > 45: two final runs, 40 epochs
        (10, 10, 3, 5, (1, 2, 0, 2)),  # never less than one candidate on two seeds and two final runs
        (2000, 10, 3, 5, (3, 5, 1, 5)),  # the spec's maximum
    ],
)
def test_everything_after_the_search_trains_at_most_half_its_epochs(search_epochs, run_epochs, top, seeds, planned):
    plan = plan_confirmation(search_epochs, run_epochs, top=top, seeds=seeds, final=seeds)
    assert (plan.top, plan.seeds, plan.neighbour_seeds, plan.final_runs) == planned
    assert plan.epochs == (plan.top * (plan.seeds + plan.neighbour_seeds) + plan.final_runs) * run_epochs
    assert plan.epochs <= PROTOCOL_SHARE * search_epochs or planned == (1, 2, 0, 2)


def test_confirm_top_runs_what_the_plan_says(study):
    plan = plan_confirmation(130, 10, top=2, seeds=3, final=3)
    jobs_seen = []

    def evaluate(jobs):
        jobs_seen.extend(jobs)
        return [Measurement(0.5) for _ in jobs]

    confirmations = confirm_top(study, evaluate, top=plan.top, seeds=[1, 2], split_seeds=[3, 4], neighbour_seeds=plan.neighbour_seeds)
    assert len(jobs_seen) == plan.selection_runs == 3 and [len(c.values) for c in confirmations] == [2]
    assert confirmations[0].neighbours == {"lr×2": [0.5]}


@pytest.mark.parametrize("search_seed, trials, split_seed", [(0, 40, 0), (1_000_000, 500, 1_000_003), (7, 3, 1_000_004), (2**31, 64, 5)])
def test_confirmation_seeds_never_meet_search_seeds(search_seed, trials, split_seed):
    seeds, splits = confirmation_seeds(search_seed, trials, split_seed, 5)
    search_seeds = set(range(search_seed, search_seed + trials))  # trial n trains with seed + n
    assert len(set(seeds)) == 5 and not set(seeds) & search_seeds
    assert len(set(splits)) == 5 and split_seed not in splits


def test_interval95_is_student_t():
    values = [0.97, 0.98, 0.975, 0.985, 0.97]
    low, high = interval95(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected)
    with pytest.raises(UserInputError):
        interval95([0.9])


def test_confirm_top_validates_arguments(study):
    with pytest.raises(UserInputError):
        confirm_top(study, evaluate_landscape, seeds=[], split_seeds=[])
    with pytest.raises(UserInputError):
        confirm_top(study, evaluate_landscape, top=0, seeds=[1], split_seeds=[1])
    with pytest.raises(UserInputError):
        confirm_top(study, evaluate_landscape, seeds=[1, 2], split_seeds=[1])


def test_confirm_top_skips_duplicate_configurations(study):
    best = study.best_trial()
    twin = dataclasses.replace(best, number=99, value=best.value - 0.001)
    doubled = dataclasses.replace(study, trials=[*study.trials, twin])
    confirmations = confirm_top(doubled, lambda jobs: [Measurement(0.5) for _ in jobs], top=2, seeds=[0, 1], split_seeds=[5, 6])
    assert confirmations[0].params == best.params
    assert confirmations[1].params != best.params


def test_measurements_are_summarised_per_candidate(study):
    cliffy, sharp, _ = cliff_and_plateau(study)
    ratios = iter([0.01, 0.03, 0.02, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    confirmation = confirm_top(cliffy, lambda jobs: [Measurement(0.9, 0.8 + 0.01 * seed, next(ratios)) for _, seed, _ in jobs], top=1, seeds=[1, 2, 3], split_seeds=[4, 5, 6])[0]
    assert confirmation.test_accuracy == pytest.approx(0.82)  # the candidate's runs, not its neighbours'
    assert confirmation.fisher_ratio == pytest.approx(0.02)
    assert confirmation.split_seeds == [4, 5, 6]


@pytest.mark.parametrize("ratio, name", [(0.001, "sgd-like"), (0.0999, "sgd-like"), (0.1, "mixed"), (10.0, "mixed"), (10.01, "normalised")])
def test_regime_names(ratio, name):
    assert regime(ratio) == name


def test_the_regime_in_best_json_is_the_chosen_candidates_ratio(study):
    cliffy, _, flat = cliff_and_plateau(study)
    confirmation = Confirmation(params=flat, seeds=[1, 2], values=[0.97, 0.98], fisher_ratio=0.03)
    rec = build_recommendation(cliffy, confirmations=[confirmation])
    assert rec.sensitivity.regime == {"fisher_ratio": 0.03, "name": "sgd-like"}


# ----------------------------------------------------------------------- ‖m̂‖²/ρ from the optimizer


def hand_fisher_ratio(grads: list[list[torch.Tensor]], beta1: float, rho: float, scope: str) -> float:
    """‖m̂‖²/ρ after the given gradient steps, written from the definition in float64."""
    moments = [torch.zeros_like(g, dtype=torch.float64) for g in grads[0]]
    for step_grads in grads:
        moments = [beta1 * m + (1 - beta1) * g.double() for m, g in zip(moments, step_grads)]
    steps = len(grads)
    squared = [float((m / (1 - beta1**steps)).square().sum()) for m in moments]
    ratios = [sum(squared) / rho] if scope == "group" else [s / rho for s in squared]
    return statistics.fmean(ratios)


@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("foreach", [False, True])
def test_fisher_ratio_matches_the_definition(scope, foreach):
    torch.manual_seed(0)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = SOFIM(params, lr=0.1, rho=0.3, beta1=0.8, norm_scope=scope, foreach=foreach)
    assert opt.fisher_ratio() is None
    grads = []
    for _ in range(4):
        step_grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        grads.append(step_grads)
        opt.step()
    ratio = opt.fisher_ratio()
    assert ratio.dim() == 0 and ratio.dtype == torch.float32
    assert float(ratio) == pytest.approx(hand_fisher_ratio(grads, 0.8, 0.3, scope), rel=1e-5)


def test_train_trial_reports_the_median_of_its_samples(monkeypatch):
    """With a sample after every step, the trial's fisher_ratio is the median of them all."""
    from sofim_tune import trial as trial_module
    from sofim_tune.trial import TrialConfig, train_trial

    samples, steps = [], []
    original_ratio, original_step = SOFIM.fisher_ratio, SOFIM.step

    def recording_ratio(self):
        value = original_ratio(self)
        samples.append(float(value))
        return value

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(trial_module, "FISHER_SAMPLE_INTERVAL", 1)
    monkeypatch.setattr(SOFIM, "fisher_ratio", recording_ratio)
    monkeypatch.setattr(SOFIM, "step", counting_step)
    result = train_trial(TrialConfig(dataset="digits", hyperparameters={"lr": 0.1, "rho": 0.05, "beta1": 0.9}, epochs=2, device="cpu"))
    assert len(samples) == len(steps) > 20
    assert result.metrics["fisher_ratio"] == pytest.approx(statistics.median(samples))
    assert result.history[0]["fisher_ratio"] == pytest.approx(statistics.median(samples[: len(samples) // 2]))


@pytest.mark.parametrize("trials, epochs", [(6, 2), (12, 3)])
def test_a_study_confirms_within_half_the_epochs_its_search_trained(tmp_path, trials, epochs):
    from sofim_tune.recommend import load_recommendation
    from sofim_tune.spec import load_spec
    from sofim_tune.tuning import RunOptions, tune

    spec = load_spec("digits").replace(trials=trials, epochs=epochs)
    outcome = tune(spec, RunOptions(out_dir=tmp_path, device="cpu", workers=1))
    search_epochs = sum(len(t.intermediate) for t in outcome.study.trials)
    runs = [len(c.values) + sum(len(v) for v in c.neighbours.values()) for c in outcome.study.confirmations]
    plan = plan_confirmation(search_epochs, epochs, top=spec.confirm_top, seeds=spec.confirm_seeds, final=spec.final_runs)
    assert sum(runs) * epochs == plan.epochs
    assert plan.epochs <= PROTOCOL_SHARE * search_epochs or (plan.top, plan.seeds, plan.neighbour_seeds, plan.final_runs) == (1, 2, 0, 2)
    rec = load_recommendation(outcome.best_json)
    assert len(rec.selection["candidates"]) == plan.top and len(rec.metric.confirm.seeds) == plan.final_runs
    assert rec.metric.confirm.runs == "final" and [c.final for c in outcome.study.confirmations] == [False] * plan.top + [True]
