"""Recommended settings from a study: ``best.json``, schema ``sofim-tune/recommendation/v1``.

A study is read only through :class:`~sofim_tune.records.StudyRecord`, so the same code
serves the Optuna and the Ray backend. The file format is documented in docs/architecture.md and
enforced by the JSON Schema shipped next to this module (``recommendation.schema.json``).
"""

from __future__ import annotations

import functools
import math
import importlib.metadata
import importlib.resources
import json
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import jsonschema
import optuna
import torch
from torch.optim.lr_scheduler import LRScheduler

from sofim_tune import __version__
from sofim_tune.errors import UserInputError
from sofim_tune.files import read_json, redact_storage_url, write_text_atomic
from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, build_optimizer, hyperparameter_problem
from sofim_tune.records import Confirmation, StudyRecord
from sofim_tune.schedules import build_scheduler
from sofim_tune.selection import CRITERION, current_confirmations, current_final, distinct_ranked, headline_interval, no_completed_trial, pick_recommended, regime, robust_score, worst_neighbour
from sofim_tune.study import EDGE_SHARE

SCHEMA_ID = "sofim-tune/recommendation/v1"

__all__ = [
    "SCHEMA_ID",
    "ConfirmSummary",
    "MetricSummary",
    "Provenance",
    "Recipe",
    "Recommendation",
    "Sensitivity",
    "StudySummary",
    "build_recommendation",
    "good_region",
    "load_recommendation",
    "optimizer_from_recommendation",
    "param_importances",
    "recipe_from_recommendation",
    "write_recommendation",
]


@dataclass(frozen=True)
class ConfirmSummary:
    """The headline numbers: the recommended configuration retrained with fresh seeds.

    Attributes:
        seeds: the seeds used, one training run each.
        mean, std: mean and sample standard deviation (n − 1) of the metric over the runs,
            in metric units (accuracy in [0, 1]).
        ci95: the 95% interval of the mean, ``[low, high]``: for final runs of an accuracy,
            over seeds and final images (:func:`sofim_tune.selection.headline_interval`), else
            Student-t over the runs; None in files written before it was recorded.
        split_seeds: each run's train/validation split (final runs: the search's, whose final
            images they validate on).
        protocol: how the runs relate to the data that selected the configuration.
        runs: ``final`` (after the choice, on images no earlier run scored) or ``selection``
            (the runs that chose it, in files of earlier releases: biased upward by the
            choice); None in files written before it was recorded.
        images: how many final images each final run validated on.
    """

    seeds: list[int]
    mean: float
    std: float
    ci95: tuple[float, float] | None = None
    split_seeds: list[int] | None = None
    protocol: str | None = None
    runs: Literal["final", "selection"] | None = None
    images: int | None = None


@dataclass(frozen=True)
class MetricSummary:
    """What was optimized and how well the recommended configuration did.

    Attributes:
        name: the study's metric (``val_accuracy``).
        direction: ``maximize`` or ``minimize``.
        value: the recommended configuration's metric value during the search.
        confirm: the headline runs (the final runs), or None before the confirm step.
        test_accuracy: mean accuracy in [0, 1] of the final runs on the dataset's test split,
            when it has one; nothing is chosen on it.
    """

    name: str
    direction: Literal["maximize", "minimize"]
    value: float
    confirm: ConfirmSummary | None = None
    test_accuracy: float | None = None


@dataclass(frozen=True)
class Sensitivity:
    """How much each hyperparameter matters and where the good settings lie.

    Attributes:
        importance: share in [0, 1] per hyperparameter (see :func:`param_importances`);
            sums to 1, empty below 2 completed trials.
        good_region: per hyperparameter, ``(low, high)`` over the completed trials within
            the tolerance of the best (see :func:`good_region`).
        edges: searched hyperparameters whose recommended value sits at a bound of the
            space: ``{"param", "side" ("low"|"high"), "bound"}``; the good settings may go
            on past it.
        regime: what SOFIM's step does at the recommended setting: ``{"fisher_ratio"``
            (median ‖m̂‖²/ρ over the confirmation runs), ``"name"`` (``sgd-like``, ``mixed``
            or ``normalised``)``}``; None for the baselines or without confirmation.
    """

    importance: dict[str, float]
    good_region: dict[str, tuple[float, float]]
    edges: list[dict[str, Any]] | None = None
    regime: dict[str, Any] | None = None


@dataclass(frozen=True)
class StudySummary:
    """The study behind a recommendation.

    Attributes:
        backend: ``optuna`` or ``ray``.
        name: study name.
        storage: where the study lives, any password replaced by ``***``.
        trials: every trial, running ones included, but not the attempts that were interrupted
            and retried in their place (:meth:`StudyRecord.outcomes`).
        completed, pruned, failed: trials in each state (diverged trials count as pruned;
            interrupted attempts do not count as failed).
        sampler, pruner: search strategy and early stopping, by name.
        final: False while the study is still running: these are the best settings so far.
        widened: the bounds the study moved while it ran (``{"param", "side", "from",
            "to", "after_trials"}``); None in files written before widening existed.
    """

    backend: str
    name: str
    storage: str
    trials: int
    completed: int
    pruned: int
    failed: int
    sampler: str
    pruner: str
    final: bool
    widened: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Provenance:
    """Where and when a recommendation was made.

    Attributes:
        created: ISO 8601 UTC timestamp (``2026-11-28T04:00:00Z``).
        device: the accelerator the study trained on (``NVIDIA H100 80GB HBM3``, ``cpu``).
        versions: package versions: ``sofim_tune``, ``torch``, ``optuna`` (and ``ray``).
    """

    created: str
    device: str
    versions: dict[str, str]


@dataclass(frozen=True)
class Recommendation:
    """Typed mirror of ``best.json`` (schema :data:`SCHEMA_ID`)."""

    dataset: str
    arch: str
    optimizer: str
    hyperparameters: dict[str, float]
    fixed: dict[str, Any]
    metric: MetricSummary
    sensitivity: Sensitivity
    study: StudySummary
    provenance: Provenance
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: ``schema`` first, then the fields in the order declared here."""
        data = {"schema": SCHEMA_ID, **asdict(self)}
        data["sensitivity"]["good_region"] = {
            name: list(bounds) for name, bounds in self.sensitivity.good_region.items()
        }
        confirm = data["metric"]["confirm"]
        if confirm is not None and confirm["ci95"] is not None:
            confirm["ci95"] = list(confirm["ci95"])
        # Fields added after the first release are left out when unknown, so that a file
        # written by that release round-trips unchanged.
        for table, keys in ((data, ("selection",)), (data["sensitivity"], ("edges", "regime")), (data["study"], ("widened",)), (confirm or {}, ("ci95", "split_seeds", "protocol", "runs", "images"))):
            for key in keys:
                if table.get(key, 0) is None:
                    del table[key]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recommendation") -> Recommendation:
        """Validate ``data`` against the v1 schema, then build a Recommendation.

        Raises:
            UserInputError: ``"<source>: not a sofim-tune v1 recommendation: <what>"``.
        """
        _validate(data, source)
        metric = data["metric"]
        confirm = metric.get("confirm")
        sensitivity = data["sensitivity"]
        return cls(
            dataset=data["dataset"],
            arch=data["arch"],
            optimizer=data["optimizer"],
            hyperparameters={k: float(v) for k, v in data["hyperparameters"].items()},
            fixed=dict(data["fixed"]),
            metric=MetricSummary(
                name=metric["name"],
                direction=metric["direction"],
                value=metric["value"],
                confirm=ConfirmSummary(**{**confirm, "ci95": tuple(confirm["ci95"]) if confirm.get("ci95") else None}) if confirm is not None else None,
                test_accuracy=metric.get("test_accuracy"),
            ),
            sensitivity=Sensitivity(
                importance=dict(sensitivity["importance"]),
                good_region={k: (lo, hi) for k, (lo, hi) in sensitivity["good_region"].items()},
                edges=sensitivity.get("edges"),
                regime=sensitivity.get("regime"),
            ),
            study=StudySummary(**data["study"]),
            provenance=Provenance(
                created=data["provenance"]["created"],
                device=data["provenance"]["device"],
                versions=dict(data["provenance"]["versions"]),
            ),
            selection=data.get("selection"),
        )


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    text = importlib.resources.files("sofim_tune").joinpath("recommendation.schema.json").read_text()
    schema = json.loads(text)
    return jsonschema.validators.validator_for(schema)(schema)


def _validate(data: Any, source: str) -> None:
    """Raise a one-line UserInputError naming the most relevant schema violation."""
    if isinstance(data, Mapping) and "schema" in data and data["schema"] != SCHEMA_ID:
        # Checked first so that a newer or foreign file says so, not "extra field X".
        shown = repr(data["schema"]) if isinstance(data["schema"], str) else f"a {type(data['schema']).__name__}"
        what = f"schema is {shown}, expected {SCHEMA_ID!r}"
    else:
        what = _domain_problem(data)
        if what is None:
            try:
                error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
            except RecursionError:  # a parsed mapping can nest deeper than any file read_json accepts
                raise UserInputError(f"{source}: not a sofim-tune v1 recommendation: nested too deeply") from None
            if error is None:
                return
            where = "/".join(str(p) for p in error.absolute_path) or "top level"
            what = f"{where}: {error.message}"
    # Messages can quote a whole sub-document; the CLI prints exactly one short line, which keeps
    # the message's end ("... is not of type 'number'") too.
    what = " ".join(what.split())
    if len(what) > 300:
        what = f"{what[:200]} … {what[-100:]}"
    raise UserInputError(f"{source}: not a sofim-tune v1 recommendation: {what}")


def _domain_problem(data: Any) -> str | None:
    """The first optimizer hyperparameter out of its domain in ``hyperparameters`` or ``fixed``
    (``"hyperparameters.lr must be > 0, got -0.5"``): the optimizer's own rule
    (``optim.HYPERPARAMETER_DOMAINS``), which the schema states too. Values of the wrong type
    are left to the schema."""
    if not isinstance(data, Mapping):
        return None
    for table in ("hyperparameters", "fixed"):
        values = data.get(table)
        for name, value in values.items() if isinstance(values, Mapping) else ():
            problem = hyperparameter_problem(name, value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
            if problem is not None:
                return f"{table}.{problem}"
    return None


def param_importances(study: StudyRecord) -> dict[str, float]:
    """Share of each hyperparameter in reaching the study's top trials.

    Uses Optuna 5's default evaluator, PED-ANOVA (which hyperparameters must be
    right to land in the top 10% of completed trials, relative to all completed trials).
    It is deterministic, so the result is reproducible without a seed, and it takes
    milliseconds where fANOVA's random forest takes seconds on 500 trials. Log-scale
    hyperparameters (``study.log_params``) are analysed on a log scale. Importance is
    per hyperparameter (main effects): on SOFIM's ``lr / rho`` diagonal, ``lr`` and
    ``rho`` can each look less important than their ratio is.

    Returns:
        ``{name: share}`` with shares in [0, 1] summing to 1, most important first;
        empty with fewer than 2 completed trials.
    """
    completed = study.completed()
    if len(completed) < 2:
        return {}
    names = list(dict.fromkeys(name for t in completed for name in t.params))
    distributions = {}
    for name in names:
        values = [float(t.params[name]) for t in completed if name in t.params]
        distributions[name] = optuna.distributions.FloatDistribution(
            min(values), max(values), log=name in study.log_params
        )
    # A throwaway study: keep Optuna from logging "A new study created" for it.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        in_memory = optuna.create_study(direction=study.direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    in_memory.add_trials(
        optuna.trial.create_trial(
            params={k: float(v) for k, v in t.params.items()},
            distributions={k: distributions[k] for k in t.params},
            value=t.value,
        )
        for t in completed
    )
    with warnings.catch_warnings():
        # PED-ANOVA warns when few trials reach the top quantile; the shares are still the
        # best estimate there is, and the report shows how many trials they rest on.
        warnings.simplefilter("ignore")
        shares = optuna.importance.get_param_importances(
            in_memory, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        )
    return {name: float(share) for name, share in shares.items()}


def good_region(study: StudyRecord, tolerance: float = 0.01) -> dict[str, tuple[float, float]]:
    """Per hyperparameter, ``(min, max)`` over completed trials close to the best.

    Args:
        tolerance: how far from the best value a trial may be, in metric units (absolute;
            0.01 = 1 point of accuracy); >= 0.

    Returns:
        ``{name: (low, high)}``; empty when no trial completed.
    """
    if not tolerance >= 0:
        raise UserInputError(f"tolerance must be >= 0, got {tolerance}")
    best = study.best_trial()
    if best is None:
        return {}
    sign = 1.0 if study.direction == "maximize" else -1.0
    near = [t for t in study.completed() if sign * (best.value - t.value) <= tolerance]
    region: dict[str, tuple[float, float]] = {}
    for name in dict.fromkeys(name for t in near for name in t.params):
        values = [float(t.params[name]) for t in near if name in t.params]
        region[name] = (min(values), max(values))
    return region


def _versions(backend: str) -> dict[str, str]:
    packages = ["torch", "optuna"] + (["ray"] if backend == "ray" else [])
    # Read installed metadata rather than importing: importing ray takes seconds.
    return {"sofim_tune": __version__} | {
        name: importlib.metadata.version(name) for name in packages
    }


# How the headline runs relate to the data that selected the configuration (selection.py).
FINAL_PROTOCOL = "final: fresh seeds after the choice, each run validated on the study's final images, which no search or selection run scored"
PROTOCOL = "resplit: each run trains and validates on its own random split of the training data, not the split the search selected on; these runs also chose the configuration"
FIXED_PROTOCOL = "fixed validation: every run validates on the dataset's own val/ images, which the search selected on too; the spread is over seeds only"
SELECTION_RUNS = "selection runs: they chose among the candidates, so the chosen one's mean is biased upward; the headline (metric.confirm) is from the final runs"


def edges(study: StudyRecord, params: Mapping[str, float]) -> list[dict[str, Any]]:
    """The searched hyperparameters whose value in ``params`` sits at a bound of the space."""
    found = []
    for name, (low, high) in study.bounds.items():
        if name not in params:
            continue
        scale = math.log if name in study.log_params else float
        width = scale(high) - scale(low)
        for side, bound in (("low", low), ("high", high)):
            if abs(scale(params[name]) - scale(bound)) <= EDGE_SHARE * width:
                found.append({"param": name, "side": side, "bound": bound})
    return found


def _confirm_summary(runs: Confirmation) -> ConfirmSummary:
    """The headline of final runs, or of the chosen candidate's selection runs where a study
    has no final runs (it was exported by an earlier release)."""
    if runs.final:
        protocol = FINAL_PROTOCOL
    elif runs.split_seeds:
        protocol = PROTOCOL if len(set(runs.split_seeds)) == len(runs.split_seeds) else FIXED_PROTOCOL
    else:
        protocol = None
    return ConfirmSummary(
        seeds=list(runs.seeds),
        mean=float(runs.mean),
        std=float(runs.std),
        ci95=headline_interval(runs.values, runs.image_hits) if len(runs.values) >= 2 else None,
        split_seeds=list(runs.split_seeds) or None,
        protocol=protocol,
        runs="final" if runs.final else "selection",
        images=len(runs.image_hits) or None,
    )


def _selection(study: StudyRecord, confirmations: Sequence[Confirmation], chosen: Confirmation) -> dict[str, Any]:
    """What best.json says about how the recommendation was chosen among the candidates."""
    by_params = {tuple(sorted(t.params.items())): t.value for t in distinct_ranked(study)}
    candidates = [
        {
            "hyperparameters": dict(c.params),
            "search_value": by_params.get(tuple(sorted(c.params.items()))),
            "mean": c.mean,
            "std": c.std,
            "neighbours": {label: sum(values) / len(values) for label, values in c.neighbours.items()},
            "score": robust_score(c, study.direction),
        }
        for c in confirmations
    ]
    index = list(confirmations).index(chosen)
    best_mean = (max if study.direction == "maximize" else min)(range(len(candidates)), key=lambda i: candidates[i]["mean"])
    if index == best_mean:
        why = "it has the best mean and the best robust score"
    else:
        # Only a neighbour can lower a score below the mean, so the beaten candidate has one.
        label, worst = worst_neighbour(confirmations[best_mean], study.direction)  # type: ignore[misc]
        why = (
            f"candidate {best_mean + 1} has a better mean, but its {label} neighbour scores {worst:.4f}, "
            f"which makes its score {candidates[best_mean]['score']:.4f}; this one scores {candidates[index]['score']:.4f}"
        )
    return {"criterion": CRITERION, "runs": SELECTION_RUNS, "candidates": candidates, "chosen": index, "why": why}


def build_recommendation(
    study: StudyRecord,
    *,
    confirmations: Sequence[Confirmation] | None = None,
    final: Confirmation | None = None,
    test_accuracy: float | None = None,
    device: str = "cpu",
    tolerance: float = 0.01,
) -> Recommendation:
    """Assemble the recommendation for a study, finished or still running.

    Args:
        confirmations: selection runs to pick from; None uses the study's own while they
            are current (:func:`current_confirmations`), ``()`` ignores them.
        final: the chosen setting's final runs, the headline; None uses the study's stored
            ones of that setting (:func:`current_final`), else the chosen selection runs.
        test_accuracy: held-out test accuracy in [0, 1] of the recommended configuration;
            None falls back to the headline runs'.
        device: the accelerator the study trained on, for provenance.
        tolerance: metric units, for :func:`good_region`.

    Raises:
        UserInputError: the study has no completed trial.
    """
    best = study.best_trial()
    if best is None:
        raise no_completed_trial(study)
    if confirmations is None:
        confirmations = current_confirmations(study)
    params, chosen = pick_recommended(study, confirmations)
    if final is None or final.params != params:
        final = current_final(study, params)
    headline = final or chosen
    same = [t for t in distinct_ranked(study) if t.params == params]
    # A confirmed configuration is normally one of the study's trials; if not, its mean
    # over seeds is the only value there is.
    value = same[0].value if same else headline.mean
    if test_accuracy is None and headline is not None:
        test_accuracy = headline.test_accuracy
    fisher_ratio = headline.fisher_ratio if headline is not None else None
    return Recommendation(
        dataset=study.dataset,
        arch=study.arch,
        optimizer=study.optimizer,
        hyperparameters={k: float(v) for k, v in params.items()},
        fixed={"epochs": study.epochs, "batch_size": study.batch_size, **study.fixed},
        metric=MetricSummary(
            name=study.metric,
            direction=study.direction,
            value=float(value),
            confirm=_confirm_summary(headline) if headline is not None else None,
            test_accuracy=test_accuracy,
        ),
        sensitivity=Sensitivity(
            importance=param_importances(study),
            good_region=good_region(study, tolerance),
            edges=edges(study, params),
            regime={"fisher_ratio": fisher_ratio, "name": regime(fisher_ratio)} if fisher_ratio is not None else None,
        ),
        selection=_selection(study, confirmations, chosen) if chosen is not None else None,
        study=StudySummary(
            backend=study.backend,
            name=study.name,
            storage=redact_storage_url(study.storage),
            trials=len(study.outcomes()),
            completed=len(study.by_state("complete")),
            pruned=len(study.by_state("pruned")),
            failed=sum(t.state == "failed" for t in study.outcomes()),
            sampler=study.sampler,
            pruner=study.pruner,
            final=study.finished,
            widened=list(study.widenings),
        ),
        provenance=Provenance(
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            device=device,
            versions=_versions(study.backend),
        ),
    )


@dataclass(frozen=True)
class Recipe:
    """A recommendation's training recipe, ready for your own loop.

    Attributes:
        optimizer: the optimizer with the recommended hyperparameters (and weight decay).
        scheduler: the per-batch learning-rate scheduler, or None for a constant lr; call
            ``scheduler.step()`` after every ``optimizer.step()``.
        label_smoothing: pass to ``F.cross_entropy(..., label_smoothing=...)``.
        augment: the augmentation the settings were tuned with (``none``, ``crop``, ``flip``,
            ``crop-flip``; see ``sofim_tune.data.random_augment``).
        epochs, batch_size: the budget the schedule spans and the batch size it assumes.
    """

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    label_smoothing: float
    augment: str
    epochs: int
    batch_size: int


def optimizer_from_recommendation(params: Any, recommendation: Recommendation | Mapping[str, Any] | str | Path) -> torch.optim.Optimizer:
    """The optimizer the study's trials trained with, at the recommended settings, for ``params``.

    ``recommendation`` is a Recommendation, the path of a best.json, or its parsed mapping
    (validated as a file is). The optimizer is the recommendation's (SOFIM, SOFIM per tensor,
    or a baseline) with its hyperparameters, the hyperparameters the space held fixed
    (``weight_decay``, ...) and the weight-decay coupling (``fixed.decoupled_weight_decay``).

    Raises:
        UserInputError: an invalid recommendation.
    """
    rec = _as_recommendation(recommendation)
    takes = OPTIMIZER_HYPERPARAMETERS.get(rec.optimizer, ())
    hyperparameters = {**{k: v for k, v in rec.fixed.items() if k in takes}, **rec.hyperparameters}
    try:
        return build_optimizer(rec.optimizer, params, hyperparameters, decoupled_weight_decay=bool(rec.fixed.get("decoupled_weight_decay", False)))
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def recipe_from_recommendation(
    recommendation: Recommendation | Mapping[str, Any] | str | Path, params: Any, *, steps_per_epoch: int, epochs: int | None = None
) -> Recipe:
    """The optimizer and scheduler of a recommendation's recipe, for ``params``.

    ``recommendation`` is a Recommendation, the path of a best.json, or its parsed mapping.
    The optimizer is :func:`optimizer_from_recommendation`'s. ``steps_per_epoch`` is your
    loop's batches per epoch; ``epochs`` defaults to the budget the settings were tuned for (a
    schedule spans all of it). Files from before recipes were recorded give a constant lr, no
    label smoothing and the dataset's default augmentation (``none`` here).
    """
    rec = _as_recommendation(recommendation)
    fixed = rec.fixed
    optimizer = optimizer_from_recommendation(params, rec)
    epochs = int(fixed["epochs"]) if epochs is None else epochs
    scheduler = build_scheduler(optimizer, fixed.get("schedule", "constant"), steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=int(fixed.get("warmup_epochs", 0)))
    return Recipe(optimizer, scheduler, float(fixed.get("label_smoothing", 0.0)), str(fixed.get("augment") or "none"), epochs, int(fixed["batch_size"]))


def _as_recommendation(value: Recommendation | Mapping[str, Any] | str | Path) -> Recommendation:
    if isinstance(value, Recommendation):
        return value
    if isinstance(value, Mapping):
        return Recommendation.from_dict(value)
    return load_recommendation(value)


def write_recommendation(rec: Recommendation, path: str | Path) -> Path:
    """Validate ``rec`` against the schema and write it to ``path`` atomically.

    Raises:
        UserInputError: ``rec`` breaks the schema, or ``path`` cannot be written.
    """
    data = rec.to_dict()
    _validate(data, str(path))
    # allow_nan=False: NaN and Infinity are not JSON; better to fail than to write them.
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def load_recommendation(path: str | Path) -> Recommendation:
    """Read a ``best.json`` (data only, nothing is executed) and validate it.

    Raises:
        UserInputError: ``"<path>: not a sofim-tune v1 recommendation: <what>"`` for a
            missing or unreadable file, invalid JSON, a wrong schema id, or missing or
            malformed fields.
    """
    data = read_json(path, f"{path}: not a sofim-tune v1 recommendation")
    return Recommendation.from_dict(data, source=str(path))
