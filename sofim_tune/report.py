"""The sensitivity report: one self-contained HTML page (viewable offline) plus one file per figure.

Reads a study only through :class:`~sofim_tune.records.StudyRecord`. Figures are plotly;
``report.html`` embeds plotly.js once and each figure as compact JSON (numeric arrays are
base64-encoded by plotly, and trials of one kind share one trace), so the page stays a few
MB with hundreds of trials.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.offline
from plotly.subplots import make_subplots
from scipy.interpolate import griddata
from scipy.spatial import QhullError

from sofim_tune.errors import UserInputError
from sofim_tune.files import read_head
from sofim_tune.pages import FIGURE_HEIGHT, figure_page, figure_sections, html_page, is_our_page
from sofim_tune.records import StudyRecord, TrialRecord
from sofim_tune.recommend import (
    ConfirmSummary,
    Recommendation,
    build_recommendation,
    param_importances,
    redact_storage_url,
    write_text_atomic,
)
from sofim_tune.selection import regime

__all__ = ["FIGURES", "PNG_NEEDS_CHROME", "Report", "build_figures", "foreign_report_files", "refuse_symlinked_folder", "report_files", "write_report"]

FIGURES = ("history", "importance", "slices", "contour", "regime", "parallel", "curves", "confirmation")

PNG_NEEDS_CHROME = (
    "PNG export needs Chrome or Chromium; install it (e.g. apt-get install chromium) "
    "or omit --png"
)

_WIDTH = 1100  # px, PNG export
_PLOT_PX = (850, 300)  # px, about the plot area inside a figure (width, height), for tick density
_GRID = 80  # contour interpolation grid points per axis
_DIAGONAL_DECADES = (-2, -1, 0, 1, 2)  # lr/rho diagonals drawn, in decades around the recommended

# Trial kinds, drawn in this order (best on top) with these styles.
_STYLE = {
    "pruned": {"color": "#9e9e9e", "dash": "dash", "width": 1.0, "opacity": 0.6},
    "diverged": {"color": "#d62728", "dash": "dot", "width": 1.0, "opacity": 0.6},
    "running": {"color": "#17becf", "dash": "dot", "width": 1.0, "opacity": 0.8},
    "completed": {"color": "#1f77b4", "dash": "solid", "width": 1.2, "opacity": 0.7},
}
_BEST_COLOR = "#ff7f0e"
_RECOMMENDED_COLOR = "#e6007e"  # magenta: stands out on viridis and on the regime scale
_NO_RATIO_COLOR = "#bdbdbd"
# Trials that stopped early, where they are drawn as points: the history's style.
_STOPPED_MARKER = {
    "pruned": {"color": _STYLE["pruned"]["color"], "symbol": "circle-open", "size": 7},
    "diverged": {"color": _STYLE["diverged"]["color"], "symbol": "x", "size": 7},
}
# log10 ‖m̂‖²/ρ: below -1 SOFIM steps like SGD, above 1 its step is normalised (selection.regime).
_RATIO_RANGE = (-3.0, 3.0)
_RATIO_SCALE = [[0.0, "#053061"], [1 / 3, "#4393c3"], [0.5, "#9970ab"], [2 / 3, "#d6604d"],
                [1.0, "#67001f"]]
_RATIO_TITLE = "log10 ‖m̂‖²/ρ<br>< −1 SGD-like, > 1 normalised step"
# Tick labels a log axis may carry, per pixel of axis length (a label is ~6 characters).
_PX_PER_LABEL_X = 75
_PX_PER_LABEL_Y = 30
_LOG_MANTISSAS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1, 3), (1,))

_EXPLAIN = {
    "history": "Metric of every trial in the order they ran; the line is the best so far.",
    "importance": (
        "Share of each hyperparameter in reaching the top trials (PED-ANOVA). Per "
        "hyperparameter only: on SOFIM's lr/rho diagonal, the ratio can matter more than "
        "lr or rho alone."
    ),
    "slices": (
        "Metric against each hyperparameter: completed trials colored by trial number, "
        "pruned and diverged ones at the last value they reported."
    ),
    "contour": (
        "Metric over the (lr, rho) plane, interpolated between completed trials (dots). "
        "Star: the best single trial; ring: the recommended setting (chosen on fresh seeds). "
        "Dashed lines: lr/rho = const. While the squared momentum norm is small against rho, "
        "only lr/rho matters, so good settings lie along one of these diagonals."
    ),
    "regime": (
        "Where SOFIM's curvature term matters: each finished trial colored by log10 of its median "
        "‖m̂‖²/ρ. Blue (< −1): ‖m̂‖² ≪ ρ, the step is SGD's with learning rate lr/rho and only "
        "the ratio matters. Red (> 1): ‖m̂‖² ≫ ρ, the step is normalised to about lr/‖m̂‖ and "
        "rho barely matters. Grey: not recorded."
    ),
    "parallel": (
        "Every completed trial as a line through its hyperparameters and metric "
        "(log-scale hyperparameters on log axes)."
    ),
    "curves": (
        "Metric per epoch. Completed trials in color, pruned ones grey and dashed, "
        "diverged ones red with a cross where they diverged."
    ),
    "confirmation": (
        "The top configurations retrained with fresh seeds to choose among them (#1, #2, ...), "
        "then the chosen one's final runs on images no earlier run scored: mean ± std over "
        "seeds, single runs as small dots."
    ),
}


def _fmt(value: float) -> str:
    """Numbers in the report: 4 significant digits (0.003799, 0.7218)."""
    return f"{value:.4g}"


def _kind(trial: TrialRecord) -> str:
    if trial.state == "complete":
        return "completed"
    return "diverged" if trial.diverged else trial.state


def _hyperparameters(study: StudyRecord) -> list[str]:
    """Every hyperparameter any trial set, in order of first appearance."""
    return list(dict.fromkeys(name for t in study.trials for name in t.params))


def _coloraxis(study: StudyRecord) -> dict:
    # Reversed when minimizing, so that yellow always means good.
    return {
        "colorscale": "Viridis",
        "reversescale": study.direction == "minimize",
        "colorbar": {"title": {"text": study.metric}},
    }


def _tick_text(value: float) -> str:
    """A whole number as a tick label: 0.05, 0.0002, 10, 1e-5 (never a bare mantissa)."""
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def _log_ticks(values: Iterable[float], max_labels: int) -> tuple[list[float], list[float]]:
    """Labelled and unlabelled tick positions (data units) for a log axis over ``values``.

    Labels fall on 1-9, 1-2-5, 1-3 or 1 times each power of ten, the densest of these with
    at most ``max_labels`` labels on the visible range; with too many decades even for
    that, every second (third, ...) decade. The remaining 1-9 multiples become minor ticks.
    """
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    if not logs:
        return [], []
    low, high = min(logs), max(logs)
    # Plotly pads the range around markers: ticks a little outside the data still show.
    pad = 0.08 * max(high - low, 0.5)
    decades = range(math.floor(low - pad), math.ceil(high + pad) + 1)

    def visible(ticks: list[float]) -> list[float]:
        return [t for t in ticks if low - pad <= math.log10(t) <= high + pad]

    everything = [float(f"{m}e{k}") for k in decades for m in range(1, 10)]
    max_labels = max(max_labels, 2)
    labelled = None
    for mantissas in _LOG_MANTISSAS:
        ticks = [float(f"{m}e{k}") for k in decades for m in mantissas]
        if len(visible(ticks)) <= max_labels:
            labelled = ticks
            break
    if labelled is None:
        shown = len(visible([float(f"1e{k}") for k in decades]))
        step = math.ceil(shown / max_labels)
        # Every step-th decade, starting where the most of them land on the visible range.
        labelled = max(([float(f"1e{k}") for k in decades if k % step == r] for r in range(step)),
                       key=lambda ticks: len(visible(ticks)))
    if len(visible(labelled)) < 2:
        # Less than a decade between 1-9 multiples: round numbers in between, linearly.
        labelled = _linear_ticks(10**low, 10**high, max_labels)
    return labelled, [t for t in everything if t not in labelled]


def _linear_ticks(low: float, high: float, count: int) -> list[float]:
    """About ``count`` round numbers (1, 2 or 5 times a power of ten apart) over [low, high]."""
    raw = (high - low) / max(count, 1) or abs(high) or 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step)
    return [float(f"{i * step:.12g}") for i in range(first, first + count + 3) if i * step > 0]


def _axis(study: StudyRecord, name: str, values: Iterable[float], length_px: float,
          px_per_label: int) -> dict:
    """Axis settings for hyperparameter ``name``: log axes get full-number labels only.

    Plotly's own log ticks label minor ticks with a bare digit ("5  0.1  2"), so that
    0.05 reads as 5; here every label is the whole number and minor ticks are unlabelled.
    """
    if name not in study.log_params:
        return {"type": "linear"}
    labelled, minor = _log_ticks(values, int(length_px // px_per_label))
    return {
        "type": "log", "tickmode": "array", "tickvals": labelled,
        "ticktext": [_tick_text(t) for t in labelled],
        "minor": {"tickmode": "array", "tickvals": minor, "ticks": "outside", "ticklen": 3,
                  "showgrid": False},
    }


def _history(study: StudyRecord) -> go.Figure:
    fig = go.Figure()
    for kind in ("pruned", "diverged"):
        stopped = [t for t in study.trials if _kind(t) == kind and t.intermediate]
        fig.add_scatter(
            x=[t.number for t in stopped],
            y=[t.intermediate[max(t.intermediate)] for t in stopped],
            mode="markers",
            name=f"{kind} (last reported)",
            marker={"color": _STYLE[kind]["color"],
                    "symbol": "x" if kind == "diverged" else "circle-open"},
        )
    completed = sorted(study.completed(), key=lambda t: t.number)
    values = np.array([t.value for t in completed])
    accumulate = np.maximum if study.direction == "maximize" else np.minimum
    fig.add_scatter(x=[t.number for t in completed], y=values, mode="markers",
                    name="completed", marker={"color": _STYLE["completed"]["color"]})
    fig.add_scatter(x=[t.number for t in completed],
                    y=accumulate.accumulate(values),
                    mode="lines", line={"shape": "hv", "color": _BEST_COLOR}, name="best so far")
    fig.update_layout(title="Optimization history", xaxis_title="trial",
                      yaxis_title=study.metric)
    return fig


def _importance(study: StudyRecord, rec: Recommendation | None) -> go.Figure:
    shares = rec.sensitivity.importance if rec is not None else param_importances(study)
    ranked = sorted(shares.items(), key=lambda kv: kv[1])  # plotly draws bars bottom-up
    fig = go.Figure(go.Bar(x=[v for _, v in ranked], y=[k for k, _ in ranked],
                           orientation="h", text=[f"{v:.2f}" for _, v in ranked]))
    if not shares:
        _note(fig, "Importance needs at least 2 completed trials.")
    fig.update_layout(title="Hyperparameter importance", xaxis_title="share (sums to 1)",
                      xaxis_range=[0, 1])
    return fig


def _last_value(trial: TrialRecord) -> float | None:
    """The last finite metric value a trial reported, or None."""
    for epoch in sorted(trial.intermediate, reverse=True):
        value = trial.intermediate[epoch]
        if value is not None and math.isfinite(value):
            return value
    return None


def _stopped(study: StudyRecord, kind: str) -> list[tuple[TrialRecord, float]]:
    """Trials of ``kind`` (pruned or diverged) that reported a value, with their last one."""
    found = [(t, _last_value(t)) for t in study.trials if _kind(t) == kind]
    return [(t, value) for t, value in found if value is not None]


def _slices(study: StudyRecord) -> go.Figure:
    names = _hyperparameters(study)
    completed = study.completed()
    stopped = {kind: _stopped(study, kind) for kind in ("pruned", "diverged")}
    fig = make_subplots(rows=1, cols=max(1, len(names)), shared_yaxes=True,
                        subplot_titles=names, horizontal_spacing=0.04)
    width = _PLOT_PX[0] / max(1, len(names))
    for col, name in enumerate(names, start=1):
        # Stopped trials first, so that completed ones are drawn on top of them.
        for kind, found in stopped.items():
            found = [(t, v) for t, v in found if name in t.params]
            fig.add_scatter(
                x=[t.params[name] for t, _ in found], y=[v for _, v in found], mode="markers",
                name=f"{kind} (last value)", legendgroup=kind, showlegend=col == 1,
                customdata=[t.number for t, _ in found], marker=_STOPPED_MARKER[kind],
                hovertemplate=f"trial %{{customdata}}, {kind}<br>{name} = %{{x:.4g}}"
                "<br>last value %{y:.4f}<extra></extra>",
                row=1, col=col,
            )
        trials = [t for t in completed if name in t.params]
        fig.add_scatter(
            x=[t.params[name] for t in trials], y=[t.value for t in trials],
            mode="markers", name="completed", legendgroup="completed", showlegend=col == 1,
            customdata=[t.number for t in trials],
            hovertemplate=f"trial %{{customdata}}<br>{name} = %{{x:.4g}}<br>%{{y:.4f}}<extra></extra>",
            marker={"color": [t.number for t in trials], "coloraxis": "coloraxis", "size": 6},
            row=1, col=col,
        )
        drawn = [t.params[name] for t in study.trials if name in t.params and t.state != "failed"]
        fig.update_xaxes(title_text=name, row=1, col=col,
                         **_axis(study, name, drawn, width, _PX_PER_LABEL_X))
    fig.update_yaxes(title_text=study.metric, row=1, col=1)
    # Light blue to dark, never white: early trials must stay visible. The legend goes
    # above the plots: on the right it would cover the colorbar.
    fig.update_layout(title="Slices", coloraxis={"colorscale": [[0, "#9ecae1"], [1, "#08306b"]],
                                                 "colorbar": {"title": {"text": "trial"}}},
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.08,
                              "yanchor": "bottom"})
    return fig


def _diagonals(lr: np.ndarray, rho: np.ndarray, anchor: float) -> list[float]:
    """Ratios lr/rho to draw: ``anchor`` and whole decades around it, inside the data."""
    ratios = lr / rho
    candidates = (anchor * 10.0**k for k in _DIAGONAL_DECADES)
    return [c for c in candidates if ratios.min() * 0.999 <= c <= ratios.max() * 1.001]


def _lr_rho(params: dict[str, float] | None) -> tuple[float, float] | None:
    if params is None or not {"lr", "rho"} <= params.keys():
        return None
    return params["lr"], params["rho"]


def _plane(study: StudyRecord, fig: go.Figure, trials: Sequence[TrialRecord]) -> None:
    """lr and rho axes of an (lr, rho) figure, with full-number labels on log axes."""
    fig.update_xaxes(title_text="lr", **_axis(
        study, "lr", [t.params["lr"] for t in trials], _PLOT_PX[0], _PX_PER_LABEL_X))
    fig.update_yaxes(title_text="rho", **_axis(
        study, "rho", [t.params["rho"] for t in trials], _PLOT_PX[1], _PX_PER_LABEL_Y))


def _best_and_recommended(fig: go.Figure, best: TrialRecord | None,
                          rec: Recommendation | None) -> None:
    """The best single trial (star) and the recommended setting (ring) on an (lr, rho) figure.

    They differ when seed confirmation preferred another candidate; when they coincide,
    the ring circles the star.
    """
    at = _lr_rho(best.params if best is not None else None)
    if at is not None:
        fig.add_scatter(x=[at[0]], y=[at[1]], mode="markers", name=f"best single trial {best.number}",
                        hovertemplate=f"best single trial {best.number}<br>lr = %{{x:.4g}}"
                        f"<br>rho = %{{y:.4g}}<br>{best.value:.4f}<extra></extra>",
                        marker={"symbol": "star", "size": 16, "color": _BEST_COLOR,
                                "line": {"color": "black", "width": 1}})
    at = _lr_rho(rec.hyperparameters if rec is not None else None)
    if at is not None:
        fig.add_scatter(x=[at[0]], y=[at[1]], mode="markers",
                        name=f"recommended (lr = {_fmt(at[0])}, rho = {_fmt(at[1])})",
                        hovertemplate="recommended<br>lr = %{x:.4g}<br>rho = %{y:.4g}"
                        "<extra></extra>",
                        marker={"symbol": "circle-open", "size": 24, "color": _RECOMMENDED_COLOR,
                                "line": {"width": 3}})


def _contour(study: StudyRecord, best: TrialRecord | None, rec: Recommendation | None) -> go.Figure:
    trials = [t for t in study.completed() if "lr" in t.params and "rho" in t.params]
    lr = np.array([t.params["lr"] for t in trials])
    rho = np.array([t.params["rho"] for t in trials])
    values = np.array([t.value for t in trials])
    log_x, log_y = "lr" in study.log_params, "rho" in study.log_params
    # Interpolate where the axes are even: in log10 space on log axes.
    to_x = np.log10 if log_x else np.asarray
    to_y = np.log10 if log_y else np.asarray
    from_x: Callable = (lambda a: 10.0**a) if log_x else np.asarray
    from_y: Callable = (lambda a: 10.0**a) if log_y else np.asarray
    fig = go.Figure()
    try:
        gx = np.linspace(to_x(lr).min(), to_x(lr).max(), _GRID)
        gy = np.linspace(to_y(rho).min(), to_y(rho).max(), _GRID)
        z = griddata((to_x(lr), to_y(rho)), values, tuple(np.meshgrid(gx, gy)), method="linear")
        fig.add_contour(x=from_x(gx), y=from_y(gy), z=z, coloraxis="coloraxis",
                        contours={"coloring": "heatmap"}, line={"width": 0.5},
                        name="interpolated", hoverinfo="skip")
    except (QhullError, ValueError):
        # Fewer than 3 trials, or all on one line: nothing to interpolate, dots only.
        _note(fig, "Too few distinct completed trials to interpolate a contour.")
    fig.add_scatter(
        x=lr, y=rho, mode="markers", name="completed trials",
        customdata=[t.number for t in trials],
        hovertemplate="trial %{customdata}<br>lr = %{x:.4g}<br>rho = %{y:.4g}"
        "<br>%{marker.color:.4f}<extra></extra>",
        marker={"color": values, "coloraxis": "coloraxis", "size": 7,
                "line": {"color": "white", "width": 0.8}},
    )
    # The diagonals go through the setting the headline recommends (else the best trial).
    anchor = _lr_rho(rec.hyperparameters if rec is not None else None) or _lr_rho(
        best.params if best is not None else None)
    if anchor is not None and len(trials):
        for ratio in _diagonals(lr, rho, anchor[0] / anchor[1]):
            # The part of rho = lr / ratio inside the data's box.
            lo = max(lr.min(), ratio * rho.min())
            hi = min(lr.max(), ratio * rho.max())
            if lo >= hi:
                continue
            xs = from_x(np.linspace(to_x(lo), to_x(hi), 30))
            label = f"lr/rho = {ratio:.2g}"
            fig.add_scatter(x=xs, y=xs / ratio, mode="lines+text", name=label,
                            text=[""] * (len(xs) - 1) + [label], textposition="top left",
                            line={"dash": "dash", "color": "black", "width": 1},
                            hoverinfo="name", showlegend=False)
    _best_and_recommended(fig, best, rec)
    _plane(study, fig, trials)
    # Legend above the plot: on the right it would cover the colorbar.
    fig.update_layout(title="lr × rho", coloraxis=_coloraxis(study),
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02,
                              "yanchor": "bottom"})
    return fig


def _fisher_ratio(trial: TrialRecord) -> float | None:
    """The trial's median ‖m̂‖²/ρ when it recorded a usable one."""
    ratio = trial.attrs.get("fisher_ratio")
    if isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0:
        return float(ratio)
    return None


def _regime(study: StudyRecord, best: TrialRecord | None, rec: Recommendation | None) -> go.Figure:
    trials = [t for t in study.trials
              if t.state in ("complete", "pruned") and {"lr", "rho"} <= t.params.keys()]
    symbols = {"completed": "circle", "pruned": "diamond", "diverged": "x"}
    fig = go.Figure()
    hover = ("trial %{customdata[0]}, %{customdata[1]}<br>lr = %{x:.4g}<br>rho = %{y:.4g}"
             "<br>‖m̂‖²/ρ = %{customdata[2]}<extra></extra>")
    missing = [t for t in trials if _fisher_ratio(t) is None]
    for kind, symbol in symbols.items():
        found = [t for t in trials if _kind(t) == kind and _fisher_ratio(t) is not None]
        if not found:
            continue
        ratios = [_fisher_ratio(t) for t in found]
        fig.add_scatter(
            x=[t.params["lr"] for t in found], y=[t.params["rho"] for t in found],
            mode="markers", name=kind,
            customdata=[[t.number, kind, f"{r:.3g} ({regime(r)})"] for t, r in zip(found, ratios)],
            hovertemplate=hover,
            marker={"color": np.log10(ratios), "coloraxis": "coloraxis", "symbol": symbol,
                    "size": 9, "line": {"color": "white", "width": 0.6}},
        )
    if missing:
        fig.add_scatter(
            x=[t.params["lr"] for t in missing], y=[t.params["rho"] for t in missing],
            mode="markers", name="‖m̂‖²/ρ not recorded",
            customdata=[[t.number, _kind(t), "not recorded"] for t in missing],
            hovertemplate=hover,
            marker={"color": _NO_RATIO_COLOR, "size": 8,
                    "symbol": [symbols[_kind(t)] for t in missing]},
        )
    if len(missing) == len(trials):
        _note(fig, "No trial recorded ‖m̂‖²/ρ (studies run before it was recorded).")
    _best_and_recommended(fig, best, rec)
    _plane(study, fig, trials)
    low, high = _RATIO_RANGE
    fig.update_layout(
        title="SOFIM's regime over lr × rho: where the Fisher term ‖m̂‖² matters",
        coloraxis={"colorscale": _RATIO_SCALE, "cmin": low, "cmax": high,
                   "colorbar": {"title": {"text": _RATIO_TITLE, "side": "right"},
                                "tickvals": list(range(int(low), int(high) + 1))}},
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
    )
    return fig


def _parallel(study: StudyRecord) -> go.Figure:
    completed = study.completed()
    values = np.array([t.value for t in completed])
    dimensions = []
    for name in _hyperparameters(study):
        column = np.array([t.params.get(name, math.nan) for t in completed], dtype=float)
        if name not in study.log_params:
            dimensions.append({"label": name, "values": column})
            continue
        # Parcoords has no log axis: log10 values, labelled with the numbers themselves.
        present = column[np.isfinite(column) & (column > 0)]
        labelled, _ = _log_ticks(present, int(_PLOT_PX[1] // _PX_PER_LABEL_Y))
        dimension = {"label": f"{name} (log)", "values": np.log10(column)}
        if len(present):
            # The axis spans the data; its end labels would be log10 values, so the
            # range ends on the labelled numbers around the data.
            low = max((t for t in labelled if t <= present.min()), default=present.min())
            high = min((t for t in labelled if t >= present.max()), default=present.max())
            shown = [t for t in labelled if low <= t <= high]
            dimension |= {"range": [math.log10(low), math.log10(high)],
                          "tickvals": [math.log10(t) for t in shown],
                          "ticktext": [_tick_text(t) for t in shown]}
        dimensions.append(dimension)
    dimensions.append({"label": study.metric, "values": values})
    fig = go.Figure(go.Parcoords(line={"color": values, **_coloraxis(study), "showscale": True},
                                 dimensions=dimensions))
    # Parcoords puts axis labels above the plot area; leave room for them under the title.
    fig.update_layout(title="Parallel coordinates (completed trials)", margin={"t": 110})
    return fig


def _joined(trials: Sequence[TrialRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, values and trial numbers of many curves in single arrays, NaN between curves.

    One trace per kind instead of one per trial keeps the page small with 500 trials.
    """
    xs, ys, ids = [], [], []
    for t in trials:
        epochs = sorted(t.intermediate)
        xs += epochs + [math.nan]
        ys += [t.intermediate[e] for e in epochs] + [math.nan]
        ids += [t.number] * len(epochs) + [math.nan]
    return np.array(xs, dtype=float), np.array(ys, dtype=float), np.array(ids, dtype=float)


def _curves(study: StudyRecord, best: TrialRecord | None) -> go.Figure:
    fig = go.Figure()
    hover = "trial %{customdata}<br>epoch %{x}<br>%{y:.4f}<extra>%{fullData.name}</extra>"
    for kind, style in _STYLE.items():
        trials = [t for t in study.trials if _kind(t) == kind and t.intermediate]
        if not trials:
            continue
        x, y, ids = _joined(trials)
        fig.add_scatter(x=x, y=y, customdata=ids, mode="lines", name=f"{kind} ({len(trials)})",
                        line={"color": style["color"], "dash": style["dash"],
                              "width": style["width"]},
                        opacity=style["opacity"], hovertemplate=hover, connectgaps=False)
        if kind == "diverged":
            fig.add_scatter(
                x=[max(t.intermediate) for t in trials],
                y=[t.intermediate[max(t.intermediate)] for t in trials],
                customdata=[t.number for t in trials], mode="markers", name="diverged here",
                marker={"symbol": "x", "size": 9, "color": style["color"]}, hovertemplate=hover,
            )
    if best is not None and best.intermediate:
        x, y, ids = _joined([best])
        fig.add_scatter(x=x, y=y, customdata=ids, mode="lines+markers",
                        name=f"best (trial {best.number})", hovertemplate=hover,
                        line={"color": _BEST_COLOR, "width": 3})
    fig.update_layout(title="Learning curves", xaxis_title="epoch", yaxis_title=study.metric)
    return fig


def _short(params: dict[str, float]) -> str:
    return "<br>".join(f"{k} = {_fmt(v)}" for k, v in params.items())


def _confirmation(study: StudyRecord, rec: Recommendation | None) -> go.Figure:
    fig = go.Figure()
    confirmations = study.confirmations
    if not confirmations:
        _note(fig, "No seed confirmation yet: the top configurations have not been "
                   "retrained with fresh seeds.")
    labels = [f"{'final' if c.final else f'#{i}'}<br>{_short(c.params)}" for i, c in enumerate(confirmations, start=1)]
    recommended = rec.hyperparameters if rec is not None else None
    fig.add_scatter(
        x=[label for label, c in zip(labels, confirmations) for _ in c.values],
        y=[v for c in confirmations for v in c.values],
        mode="markers", name="single seeds", marker={"color": "#9e9e9e", "size": 6},
        customdata=[s for c in confirmations for s in c.seeds],
        hovertemplate="seed %{customdata}: %{y:.4f}<extra></extra>",
    )
    fig.add_scatter(
        x=labels, y=[c.mean for c in confirmations], mode="markers", name="mean ± std",
        error_y={"type": "data", "array": [c.std for c in confirmations], "visible": True},
        marker={"size": 12, "symbol": "diamond",
                "color": [_RECOMMENDED_COLOR if c.params == recommended else _STYLE["completed"]["color"]
                          for c in confirmations]},
    )
    fig.update_layout(title="Seed confirmation (magenta: recommended)", yaxis_title=study.metric)
    return fig


def _note(fig: go.Figure, text: str) -> None:
    """A centered message on a figure that has little or nothing to show."""
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font={"size": 14})


def build_figures(study: StudyRecord, rec: Recommendation | None = None) -> dict[str, go.Figure]:
    """Every figure of the report, keyed by name, in :data:`FIGURES` order.

    ``contour`` and ``regime`` are present only when both ``lr`` and ``rho`` are
    hyperparameters; the others always are (with an explanatory note when there is
    nothing to plot yet). ``rec`` supplies the importance shares and marks the recommended
    configuration; without it importance is computed from the study.
    """
    best = study.best_trial()
    figures = {
        "history": _history(study),
        "importance": _importance(study, rec),
        "slices": _slices(study),
    }
    if {"lr", "rho"} <= set(_hyperparameters(study)):
        figures["contour"] = _contour(study, best, rec)
        figures["regime"] = _regime(study, best, rec)
    figures |= {
        "parallel": _parallel(study),
        "curves": _curves(study, best),
        "confirmation": _confirmation(study, rec),
    }
    for fig in figures.values():
        fig.update_layout(height=FIGURE_HEIGHT)
    return figures


def _selection_lines(study: StudyRecord, rec: Recommendation) -> list[str]:
    """Why the recommendation is not the search's best trial, or not the best mean, if so."""
    best = study.best_trial()
    differs = best is not None and best.params != rec.hyperparameters
    why = ""
    selection = rec.selection
    if selection and selection.get("candidates"):
        candidates = selection["candidates"]
        pick = max if rec.metric.direction == "maximize" else min
        best_mean = pick(range(len(candidates)), key=lambda i: candidates[i]["mean"])
        if selection.get("chosen") != best_mean:
            why = (f" Why this candidate: {html.escape(str(selection.get('why', '')))} "
                   f"(criterion: {html.escape(str(selection.get('criterion', '')))}).")
    if not differs:
        return [why.strip()] if why else []
    return [
        f"Not the search's best single trial (trial {best.number}: {_fmt(best.value)}, the "
        "star on the lr × rho chart): the top candidates were retrained on fresh seeds and "
        f"this one held up best.{why}"
    ]


def _confirm_line(confirm: ConfirmSummary) -> str:
    """Mean ± std over the headline runs, the 95% interval and how the runs were made."""
    runs = len(confirm.seeds)
    line = (f"{'Final runs' if confirm.runs == 'final' else 'Confirmed'}: <b>{_fmt(confirm.mean)} ± {_fmt(confirm.std)}</b> (mean ± sample std "
            f"over {runs} run{'s' * (runs != 1)}, seeds {', '.join(map(str, confirm.seeds))})")
    if confirm.ci95 is not None:
        line += f"; 95% interval of the mean {_fmt(confirm.ci95[0])} to {_fmt(confirm.ci95[1])}"
    line += "."
    if confirm.protocol:
        name, _, how = confirm.protocol.partition(": ")
        how = how or name
        splits = (f"split seeds {', '.join(map(str, confirm.split_seeds))}; "
                  if confirm.split_seeds else "")
        line += (f"<br><span class=\"small\">{html.escape(how[:1].upper() + how[1:])} "
                 f"({splits}protocol “{html.escape(name)}”).</span>")
    return line


_REGIMES = {
    "sgd-like": "the Fisher term does little; lr/rho acts as SGD's learning rate",
    "mixed": ("both rho and the Fisher term ‖m̂‖² shape the step, so lr and rho matter "
              "separately, not only through lr/rho"),
    "normalised": ("the Fisher term dominates: the step is about lr · m̂/‖m̂‖², so rho does "
                   "little and lr sets the step length"),
}


def _regime_line(regime_info: dict) -> str:
    """What SOFIM's step does at the recommended setting, in words."""
    name = str(regime_info.get("name", ""))
    ratio = regime_info.get("fisher_ratio")
    median = f" (median ‖m̂‖²/ρ = {ratio:.2g})" if isinstance(ratio, (int, float)) else ""
    what = _REGIMES.get(name)
    if what is None:
        return f"SOFIM's regime here: {html.escape(name)}{median}."
    shown = "SGD-like" if name == "sgd-like" else name
    return f"SOFIM runs in its {shown} regime here{median}: {what}."


def _space_warnings(rec: Recommendation) -> list[str]:
    """Warnings when the recommendation sits on a bound of the space, and past widenings."""
    esc = html.escape
    found = [
        f"<b>{esc(str(edge['param']))}</b> sits at the {esc(str(edge['side']))} bound "
        f"{_fmt(edge['bound'])} of the search space: better settings may lie beyond it; "
        f"widen the space's {esc(str(edge['param']))} range and run more trials."
        for edge in rec.sensitivity.edges or []
    ]
    widened = [
        f"{esc(str(w['param']))} {esc(str(w['side']))} bound {_fmt(w['from'])} → "
        f"{_fmt(w['to'])} after {w['after_trials']} completed trials"
        for w in rec.study.widened or []
    ]
    if widened:
        found.append("The study widened its search space while it ran: " + "; ".join(widened) + ".")
    if not found:
        return []
    if not rec.sensitivity.edges:  # widenings alone are information, not a warning
        return [f"<p>{line}</p>" for line in found]
    return ['<div class="warning">' + "".join(f"<p>{line}</p>" for line in found) + "</div>"]


def _headline(study: StudyRecord, rec: Recommendation | None) -> str:
    """The report's top in plain HTML: what to use, how sure we are, and from how much data."""
    esc = html.escape
    parts = [f"<h1>{esc(study.optimizer)} on {esc(study.dataset)} × {esc(study.arch)}</h1>"]
    running = len(study.by_state("running"))
    if not study.finished:
        done = len(study.by_state("complete")) + len(study.by_state("pruned"))
        parts.append(
            f'<p class="warning"><b>Best so far:</b> the study is still running '
            f"({done} of {study.target_trials} trials finished, {running} running); "
            "these settings may still change.</p>"
        )
    if rec is None:
        parts.append("<p>No completed trial yet: nothing to recommend.</p>")
    else:
        settings = ", ".join(f"<b>{esc(k)} = {_fmt(v)}</b>" for k, v in rec.hyperparameters.items())
        if {"lr", "rho"} <= rec.hyperparameters.keys():
            settings += f" (lr/rho = {_fmt(rec.hyperparameters['lr'] / rec.hyperparameters['rho'])})"
        metric = rec.metric
        lines = [f"Recommended settings: {settings}"]
        if metric.confirm is not None:
            lines.append(_confirm_line(metric.confirm))
        if metric.test_accuracy is not None:
            lines.append(f"Test accuracy: {_fmt(metric.test_accuracy)}")
        lines.append(f"{esc(metric.name)} during the search: {_fmt(metric.value)} ({metric.direction})")
        lines += _selection_lines(study, rec)
        if rec.sensitivity.regime is not None:
            lines.append(_regime_line(rec.sensitivity.regime))
        fixed = ", ".join(f"{esc(k)} = {esc(str(v))}" for k, v in rec.fixed.items())
        lines.append(f"Fixed: {fixed}")
        parts.append("<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>")
        parts += _space_warnings(rec)
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{_fmt(lo)}</td><td>{_fmt(hi)}</td>"
            f"<td>{rec.sensitivity.importance.get(k, 0.0):.2f}</td></tr>"
            for k, (lo, hi) in rec.sensitivity.good_region.items()
        )
        parts.append(
            "<table><tr><th>hyperparameter</th><th>good region from</th><th>to</th>"
            f"<th>importance</th></tr>{rows}</table>"
            "<p class=\"small\">Good region: the range over completed trials within the "
            "tolerance of the best value.</p>"
        )
    diverged = sum(t.diverged for t in study.trials)
    parts.append(
        f"<p>Trials: {len(study.trials)} in all: {len(study.by_state('complete'))} completed, "
        f"{len(study.by_state('pruned'))} pruned (of which {diverged} diverged), "
        f"{len(study.by_state('failed'))} failed, {running} running. "
        f"Sampler {esc(study.sampler)}, pruner {esc(study.pruner)}, {study.epochs} epochs, "
        f"backend {esc(study.backend)}, storage <code>{esc(redact_storage_url(study.storage))}</code>.</p>"
    )
    return "\n".join(parts)


_PAGE_STYLE = """.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; margin: 1em 0; }
.warning p { margin: 0.3em 0; }
td, th { text-align: right; }"""


def _page(study: StudyRecord, rec: Recommendation | None, figures: dict[str, go.Figure]) -> str:
    sections = figure_sections((name, fig, _EXPLAIN[name]) for name, fig in figures.items())
    return html_page(f"sofim-tune report: {study.name}", _headline(study, rec) + "\n" + sections, style=_PAGE_STYLE)


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        html: ``report.html``, the page to open.
        pngs: one PNG per figure under ``plots/``, in :data:`FIGURES` order; empty
            without ``png=True``.
    """

    html: Path
    pngs: tuple[Path, ...] = ()


def _write_pngs(figures: dict[str, go.Figure], folder: Path) -> tuple[Path, ...]:
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError:
        raise UserInputError(
            "PNG export needs the kaleido package; install it (pip install 'kaleido>=1') "
            "or omit --png"
        ) from None
    specs = [
        {"fig": fig.to_dict(), "path": folder / f"{name}.png",
         "opts": {"format": "png", "width": _WIDTH, "height": FIGURE_HEIGHT}}
        for name, fig in figures.items()
    ]
    try:
        # Kaleido finds the browser itself: $BROWSER_PATH, then chrome/chromium on PATH and
        # the usual install paths (/usr/bin/chromium), then its own `kaleido_get_chrome` copy.
        # One browser renders every figure; mathjax off, or kaleido fetches it from a CDN.
        kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False}, cancel_on_error=True)
    except ChromeNotFoundError:
        raise UserInputError(PNG_NEEDS_CHROME) from None
    except Exception as exc:  # noqa: BLE001 - a browser crash or timeout inside kaleido
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"PNG export failed ({first_line}); report.html and the HTML plots were written") from None
    return tuple(spec["path"] for spec in specs)


def write_report(
    study: StudyRecord, out_dir: str | Path, rec: Recommendation | None = None, *,
    png: bool = False,
) -> Report:
    """Write ``out_dir/report.html`` and ``out_dir/plots/<figure>.html`` (and ``.png``).

    ``report.html`` is one self-contained page, viewable offline: the headline
    (recommended settings and why them, metric, seed confirmation with its interval and
    protocol, SOFIM's regime, warnings when a setting sits on a bound of the space, good
    region, trial counts, and a "best so far" warning while the study runs), then every
    figure. The files under ``plots/`` share one ``plots/plotly.min.js``. Each file is
    written atomically.

    Args:
        rec: the recommendation to show; None builds one from the study when a trial
            completed.
        png: also export every figure as PNG (1100 x 460 px) via kaleido, which needs
            Chrome or Chromium.

    Returns:
        A :class:`Report`: the path of ``report.html`` and of every PNG written.

    Raises:
        UserInputError: ``out_dir`` cannot be written, its ``plots/`` is a symlink, or
            ``png`` without a browser.
    """
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    refuse_symlinked_folder(plots)
    if rec is None and study.best_trial() is not None:
        rec = build_recommendation(study)
    figures = build_figures(study, rec)
    report = write_text_atomic(out_dir / "report.html", _page(study, rec, figures))
    write_text_atomic(plots / "plotly.min.js", plotly.offline.get_plotlyjs())
    for name, fig in figures.items():
        write_text_atomic(plots / f"{name}.html", figure_page(fig))
    # Last: the HTML report stands even when the PNG export fails for want of a browser.
    return Report(html=report, pngs=_write_pngs(figures, plots) if png else ())


def refuse_symlinked_folder(folder: Path) -> None:
    """Raise when ``folder`` (inside a folder sofim-tune writes) is a symlink.

    Its files would land wherever the link points, over files there that sofim-tune never wrote.
    A symlink at a single output file is harmless: writes replace the link, not its target.
    """
    if folder.is_symlink():
        raise UserInputError(f"{folder} is a symlink (to {os.readlink(folder)}); sofim-tune does not write through it: replace it by a folder, or give another --output")


def report_files(out_dir: str | Path, *, png: bool = False) -> list[Path]:
    """Every file :func:`write_report` writes into ``out_dir``."""
    plots = Path(out_dir) / "plots"
    pages = [plots / f"{name}.html" for name in FIGURES]
    images = [plots / f"{name}.png" for name in FIGURES] if png else []
    return [Path(out_dir) / "report.html", plots / "plotly.min.js", *pages, *images]


def foreign_report_files(out_dir: str | Path, *, png: bool = False) -> list[Path]:
    """The files :func:`write_report` would replace that sofim-tune did not write.

    Pages are known by :func:`sofim_tune.pages.is_our_page`, ``plots/plotly.min.js`` by
    plotly.js's banner, a figure's PNG by being a PNG beside its figure's page of ours.

    Raises:
        UserInputError: ``out_dir/plots`` is a symlink (:func:`refuse_symlinked_folder`).
    """
    refuse_symlinked_folder(Path(out_dir) / "plots")
    return [path for path in report_files(out_dir, png=png) if os.path.lexists(path) and not _ours(path)]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        return read_head(path, len(prefix)) == prefix
    except UserInputError:
        return False


def _ours(path: Path) -> bool:
    if path.suffix == ".html":
        return is_our_page(path)
    if path.suffix == ".png":
        return _starts_with(path, _PNG_SIGNATURE) and is_our_page(path.with_suffix(".html"))
    return _starts_with(path, plotly.offline.get_plotlyjs()[:16].encode())
