"""train_trial: learning, reproducibility, divergence, pruning, and the `train` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sofim_tune import TrialPruned, UserInputError
from sofim_tune.trial import TrialConfig, train_trial

DIGITS = dict(dataset="digits", arch="mlp", device="cpu", batch_size=64)
SOFIM_SETTINGS = {"lr": 0.1, "rho": 0.1, "beta1": 0.9}


def test_digits_mlp_learns_with_sofim():
    result = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=10))
    assert result.status == "completed"
    assert result.epochs == 10 and len(result.history) == 10
    assert result.metrics["val_accuracy"] >= 0.90
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_same_numbers_and_other_seed_other_numbers():
    config = TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=3, seed=7)
    first, second = train_trial(config), train_trial(config)
    assert first.history == second.history
    other = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=3, seed=8))
    assert other.history != first.history


def test_divergence_is_a_result_with_its_epoch():
    result = train_trial(TrialConfig(**DIGITS, optimizer="sgd-momentum", hyperparameters={"lr": 1e4, "momentum": 0.9}, epochs=5))
    assert result.status == "diverged"
    assert result.diverged_epoch == 1
    assert result.epochs == 0


def test_reporter_can_stop_the_run():
    seen = []

    class StopAtTwo:
        def report(self, epoch, metrics):
            seen.append((epoch, set(metrics)))
            if epoch == 2:
                raise TrialPruned

    result = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=6), StopAtTwo())
    assert result.status == "pruned" and result.epochs == 2
    # SOFIM's runs also report the median ‖m̂‖²/ρ so far (tests/test_selection.py checks its value).
    assert seen[0] == (1, {"epoch", "train_loss", "val_loss", "val_accuracy", "fisher_ratio"})


def test_an_error_inside_the_run_is_a_failed_result():
    class Broken:
        def report(self, epoch, metrics):
            raise RuntimeError("disk full")

    result = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=2), Broken())
    assert result.status == "failed" and "disk full" in result.error


@pytest.mark.parametrize("optimizer, hyperparameters", [("sgd-momentum", {"lr": 0.05, "momentum": 0.9}), ("adamw", {"lr": 1e-3, "beta1": 0.9})])
def test_baselines_train(optimizer, hyperparameters):
    result = train_trial(TrialConfig(**DIGITS, optimizer=optimizer, hyperparameters=hyperparameters, epochs=2))
    assert result.status == "completed" and result.metrics["val_accuracy"] > 0.5


def test_test_split_only_when_asked():
    config = TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=2)
    assert "test_accuracy" not in train_trial(config).metrics
    with_test = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=2, evaluate_test=True))
    assert 0.0 < with_test.metrics["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hyperparameters={"lr": 0.0, "rho": 1.0, "beta1": 0.9}), "lr must be > 0"),
        (dict(hyperparameters={"lr": 0.1, "rho": 0.0, "beta1": 0.9}), "rho must be > 0"),
        (dict(hyperparameters={"lr": 0.1, "rho": 1.0, "beta1": 1.0}), r"beta1 must lie in \[0, 1\)"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(dataset="imagenet"), "'imagenet' is neither a dataset name"),
        (dict(arch="transformer"), "transformer"),
        (dict(optimizer="lion"), "unknown optimizer 'lion'"),
    ],
)
def test_bad_settings_raise_user_input_error(changes, message):
    config = TrialConfig(**{**DIGITS, "hyperparameters": SOFIM_SETTINGS, "epochs": 1, **changes})
    with pytest.raises(UserInputError, match=message):
        train_trial(config)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_command_prints_json_last():
    done = run_cli("train", "--dataset", "digits", "--lr", "0.1", "--rho", "0.1", "--beta1", "0.9", "--epochs", "2", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["device"] == "cpu"
    assert {"val_accuracy", "val_loss", "train_loss", "seconds"} <= set(summary)
    assert summary["settings"]["lr"] == 0.1 and summary["settings"]["arch"] == "mlp"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "neither a dataset name"),
        (["--arch", "transformer"], "transformer"),
        (["--lr", "0"], "lr must be > 0"),
        (["--rho", "-1"], "rho must be > 0"),
        (["--beta1", "1.5"], "beta1"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], "--download"),
        (["--dataset", "{tmp}/no-such-folder"], "no-such-folder"),
    ],
)
def test_train_command_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    done = run_cli("train", "--device", "cpu", "--epochs", "1", *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
