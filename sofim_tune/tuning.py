"""A study from start to finish: check, search, confirm, export. The CLI's ``run`` calls :func:`tune`.

Backends only search; they are reached through one protocol (:class:`sofim_tune.study.Backend`).
What happens before (checking the input) and after (retraining the best settings with fresh
seeds, writing ``best.json`` and the report) is the same for every backend, and lives here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sofim_tune.backends import get_backend
from sofim_tune.data import has_fixed_validation, has_test_split
from sofim_tune.errors import UserInputError
from sofim_tune.recommend import build_recommendation, write_recommendation
from sofim_tune.records import Confirmation, StudyRecord
from sofim_tune.selection import (
    ConfirmationPlan,
    Measurement,
    confirm_top,
    confirmation_seeds,
    current_final,
    distinct_ranked,
    final_runs,
    final_seeds,
    pick_recommended,
    plan_confirmation,
)
from sofim_tune.space import SearchSpace, load_space
from sofim_tune.spec import StudySpec
from sofim_tune.study import (
    Backend,
    RunOptions,
    check_run_folder,
    default_storage_url,
    effective_epochs,
    settings_to_enqueue,
    planned,
    spread_devices,
    trial_config,
    worst_value,
)
from sofim_tune.trial import clear_data_cache, resolve_device

if TYPE_CHECKING:
    from sofim_tune.comparison import OptimizerResult


log = logging.getLogger("sofim_tune")

__all__ = ["CompareOutcome", "ConfirmationProgress", "RunOptions", "TuneOutcome", "check_inputs", "compare", "confirm", "confirmation_plan", "describe_plan", "export_run", "measure_final", "tune", "wall_seconds"]


@dataclass(frozen=True)
class TuneOutcome:
    """What :func:`tune` leaves behind."""

    study: StudyRecord
    best_json: Path | None
    report: Path | None
    parallelism: str | None = None


def check_inputs(spec: StudySpec, space: SearchSpace, options: RunOptions, backend: str) -> RunOptions:
    """Fail with one clear line before anything is written: options, run folder, names, data, devices.

    Returns ``options`` with the workers, threads per trial and batch size chosen
    (:func:`sofim_tune.study.planned`; the Ray backend places trials itself, and takes only
    the batch size).
    """
    if options.timeout is not None and not options.timeout > 0:
        raise UserInputError(f"--timeout must be > 0 seconds, got {options.timeout:g}")
    # First, as it is the quickest to fail: a Ray cluster that cannot be used.
    get_backend(backend).check_options(options)
    settings_to_enqueue(spec, space, options)
    with_plan = planned(spec, space, options)
    devices = spread_devices(with_plan.workers or 1, options.gpus, options.device)
    for device in {options.device, *devices}:
        resolve_device(device)
    if any(resolve_device(device).type != "cpu" for device in devices):
        # The data parallelism_for decoded is a CPU copy; GPU workers load their own.
        clear_data_cache()
    # The Ray backend names its storage once it knows where the experiment lives.
    storage = (options.storage or default_storage_url(options.out_dir)) if backend == "optuna" else None
    check_run_folder(options.out_dir, backend=backend, storage=storage, study=spec.name)
    if backend == "optuna":
        return with_plan
    # Ray places trials itself; of the plan it takes only whether the model can be batched.
    return options if options.batch_trials is None else replace(options, batch_trials=with_plan.batch_trials)


class ConfirmationProgress:
    """Logs how far a step after the search is (``label``: ``confirmation``, ``final runs``),
    after each run that ends: runs done of the total, the time so far and an estimate of the
    time left (the mean time per run so far, times the runs left), one line each, for the live
    view and for a log without a terminal alike."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic, label: str = "confirmation") -> None:
        self.total = total
        self.clock = clock
        self.label = label
        self.started = clock()

    def __call__(self, done: int) -> None:
        elapsed = self.clock() - self.started
        left = f" · about {elapsed / done * (self.total - done):.0f} s left" if 0 < done < self.total else ""
        log.info(f"{self.label}: {done}/{self.total} runs done · {elapsed:.0f} s{left}")


def confirmation_plan(study: StudyRecord, spec: StudySpec, space: SearchSpace, *, bounded: bool = True) -> ConfirmationPlan:
    """What runs after the search of ``study``: the spec's ``confirm_top`` candidates on
    ``confirm_seeds`` seeds each, and ``final_runs`` final runs, scaled down until they train
    at most half the epochs the search trained (``bounded``;
    :func:`sofim_tune.selection.plan_confirmation`), or as the spec says (``bounded=False``:
    ``compare`` retrains every optimizer alike)."""
    run_epochs = effective_epochs(spec, space)
    search_epochs = sum(len(t.intermediate) for t in study.trials) if bounded else math.inf
    return plan_confirmation(search_epochs, run_epochs, top=spec.confirm_top, seeds=spec.confirm_seeds, final=spec.final_runs)


def describe_plan(spec: StudySpec, space: SearchSpace, *, bounded: bool = True) -> str:
    """The protocol's plan in one line, before the search starts: its budget, and the most that
    the selection and the final runs may then train."""
    epochs = effective_epochs(spec, space)
    most = plan_confirmation(math.inf, epochs, top=spec.confirm_top, seeds=spec.confirm_seeds, final=spec.final_runs)
    neighbours = f" (and lr × 2 neighbours on {most.neighbour_seeds}, the leading candidate's and those that could still win)" if most.neighbour_seeds else ""
    bound = ", within half the epochs the search trains (fewer runs if it trains less)" if bounded else ""
    return (
        f"plan: search {spec.trials} trials of up to {epochs} epochs (at most {spec.trials * epochs} epochs; the pruner stops many sooner); "
        f"then {most.top} candidate{'s' * (most.top != 1)} × {most.seeds} fresh seeds{neighbours} to choose, and {most.final_runs} final runs of the chosen one to measure it: "
        f"at most {most.runs} runs of {epochs} epochs{bound}"
    )


def _measurer(spec: StudySpec, space: SearchSpace, options: RunOptions, backend: Backend, *, final: bool, label: str | None = None) -> Callable[[list[tuple[dict[str, float], int, int]]], list[Measurement]]:
    """The ``evaluate`` of :func:`sofim_tune.selection.confirm_top` (``final=False``) or of
    :func:`sofim_tune.selection.final_runs` (``final=True``: measures the test split too, where
    there is one, and each final image's outcome), through ``backend.confirm``; ``label``
    names the runs in the progress lines (default: ``final runs`` or ``confirmation``)."""
    with_test = final and has_test_split(spec.dataset)
    per_image = final and spec.metric == "val_accuracy"

    def evaluate(jobs: list[tuple[dict[str, float], int, int]]) -> list[Measurement]:
        configs = [
            trial_config(spec, space, params, seed=seed, split_seed=split, device=options.device, options=options, evaluate_test=with_test, final=final)
            for params, seed, split in jobs
        ]
        measured = []
        for result in backend.confirm(configs, options, ConfirmationProgress(len(configs), label=label or ("final runs" if final else "confirmation"))):
            value = result.metrics.get(spec.metric)
            completed = result.status == "completed" and value is not None
            measured.append(
                Measurement(
                    value=value if completed else worst_value(spec.direction),
                    # A run that diverged or failed counts as no accuracy at all, as its validation does.
                    test_accuracy=result.metrics.get("test_accuracy") if completed else (0.0 if with_test else None),
                    fisher_ratio=result.metrics.get("fisher_ratio"),
                    curve=tuple(epoch[spec.metric] for epoch in result.history),
                    image_correct=tuple(result.val_correct or ()) if per_image else (),
                )
            )
        return measured

    return evaluate


def _numbered(study: StudyRecord) -> int:
    """How many trial numbers the study handed out: trial n trained with seed ``spec.seed + n``,
    and numbers can skip records (surplus trials)."""
    return max((t.number for t in study.trials), default=-1) + 1


def confirm(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions, backend: Backend, plan: ConfirmationPlan) -> list[Confirmation]:
    """The selection runs: retrain the top candidates and their neighbours on fresh seeds and
    splits, as ``plan`` says (selection.py); none of them validates on the final images.

    The runs go through ``backend.confirm``, so a Ray study confirms on its cluster.
    Selection runs already stored for the same candidates, seeds and splits are reused, so
    that rerunning a finished study costs nothing; not those of a release before final runs,
    which may have validated on the final images.
    """
    seeds, split_seeds = confirmation_seeds(spec.seed, _numbered(study), spec.split_seed, plan.seeds)
    if has_fixed_validation(spec.dataset):
        split_seeds = [spec.split_seed] * len(seeds)  # its val/ folder validates every run
    stored = [c for c in study.confirmations if not c.final]
    candidates = [t.params for t in distinct_ranked(study)[: plan.top]]
    if stored and [c.params for c in stored] == candidates and all(c.seeds == seeds and c.split_seeds == split_seeds and c.final_seed == spec.split_seed for c in stored):
        return stored
    own = len(candidates) * plan.seeds
    most = replace(plan, top=len(candidates)).selection_runs - own
    neighbours = f"; then the lr × 2 neighbour of the leading one on {plan.neighbour_seeds} (and of the next only where the leader's falls off a cliff): {most // len(candidates)} to {most} runs" if most else ""
    log.info(f"confirming {len(candidates)} candidate{'s' * (len(candidates) != 1)} on {plan.seeds} fresh seeds each: {own} runs of {plan.run_epochs} epochs{neighbours}")
    evaluate = _measurer(spec, space, options, backend, final=False)
    neighbours_of = _measurer(spec, space, options, backend, final=False, label="confirmation, lr × 2 neighbour")
    return confirm_top(study, evaluate, top=plan.top, seeds=seeds, split_seeds=split_seeds, neighbour_seeds=plan.neighbour_seeds, final_seed=spec.split_seed, evaluate_neighbours=neighbours_of)


def measure_final(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions, backend: Backend, params: dict[str, float], plan: ConfirmationPlan) -> Confirmation:
    """The final runs of the chosen ``params``: ``plan.final_runs`` fresh seeds, each validated on
    the study's final images (selection.py). Stored final runs of the same setting and seeds
    are reused."""
    seeds = final_seeds(spec.seed, _numbered(study), plan.final_runs)
    stored = current_final(study, params)
    if stored is not None and stored.seeds == seeds and stored.final_seed == spec.split_seed:
        return stored
    log.info(f"final runs: the chosen setting on {len(seeds)} fresh seeds, validated on images that no search or selection run scored: {len(seeds)} runs of {plan.run_epochs} epochs")
    return final_runs(params, _measurer(spec, space, options, backend, final=True), seeds=seeds, split_seed=spec.split_seed)


def tune(spec: StudySpec, options: RunOptions, *, backend: str = "optuna", on_progress: Callable[[StudyRecord], None] | None = None) -> TuneOutcome:
    """Run the study of ``spec``, then confirm and export; the Python twin of ``sofim-tune run``.

    Running it again with the same spec and run folder resumes the study: only the trials
    missing to reach ``spec.trials`` finished trials run.
    """
    space = load_space(spec.search_space)
    options = check_inputs(spec, space, options, backend)
    return _search_and_export(spec, space, options, get_backend(backend), on_progress)


def _search_and_export(
    spec: StudySpec, space: SearchSpace, options: RunOptions, search: Backend, on_progress: Callable[[StudyRecord], None] | None, *, bounded: bool = True
) -> TuneOutcome:
    """:func:`tune` after its inputs were checked; ``bounded`` as in :func:`confirmation_plan`."""
    plan = [describe_plan(spec, space, bounded=bounded)] if options.export else []

    def progress(record: StudyRecord) -> None:
        # The first report comes once the backend has opened the study (the Optuna backend's
        # before any trial), so that input it refuses is still the only line printed.
        while plan:
            log.info(plan.pop())
        if on_progress is not None:
            on_progress(record)

    study = search.run(spec, space, options, on_progress=progress)
    if not options.export:
        return TuneOutcome(study, None, None, options.parallelism)
    return export_run(study, spec, space, options, search, plan=confirmation_plan(study, spec, space, bounded=bounded))


def export_run(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions, backend: Backend, *, plan: ConfirmationPlan | None = None) -> TuneOutcome:
    """Choose among the best settings and measure the choice (as ``plan`` says; default
    :func:`confirmation_plan`), store the selection and final runs, write best.json and the report."""
    from sofim_tune.report import write_report  # plotly: not needed until the search is over

    plan = plan or confirmation_plan(study, spec, space)
    confirmations = confirm(study, spec, space, options, backend, plan)
    params, _ = pick_recommended(study, confirmations)
    final = measure_final(study, spec, space, options, backend, params, plan)
    study = backend.save_confirmations(study, [*confirmations, final], options)
    rec = build_recommendation(study, confirmations=confirmations, final=final, device=_device_name(options.device))
    best = write_recommendation(rec, options.out_dir / "best.json")
    report = write_report(study, options.out_dir, rec).html
    return TuneOutcome(study, best, report, options.parallelism)


def _device_name(device: str) -> str:
    import torch

    resolved = resolve_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu"


# --------------------------------------------------------------------------------------- compare

#: Optimizers `compare` knows; ``sofim-tensor`` is SOFIM with a Fisher block per tensor.
COMPARE_OPTIMIZERS = ("sofim", "sofim-tensor", "sgd-momentum", "adamw")
DEFAULT_COMPARE = ("sofim", "sgd-momentum", "adamw")
_COMPARE_FILES = ("compare.json", "compare.html")


@dataclass(frozen=True)
class CompareOutcome:
    """What :func:`compare` leaves behind: one run folder per optimizer, compare.json and compare.html."""

    studies: dict[str, TuneOutcome]
    compare_json: Path
    compare_html: Path


def compare_space(spec: StudySpec, optimizer: str) -> str:
    """The shipped space of ``optimizer`` that matches the spec's: ``<optimizer>``, or
    ``<optimizer>-wd`` when the spec's space searches weight decay (AdamW's always does)."""
    if optimizer == "adamw":
        return "adamw"
    return f"{optimizer}-wd" if "weight_decay" in load_space(spec.search_space).params else optimizer


def compare_plans(spec: StudySpec, options: RunOptions, optimizers: Sequence[str]) -> dict[str, tuple[StudySpec, RunOptions]]:
    """One study per optimizer with an identical budget, recipe, split and confirmation protocol.

    Each gets the optimizer's own space (:func:`compare_space`), the study name
    ``<spec name>-<optimizer>`` and the run folder ``<out>/<optimizer>``. Only what cannot be
    the same differs: SGD decays weights coupled, as it must.
    """
    if len(set(optimizers)) != len(optimizers) or len(optimizers) < 2:
        raise UserInputError(f"--optimizers must name two or more different optimizers, got {', '.join(optimizers) or 'none'}")
    unknown = [name for name in optimizers if name not in COMPARE_OPTIMIZERS]
    if unknown:
        raise UserInputError(f"unknown optimizer {unknown[0]!r} for compare; choose from {', '.join(COMPARE_OPTIMIZERS)}")
    if not {"sofim", "sofim-tensor"} & set(optimizers):
        raise UserInputError("compare needs sofim (or sofim-tensor) among --optimizers: its verdicts are about SOFIM")
    return {
        name: (
            spec.replace(search_space=compare_space(spec, name), name=f"{spec.name}-{name}", decoupled_weight_decay=spec.decoupled_weight_decay and name != "sgd-momentum"),
            replace(options, out_dir=options.out_dir / name),
        )
        for name in optimizers
    }


def _check_compare_folder(out_dir: Path, optimizers: Sequence[str]) -> None:
    """A compare folder holds its optimizers' run folders and compare.json/html, and nothing else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir} is a file; give a folder for the comparison")
    if out_dir.is_dir():
        strangers = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in (*COMPARE_OPTIMIZERS, *_COMPARE_FILES))
        if strangers:
            raise UserInputError(f"--out {out_dir} holds {', '.join(strangers[:3])}, which is not a comparison's; choose a new or empty folder")
        from sofim_tune.report import refuse_symlinked_folder

        for name in optimizers:
            refuse_symlinked_folder(out_dir / name)


def compare(spec: StudySpec, options: RunOptions, optimizers: Sequence[str] = DEFAULT_COMPARE, *, backend: str = "optuna", on_progress: Callable[[StudyRecord], None] | None = None) -> CompareOutcome:
    """Tune each optimizer at the same budget, then compare them: the Python twin of ``sofim-tune compare``.

    Every input is checked before the first study starts. Running it again resumes every study.
    """
    from sofim_tune.comparison import build_comparison, write_compare_html, write_comparison

    _check_compare_folder(options.out_dir, optimizers)
    plans = compare_plans(spec, options, optimizers)
    spaces = {name: load_space(study_spec.search_space) for name, (study_spec, _) in plans.items()}
    plans = {name: (study_spec, check_inputs(study_spec, spaces[name], study_options, backend)) for name, (study_spec, study_options) in plans.items()}
    search = get_backend(backend)
    # Unbounded: every optimizer's candidates run on the same seeds, so that the verdicts pair them.
    studies = {name: _search_and_export(study_spec, spaces[name], study_options, search, on_progress, bounded=False) for name, (study_spec, study_options) in plans.items()}
    results = [optimizer_result(name, outcome) for name, outcome in studies.items()]
    budget = {
        "trials": spec.trials,
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "val_fraction": spec.val_fraction,
        "confirm_top": spec.confirm_top,
        "confirm_seeds": spec.confirm_seeds,
        "final_runs": spec.final_runs,
        "backend": backend,
        "spaces": {name: study_spec.search_space for name, (study_spec, _) in plans.items()},
    }
    doc = build_comparison(spec.dataset, spec.arch, spec.metric, spec.direction, results, budget=budget)
    compare_json = write_comparison(doc, options.out_dir / "compare.json")
    return CompareOutcome(studies, compare_json, write_compare_html(doc, results, options.out_dir))


def wall_seconds(study: StudyRecord) -> float:
    """Seconds during which at least one trial of ``study`` ran, from the trials' start and end times.

    Trials that overlap (parallel workers, the members of one batch) count once, so a study
    batched by K does not cost K times its time; pauses between resumed sessions count not at all.
    """
    spans = sorted((t.started, t.finished) for t in study.trials if t.started is not None and t.finished is not None)
    total, start, end = 0.0, None, None
    for begins, ends in spans:
        if end is None or begins > end:
            total += (end - start).total_seconds() if end is not None else 0.0
            start, end = begins, ends
        else:
            end = max(end, ends)
    return total + ((end - start).total_seconds() if end is not None else 0.0)


def optimizer_result(optimizer: str, outcome: TuneOutcome) -> OptimizerResult:
    """What compare.json says of one optimizer's study: its recommendation and what it cost."""
    from sofim_tune.comparison import OptimizerResult
    from sofim_tune.recommend import load_recommendation

    study = outcome.study
    rec = load_recommendation(outcome.best_json)
    chosen = current_final(study, rec.hyperparameters)
    spent, best, best_so_far = 0, None, []
    sign = 1.0 if study.direction == "maximize" else -1.0
    for trial in sorted(study.trials, key=lambda t: t.number):
        spent += len(trial.intermediate)
        if trial.state == "complete" and trial.value is not None and (best is None or sign * trial.value > sign * best):
            best = trial.value
        if best is not None:
            best_so_far.append((spent, best))
    return OptimizerResult(
        optimizer=optimizer,
        run_dir=optimizer,
        hyperparameters=dict(rec.hyperparameters),
        values=list(chosen.values),
        curves=[list(curve) for curve in chosen.curves],
        test_accuracy=rec.metric.test_accuracy,
        tuning_epochs=spent,
        tuning_seconds=wall_seconds(study),
        best_so_far=best_so_far,
        seeds=list(chosen.seeds),
        image_hits=list(chosen.image_hits),
    )
