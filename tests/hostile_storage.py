"""Hostile inputs: storage (see hostile.py for what every case must keep).

Storages, run folders and the Optuna backend's options: a user's file is never taken for a
journal or a database, a run folder whose storage went missing or was swapped is refused, a
password never shows up in part, a storage that dies with the process is refused, a grid too
large to build is refused, and options that only Ray uses are refused with the option that
does apply.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna

from hostile import ApiCase, CliCase
from sofim_tune.spec import load_spec
from sofim_tune.tuning import RunOptions, tune

# The study of the suite's finished run (test_hostile.finished_run).
RUN = ["run", "--dataset", "digits", "--trials", "3", "--epochs", "1", "--confirm-top", "1", "--confirm-seeds", "2", "--workers", "1"]
QUICK = ["run", "--dataset", "digits", "--trials", "4", "--epochs", "1", "--workers", "1"]


def _nothing_written(folder: str) -> object:
    def check(scratch: Path, _done: subprocess.CompletedProcess[str]) -> None:
        assert not (scratch / folder).exists(), f"{folder} was created"
        assert not [p.name for p in scratch.iterdir() if p.name.endswith(".ask-lock")]

    return check


def _users_file(scratch: Path) -> Path:
    file = scratch / "f.txt"
    file.write_text("hello\n")
    return file


def _without_study_db(scratch: Path, run: Path | None) -> list[str]:
    assert run is not None
    (run / "study.db").unlink()
    return [*RUN, "--out", str(run)]


def _with_a_foreign_study_db(scratch: Path, run: Path | None) -> list[str]:
    assert run is not None
    (run / "study.db").unlink()
    optuna.create_study(study_name="someone-elses", storage=f"sqlite:///{run / 'study.db'}")
    return [*RUN, "--out", str(run)]


def _nested_run_json(scratch: Path, run: Path | None) -> list[str]:
    assert run is not None
    (run / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["show", str(run)]


def _another_apps_sqlite(scratch: Path) -> Path:
    import sqlite3

    file = scratch / "app.db"
    with sqlite3.connect(file) as db:
        db.execute("create table notes (body text)")
        db.execute("insert into notes values ('mine')")
    return file


RAY_ONLY = [
    ("cpus-per-trial", ["--cpus-per-trial", "2"], "--cpus-per-trial applies to --backend ray; with the Optuna backend use --threads-per-trial"),
    ("gpus-per-trial", ["--gpus-per-trial", "1"], "--gpus-per-trial applies to --backend ray; with the Optuna backend use --gpus"),
    ("max-concurrent", ["--max-concurrent", "2"], "--max-concurrent applies to --backend ray; with the Optuna backend use --workers"),
    ("address", ["--address", "auto"], "--address applies to --backend ray"),
    ("storage-path", ["--storage-path", "elsewhere"], "--storage-path applies to --backend ray; with the Optuna backend use --storage"),
]

CLI_CASES: list[CliCase] = [
    CliCase(
        "journal-into-a-users-file",
        lambda s, _: [*QUICK, "--storage", f"journal:{_users_file(s)}", "--out", str(s / "out")],
        message="is not an Optuna journal",
        check=_nothing_written("out"),
    ),
    CliCase(
        "journal-that-is-a-folder",
        lambda s, _: [*QUICK, "--storage", f"journal:{s}", "--out", str(s / "out")],
        message="not a regular file",
        check=_nothing_written("out"),
    ),
    CliCase(
        "sqlite-storage-of-another-application",
        lambda s, _: [*QUICK, "--storage", f"sqlite:///{_another_apps_sqlite(s)}", "--out", str(s / "out")],
        message="not an Optuna storage",
        check=_nothing_written("out"),
    ),
    CliCase("run-folder-that-lost-its-study-db", _without_study_db, message="study.db is missing", needs_run=True),
    CliCase("run-folder-with-another-studys-study-db", _with_a_foreign_study_db, message="does not hold study 'digits-mlp'", needs_run=True),
    CliCase(
        "unescaped-at-in-a-password",
        lambda s, _: [*QUICK, "--storage", "postgresql://bob:Sec@ret99Z@127.0.0.1:1/db", "--out", str(s / "out")],
        message="%40",
        secrets=("Sec@ret99Z", "ret99Z", "Sec@"),
        check=_nothing_written("out"),
    ),
    CliCase(
        "sqlite-in-memory-empty-url",
        lambda s, _: [*QUICK, "--storage", "sqlite://", "--out", str(s / "out")],
        message="in memory",
        check=_nothing_written("out"),
    ),
    CliCase(
        "sqlite-in-memory",
        lambda s, _: [*QUICK, "--storage", "sqlite:///:memory:", "--out", str(s / "out")],
        message="in memory",
        check=_nothing_written("out"),
    ),
    CliCase(
        "grid-too-large-to-build",
        lambda s, _: ["run", "--dataset", "digits", "--sampler", "grid", "--trials", "1000000000", "--timeout", "5", "--epochs", "1", "--workers", "1", "--out", str(s / "out")],
        message="--sampler grid",
        timeout=120,
        check=_nothing_written("out"),
    ),
    CliCase("show-a-deeply-nested-run-json", _nested_run_json, message="run.json", needs_run=True),
    *(
        CliCase(
            f"optuna-backend-refuses-{name}",
            lambda s, _, flag=flag: [*QUICK, *flag, "--out", str(s / "out")],
            message=message,
            check=_nothing_written("out"),
        )
        for name, flag, message in RAY_ONLY
    ),
]


def _tune_with(**given: object) -> object:
    def call(scratch: Path) -> object:
        return tune(load_spec("digits").replace(trials=2, epochs=1), RunOptions(out_dir=scratch / "out", workers=1, device="cpu", **given))  # type: ignore[arg-type]

    return call


API_CASES: list[ApiCase] = [
    ApiCase("api-refuses-cpus-per-trial-with-optuna", _tune_with(cpus_per_trial=2.0), message="--cpus-per-trial applies to --backend ray"),
    ApiCase("api-refuses-gpus-per-trial-with-optuna", _tune_with(gpus_per_trial=0.5), message="--gpus-per-trial applies to --backend ray"),
    ApiCase("api-refuses-max-concurrent-with-optuna", _tune_with(max_concurrent=2), message="--max-concurrent applies to --backend ray"),
    ApiCase("api-refuses-address-with-optuna", _tune_with(address="auto"), message="--address applies to --backend ray"),
    ApiCase("api-refuses-storage-path-with-optuna", _tune_with(storage_path="x"), message="--storage-path applies to --backend ray"),
    ApiCase("api-refuses-sqlite-in-memory", _tune_with(storage="sqlite:///:memory:"), message="in memory"),
    ApiCase("api-refuses-a-journal-that-is-a-users-file", lambda s: _tune_with(storage=f"journal:{_users_file(s)}")(s), message="is not an Optuna journal"),
]
