"""Learning-rate schedules of a training recipe, stepped once per batch, built from torch's own.

A schedule spans the trial's whole budget (``epochs × steps_per_epoch`` batches) even when a
pruner stops the trial early, so that trials of one study are compared at the same point of
the same schedule.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from sofim_tune.choices import SCHEDULES
from sofim_tune.errors import UserInputError

__all__ = ["SCHEDULES", "build_scheduler", "schedule_problem"]

# SCHEDULES: ``constant``, the optimizer's lr throughout; ``cosine``, cosine decay to 0 over the
# budget; ``warmup-cosine``, linear warm-up over ``warmup_epochs``, then cosine decay to 0.


def schedule_problem(schedule: object, warmup_epochs: int, epochs: int) -> tuple[str, str] | None:
    """What is wrong with a schedule and its warm-up, as ``(key, message)``; None when nothing is.

    The one rule that study specs, trial configs and :func:`build_scheduler` apply.
    """
    if schedule not in SCHEDULES:
        return "schedule", f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
    if (schedule == "warmup-cosine") != (warmup_epochs > 0) or not 0 <= warmup_epochs < epochs:
        return "warmup_epochs", f"warm-up must be >= 1 epoch and below the {epochs} epochs with the warmup-cosine schedule, and 0 otherwise (got {warmup_epochs} with {schedule})"
    return None


def build_scheduler(optimizer: Optimizer, schedule: str, *, steps_per_epoch: int, epochs: int, warmup_epochs: int = 0) -> LRScheduler | None:
    """The per-batch scheduler of ``schedule`` over ``epochs`` epochs; None for ``constant``.

    Call its ``step()`` after every ``optimizer.step()``. Warm-up starts at lr/W for a
    warm-up of W batches and reaches the optimizer's lr at batch W.

    Raises:
        UserInputError: an unknown schedule, or a warm-up that is not shorter than the budget.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise UserInputError(f"a schedule needs >= 1 step per epoch and >= 1 epoch, got {steps_per_epoch} and {epochs}")
    problem = schedule_problem(schedule, warmup_epochs, epochs)
    if problem is not None:
        raise UserInputError(problem[1])
    total = steps_per_epoch * epochs
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total)
    warmup = warmup_epochs * steps_per_epoch
    return SequentialLR(
        optimizer,
        [LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup), CosineAnnealingLR(optimizer, T_max=total - warmup)],
        milestones=[warmup],
    )
