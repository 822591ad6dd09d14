"""The ``sofim-tune`` Typer application: a thin layer over the Python API.

Every command parses and validates its options, calls one library function, and prints.
Bad input from a user ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sofim_tune import interrupts
from sofim_tune.choices import AUGMENT_MODES, BACKENDS, PRUNERS, SAMPLERS, SCHEDULES
from sofim_tune.errors import NothingFound, UserInputError

app = typer.Typer(
    name="sofim-tune",
    help="Find good lr, rho and beta1 for the SOFIM optimizer, and see how much they matter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
#: Where `run` and `compare` keep their studies when --storage is not given (Click's envvar).
STORAGE_ENVVAR = "SOFIM_TUNE_STORAGE"
out = Console()
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


class _LibraryLines(logging.Handler):
    """The library's notes (a widened bound) and warnings (a worker that died) as one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        label = "[yellow]warning:[/yellow]" if record.levelno >= logging.WARNING else "note:"
        err.print(f"{label} {escape(record.getMessage())}", highlight=False)


_LIBRARY_LINES = _LibraryLines()


def configure_output(*, verbose: bool = False, quiet: bool = False) -> None:
    """What the command prints besides its result; set when a command starts, never at import.

    By default the library's notes and warnings show as one line each, and Optuna's only when
    it reports an error. ``verbose`` adds Optuna's INFO lines (a trial finished, ...), ``quiet``
    leaves warnings and errors only. Optuna's ExperimentalWarning (on features it still calls
    experimental, like the heartbeat) says nothing a user can act on, and is hidden.
    """
    import warnings

    import optuna

    library_log = logging.getLogger("sofim_tune")
    library_log.setLevel(logging.WARNING if quiet else logging.INFO)
    if _LIBRARY_LINES not in library_log.handlers:
        library_log.addHandler(_LIBRARY_LINES)
    library_log.propagate = False
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _print_version(wanted: bool) -> None:
    if wanted:
        import importlib.metadata

        # From the installed metadata: importing sofim_tune would import torch first.
        out.print(f"sofim-tune {importlib.metadata.version('sofim-tune')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print Optuna's progress lines (INFO).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only warnings and errors besides the result.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print sofim-tune's version and exit. Example: `sofim-tune --version`")] = False,
) -> None:
    if verbose and quiet:
        err.print("[red]error:[/red] give --verbose or --quiet, not both", highlight=False)
        raise typer.Exit(2)
    configure_output(verbose=verbose, quiet=quiet)


def user_errors(command: F) -> F:
    """Turn a UserInputError into one line on stderr and exit code 2 (1 for NothingFound: the
    input was fine, but what it asks for does not exist yet); Ctrl-C into exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupts.catching():
                return command(*args, **kwargs)
        except UserInputError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1 if isinstance(exc, NothingFound) else 2) from None
        except KeyboardInterrupt:
            err.print("interrupted; run the same command again to resume", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# Options shared by several commands, declared once.
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="`digits`, `mnist`, `fashion-mnist`, `cifar10`, `cifar100`, `svhn`, or a path to an ImageFolder.", rich_help_panel="Data")]
ArchOpt = Annotated[Optional[str], typer.Option(help="`mlp`, `cnn`, `resnet18`, `resnet34`, `wrn-16-4` or `tv:NAME`; default: the dataset's.", rich_help_panel="Data")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Epochs per run (>= 1); default: the dataset's or the study spec's.", rich_help_panel="Budget")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for weights, batch order and augmentation.", rich_help_panel="Budget")]
DeviceOpt = Annotated[str, typer.Option(help="`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.", rich_help_panel="Parallelism")]
DataDirOpt = Annotated[Optional[str], typer.Option(help="Folder with torchvision datasets; default: $SOFIM_TUNE_DATA or ~/.cache/sofim-tune/data.", rich_help_panel="Data")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Download a missing torchvision dataset into --data-dir.", rich_help_panel="Data")]
# The values a user picks from are Literal types built from sofim_tune.choices: --help lists them,
# shell completion offers them, and Click refuses others (in one line, see main).
Augment = Literal[AUGMENT_MODES]  # type: ignore[valid-type]
Schedule = Literal[SCHEDULES]  # type: ignore[valid-type]
AugmentOpt = Annotated[Optional[Augment], typer.Option(help="Training augmentation (a random 4-pixel shift, a mirror image, or both); default: the dataset's (CIFAR crop-flip, SVHN and your folders crop, MNIST-like none).", rich_help_panel="Training recipe")]
ImageSizeOpt = Annotated[Optional[int], typer.Option(help="Resize an ImageFolder's images to this square side (8 to 1024); default: keep their size when they share one.", rich_help_panel="Data")]
ScheduleOpt = Annotated[Optional[Schedule], typer.Option(help="Learning-rate schedule, stepped per batch over all epochs; default: the spec's (constant).", rich_help_panel="Training recipe")]
WarmupOpt = Annotated[Optional[int], typer.Option(help="Warm-up epochs of `warmup-cosine` (>= 1, below --epochs).", rich_help_panel="Training recipe")]
LabelSmoothingOpt = Annotated[Optional[float], typer.Option(help="Cross-entropy label smoothing in [0, 1).", rich_help_panel="Training recipe")]
# Two flags, not a --x/--y pair: with a pair the last one given wins silently.
DecoupledOpt = Annotated[bool, typer.Option("--decoupled-weight-decay", help="SOFIM's weight decay as AdamW's (θ ← (1 − ηλ)θ).", rich_help_panel="Training recipe")]
CoupledOpt = Annotated[bool, typer.Option("--coupled-weight-decay", help="SOFIM's weight decay as SGD's (λθ added to the gradient).", rich_help_panel="Training recipe")]
SpecOpt = Annotated[Optional[str], typer.Option("--spec", help="A shipped study spec (`cifar100-resnet18`) or a path to a .toml.", rich_help_panel="Data")]
#: ``--study``, the name ``--spec`` had in run and compare: still read, hidden.
OldSpecOpt = Annotated[Optional[str], typer.Option("--study", hidden=True, help="The old name of --spec.")]
TrialsOpt = Annotated[Optional[int], typer.Option(help="Finished (completed or pruned) trials to reach (>= 1).", rich_help_panel="Budget")]
SamplerOpt = Annotated[Optional[Literal[SAMPLERS]], typer.Option(help="Optuna sampler; default: the spec's (tpe).", rich_help_panel="Search")]  # type: ignore[valid-type]
PrunerOpt = Annotated[Optional[Literal[PRUNERS]], typer.Option(help="Early stopping; default: the spec's (hyperband).", rich_help_panel="Search")]  # type: ignore[valid-type]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Trials at once, each in its own worker process; default: one per physical core on the CPU (memory and --trials permitting), 4 small-model trials per GPU. At most --trials and 4 per CPU (4 × the automatic count per GPU); more is lowered with a warning.", rich_help_panel="Parallelism")]
BatchTrialsOpt = Annotated[Optional[int], typer.Option(help="Trials each worker (Ray: each batch server) trains at once as one stacked model (MLP and CNN), e.g. --batch-trials 8; default 1: one at a time (batching did not pay on a 2-core CPU; see the README). A Ray resume keeps its experiment's.", rich_help_panel="Parallelism")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="torch threads per trial; default 1 on the CPU (a trial's numbers depend on its thread count, so a study keeps them whatever its --workers), the cores left over per worker on a GPU; at most the CPUs available, more is lowered with a warning.", rich_help_panel="Parallelism")]
LookaheadOpt = Annotated[Optional[int], typer.Option(help="Trials that may run at once (>= 1): trial i is drawn from and pruned against the trials up to i − N, all finished, so the study is the same with any --workers and --batch-trials; e.g. --lookahead 16 for 16 GPU trials at once; default: the spec's (4). Optuna backend.", rich_help_panel="Parallelism")]
ConfirmTopOpt = Annotated[Optional[int], typer.Option(help="Configurations retrained with fresh seeds before recommending (default 2; `run` runs fewer where the retraining would exceed half the search's epochs).", rich_help_panel="Budget")]
ConfirmSeedsOpt = Annotated[Optional[int], typer.Option(help="Fresh seeds (and splits) per confirmed candidate, >= 2 (default 3; `run` runs fewer, down to 2, within half the search's epochs).", rich_help_panel="Budget")]
FinalRunsOpt = Annotated[Optional[int], typer.Option(help="Retrains of the chosen setting on new seeds and on images no earlier run scored, >= 2 (default 3; `run` runs fewer, down to 2, within half the search's epochs); best.json's headline and interval come from them.", rich_help_panel="Budget")]
RunStorageEnvOpt = Annotated[Optional[str], typer.Option(help="Read the storage URL from this environment variable, so its password stays out of `ps`.")]
BackendOpt = Annotated[Literal[BACKENDS], typer.Option(help="Where trials run: Optuna's workers on this machine, or a Ray cluster.", rich_help_panel="Ray")]  # type: ignore[valid-type]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray: cluster address (`auto`, `ray://HOST:10001`); default: a local Ray.", rich_help_panel="Ray")]
GpusPerTrialOpt = Annotated[Optional[float], typer.Option(help="Ray: GPUs per trial (default 0); 0.25 puts four trials on a GPU.", rich_help_panel="Ray")]
CpusPerTrialOpt = Annotated[Optional[float], typer.Option(help="Ray: CPUs per trial (default 1).", rich_help_panel="Ray")]
MaxConcurrentOpt = Annotated[Optional[int], typer.Option(help="Ray: trials running at once.", rich_help_panel="Ray")]
StudyDatasetOpt = Annotated[Optional[str], typer.Option("--dataset", "-d", help="`digits`, `mnist`, `fashion-mnist`, `cifar10`, `cifar100`, `svhn`, or a path to an ImageFolder; may come from the --spec file.", rich_help_panel="Data")]


@app.command()
@user_errors
def train(
    dataset: DatasetOpt = "digits",
    arch: ArchOpt = None,
    optimizer: Annotated[str, typer.Option(help="`sofim`, `sofim-tensor` (a Fisher block per tensor), `sgd-momentum` or `adamw`.")] = "sofim",
    lr: Annotated[float, typer.Option(help="Learning rate η (> 0).")] = 0.1,
    rho: Annotated[float, typer.Option(help="SOFIM's regularization ρ (> 0); ignored by the baselines.")] = 1.0,
    beta1: Annotated[float, typer.Option(help="First-moment decay in [0, 1); SGD's momentum for `sgd-momentum`.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay λ (>= 0).")] = 0.0,
    epochs: EpochsOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per step; default: the dataset's.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    val_fraction: Annotated[float, typer.Option(help="Share of the training data held out for validation, in (0, 1).")] = 0.1,
    augment: AugmentOpt = None,
    image_size: ImageSizeOpt = None,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate schedule, stepped per batch over all epochs.")] = "constant",
    warmup_epochs: Annotated[int, typer.Option(help="Warm-up epochs of `warmup-cosine` (>= 1, below --epochs).")] = 0,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing in [0, 1).")] = 0.0,
    decoupled: DecoupledOpt = False,
    coupled: CoupledOpt = False,
    test: Annotated[bool, typer.Option("--test", help="Also measure accuracy on the test split at the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on the last line of stdout.")] = False,
) -> None:
    """Train once with the given settings and report validation accuracy and loss.

    Example: `sofim-tune train --dataset cifar100 --arch resnet18 --lr 0.1 --rho 0.5 --beta1 0.9 --epochs 30`
    """
    from sofim_tune.data import dataset_info_for
    from sofim_tune.trial import TrialConfig, prepare_trial, train_trial

    decoupled_weight_decay = bool(_weight_decay_kind(decoupled, coupled))
    info = dataset_info_for(dataset, image_size)
    hyperparameters = {
        "sofim": {"lr": lr, "rho": rho, "beta1": beta1, "weight_decay": weight_decay},
        "sofim-tensor": {"lr": lr, "rho": rho, "beta1": beta1, "weight_decay": weight_decay},
        "sgd-momentum": {"lr": lr, "momentum": beta1, "weight_decay": weight_decay},
        "adamw": {"lr": lr, "beta1": beta1, "weight_decay": weight_decay},
    }.get(optimizer, {"lr": lr})
    config = TrialConfig(
        dataset=dataset,
        arch=arch,
        optimizer=optimizer,
        hyperparameters=hyperparameters,
        epochs=epochs if epochs is not None else info.default_epochs,
        batch_size=batch_size if batch_size is not None else info.default_batch_size,
        seed=seed if seed is not None else 0,
        device=device,
        data_dir=data_dir,
        download=download,
        val_fraction=val_fraction,
        evaluate_test=test,
        augment=augment,
        image_size=image_size,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    prepare_trial(config)
    with Progress(TextColumn("epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=as_json) as bar:
        task = bar.add_task("", total=config.epochs)

        class _Bar:
            def report(self, epoch: int, metrics: dict[str, float]) -> None:
                bar.update(task, completed=epoch, description=f"val_acc {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}")

        result = train_trial(config, _Bar())
    summary = {
        "status": result.status,
        "val_accuracy": result.metrics.get("val_accuracy"),
        "val_loss": result.metrics.get("val_loss"),
        "train_loss": result.metrics.get("train_loss"),
        "test_accuracy": result.metrics.get("test_accuracy"),
        "epochs": result.epochs,
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "preprocessing": result.preprocessing,
        "fisher_ratio": result.metrics.get("fisher_ratio"),
        "settings": {
            "dataset": dataset, "arch": result.arch, "optimizer": optimizer, **hyperparameters, "epochs": config.epochs, "batch_size": config.batch_size, "seed": config.seed,
            "augment": result.augment, "image_size": image_size, "schedule": schedule, "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing,
            "decoupled_weight_decay": decoupled_weight_decay,
        },
    }
    if result.status == "diverged":
        summary["diverged_epoch"] = result.diverged_epoch
    if result.error:
        summary["error"] = result.error
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"{dataset} · {result.arch} · {optimizer}", show_header=False)
    for key in ("status", "val_accuracy", "val_loss", "train_loss", "test_accuracy", "fisher_ratio", "diverged_epoch", "epochs", "seconds", "device", "preprocessing", "error"):
        if summary.get(key) is not None:
            value = summary[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def _weight_decay_kind(decoupled: bool, coupled: bool) -> bool | None:
    """True for --decoupled-weight-decay, False for --coupled-weight-decay, None for neither."""
    if decoupled and coupled:
        raise UserInputError("give --decoupled-weight-decay or --coupled-weight-decay, not both")
    return True if decoupled else (False if coupled else None)


def _path(value: str | None, option: str) -> Path | None:
    """The path an option names; None when not given. An empty one would mean the working folder."""
    if value is None:
        return None
    if not value.strip():
        raise UserInputError(f"{option} is empty; give a path")
    return Path(value)


def _refuse_duplicates(folders: list[Path]) -> None:
    """Each compare folder once: a problem counted twice would tilt the profiles and verdicts."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        resolved = folder.resolve()
        if resolved in seen:
            spellings = "" if seen[resolved] == folder else f" (as {seen[resolved]} and as {folder})"
            raise UserInputError(f"compare folder {resolved} is given twice{spellings}; name each folder once")
        seen[resolved] = folder


def _refuse_overwriting(foreign: list[Path], force: bool) -> None:
    """The one rule of every command that writes: a file sofim-tune did not write is replaced only with --force."""
    if foreign and not force:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserInputError(f"{foreign[0]}{more} exists and was not written by sofim-tune; move it away, write elsewhere, or give --force to replace it")


def _is_recommendation(path: Path) -> bool:
    from sofim_tune.recommend import load_recommendation

    try:
        load_recommendation(path)
    except UserInputError:
        return False
    return True


#: ``--output``, the name ``--out`` had in export, plot and compare-summary: still read, hidden.
OldOutputOpt = Annotated[Optional[str], typer.Option("--output", hidden=True, help="The old name of --out.")]


def _renamed(value: str | None, old_value: str | None, *, old: str = "--output", new: str = "--out", short: str | None = "-o") -> str | None:
    """An option's value under its ``new`` name (or ``short``), or under its ``old`` one with a
    note that names the new spelling; both at once are refused."""
    if old_value is None:
        return value
    if value is not None:
        raise UserInputError(f"give {new} only ({old} is its old name)")
    err.print(f"note: {old} is now {new}" + (f" ({short})" if short else ""), highlight=False)
    return old_value


def _spec_file(spec_file: str | None, old_spec: str | None) -> str | None:
    """``--spec``, or the old ``--study`` of run and compare."""
    return _renamed(spec_file, old_spec, old="--study", new="--spec", short=None)


def _load_run(run_dir: Path | None, storage: str | None, storage_env: str | None, study_name: str | None, old_study_name: str | None) -> Any:
    """The study that export, plot and show read: a run folder, or ``--storage`` with
    ``--study-name`` (or its old spelling ``--study``)."""
    from sofim_tune import runs

    return runs.load_run(run_dir, storage=_storage(storage, storage_env), study=_renamed(study_name, old_study_name, old="--study", new="--study-name", short=None))


def _storage(storage: str | None, storage_env: str | None) -> str | None:
    """``--storage`` as given, or the URL in the environment variable ``--storage-env`` names.

    From the environment, a password never shows in ``ps`` or in the shell's history.
    """
    if storage_env is None:
        return storage
    # A --storage that came from $SOFIM_TUNE_STORAGE gives way to the variable named here.
    if storage is not None and storage != os.environ.get(STORAGE_ENVVAR):
        raise UserInputError("give --storage or --storage-env, not both")
    value = os.environ.get(storage_env)
    if not value:
        raise UserInputError(f"--storage-env {storage_env}: that environment variable is not set")
    return value


def _parse_gpus(gpus: str | None) -> tuple[int, ...]:
    if not gpus:
        return ()
    if gpus == "all":
        import torch

        if not torch.cuda.is_available():
            raise UserInputError("--gpus all: this machine has no CUDA GPU; leave --gpus out to run on the CPU")
        return tuple(range(torch.cuda.device_count()))
    try:
        return tuple(int(g) for g in gpus.split(","))
    except ValueError:
        raise UserInputError(f"--gpus must be `all` or a comma-separated list of indices like 0,1, got {gpus!r}") from None


class _LiveView:
    """Trials done / pruned / failed, best so far and elapsed time, on stderr.

    On a terminal, a bar that appears with the first update, so that input errors found
    before the study starts print alone. Without one (nohup, a batch job's log), one line
    per finished trial, and a line every ``QUIET_SECONDS`` while none finishes.
    """

    QUIET_SECONDS = 30.0

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err)
        self.task: Any = None
        self.terminal = err.is_terminal
        self.seen: dict[str, set[int]] = {}  # by study: `compare` shows several in turn
        self.started = self.last_line = time.monotonic()
        self.latest = ""  # the progress of the last update, for the quiet line
        self.stop = threading.Event()
        # A trial can run for minutes without an update: the quiet line needs a clock of its own.
        self.clock = threading.Thread(target=self._quiet_lines, daemon=True)

    def __enter__(self) -> _LiveView:
        if not self.terminal:
            self.clock.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            self.progress.stop()

    def _quiet_lines(self) -> None:
        while not self.stop.wait(min(1.0, self.QUIET_SECONDS / 2)):
            if self.latest and time.monotonic() - self.last_line >= self.QUIET_SECONDS:
                self.last_line = time.monotonic()
                err.print(f"{self.latest} · {self.last_line - self.started:.0f} s", highlight=False, markup=False, soft_wrap=True)

    def __call__(self, record: Any) -> None:
        counts = {state: len(record.by_state(state)) for state in ("complete", "pruned", "failed", "running")}
        best = record.best_trial()
        best_text = f"best {record.metric} {best.value:.4f}" if best else "no completed trial yet"
        if not self.terminal:
            self._lines(record, counts, best_text)
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("", total=record.target_trials)
        self.progress.update(
            self.task,
            total=record.target_trials,
            completed=counts["complete"] + counts["pruned"],
            description=f"done {counts['complete']} · pruned {counts['pruned']} · failed {counts['failed']} · running {counts['running']} · {best_text}",
        )

    def _lines(self, record: Any, counts: dict[str, int], best_text: str) -> None:
        ended = [t for t in record.trials if t.state in ("complete", "pruned", "failed")]
        if record.name not in self.seen:  # trials of an earlier run are not news
            self.seen[record.name] = {t.number for t in ended}
        seen = self.seen[record.name]
        now = time.monotonic()
        summary = f"{counts['complete'] + counts['pruned']}/{record.target_trials} finished · {best_text}"
        self.latest = f"{record.name}: {counts['running']} running · {summary}"
        progress = f"{summary} · {now - self.started:.0f} s"
        for trial in ended:
            if trial.number in seen:
                continue
            seen.add(trial.number)
            if trial.state == "complete":
                what = f"complete, {record.metric} {trial.value:.4f}"
            elif trial.state == "pruned":
                what = f"{trial.attrs.get('reason', 'pruned')} at epoch {max(trial.intermediate, default=0)}"
            else:
                what = f"failed: {trial.attrs.get('error') or trial.attrs.get('reason', 'error')}"
            settings = ", ".join(f"{k}={v:.4g}" for k, v in trial.params.items())
            err.print(f"{record.name} trial {trial.number} {what} ({settings}) · {progress}", highlight=False, markup=False, soft_wrap=True)
            self.last_line = now


@app.command()
@user_errors
def run(
    dataset: StudyDatasetOpt = None,
    arch: ArchOpt = None,
    spec_file: SpecOpt = None,
    old_spec: OldSpecOpt = None,
    space: Annotated[Optional[str], typer.Option(help="Search space: `sofim`, `sofim-effective`, `sgd-momentum`, `adamw`, or a path to a .yaml.", rich_help_panel="Search")] = None,
    trials: TrialsOpt = None,
    epochs: EpochsOpt = None,
    sampler: SamplerOpt = None,
    pruner: PrunerOpt = None,
    storage: Annotated[Optional[str], typer.Option(envvar=STORAGE_ENVVAR, show_envvar=True, help="Optuna storage: an SQLAlchemy URL or `journal:PATH`; default: SQLite in --out.")] = None,
    storage_env: RunStorageEnvOpt = None,
    workers: WorkersOpt = None,
    threads_per_trial: ThreadsOpt = None,
    batch_trials: BatchTrialsOpt = None,
    gpus: Annotated[Optional[str], typer.Option(help="GPUs to spread workers over: `all` or `0,1`.", rich_help_panel="Parallelism")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder; default: runs/DATASET-ARCH (the study name).")] = None,
    seed: SeedOpt = None,
    enqueue: Annotated[Optional[Path], typer.Option(help="A best.json whose settings are tried first.")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Stop starting trials after this many seconds.", rich_help_panel="Budget")] = None,
    confirm_top: ConfirmTopOpt = None,
    confirm_seeds: ConfirmSeedsOpt = None,
    final_runs: FinalRunsOpt = None,
    augment: AugmentOpt = None,
    image_size: ImageSizeOpt = None,
    schedule: ScheduleOpt = None,
    warmup_epochs: WarmupOpt = None,
    label_smoothing: LabelSmoothingOpt = None,
    decoupled: DecoupledOpt = False,
    coupled: CoupledOpt = False,
    widen: Annotated[Optional[bool], typer.Option("--widen/--no-widen", help="Let the study widen a log bound by a decade (twice at most) when its best trials sit on it; default: the spec's (on).", rich_help_panel="Search")] = None,
    lookahead: LookaheadOpt = None,
    backend: BackendOpt = "optuna",
    address: AddressOpt = None,
    gpus_per_trial: GpusPerTrialOpt = None,
    cpus_per_trial: CpusPerTrialOpt = None,
    max_concurrent: MaxConcurrentOpt = None,
    storage_path: Annotated[Optional[str], typer.Option(help="Ray: where the experiment is kept (DIR or s3://...); default: --out/ray.", rich_help_panel="Ray")] = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="At the end, print one JSON object (the fields of `show --json`, and best.json, report, parallelism, seconds) instead of the summary table.")] = False,
) -> None:
    """Search lr, rho and beta1 for a dataset and architecture; resume by running it again.

    Example: `sofim-tune run --dataset cifar100 --trials 64 --workers 4 --gpus all` (`--json` for scripts)
    """
    from sofim_tune.recommend import load_recommendation
    from sofim_tune.spec import load_spec
    from sofim_tune.tuning import RunOptions, tune

    spec = load_spec(dataset, arch, _spec_file(spec_file, old_spec)).replace(
        search_space=space, trials=trials, epochs=epochs, sampler=sampler, pruner=pruner, seed=seed, confirm_top=confirm_top, confirm_seeds=confirm_seeds, final_runs=final_runs, widen=widen, lookahead=lookahead,
        augment=augment, image_size=image_size, schedule=schedule, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, decoupled_weight_decay=_weight_decay_kind(decoupled, coupled),
    )
    options = RunOptions(
        out_dir=_path(out_dir, "--out") or Path("runs") / spec.name,
        storage=_storage(storage, storage_env),
        workers=workers,
        threads_per_trial=threads_per_trial,
        batch_trials=batch_trials,
        gpus=_parse_gpus(gpus),
        timeout=timeout,
        enqueue=(load_recommendation(enqueue).hyperparameters,) if enqueue else (),
        device=device,
        data_dir=data_dir,
        download=download,
        address=address,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial,
        max_concurrent=max_concurrent,
        storage_path=storage_path,
    )
    started = time.monotonic()
    with _LiveView() as live_view:
        outcome = tune(spec, options, backend=backend, on_progress=live_view)
    if as_json:
        import dataclasses

        from sofim_tune import runs

        print(json.dumps({
            **dataclasses.asdict(runs.status(outcome.study)),  # the fields `show --json` prints
            "best_json": str(outcome.best_json) if outcome.best_json else None, "report": str(outcome.report) if outcome.report else None,
            "parallelism": outcome.parallelism, "seconds": round(time.monotonic() - started, 1),
        }))
        return
    _print_summary(outcome.study, time.monotonic() - started)
    if outcome.parallelism:
        out.print(f"parallelism:    {outcome.parallelism}", highlight=False, soft_wrap=True)
    if outcome.best_json:
        out.print(f"recommendation: {outcome.best_json}")
    if outcome.report:
        out.print(f"report:         {outcome.report}")


def _print_summary(record: Any, seconds: float) -> None:
    table = Table(title=f"study {record.name} ({record.backend})")
    for column in ("completed", "pruned", "diverged", "failed", "best " + record.metric, "best settings", "elapsed"):
        table.add_column(column)
    best = record.best_trial()
    diverged = sum(1 for t in record.trials if t.diverged)
    table.add_row(
        str(len(record.by_state("complete"))),
        str(len(record.by_state("pruned")) - diverged),
        str(diverged),
        str(len(record.by_state("failed"))),
        f"{best.value:.4f}" if best else "-",
        ", ".join(f"{k}={v:.4g}" for k, v in best.params.items()) if best else "-",
        f"{seconds:.0f} s",
    )
    out.print(table)


@app.command()
@user_errors
def compare(
    dataset: StudyDatasetOpt = None,
    arch: ArchOpt = None,
    spec_file: SpecOpt = None,
    old_spec: OldSpecOpt = None,
    optimizers: Annotated[str, typer.Option(help="Comma-separated: `sofim`, `sofim-tensor` (a Fisher block per tensor), `sgd-momentum`, `adamw`.")] = "sofim,sgd-momentum,adamw",
    trials: TrialsOpt = None,
    epochs: EpochsOpt = None,
    sampler: SamplerOpt = None,
    pruner: PrunerOpt = None,
    seed: SeedOpt = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Compare folder: one run folder per optimizer, compare.json, compare.html; default: runs/compare-DATASET-ARCH.")] = None,
    backend: BackendOpt = "optuna",
    workers: WorkersOpt = None,
    threads_per_trial: ThreadsOpt = None,
    batch_trials: BatchTrialsOpt = None,
    storage: Annotated[Optional[str], typer.Option(envvar=STORAGE_ENVVAR, show_envvar=True, help="One Optuna storage for every study (named STUDY-OPTIMIZER); default: SQLite in each run folder.")] = None,
    storage_env: RunStorageEnvOpt = None,
    confirm_top: ConfirmTopOpt = None,
    confirm_seeds: ConfirmSeedsOpt = None,
    final_runs: FinalRunsOpt = None,
    address: AddressOpt = None,
    gpus_per_trial: GpusPerTrialOpt = None,
    cpus_per_trial: CpusPerTrialOpt = None,
    max_concurrent: MaxConcurrentOpt = None,
    storage_path: Annotated[Optional[str], typer.Option(help="Ray: where the experiments are kept (DIR or s3://...), one per optimizer named STUDY-OPTIMIZER; default: each run folder's ray/.")] = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Is SOFIM worth it here? Tune SOFIM and baselines at an equal budget and compare them.

    Example: `sofim-tune compare --dataset digits --optimizers sofim,sofim-tensor,sgd-momentum,adamw`
    """
    from sofim_tune.comparison import load_comparison, verdict_sentences
    from sofim_tune.spec import load_spec
    from sofim_tune.tuning import RunOptions
    from sofim_tune.tuning import compare as run_compare

    spec = load_spec(dataset, arch, _spec_file(spec_file, old_spec)).replace(trials=trials, epochs=epochs, sampler=sampler, pruner=pruner, seed=seed, confirm_top=confirm_top, confirm_seeds=confirm_seeds, final_runs=final_runs)
    options = RunOptions(
        out_dir=_path(out_dir, "--out") or Path("runs") / f"compare-{spec.name}",
        storage=_storage(storage, storage_env),
        workers=workers,
        threads_per_trial=threads_per_trial,
        batch_trials=batch_trials,
        device=device,
        data_dir=data_dir,
        download=download,
        address=address,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial,
        max_concurrent=max_concurrent,
        storage_path=storage_path,
    )
    started = time.monotonic()
    with _LiveView() as live_view:
        outcome = run_compare(spec, options, tuple(name.strip() for name in optimizers.split(",") if name.strip()), backend=backend, on_progress=live_view)
    for name, study_outcome in outcome.studies.items():
        out.print(f"{name}: {study_outcome.best_json}", highlight=False, soft_wrap=True)
    for sentence in verdict_sentences(load_comparison(outcome.compare_json)):
        out.print(sentence, highlight=False, soft_wrap=True)
    out.print(f"comparison: {outcome.compare_json}  ({time.monotonic() - started:.0f} s)", highlight=False, soft_wrap=True)
    out.print(f"report:     {outcome.compare_html}", highlight=False, soft_wrap=True)


@app.command("compare-summary")
@user_errors
def compare_summary(
    folders: Annotated[list[Path], typer.Argument(help="Compare folders written by `sofim-tune compare`.", show_default=False)],
    destination: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for compare-summary.html; default: the current folder.")] = None,
    output: OldOutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Performance profiles and verdicts across several compare folders (problems).

    Example: `sofim-tune compare-summary runs/compare-digits-mlp runs/compare-digits-cnn -o summary/`
    """
    from sofim_tune.comparison import load_comparison, write_summary
    from sofim_tune.pages import is_our_page

    _refuse_duplicates(folders)
    target = (_path(_renamed(destination, output), "--out") or Path(".")) / "compare-summary.html"
    _refuse_overwriting([target] if os.path.lexists(target) and not is_our_page(target) else [], force)
    docs = [load_comparison(folder / "compare.json") for folder in folders]
    page, rows = write_summary(docs, target.parent)
    table = Table(title="verdicts")
    for column in ("dataset", "arch", "optimizer", "against", "verdict", "p"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["dataset"], row["arch"], row["optimizer"], row["against"], row["verdict"], f"{row['p_value']:.3g}")
    out.print(table)
    out.print(f"wrote {page}", highlight=False, soft_wrap=True)


RunDirArg = Annotated[Optional[Path], typer.Argument(help="A run folder written by `sofim-tune run`.", show_default=False)]
StorageOpt = Annotated[Optional[str], typer.Option(help="Read the study from this storage URL instead of a run folder.")]
StudyNameOpt = Annotated[Optional[str], typer.Option("--study-name", help="Study name in --storage (needed when it holds several).")]
#: ``--study``, the name ``--study-name`` had in export, plot and show: still read, hidden.
OldStudyNameOpt = Annotated[Optional[str], typer.Option("--study", hidden=True, help="The old name of --study-name.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite files of the same name that sofim-tune did not write.")]
StorageEnvOpt = Annotated[Optional[str], typer.Option(help="Read the storage URL from this environment variable (keeps a password out of `ps`).")]


@app.command()
@user_errors
def export(
    run_dir: RunDirArg = None,
    destination: Annotated[Optional[str], typer.Option("--out", "-o", help="Where to write the JSON; default: RUN_DIR/best.json, or ./best.json with --storage.")] = None,
    output: OldOutputOpt = None,
    storage: StorageOpt = None,
    storage_env: StorageEnvOpt = None,
    study_name: StudyNameOpt = None,
    old_study_name: OldStudyNameOpt = None,
    force: ForceOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (`path`, and the recommendation as written) instead of a line.")] = False,
) -> None:
    """Write the recommended settings of a study as best.json (schema v1), also while it runs.

    It replaces a best.json of sofim-tune's, and any other file only with --force.

    Example: `sofim-tune export runs/cifar100-resnet18 -o cifar100.json` (`--json` for scripts)
    """
    from sofim_tune import runs

    target = _path(_renamed(destination, output), "--out") or (run_dir / "best.json" if run_dir else Path("best.json"))
    record = _load_run(run_dir, storage, storage_env, study_name, old_study_name)
    _refuse_overwriting([target] if os.path.lexists(target) and not _is_recommendation(target) else [], force)
    rec, path = runs.export(record, target)
    if as_json:
        print(json.dumps({"path": str(path), "recommendation": rec.to_dict()}))
        return
    note = "" if rec.study.final else " (study still running: best so far)"
    out.print(f"wrote {path}{note}", highlight=False)


@app.command()
@user_errors
def plot(
    run_dir: RunDirArg = None,
    destination: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for report.html and plots/; default: RUN_DIR.")] = None,
    output: OldOutputOpt = None,
    png: Annotated[bool, typer.Option("--png", help="Also write PNG files (needs Chrome or Chromium).")] = False,
    storage: StorageOpt = None,
    storage_env: StorageEnvOpt = None,
    study_name: StudyNameOpt = None,
    old_study_name: OldStudyNameOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write the sensitivity report (report.html) and one file per figure under plots/.

    It replaces the files of an earlier report, and any other file of the same name only
    with --force; it never writes through a plots/ that is a symlink.

    Example: `sofim-tune plot runs/cifar100-resnet18 --png`
    """
    from sofim_tune import runs
    from sofim_tune.report import foreign_report_files

    target = _path(_renamed(destination, output), "--out") or run_dir or Path(".")
    record = _load_run(run_dir, storage, storage_env, study_name, old_study_name)
    _refuse_overwriting(foreign_report_files(target, png=png), force)
    report = runs.plot(record, target, png=png)
    for path in (report.html, *report.pngs):
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def show(
    run_dir: RunDirArg = None,
    storage: StorageOpt = None,
    storage_env: StorageEnvOpt = None,
    study_name: StudyNameOpt = None,
    old_study_name: OldStudyNameOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as one JSON object (the fields of `sofim_tune.runs.StudyStatus`) instead of a table.")] = False,
) -> None:
    """Show the state of a study: trials by state, best so far, elapsed time.

    Example: `sofim-tune show runs/cifar100-resnet18` (`--json` for scripts)
    """
    import dataclasses

    from sofim_tune import runs

    state = runs.status(_load_run(run_dir, storage, storage_env, study_name, old_study_name))
    if as_json:
        print(json.dumps(dataclasses.asdict(state)))
        return
    table = Table(title=f"study {state.name} ({state.backend})", show_header=False)
    table.add_row("finished", f"{state.counts['complete'] + state.counts['pruned']} of {state.target}" + ("" if state.finished else " (not done)"))
    for key in ("complete", "pruned", "failed", "running"):
        table.add_row(key, str(state.counts[key]))
    table.add_row("diverged (among pruned)", str(state.diverged))
    table.add_row("best so far", "-" if state.best_value is None else f"{state.best_value:.4f}")
    if state.best_params:
        table.add_row("best settings", ", ".join(f"{k}={v:.4g}" for k, v in state.best_params.items()))
    if state.elapsed_seconds is not None:
        table.add_row("elapsed", f"{state.elapsed_seconds:.0f} s")
    out.print(table)


@app.command()
@user_errors
def recommend(
    dataset: DatasetOpt,
    arch: Annotated[Optional[str], typer.Option(help="Architecture; default: any.")] = None,
    results: Annotated[Path, typer.Option(help="Folder whose run folders hold best.json files.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the best recommendation as JSON.")] = False,
) -> None:
    """Print the recommended settings for a dataset (and architecture) from earlier runs.

    With a compare folder under --results it also picks the optimizer, says how sure, and
    --json prints that optimizer's recommendation.

    Example: `sofim-tune recommend --dataset cifar100 --arch resnet18 --json`
    """
    from sofim_tune import runs

    search = runs.find_recommendations(results, dataset, arch)
    for line in search.invalid:
        err.print(f"[yellow]skipped:[/yellow] {escape(line)}", highlight=False)
    found, choice = search.recommendations, search.choice
    if not found and choice is None:
        what = f"{dataset}" + (f" / {arch}" if arch else "")
        raise NothingFound(f"no recommendation for {what} under {results}/ yet; make one with: sofim-tune run --dataset {dataset}" + (f" --arch {arch}" if arch else ""))
    if as_json:
        if choice is None and len(search.rankings) > 1:
            err.print(f"note: {search.rankings[0].describe()}; {len(search.rankings) - 1} other ranking(s) do not compare with it", highlight=False)
        print(json.dumps((choice.recommendation if choice else found[0][1]).to_dict()))
        return
    if choice is not None:
        from sofim_tune.comparison import verdict_sentences

        settings = ", ".join(f"{k}={v:.4g}" for k, v in choice.recommendation.hyperparameters.items())
        confirmed = choice.comparison["optimizers"][choice.optimizer]["confirmed"]
        out.print(f"use {choice.optimizer} ({settings}): confirmed {confirmed['mean']:.4f}, 95% interval [{confirmed['ci95'][0]:.4f}, {confirmed['ci95'][1]:.4f}]; from {choice.folder}", highlight=False, soft_wrap=True)
        for sentence in verdict_sentences(choice.comparison):
            out.print(f"  {sentence}", highlight=False, soft_wrap=True)
    if not found:
        return
    for ranking in search.rankings:
        table = Table(title=f"recommended settings for {dataset}, {ranking.describe()}")
        for column in ("arch", "optimizer", "settings", "ranked by", "search value", "confirmed (mean ± std)", "test acc", "from"):
            table.add_column(column)
        for path, rec in ranking.entries:
            confirm = rec.metric.confirm
            table.add_row(
                rec.arch,
                rec.optimizer,
                ", ".join(f"{k}={v:.4g}" for k, v in rec.hyperparameters.items()),
                f"{ranking.value(rec):.4f}",
                f"{rec.metric.name} {rec.metric.value:.4f}",
                f"{confirm.mean:.4f} ± {confirm.std:.4f}" if confirm else "-",
                f"{rec.metric.test_accuracy:.4f}" if rec.metric.test_accuracy is not None else "-",
                str(path),
            )
        out.print(table)


def main() -> None:
    """The ``sofim-tune`` command. Click's own usage errors (an unknown option, a value of the
    wrong type) are one line on stderr with exit code 2 too, as the commands' are."""
    # Typer vendors Click and exports none of its usage errors but BadParameter.
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        code = typer.main.get_command(app).main(prog_name="sofim-tune", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        code = exc.exit_code
    except UsageError as exc:
        command = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        # Typer checks choices through pydantic, whose messages start "Value error, ".
        message = " ".join(exc.format_message().replace("Value error, ", "").split())
        err.print(f"[red]error:[/red] {escape(message)}{command}", highlight=False)
        code = 2
    except ClickException as exc:
        err.print(f"[red]error:[/red] {escape(' '.join(exc.format_message().split()))}", highlight=False)
        code = exc.exit_code
    except typer.Abort:  # standard input closed while a prompt waited
        err.print("aborted", highlight=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
