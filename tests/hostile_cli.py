"""Hostile inputs: cli (see hostile.py for what every case must keep)."""

from __future__ import annotations

import shutil
from pathlib import Path

from hostile import ApiCase, CliCase

NESTED_JSON = "[" * 100_000 + "]" * 100_000


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _nested_enqueue(scratch: Path, run: Path | None) -> list[str]:
    _write(scratch / "nested.json", NESTED_JSON)
    return ["run", "--dataset", "digits", "--trials", "1", "--enqueue", "nested.json", "--out", "new"]


def _nested_compare_json(scratch: Path, run: Path | None) -> list[str]:
    _write(scratch / "cmp" / "compare.json", NESTED_JSON)
    return ["compare-summary", "cmp", "-o", "summary"]


def _same_compare_twice(scratch: Path, run: Path | None) -> list[str]:
    (scratch / "cmp").mkdir()
    return ["compare-summary", "cmp", f"{scratch}/cmp/", "-o", "summary"]


def _space_folder(scratch: Path, run: Path | None) -> list[str]:
    (scratch / "spaces").mkdir()
    return ["run", "--dataset", "digits", "--trials", "1", "--space", "./spaces", "--out", "new"]


def _plots_symlinked_elsewhere(scratch: Path, run: Path | None) -> list[str]:
    assert run is not None
    elsewhere = scratch / "elsewhere"
    shutil.copytree(run / "plots", elsewhere)
    _write(elsewhere / "mine.txt", "a user's file")
    shutil.rmtree(run / "plots")
    (run / "plots").symlink_to(elsewhere, target_is_directory=True)
    return ["plot", str(run)]


def _compare_study_symlinked_elsewhere(scratch: Path, run: Path | None) -> list[str]:
    _write(scratch / "elsewhere" / "mine.txt", "a user's file")
    (scratch / "cmp").mkdir()
    (scratch / "cmp" / "sofim").symlink_to(scratch / "elsewhere", target_is_directory=True)
    return ["compare", "--dataset", "digits", "--trials", "1", "--optimizers", "sofim,sgd-momentum", "--out", "cmp"]


def _users_best_json(scratch: Path, run: Path | None) -> list[str]:
    _write(scratch / "best.json", '{"mine": "a file sofim-tune did not write"}\n')
    return ["export", str(run), "-o", "best.json"]


def _users_report_html(scratch: Path, run: Path | None) -> list[str]:
    _write(scratch / "site" / "report.html", "<html><body>my own report</body></html>\n")
    return ["plot", str(run), "--out", "site"]


def _users_plot_file(scratch: Path, run: Path | None) -> list[str]:
    _write(scratch / "site" / "plots" / "history.html", "<html><body>my own history</body></html>\n")
    return ["plot", str(run), "--out", "site"]


CLI_CASES: list[CliCase] = [
    # Issue 27.13: JSON that is a device, nested past the parser's depth, or in a compare folder.
    CliCase("enqueue-dev-zero", lambda s, r: ["run", "--dataset", "digits", "--trials", "1", "--enqueue", "/dev/zero", "--out", "new"], message="not a regular file"),
    CliCase("enqueue-nested-json", _nested_enqueue, message="nested too deeply"),
    CliCase("compare-summary-nested-compare-json", _nested_compare_json, message="nested too deeply"),
    # Issue 27.12: flags that contradict each other, and paths that are not what they claim.
    CliCase(
        "run-decoupled-and-coupled-weight-decay",
        lambda s, r: ["run", "--dataset", "digits", "--trials", "1", "--decoupled-weight-decay", "--coupled-weight-decay", "--out", "new"],
        message="give --decoupled-weight-decay or --coupled-weight-decay, not both",
    ),
    CliCase(
        "train-decoupled-and-coupled-weight-decay",
        lambda s, r: ["train", "--dataset", "digits", "--epochs", "1", "--coupled-weight-decay", "--decoupled-weight-decay"],
        message="give --decoupled-weight-decay or --coupled-weight-decay, not both",
    ),
    CliCase("compare-summary-same-folder-twice", _same_compare_twice, message="twice"),
    CliCase("space-is-a-folder", _space_folder, message="a folder, not a regular file"),
    CliCase("space-is-dev-zero", lambda s, r: ["run", "--dataset", "digits", "--trials", "1", "--space", "/dev/zero", "--out", "new"], message="not a regular file"),
    CliCase("study-is-a-folder", lambda s, r: ["run", "--spec", str(s), "--out", "new"], message="a folder, not a regular file"),
    CliCase("study-is-dev-zero", lambda s, r: ["run", "--spec", "/dev/zero", "--out", "new"], message="not a regular file"),
    CliCase("export-to-empty-path", lambda s, r: ["export", str(r), "-o", ""], message="--out is empty", needs_run=True),
    CliCase("plot-to-empty-path", lambda s, r: ["plot", str(r), "-o", ""], message="--out is empty", needs_run=True),
    CliCase("run-lookahead-zero", lambda s, r: ["run", "--dataset", "digits", "--trials", "1", "--lookahead", "0", "--out", "new"], message="lookahead: must be >= 1 (got 0)"),
    CliCase("run-out-empty-path", lambda s, r: ["run", "--dataset", "digits", "--trials", "1", "--out", ""], message="--out is empty"),
    # Issue 27.2: a folder inside a run folder that is a symlink is never written through.
    CliCase("plot-through-symlinked-plots-folder", _plots_symlinked_elsewhere, message="symlink", needs_run=True),
    CliCase("compare-through-symlinked-study-folder", _compare_study_symlinked_elsewhere, message="symlink"),
    # Issue 23.8: a file sofim-tune did not write is not overwritten without --force.
    CliCase("export-over-a-users-file", _users_best_json, message="--force", needs_run=True),
    CliCase("plot-over-a-users-report", _users_report_html, message="--force", needs_run=True),
    CliCase("plot-over-a-users-plot-file", _users_plot_file, message="--force", needs_run=True),
    # Issue 23.2: each backend refuses the options it does not use, in compare as in run.
    CliCase(
        "compare-ray-with-workers",
        lambda s, r: ["compare", "--dataset", "digits", "--trials", "1", "--backend", "ray", "--workers", "2", "--out", "cmp"],
        message="--workers",
    ),
    CliCase(
        "compare-optuna-with-gpus-per-trial",
        lambda s, r: ["compare", "--dataset", "digits", "--trials", "1", "--gpus-per-trial", "1", "--out", "cmp"],
        message="--gpus-per-trial",
    ),
]
def _load_space(path: str | Path) -> object:
    from sofim_tune.space import load_space

    return load_space(path)


def _load_spec(path: str | Path) -> object:
    from sofim_tune.spec import load_spec

    return load_spec(study=path)


API_CASES: list[ApiCase] = [
    ApiCase("load-space-of-a-folder", lambda scratch: _load_space(scratch), message="a folder, not a regular file"),
    ApiCase("load-space-of-dev-zero", lambda scratch: _load_space("/dev/zero"), message="not a regular file"),
    ApiCase("load-spec-of-a-folder", lambda scratch: _load_spec(scratch), message="a folder, not a regular file"),
    ApiCase("load-spec-of-dev-zero", lambda scratch: _load_spec("/dev/zero"), message="not a regular file"),
]
