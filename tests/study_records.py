"""Realistic :class:`StudyRecord` objects for tests of export and plots, built without training.

The synthetic validation accuracy mirrors SOFIM's geometry: it peaks on the diagonal
``lr / rho = OPTIMAL_RATIO`` of the (lr, rho) plane (only ``lr / rho`` matters while
``||m||^2 << rho``), falls off with distance from it, and depends weakly on ``beta1``.
Trials whose bound on the step length ``lr / (2 sqrt(rho))`` is large diverge.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np

from sofim_tune.records import Confirmation, StudyRecord, TrialRecord

OPTIMAL_RATIO = 0.25  # lr / rho at the peak of the synthetic metric
PEAK_ACCURACY = 0.72
CHANCE_ACCURACY = 0.01  # CIFAR-100: 100 classes
EPOCHS = 10
DIVERGENCE_STEP = 3.0  # trials with lr / (2 sqrt(rho)) above this diverge
CONFIRM_SEEDS = [11, 12, 13]
START = datetime(2026, 11, 28, 3, 0, tzinfo=timezone.utc)


def synthetic_accuracy(lr: float, rho: float, beta1: float) -> float:
    """Final validation accuracy in [CHANCE_ACCURACY, PEAK_ACCURACY] of one setting."""
    off_diagonal = math.log10(lr / rho) - math.log10(OPTIMAL_RATIO)  # decades away
    penalty = 0.12 * off_diagonal**2 + 0.4 * (beta1 - 0.9) ** 2
    return max(CHANCE_ACCURACY, PEAK_ACCURACY - penalty)


def _curve(final: float, epochs: int) -> dict[int, float]:
    """Per-epoch accuracy rising from chance towards ``final`` (1-based epochs)."""
    return {
        e: CHANCE_ACCURACY + (final - CHANCE_ACCURACY) * (1.0 - math.exp(-e / 3.0))
        / (1.0 - math.exp(-epochs / 3.0))
        for e in range(1, epochs + 1)
    }


def make_study(
    n_trials: int = 40,
    *,
    seed: int = 0,
    running: int = 0,
    confirmations: bool = True,
    storage: str = "sqlite:///runs/cifar100-resnet18/study.db",
) -> StudyRecord:
    """A SOFIM study on cifar100 x resnet18 with ``n_trials`` finished or failed trials.

    About a third of the trials that do not diverge are pruned (the worst ones, after 2 to
    5 epochs), trials with a large step bound diverge (``attrs["reason"] == "diverged"``),
    trial 3 fails, and ``running`` extra trials are still running (so the study is not
    finished when ``running > 0``). With ``confirmations``, the three best configurations
    were retrained with three seeds each.
    """
    rng = np.random.default_rng(seed)
    trials: list[TrialRecord] = []
    for number in range(n_trials):
        # Like TPE after warm-up: half of the trials sample near the good diagonal.
        lr = float(10 ** rng.uniform(-4, 1))
        if number >= 10 and rng.random() < 0.5:
            rho = float(min(10.0, max(1e-4, lr / OPTIMAL_RATIO * 10 ** rng.normal(0, 0.3))))
        else:
            rho = float(10 ** rng.uniform(-4, 1))
        params = {"lr": lr, "rho": rho, "beta1": float(rng.uniform(0.5, 0.999))}
        started = START + timedelta(minutes=5 * number)
        final = min(1.0, synthetic_accuracy(**params) + float(rng.normal(0, 0.005)))
        curve = _curve(final, EPOCHS)
        if number == 3:
            trial = TrialRecord(number, "failed", params, None, {},
                                {"error": "CUDA error: an illegal memory access"}, started)
        elif lr / (2 * math.sqrt(rho)) > DIVERGENCE_STEP:
            epoch = int(rng.integers(1, 4))
            intermediate = {e: curve[e] for e in range(1, epoch)} | {epoch: CHANCE_ACCURACY}
            trial = TrialRecord(number, "pruned", params, None, intermediate,
                                {"reason": "diverged", "diverged_epoch": epoch}, started,
                                started + timedelta(minutes=epoch))
        elif final < 0.45 and rng.random() < 0.8:
            epoch = int(rng.integers(2, 6))
            trial = TrialRecord(number, "pruned", params, None,
                                {e: curve[e] for e in range(1, epoch + 1)},
                                {"reason": "pruned"}, started, started + timedelta(minutes=epoch))
        else:
            trial = TrialRecord(number, "complete", params, final, curve, {}, started,
                                started + timedelta(minutes=EPOCHS))
        trials.append(trial)
    done = sum(t.state in ("complete", "pruned") for t in trials)
    trials += [
        TrialRecord(n_trials + i, "running", {"lr": 0.01, "rho": 0.04, "beta1": 0.9}, None,
                    {1: 0.2}, {}, START + timedelta(minutes=5 * (n_trials + i)))
        for i in range(running)
    ]
    return StudyRecord(
        name="cifar100-resnet18",
        backend="optuna",
        storage=storage,
        dataset="cifar100",
        arch="resnet18",
        optimizer="sofim",
        space="sofim",
        log_params=frozenset({"lr", "rho"}),
        metric="val_accuracy",
        direction="maximize",
        sampler="tpe",
        pruner="hyperband",
        epochs=EPOCHS,
        batch_size=256,
        fixed={"weight_decay": 0.0},
        trials=trials,
        target_trials=done + running,
        confirmations=_confirm(trials, rng) if confirmations else [],
        created=START,
    )


def _confirm(trials: list[TrialRecord], rng: np.random.Generator) -> list[Confirmation]:
    """Three-seed retraining of the three best completed trials, with seed noise."""
    best = sorted((t for t in trials if t.state == "complete"), key=lambda t: -t.value)[:3]
    return [
        Confirmation(
            params=dict(t.params),
            seeds=list(CONFIRM_SEEDS),
            values=[t.value + float(rng.normal(0, 0.004)) for _ in CONFIRM_SEEDS],
            test_accuracy=t.value - 0.01,
        )
        for t in best
    ]
