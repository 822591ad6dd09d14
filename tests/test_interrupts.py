"""Ctrl-C that the garbage collector swallows still stops training (sofim_tune/interrupts.py)."""

from __future__ import annotations

import gc
import os
import signal
import weakref

import pytest

from sofim_tune import interrupts
from sofim_tune.batched import TrialBatch
from sofim_tune.trial import TrialConfig, prepare_trial, train_trial

# The dropped KeyboardInterrupt is what these tests provoke; pytest would report it as a warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = TrialConfig(dataset="digits", arch="mlp", device="cpu", batch_size=64, epochs=2, hyperparameters={"lr": 0.1, "rho": 1.0, "beta1": 0.9})


class _Collected:
    pass


def swallowed_ctrl_c() -> None:
    """Deliver SIGINT while a weakref callback runs, where Python prints the KeyboardInterrupt
    ("Exception ignored in ...") and drops it, as it does when the collector runs one."""

    def callback(_ref: weakref.ref) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs at one of these bytecodes, inside the callback
            pass

    collected = _Collected()
    ref = weakref.ref(collected, callback)
    del collected
    gc.collect()
    assert ref() is None


def test_a_swallowed_ctrl_c_stops_the_next_batch_of_a_trial():
    with interrupts.catching():
        swallowed_ctrl_c()  # returns: Python dropped the KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            train_trial(CONFIG)
    assert train_trial(CONFIG).status == "completed"  # outside the block nothing is remembered


def test_a_swallowed_ctrl_c_stops_the_next_batch_of_a_batched_epoch():
    batch = TrialBatch(prepare_trial(CONFIG), arch="mlp", optimizer="sofim", batch_size=64, slots=1)
    batch.add(CONFIG)
    with interrupts.catching():
        swallowed_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            batch.train_epoch()


def test_ctrl_c_raises_at_once_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.catching(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass
    assert signal.getsignal(signal.SIGINT) is before
    interrupts.check()  # nothing remembered after the block
