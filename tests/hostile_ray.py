"""Hostile inputs: ray (see hostile.py for what every case must keep)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from hostile import ApiCase, CliCase

from sofim_tune.space import load_space
from sofim_tune.spec import load_spec
from sofim_tune.study import study_metadata

NESTED_JSON = "[" * 100_000 + "]" * 100_000
STUDY = "digits-mlp"  # the name of the digits spec's study, which the cases' run folders hold


def ray_run_folder(run: Path, *, storage_path: Path | None = None) -> Path:
    """A Ray run folder as a run killed before Ray's first save leaves it, without running Ray.

    ``run.json``, ``ray_study.json`` (made as the backend makes it, with a stored confirmation),
    and an experiment folder with one trial that completed its two epochs but no state Ray can restore.
    Returns the experiment folder.
    """
    spec = load_spec("digits").replace(search_space="sofim")  # the space its hand-made trial drew from
    space = load_space(spec.search_space)
    root = (storage_path or run / "ray").resolve()
    experiment = root / STUDY
    meta = {
        **study_metadata(spec, space, str(experiment)),
        "backend": "ray",
        "name": STUDY,
        "pruner": "asha",
        "batch_trials": 1,
        "batch_servers": 0,
        "storage_path": str(root) if storage_path is not None else None,
        "epochs": 2,
        "ended": False,
        "confirmations": [],
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"backend": "ray", "storage": str(experiment), "study": STUDY}))
    (run / "ray_study.json").write_text(json.dumps(meta))
    trial = experiment / "trial_0000_a1b2c3"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"lr": 0.1, "rho": 1.0, "beta1": 0.9, "trial_number": 0}))
    rows = [{"val_accuracy": 0.5 + epoch / 10, "epoch": epoch, "timestamp": 1.7e9 + epoch, "time_this_iter_s": 1.0, "time_total_s": float(epoch), "done": epoch == 2} for epoch in (1, 2)]
    (trial / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return experiment


def _ray_run(*options: str) -> Callable[[Path, Path | None], Sequence[str]]:
    def args(scratch: Path, run: Path | None) -> list[str]:
        return ["run", "--backend", "ray", "--dataset", "digits", "--trials", "2", "--epochs", "1", *options, "--out", "new"]

    return args


def _nothing_written(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    assert not (scratch / "new").exists(), "the refused run wrote its run folder"


def _refused(id: str, options: Sequence[str], message: str) -> CliCase:
    """An Optuna-backend option given with --backend ray: refused before Ray starts (ignored, it
    would run a whole study, on the CPU for --gpus), naming the option that does its work."""
    return CliCase(id, _ray_run(*options), message=message, timeout=60, check=_nothing_written)


def _show_with(path: str, text: str) -> Callable[[Path, Path | None], Sequence[str]]:
    """``show`` on a Ray run folder whose file at ``path`` (relative to the run or, under
    ``experiment/``, to the experiment folder) holds ``text``."""

    def args(scratch: Path, run: Path | None) -> list[str]:
        experiment = ray_run_folder(scratch / "run")
        target = experiment / path.removeprefix("experiment/") if path.startswith("experiment/") else scratch / "run" / path
        target.write_text(text)
        return ["show", "run"]

    return args


def _show_with_metadata(**fields: object) -> Callable[[Path, Path | None], Sequence[str]]:
    """``show`` on a Ray run folder whose ``ray_study.json`` has ``fields`` replaced."""

    def args(scratch: Path, run: Path | None) -> list[str]:
        ray_run_folder(scratch / "run")
        meta_file = scratch / "run" / "ray_study.json"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **fields}))
        return ["show", "run"]

    return args


def _shows_the_readable_trial(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    # The trial's good row is kept: it completed with the value of its second epoch, the best so far.
    assert "0.7" in done.stdout and re.search(r"complete\W+1\b", done.stdout), done.stdout


def _rerun_elsewhere(scratch: Path, run: Path | None) -> list[str]:
    ray_run_folder(scratch / "run")
    return ["run", "--backend", "ray", "--dataset", "digits", "--out", "run", "--storage-path", "elsewhere"]


def _rerun_unrestorable(scratch: Path, run: Path | None) -> list[str]:
    ray_run_folder(scratch / "run")
    return ["run", "--backend", "ray", "--dataset", "digits", "--out", "run"]


# The CLI maps about 3.5 GiB of address space once torch is imported; reading the huge file
# whole needs more than this leaves.
MEMORY_MB = 6000
HUGE_BYTES = 8 * 2**30


def _outside(scratch: Path) -> Path:
    """A storage path beside the case's folder: the harness hashes every file inside that folder,
    which a file of HUGE_BYTES would make slow and costly."""
    return scratch.parent / f"{scratch.name}-storage"


def _show_with_huge_result(scratch: Path, run: Path | None) -> list[str]:
    """``show`` on a Ray run folder whose trial's result.json is a sparse file of HUGE_BYTES (no disk)."""
    experiment = ray_run_folder(scratch / "run", storage_path=_outside(scratch))
    os.truncate(experiment / "trial_0000_a1b2c3" / "result.json", HUGE_BYTES)
    return ["show", "run"]


def _show_with_a_pipe(name: str) -> Callable[[Path, Path | None], Sequence[str]]:
    """``show`` on a Ray run folder whose trial file ``name`` is a named pipe, which no one writes."""

    def args(scratch: Path, run: Path | None) -> list[str]:
        trial = ray_run_folder(scratch / "run") / "trial_0000_a1b2c3"
        (trial / name).unlink(missing_ok=True)
        os.mkfifo(trial / name)
        return ["show", "run"]

    return args


def _shows_the_trial_without_results(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    shutil.rmtree(_outside(scratch), ignore_errors=True)  # the huge file's storage, if any
    # The trial's settings are read, its results are not: nothing completed.
    assert re.search(r"complete\W+0\b", done.stdout), done.stdout


def _no_new_experiment(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    assert not (scratch / "elsewhere").exists(), "a new experiment was started"


CLI_CASES: list[CliCase] = [
    _refused("ray-workers", ["--workers", "2"], "--workers is for the Optuna backend and does nothing with --backend ray: Ray runs as many trials at once as their resources allow; cap them with --max-concurrent"),
    _refused("ray-threads-per-trial", ["--threads-per-trial", "2"], "--threads-per-trial is for the Optuna backend and does nothing with --backend ray: a Ray trial runs one torch thread per CPU it reserves; set --cpus-per-trial"),
    _refused("ray-gpus", ["--gpus", "0"], "--gpus is for the Optuna backend and does nothing with --backend ray: a Ray trial gets its GPU from --gpus-per-trial"),
    _refused("ray-lookahead", ["--lookahead", "8"], "--lookahead is for the Optuna backend and does nothing with --backend ray"),
    _refused("ray-device-cuda", ["--device", "cuda"], "--device cuda is for the Optuna backend and does nothing with --backend ray: a Ray trial gets its GPU from --gpus-per-trial"),
    _refused("ray-storage", ["--storage", "sqlite:///study.db"], "--storage is for the Optuna backend and does nothing with --backend ray: Ray keeps its experiment under --storage-path"),
    CliCase("ray-study-json-nested", _show_with("ray_study.json", NESTED_JSON), message="ray_study.json: cannot read: JSON nested too deeply"),
    CliCase("ray-study-json-wrong-types", _show_with_metadata(epochs="two", confirmations=[1]), message="ray_study.json: corrupted (ValueError: invalid literal for int()"),
    # A malformed line in a trial's result.json, or a malformed searcher account or settings
    # file, is read as a line (or file) no trial wrote: show lists what it can read.
    CliCase("ray-result-line-nested", _show_with("experiment/trial_0000_a1b2c3/result.json", NESTED_JSON + "\n"), exit_code=0),
    CliCase("ray-result-line-wrong-types", _show_with("experiment/trial_0000_a1b2c3/result.json", '{"val_accuracy": "high", "epoch": "one"}\n{"val_accuracy": 0.7, "epoch": 2, "timestamp": 1.7e9, "done": true}\n'), exit_code=0, check=_shows_the_readable_trial),
    CliCase("ray-search-file-nested", _show_with("experiment/sofim_search.json", NESTED_JSON), exit_code=0),
    CliCase("ray-search-file-wrong-types", _show_with("experiment/sofim_search.json", '{"finished": true, "trials": [1, {"trial_id": 3}]}'), exit_code=0),
    CliCase("ray-params-nested", _show_with("experiment/trial_0000_a1b2c3/params.json", NESTED_JSON), exit_code=0),
    # A per-trial file larger than the reader takes (result.json: 16 MiB) is read as one no trial
    # wrote, without reading it; a named pipe is not waited on.
    CliCase("ray-result-file-of-8-gib", _show_with_huge_result, exit_code=0, memory_mb=MEMORY_MB, timeout=120, check=_shows_the_trial_without_results),
    CliCase("ray-result-file-a-pipe", _show_with_a_pipe("result.json"), exit_code=0, timeout=60, check=_shows_the_trial_without_results),
    CliCase("ray-params-file-a-pipe", _show_with_a_pipe("params.json"), exit_code=0, timeout=60),
    CliCase("ray-error-file-a-pipe", _show_with_a_pipe("error.txt"), exit_code=0, timeout=60, check=_shows_the_readable_trial),
    # A rerun that would start another experiment than the one the folder records (and lose it).
    CliCase("ray-rerun-with-another-storage-path", _rerun_elsewhere, message="to resume it, leave --storage-path out; to start afresh, choose a new --out", timeout=90, check=_no_new_experiment),
    CliCase("ray-rerun-unrestorable", _rerun_unrestorable, message="which Ray cannot restore (it was stopped before its first save, or its files are gone); to start afresh, choose a new --out", timeout=90),
]
API_CASES: list[ApiCase] = []
