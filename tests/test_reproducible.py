"""A study is the same whatever runs it: any --workers, --batch-trials, a killed worker, a kill
and a resume. Same spec, seed and data: the same settings, values, states and pruning decisions
for every trial, and the same best.json (timestamps and paths aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.backends.views import Deferred, fixed_view, logical_indices, settled_prefix

CLI = [sys.executable, "-m", "sofim_tune.cli.app"]
# Enough trials that trials are pruned and the sampler's model is used; small enough to be quick.
STUDY = ["run", "--dataset", "digits", "--device", "cpu", "--trials", "14", "--epochs", "4", "--confirm-top", "2", "--confirm-seeds", "2"]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, *STUDY, *extra, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def trials_by_index(out: Path) -> dict[int, tuple[Any, ...]]:
    """What each logical index ran and scored: its settled attempt's settings, state, value and
    epoch-by-epoch values (the pruning decisions show in how many epochs it reported)."""
    study = optuna.load_study(study_name="digits-mlp", storage=optuna_backend.open_storage(f"sqlite:///{out / 'study.db'}"))
    settled = settled_prefix(study.get_trials(deepcopy=False))
    return {index: (t.params, t.state, t.value, t.intermediate_values, t.user_attrs.get("reason")) for index, t in enumerate(settled)}


def best(out: Path) -> dict[str, Any]:
    """best.json without what names the moment or the folder."""
    data = json.loads((out / "best.json").read_text())
    data["provenance"].pop("created")
    data["study"].pop("storage")
    return data


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(out, "--workers", "1")
    return out


def assert_same_study(out: Path, reference: Path) -> None:
    expected = trials_by_index(reference)
    assert len(expected) == 14 and any(state == TrialState.PRUNED for _, state, *_ in expected.values())
    assert trials_by_index(out) == expected
    assert best(out) == best(reference)


@pytest.mark.parametrize("parallel", [["--workers", "2"], ["--workers", "4"], ["--workers", "1", "--batch-trials", "4"]], ids=" ".join)
def test_the_study_is_the_same_whatever_runs_it(tmp_path: Path, reference: Path, parallel: list[str]) -> None:
    run(tmp_path / "run", *parallel)
    assert_same_study(tmp_path / "run", reference)


def wait_for(out: Path, finished: int) -> list[FrozenTrial]:
    """Wait until the study in ``out`` has ``finished`` trials finished and one running with its
    settings drawn; its trials then. Polled often: the whole study takes seconds."""
    deadline = time.monotonic() + 300
    storage = None
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            storage = storage or optuna_backend.open_storage(f"sqlite:///{out / 'study.db'}", create=False)
            trials = optuna.load_study(study_name="digits-mlp", storage=storage).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - the study may not exist yet
            continue
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        assert done < 14, "the study ended before it could be interrupted"
        if done >= finished and any(t.state == TrialState.RUNNING and "hyperparameters" in t.user_attrs for t in trials):
            return trials
    raise AssertionError("the study never got there")


def test_a_killed_and_resumed_study_equals_an_uninterrupted_one(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    args = [*CLI, *STUDY, "--workers", "2", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out, finished=5)
    os.kill(process.pid, signal.SIGKILL)  # its workers die with it
    process.wait()
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    trials = optuna.load_study(study_name="digits-mlp", storage=optuna_backend.open_storage(f"sqlite:///{out / 'study.db'}")).get_trials()
    assert any(t.user_attrs.get("reason") == "interrupted" for t in trials)  # the kill did land mid-trial
    assert_same_study(out, reference)


def test_a_worker_killed_mid_study_changes_nothing(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen([*CLI, *STUDY, "--workers", "2", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trials = wait_for(out, finished=4)
    victim = next(t for t in trials if t.state == TrialState.RUNNING and t.user_attrs["worker"]["pid"] != process.pid)
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "was killed by SIGKILL" in stderr
    assert_same_study(out, reference)


# ---------------------------------------------------------------------------------------
# The view each trial is drawn from and judged against
# ---------------------------------------------------------------------------------------


def trial(number: int, state: TrialState, **attrs: Any) -> FrozenTrial:
    made = optuna.trial.create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, user_attrs=attrs)
    made.number = number
    return made


def test_a_retry_takes_the_index_of_the_trial_it_retries() -> None:
    trials = [trial(0, TrialState.COMPLETE), trial(1, TrialState.FAIL, reason="interrupted"), trial(2, TrialState.COMPLETE), trial(3, TrialState.COMPLETE, retry_of=1), trial(4, TrialState.RUNNING)]
    assert logical_indices(trials) == {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
    assert [t.number for t in settled_prefix(trials)] == [0, 3, 2]


def test_a_view_holds_the_settled_trials_up_to_the_lookahead_and_waits_for_the_rest() -> None:
    trials = [trial(0, TrialState.COMPLETE), trial(1, TrialState.PRUNED), trial(2, TrialState.RUNNING), trial(3, TrialState.FAIL, reason="failed"), trial(4, TrialState.RUNNING), trial(5, TrialState.RUNNING)]
    assert [t.number for t in fixed_view(trials, 4, lookahead=3)] == [0, 1]  # type: ignore[union-attr]
    assert fixed_view(trials, 5, lookahead=2).number == 2  # type: ignore[union-attr]  # waits for the running trial 2
    assert fixed_view(trials, 0, lookahead=4) == []


def test_a_view_that_waits_on_a_queued_trial_steps_back() -> None:
    """Trial 1 was interrupted and queued again (trial 3): a trial that needs it must not wait
    while holding a worker that could run it."""
    trials = [trial(0, TrialState.COMPLETE), trial(1, TrialState.FAIL, reason="interrupted"), trial(2, TrialState.COMPLETE), trial(3, TrialState.WAITING, retry_of=1), trial(4, TrialState.RUNNING)]
    with pytest.raises(Deferred):
        fixed_view(trials, 4, lookahead=2)


def test_one_worker_finishes_a_study_whose_low_index_was_queued_after_a_high_one(tmp_path: Path) -> None:
    """A worker that asks takes the oldest queued trial; when that one's view waits on a
    trial queued later, it steps back, takes that one, and the study still completes."""
    from sofim_tune.space import load_space
    from sofim_tune.spec import load_spec
    from sofim_tune.study import RunOptions

    spec = load_spec("digits").replace(trials=6, epochs=1, enqueue=[], lookahead=1)
    space = load_space("sofim")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna_backend.open_study(spec, space, url)
    for _ in range(3):  # three trials that were killed before they drew
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"reason": "interrupted"}))
    # Their retries queued in the wrong order: index 2 before index 0 and 1.
    for number in (2, 0, 1):
        study.enqueue_trial({}, user_attrs={"retry_of": number})
    optuna_backend._optimize(spec, space, RunOptions(out_dir=tmp_path, device="cpu", threads_per_trial=1), url, "cpu", None)
    trials = study.get_trials()
    # Trial 3 (index 2) stepped back as trial 6; trials 4 and 5 (indices 0 and 1) ran first.
    assert [t.number for t in settled_prefix(trials)] == [4, 5, 6, 7, 8, 9]
    deferred = [t for t in trials if t.user_attrs.get("reason") == "deferred"]
    assert [(t.number, t.state) for t in deferred] == [(3, TrialState.FAIL)]
    assert trials[6].user_attrs["retry_of"] == 3
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_a_storage_left_with_a_hot_journal_by_a_killed_writer_resumes(tmp_path: Path) -> None:
    """kill -9 in the middle of an SQLite write leaves a hot journal: the storage check must
    roll it back as SQLite does on open, not refuse the study as an unreadable database."""
    from sofim_tune.space import load_space
    from sofim_tune.spec import load_spec

    spec, space = load_spec("digits").replace(trials=2), load_space("sofim")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna_backend.open_study(spec, space, url)
    writer = (
        "import os, signal, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('pragma cache_size=1')\n"
        "db.execute('begin immediate')\n"
        "db.execute('create table scratch(a)')\n"
        "for _ in range(2000): db.execute('insert into scratch values (?)', ('x' * 500,))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / "study.db")], check=False)
    assert (tmp_path / "study.db-journal").is_file()
    optuna_backend.check_storage(url)
    study = optuna_backend.open_study(spec, space, url)
    assert study.study_name == spec.name
    assert "scratch" not in optuna_backend._sqlite_tables(tmp_path / "study.db")  # rolled back
