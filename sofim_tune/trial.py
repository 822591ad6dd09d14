"""One training run: the unit that every study repeats thousands of times.

``train_trial`` knows nothing of Optuna or Ray. It takes a plain :class:`TrialConfig` and an
optional reporter, and returns a :class:`TrialResult`. The data lives on the device for the
whole run (``sofim_tune.data``), so an epoch is a loop over index batches.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from sofim_tune import interrupts
from sofim_tune.data import LoadedData, Split, check_augment, load_data
from sofim_tune.errors import TrialPruned, UserInputError
from sofim_tune.models import build_model
from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, build_optimizer, hyperparameter_problem
from sofim_tune.schedules import build_scheduler, schedule_problem

TrialStatus = Literal["completed", "pruned", "diverged", "failed"]

# Reading the loss on the host stalls an accelerator's queue; every this many batches is
# often enough to stop a diverged run early and rare enough to cost nothing.
DIVERGENCE_CHECK_INTERVAL = 32
# SOFIM's ‖m̂‖²/ρ is sampled every this many steps (a pass over the moments, no host sync)
# and read back with the epoch's metrics; the trial reports the median of the samples.
FISHER_SAMPLE_INTERVAL = 8


class Reporter(Protocol):
    """Receives the metrics after every epoch; may raise :class:`TrialPruned` (or Optuna's) to stop the run."""

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None: ...


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs.

    Attributes:
        dataset: a registry name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``,
            ``cifar100``, ``svhn``) or the path to an ImageFolder.
        arch: a registry architecture; None takes the dataset's default.
        optimizer: ``sofim``, ``sofim-tensor`` (a Fisher block per tensor), ``sgd-momentum`` or ``adamw``.
        hyperparameters: the optimizer's settings (``lr``, ``rho``, ``beta1``, ...), each finite:
            ``lr`` > 0, ``rho`` > 0, ``beta1`` and ``momentum`` in [0, 1), ``weight_decay`` >= 0
            (``sofim_tune.optim.HYPERPARAMETER_DOMAINS``).
        epochs: passes over the training split, >= 1.
        batch_size: examples per step, >= 1.
        seed: seeds the weights, the batch order and the augmentation.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        data_dir: folder holding torchvision datasets; None uses ``$SOFIM_TUNE_DATA`` or the cache.
        download: let torchvision download missing files.
        val_fraction: share of the training data held out for validation, in (0, 1).
        split_seed: seeds the train/validation split; fixed across a study.
        final_seed: the split seed of the study's search, whose final images this run never
            validates on (``sofim_tune.data.load_data``); None (search trials, runs of your
            own) splits as ``split_seed`` alone says.
        final: a final run: train on every image but the study's final ones and validate on
            them (``final_seed`` required); the result then lists, per final image, whether
            the trained model classified it right (``TrialResult.val_correct``).
        evaluate_test: also measure the test split after the last epoch.
        augment: the training augmentation, one of ``none``, ``crop`` (random 4-pixel
            shift), ``flip`` (horizontal mirror) and ``crop-flip``; None takes the
            dataset's default (``DatasetInfo.augment``; the result records which).
        image_size: resize an ImageFolder's images to this square side (>= 8); None keeps
            a folder's native size where it can (see ``sofim_tune.data.dataset_info_for``).
            A registry dataset accepts only its own size.
        schedule: the learning-rate schedule, stepped per batch over the full ``epochs``
            (``constant``, ``cosine`` or ``warmup-cosine``; see :mod:`sofim_tune.schedules`).
        warmup_epochs: linear warm-up of ``warmup-cosine``, in epochs (>= 1, < ``epochs``).
        label_smoothing: cross-entropy label smoothing, in [0, 1).
        decoupled_weight_decay: SOFIM's ``weight_decay`` shrinks θ by (1 − ηλ) (as AdamW)
            instead of adding λθ to the gradient (as SGD). AdamW is always decoupled; SGD
            cannot be.
    """

    dataset: str = "digits"
    arch: str | None = None
    optimizer: str = "sofim"
    hyperparameters: Mapping[str, float] = field(default_factory=lambda: {"lr": 0.1, "rho": 1.0, "beta1": 0.9})
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    split_seed: int = 0
    final_seed: int | None = None
    final: bool = False
    evaluate_test: bool = False
    augment: str | None = None
    image_size: int | None = None
    schedule: str = "constant"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    decoupled_weight_decay: bool = False

    def validate(self) -> None:
        """Raise :class:`UserInputError` for a value no run can use."""
        if self.optimizer not in OPTIMIZER_HYPERPARAMETERS:
            raise UserInputError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_HYPERPARAMETERS)}")
        unknown = set(self.hyperparameters) - set(OPTIMIZER_HYPERPARAMETERS[self.optimizer])
        if unknown:
            raise UserInputError(f"optimizer {self.optimizer} takes no {', '.join(sorted(unknown))}")
        for name, value in {"lr": None, **self.hyperparameters}.items():
            problem = hyperparameter_problem(name, value)
            if problem is not None:
                raise UserInputError(problem)
        if self.epochs < 1:
            raise UserInputError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserInputError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserInputError(f"val fraction must lie in (0, 1), got {self.val_fraction}")
        if self.final and self.final_seed is None:
            raise UserInputError("a final run needs final_seed, the split seed of the study whose final images it validates on")
        if self.augment is not None:
            check_augment(self.augment)
        if self.image_size is not None and not (isinstance(self.image_size, int) and self.image_size >= 8):
            raise UserInputError(f"image size must be an integer of at least 8 pixels, got {self.image_size}")
        problem = schedule_problem(self.schedule, self.warmup_epochs, self.epochs)
        if problem is not None:
            raise UserInputError(problem[1])
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserInputError(f"label smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.decoupled_weight_decay and self.optimizer == "sgd-momentum":
            raise UserInputError("torch.optim.SGD adds weight decay to the gradient; it has no decoupled form")


@dataclass
class TrialResult:
    """What one run measured.

    Attributes:
        status: ``completed``; ``pruned`` (the reporter stopped it); ``diverged`` (a
            non-finite loss, at ``diverged_epoch``); ``failed`` (an error, in ``error``).
        metrics: the last epoch's ``val_accuracy`` (0..1), ``val_loss``, ``train_loss``
            (mean cross-entropy, nats), ``test_accuracy`` when asked for, and for SOFIM
            ``fisher_ratio``: the median of ‖m̂‖²/ρ over the steps so far (sampled every
            ``FISHER_SAMPLE_INTERVAL`` steps; see :meth:`SOFIM.fisher_ratio`).
        history: the metrics of every finished epoch, in order.
        epochs: epochs finished.
        seconds: wall-clock time of the whole run, data loading included.
        device: where it ran (``cpu``, ``cuda:0``).
        arch: the architecture used.
        config: the settings as given.
        augment: the training augmentation used: ``config.augment``, or the dataset's
            default when that is None.
        preprocessing: what loading did to the images, in words (``DatasetInfo.preprocessing``).
        val_correct: final runs only (``config.final``): per validation image, in index order,
            1 where the trained model classified it right, else 0 (all 0 for a run that did not
            complete); None otherwise.
    """

    status: TrialStatus
    metrics: dict[str, float]
    history: list[dict[str, float]]
    epochs: int
    seconds: float
    device: str
    arch: str
    config: TrialConfig
    diverged_epoch: int | None = None
    error: str | None = None
    augment: str | None = None
    preprocessing: str | None = None
    val_correct: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"]["hyperparameters"] = dict(self.config.hyperparameters)
        return out


def pruning_exceptions() -> tuple[type[Exception], ...]:
    """What a reporter raises to stop a run early: :class:`TrialPruned`, and Optuna's
    ``TrialPruned`` once Optuna is loaded (a reporter cannot raise it before), so that this
    module never imports Optuna."""
    optuna_exceptions = sys.modules.get("optuna.exceptions")
    return (TrialPruned,) if optuna_exceptions is None else (TrialPruned, optuna_exceptions.TrialPruned)


def trial_optimizer(config: TrialConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer a run of ``config`` trains ``params`` with (checked: ``UserInputError``)."""
    try:
        return build_optimizer(config.optimizer, params, dict(config.hyperparameters), decoupled_weight_decay=config.decoupled_weight_decay)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserInputError(f"device {name} is not available on this machine")
    return device


@functools.lru_cache(maxsize=2)
def _cached_data(
    dataset: str,
    device: torch.device,
    data_dir: str | None,
    download: bool,
    val_fraction: float,
    split_seed: int,
    with_test: bool,
    image_size: int | None,
    final_seed: int | None,
    final: bool,
) -> LoadedData:
    # The trials of a study share one dataset; decoding it once per process is what makes
    # a worker's second trial start at once. The augmentation is no part of the key: it is
    # applied per batch, so trials with different modes share the decoded images.
    return load_data(
        dataset,
        device=device,
        data_dir=data_dir,
        download=download,
        val_fraction=val_fraction,
        split_seed=split_seed,
        with_test=with_test,
        image_size=image_size,
        final_seed=final_seed,
        final=final,
    )


def clear_data_cache() -> None:
    """Drop the datasets this process keeps for its next trials."""
    _cached_data.cache_clear()


def prepare_trial(config: TrialConfig) -> LoadedData:
    """Validate ``config``, load its data (cached per process) and check its architecture.

    Raises :class:`UserInputError` for anything a run could not start with, so that callers
    can check their input before they show progress or write results.
    """
    data = _validated_data(config)
    build_model(config.arch or data.info.default_arch, data.info)
    return data


def _validated_data(config: TrialConfig) -> LoadedData:
    config.validate()
    device = resolve_device(config.device)
    return _cached_data(config.dataset, device, config.data_dir, config.download, config.val_fraction, config.split_seed, config.evaluate_test, config.image_size, config.final_seed, config.final)


def _evaluate(model: torch.nn.Module, split: Split, batch_size: int, autocast: contextlib.AbstractContextManager[Any]) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy and accuracy over a split, with one host sync at the end, and per
    image, in order, whether the prediction is right (a bool tensor left on the device)."""
    model.eval()
    loss_sum = None
    correct = []
    with torch.no_grad(), autocast:
        for x, y in split.batches(max(batch_size, 512), shuffle=False, augment="none"):
            logits = model(x).float()
            batch_loss = F.cross_entropy(logits, y, reduction="sum")
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct.append(logits.argmax(dim=1) == y)
    right = torch.cat(correct)
    totals = torch.stack([loss_sum, right.sum().to(loss_sum.dtype)]).tolist()
    return totals[0] / len(split), totals[1] / len(split), right


def train_trial(config: TrialConfig, reporter: Reporter | None = None, *, data: LoadedData | None = None) -> TrialResult:
    """Train once with ``config``; call ``reporter.report(epoch, metrics)`` after each epoch.

    ``data`` trains on splits you already hold (see :func:`sofim_tune.data.data_from_tensors`)
    instead of loading ``config.dataset``; it must live on ``config.device``, and
    ``config.image_size``, when given, must be its size.

    Bad settings raise :class:`UserInputError` before any work. A non-finite loss ends the
    run with status ``diverged``; a :class:`TrialPruned` (or ``optuna.TrialPruned``) from the
    reporter ends it with status ``pruned``; any other error inside the run gives status ``failed``. The same
    config (seed included) gives the same numbers on the CPU.
    """
    started = time.perf_counter()
    # Not prepare_trial: it builds a model only to check the architecture, and the build
    # below does that check already, once per trial.
    if data is None:
        data = _validated_data(config)
    else:
        config.validate()
    device = resolve_device(config.device)
    data_device = getattr(data.train, "device", device)
    if data_device.type != device.type or (data_device.index or 0) != (device.index or 0):
        raise UserInputError(f"the data lives on {data_device} but the run is on {device}; load it with device={str(device)!r}")
    if config.image_size is not None and config.image_size != data.info.image_size:
        side = data.info.image_size
        raise UserInputError(f"the data's images are {side}x{side}, not the image size {config.image_size} asked for")
    arch = config.arch or data.info.default_arch
    augment = config.augment if config.augment is not None else data.info.augment
    history: list[dict[str, float]] = []

    def result(status: TrialStatus, **extra: Any) -> TrialResult:
        return TrialResult(
            status=status,
            metrics=dict(history[-1]) if history else {},
            history=history,
            epochs=len(history),
            seconds=time.perf_counter() - started,
            device=str(device),
            arch=arch,
            config=config,
            augment=augment,
            preprocessing=data.info.preprocessing,
            # A final run that did not complete classified no final image right.
            **{"val_correct": [0] * len(data.val) if config.final else None, **extra},
        )

    torch.manual_seed(config.seed)
    model = build_model(arch, data.info).to(device)
    optimizer = trial_optimizer(config, model.parameters())
    # The schedule spans the full budget, also for a trial the pruner stops early.
    scheduler = build_scheduler(optimizer, config.schedule, steps_per_epoch=math.ceil(len(data.train) / config.batch_size), epochs=config.epochs, warmup_epochs=config.warmup_epochs)
    on_cuda = device.type == "cuda"
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    # bf16 autocast keeps float32 master weights; on the CPU it would only slow things down.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    fisher_ratio = getattr(optimizer, "fisher_ratio", None)
    fisher_samples: list[float] = []
    pending_samples: list[torch.Tensor] = []
    step = 0

    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            loss_sum = torch.zeros((), device=device)
            for batch, (x, y) in enumerate(data.train.batches(config.batch_size, shuffle=True, augment=augment, generator=generator), 1):
                interrupts.check()  # a Ctrl-C that the garbage collector swallowed stops here
                if on_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                if fisher_ratio is not None and (step - 1) % FISHER_SAMPLE_INTERVAL == 0:
                    pending_samples.append(fisher_ratio())
                loss_sum += loss.detach().float() * len(y)
                if batch % DIVERGENCE_CHECK_INTERVAL == 0 and not math.isfinite(loss_sum.item()):
                    return result("diverged", diverged_epoch=epoch)
            train_loss = loss_sum.item() / len(data.train)
            val_loss, val_accuracy, val_right = _evaluate(model, data.val, config.batch_size, autocast)
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                return result("diverged", diverged_epoch=epoch)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy})
            if pending_samples:
                fisher_samples += torch.stack(pending_samples).tolist()
                pending_samples.clear()
                history[-1]["fisher_ratio"] = statistics.median(fisher_samples)
            if reporter is not None:
                reporter.report(epoch, history[-1])
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failure inside the run is a result, not a crash
        if isinstance(exc, pruning_exceptions()):
            return result("pruned")
        return result("failed", error=f"{type(exc).__name__}: {exc}")

    if config.evaluate_test and data.test is not None:
        _, test_accuracy, _ = _evaluate(model, data.test, config.batch_size, autocast)
        history[-1]["test_accuracy"] = test_accuracy
    if config.final:
        # The last epoch's validation: the trained model's outcome on each final image.
        return result("completed", val_correct=val_right.int().tolist())
    return result("completed")
