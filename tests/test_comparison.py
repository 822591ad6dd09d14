"""SOFIM against its baselines: Welch verdicts, epochs to target, compare.json, the pages and the
performance profiles."""

from __future__ import annotations

import copy
import dataclasses
import html
import importlib.resources
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import jsonschema
import plotly.offline
import pytest
from PIL import Image
from scipy import stats

from sofim_tune.comparison import (
    SCHEMA_ID,
    OptimizerResult,
    build_comparison,
    epochs_to_target,
    load_comparison,
    performance_profile,
    performance_ratios,
    profile_share,
    holm,
    paired_verdict,
    verdict_sentences,
    welch_verdict,
    write_compare_html,
    write_comparison,
    write_summary,
)
from sofim_tune.errors import UserInputError
from sofim_tune.selection import interval95

PLOTLY_JS_BYTES = len(plotly.offline.get_plotlyjs().encode())
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (/usr/bin/chromium absent; apt-get install chromium)")

EPOCHS = 8
# Five confirmation seeds per optimizer. SOFIM beats SGD-momentum clearly, AdamW overlaps SOFIM,
# the per-tensor variant is clearly worse than SOFIM.
VALUES = {
    "sofim": [0.986, 0.984, 0.988, 0.985, 0.987],
    "sgd-momentum": [0.979, 0.977, 0.981, 0.978, 0.980],
    "adamw": [0.984, 0.989, 0.983, 0.988, 0.985],
    "sofim-tensor": [0.975, 0.972, 0.978, 0.974, 0.976],
}
# How fast each optimizer's curves rise: q in c(e) = start + (final − start)(1 − q^e)/(1 − q^E).
SPEED = {"sofim": 0.3, "sgd-momentum": 0.6, "adamw": 0.45, "sofim-tensor": 0.3}
BUDGET = {"trials": 40, "epochs": EPOCHS, "sampler": "tpe", "pruner": "median", "confirm_top": 3,
          "confirm_seeds": 5, "seed": 0, "recipe": {"schedule": "cosine", "augment": "none"}}


def _curve(final: float, q: float, epochs: int = EPOCHS, start: float = 0.1) -> list[float]:
    """A rising learning curve that ends exactly at ``final``."""
    return [start + (final - start) * (1 - q**e) / (1 - q**epochs) for e in range(1, epochs + 1)]


def _result(name: str, values: list[float] | None = None) -> OptimizerResult:
    values = VALUES[name] if values is None else values
    hyperparameters = {"lr": 0.05, "rho": 0.1, "beta1": 0.9} if name.startswith("sofim") else {"lr": 0.1, "momentum": 0.9}
    best = max(values)
    return OptimizerResult(
        optimizer=name, run_dir=name, hyperparameters=hyperparameters, values=list(values),
        curves=[_curve(v, SPEED[name]) for v in values], test_accuracy=statistics.fmean(values) - 0.004,
        tuning_epochs=200 + 10 * len(name), tuning_seconds=123.5,
        best_so_far=[(8, best - 0.05), (16, best - 0.02), (40, best - 0.02), (64, best)],
    )


@pytest.fixture(scope="module")
def results() -> list[OptimizerResult]:
    return [_result(name) for name in VALUES]


@pytest.fixture(scope="module")
def doc(results: list[OptimizerResult]) -> dict:
    return build_comparison("mnist", "mlp", "val_accuracy", "maximize", results, budget=BUDGET)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 420, message
    return message


# --- Welch's t-test, the paired t-test, Holm's correction


def test_the_paired_t_test_is_scipys_ttest_rel() -> None:
    # Seed i is easy or hard for both optimizers alike; SOFIM is 0.2 points ahead on each.
    base = [0.970, 0.985, 0.960, 0.990, 0.975]
    sofim = [b + 0.002 + 0.0003 * (-1) ** i for i, b in enumerate(base)]
    paired = paired_verdict(sofim, base)
    assert paired["test"] == "paired t-test" and paired["verdict"] == "better"
    assert paired["p_value"] == pytest.approx(stats.ttest_rel(sofim, base).pvalue, rel=1e-9)
    assert paired["difference"] == pytest.approx(statistics.fmean(sofim) - statistics.fmean(base))
    # Blind to the pairing, Welch's test sees the seeds' spread and calls it noise.
    assert welch_verdict(sofim, base)["verdict"] == "indistinguishable"
    assert paired_verdict(base, sofim)["verdict"] == "worse"
    assert paired_verdict(base, sofim, direction="minimize")["verdict"] == "better"
    # Degenerate: the same difference on every pair.
    assert paired_verdict([0.9, 0.8], [0.9, 0.8])["p_value"] == 1.0
    assert paired_verdict([0.91, 0.81], [0.9, 0.8])["p_value"] == 0.0
    with pytest.raises(UserInputError):
        paired_verdict([0.9, 0.8, 0.7], [0.9, 0.8])


def test_holm_adjusts_step_down() -> None:
    # m = 4: sorted 0.01, 0.02, 0.03, 0.2 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), max(0.06, 0.2).
    assert holm([0.03, 0.2, 0.01, 0.02]) == pytest.approx([0.06, 0.2, 0.04, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.04]) == [0.04] and holm([]) == []


def test_verdicts_pair_shared_seeds_and_are_holm_corrected() -> None:
    base = [0.970, 0.985, 0.960, 0.990, 0.975]
    ahead = [0.002, 0.004, -0.0005, 0.003, 0.0035]  # SOFIM over SGD per seed: paired p ≈ 0.039
    behind = [0.003, -0.0005, 0.004, 0.0025, 0.002]  # AdamW under SOFIM per seed: paired p ≈ 0.043
    sofim = [b + a for b, a in zip(base, ahead)]
    results = {"sofim": sofim, "sgd-momentum": base, "adamw": [v - d for v, d in zip(sofim, behind)]}
    seeds = [11, 12, 13, 14, 15]
    paired = build_comparison("digits", "mlp", "val_accuracy", "maximize", [dataclasses.replace(_result(n, v), seeds=seeds) for n, v in results.items()], budget=BUDGET)
    verdicts = {v["against"]: v for v in paired["verdicts"]}
    assert {v["test"] for v in verdicts.values()} == {"paired t-test"} and {v["correction"] for v in verdicts.values()} == {"holm"}
    raw = [stats.ttest_rel(results["sofim"], results[name]).pvalue for name in ("sgd-momentum", "adamw")]
    assert [verdicts[name]["p_value"] for name in ("sgd-momentum", "adamw")] == pytest.approx(raw, rel=1e-6)
    assert [verdicts[name]["p_adjusted"] for name in ("sgd-momentum", "adamw")] == pytest.approx(holm(raw), rel=1e-6)
    # Each verdict alone would say "better" (p < 0.05); two of them at once, Holm says neither is.
    assert all(p < 0.05 for p in raw) and all(v["p_adjusted"] >= 0.05 and v["verdict"] == "indistinguishable" for v in verdicts.values())
    assert paired_verdict(results["sofim"], base)["verdict"] == "better"
    # Without shared seeds (unknown, or other seeds), Welch's test, still corrected.
    unpaired = build_comparison("digits", "mlp", "val_accuracy", "maximize", [_result(n, v) for n, v in results.items()], budget=BUDGET)
    assert {v["test"] for v in unpaired["verdicts"]} == {"Welch's t-test"}


def test_welch_clear_difference_matches_scipy() -> None:
    a, b = VALUES["sofim"], VALUES["sgd-momentum"]
    verdict = welch_verdict(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert verdict["p_value"] == pytest.approx(expected, rel=1e-12)
    assert verdict["p_value"] < 0.001
    assert verdict == {"test": "Welch's t-test", "alpha": 0.05, "difference": pytest.approx(0.007),
                       "p_value": verdict["p_value"], "verdict": "better"}
    # Reversed: the same p, the opposite sign and verdict.
    reverse = welch_verdict(b, a)
    assert reverse["p_value"] == pytest.approx(expected, rel=1e-12)
    assert (reverse["difference"], reverse["verdict"]) == (pytest.approx(-0.007), "worse")


def test_welch_unequal_variances_differs_from_student() -> None:
    a = [0.90, 0.91, 0.92, 0.93, 0.94, 0.95]
    b = [0.80, 0.96, 0.70, 0.99, 0.75]
    welch = stats.ttest_ind(a, b, equal_var=False).pvalue
    student = stats.ttest_ind(a, b, equal_var=True).pvalue
    assert abs(welch - student) > 0.01  # the two tests tell apart on these values
    assert welch_verdict(a, b)["p_value"] == pytest.approx(welch, rel=1e-12)


def test_welch_overlap_is_indistinguishable() -> None:
    a, b = VALUES["sofim"], VALUES["adamw"]
    verdict = welch_verdict(a, b)
    assert verdict["p_value"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert verdict["p_value"] > 0.5
    assert verdict["verdict"] == "indistinguishable"
    assert verdict["difference"] == pytest.approx(0.0002)


def test_welch_alpha_decides() -> None:
    a, b = [0.90, 0.92, 0.91, 0.93], [0.89, 0.91, 0.90, 0.905]
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert 0.05 < p < 0.2
    assert welch_verdict(a, b)["verdict"] == "indistinguishable"
    loose = welch_verdict(a, b, alpha=0.2)
    assert (loose["alpha"], loose["verdict"]) == (0.2, "better")


def test_welch_minimize_flips_better_and_worse() -> None:
    low, high = [0.20, 0.21, 0.19, 0.20], [0.30, 0.32, 0.29, 0.31]
    assert welch_verdict(low, high, direction="minimize")["verdict"] == "better"
    assert welch_verdict(low, high, direction="maximize")["verdict"] == "worse"
    assert welch_verdict(high, low, direction="minimize")["verdict"] == "worse"
    # The difference keeps its sign: mean of the first minus mean of the second.
    assert welch_verdict(low, high, direction="minimize")["difference"] == pytest.approx(-0.105)


def test_welch_constant_values_give_no_nan() -> None:
    same = welch_verdict([0.9, 0.9, 0.9], [0.9, 0.9])
    assert same == {"test": "Welch's t-test", "alpha": 0.05, "difference": 0.0, "p_value": 1.0,
                    "verdict": "indistinguishable"}
    apart = welch_verdict([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    assert (apart["p_value"], apart["verdict"], apart["difference"]) == (0.0, "better", pytest.approx(0.1))
    assert welch_verdict([0.9, 0.9], [0.8, 0.8], direction="minimize")["verdict"] == "worse"
    # One side constant: a finite Welch test all the same.
    one = welch_verdict([0.5, 0.5, 0.5], [0.3, 0.4, 0.35])
    # With one variance 0, Welch's t is (0.5 − 0.35) / sqrt(s²/3) on 3 − 1 degrees of freedom.
    t = 0.15 / math.sqrt(statistics.variance([0.3, 0.4, 0.35]) / 3)
    assert one["p_value"] == pytest.approx(2 * stats.t.sf(t, 2), rel=1e-9)
    assert one["verdict"] == "better"
    for verdict in (same, apart, one):
        json.dumps(verdict, allow_nan=False)  # nothing JSON cannot hold


@pytest.mark.parametrize(("a", "b", "kwargs", "match"), [
    ([0.9], [0.8, 0.7], {}, "at least 2 values per optimizer.*got 1 and 2"),
    ([0.9, 0.8], [], {}, "got 2 and 0"),
    ([0.9, math.nan], [0.8, 0.7], {}, "finite"),
    ([0.9, 0.8], [0.8, 0.7], {"direction": "up"}, "direction must be"),
    ([0.9, 0.8], [0.8, 0.7], {"alpha": 1.5}, "alpha must lie"),
])
def test_welch_refuses(a, b, kwargs, match) -> None:
    with pytest.raises(UserInputError, match=match):
        welch_verdict(a, b, **kwargs)


# --- Epochs to target


def test_epochs_to_target_uses_the_mean_curve() -> None:
    curves = [[0.5, 0.8, 0.9, 0.92], [0.7, 0.9, 1.0, 0.96]]  # mean 0.6, 0.85, 0.95, 0.94
    assert epochs_to_target(curves, 0.85, "maximize") == 2  # reaching counts (>=)
    assert epochs_to_target(curves, 0.86, "maximize") == 3  # one seed alone reached 0.9 at epoch 2
    assert epochs_to_target(curves, 0.5, "maximize") == 1
    assert epochs_to_target(curves, 0.951, "maximize") is None
    losses = [[3.0, 2.0, 1.0], [5.0, 2.0, 1.5]]  # mean 4, 2, 1.25
    assert epochs_to_target(losses, 2.0, "minimize") == 2
    assert epochs_to_target(losses, 1.0, "minimize") is None
    assert epochs_to_target([], 0.5, "maximize") is None


def test_epochs_to_target_stops_at_the_shortest_curve() -> None:
    # The second run stopped after 2 epochs: the mean exists for 2 epochs only.
    assert epochs_to_target([[0.1, 0.5, 0.99], [0.1, 0.5]], 0.9, "maximize") is None
    assert epochs_to_target([[0.1, 0.5, math.nan], [0.1, 0.6, 0.9]], 0.7, "maximize") is None


# --- compare.json


def test_build_comparison(doc: dict, results: list[OptimizerResult]) -> None:
    assert doc["schema"] == SCHEMA_ID == "sofim-tune/comparison/v1"
    assert (doc["dataset"], doc["arch"], doc["metric"], doc["direction"]) == ("mnist", "mlp", "val_accuracy", "maximize")
    assert doc["budget"] == BUDGET
    assert list(doc["optimizers"]) == ["sofim", "sgd-momentum", "adamw", "sofim-tensor"]
    best_mean = statistics.fmean(VALUES["sofim"])  # 0.986, above AdamW's 0.9858
    assert doc["target"] == {"definition": "within 1 point of the best final mean accuracy of any optimizer",
                             "value": pytest.approx(best_mean - 0.01)}
    sofim = doc["optimizers"]["sofim"]
    assert sofim["run_dir"] == "sofim"
    assert sofim["hyperparameters"] == {"lr": 0.05, "rho": 0.1, "beta1": 0.9}
    assert sofim["confirmed"]["values"] == VALUES["sofim"]
    assert sofim["confirmed"]["mean"] == pytest.approx(0.986)
    assert sofim["confirmed"]["std"] == pytest.approx(statistics.stdev(VALUES["sofim"]))  # n − 1
    assert sofim["confirmed"]["ci95"] == pytest.approx(list(interval95(VALUES["sofim"])))
    assert sofim["test_accuracy"] == pytest.approx(0.982)
    assert sofim["tuning"] == {"epochs": 250, "seconds": 123.5, "seconds_are": "wall"}
    for r in results:
        assert doc["optimizers"][r.optimizer]["epochs_to_target"] == epochs_to_target(r.curves, best_mean - 0.01, "maximize")
    # Fast SOFIM curves reach 0.976 early; SGD-momentum (final 0.979) only at the end; the
    # per-tensor variant (final 0.975) never.
    steps = {n: e["epochs_to_target"] for n, e in doc["optimizers"].items()}
    assert steps == {"sofim": 4, "sgd-momentum": 8, "adamw": 6, "sofim-tensor": None}
    pairs = [(v["optimizer"], v["against"], v["verdict"]) for v in doc["verdicts"]]
    assert pairs == [
        ("sofim", "sgd-momentum", "better"), ("sofim", "adamw", "indistinguishable"),
        ("sofim-tensor", "sgd-momentum", "worse"), ("sofim-tensor", "adamw", "worse"),
        ("sofim-tensor", "sofim", "worse"),
    ]
    first = doc["verdicts"][0]
    assert first["p_value"] == pytest.approx(stats.ttest_ind(VALUES["sofim"], VALUES["sgd-momentum"], equal_var=False).pvalue)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created"])


def test_verdicts_without_the_tensor_variant() -> None:
    doc = build_comparison("mnist", "mlp", "val_accuracy", "maximize",
                           [_result("sgd-momentum"), _result("sofim")], budget={})
    assert [(v["optimizer"], v["against"]) for v in doc["verdicts"]] == [("sofim", "sgd-momentum")]


def test_minimize_target() -> None:
    losses = {"sofim": [0.20, 0.21, 0.19], "adamw": [0.30, 0.31, 0.29]}
    results = [OptimizerResult(n, n, {"lr": 0.1}, v, [[1.0, 0.5, x] for x in v], None, 24, 1.0, [])
               for n, v in losses.items()]
    doc = build_comparison("cifar10", "resnet18", "val_loss", "minimize", results, budget={})
    assert doc["target"]["value"] == pytest.approx(0.21)
    assert doc["target"]["definition"] == "within 0.01 of the best (lowest) final mean val_loss of any optimizer"
    assert {n: e["epochs_to_target"] for n, e in doc["optimizers"].items()} == {"sofim": 3, "adamw": None}
    assert doc["verdicts"][0]["verdict"] == "better"


@pytest.mark.parametrize(("names", "values", "match"), [
    (["sofim"], [[0.9, 0.8]], "at least 2 optimizers"),
    (["sofim", "sofim"], [[0.9, 0.8], [0.9, 0.8]], "repeated: sofim"),
    (["sofim", "adamw"], [[0.9], [0.9, 0.8]], "sofim: a comparison needs at least 2 confirmed values"),
    (["sofim", "adamw"], [[0.9, math.inf], [0.9, 0.8]], "finite"),
])
def test_build_comparison_refuses(names, values, match) -> None:
    results = [OptimizerResult(n, n, {}, v, [], None, 0, 0.0, []) for n, v in zip(names, values)]
    with pytest.raises(UserInputError, match=match):
        build_comparison("mnist", "mlp", "val_accuracy", "maximize", results, budget={})


def test_round_trip_validates(tmp_path: Path, doc: dict) -> None:
    path = write_comparison(doc, tmp_path / "cmp" / "compare.json")
    assert path == tmp_path / "cmp" / "compare.json"
    assert load_comparison(path) == doc
    assert "NaN" not in path.read_text()
    # The shipped schema alone (no code of ours) accepts the file.
    schema = json.loads(importlib.resources.files("sofim_tune").joinpath("comparison.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json.loads(path.read_text()))
    assert [p.name for p in path.parent.iterdir()] == ["compare.json"]  # no temporary file left


def _corrupt(doc: dict, how: str) -> str:
    data = copy.deepcopy(doc)
    if how == "bad json":
        return json.dumps(data)[:-20]
    if how == "schema id":
        data["schema"] = "sofim-tune/comparison/v2"
    elif how == "missing field":
        del data["optimizers"]["adamw"]["confirmed"]
    elif how == "nan":
        data["optimizers"]["sofim"]["confirmed"]["mean"] = math.nan
        return json.dumps(data)  # Python writes NaN; JSON has no such thing
    elif how == "infinity":
        data["target"]["value"] = -math.inf
        return json.dumps(data)
    elif how == "wrong type":
        data["verdicts"][0]["p_value"] = "0.01"
    elif how == "unknown verdict":
        data["verdicts"][1]["verdict"] = "slightly better"
    elif how == "unknown optimizer":
        data["verdicts"][0]["against"] = "lion"
    return json.dumps(data)


@pytest.mark.parametrize(("how", "what"), [
    ("bad json", "invalid JSON at line 1 column"),
    ("schema id", "schema is 'sofim-tune/comparison/v2', expected 'sofim-tune/comparison/v1'"),
    ("missing field", "optimizers/adamw: 'confirmed' is a required property"),
    ("nan", "invalid JSON: NaN is not JSON"),
    ("infinity", "invalid JSON: -Infinity is not JSON"),
    ("wrong type", "verdicts/0/p_value: '0.01' is not of type 'number'"),
    ("unknown verdict", "verdicts/1/verdict: 'slightly better' is not one of"),
    ("unknown optimizer", "verdicts/0/against: 'lion' is not one of the optimizers"),
])
def test_corrupt_file_is_refused(tmp_path: Path, doc: dict, how: str, what: str) -> None:
    path = tmp_path / "compare.json"
    path.write_text(_corrupt(doc, how))
    with pytest.raises(UserInputError) as info:
        load_comparison(path)
    message = _one_line(info)
    assert message.startswith(f"{path}: not a sofim-tune comparison v1: {what}"), message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as info:
        load_comparison(tmp_path / "nope.json")
    assert _one_line(info) == f"{tmp_path / 'nope.json'}: not a sofim-tune comparison v1: no such file"


def test_write_refuses_nan_and_leaves_nothing(tmp_path: Path, doc: dict) -> None:
    bad = copy.deepcopy(doc)
    bad["optimizers"]["adamw"]["confirmed"]["values"][2] = math.nan
    with pytest.raises(UserInputError) as info:
        write_comparison(bad, tmp_path / "compare.json")
    assert _one_line(info) == (f"{tmp_path / 'compare.json'}: not a sofim-tune comparison v1: "
                               "optimizers/adamw/confirmed/values/2: NaN or infinity is not a number JSON can hold")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_what_json_cannot_hold(tmp_path: Path, doc: dict) -> None:
    odd = {**doc, "budget": {**BUDGET, "out": tmp_path}}  # a Path, not a string
    with pytest.raises(UserInputError) as info:
        write_comparison(odd, tmp_path / "compare.json")
    assert _one_line(info) == (f"{tmp_path / 'compare.json'}: not a sofim-tune comparison v1: "
                               "Object of type PosixPath is not JSON serializable")
    assert not (tmp_path / "compare.json").exists()


# --- In words


def test_verdict_sentences(doc: dict) -> None:
    p = {(v["optimizer"], v["against"]): v["p_adjusted"] for v in doc["verdicts"]}
    assert p[("sofim", "sgd-momentum")] < 0.001
    assert 0.5 < p[("sofim", "adamw")] < 1
    adamw_p = f"{p[('sofim', 'adamw')]:.2g}"
    assert verdict_sentences(doc) == [
        "SOFIM is better than SGD-momentum here: 98.6% against 97.9% (Welch's t-test, Holm-adjusted p < 0.001, 5 seeds each).",
        f"SOFIM is indistinguishable from AdamW at 95% here: 98.6% against 98.6% (Welch's t-test, Holm-adjusted p = {adamw_p}, 5 seeds each).",
        f"SOFIM (per-tensor) is worse than SGD-momentum here: 97.5% against 97.9% (Welch's t-test, Holm-adjusted p = {p[('sofim-tensor', 'sgd-momentum')]:.2g}, 5 seeds each).",
        "SOFIM (per-tensor) is worse than AdamW here: 97.5% against 98.6% (Welch's t-test, Holm-adjusted p < 0.001, 5 seeds each).",
        "SOFIM (per-tensor) is worse than SOFIM here: 97.5% against 98.6% (Welch's t-test, Holm-adjusted p < 0.001, 5 seeds each).",
    ]


# --- compare.html


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, doc: dict, results: list[OptimizerResult]) -> Path:
    return write_compare_html(doc, results, tmp_path_factory.mktemp("compare"))


def test_compare_page(page: Path, doc: dict) -> None:
    assert page.name == "compare.html"
    text = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing fetched, works offline
    assert PLOTLY_JS_BYTES < len(text.encode()) < PLOTLY_JS_BYTES + 200_000  # plotly.js embedded once
    top = text[: text.index("<section")]  # above every figure
    for sentence in verdict_sentences(doc):
        assert html.escape(sentence) in top
    assert "confirm_seeds 5" in top and "<td class=\"n\">98.60% ± 0.16%</td>" in top
    positions = [text.index(f'id="fig-{name}"') for name in ("curves", "final", "tuning")]
    assert positions == sorted(positions)
    assert "the shaded band spans the lowest to the highest seed (min–max)" in text


def test_compare_figures(doc: dict, results: list[OptimizerResult]) -> None:
    from sofim_tune.comparison import _curves_figure, _final_figure, _tuning_figure

    curves = _curves_figure(doc, results)
    mean = next(t for t in curves.data if t.name == "SOFIM (mean of 5 seeds)")
    assert list(mean.y) == pytest.approx([statistics.fmean(c[e] for c in results[0].curves) for e in range(EPOCHS)])
    band = next(t for t in curves.data if t.name == "SOFIM min–max")
    assert band.y[EPOCHS - 1] == pytest.approx(max(VALUES["sofim"]))  # top edge ends at the best seed
    assert band.y[EPOCHS] == pytest.approx(min(VALUES["sofim"]))  # bottom edge starts at the worst
    final = next(t for t in _final_figure(doc).data if t.name == "SGD-momentum")
    low, high = interval95(VALUES["sgd-momentum"])
    assert final.y[0] + final.error_y.array[0] == pytest.approx(high)
    assert final.y[0] - final.error_y.arrayminus[0] == pytest.approx(low)
    tuning = next(t for t in _tuning_figure(doc, results).data if t.name == "AdamW")
    assert (list(tuning.x), tuning.line.shape) == ([8, 16, 40, 64], "hv")


def _chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,4000", *args, page.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    )


def _assert_rendered(tmp_path: Path, page: Path, figures: tuple[str, ...], legends: tuple[str, ...]) -> None:
    """Every figure drew an SVG in a real browser, and the screenshot shows plots, not text only."""
    dom = _chromium(tmp_path, page, "--virtual-time-budget=3000", "--dump-dom").stdout
    for name in figures:
        figure = dom[dom.index(f'id="fig-{name}"'):]
        figure = figure[: figure.find("<section", 1)]
        assert 'class="main-svg"' in figure, f"fig-{name} did not render"
    for legend in legends:
        assert f">{legend}</text>" in dom, legend
    shot = tmp_path / "page.png"
    _chromium(tmp_path, page, f"--screenshot={shot}")
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    colors = rgb.getcolors(maxcolors=1 << 24)
    white = sum(n for n, color in colors if min(color) >= 250)
    assert len(colors) > 500, f"{len(colors)} distinct colors: the plots did not draw"
    assert 1 - white / (rgb.width * rgb.height) > 0.05


@needs_chromium
def test_compare_page_renders_in_chromium(tmp_path: Path, page: Path) -> None:
    _assert_rendered(tmp_path, page, ("curves", "final", "tuning"),
                     ("SOFIM (mean of 5 seeds)", "SGD-momentum (mean of 5 seeds)", "AdamW"))


def test_unwritable_out_dir(tmp_path: Path, doc: dict, results: list[OptimizerResult]) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserInputError, match="cannot write"):
        write_compare_html(doc, results, tmp_path / "a-file" / "cmp")


# --- Across problems


def _problems(doc: dict) -> list[dict]:
    """Three problems, two optimizers each, with hand-made epochs to target:

    =========  =====  =====
    problem    sofim  adamw
    =========  =====  =====
    p1         2      4      ratios 1, 2
    p2         2      6      ratios 1, 3
    p3         never  5      ratios inf, 1
    =========  =====  =====
    """
    docs = []
    for dataset, (a, b) in {"p1": (2, 4), "p2": (2, 6), "p3": (None, 5)}.items():
        d = copy.deepcopy(doc)
        d["dataset"] = dataset
        d["optimizers"] = {n: d["optimizers"][n] for n in ("sofim", "adamw")}
        d["optimizers"]["sofim"]["epochs_to_target"] = a
        d["optimizers"]["adamw"]["epochs_to_target"] = b
        d["verdicts"] = [v for v in d["verdicts"] if (v["optimizer"], v["against"]) == ("sofim", "adamw")]
        docs.append(d)
    return docs


def _step_at(trace, tau: float) -> float:
    """The value of an ``hv`` step line at ``tau``."""
    return [y for x, y in zip(trace.x, trace.y) if x <= tau][-1]


def test_performance_profile(doc: dict) -> None:
    docs = _problems(doc)
    ratios = performance_ratios(docs)
    assert ratios == {"sofim": [1.0, 1.0, math.inf], "adamw": [2.0, 3.0, 1.0]}
    assert (profile_share(ratios["sofim"], 1), profile_share(ratios["sofim"], 2)) == (2 / 3, 2 / 3)
    assert (profile_share(ratios["adamw"], 1), profile_share(ratios["adamw"], 2)) == (1 / 3, 2 / 3)
    fig = performance_profile(docs)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"SOFIM", "AdamW"}
    for name, at1, at2, at_end in (("SOFIM", 2 / 3, 2 / 3, 2 / 3), ("AdamW", 1 / 3, 2 / 3, 1.0)):
        trace = traces[name]
        assert trace.line.shape == "hv"
        assert (trace.x[0], trace.x[-1]) == (1.0, 6.0)  # τ from 1 to twice the largest finite ratio
        assert _step_at(trace, 1) == pytest.approx(at1)
        assert _step_at(trace, 2) == pytest.approx(at2)
        assert _step_at(trace, 2.99) == pytest.approx(at2)
        assert trace.y[-1] == pytest.approx(at_end)
    axis = fig.layout.xaxis
    assert axis.type == "log" and list(axis.tickvals) == [1, 2, 4]
    assert axis.range == pytest.approx((0, math.log10(6)))


def test_profile_with_nobody_reaching_the_target(doc: dict) -> None:
    docs = _problems(doc)[2:]
    docs[0]["optimizers"]["adamw"]["epochs_to_target"] = None
    assert performance_ratios(docs) == {"sofim": [math.inf], "adamw": [math.inf]}
    assert all(max(t.y) == 0 for t in performance_profile(docs).data)
    with pytest.raises(UserInputError, match="at least one comparison"):
        performance_ratios([])


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory, doc: dict) -> tuple[Path, list[dict]]:
    return write_summary([doc, *_problems(doc)], tmp_path_factory.mktemp("summary"))


def test_summary(summary: tuple[Path, list[dict]], doc: dict) -> None:
    path, rows = summary
    assert path.name == "compare-summary.html"
    assert len(rows) == 5 + 3
    assert rows[0] == {"dataset": "mnist", "arch": "mlp", "optimizer": "sofim", "against": "sgd-momentum",
                       "verdict": "better", "p_value": doc["verdicts"][0]["p_value"]}
    assert [(r["dataset"], r["against"], r["verdict"]) for r in rows[5:]] == [
        (p, "adamw", "indistinguishable") for p in ("p1", "p2", "p3")]
    text = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert PLOTLY_JS_BYTES < len(text.encode()) < PLOTLY_JS_BYTES + 100_000
    assert 'id="fig-profile"' in text
    assert "1 better, 4 indistinguishable, 3 worse" in text
    assert ('<td>p3 × mlp</td><td class="n">97.60%</td><td class="n">never</td><td class="n">—</td>'
            '<td class="n">5</td><td class="n">—</td></tr>') in text


def test_summary_refuses_invalid(tmp_path: Path, doc: dict) -> None:
    with pytest.raises(UserInputError, match="at least one comparison"):
        write_summary([], tmp_path)
    bad = copy.deepcopy(doc)
    del bad["target"]
    with pytest.raises(UserInputError, match="^comparison 2: not a sofim-tune comparison v1: top level: 'target' is a required property$"):
        write_summary([doc, bad], tmp_path)


@needs_chromium
def test_summary_renders_in_chromium(tmp_path: Path, summary: tuple[Path, list[dict]]) -> None:
    _assert_rendered(tmp_path, summary[0], ("profile",), ("SOFIM", "AdamW"))
