"""Run folders after the fact: read a study back, export it, plot it, show it, find a recommendation.

The Python side of ``sofim-tune export``, ``plot``, ``show`` and ``recommend``. A run folder
names its backend and storage in ``run.json``; a storage given explicitly (``--storage``,
``--study-name``) wins, and is the way to reach a storage whose URL holds a password.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar
from datetime import datetime
from pathlib import Path

from sofim_tune.backends import get_backend
from sofim_tune.errors import UserInputError
from sofim_tune.recommend import Recommendation, build_recommendation, load_recommendation, write_recommendation
from sofim_tune.records import StudyRecord
from sofim_tune.study import read_run_file

if TYPE_CHECKING:
    from sofim_tune.report import Report

T = TypeVar("T")


def load_run(run_dir: str | Path | None = None, *, storage: str | None = None, study: str | None = None) -> StudyRecord:
    """The study of a run folder, or of ``storage`` (and ``study`` when it holds several)."""
    if storage is not None or run_dir is None:
        return get_backend("optuna").load(None, storage=storage, study=study)
    folder = Path(run_dir)
    return get_backend(read_run_file(folder)["backend"]).load(folder, study=study)


def export(record: StudyRecord, path: str | Path) -> tuple[Recommendation, Path]:
    """Write the recommendation of a study (the best so far, marked so, when it is still running)."""
    rec = build_recommendation(record, device="unknown (exported from storage)")
    return rec, write_recommendation(rec, path)


def plot(record: StudyRecord, out_dir: str | Path, *, png: bool = False) -> Report:
    """Write report.html and plots/ for a study; returns report.html and any PNG files written.

    The headline needs one completed trial.
    """
    from sofim_tune.report import write_report

    rec = build_recommendation(record, device="unknown (exported from storage)") if record.best_trial() else None
    return write_report(record, out_dir, rec, png=png)


@dataclass(frozen=True)
class StudyStatus:
    """Where a study stands: counts by state, best so far, wall-clock span."""

    name: str
    backend: str
    target: int
    counts: dict[str, int]
    diverged: int
    best_value: float | None
    best_params: dict[str, float] | None
    elapsed_seconds: float | None
    finished: bool


def status(record: StudyRecord) -> StudyStatus:
    starts = [t.started for t in record.trials if t.started]
    ends = [t.finished for t in record.trials if t.finished]
    elapsed = None
    if starts:
        running = bool(record.by_state("running"))
        end = datetime.now(starts[0].tzinfo) if running or not ends else max(ends)
        elapsed = (end - min(starts)).total_seconds()
    best = record.best_trial()
    return StudyStatus(
        name=record.name,
        backend=record.backend,
        target=record.target_trials,
        counts={state: len(record.by_state(state)) for state in ("complete", "pruned", "failed", "running")},
        diverged=sum(1 for t in record.trials if t.diverged),
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else None,
        elapsed_seconds=elapsed,
        finished=record.finished,
    )


Basis = Literal["final", "confirmed", "search"]
# Rankings of better-founded values come first.
_BASES: tuple[Basis, ...] = ("final", "confirmed", "search")


@dataclass(frozen=True)
class Ranking:
    """Recommendations that compare like with like: one metric, ranked by one kind of value.

    Attributes:
        metric, direction: the metric (``val_accuracy``) and which way is better.
        basis: ``final``: ranked by the final runs' mean (best.json's headline); ``confirmed``:
            by the mean of the runs that chose the recommendation (files of releases before
            final runs, biased upward by the choice); ``search``: by the value the recommended
            trial reached in the search (files without a confirmation), a single draw. No
            two of them are comparable.
        entries: (best.json, its recommendation), best first.
    """

    metric: str
    direction: str
    basis: Basis
    entries: list[tuple[Path, Recommendation]]

    def describe(self) -> str:
        """``"ranked by the confirmed mean of val_accuracy (higher is better)"``."""
        value = {"final": "final runs' mean", "confirmed": "confirmed mean (selection runs)", "search": "search value (not confirmed)"}[self.basis]
        better = "higher" if self.direction == "maximize" else "lower"
        return f"ranked by the {value} of {self.metric} ({better} is better)"

    def value(self, rec: Recommendation) -> float:
        """The number ``rec`` is ranked by."""
        return _ranked_by(rec, self.basis)


def _basis(rec: Recommendation) -> Basis:
    if rec.metric.confirm is None:
        return "search"
    return "final" if rec.metric.confirm.runs == "final" else "confirmed"


def _ranked_by(rec: Recommendation, basis: Basis) -> float:
    return rec.metric.confirm.mean if basis != "search" and rec.metric.confirm is not None else rec.metric.value


@dataclass(frozen=True)
class Found:
    """What :func:`find_recommendations` found under a results folder.

    Attributes:
        rankings: the valid best.json files for the dataset, one :class:`Ranking` per metric
            and basis; final-run rankings come first, then confirmed ones, then by metric name.
        invalid: one line per best.json or compare.json that could not be read, saying why.
        choice: from a compare folder for the dataset (the newest, when several): the
            optimizer to use, its recommendation, the comparison, and its folder.
    """

    rankings: list[Ranking]
    invalid: list[str]
    choice: OptimizerChoice | None = None

    @property
    def recommendations(self) -> list[tuple[Path, Recommendation]]:
        """Every entry, ranking after ranking: the first is the top of the first ranking."""
        return [entry for ranking in self.rankings for entry in ranking.entries]


@dataclass(frozen=True)
class OptimizerChoice:
    """Which optimizer a comparison recommends: the best confirmed mean, with the verdicts behind it."""

    optimizer: str
    recommendation: Recommendation
    comparison: dict
    folder: Path


def find_recommendations(results: str | Path, dataset: str, arch: str | None = None) -> Found:
    """Every valid best.json under ``results`` for ``dataset`` (and ``arch``), ranked like with like.

    Files of different metrics, and confirmed files and unconfirmed ones, are never ranked
    against each other: each group is a :class:`Ranking` of its own. Files that are not v1
    recommendations are left out and named in ``invalid``.
    """
    root = Path(results)
    invalid: list[str] = []
    found = [(path, rec) for path, rec in _readable(root, "best.json", load_recommendation, invalid) if rec.dataset == dataset and (arch is None or rec.arch == arch)]
    groups: dict[tuple[Basis, str, str], list[tuple[Path, Recommendation]]] = {}
    for path, rec in found:
        groups.setdefault((_basis(rec), rec.metric.name, rec.metric.direction), []).append((path, rec))
    rankings = []
    for (basis, metric, direction), entries in sorted(groups.items(), key=lambda item: (_BASES.index(item[0][0]), item[0][1:])):
        sign = 1.0 if direction == "maximize" else -1.0
        ranked = sorted(entries, key=lambda entry: sign * _ranked_by(entry[1], basis), reverse=True)
        rankings.append(Ranking(metric, direction, basis, ranked))
    return Found(rankings, invalid, _choose_optimizer(root, dataset, arch, invalid))


def _readable(root: Path, name: str, load: Callable[[Path], T], invalid: list[str]) -> Iterator[tuple[Path, T]]:
    """Every ``root/*/name`` that ``load`` accepts; each one it refuses is named in ``invalid``."""
    for path in sorted(root.glob(f"*/{name}")) if root.is_dir() else []:
        try:
            yield path, load(path)
        except UserInputError as exc:
            invalid.append(str(exc))


def _choose_optimizer(root: Path, dataset: str, arch: str | None, invalid: list[str]) -> OptimizerChoice | None:
    """The choice of the newest compare folder for ``dataset`` whose chosen optimizer's best.json
    reads; a compare.json or best.json that does not read is named in ``invalid`` and skipped."""
    from sofim_tune.comparison import load_comparison

    comparisons = [(path.parent, doc) for path, doc in _readable(root, "compare.json", load_comparison, invalid) if doc["dataset"] == dataset and (arch is None or doc["arch"] == arch)]
    for folder, doc in sorted(comparisons, key=lambda item: item[1]["created"], reverse=True):
        sign = 1.0 if doc["direction"] == "maximize" else -1.0
        optimizer = max(doc["optimizers"], key=lambda name: sign * doc["optimizers"][name]["confirmed"]["mean"])
        best = folder / doc["optimizers"][optimizer]["run_dir"] / "best.json"
        try:
            rec = load_recommendation(best)
        except UserInputError as exc:
            invalid.append(f"{exc} (the recommendation of {folder / 'compare.json'}, which is left out)")
            continue
        return OptimizerChoice(optimizer, rec, doc, folder)
    return None
