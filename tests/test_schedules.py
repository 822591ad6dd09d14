"""Per-batch learning-rate schedules: the closed forms of cosine decay and linear warm-up."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sofim_tune import SOFIM
from sofim_tune.errors import UserInputError
from sofim_tune.schedules import build_scheduler


def lrs(schedule: str, *, steps_per_epoch: int = 5, epochs: int = 4, warmup_epochs: int = 0, lr: float = 0.4) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = SOFIM([param], lr=lr, rho=1.0)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=warmup_epochs)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when step() order is wrong
        for _ in range(steps_per_epoch * epochs):
            seen.append(optimizer.param_groups[0]["lr"])
            param.grad = torch.ones(3)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return seen


def test_constant():
    assert lrs("constant") == [0.4] * 20


def test_cosine_is_the_closed_form_over_the_whole_budget():
    total = 20
    assert lrs("cosine") == pytest.approx([0.2 * (1 + math.cos(math.pi * t / total)) for t in range(total)])


def test_warmup_then_cosine():
    warm, total = 5, 20
    expected = [0.4 * (1 / warm + (1 - 1 / warm) * t / warm) for t in range(warm)]
    expected += [0.2 * (1 + math.cos(math.pi * (t - warm) / (total - warm))) for t in range(warm, total)]
    assert lrs("warmup-cosine", warmup_epochs=1) == pytest.approx(expected)


@pytest.mark.parametrize(
    "schedule, warmup, message",
    [("step", 0, "unknown schedule"), ("warmup-cosine", 0, "warm-up must be"), ("warmup-cosine", 4, "warm-up must be"), ("cosine", 1, "warm-up must be")],
)
def test_bad_schedules_are_refused(schedule, warmup, message):
    with pytest.raises(UserInputError, match=message):
        lrs(schedule, warmup_epochs=warmup)
