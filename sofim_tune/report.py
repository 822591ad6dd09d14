"""The sensitivity report: one self-contained HTML page (viewable offline) plus one file per figure.

Reads a study only through :class:`~sofim_tune.records.StudyRecord`. Figures are plotly;
``report.html`` embeds plotly.js once and each figure as compact JSON (numeric arrays are
base64-encoded by plotly, and trials of one kind share one trace), so the page stays a few
MB with hundreds of trials.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.offline
from plotly.subplots import make_subplots
from scipy.interpolate import griddata
from scipy.spatial import QhullError

from sofim_tune.errors import UserInputError
from sofim_tune.records import StudyRecord, TrialRecord
from sofim_tune.recommend import (
    Recommendation,
    build_recommendation,
    param_importances,
    redact_storage_url,
    write_text_atomic,
)

__all__ = ["FIGURES", "PNG_NEEDS_CHROME", "build_figures", "write_report"]

FIGURES = ("history", "importance", "slices", "contour", "parallel", "curves", "confirmation")

PNG_NEEDS_CHROME = (
    "PNG export needs Chrome or Chromium; install it (e.g. apt-get install chromium) "
    "or omit --png"
)

_HEIGHT = 460  # px, every figure
_WIDTH = 1100  # px, PNG export
_GRID = 80  # contour interpolation grid points per axis
_DIAGONAL_DECADES = (-2, -1, 0, 1, 2)  # lr/rho diagonals drawn, in decades around the best

# Trial kinds, drawn in this order (best on top) with these styles.
_STYLE = {
    "pruned": {"color": "#9e9e9e", "dash": "dash", "width": 1.0, "opacity": 0.6},
    "diverged": {"color": "#d62728", "dash": "dot", "width": 1.0, "opacity": 0.6},
    "running": {"color": "#17becf", "dash": "dot", "width": 1.0, "opacity": 0.8},
    "completed": {"color": "#1f77b4", "dash": "solid", "width": 1.2, "opacity": 0.7},
}
_BEST_COLOR = "#ff7f0e"

_EXPLAIN = {
    "history": "Metric of every trial in the order they ran; the line is the best so far.",
    "importance": (
        "Share of each hyperparameter in reaching the top trials (PED-ANOVA). Per "
        "hyperparameter only: on SOFIM's lr/rho diagonal, the ratio can matter more than "
        "lr or rho alone."
    ),
    "slices": "Metric against each hyperparameter; color is the trial number.",
    "contour": (
        "Metric over the (lr, rho) plane, interpolated between completed trials (dots). "
        "Dashed lines: lr/rho = const. While the squared momentum norm is small against rho, "
        "only lr/rho matters, so good settings lie along one of these diagonals."
    ),
    "parallel": "Every completed trial as a line through its hyperparameters and metric.",
    "curves": (
        "Metric per epoch. Completed trials in color, pruned ones grey and dashed, "
        "diverged ones red with a cross where they diverged."
    ),
    "confirmation": (
        "The top configurations retrained with fresh seeds: mean ± std over seeds, "
        "single runs as small dots."
    ),
}


def _fmt(value: float) -> str:
    """Numbers in the report: 4 significant digits (0.003799, 0.7218)."""
    return f"{value:.4g}"


def _completed(study: StudyRecord) -> list[TrialRecord]:
    return [t for t in study.by_state("complete") if t.value is not None]


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


def _axis_type(study: StudyRecord, name: str) -> str:
    return "log" if name in study.log_params else "linear"


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
    completed = sorted(_completed(study), key=lambda t: t.number)
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


def _slices(study: StudyRecord) -> go.Figure:
    names = _hyperparameters(study)
    completed = _completed(study)
    fig = make_subplots(rows=1, cols=max(1, len(names)), shared_yaxes=True,
                        subplot_titles=names, horizontal_spacing=0.04)
    for col, name in enumerate(names, start=1):
        trials = [t for t in completed if name in t.params]
        fig.add_scatter(
            x=[t.params[name] for t in trials], y=[t.value for t in trials],
            mode="markers", name=name, showlegend=False, customdata=[t.number for t in trials],
            hovertemplate=f"trial %{{customdata}}<br>{name} = %{{x:.4g}}<br>%{{y:.4f}}<extra></extra>",
            marker={"color": [t.number for t in trials], "coloraxis": "coloraxis", "size": 6},
            row=1, col=col,
        )
        fig.update_xaxes(type=_axis_type(study, name), title_text=name, row=1, col=col)
    fig.update_yaxes(title_text=study.metric, row=1, col=1)
    # Light blue to dark, never white: early trials must stay visible.
    fig.update_layout(title="Slices", coloraxis={"colorscale": [[0, "#9ecae1"], [1, "#08306b"]],
                                                 "colorbar": {"title": {"text": "trial"}}})
    return fig


def _diagonals(lr: np.ndarray, rho: np.ndarray, best_ratio: float) -> list[float]:
    """Ratios lr/rho to draw: the best one and whole decades around it, inside the data."""
    ratios = lr / rho
    candidates = (best_ratio * 10.0**k for k in _DIAGONAL_DECADES)
    return [c for c in candidates if ratios.min() * 0.999 <= c <= ratios.max() * 1.001]


def _contour(study: StudyRecord, best: TrialRecord | None) -> go.Figure:
    trials = [t for t in _completed(study) if "lr" in t.params and "rho" in t.params]
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
    if best is not None and {"lr", "rho"} <= best.params.keys():
        best_lr, best_rho = best.params["lr"], best.params["rho"]
        fig.add_scatter(x=[best_lr], y=[best_rho], mode="markers", name=f"best (trial {best.number})",
                        marker={"symbol": "star", "size": 16, "color": _BEST_COLOR,
                                "line": {"color": "black", "width": 1}})
        for ratio in _diagonals(lr, rho, best_lr / best_rho):
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
    fig.update_xaxes(type=_axis_type(study, "lr"), title_text="lr")
    fig.update_yaxes(type=_axis_type(study, "rho"), title_text="rho")
    # Legend above the plot: on the right it would cover the colorbar.
    fig.update_layout(title="lr × rho", coloraxis=_coloraxis(study),
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02,
                              "yanchor": "bottom"})
    return fig


def _parallel(study: StudyRecord) -> go.Figure:
    completed = _completed(study)
    values = np.array([t.value for t in completed])
    dimensions = []
    for name in _hyperparameters(study):
        column = np.array([t.params.get(name, math.nan) for t in completed], dtype=float)
        log = name in study.log_params
        dimensions.append({"label": f"log10({name})" if log else name,
                           "values": np.log10(column) if log else column})
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
    labels = [f"#{i}<br>{_short(c.params)}" for i, c in enumerate(confirmations, start=1)]
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
                "color": [_BEST_COLOR if c.params == recommended else _STYLE["completed"]["color"]
                          for c in confirmations]},
    )
    fig.update_layout(title="Seed confirmation (orange: recommended)", yaxis_title=study.metric)
    return fig


def _note(fig: go.Figure, text: str) -> None:
    """A centered message on a figure that has little or nothing to show."""
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font={"size": 14})


def build_figures(study: StudyRecord, rec: Recommendation | None = None) -> dict[str, go.Figure]:
    """Every figure of the report, keyed by name, in :data:`FIGURES` order.

    ``contour`` is present only when both ``lr`` and ``rho`` are hyperparameters; the
    others always are (with an explanatory note when there is nothing to plot yet).
    ``rec`` supplies the importance shares and marks the recommended configuration;
    without it importance is computed from the study.
    """
    best = study.best_trial()
    figures = {
        "history": _history(study),
        "importance": _importance(study, rec),
        "slices": _slices(study),
    }
    if {"lr", "rho"} <= set(_hyperparameters(study)):
        figures["contour"] = _contour(study, best)
    figures |= {
        "parallel": _parallel(study),
        "curves": _curves(study, best),
        "confirmation": _confirmation(study, rec),
    }
    for fig in figures.values():
        fig.update_layout(height=_HEIGHT)
    return figures


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
        lines = [
            f"Recommended settings: {settings}",
            f"{esc(metric.name)} during the search: {_fmt(metric.value)} ({metric.direction})",
        ]
        if metric.confirm is not None:
            lines.append(
                f"Confirmed over {len(metric.confirm.seeds)} seeds "
                f"({', '.join(map(str, metric.confirm.seeds))}): "
                f"{_fmt(metric.confirm.mean)} ± {_fmt(metric.confirm.std)}"
            )
        if metric.test_accuracy is not None:
            lines.append(f"Test accuracy: {_fmt(metric.test_accuracy)}")
        fixed = ", ".join(f"{esc(k)} = {esc(str(v))}" for k, v in rec.fixed.items())
        lines.append(f"Fixed: {fixed}")
        parts.append("<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>")
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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
.warning {{ background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.8em; text-align: right; }}
.small {{ font-size: 0.85em; color: #555; }}
section {{ margin-top: 2em; }}
</style>
</head>
<body>
{headline}
{sections}
</body>
</html>
"""


def _page(study: StudyRecord, rec: Recommendation | None, figures: dict[str, go.Figure]) -> str:
    sections = []
    for i, (name, fig) in enumerate(figures.items()):
        # plotly.js goes in once, with the first figure; the rest reuse it.
        div = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"fig-{name}",
                          default_height=f"{_HEIGHT}px")
        sections.append(f'<section id="{name}"><p class="small">{html.escape(_EXPLAIN[name])}</p>'
                        f"{div}</section>")
    return _PAGE.format(title=html.escape(f"sofim-tune report: {study.name}"),
                        headline=_headline(study, rec), sections="\n".join(sections))


def _write_pngs(figures: dict[str, go.Figure], folder: Path) -> None:
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
         "opts": {"format": "png", "width": _WIDTH, "height": _HEIGHT}}
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


def write_report(
    study: StudyRecord, out_dir: str | Path, rec: Recommendation | None = None, *,
    png: bool = False,
) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/plots/<figure>.html`` (and ``.png``).

    ``report.html`` is one self-contained page, viewable offline: the headline
    (recommended settings, metric, seed confirmation, good region, trial counts, and a
    "best so far" warning while the study runs), then every figure. The files under
    ``plots/`` share one ``plots/plotly.min.js``. Each file is written atomically.

    Args:
        rec: the recommendation to show; None builds one from the study when a trial
            completed.
        png: also export every figure as PNG (1100 x 460 px) via kaleido, which needs
            Chrome or Chromium.

    Returns:
        The path of ``report.html``.

    Raises:
        UserInputError: ``out_dir`` cannot be written, or ``png`` without a browser.
    """
    out_dir = Path(out_dir)
    if rec is None and study.best_trial() is not None:
        rec = build_recommendation(study)
    figures = build_figures(study, rec)
    report = write_text_atomic(out_dir / "report.html", _page(study, rec, figures))
    plots = out_dir / "plots"
    write_text_atomic(plots / "plotly.min.js", plotly.offline.get_plotlyjs())
    for name, fig in figures.items():
        write_text_atomic(plots / f"{name}.html",
                          fig.to_html(include_plotlyjs="directory", full_html=True))
    # Last: the HTML report stands even when the PNG export fails for want of a browser.
    if png:
        _write_pngs(figures, plots)
    return report
