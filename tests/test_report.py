"""The sensitivity report: figures, the offline page, its size, PNG export and a real render."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import plotly.offline
import pytest
from PIL import Image

from sofim_tune.errors import UserInputError
from sofim_tune.records import StudyRecord
from sofim_tune.recommend import Recommendation, build_recommendation
from sofim_tune.report import FIGURES, PNG_NEEDS_CHROME, build_figures, write_report
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
    return write_report(study, tmp_path_factory.mktemp("run"), rec)


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
    page = write_report(make_study(12, running=2), tmp_path).read_text()
    assert "<b>Best so far:</b> the study is still running" in page


def test_log_axes(study: StudyRecord, rec: Recommendation) -> None:
    figures = build_figures(study, rec)
    contour = figures["contour"].layout
    assert (contour.xaxis.type, contour.yaxis.type) == ("log", "log")
    slices = figures["slices"].layout
    types = {slices[a].title.text: slices[a].type for a in ("xaxis", "xaxis2", "xaxis3")}
    assert types == {"lr": "log", "rho": "log", "beta1": "linear"}
    parallel = [d.label for d in figures["parallel"].data[0].dimensions]
    assert parallel == ["log10(lr)", "log10(rho)", "beta1", "val_accuracy"]


def test_contour_marks_lr_rho_diagonals(study: StudyRecord, rec: Recommendation) -> None:
    figure = build_figures(study, rec)["contour"]
    assert any(t.type == "contour" for t in figure.data)
    diagonals = [t for t in figure.data if (t.name or "").startswith("lr/rho = ")]
    assert len(diagonals) >= 3
    best = study.best_trial().params
    assert f"lr/rho = {best['lr'] / best['rho']:.2g}" in {t.name for t in diagonals}
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
    page = write_report(pending, tmp_path).read_text()
    assert "No completed trial yet" in page


def test_500_trials_stay_light(tmp_path: Path) -> None:
    report = write_report(make_study(500), tmp_path)
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
    write_report(study, tmp_path, rec, png=True)
    for name in FIGURES:
        path = tmp_path / "plots" / f"{name}.png"
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
