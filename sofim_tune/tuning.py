"""A study from start to finish: search, confirm, export. The CLI's ``run`` calls :func:`tune`.

Backends (``sofim_tune.backends``) only search; what happens before (checking the input)
and after (retraining the best settings with fresh seeds, writing ``best.json`` and the
report) is the same for both, and lives here.
"""

from __future__ import annotations

import json
from typing import Any
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from sofim_tune.errors import UserInputError
from sofim_tune.records import Confirmation, StudyRecord
from sofim_tune.space import SearchSpace, load_space
from sofim_tune.spec import StudySpec
from sofim_tune.trial import TrialConfig, clear_data_cache, prepare_trial, resolve_device, train_trial

BACKENDS = ("optuna", "ray")

# Confirmation retrains with seeds that no search trial used (trials use spec.seed + number).
CONFIRM_SEED_BASE = 1_000_003


@dataclass(frozen=True)
class RunOptions:
    """How and where a study runs; the what (dataset, budget, space) is the :class:`StudySpec`.

    Attributes:
        out_dir: the run folder (storage, best.json, report.html, plots/).
        storage: Optuna storage URL (``sqlite:///...``, ``postgresql://...``, ``journal:PATH``);
            None means SQLite at ``out_dir/study.db``. For Ray: ignored.
        workers: Optuna worker processes sharing the storage, >= 1.
        gpus: GPU indices to spread workers over, round-robin; empty means ``device``.
        timeout: stop starting new trials after this many seconds; None runs to the target.
        enqueue: settings (the optimizer's names) to try before sampling.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for trials not pinned to a GPU.
        data_dir, download: where torchvision datasets live, and whether to fetch them.
        export: retrain the top settings, write best.json and the report at the end.
        address, gpus_per_trial, cpus_per_trial, max_concurrent, storage_path: Ray only.
    """

    out_dir: Path
    storage: str | None = None
    workers: int = 1
    gpus: tuple[int, ...] = ()
    timeout: float | None = None
    enqueue: tuple[Mapping[str, float], ...] = ()
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    export: bool = True
    address: str | None = None
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    storage_path: str | None = None


@dataclass(frozen=True)
class TuneOutcome:
    """What :func:`tune` leaves behind."""

    study: StudyRecord
    best_json: Path | None
    report: Path | None


def claim_run_folder(out_dir: Path, *, backend: str, storage: str, study: str) -> None:
    """Write ``out_dir/run.json``, refusing a folder that already belongs to another study.

    ``storage`` is written redacted; a password never reaches the run folder.
    """
    from sofim_tune.recommend import redact_storage_url, write_text_atomic

    claim = {"backend": backend, "storage": redact_storage_url(storage), "study": study}
    run_file = out_dir / "run.json"
    if run_file.is_file():
        try:
            current = json.loads(run_file.read_text())
        except ValueError:
            current = None
        if current != claim:
            raise UserInputError(f"{out_dir} already holds another study ({run_file}); choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create run folder {out_dir}: {exc.strerror}") from None
    write_text_atomic(run_file, json.dumps(claim, indent=2) + "\n")


def check_resumable(meta: Mapping[str, Any], spec: StudySpec, space: SearchSpace, where: str) -> None:
    """Refuse to resume a study whose trials could not be compared with the new ones.

    ``meta`` is what the backend stored when the study began (``study_metadata``); ``where``
    names the study in the message.
    """
    if meta["space_fingerprint"] != space.fingerprint():
        raise UserInputError(f"{where} was made with a different search space ({meta['space']}); use another --out or --study, or the same space")
    if meta["metric"] != spec.metric or meta["direction"] != spec.direction:
        raise UserInputError(f"{where} optimizes {meta['metric']} ({meta['direction']}), not {spec.metric} ({spec.direction})")
    wanted = {
        "dataset": spec.dataset,
        "arch": spec.arch,
        "epochs": effective_epochs(spec, space),
        "batch_size": int(space.fixed.get("batch_size", spec.batch_size)),
        "seed": spec.seed,
        "val_fraction": spec.val_fraction,
    }
    for key, value in wanted.items():
        if meta.get(key, value) != value:
            raise UserInputError(f"{where} was run with {key}={meta[key]}, not {value}; trials with different settings cannot be compared: use another --out or --study")


def effective_epochs(spec: StudySpec, space: SearchSpace) -> int:
    """Epochs per trial: a space may pin them, else the spec's."""
    return int(space.fixed.get("epochs", spec.epochs))


def trial_config(spec: StudySpec, space: SearchSpace, hyperparameters: Mapping[str, float], *, seed: int, device: str, options: RunOptions, evaluate_test: bool = False) -> TrialConfig:
    """The TrialConfig of one trial; both backends and the confirmation step build it here."""
    optimizer_keys = {k: v for k, v in space.fixed.items() if k not in ("batch_size", "epochs")}
    return TrialConfig(
        dataset=spec.dataset,
        arch=spec.arch,
        optimizer=space.optimizer,
        hyperparameters={**optimizer_keys, **hyperparameters},
        epochs=effective_epochs(spec, space),
        batch_size=int(space.fixed.get("batch_size", spec.batch_size)),
        seed=seed,
        device=device,
        data_dir=options.data_dir,
        download=options.download,
        val_fraction=spec.val_fraction,
        split_seed=spec.seed,
        evaluate_test=evaluate_test,
    )


def check_inputs(spec: StudySpec, space: SearchSpace, options: RunOptions) -> None:
    """Fail with one clear line before anything is written: names, data, architecture, devices."""
    if options.workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {options.workers}")
    for device in {options.device, *spread_devices(options.workers, options.gpus, options.device)}:
        resolve_device(device)
    some_settings = space.to_hyperparameters({name: p.low for name, p in space.params.items()})
    # On the CPU, so that a parent process of GPU workers holds no CUDA memory; the copy is
    # dropped at once, since trials load their own on their device.
    prepare_trial(trial_config(spec, space, some_settings, seed=spec.seed, device="cpu", options=options))
    clear_data_cache()


def _failed_run_value(direction: str) -> float:
    """What a confirmation run that diverged or failed counts as: the worst finite value."""
    return 0.0 if direction == "maximize" else 1e6


def confirm(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions) -> tuple[list[Confirmation], float | None]:
    """Retrain the top configurations with fresh seeds; report the winner's test accuracy.

    Confirmations already stored for the same configurations and seeds are reused, so that
    rerunning a finished study costs nothing. The test split is measured on each
    configuration's first-seed run and reported for the winner only; the winner is chosen
    by the validation mean.
    """
    from sofim_tune.recommend import confirm_top, distinct_ranked, pick_recommended

    seeds = [CONFIRM_SEED_BASE + i for i in range(spec.confirm_seeds)]
    top = [t.params for t in distinct_ranked(study)[: spec.confirm_top]]
    stored = study.confirmations
    if stored and [c.params for c in stored] == top and all(c.seeds == seeds for c in stored):
        _, chosen = pick_recommended(study, stored)
        return list(stored), chosen.test_accuracy if chosen else None

    test_accuracy: dict[tuple[tuple[str, float], ...], float | None] = {}

    def evaluate(hyperparameters: dict[str, float], seed: int) -> float:
        first_seed = seed == seeds[0]
        result = train_trial(trial_config(spec, space, hyperparameters, seed=seed, device=options.device, options=options, evaluate_test=first_seed))
        if first_seed:
            test_accuracy[tuple(sorted(hyperparameters.items()))] = result.metrics.get("test_accuracy")
        value = result.metrics.get(spec.metric)
        return value if result.status == "completed" and value is not None else _failed_run_value(spec.direction)

    confirmations = confirm_top(study, evaluate, top=spec.confirm_top, seeds=seeds)
    _, chosen = pick_recommended(study, confirmations)
    winner_test = test_accuracy.get(tuple(sorted(chosen.params.items()))) if chosen else None
    # The winner carries the test accuracy, so that a later export from storage finds it.
    return [replace(c, test_accuracy=winner_test) if c is chosen else c for c in confirmations], winner_test


def tune(spec: StudySpec, options: RunOptions, *, backend: str = "optuna", on_progress: Callable[[StudyRecord], None] | None = None) -> TuneOutcome:
    """Run the study of ``spec``, then confirm and export; the Python twin of ``sofim-tune run``.

    Running it again with the same spec and run folder resumes the study: only the trials
    missing to reach ``spec.trials`` finished trials run.
    """
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    space = load_space(spec.search_space)
    check_inputs(spec, space, options)
    if backend == "optuna":
        from sofim_tune.backends.optuna import run_optuna_study as run_backend
    else:
        from sofim_tune.backends.ray import run_ray_study as run_backend
    study = run_backend(spec, space, options, on_progress=on_progress)
    if not options.export:
        return TuneOutcome(study, None, None)
    return export_run(study, spec, space, options, backend=backend)


def export_run(study: StudyRecord, spec: StudySpec, space: SearchSpace, options: RunOptions, *, backend: str) -> TuneOutcome:
    """Confirm the best settings, store the confirmations, write best.json and the report."""
    from sofim_tune.recommend import build_recommendation, write_recommendation
    from sofim_tune.report import write_report

    confirmations, test_accuracy = confirm(study, spec, space, options)
    if backend == "optuna":
        from sofim_tune.backends.optuna import save_confirmations
    else:
        from sofim_tune.backends.ray import save_confirmations
    study = save_confirmations(study, confirmations, options)
    rec = build_recommendation(study, confirmations=confirmations, test_accuracy=test_accuracy, device=_device_name(options.device))
    best = write_recommendation(rec, options.out_dir / "best.json")
    report = write_report(study, options.out_dir, rec)
    return TuneOutcome(study, best, report)


def _device_name(device: str) -> str:
    import torch

    resolved = resolve_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu"


def spread_devices(workers: int, gpus: Sequence[int], device: str) -> list[str]:
    """One device per worker: GPUs round-robin (several workers may share one), else ``device``."""
    if not gpus:
        return [device] * workers
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(workers)]
