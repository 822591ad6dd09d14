"""The sensitivity report: figures, the offline page, its size, PNG export and a real render."""

from __future__ import annotations

import dataclasses
import html
import math
import re
import shutil
import subprocess
from pathlib import Path

import plotly.offline
import pytest
from PIL import Image

from sofim_tune.errors import UserInputError
from sofim_tune.records import Confirmation, StudyRecord
from sofim_tune.recommend import Recommendation, build_recommendation
from sofim_tune.report import FIGURES, PNG_NEEDS_CHROME, Report, build_figures, write_report
from sofim_tune.selection import distinct_ranked
from study_records import make_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTLY_JS_BYTES = len(plotly.offline.get_plotlyjs().encode())
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (/usr/bin/chromium absent; apt-get install chromium)")


@pytest.fixture(scope="module")
def study() -> StudyRecord:
    return make_study(40)


@pytest.fixture(scope="module")
def rec(study: StudyRecord) -> Recommendation:
    return build_recommendation(study)


@pytest.fixture(scope="module")
def report(study: StudyRecord, rec: Recommendation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    written = write_report(study, tmp_path_factory.mktemp("run"), rec)
    assert written.pngs == ()
    return written.html


FISHER_SCALE = 0.01  # synthetic ‖m̂‖² of every trial: ‖m̂‖²/ρ = FISHER_SCALE / rho


def _confirmed(study: StudyRecord, *, cliff: float = 0.05) -> tuple[StudyRecord, Recommendation]:
    """The study as the current pipeline leaves it, and its recommendation.

    Trials record ‖m̂‖²/ρ (except the first five, as in a study resumed from an older
    version), the lr bound was widened once, and the three best configurations were
    confirmed on fresh seeds and splits with lr × ½ and lr × 2 neighbours; the best one's
    lr × 2 neighbour loses ``cliff``, so that the second is recommended.
    """
    trials = [
        dataclasses.replace(t, attrs={**t.attrs, "fisher_ratio": FISHER_SCALE / t.params["rho"]})
        if t.state in ("complete", "pruned") and t.number >= 5 else t
        for t in study.trials
    ]
    study = dataclasses.replace(
        study, trials=trials, confirmations=[],
        bounds={"lr": (1e-4, 10.0), "rho": (1e-4, 10.0), "beta1": (0.5, 0.999)},
        widenings=[{"param": "lr", "side": "high", "from": 1.0, "to": 10.0, "after_trials": 20}],
    )
    confirmations = [
        Confirmation(
            params=dict(t.params), seeds=[11, 12, 13],
            values=[t.value + d for d in (0.003, -0.002, 0.001)], split_seeds=[21, 22, 23],
            neighbours={"lr×0.5": [t.value - 0.01] * 3,
                        "lr×2": [t.value - 0.01 - (cliff if i == 0 else 0.0)] * 3},
            fisher_ratio=FISHER_SCALE / t.params["rho"], test_accuracy=t.value - 0.01,
        )
        for i, t in enumerate(distinct_ranked(study)[:3])
    ]
    study = dataclasses.replace(study, confirmations=confirmations)
    return study, build_recommendation(study, confirmations=confirmations)


@pytest.fixture(scope="module")
def confirmed(study: StudyRecord) -> tuple[StudyRecord, Recommendation]:
    return _confirmed(study)


def _headline_of(page: str) -> str:
    return page[: page.index('<section id="history">')]  # above every figure


def _trace(figure, prefix: str):
    found = [t for t in figure.data if (t.name or "").startswith(prefix)]
    assert len(found) == 1, [t.name for t in figure.data]
    return found[0]


def _sgd_study(study: StudyRecord) -> StudyRecord:
    """A baseline study without rho: lr and momentum."""
    trials = [dataclasses.replace(t, params={"lr": t.params["lr"], "momentum": t.params["beta1"]})
              for t in study.trials]
    return dataclasses.replace(study, optimizer="sgd-momentum", trials=trials, confirmations=[])


def test_report_has_every_figure(report: Path) -> None:
    page = report.read_text()
    for name in FIGURES:
        assert f'id="fig-{name}"' in page
        assert (report.parent / "plots" / f"{name}.html").is_file()
    assert sorted(p.name for p in (report.parent / "plots").iterdir()) == sorted(
        [f"{name}.html" for name in FIGURES] + ["plotly.min.js"])


def test_report_is_self_contained(report: Path) -> None:
    page = report.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched, works offline
    assert PLOTLY_JS_BYTES < len(page.encode()) < 2 * PLOTLY_JS_BYTES  # plotly.js embedded once
    single = (report.parent / "plots" / "contour.html").read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in single


def test_headline(report: Path, rec: Recommendation) -> None:
    page = report.read_text()
    headline = page[: page.index('<section id="history">')]  # above every figure
    assert f"lr = {rec.hyperparameters['lr']:.4g}" in headline
    assert f"{rec.metric.confirm.mean:.4g} ± {rec.metric.confirm.std:.4g}" in headline
    assert f"{rec.sensitivity.good_region['rho'][1]:.4g}" in headline
    assert "27 completed" in headline
    assert "Best so far" not in headline


def test_running_study_warns_best_so_far(tmp_path: Path) -> None:
    page = write_report(make_study(12, running=2), tmp_path).html.read_text()
    assert "<b>Best so far:</b> the study is still running" in page


def test_log_axes(study: StudyRecord, rec: Recommendation) -> None:
    figures = build_figures(study, rec)
    contour = figures["contour"].layout
    assert (contour.xaxis.type, contour.yaxis.type) == ("log", "log")
    slices = figures["slices"].layout
    types = {slices[a].title.text: slices[a].type for a in ("xaxis", "xaxis2", "xaxis3")}
    assert types == {"lr": "log", "rho": "log", "beta1": "linear"}
    parallel = [d.label for d in figures["parallel"].data[0].dimensions]
    assert parallel == ["lr (log)", "rho (log)", "beta1", "val_accuracy"]


def test_contour_marks_lr_rho_diagonals(study: StudyRecord, rec: Recommendation) -> None:
    figure = build_figures(study, rec)["contour"]
    assert any(t.type == "contour" for t in figure.data)
    diagonals = [t for t in figure.data if (t.name or "").startswith("lr/rho = ")]
    assert len(diagonals) >= 3
    # Through the recommended setting, whose lr/rho the headline names.
    recommended = rec.hyperparameters
    assert f"lr/rho = {recommended['lr'] / recommended['rho']:.2g}" in {t.name for t in diagonals}
    for line in diagonals:
        assert line.line.dash == "dash"
        ratios = [x / y for x, y in zip(line.x, line.y)]
        assert max(ratios) == pytest.approx(min(ratios))  # a line lr/rho = const
        assert line.text[-1] == line.name  # labelled on the plot


def test_no_contour_without_rho(tmp_path: Path, study: StudyRecord) -> None:
    sgd = _sgd_study(study)
    assert "contour" not in build_figures(sgd, None)
    write_report(sgd, tmp_path)
    assert not (tmp_path / "plots" / "contour.html").exists()
    assert (tmp_path / "plots" / "slices.html").is_file()


def test_curves_show_pruned_and_diverged(study: StudyRecord, rec: Recommendation) -> None:
    traces = {t.name.split(" (")[0]: t for t in build_figures(study, rec)["curves"].data}
    assert traces["pruned"].line.dash == "dash"
    assert traces["diverged here"].marker.symbol == "x"
    diverged = [t for t in study.trials if t.diverged]
    assert len(traces["diverged here"].x) == len(diverged)
    assert traces["completed"].line.dash == "solid"


def test_confirmation_figure(study: StudyRecord, rec: Recommendation) -> None:
    means = build_figures(study, rec)["confirmation"].data[1]
    assert list(means.y) == [c.mean for c in study.confirmations]
    assert list(means.error_y.array) == [c.std for c in study.confirmations]
    empty = build_figures(_sgd_study(study), None)["confirmation"]
    assert "No seed confirmation yet" in empty.layout.annotations[0].text


def test_report_without_completed_trial(tmp_path: Path, study: StudyRecord) -> None:
    pending = dataclasses.replace(
        study, trials=[t for t in study.trials if t.state != "complete"], confirmations=[])
    page = write_report(pending, tmp_path).html.read_text()
    assert "No completed trial yet" in page


def test_500_trials_stay_light(tmp_path: Path) -> None:
    report = write_report(make_study(500), tmp_path).html
    data_bytes = report.stat().st_size - PLOTLY_JS_BYTES
    assert data_bytes < 1_500_000, f"{data_bytes} bytes of figures and text for 500 trials"


def test_unwritable_out_dir(tmp_path: Path, study: StudyRecord, rec: Recommendation) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserInputError, match="cannot write"):
        write_report(study, tmp_path / "a-file" / "run", rec)


def test_png_without_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, study: StudyRecord,
                             rec: Recommendation) -> None:
    from choreographer.browsers.chromium import Chromium

    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kwargs: None))
    with pytest.raises(UserInputError) as info:
        write_report(study, tmp_path, rec, png=True)
    assert str(info.value) == PNG_NEEDS_CHROME
    assert (tmp_path / "report.html").is_file()  # the HTML report stands


@needs_chromium
def test_png_export(tmp_path: Path, study: StudyRecord, rec: Recommendation) -> None:
    written = write_report(study, tmp_path, rec, png=True)
    # What `sofim-tune plot --png` reports as written: every PNG, in figure order.
    assert written == Report(html=tmp_path / "report.html",
                             pngs=tuple(tmp_path / "plots" / f"{name}.png" for name in FIGURES))
    for path in written.pngs:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            assert image.size == (1100, 460)


@needs_chromium
def test_report_renders_in_chromium(tmp_path: Path, report: Path) -> None:
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", report.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    colors = rgb.getcolors(maxcolors=1 << 24)
    white = sum(n for n, color in colors if min(color) >= 250)
    non_white = 1 - white / (rgb.width * rgb.height)
    # Text alone gives a few hundred anti-aliasing shades and little ink; drawn plots give
    # thousands of colors (contours, markers) over a fifth of the page or more.
    assert len(colors) > 1000, f"{len(colors)} distinct colors: the plots did not draw"
    assert non_white > 0.2, f"{non_white:.1%} of the page is not white"


# --- The recommended setting, full-number log ticks, stopped trials, SOFIM's regime, the
# headline and what write_report returns.


def test_contour_marks_recommended_apart_from_best(confirmed: tuple[StudyRecord, Recommendation]) -> None:
    study, rec = confirmed
    best = study.best_trial()
    assert best.params != rec.hyperparameters  # seed confirmation preferred another trial
    contour = build_figures(study, rec)["contour"]
    star = _trace(contour, "best single trial")
    assert (star.x[0], star.y[0]) == (best.params["lr"], best.params["rho"])
    assert star.marker.symbol == "star"
    ring = _trace(contour, "recommended")
    assert (ring.x[0], ring.y[0]) == (rec.hyperparameters["lr"], rec.hyperparameters["rho"])
    assert ring.marker.symbol != star.marker.symbol and ring.marker.color != star.marker.color
    assert ring.showlegend is not False and "recommended" in ring.hovertemplate
    assert f"lr = {rec.hyperparameters['lr']:.4g}" in ring.name


def _log_axes(figures: dict) -> dict[str, object]:
    """Every log axis of the report's cartesian figures, by figure and axis name."""
    axes = {}
    for name in ("slices", "contour", "regime"):
        layout = figures[name].layout
        for key in layout:
            if re.fullmatch(r"[xy]axis\d*", key) and layout[key].type == "log":
                axes[f"{name}.{key}"] = layout[key]
    return axes


def test_log_axes_label_full_numbers(confirmed: tuple[StudyRecord, Recommendation]) -> None:
    study, rec = confirmed
    figures = build_figures(study, rec)
    axes = _log_axes(figures)
    assert {"slices.xaxis", "slices.xaxis2", "contour.xaxis", "contour.yaxis",
            "regime.xaxis", "regime.yaxis"} <= axes.keys()
    lrs = [t.params["lr"] for t in study.trials]
    for where, axis in axes.items():
        # Plotly labels only these; each label is its tick's whole value ("0.05", never "5").
        assert axis.tickmode == "array", where
        assert len(axis.ticktext) == len(axis.tickvals) >= 2, where
        for value, text in zip(axis.tickvals, axis.ticktext):
            assert float(text) == pytest.approx(value, rel=1e-9), (where, value, text)
        # Minor ticks (2×, 3×, ... between labels) carry no label at all.
        assert axis.minor.ticks == "outside" and not set(axis.minor.tickvals) & set(axis.tickvals)
    inside = [v for v in axes["contour.xaxis"].tickvals if min(lrs) <= v <= max(lrs)]
    assert len(inside) >= 4  # five decades of lr: labels all along the axis
    for dimension in figures["parallel"].data[0].dimensions[:2]:  # lr, rho: log10 positions
        assert [float(t) for t in dimension.ticktext] == pytest.approx(
            [10**v for v in dimension.tickvals], rel=1e-9)
        assert dimension.range[0] == dimension.tickvals[0] and dimension.range[1] == dimension.tickvals[-1]


def test_narrow_log_axis_still_labels_full_numbers(study: StudyRecord) -> None:
    narrow = dataclasses.replace(study, trials=[
        dataclasses.replace(t, params={**t.params, "lr": 0.02 + 0.03 * (t.number % 7) / 6})
        for t in study.trials])
    axis = build_figures(narrow, None)["contour"].layout.xaxis
    inside = [v for v in axis.tickvals if 0.02 <= v <= 0.05]
    assert len(inside) >= 2
    assert all(float(text) == pytest.approx(v) for v, text in zip(axis.tickvals, axis.ticktext))


def test_slices_show_pruned_and_diverged_at_last_value() -> None:
    study = make_study(12)
    completed = [t for t in study.trials if t.state == "complete"]
    pruned = [t for t in study.trials if t.state == "pruned" and not t.diverged]
    diverged = [t for t in study.trials if t.diverged]
    assert pruned and diverged  # 12 trials, of which only some completed
    slices = build_figures(study, None)["slices"]
    lr = [t for t in slices.data if t.xaxis == "x"]
    by_name = {t.name: t for t in lr}
    assert set(by_name) == {"completed", "pruned (last value)", "diverged (last value)"}
    for name, trials in (("pruned (last value)", pruned), ("diverged (last value)", diverged)):
        trace = by_name[name]
        assert list(trace.customdata) == [t.number for t in trials]
        assert list(trace.x) == [t.params["lr"] for t in trials]
        assert list(trace.y) == [t.intermediate[max(t.intermediate)] for t in trials]
        assert trace.showlegend is True
    assert by_name["pruned (last value)"].marker.symbol == "circle-open"
    assert by_name["diverged (last value)"].marker.symbol == "x"
    assert by_name["completed"].marker.symbol is None  # plain dots
    assert sum(len(t.x) for t in lr) == len(completed) + len(pruned) + len(diverged)
    # One legend entry per kind, not one per subplot.
    assert sum(bool(t.showlegend) for t in slices.data if t.name == "pruned (last value)") == 1


def test_regime_colors_trials_by_fisher_ratio(confirmed: tuple[StudyRecord, Recommendation]) -> None:
    study, rec = confirmed
    figure = build_figures(study, rec)["regime"]
    colorbar = figure.layout.coloraxis.colorbar.title.text
    assert "log10 ‖m̂‖²/ρ" in colorbar and "< −1 SGD-like" in colorbar and "> 1 normalised" in colorbar
    ratios = {t.number: t.attrs["fisher_ratio"] for t in study.trials if "fisher_ratio" in t.attrs}
    colored = {}
    for trace in figure.data:
        if trace.marker.coloraxis == "coloraxis":
            colored |= {int(c[0]): color for c, color in zip(trace.customdata, trace.marker.color)}
    assert colored.keys() == ratios.keys()
    for number, color in colored.items():
        assert color == pytest.approx(math.log10(ratios[number]))
    grey = _trace(figure, "‖m̂‖²/ρ not recorded")
    finished = {t.number for t in study.trials if t.state in ("complete", "pruned")}
    assert {int(c[0]) for c in grey.customdata} == finished - ratios.keys()
    assert grey.marker.color == "#bdbdbd"
    assert _trace(figure, "recommended").x[0] == rec.hyperparameters["lr"]
    # A study without the attr: every trial grey, and a note says why.
    old = build_figures(make_study(40), None)["regime"]
    assert all(t.marker.coloraxis is None for t in old.data)
    assert "No trial recorded" in old.layout.annotations[0].text


def test_headline_explains_the_recommendation(tmp_path: Path, confirmed: tuple[StudyRecord, Recommendation]) -> None:
    study, rec = confirmed
    confirm = rec.metric.confirm
    assert confirm.ci95 is not None and confirm.protocol and rec.selection["chosen"] == 1
    headline = _headline_of(write_report(study, tmp_path, rec).html.read_text())
    assert f"lr = {rec.hyperparameters['lr']:.4g}" in headline
    assert f"{confirm.mean:.4g} ± {confirm.std:.4g}" in headline
    assert f"95% interval of the mean {confirm.ci95[0]:.4g} to {confirm.ci95[1]:.4g}" in headline
    assert html.escape(confirm.protocol.partition(": ")[2][1:]) in headline
    assert "split seeds 21, 22, 23" in headline
    ratio = rec.sensitivity.regime["fisher_ratio"]
    assert rec.sensitivity.regime["name"] == "sgd-like"
    assert (f"SOFIM runs in its SGD-like regime here (median ‖m̂‖²/ρ = {ratio:.2g}): the Fisher "
            "term does little; lr/rho acts as SGD's learning rate.") in headline
    assert html.escape(rec.selection["why"]) in headline  # candidate 1 had the better mean
    assert f"Not the search's best single trial (trial {study.best_trial().number}" in headline
    assert "lr high bound 1 → 10 after 20 completed trials" in headline
    assert 'class="warning"' not in headline  # no bound reached, nothing to warn about


def test_headline_warns_at_a_bound_of_the_space(tmp_path: Path, study: StudyRecord) -> None:
    study, rec = _confirmed(study, cliff=0.0)  # no cliff: the best mean is recommended
    lr = rec.hyperparameters["lr"]
    at_bound = dataclasses.replace(study, bounds={**study.bounds, "lr": (1e-4, lr)})
    rec = build_recommendation(at_bound, confirmations=study.confirmations)
    assert rec.sensitivity.edges == [{"param": "lr", "side": "high", "bound": lr}]
    rec = dataclasses.replace(rec, sensitivity=dataclasses.replace(
        rec.sensitivity, regime={"fisher_ratio": 31.0, "name": "normalised"}))
    headline = _headline_of(write_report(at_bound, tmp_path, rec).html.read_text())
    warning = headline[headline.index('<div class="warning">'):]
    assert (f"<b>lr</b> sits at the high bound {lr:.4g} of the search space: better settings "
            "may lie beyond it; widen the space") in warning
    assert "lr high bound 1 → 10 after 20 completed trials" in warning
    assert "SOFIM runs in its normalised regime here (median ‖m̂‖²/ρ = 31): the Fisher term dominates" in headline
    assert "Why this candidate" not in headline  # chosen: the best mean


@needs_chromium
def test_log_ticks_render_as_full_numbers(tmp_path: Path, confirmed: tuple[StudyRecord, Recommendation]) -> None:
    """In a real browser, every log axis's labels read as increasing whole numbers."""
    study, rec = confirmed
    page = write_report(study, tmp_path, rec).html
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000",
         "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    checked = 0
    for name in ("slices", "contour", "regime"):
        figure = dom[dom.index(f'id="fig-{name}"'):]
        figure = figure[: figure.find("<section", 1)]
        for layer in figure.split('axislayer-above"')[1:]:
            ticks = re.findall(r'<g class="([xy])\d*tick"><text[^>]*translate\(([-\d.]+),([-\d.]+)\)[^>]*>([^<]*)</text>',
                               layer.split("axislayer-above")[0])
            if not ticks:
                continue
            vertical = ticks[0][0] == "y"  # y labels: bottom to top
            ordered = sorted(ticks, key=lambda t: -float(t[2]) if vertical else float(t[1]))
            labels = [text for *_, text in ordered]
            values = [float(text.replace("−", "-")) for text in labels]
            # Bare minor digits ("5 6 7 8 9 0.1 2") would break the order.
            assert values == sorted(values) and len(set(values)) == len(values), (name, labels)
            checked += 1
    assert checked >= 8, checked  # slices lr, rho, beta1, metric; contour x, y; regime x, y


def test_a_page_title_is_escaped_once_and_its_body_kept():
    from sofim_tune.pages import html_page

    # compare.html's title names the dataset, which may be a folder called anything.
    page = html_page("sofim-tune compare: runs/<odd> & folder × cnn", "<p>body</p>", style=".x { color: red; }")
    assert "<title>sofim-tune compare: runs/&lt;odd&gt; &amp; folder × cnn</title>" in page
    assert "<body>\n<p>body</p>\n</body>" in page and ".x { color: red; }" in page


def test_a_later_plot_knows_the_report_files_as_its_own(report: Path, tmp_path: Path) -> None:
    """Every page carries sofim-tune's mark; a page of an earlier version is known by its title or
    by the plotly.js it loads beside it; a user's page of the same name is not sofim-tune's."""
    from sofim_tune.pages import GENERATOR_MARK
    from sofim_tune.report import foreign_report_files

    assert GENERATOR_MARK in report.read_text()
    assert all(GENERATOR_MARK in (report.parent / "plots" / f"{name}.html").read_text() for name in FIGURES)
    assert foreign_report_files(report.parent) == []
    plots = tmp_path / "plots"
    plots.mkdir()
    (tmp_path / "report.html").write_text("<html><head><title>sofim-tune report: digits-mlp</title></head></html>")
    (plots / "history.html").write_text('<html><head></head><body><script charset="utf-8" src="plotly.min.js"></script></body></html>')
    (plots / "slices.html").write_text("<html><body>my own slices</body></html>")
    (plots / "plotly.min.js").write_text("console.log('mine')")
    assert foreign_report_files(tmp_path) == [plots / "plotly.min.js", plots / "slices.html"]
