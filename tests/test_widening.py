"""A study widens a log bound that its best trials sit on: when it should, and never past its limit."""

from __future__ import annotations

import optuna
import pytest

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.backends.optuna import ATTR, WIDEN_AFTER, WIDEN_LIMIT, active_ranges, maybe_widen, record_from_study
from sofim_tune.recommend import build_recommendation
from sofim_tune.space import load_space
from sofim_tune.spec import load_spec
from sofim_tune.study import study_metadata


def study_with(values: list[tuple[float, float, float]], *, widen: bool = True, sampler: str = "tpe") -> tuple[optuna.Study, object]:
    """An in-memory study made by sofim-tune, with completed trials (lr, rho, accuracy)."""
    space = load_space("sofim")
    spec = load_spec("digits").replace(widen=widen, sampler=sampler)
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(ATTR, study_metadata(spec, space, "memory"))
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
    moved = maybe_widen(study, space)
    assert moved == [{"param": "lr", "side": "high", "from": HIGH, "to": 10 * HIGH, "after_trials": WIDEN_AFTER}]
    assert active_ranges(space, study.user_attrs[ATTR])["lr"].high == 10 * HIGH
    assert active_ranges(space, study.user_attrs[ATTR])["rho"] == space.params["rho"]
    record = record_from_study(study)
    assert record.bounds["lr"] == (1e-4, 10 * HIGH) and record.widenings == moved


def test_never_past_its_limit():
    study, space = study_with(at_the_top_of_lr(WIDEN_AFTER))
    for _ in range(5):
        maybe_widen(study, space)
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
    assert maybe_widen(study, space) == []
    assert "widened_params" not in study.user_attrs[ATTR]


def test_best_json_names_the_edge_and_the_widening():
    study, space = study_with(at_the_top_of_lr(WIDEN_AFTER))
    rec = build_recommendation(record_from_study(study), confirmations=())
    assert rec.sensitivity.edges == [{"param": "lr", "side": "high", "bound": HIGH}]
    maybe_widen(study, space)
    rec = build_recommendation(record_from_study(study), confirmations=())
    assert rec.sensitivity.edges == []  # 0.95 × HIGH is well inside [1e-4, 10 × HIGH]
    assert rec.study.widened[0]["to"] == 10 * HIGH


def test_a_study_samples_from_the_widened_range(tmp_path):
    """After widening, new trials are drawn from the stored wider range, on resume too."""
    from sofim_tune.tuning import RunOptions, tune

    spec = load_spec("digits").replace(trials=2, epochs=1, sampler="random", enqueue=[])
    options = RunOptions(out_dir=tmp_path, device="cpu", export=False)
    tune(spec, options)
    study = optuna.load_study(study_name=spec.name, storage=optuna_backend.open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    meta = study.user_attrs[ATTR]
    study.set_user_attr(ATTR, {**meta, "widened_params": {"lr": {"low": 5 * HIGH, "high": 10 * HIGH}}})
    trials = tune(spec.replace(trials=4), options).study.trials
    assert all(5 * HIGH <= t.params["lr"] <= 10 * HIGH for t in trials[2:])
