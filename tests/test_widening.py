"""A study widens a log bound that its best trials sit on: when it should, and never past its limit;
and after it widens, the sampler's model still sees every parameter of every trial."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.backends.optuna import (
    ATTR,
    DECLARED_PARAMS,
    WIDEN_AFTER,
    WIDEN_LIMIT,
    WithinBounds,
    active_ranges,
    record_widenings,
    outer_ranges,
    record_from_study,
)
from sofim_tune.backends.views import view_study
from sofim_tune.recommend import build_recommendation
from sofim_tune.space import ParamRange, load_space
from sofim_tune.spec import StudySpec, load_spec
from sofim_tune.study import RunOptions, grid_axes, make_sampler, study_metadata


def study_with(values: list[tuple[float, float, float]], *, widen: bool = True, sampler: str = "tpe") -> tuple[optuna.Study, object]:
    """An in-memory study made by sofim-tune, with completed trials (lr, rho, accuracy)."""
    space = load_space("sofim")
    spec = load_spec("digits").replace(widen=widen, sampler=sampler)
    study = optuna.create_study(direction="maximize")
    declared = {name: {"low": p.low, "high": p.high} for name, p in outer_ranges(space).items()}
    study.set_user_attr(ATTR, {**study_metadata(spec, space, "memory"), DECLARED_PARAMS: declared})
    for lr, rho, accuracy in values:
        ranges = active_ranges(space, study.user_attrs[ATTR])
        distributions = {name: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log) for name, p in ranges.items()}
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "rho": rho, "beta1": 0.9}, distributions=distributions, value=accuracy, user_attrs={"hyperparameters": {"lr": lr, "rho": rho, "beta1": 0.9}}))
    return study, space


HIGH = load_space("sofim").params["lr"].high


def at_the_top_of_lr(n: int) -> list[tuple[float, float, float]]:
    """The best trials have lr at the space's high bound; the rest are worse, inside."""
    return [(0.95 * HIGH, 1.0, 0.99 - 0.001 * i) for i in range(3)] + [(0.01 * (i + 1), 0.5, 0.8) for i in range(n - 3)]


def test_widens_a_bound_the_best_trials_sit_on():
    study, space = study_with(at_the_top_of_lr(WIDEN_AFTER))
    moved = record_widenings(study, space)
    assert moved == [{"param": "lr", "side": "high", "from": HIGH, "to": 10 * HIGH, "after_trials": WIDEN_AFTER}]
    assert active_ranges(space, study.user_attrs[ATTR])["lr"].high == 10 * HIGH
    assert active_ranges(space, study.user_attrs[ATTR])["rho"] == space.params["rho"]
    record = record_from_study(study)
    assert record.bounds["lr"] == (1e-4, 10 * HIGH) and record.widenings == moved


def test_never_past_its_limit():
    study, space = study_with(at_the_top_of_lr(WIDEN_AFTER))
    for _ in range(5):
        record_widenings(study, space)
        # The best trials follow the bound outwards.
        high = active_ranges(space, study.user_attrs[ATTR])["lr"].high
        study.add_trial(optuna.trial.create_trial(params={"lr": high * 0.95, "rho": 1.0, "beta1": 0.9}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, high, log=True), "rho": optuna.distributions.FloatDistribution(1e-4, HIGH, log=True), "beta1": optuna.distributions.FloatDistribution(0.5, 0.999)}, value=0.999))
        study.add_trial(optuna.trial.create_trial(params={"lr": high * 0.9, "rho": 1.0, "beta1": 0.9}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, high, log=True), "rho": optuna.distributions.FloatDistribution(1e-4, HIGH, log=True), "beta1": optuna.distributions.FloatDistribution(0.5, 0.999)}, value=0.9995))
    widenings = study.user_attrs[ATTR]["widenings"]
    assert [(w["param"], w["side"]) for w in widenings] == [("lr", "high")] * WIDEN_LIMIT
    assert active_ranges(space, study.user_attrs[ATTR])["lr"].high == HIGH * 10**WIDEN_LIMIT


@pytest.mark.parametrize(
    "values, kwargs",
    [
        (at_the_top_of_lr(WIDEN_AFTER - 1), {}),  # too few completed trials to tell
        ([(0.1 * (i + 1), 1.0, 0.9 + 0.001 * i) for i in range(12)], {}),  # best trials inside
        (at_the_top_of_lr(WIDEN_AFTER), {"widen": False}),  # switched off
        (at_the_top_of_lr(WIDEN_AFTER), {"sampler": "grid"}),  # a grid is fixed
    ],
)
def test_does_not_widen_when_it_should_not(values, kwargs):
    study, space = study_with(values, **kwargs)
    assert record_widenings(study, space) == []
    assert "widened_params" not in study.user_attrs[ATTR]


def test_best_json_names_the_edge_and_the_widening():
    study, space = study_with(at_the_top_of_lr(WIDEN_AFTER))
    rec = build_recommendation(record_from_study(study), confirmations=())
    assert rec.sensitivity.edges == [{"param": "lr", "side": "high", "bound": HIGH}]
    record_widenings(study, space)
    rec = build_recommendation(record_from_study(study), confirmations=())
    assert rec.sensitivity.edges == []  # 0.95 × HIGH is well inside [1e-4, 10 × HIGH]
    assert rec.study.widened[0]["to"] == 10 * HIGH


# ---------------------------------------------------------------------------------------
# After a widening: one distribution per parameter, draws within the current bounds
# ---------------------------------------------------------------------------------------


def on_the_diagonal(hyperparameters: dict[str, float]) -> float:
    """A stand-in for training: best along lr/rho = 10 (SOFIM's diagonal) around rho = 30, so
    lr's best values (about 300) lie past the shipped space's high bound of 100."""
    lr, rho, beta1 = hyperparameters["lr"], hyperparameters["rho"], hyperparameters["beta1"]
    return 1.0 - 0.05 * (math.log10(lr / rho) - 1.0) ** 2 - 0.02 * (math.log10(rho) - 1.5) ** 2 - 0.01 * (beta1 - 0.9) ** 2


@dataclass
class Draw:
    number: int
    bounds: dict[str, ParamRange]  # the study's bounds when the trial drew
    relative: set[str]  # what the sampler's model drew jointly


def scored_spec(sampler: str, trials: int, pruner: str = "none") -> StudySpec:
    return load_spec("digits").replace(trials=trials, sampler=sampler, pruner=pruner, widen=True, enqueue=[])


def run_scored(out: Path, spec: StudySpec) -> tuple[optuna.Study, list[Draw]]:
    """Run the study of ``spec`` in ``out`` (creating it, or resuming it after the checks a rerun
    makes) to ``spec.trials`` trials, drawn as a study's worker draws them (its sampler, ``_start``,
    widening after each) on a real SQLite storage, each scored by :func:`on_the_diagonal`
    instead of trained. Returns the study and the draws this run made."""
    space = load_space("sofim")
    url = f"sqlite:///{out / 'study.db'}"
    study = optuna_backend.open_study(spec, space, url)
    planner = optuna_backend._Planner(spec, space)
    worker = optuna_backend._worker_study(spec, space, url, planner)
    options = RunOptions(out_dir=out, device="cpu")
    draws = []
    while len(study.get_trials()) < spec.trials:
        with pytest.warns(UserWarning, match="Heartbeat"):  # outside study.optimize, as a batched worker asks
            trial = worker.ask()
        plan = planner.plan(trial, wait=False)
        index, view = planner.views[trial._trial_id]
        bounds = optuna_backend._study_bounds(space, study.user_attrs[ATTR], view)
        # What the trial's sampler modelled jointly, in the view it drew from.
        model = WithinBounds(make_sampler(spec.sampler, space, 0, spec.trials), bounds)
        in_view = view_study(view, index, spec.name, spec.direction)
        relative = set(model.infer_relative_search_space(in_view, in_view.ask()._cached_frozen_trial))
        config = optuna_backend._start(trial, plan, spec, space, options, "cpu")
        draws.append(Draw(trial.number, bounds, relative))
        worker.tell(trial, on_the_diagonal(config.hyperparameters))
        record_widenings(study, space)
    return study, draws


def after_widening(study: optuna.Study, draws: list[Draw], param: str = "lr") -> list[Draw]:
    """The draws made after ``param``'s first widening (asserting that it widened)."""
    widened = [w for w in study.user_attrs[ATTR].get("widenings", []) if w["param"] == param]
    assert widened, f"{param} never widened: the scores should have pushed it past its bound"
    return [d for d in draws if d.bounds[param] != load_space("sofim").params[param]]


@pytest.fixture(scope="module")
def tpe_study(tmp_path_factory):
    return run_scored(tmp_path_factory.mktemp("tpe"), scored_spec("tpe", 60))


def test_every_trial_declares_the_same_distributions(tpe_study):
    study, draws = tpe_study
    assert after_widening(study, draws)
    trials = study.get_trials()
    outer = outer_ranges(load_space("sofim"))
    assert (outer["lr"].low, outer["lr"].high) == pytest.approx((1e-4 / 10**WIDEN_LIMIT, 100 * 10**WIDEN_LIMIT))
    assert (outer["beta1"].low, outer["beta1"].high) == (0.5, 0.999)  # not log: never widens
    expected = {name: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log) for name, p in outer.items()}
    assert all(t.distributions == expected for t in trials)
    assert set(study.user_attrs[ATTR][DECLARED_PARAMS]) == {"lr", "rho", "beta1"}


def test_the_relative_search_space_keeps_lr_and_rho_after_a_widening(tpe_study):
    study, _ = tpe_study
    assert {"lr", "rho", "beta1"} <= set(optuna.search_space.IntersectionSearchSpace(include_pruned=True).calculate(study))
    current = active_ranges(load_space("sofim"), study.user_attrs[ATTR])
    sampler = WithinBounds(optuna.samplers.TPESampler(multivariate=True, seed=0), current)
    relative = sampler.infer_relative_search_space(study, study.get_trials()[-1])
    # The model proposes within the current (widened) bounds, not the declared outer ones.
    assert relative["lr"] == optuna.distributions.FloatDistribution(current["lr"].low, current["lr"].high, log=True)
    assert current["lr"].high > 100
    assert "rho" in relative


def test_tpe_draws_lr_with_rho_from_its_model_after_a_widening(tpe_study):
    """Multivariate TPE proposes lr jointly with rho (not one by one, nor at random) after lr widened."""
    study, draws = tpe_study
    later = after_widening(study, draws)
    assert later and all({"lr", "rho", "beta1"} <= d.relative for d in later)


def test_draws_stay_within_the_current_bounds_and_reach_the_widened_part(tmp_path):
    # Hyperband: the sampler then sees the study through a bracket's view of it.
    study, draws = run_scored(tmp_path, scored_spec("tpe", 60, pruner="hyperband"))
    trials = {t.number: t for t in study.get_trials()}
    for draw in draws:
        params = trials[draw.number].params
        assert all(draw.bounds[name].contains(value) for name, value in params.items()), (draw, params)
        # The stored values are the ones the trial ran with.
        assert trials[draw.number].user_attrs["hyperparameters"] == params
    original = load_space("sofim").params["lr"]
    assert any(trials[d.number].params["lr"] > original.high for d in after_widening(study, draws))


def test_gp_draws_lr_from_its_model_after_a_widening(tmp_path):
    """GP keeps modelling lr after it widened: its draws follow the scores' diagonal (lr/rho near
    10), where random draws of lr over 7 decades would land there one time in 7."""
    study, draws = run_scored(tmp_path, scored_spec("gp", 32))
    trials = {t.number: t for t in study.get_trials()}
    later = [d for d in after_widening(study, draws) if d.relative]
    on_diagonal = [d for d in later if abs(math.log10(trials[d.number].params["lr"] / trials[d.number].params["rho"]) - 1.0) < 0.5]
    assert len(later) >= 8 and len(on_diagonal) >= len(later) / 2, [(trials[d.number].params) for d in later]


def test_a_study_of_the_previous_release_resumes_and_keeps_lr_in_the_model(tmp_path):
    """A study made before studies recorded their declared ranges: its trials declared the bounds
    in force when they drew, and changed it when it widened. It still resumes; new trials declare
    what its trials last declared, and the model sees lr again."""
    space = load_space("sofim")
    spec = scored_spec("tpe", 16)
    study = optuna_backend.open_study(spec, space, f"sqlite:///{tmp_path / 'study.db'}")
    meta = {key: value for key, value in study.user_attrs[ATTR].items() if key != DECLARED_PARAMS}
    study.set_user_attr(ATTR, {**meta, "widened_params": {"lr": {"low": 1e-4, "high": 1000.0}}, "widenings": [{"param": "lr", "side": "high", "from": 100.0, "to": 1000.0, "after_trials": 8}]})
    for index in range(12):
        high = 100.0 if index < 8 else 1000.0  # what the previous release declared before and after widening
        values = {"lr": 10 ** (index % 5 - 2), "rho": 10 ** (index % 3 - 1), "beta1": 0.9}
        distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, high, log=True), "rho": optuna.distributions.FloatDistribution(1e-4, 100.0, log=True), "beta1": optuna.distributions.FloatDistribution(0.5, 0.999)}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=distributions, value=on_the_diagonal(values), user_attrs={"hyperparameters": values}))
    assert "lr" not in optuna.search_space.IntersectionSearchSpace().calculate(study)

    resumed, draws = run_scored(tmp_path, spec)
    assert DECLARED_PARAMS not in resumed.user_attrs[ATTR]
    new = [t for t in resumed.get_trials() if t.number >= 12]
    assert len(new) == 4
    assert all(t.distributions["lr"] == optuna.distributions.FloatDistribution(1e-4, 1000.0, log=True) for t in new)
    assert all({"lr", "rho"} <= d.relative for d in draws)
    assert all(d.bounds["lr"].contains(t.params["lr"]) and t.user_attrs["hyperparameters"] == t.params for d, t in zip(draws, new, strict=True))


@pytest.mark.parametrize("sampler", ["cmaes", "qmc", "grid"])
def test_samplers_that_do_not_widen_draw_from_the_space_itself(tmp_path, sampler):
    """They declare the outer ranges too, but draw from the space's own ranges, as before."""
    space = load_space("sofim")
    study, draws = run_scored(tmp_path, scored_spec(sampler, 12))
    assert "widenings" not in study.user_attrs[ATTR]
    for trial in study.get_trials():
        assert all(space.params[name].contains(value) for name, value in trial.params.items())
    if sampler == "grid":
        axes = grid_axes(space, 12)
        assert all(trial.params[name] in axes[name] for trial in study.get_trials() for name in axes)
    elif sampler == "cmaes":  # its model holds every parameter once it starts
        assert {"lr", "rho", "beta1"} <= draws[-1].relative
