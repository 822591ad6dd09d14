"""Hostile inputs: runtime (see hostile.py for what every case must keep).

Memory and processes: an image size or a dataset larger than the memory, more workers or
threads than the machine can run, and ImageFolders that are no classification problem (one
class) or that list their own images again through a directory symlink.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import optuna

from fake_datasets import write_image_folder
from hostile import ApiCase, CliCase
from sofim_tune.data import MAX_IMAGE_SIZE, load_data

# The CLI maps about 3.5 GiB of address space once torch is imported; these limits leave it
# about 2.5 GiB more, far below what the runaway allocations asked for.
MEMORY_MB = 6000


def _folder(scratch: Path, classes: list[str], per_class: int) -> Path:
    root = scratch / "images"
    write_image_folder(root, classes, per_class, size=(8, 8))
    return root


def _train(scratch: Path, root: Path, *more: str) -> list[str]:
    return ["train", "--dataset", str(root), "--epochs", "1", "--device", "cpu", *more]


def _huge_image_size(scratch: Path, run: Path | None) -> list[str]:
    return _train(scratch, _folder(scratch, ["a", "b"], 4), "--image-size", "100000")


def _folder_beyond_the_memory(scratch: Path, run: Path | None) -> list[str]:
    # 600 RGB images at 1024x1024 are 1.9 GB as bytes, decoded in memory (within the 2 GiB
    # budget) and copied while decoding: more than the address space left under MEMORY_MB.
    return _train(scratch, _folder(scratch, ["a", "b"], 300), "--image-size", str(MAX_IMAGE_SIZE))


def _run(scratch: Path, *more: str) -> list[str]:
    return ["run", "--dataset", "digits", "--trials", "4", "--epochs", "1", "--confirm-top", "1", "--confirm-seeds", "2", "--device", "cpu", "--out", str(scratch / "out"), *more]


def _four_trials_none_failed(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    trials = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{scratch / 'out' / 'study.db'}").get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert len(trials) == 4 and "FAIL" not in states, states
    assert (scratch / "out" / "best.json").is_file()


def _one_class(scratch: Path, run: Path | None) -> list[str]:
    root = _folder(scratch, ["only"], 12)
    return ["run", "--dataset", str(root), "--trials", "2", "--epochs", "1", "--confirm-top", "1", "--confirm-seeds", "2", "--device", "cpu", "--out", str(scratch / "out")]


def _no_run_folder(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    assert not (scratch / "out" / "best.json").exists()


def _symlink_loop(scratch: Path) -> Path:
    root = _folder(scratch, ["a", "b"], 12)
    os.symlink("..", root / "a" / "up")
    return root


def _link_to_a_sibling(scratch: Path) -> Path:
    root = _folder(scratch, ["a", "b"], 12)
    os.symlink(root / "b", root / "a" / "b-again", target_is_directory=True)
    return root


CLI_CASES: list[CliCase] = [
    CliCase("image-size-beyond-the-bound", _huge_image_size, message=f"at most {MAX_IMAGE_SIZE}", memory_mb=MEMORY_MB, timeout=120),
    CliCase("image-folder-beyond-the-memory", _folder_beyond_the_memory, message="memory", memory_mb=MEMORY_MB, timeout=120),
    CliCase("workers-beyond-the-trials", lambda scratch, run: _run(scratch, "--workers", "100000"), exit_code=0, message="--workers 100000", timeout=240, check=_four_trials_none_failed),
    CliCase("threads-beyond-the-cpus", lambda scratch, run: _run(scratch, "--threads-per-trial", "100000"), exit_code=0, message="--threads-per-trial 100000", timeout=240, check=_four_trials_none_failed),
    CliCase("image-folder-of-one-class", _one_class, message="at least 2 classes", check=_no_run_folder),
    CliCase("image-folder-with-a-symlink-loop", lambda scratch, run: _train(scratch, _symlink_loop(scratch)), message="symbolic link"),
]

API_CASES: list[ApiCase] = [
    ApiCase("load-image-size-beyond-the-bound", lambda scratch: load_data(str(_folder(scratch, ["a", "b"], 2)), image_size=MAX_IMAGE_SIZE + 1), message=f"at most {MAX_IMAGE_SIZE}"),
    ApiCase("load-one-class-folder", lambda scratch: load_data(str(_folder(scratch, ["only"], 4))), message="at least 2 classes"),
    ApiCase("load-folder-linking-a-sibling-class", lambda scratch: load_data(str(_link_to_a_sibling(scratch))), message="symbolic link"),
]
