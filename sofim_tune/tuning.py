"""A study from start to finish: check, search, confirm, export. The CLI's ``run`` calls :func:`tune`.

Backends only search; they are reached through one protocol (:class:`sofim_tune.study.Backend`).
What happens before (checking the input) and after (retraining the best settings with fresh
seeds, writing ``best.json`` and the report) is the same for every backend, and lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sofim_tune.backends import get_backend
from sofim_tune.data import has_test_split
from sofim_tune.errors import UserInputError
from sofim_tune.recommend import build_recommendation, write_recommendation
from sofim_tune.records import Confirmation, StudyRecord
from sofim_tune.selection import Measurement, confirm_top, confirmation_seeds, distinct_ranked
from sofim_tune.space import SearchSpace, load_space
from sofim_tune.spec import StudySpec
from sofim_tune.study import (
    Backend,
    RunOptions,
    check_run_folder,
    settings_to_enqueue,
    default_storage_url,
    spread_devices,
    trial_config,
    worst_value,
)
from sofim_tune.trial import clear_data_cache, prepare_trial, resolve_device

__all__ = ["RunOptions", "TuneOutcome", "check_inputs", "confirm", "export_run", "tune"]


@dataclass(frozen=True)
class TuneOutcome:
    """What :func:`tune` leaves behind."""

    study: StudyRecord
    best_json: Path | None
    report: Path | None


def check_inputs(spec: StudySpec, space: SearchSpace, options: RunOptions, backend: str) -> None:
    """Fail with one clear line before anything is written: options, run folder, names, data, devices."""
    if options.workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {options.workers}")
    if options.timeout is not None and not options.timeout > 0:
        raise UserInputError(f"--timeout must be > 0 seconds, got {options.timeout:g}")
    settings_to_enqueue(spec, space, options)
    for device in {options.device, *spread_devices(options.workers, options.gpus, options.device)}:
        resolve_device(device)
    some_settings = space.to_hyperparameters({name: p.low for name, p in space.params.items()})
    # On the CPU, so that a parent process of GPU workers holds no CUDA memory; the copy is
    # dropped at once, since trials load their own on their device.
    prepare_trial(trial_config(spec, space, some_settings, seed=spec.seed, device="cpu", options=options))
    clear_data_cache()
    # The Ray backend names its storage once it knows where the experiment lives.
    storage = (options.storage or default_storage_url(options.out_dir)) if backend == "optuna" else None
    check_run_folder(options.out_dir, backend=backend, storage=storage, study=spec.name)


def confirm(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions, backend: Backend) -> list[Confirmation]:
    """Retrain the top candidates and their neighbours on fresh seeds and splits (selection.py).

    The runs go through ``backend.confirm``, so a Ray study confirms on its cluster.
    Confirmations already stored for the same candidates, seeds and splits are reused, so
    that rerunning a finished study costs nothing. The test split, when the dataset has
    one, is measured on every run of a candidate (not of its neighbours).
    """
    seeds, split_seeds = confirmation_seeds(spec.seed, len(study.trials), spec.split_seed, spec.confirm_seeds)
    stored = study.confirmations
    candidates = [t.params for t in distinct_ranked(study)[: spec.confirm_top]]
    if stored and [c.params for c in stored] == candidates and all(c.seeds == seeds and c.split_seeds == split_seeds for c in stored):
        return list(stored)
    with_test = has_test_split(spec.dataset)

    def evaluate(jobs: list[tuple[dict[str, float], int, int]]) -> list[Measurement]:
        configs = [
            trial_config(spec, space, params, seed=seed, split_seed=split, device=options.device, options=options, evaluate_test=with_test and params in candidates)
            for params, seed, split in jobs
        ]
        measured = []
        for result in backend.confirm(configs, options):
            value = result.metrics.get(spec.metric)
            measured.append(
                Measurement(
                    value=value if result.status == "completed" and value is not None else worst_value(spec.direction),
                    test_accuracy=result.metrics.get("test_accuracy"),
                    fisher_ratio=result.metrics.get("fisher_ratio"),
                )
            )
        return measured

    return confirm_top(study, evaluate, top=spec.confirm_top, seeds=seeds, split_seeds=split_seeds)


def tune(spec: StudySpec, options: RunOptions, *, backend: str = "optuna", on_progress: Callable[[StudyRecord], None] | None = None) -> TuneOutcome:
    """Run the study of ``spec``, then confirm and export; the Python twin of ``sofim-tune run``.

    Running it again with the same spec and run folder resumes the study: only the trials
    missing to reach ``spec.trials`` finished trials run.
    """
    search = get_backend(backend)
    space = load_space(spec.search_space)
    check_inputs(spec, space, options, backend)
    study = search.run(spec, space, options, on_progress=on_progress)
    if not options.export:
        return TuneOutcome(study, None, None)
    return export_run(study, spec, space, options, search)


def export_run(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions, backend: Backend) -> TuneOutcome:
    """Confirm the best settings, store the confirmations, write best.json and the report."""
    from sofim_tune.report import write_report  # plotly: not needed until the search is over

    confirmations = confirm(study, spec, space, options, backend)
    study = backend.save_confirmations(study, confirmations, options)
    rec = build_recommendation(study, confirmations=confirmations, device=_device_name(options.device))
    best = write_recommendation(rec, options.out_dir / "best.json")
    report = write_report(study, options.out_dir, rec).html
    return TuneOutcome(study, best, report)


def _device_name(device: str) -> str:
    import torch

    resolved = resolve_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu"
