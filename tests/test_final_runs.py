"""The final runs: images and seeds that no earlier run used, the headline from them alone, an
interval over seeds and images, and a protocol that stays within its budget on every shipped spec."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from sofim_tune.data import _digits_pools, _split_indices, final_images, load_data
from sofim_tune.errors import UserInputError
from sofim_tune.records import Confirmation, TrialRecord
from sofim_tune.recommend import build_recommendation
from sofim_tune.selection import (
    PROTOCOL_SHARE,
    Measurement,
    confirm_top,
    confirmation_seeds,
    final_runs,
    final_seeds,
    headline_interval,
    interval95,
    pick_recommended,
)
from sofim_tune.space import load_space
from sofim_tune.spec import load_spec
from sofim_tune.study import RunOptions
from sofim_tune.trial import TrialConfig, TrialResult, train_trial
from sofim_tune.tuning import confirm, confirmation_plan, describe_plan, measure_final

from study_records import make_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"


# ------------------------------------------------------------------- disjoint images and seeds


@pytest.mark.parametrize("n, fraction, search_split", [(1437, 0.3, 0), (1000, 0.1, 7), (50, 0.2, 1_000_003)])
def test_final_images_are_disjoint_from_every_search_and_selection_validation(n, fraction, search_split):
    final = set(final_images(n, fraction, search_split).tolist())
    search_train, search_val = _split_indices(n, fraction, search_split, None, False, False)
    assert len(final) == len(search_val) and not final & set(search_val.tolist())
    _, splits = confirmation_seeds(0, 40, search_split, 6)
    for split in splits:
        train, val = _split_indices(n, fraction, split, search_split, False, False)
        assert not final & set(val.tolist()), "a selection run scored a final image"
        assert len(val) == len(search_val) and sorted(train.tolist() + val.tolist()) == list(range(n))
    train, val = _split_indices(n, fraction, search_split, search_split, True, False)
    assert set(val.tolist()) == final and not set(train.tolist()) & final and len(train) + len(val) == n
    # The search's own split is the same with or without final images (so are its studies).
    same_train, same_val = _split_indices(n, fraction, search_split, search_split, False, False)
    assert same_val.tolist() == search_val.tolist() and same_train.tolist() == search_train.tolist()


def test_with_its_own_val_folder_the_final_images_come_out_of_train():
    final = final_images(200, 0.1, 3, fixed_validation=True)
    train, val = _split_indices(200, 0.1, 3, 3, True, True)
    assert val.tolist() == final.tolist() and len(final) == 20 and not set(train.tolist()) & set(final.tolist())
    kept, held = _split_indices(200, 0.1, 9, 3, False, True)
    assert held is None and kept.tolist() == list(range(200))  # selection runs validate on val/


def _fingerprints(images) -> set[str]:
    return {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images}


def test_a_studys_runs_never_score_its_final_images(tmp_path, monkeypatch):
    """End to end on digits: the configs a study hands its backend, loaded as the runs load them."""
    from sofim_tune.backends.optuna import OptunaBackend
    from sofim_tune.tuning import tune

    seen: list[TrialConfig] = []
    original = OptunaBackend.confirm

    def recording(self, configs, options, on_done=None):
        seen.extend(configs)
        return original(self, configs, options, on_done)

    monkeypatch.setattr(OptunaBackend, "confirm", recording)
    spec = load_spec("digits").replace(trials=8, epochs=2)
    outcome = tune(spec, RunOptions(out_dir=tmp_path, device="cpu", workers=1))
    pool, _ = _digits_pools()
    assert len(_fingerprints(pool.images)) == len(pool), "digits images must be told apart by their pixels"

    def validation(config: TrialConfig) -> set[str]:
        data = load_data("digits", val_fraction=config.val_fraction, split_seed=config.split_seed, final_seed=config.final_seed, final=config.final)
        return _fingerprints(data.val.images)

    finals = [c for c in seen if c.final]
    selections = [c for c in seen if not c.final]
    assert finals and selections
    final_set = validation(finals[0])
    search = load_data("digits", val_fraction=spec.val_fraction, split_seed=spec.split_seed)
    assert not final_set & _fingerprints(search.val.images)
    for config in selections:
        assert not final_set & validation(config)
    assert all(validation(c) == final_set for c in finals)
    final_train = load_data("digits", val_fraction=spec.val_fraction, split_seed=spec.split_seed, final_seed=spec.split_seed, final=True).train
    assert not final_set & _fingerprints(final_train.images)
    search_seeds = {spec.seed + t.number for t in outcome.study.trials}
    final_seed_set = {c.seed for c in finals}
    assert not final_seed_set & search_seeds and not final_seed_set & {c.seed for c in selections}


def test_a_final_run_reports_each_final_image():
    config = TrialConfig(dataset="digits", epochs=1, device="cpu", val_fraction=0.3, split_seed=0, final_seed=0, final=True)
    result = train_trial(config)
    assert len(result.val_correct) == 431 and set(result.val_correct) <= {0, 1}
    assert sum(result.val_correct) / 431 == pytest.approx(result.metrics["val_accuracy"])
    assert train_trial(dataclasses.replace(config, final=False, final_seed=None)).val_correct is None
    with pytest.raises(UserInputError, match="final_seed"):
        train_trial(dataclasses.replace(config, final_seed=None))


def test_final_seeds_are_none_of_the_search_or_selection_seeds():
    seeds, _ = confirmation_seeds(0, 40, 0, 50)
    finals = final_seeds(0, 40, 5)
    assert len(set(finals)) == 5 and not set(finals) & set(seeds) and not set(finals) & set(range(40))


# ------------------------------------------------------------------------------ the headline


def test_the_headline_comes_from_the_final_runs_only():
    study = make_study(30)
    selection = [dataclasses.replace(c, values=[0.99, 0.995, 0.99]) for c in study.confirmations]
    params, chosen = pick_recommended(study, selection)
    hits = [3] * 400 + [2] * 20 + [0] * 11
    final = Confirmation(params=params, seeds=[7, 8, 9], values=[0.95, 0.96, 0.955], test_accuracy=0.94, split_seeds=[0, 0, 0], final=True, image_hits=hits)
    study = dataclasses.replace(study, confirmations=[*selection, final])
    rec = build_recommendation(study)
    headline = rec.metric.confirm
    assert headline.runs == "final" and headline.seeds == [7, 8, 9] and headline.images == 431
    assert headline.mean == pytest.approx(statistics.fmean(final.values)) and headline.std == pytest.approx(statistics.stdev(final.values))
    assert headline.ci95 == pytest.approx(headline_interval(final.values, hits))
    assert rec.metric.test_accuracy == 0.94
    assert [c["mean"] for c in rec.selection["candidates"]] == pytest.approx([c.mean for c in selection])
    assert "selection runs" in rec.selection["runs"]
    # A study exported before final runs existed keeps its selection runs as the headline, and says so.
    old = build_recommendation(dataclasses.replace(study, confirmations=selection))
    assert old.metric.confirm.runs == "selection" and old.metric.confirm.mean == pytest.approx(chosen.mean)


def test_no_selection_bias_in_the_headline():
    """Three equal candidates, noisy selection runs: the best of three means sits above the
    truth; the final runs' mean does not."""
    truth, noise = 0.90, 0.02
    rng = random.Random(0)
    trials = [TrialRecord(number=i, state="complete", params={"lr": 0.1 * (i + 1), "rho": 1.0, "beta1": 0.9}, value=0.9) for i in range(3)]
    study = dataclasses.replace(make_study(30), trials=trials, confirmations=[])

    def fake_trainer(jobs):
        return [Measurement(truth + rng.gauss(0, noise)) for _ in jobs]

    selection_errors, headline_errors = [], []
    for _ in range(400):
        confirmations = confirm_top(study, fake_trainer, top=3, seeds=[1, 2, 3], split_seeds=[4, 5, 6], neighbour_seeds=0)
        params, chosen = pick_recommended(study, confirmations)
        final = final_runs(params, fake_trainer, seeds=[7, 8, 9], split_seed=0)
        selection_errors.append(chosen.mean - truth)
        headline_errors.append(final.mean - truth)
    standard_error = noise / math.sqrt(3) / math.sqrt(400)
    assert statistics.fmean(selection_errors) > 10 * standard_error  # the winner's curse is there
    assert abs(statistics.fmean(headline_errors)) < 3 * standard_error  # and the headline is free of it


@pytest.mark.parametrize("seed_effect, seeds_only_at_most", [(0.05, 0.85), (0.3, 1.0)])
def test_the_headline_interval_covers_new_images_and_seeds_about_95_percent(seed_effect, seeds_only_at_most):
    """Simulated final runs of 400 images: an image is classified right when its difficulty
    (fixed), the seed's effect and a little noise per run and image add up above 0. The truth
    is the accuracy expected on new images with new seeds."""
    from scipy import stats

    rng = np.random.default_rng(1)
    population = rng.normal(2.5, 1.5, 100_000)
    noise = 0.5
    truth = float(np.mean(stats.norm.cdf(population / math.hypot(seed_effect, noise))))
    covered = seeds_only = 0
    studies = 300
    for _ in range(studies):
        images = rng.choice(population, 400, replace=False)
        correct = images[None, :] + seed_effect * rng.standard_normal((3, 1)) + noise * rng.standard_normal((3, 400)) > 0
        low, high = headline_interval(correct.mean(1).tolist(), correct.sum(0).tolist())
        covered += low <= truth <= high
        low, high = interval95(correct.mean(1).tolist())
        seeds_only += low <= truth <= high
    assert 0.88 <= covered / studies <= 0.99
    # Where seeds matter little, their spread alone (all runs share one set of images) misses
    # much of the error.
    assert seeds_only / studies <= seeds_only_at_most


def test_the_headline_interval_is_the_two_way_analysis():
    """On a small table, the variance of the mean is (MS_seeds + MS_images − MS_residual) / (runs × images)."""
    table = np.array([[1, 1, 0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0, 1, 1]])
    runs, images = table.shape
    mean = table.mean()
    ms_seeds = images * ((table.mean(1) - mean) ** 2).sum() / (runs - 1)
    ms_images = runs * ((table.mean(0) - mean) ** 2).sum() / (images - 1)
    residual = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + mean
    ms_residual = (residual**2).sum() / ((runs - 1) * (images - 1))
    assert ms_seeds < ms_residual < ms_images  # the seeds' component is estimated as 0
    from scipy import stats

    low, high = headline_interval(table.mean(1).tolist(), table.sum(0).tolist())
    half = stats.t.ppf(0.975, images - 1) * math.sqrt(ms_images / (runs * images))
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert headline_interval([0.9, 0.92], []) == pytest.approx(interval95([0.9, 0.92]))


# ------------------------------------------------------------------------------ the budget


class EpochCountingBackend:
    """A backend whose runs train nothing: it counts the epochs it was asked for."""

    def __init__(self) -> None:
        self.epochs = 0

    def confirm(self, configs, options, on_done=None):
        self.epochs += sum(c.epochs for c in configs)
        results = []
        for c in configs:
            value = 0.9 + 0.001 * (c.seed % 7)
            results.append(TrialResult("completed", {"val_accuracy": value}, [{"val_accuracy": value}] * c.epochs, c.epochs, 0.0, "cpu", "mlp", c, val_correct=[1, 0, 1, 1] if c.final else None))
        if on_done is not None:
            on_done(len(configs))
        return results


@pytest.mark.parametrize("spec_file", sorted(p.name for p in STUDIES.glob("*.toml")))
def test_the_protocol_stays_within_half_the_search_epochs_on_every_shipped_spec(spec_file, tmp_path):
    spec = load_spec(study=STUDIES / spec_file)
    space = load_space(spec.search_space)
    rng = random.Random(spec_file)
    epochs = spec.epochs
    trials = []
    for number in range(spec.trials):  # a search pruned as Hyperband prunes: most trials stop early
        length = rng.choice([1, 1, 1, 3, 3, epochs]) if epochs > 3 else epochs
        params = {"lr": 10 ** rng.uniform(-3, 0), "rho": 10 ** rng.uniform(-2, 1), "beta1": rng.uniform(0.5, 0.99)}
        complete = length == epochs
        trials.append(TrialRecord(number, "complete" if complete else "pruned", params, 0.5 + rng.random() / 2 if complete else None, {e: 0.5 for e in range(1, length + 1)}))
    study = dataclasses.replace(make_study(30), trials=trials, confirmations=[], direction=spec.direction, metric=spec.metric)
    backend = EpochCountingBackend()
    options = RunOptions(out_dir=tmp_path, device="cpu")
    plan = confirmation_plan(study, spec, space)
    confirmations = confirm(study, spec, space, options, backend, plan)
    params, _ = pick_recommended(study, confirmations)
    final = measure_final(study, spec, space, options, backend, params, plan)
    search_epochs = sum(len(t.intermediate) for t in trials)
    floor = (2 + 2) * plan.run_epochs  # one candidate on two seeds, two final runs
    assert backend.epochs == plan.epochs
    assert backend.epochs <= max(PROTOCOL_SHARE * search_epochs, floor)
    assert len(final.values) == plan.final_runs >= 2 and final.final


def test_the_plan_is_stated_before_the_search():
    spec = load_spec("digits")
    line = describe_plan(spec, load_space(spec.search_space))
    assert "search 40 trials of up to 10 epochs" in line and "2 candidates × 2 fresh seeds" in line and "3 final runs" in line and "at most 9 runs of 10 epochs" in line


# ------------------------------------------------------------------ review: edge cases


def test_a_validation_share_that_leaves_no_room_for_final_images_is_refused_before_the_search(tmp_path):
    from sofim_tune.tuning import tune

    spec = load_spec("digits").replace(trials=2, epochs=1, val_fraction=0.6)
    with pytest.raises(UserInputError, match="final images"):
        tune(spec, RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1))
    assert not (tmp_path / "run").exists()
    # A search alone has no final runs, and may validate on 60%.
    tune(spec, RunOptions(out_dir=tmp_path / "search", device="cpu", workers=1, export=False))


def test_a_final_run_that_never_reported_its_images_counts_as_none_right():
    measured = iter([Measurement(0.75, image_correct=(1, 1, 0, 1)), Measurement(0.0), Measurement(0.5, image_correct=(1, 0, 0, 1))])
    final = final_runs({"lr": 0.1}, lambda jobs: [next(measured) for _ in jobs], seeds=[1, 2, 3], split_seed=0)
    assert final.image_hits == [2, 1, 0, 2] and final.final_seed == 0
    assert headline_interval([0.9, 0.9], [2]) == pytest.approx(interval95([0.9, 0.9]))  # one image: seeds only


def test_selection_runs_of_a_release_before_final_runs_are_run_again(tmp_path):
    spec = load_spec("digits").replace(trials=6, epochs=2, confirm_top=1, confirm_seeds=2)
    space = load_space(spec.search_space)
    trials = [TrialRecord(n, "complete", {"lr": 0.1 * (n + 1), "rho": 1.0, "beta1": 0.9}, 0.5 + n / 100, {1: 0.5, 2: 0.5 + n / 100}) for n in range(6)]
    study = dataclasses.replace(make_study(30), trials=trials, confirmations=[])
    plan = confirmation_plan(study, spec, space)
    backend = EpochCountingBackend()
    options = RunOptions(out_dir=tmp_path, device="cpu")
    fresh = confirm(study, spec, space, options, backend, plan)
    assert [c.final_seed for c in fresh] == [spec.split_seed]
    spent = backend.epochs
    assert confirm(dataclasses.replace(study, confirmations=fresh), spec, space, options, backend, plan) == fresh and backend.epochs == spent
    old = [dataclasses.replace(c, final_seed=None) for c in fresh]  # as an earlier release stored them
    confirm(dataclasses.replace(study, confirmations=old), spec, space, options, backend, plan)
    assert backend.epochs > spent


def test_recommend_ranks_final_run_headlines_apart_from_selection_run_ones(tmp_path):
    from sofim_tune.recommend import write_recommendation
    from sofim_tune.runs import find_recommendations

    study = make_study(30)
    selection = [c for c in study.confirmations if not c.final]
    params, _ = pick_recommended(study, selection)
    final = Confirmation(params=params, seeds=[7, 8, 9], values=[0.5, 0.5, 0.5], split_seeds=[0, 0, 0], final=True, final_seed=0)
    for name, confirmations in (("new", [*selection, final]), ("old", selection)):
        write_recommendation(build_recommendation(dataclasses.replace(study, confirmations=confirmations)), tmp_path / name / "best.json")
    rankings = find_recommendations(tmp_path, study.dataset).rankings
    assert [(r.basis, [p.parent.name for p, _ in r.entries]) for r in rankings] == [("final", ["new"]), ("confirmed", ["old"])]
    assert rankings[0].describe().startswith("ranked by the final runs' mean")
