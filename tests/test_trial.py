"""train_trial: learning, reproducibility, divergence, pruning, and the `train` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fake_datasets import pattern_images, write_image_folder, write_pattern_folder

from sofim_tune import TrialPruned, UserInputError
from sofim_tune.data import DatasetInfo, data_from_tensors
from sofim_tune.trial import TrialConfig, prepare_trial, train_trial

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


def test_a_reporter_raising_optunas_trial_pruned_stops_the_run_as_pruned():
    import optuna

    class OptunaStyle:
        def report(self, epoch, metrics):
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    result = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=3), OptunaStyle())
    assert result.status == "pruned" and result.epochs == 1 and result.error is None


def test_the_trial_modules_import_neither_optuna_nor_ray():
    """train_trial and TrialBatch run inside Ray members that import only Ray, and know nothing of Optuna."""
    code = "import sys, sofim_tune.trial, sofim_tune.batched; print(sorted(m for m in ('optuna', 'ray') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


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
        (dict(hyperparameters={"lr": float("inf"), "rho": 1.0, "beta1": 0.9}), "lr must be finite, got inf"),
        (dict(hyperparameters={"lr": 0.1, "rho": float("inf"), "beta1": 0.9}), "rho must be finite, got inf"),
        (dict(hyperparameters={"lr": 0.1, "rho": 1.0, "beta1": 0.9, "weight_decay": float("inf")}), "weight_decay must be finite, got inf"),
        (dict(optimizer="adamw", hyperparameters={"lr": float("-inf")}), "lr must be finite, got -inf"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(dataset="imagenet"), "'imagenet' is neither a dataset name"),
        (dict(arch="transformer"), "transformer"),
        (dict(optimizer="lion"), "unknown optimizer 'lion'"),
        (dict(augment="rotate"), "unknown augmentation 'rotate'; choose one of none, crop, flip, crop-flip"),
        (dict(augment=True), "unknown augmentation True"),
        (dict(image_size=4), "image size must be an integer of at least 8"),
        (dict(image_size=16), "digits images are 8x8; an image size applies only to ImageFolder datasets"),
    ],
)
def test_bad_settings_raise_user_input_error(changes, message):
    config = TrialConfig(**{**DIGITS, "hyperparameters": SOFIM_SETTINGS, "epochs": 1, **changes})
    with pytest.raises(UserInputError, match=message):
        train_trial(config)


# ----------------------------------------------------------------------------- augmentation and folders


def test_result_records_the_augmentation_and_preprocessing():
    default = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=1))
    assert default.augment == "none" and default.config.augment is None
    assert default.preprocessing == "grayscale, native 8x8, no resize (pixel values 0..16 scaled to 0..255)"
    out = default.to_dict()
    assert out["augment"] == "none" and out["config"]["augment"] is None and out["config"]["image_size"] is None
    assert json.loads(json.dumps(out))["preprocessing"] == default.preprocessing


def test_augment_overrides_the_dataset_default():
    cropped = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=1, augment="crop"))
    plain = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=1, augment="none"))
    default = train_trial(TrialConfig(**DIGITS, hyperparameters=SOFIM_SETTINGS, epochs=1))
    assert cropped.augment == "crop" and cropped.to_dict()["config"]["augment"] == "crop"
    assert plain.history == default.history  # digits' default is "none"
    assert cropped.history != plain.history


def test_image_size_reaches_the_folder_and_keys_the_data_cache(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], 3, size=(16, 16), mode="L")
    settings = dict(dataset=str(tmp_path), device="cpu", val_fraction=0.5)
    native = prepare_trial(TrialConfig(**settings))
    resized = prepare_trial(TrialConfig(**settings, image_size=24))
    assert (native.info.image_size, resized.info.image_size) == (16, 24)
    assert native.train.images.shape[1:] == (1, 16, 16) and resized.train.images.shape[1:] == (1, 24, 24)


def test_image_size_must_match_data_given_directly():
    info = DatasetInfo("tensors", 2, 1, 8, "mlp")
    images, labels = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    data = data_from_tensors(info, images, labels, images, labels)
    with pytest.raises(UserInputError, match="images are 8x8, not the image size 16"):
        train_trial(TrialConfig(dataset="tensors", device="cpu", epochs=1, image_size=16), data=data)


def test_grayscale_folder_trains_like_the_same_images_as_tensors(tmp_path):
    """The issue's case: a folder of grayscale 28×28 images against the same pixels as tensors.

    The classes come in mirror pairs (blob left/right, stripe \\ and /), so a flip, a
    colour conversion or a resize slipped into the folder path shows as lost accuracy.
    """
    train, val = pattern_images(60, seed=0), pattern_images(20, seed=1)
    write_pattern_folder(tmp_path / "train", train)
    write_pattern_folder(tmp_path / "val", val)
    settings = dict(
        arch="cnn", hyperparameters={"lr": 0.05, "rho": 1.0, "beta1": 0.9}, epochs=3, batch_size=32, seed=0, device="cpu", augment="none"
    )
    from_folder = train_trial(TrialConfig(dataset=str(tmp_path), **settings))

    info = DatasetInfo("patterns", len(train.classes), 1, 28, "cnn")
    tensors = data_from_tensors(
        info, torch.from_numpy(train.images), torch.from_numpy(train.labels), torch.from_numpy(val.images), torch.from_numpy(val.labels)
    )
    from_tensors = train_trial(TrialConfig(dataset="patterns", **settings), data=tensors)

    assert from_folder.status == from_tensors.status == "completed"
    assert from_folder.preprocessing == "grayscale, native 28x28, no resize" and from_folder.augment == "none"
    folder_accuracy, tensor_accuracy = from_folder.metrics["val_accuracy"], from_tensors.metrics["val_accuracy"]
    assert tensor_accuracy >= 0.7, "the patterns should be learnable in three epochs"
    assert abs(folder_accuracy - tensor_accuracy) <= 0.01


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
        (["--lr", "inf"], "lr must be finite"),
        (["--lr", "1e309"], "lr must be finite"),
        (["--weight-decay", "inf"], "weight_decay must be finite"),
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
