"""SOFIM against its baselines at an identical budget: ``compare.json``, ``compare.html`` and the
cross-problem summary (performance profiles).

``sofim-tune compare`` runs one study per optimizer and hands this module one
:class:`OptimizerResult` each. From them:

* :func:`build_comparison` makes the ``compare.json`` document (schema
  ``sofim-tune/comparison/v1``, the JSON Schema ``comparison.schema.json`` ships next to this
  module): per optimizer its recommended settings, confirmed values with mean, sample std and
  95% Student-t interval, tuning cost, and epochs to reach a shared target; and Welch's
  t-test of SOFIM (and SOFIM with a per-tensor Fisher block) against every other optimizer.
* :func:`write_comparison` / :func:`load_comparison` validate on write and on read.
* :func:`write_compare_html` writes one offline page with the verdicts in words at the top.
* :func:`performance_profile` and :func:`write_summary` compare optimizers over many
  ``compare.json`` files (Dolan–Moré performance profiles of epochs to target).

Nothing here trains or reads a study: it is all arithmetic on what the runs measured.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import plotly.graph_objects as go

from sofim_tune.errors import UserInputError
from sofim_tune.files import read_json, write_text_atomic
from sofim_tune.pages import FIGURE_HEIGHT, figure_sections, html_page
from sofim_tune.selection import headline_interval

SCHEMA_ID = "sofim-tune/comparison/v1"
TEST = "Welch's t-test"
PAIRED_TEST = "paired t-test"
#: How the verdicts of one problem are corrected for being several: Holm's step-down method.
CORRECTION = "holm"
ALPHA = 0.05
# The target every optimizer's epochs are counted to: within this much (metric units; 0.01 =
# 1 point of accuracy) of the best final mean of any optimizer on the problem.
TARGET_MARGIN = 0.01
# The SOFIM variants whose verdicts are drawn up, in this order; every other optimizer is a baseline.
SOFIM_VARIANTS = ("sofim", "sofim-tensor")

__all__ = [
    "ALPHA",
    "CORRECTION",
    "PAIRED_TEST",
    "SCHEMA_ID",
    "SOFIM_VARIANTS",
    "TARGET_MARGIN",
    "TEST",
    "OptimizerResult",
    "build_comparison",
    "display_name",
    "epochs_to_target",
    "holm",
    "paired_verdict",
    "load_comparison",
    "performance_profile",
    "performance_ratios",
    "profile_share",
    "verdict_sentences",
    "welch_verdict",
    "write_compare_html",
    "write_comparison",
    "write_summary",
]


@dataclass(frozen=True)
class OptimizerResult:
    """What one optimizer's study of a comparison produced.

    Attributes:
        optimizer: ``sofim``, ``sgd-momentum``, ``adamw``, ``sofim-tensor``, ...
        run_dir: its run folder, relative to the compare folder (``sofim``).
        hyperparameters: the recommended settings.
        values: the recommended setting's metric in its final runs, one per seed (a fraction
            in [0, 1] for ``val_accuracy``).
        curves: per final run, the metric after each epoch.
        test_accuracy: mean test accuracy over the final runs, or None.
        tuning_epochs: training epochs the search spent (pruned trials count theirs).
        tuning_seconds: wall-clock seconds during which at least one search trial ran
            (:func:`sofim_tune.tuning.wall_seconds`: overlapping trials count once).
        best_so_far: along the search, in trial order, ``(epochs spent so far, best
            completed value so far)``.
        seeds: the confirmation seed of each value. Two optimizers whose values come from the
            same seeds (and so the same splits) are compared pairwise (:func:`paired_verdict`);
            otherwise, or when unknown (empty), by :func:`welch_verdict`.
        image_hits: per final image, how many of the runs classified it right (empty when
            unknown); the interval then counts the images' share of the error
            (:func:`sofim_tune.selection.headline_interval`), as best.json's does.
    """

    optimizer: str
    run_dir: str
    hyperparameters: dict[str, float]
    values: list[float]
    curves: list[list[float]]
    test_accuracy: float | None
    tuning_epochs: int
    tuning_seconds: float
    best_so_far: list[tuple[int, float]]
    seeds: list[int] = field(default_factory=list)
    image_hits: list[int] = field(default_factory=list)


_NAMES = {"sofim": "SOFIM", "sofim-tensor": "SOFIM (per-tensor)", "sgd-momentum": "SGD-momentum",
          "sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}
_COLORS = {"sofim": "#e6007e", "sofim-tensor": "#9467bd", "sgd-momentum": "#1f77b4", "adamw": "#2ca02c"}
_PALETTE = ("#ff7f0e", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22", "#d62728")


def display_name(optimizer: str) -> str:
    """How an optimizer is named in sentences and legends: ``SOFIM``, ``SGD-momentum``, ``AdamW``."""
    return _NAMES.get(optimizer, optimizer)


def _color(optimizer: str, order: Sequence[str]) -> str:
    if optimizer in _COLORS:
        return _COLORS[optimizer]
    others = [name for name in order if name not in _COLORS]
    return _PALETTE[others.index(optimizer) % len(_PALETTE)] if optimizer in others else _PALETTE[0]


def _check_direction(direction: str) -> None:
    if direction not in ("maximize", "minimize"):
        raise UserInputError(f"direction must be 'maximize' or 'minimize', got {direction!r}")


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise UserInputError(f"{what}: every value must be a finite number, got {out}")
    return out


# --- Statistics


def welch_verdict(sofim: Sequence[float], baseline: Sequence[float], *, direction: str = "maximize",
                  alpha: float = ALPHA) -> dict[str, Any]:
    """Welch's two-sample t-test (unequal variances) of ``sofim`` against ``baseline``.

    Returns:
        ``{"test": "Welch's t-test", "alpha", "difference": mean(sofim) − mean(baseline),
        "p_value" (two-sided), "verdict"}``. The verdict is ``better`` or ``worse`` when
        ``p_value < alpha``, by the sign of the difference (a lower value is better when
        ``direction`` is ``minimize``), else ``indistinguishable``. When both sides are
        constant the test is degenerate: equal constants give p = 1, different ones p = 0.
        Nothing in the result is NaN.

    Raises:
        UserInputError: fewer than 2 values on a side, a non-finite value, a bad
            ``direction`` or ``alpha`` outside (0, 1).
    """
    from scipy import stats

    _check_test_inputs(direction, alpha)
    a = _finite(sofim, TEST)
    b = _finite(baseline, TEST)
    if len(a) < 2 or len(b) < 2:
        raise UserInputError(
            f"Welch's t-test needs at least 2 values per optimizer (one per confirmation seed), "
            f"got {len(a)} and {len(b)}; confirm with 2 or more seeds")
    difference = statistics.fmean(a) - statistics.fmean(b)
    if len(set(a)) == 1 and len(set(b)) == 1:
        # Zero variance on both sides: the t statistic is 0/0 or ±inf; say what it means.
        p_value = 1.0 if a[0] == b[0] else 0.0
        difference = a[0] - b[0]
    else:
        # scipy's Welch test (ttest_ind(equal_var=False)) from exact moments: the statistics
        # module's variance is exactly 0 for a constant side, where numpy's loses precision.
        p_value = float(stats.ttest_ind_from_stats(
            statistics.fmean(a), statistics.stdev(a), len(a),
            statistics.fmean(b), statistics.stdev(b), len(b), equal_var=False).pvalue)
    return _verdict(TEST, difference, p_value, direction, alpha)


def paired_verdict(sofim: Sequence[float], baseline: Sequence[float], *, direction: str = "maximize",
                   alpha: float = ALPHA) -> dict[str, Any]:
    """The paired t-test of ``sofim`` against ``baseline``, run ``i`` of each on the same seed and split.

    Pairing removes what a seed and a split do to both optimizers alike (an easy split lifts
    both), so it sees differences that Welch's test, blind to the pairing, would call noise.
    With the few runs a confirmation makes, Wilcoxon's signed-rank test could not reach
    p < 0.05 at all (with 5 pairs its smallest two-sided p is 0.0625), so the t-test it is.

    Returns:
        As :func:`welch_verdict`, with ``"test": "paired t-test"`` and ``difference`` the mean
        of the pairwise differences. When every difference is the same the test is
        degenerate: all 0 gives p = 1, any other constant p = 0.

    Raises:
        UserInputError: fewer than 2 pairs, sides of different lengths, a non-finite value,
            a bad ``direction`` or ``alpha`` outside (0, 1).
    """
    from scipy import stats

    _check_test_inputs(direction, alpha)
    a = _finite(sofim, PAIRED_TEST)
    b = _finite(baseline, PAIRED_TEST)
    if len(a) != len(b) or len(a) < 2:
        raise UserInputError(f"a paired t-test needs 2 or more runs on each side, as many on both; got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    difference = statistics.fmean(differences)
    if len(set(differences)) == 1:
        p_value = 1.0 if differences[0] == 0 else 0.0
        difference = differences[0]
    else:
        p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    return _verdict(PAIRED_TEST, difference, p_value, direction, alpha)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order), for a family-wise error rate.

    The i-th smallest of m p-values is multiplied by m − i + 1 (i from 1), capped at 1, and
    made no smaller than the adjusted value before it; a verdict is then significant at
    ``alpha`` when its adjusted p-value is below ``alpha``.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _check_test_inputs(direction: str, alpha: float) -> None:
    _check_direction(direction)
    if not 0 < alpha < 1:
        raise UserInputError(f"alpha must lie strictly between 0 and 1, got {alpha}")


def _verdict(test: str, difference: float, p_value: float, direction: str, alpha: float) -> dict[str, Any]:
    """The verdict on ``difference`` at ``p_value``: ``better`` or ``worse`` when p < alpha
    (by the sign of the difference and the direction), else ``indistinguishable``."""
    if not math.isfinite(p_value):  # pragma: no cover - scipy's guard against cancellation
        p_value = 1.0 if difference == 0 else 0.0
    p_value = min(max(p_value, 0.0), 1.0)
    sign = 1.0 if direction == "maximize" else -1.0
    if p_value < alpha and difference != 0:
        verdict = "better" if sign * difference > 0 else "worse"
    else:
        verdict = "indistinguishable"
    return {"test": test, "alpha": float(alpha), "difference": float(difference), "p_value": p_value, "verdict": verdict}


def _mean_curve(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max over seeds at each epoch every seed reached (the shortest curve)."""
    curves = [list(map(float, c)) for c in curves if len(c)]
    if not curves:
        return [], [], []
    length = min(len(c) for c in curves)
    columns = [[c[e] for c in curves] for e in range(length)]
    return ([statistics.fmean(col) for col in columns], [min(col) for col in columns],
            [max(col) for col in columns])


def epochs_to_target(curves: Sequence[Sequence[float]], target: float, direction: str) -> int | None:
    """The first epoch (1-based) at which the mean curve over seeds reaches ``target``.

    Reaching means ``>= target`` when maximizing, ``<= target`` when minimizing. The mean is
    taken at each epoch every seed reached, so a run that stopped early ends the mean curve.
    None when the mean curve never reaches the target (or there is no curve); a NaN epoch
    never counts as reaching it.
    """
    _check_direction(direction)
    mean, _, _ = _mean_curve(curves)
    for epoch, value in enumerate(mean, start=1):
        if (value >= target) if direction == "maximize" else (value <= target):
            return epoch
    return None


# --- compare.json


def _is_accuracy(metric: str) -> bool:
    return "accuracy" in metric


def _target(metric: str, direction: str, means: Sequence[float]) -> dict[str, Any]:
    value = max(means) - TARGET_MARGIN if direction == "maximize" else min(means) + TARGET_MARGIN
    if _is_accuracy(metric) and direction == "maximize":
        definition = "within 1 point of the best final mean accuracy of any optimizer"
    else:
        which = "highest" if direction == "maximize" else "lowest"
        definition = f"within {TARGET_MARGIN:g} of the best ({which}) final mean {metric} of any optimizer"
    return {"definition": definition, "value": value}


def _subjects(names: Sequence[str]) -> list[tuple[str, str]]:
    """(optimizer, against) pairs: each SOFIM variant against every baseline, then the
    per-tensor variant against plain SOFIM."""
    variants = [v for v in SOFIM_VARIANTS if v in names]
    baselines = [n for n in names if n not in SOFIM_VARIANTS]
    pairs = [(v, b) for v in variants for b in baselines]
    if len(variants) == 2:
        pairs.append((variants[1], variants[0]))
    return pairs


def build_comparison(dataset: str, arch: str, metric: str, direction: str,
                     results: Sequence[OptimizerResult], *, budget: Mapping[str, Any]) -> dict[str, Any]:
    """The ``compare.json`` document (schema :data:`SCHEMA_ID`) of one problem.

    Args:
        budget: what every optimizer's study was given (trials, epochs, sampler, pruner,
            confirmation seeds, ...); stored as is.
        results: one per optimizer, names unique, each with at least 2 confirmed values.

    The target is :data:`TARGET_MARGIN` from the best confirmed (final) mean of any
    optimizer; each optimizer's ``epochs_to_target`` is :func:`epochs_to_target` of its
    confirmed curves. Verdicts: ``sofim`` and ``sofim-tensor`` (those present) each against
    every other optimizer, then ``sofim-tensor`` against ``sofim``.

    Raises:
        UserInputError: fewer than 2 optimizers, a repeated name, fewer than 2 confirmed
            values for one, or a non-finite number.
    """
    _check_direction(direction)
    names = [r.optimizer for r in results]
    if len(names) < 2:
        raise UserInputError(f"a comparison needs at least 2 optimizers, got {len(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserInputError(f"each optimizer may appear once in a comparison; repeated: {', '.join(repeated)}")
    by_name = {r.optimizer: r for r in results}
    for r in results:
        if len(r.values) < 2:
            raise UserInputError(
                f"{r.optimizer}: a comparison needs at least 2 confirmed values (confirmation "
                f"seeds), got {len(r.values)}")
        _finite(r.values, r.optimizer)
    means = {r.optimizer: statistics.fmean(r.values) for r in results}
    target = _target(metric, direction, list(means.values()))
    optimizers = {}
    for r in results:
        values = [float(v) for v in r.values]
        low, high = headline_interval(values, r.image_hits)
        optimizers[r.optimizer] = {
            "run_dir": str(r.run_dir),
            "hyperparameters": {k: float(v) for k, v in r.hyperparameters.items()},
            "confirmed": {"values": values, "mean": means[r.optimizer],
                          "std": statistics.stdev(values), "ci95": [low, high]},
            "test_accuracy": None if r.test_accuracy is None else float(r.test_accuracy),
            "tuning": {"epochs": int(r.tuning_epochs), "seconds": float(r.tuning_seconds), "seconds_are": "wall"},
            "epochs_to_target": epochs_to_target(r.curves, target["value"], direction),
        }
    verdicts = []
    for subject, against in _subjects(names):
        mine, theirs = by_name[subject], by_name[against]
        paired = bool(mine.seeds) and mine.seeds == theirs.seeds
        test = paired_verdict if paired else welch_verdict
        verdicts.append({"optimizer": subject, "against": against, **test(mine.values, theirs.values, direction=direction)})
    for verdict, adjusted in zip(verdicts, holm([v["p_value"] for v in verdicts])):
        corrected = _verdict(verdict["test"], verdict["difference"], adjusted, direction, verdict["alpha"])
        verdict.update(correction=CORRECTION, p_adjusted=corrected["p_value"], verdict=corrected["verdict"])
    return {
        "schema": SCHEMA_ID,
        "dataset": dataset,
        "arch": arch,
        "metric": metric,
        "direction": direction,
        "budget": dict(budget),
        "target": target,
        "optimizers": optimizers,
        "verdicts": verdicts,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    text = importlib.resources.files("sofim_tune").joinpath("comparison.schema.json").read_text()
    schema = json.loads(text)
    return jsonschema.validators.validator_for(schema)(schema)


def _non_finite(data: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinite number in ``data``, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "top level"
    if isinstance(data, Mapping):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _problem(data: Any) -> str | None:
    """What is wrong with ``data`` as a v1 comparison, in a few words, or None."""
    if isinstance(data, Mapping) and "schema" in data and data["schema"] != SCHEMA_ID:
        # Checked first so that a newer or foreign file says so, not "extra field X".
        return f"schema is {data['schema']!r}, expected {SCHEMA_ID!r}"
    where = _non_finite(data)
    if where is not None:
        return f"{where}: NaN or infinity is not a number JSON can hold"
    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        return f"{where}: {error.message}"
    for i, verdict in enumerate(data["verdicts"]):
        for key in ("optimizer", "against"):
            if verdict[key] not in data["optimizers"]:
                return f"verdicts/{i}/{key}: {verdict[key]!r} is not one of the optimizers"
    return None


def _validate(data: Any, source: str) -> None:
    """Raise a one-line UserInputError naming the most relevant problem."""
    what = _problem(data)
    if what is None:
        return
    # Messages can quote a whole sub-document; the CLI prints exactly one short line.
    what = " ".join(what.split())
    raise UserInputError(f"{source}: not a sofim-tune comparison v1: {what[:300]}")


def write_comparison(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Validate ``doc`` against the schema and write it to ``path`` atomically.

    Raises:
        UserInputError: ``doc`` breaks the schema (NaN included), or ``path`` cannot be written.
    """
    _validate(doc, str(path))
    try:
        # allow_nan=False: NaN and Infinity are not JSON; _validate has refused them already.
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:  # a budget holding a Path, a set, ...
        raise UserInputError(f"{path}: not a sofim-tune comparison v1: {' '.join(str(e).split())[:300]}") from None
    return write_text_atomic(path, text)


def load_comparison(path: str | Path) -> dict[str, Any]:
    """Read a ``compare.json`` (data only, nothing is executed) and validate it.

    Raises:
        UserInputError: ``"<path>: not a sofim-tune comparison v1: <what>"`` for a missing
            or unreadable file, invalid JSON (NaN and Infinity included), a wrong schema id,
            or missing or malformed fields.
    """
    data = read_json(path, f"{path}: not a sofim-tune comparison v1")
    _validate(data, str(path))
    return data


# --- In words


def _value_text(value: float, metric: str, decimals: int = 1) -> str:
    """Accuracy as a percentage (``98.6%``), any other metric to 4 significant digits."""
    return f"{100 * value:.{decimals}f}%" if _is_accuracy(metric) else f"{value:.4g}"


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _p_text_of(verdict: Mapping[str, Any]) -> str:
    """The p-value a verdict was decided on: Holm-adjusted where the document has it (documents from before paired verdicts do not)."""
    if "p_adjusted" in verdict:
        return f"Holm-adjusted {_p_text(verdict['p_adjusted'])}"
    return _p_text(verdict["p_value"])


def verdict_sentences(doc: Mapping[str, Any]) -> list[str]:
    """Each verdict of a comparison as one plain sentence, in the document's order.

    ``"SOFIM is better than SGD-momentum here: 98.6% against 97.9% (Welch's t-test,
    p = 0.01, 5 seeds each)."``; ``indistinguishable from ... at 95%`` or ``worse than``.
    """
    metric = doc["metric"]
    sentences = []
    for v in doc["verdicts"]:
        mine, theirs = doc["optimizers"][v["optimizer"]], doc["optimizers"][v["against"]]
        who, other = display_name(v["optimizer"]), display_name(v["against"])
        if v["verdict"] == "better":
            claim = f"is better than {other}"
        elif v["verdict"] == "worse":
            claim = f"is worse than {other}"
        else:
            claim = f"is indistinguishable from {other} at {100 * (1 - v['alpha']):.3g}%"
        n, m = len(mine["confirmed"]["values"]), len(theirs["confirmed"]["values"])
        seeds = f"{n} seeds each" if n == m else f"{n} and {m} seeds"
        sentences.append(
            f"{who} {claim} here: {_value_text(mine['confirmed']['mean'], metric)} against "
            f"{_value_text(theirs['confirmed']['mean'], metric)} ({v['test']}, {_p_text_of(v)}, {seeds}).")
    return sentences


# --- compare.html

_PAGE_STYLE = """.verdicts li { margin: 0.3em 0; }
.better { color: #1a7f37; } .worse { color: #b3261e; }
td, th { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }"""


def _page(title: str, head: str, figures: Mapping[str, tuple[go.Figure, str]]) -> str:
    return html_page(title, head + "\n" + figure_sections((name, fig, explain) for name, (fig, explain) in figures.items()), style=_PAGE_STYLE)


def _accuracy_axis(metric: str) -> dict[str, Any]:
    return {"title": {"text": metric}, **({"tickformat": ".1%"} if _is_accuracy(metric) else {})}


def _curves_figure(doc: Mapping[str, Any], results: Sequence[OptimizerResult]) -> go.Figure:
    order = list(doc["optimizers"])
    fig = go.Figure()
    for r in results:
        mean, low, high = _mean_curve(r.curves)
        if not mean:
            continue
        epochs = list(range(1, len(mean) + 1))
        color = _color(r.optimizer, order)
        name = display_name(r.optimizer)
        fig.add_trace(go.Scatter(
            x=epochs + epochs[::-1], y=high + low[::-1], fill="toself", fillcolor=color,
            opacity=0.2, line={"width": 0}, hoverinfo="skip", legendgroup=r.optimizer,
            showlegend=False, name=f"{name} min–max"))
        fig.add_trace(go.Scatter(
            x=epochs, y=mean, mode="lines+markers", line={"color": color, "width": 2},
            marker={"size": 4}, legendgroup=r.optimizer,
            name=f"{name} (mean of {len([c for c in r.curves if len(c)])} seeds)"))
    fig.add_hline(y=doc["target"]["value"], line={"dash": "dash", "color": "#555", "width": 1},
                  annotation_text="target", annotation_position="bottom right")
    fig.update_layout(title="Confirmed learning curves: mean over seeds, band = min–max over seeds",
                      xaxis_title="epoch", yaxis=_accuracy_axis(doc["metric"]))
    return fig


def _final_figure(doc: Mapping[str, Any]) -> go.Figure:
    order = list(doc["optimizers"])
    fig = go.Figure()
    for name, entry in doc["optimizers"].items():
        confirmed = entry["confirmed"]
        low, high = confirmed["ci95"]
        color = _color(name, order)
        label = display_name(name)
        fig.add_trace(go.Scatter(
            x=[label] * len(confirmed["values"]), y=confirmed["values"], mode="markers",
            marker={"color": color, "size": 6, "opacity": 0.45}, showlegend=False,
            name=f"{label} seeds", hovertemplate="%{y:.4g}<extra>one seed</extra>"))
        fig.add_trace(go.Scatter(
            x=[label], y=[confirmed["mean"]], mode="markers", name=label,
            marker={"color": color, "size": 12, "symbol": "diamond"},
            error_y={"type": "data", "symmetric": False, "array": [high - confirmed["mean"]],
                     "arrayminus": [confirmed["mean"] - low], "thickness": 2, "width": 10},
            hovertemplate=f"mean %{{y:.4g}}<br>95% interval {low:.4g} to {high:.4g}<extra>{html.escape(label)}</extra>"))
    fig.update_layout(title="Final confirmed value: mean with its 95% Student-t interval; dots are single seeds",
                      yaxis=_accuracy_axis(doc["metric"]), showlegend=False)
    return fig


def _tuning_figure(doc: Mapping[str, Any], results: Sequence[OptimizerResult]) -> go.Figure:
    order = list(doc["optimizers"])
    fig = go.Figure()
    for r in results:
        if not r.best_so_far:
            continue
        x = [int(e) for e, _ in r.best_so_far]
        y = [float(v) for _, v in r.best_so_far]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", line={"shape": "hv", "color": _color(r.optimizer, order), "width": 2},
            marker={"size": 3}, name=display_name(r.optimizer)))
    if not fig.data:
        fig.add_annotation(text="no completed search trial recorded", xref="paper", yref="paper",
                           x=0.5, y=0.5, showarrow=False, font={"size": 14})
    fig.update_layout(title="Tuning: best completed value so far against training epochs spent",
                      xaxis_title="training epochs spent by the search (pruned trials included)",
                      yaxis=_accuracy_axis(doc["metric"]))
    return fig


def _budget_text(budget: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{html.escape(str(k))} {html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}"
                      for k, v in budget.items())
    return shown or "not recorded"


_WALL_SECONDS = ("Tuning wall seconds: the wall-clock time during which at least one of the search's trials ran. "
                 "Trials that overlap (parallel workers, batched trials) count once; pauses between resumed runs not at all.")


def _optimizer_table(doc: Mapping[str, Any]) -> str:
    metric = doc["metric"]
    rows = []
    for name, e in doc["optimizers"].items():
        c = e["confirmed"]
        settings = ", ".join(f"{html.escape(k)} = {v:.4g}" for k, v in e["hyperparameters"].items())
        rows.append(
            f"<tr><td>{html.escape(display_name(name))}</td><td>{settings}</td>"
            f"<td class=\"n\">{_value_text(c['mean'], metric, 2)} ± {_value_text(c['std'], metric, 2)}</td>"
            f"<td class=\"n\">{_value_text(c['ci95'][0], metric, 2)} to {_value_text(c['ci95'][1], metric, 2)}</td>"
            f"<td class=\"n\">{'—' if e['test_accuracy'] is None else _value_text(e['test_accuracy'], 'accuracy', 2)}</td>"
            f"<td class=\"n\">{'never' if e['epochs_to_target'] is None else e['epochs_to_target']}</td>"
            f"<td class=\"n\">{e['tuning']['epochs']}</td><td class=\"n\">{e['tuning']['seconds']:.0f}</td>"
            f"<td>{html.escape(e['run_dir'])}</td></tr>")
    return ("<table><tr><th>optimizer</th><th>recommended settings</th><th>confirmed mean ± std</th>"
            "<th>95% interval</th><th>test accuracy</th><th>epochs to target</th>"
            "<th>tuning epochs</th><th>tuning wall seconds</th><th>run folder</th></tr>"
            + "".join(rows) + "</table>")


def _verdict_list(doc: Mapping[str, Any]) -> str:
    items = [f'<li class="{v["verdict"]}">{html.escape(s)}</li>'
             for v, s in zip(doc["verdicts"], verdict_sentences(doc))]
    if not items:
        return "<p>No SOFIM variant in this comparison: no verdicts.</p>"
    return '<ul class="verdicts">' + "".join(items) + "</ul>"


def write_compare_html(doc: Mapping[str, Any], results: Sequence[OptimizerResult], out_dir: str | Path) -> Path:
    """Write ``out_dir/compare.html``: one self-contained page, viewable offline.

    At the top the verdicts in plain words, the budget, the target and a table of every
    optimizer; then three figures (plotly.js embedded once): ``fig-curves`` (confirmed
    learning curves, mean over seeds with a min–max band), ``fig-final`` (final confirmed
    value with its 95% interval and the single seeds) and ``fig-tuning`` (best value so far
    against epochs spent by the search, step lines).

    Raises:
        UserInputError: ``doc`` is not a valid comparison, or ``out_dir`` cannot be written.
    """
    _validate(doc, "comparison")
    seeds = {len(e["confirmed"]["values"]) for e in doc["optimizers"].values()}
    seeds_text = f"{seeds.pop()} confirmation seeds per optimizer" if len(seeds) == 1 else "confirmation seeds per optimizer as in the table"
    head = (
        f"<h1>{html.escape(doc['dataset'])} × {html.escape(doc['arch'])}: "
        f"{html.escape(', '.join(display_name(n) for n in doc['optimizers']))} at an identical budget</h1>"
        f"{_verdict_list(doc)}"
        f"<p class=\"small\">Verdicts: a paired t-test where the optimizers' runs share seeds and splits, "
        f"else {TEST} (unequal variances), two-sided, on the confirmed "
        f"{html.escape(doc['metric'])} of the recommended settings, {seeds_text}; "
        f"better or worse when p &lt; {doc['verdicts'][0]['alpha'] if doc['verdicts'] else ALPHA:g}, "
        f"with Holm's correction across this page's verdicts.</p>"
        f"<p class=\"small\">Budget per optimizer: {_budget_text(doc['budget'])}.<br>"
        f"Target: {html.escape(doc['target']['definition'])} = "
        f"{_value_text(doc['target']['value'], doc['metric'])}.</p>"
        f"{_optimizer_table(doc)}"
        f"<p class=\"small\">{_WALL_SECONDS}</p>"
    )
    figures = {
        "curves": (_curves_figure(doc, results),
                   "Metric after each epoch of the confirmation runs of each optimizer's recommended settings: "
                   "the line is the mean over seeds, the shaded band spans the lowest to the highest seed "
                   "(min–max). Dashed: the target."),
        "final": (_final_figure(doc),
                  "Final confirmed value per optimizer: diamond = mean over seeds, error bar = 95% Student-t "
                  "interval of the mean, dots = single seeds."),
        "tuning": (_tuning_figure(doc, results),
                   "How fast each search found its best: the best completed trial so far, against the training "
                   "epochs the search had spent by then (pruned trials count the epochs they ran)."),
    }
    page = _page(f"sofim-tune compare: {doc['dataset']} × {doc['arch']}", head, figures)
    return write_text_atomic(Path(out_dir) / "compare.html", page)


# --- Across problems


def _problem_label(doc: Mapping[str, Any]) -> str:
    return f"{doc['dataset']} × {doc['arch']}"


def performance_ratios(docs: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Dolan–Moré performance ratios of epochs to target: per optimizer, one per problem.

    For problem p (one comparison) and optimizer s the cost is t_ps = epochs to target
    (never, or absent from the comparison: infinity) and the ratio r_ps = t_ps / min_s t_ps;
    on a problem no optimizer solved every ratio is infinity. Optimizers in order of first
    appearance.
    """
    if not docs:
        raise UserInputError("a performance profile needs at least one comparison")
    names = list(dict.fromkeys(n for doc in docs for n in doc["optimizers"]))
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for doc in docs:
        costs = {}
        for n in names:
            entry = doc["optimizers"].get(n)
            t = None if entry is None else entry["epochs_to_target"]
            costs[n] = math.inf if t is None else float(t)
        best = min(costs.values())
        for n in names:
            ratios[n].append(costs[n] / best if math.isfinite(best) else math.inf)
    return ratios


def profile_share(ratios: Sequence[float], tau: float) -> float:
    """ρ(τ): the share of problems whose ratio is at most ``tau``."""
    return sum(r <= tau for r in ratios) / len(ratios)


def _log2_ticks(tau_max: float) -> tuple[list[float], list[str]]:
    ticks, t = [], 1.0
    while t <= tau_max * 1.0001:
        ticks.append(t)
        t *= 2
    return ticks, [f"{v:g}" for v in ticks]


def performance_profile(docs: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Dolan–Moré performance profiles of epochs to target over the problems in ``docs``.

    One step line per optimizer: ρ_s(τ), the share of problems on which optimizer s reached
    the target within τ times the epochs of the fastest optimizer there, for τ from 1 to
    twice the largest finite ratio, on a log2 axis. ρ_s(1) is the share of problems on which
    s was (one of) the fastest; the height at the right end, the share it solved at all.
    """
    ratios = performance_ratios(docs)
    finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
    tau_max = 2 * max(finite, default=1.0)
    order = list(ratios)
    fig = go.Figure()
    for name, rs in ratios.items():
        taus = sorted({1.0, tau_max, *(r for r in rs if math.isfinite(r) and r <= tau_max)})
        fig.add_trace(go.Scatter(
            x=taus, y=[profile_share(rs, t) for t in taus], mode="lines", name=display_name(name),
            line={"shape": "hv", "color": _color(name, order), "width": 2.5},
            hovertemplate="τ = %{x:.3g}: %{y:.0%} of problems<extra>" + html.escape(display_name(name)) + "</extra>"))
    tickvals, ticktext = _log2_ticks(tau_max)
    fig.update_layout(
        title=f"Performance profiles: epochs to target over {len(docs)} problem{'s' * (len(docs) != 1)}",
        xaxis={"type": "log", "title": {"text": "τ (epochs to target ÷ the fastest optimizer's), log2 scale"},
               "tickvals": tickvals, "ticktext": ticktext, "range": [0, math.log10(tau_max)]},
        yaxis={"title": {"text": "share of problems within τ"}, "range": [-0.02, 1.02], "tickformat": ".0%"},
        height=FIGURE_HEIGHT)
    return fig


def write_summary(docs: Sequence[Mapping[str, Any]], out_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``out_dir/compare-summary.html`` over many comparisons and return its verdict rows.

    The page holds the performance profiles (``fig-profile``), the epochs to target per
    problem and optimizer, and a table of every verdict per (dataset, arch).

    Returns:
        The page's path and the rows ``{"dataset", "arch", "optimizer", "against",
        "verdict", "p_value"}``, in the order of ``docs`` and their verdicts.

    Raises:
        UserInputError: no comparison, an invalid one, or ``out_dir`` cannot be written.
    """
    if not docs:
        raise UserInputError("a summary needs at least one comparison (compare.json)")
    for i, doc in enumerate(docs):
        _validate(doc, f"comparison {i + 1}")
    rows = [
        {"dataset": doc["dataset"], "arch": doc["arch"], "optimizer": v["optimizer"],
         "against": v["against"], "verdict": v["verdict"], "p_value": v["p_value"]}
        for doc in docs for v in doc["verdicts"]
    ]
    names = list(dict.fromkeys(n for doc in docs for n in doc["optimizers"]))
    cost_rows = "".join(
        f"<tr><td>{html.escape(_problem_label(doc))}</td><td class=\"n\">{_value_text(doc['target']['value'], doc['metric'], 2)}</td>"
        + "".join(
            "<td class=\"n\">—</td>" if n not in doc["optimizers"] else
            f"<td class=\"n\">{'never' if doc['optimizers'][n]['epochs_to_target'] is None else doc['optimizers'][n]['epochs_to_target']}</td>"
            for n in names)
        + "</tr>" for doc in docs)
    costs = ("<table><tr><th>problem</th><th>target</th>"
             + "".join(f"<th>{html.escape(display_name(n))}</th>" for n in names) + "</tr>" + cost_rows + "</table>")
    verdict_rows = "".join(
        f'<tr><td>{html.escape(r["dataset"])}</td><td>{html.escape(r["arch"])}</td>'
        f'<td>{html.escape(display_name(r["optimizer"]))}</td><td>{html.escape(display_name(r["against"]))}</td>'
        f'<td class="{r["verdict"]}">{r["verdict"]}</td><td class="n">{html.escape(_p_text(r.get("p_adjusted", r["p_value"])).removeprefix("p = ").removeprefix("p "))}</td></tr>'
        for r in rows)
    tally = {k: sum(r["verdict"] == k for r in rows) for k in ("better", "indistinguishable", "worse")}
    head = (
        f"<h1>SOFIM against its baselines over {len(docs)} problem{'s' * (len(docs) != 1)}</h1>"
        f"<p>Verdicts (paired t-test or {TEST}, Holm-corrected per problem): {tally['better']} better, {tally['indistinguishable']} "
        f"indistinguishable, {tally['worse']} worse.</p>"
        "<table><tr><th>dataset</th><th>arch</th><th>optimizer</th><th>against</th><th>verdict</th>"
        f"<th>p</th></tr>{verdict_rows}</table>"
        f"<section><h2>Epochs to target</h2><p class=\"small\">Per problem, the first epoch at which "
        f"the mean confirmed curve reached the target (within {TARGET_MARGIN:g} of the best final mean "
        f"of any optimizer there); never: not within the epochs trained; —: not compared there, which the "
        f"profile counts as never.</p>{costs}</section>"
    )
    figures = {"profile": (
        performance_profile(docs),
        "Dolan–Moré performance profile: for each optimizer, the share of problems on which it reached "
        "the target within τ times the epochs the fastest optimizer needed there. At τ = 1: how often it "
        "was the fastest; at the right end: how often it reached the target at all. Higher is better.")}
    page = _page("sofim-tune compare: summary", head, figures)
    return write_text_atomic(Path(out_dir) / "compare-summary.html", page), rows
