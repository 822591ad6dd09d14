"""Optuna studies end to end: `sofim-tune run`, storages, pruning, resume, workers, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.cli.app import app, main
from sofim_tune.errors import UserInputError
from sofim_tune.recommend import load_recommendation
from sofim_tune.spec import load_spec
from sofim_tune.tuning import RunOptions, tune

CLI = [sys.executable, "-m", "sofim_tune.cli.app"]
SMALL = ["--dataset", "digits", "--device", "cpu", "--confirm-top", "1", "--confirm-seeds", "2"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def states(storage: str, name: str = "digits-mlp") -> list[TrialState]:
    return [t.state for t in optuna.load_study(study_name=name, storage=optuna_backend.open_storage(storage)).get_trials(deepcopy=False)]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_full_study_on_digits_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    done = cli("run", *SMALL, "--trials", "10", "--epochs", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert {"study.db", "best.json", "report.html", "run.json"} <= {p.name for p in out.iterdir()}
    rec = load_recommendation(out / "best.json")
    assert rec.dataset == "digits" and rec.arch == "mlp" and rec.optimizer == "sofim"
    assert set(rec.hyperparameters) >= {"lr", "rho", "beta1"}
    assert rec.study.backend == "optuna" and rec.study.final
    assert rec.metric.value > 0.5 and rec.metric.test_accuracy is not None
    finished = [s for s in states(f"sqlite:///{out / 'study.db'}") if s in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 10
    assert "digits-mlp" in done.stdout and "best.json" in done.stdout


def test_paper_default_is_enqueued_first(tmp_path):
    outcome = tune(load_spec("digits").replace(trials=2, epochs=1), RunOptions(out_dir=tmp_path, device="cpu", export=False))
    assert outcome.study.trials[0].params == pytest.approx({"lr": 0.1, "rho": 1.0, "beta1": 0.9})


def test_pruning_prunes_and_diverged_trials_are_pruned_with_a_reason(tmp_path):
    spec = load_spec("digits").replace(trials=16, epochs=6, sampler="random", pruner="hyperband")
    outcome = tune(spec, RunOptions(out_dir=tmp_path, device="cpu", export=False))
    study = outcome.study
    pruned = study.by_state("pruned")
    assert any(t.attrs.get("reason") == "pruned" and len(t.intermediate) < spec.epochs for t in pruned)
    assert len(study.by_state("complete")) + len(pruned) == 16
    for t in study.trials:
        if t.diverged:
            assert t.state == "pruned" and t.attrs["diverged_epoch"] >= 1


def test_journal_storage(tmp_path):
    journal = tmp_path / "study.log"
    spec = load_spec("digits").replace(trials=3, epochs=2)
    outcome = tune(spec, RunOptions(out_dir=tmp_path / "run", storage=f"journal:{journal}", device="cpu", export=False))
    assert journal.stat().st_size > 0 and not (tmp_path / "run" / "study.db").exists()
    assert len(outcome.study.trials) == 3
    record = optuna_backend.load_optuna_record(f"journal:{journal}", None)
    assert [t.number for t in record.trials] == [0, 1, 2]


def test_a_trial_that_raises_fails_alone(tmp_path, monkeypatch):
    real = optuna_backend.train_trial

    def sometimes_broken(config, reporter=None):
        if config.seed == 1:  # trial number 1
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(config, reporter)

    monkeypatch.setattr(optuna_backend, "train_trial", sometimes_broken)
    outcome = tune(load_spec("digits").replace(trials=3, epochs=1), RunOptions(out_dir=tmp_path, device="cpu", export=False))
    failed = outcome.study.by_state("failed")
    assert len(failed) == 1 and "illegal memory access" in failed[0].attrs["error"]
    assert len(outcome.study.by_state("complete")) + len(outcome.study.by_state("pruned")) == 3


def test_rerun_resumes_only_what_is_missing(tmp_path):
    options = RunOptions(out_dir=tmp_path, device="cpu", export=False)
    spec = load_spec("digits").replace(epochs=1)
    tune(spec.replace(trials=2), options)
    assert len(tune(spec.replace(trials=2), options).study.trials) == 2
    assert len(tune(spec.replace(trials=4), options).study.trials) == 4


def test_resume_after_sigkill_reaches_exactly_the_target(tmp_path):
    out, trials = tmp_path / "run", 8
    args = ["run", *SMALL, "--trials", str(trials), "--epochs", "12", "--pruner", "none", "--workers", "1", "--batch-trials", "1", "--out", str(out)]
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{out / 'study.db'}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        time.sleep(0.5)
        # Frozen while we look, so that the running trial we see is still running when it is killed.
        os.kill(process.pid, signal.SIGSTOP)
        try:
            polling = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 2}})
            current = [t.state for t in optuna.load_study(study_name="digits-mlp", storage=polling).get_trials(deepcopy=False)]
        except Exception:  # the study may not exist yet, or the frozen process holds its lock
            current = []
        if current.count(TrialState.COMPLETE) >= 2 and TrialState.RUNNING in current:
            break
        os.kill(process.pid, signal.SIGCONT)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert TrialState.RUNNING in states(storage)

    done = cli(*args)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="digits-mlp", storage=optuna_backend.open_storage(storage))
    all_trials = study.get_trials(deepcopy=False)
    assert not [t for t in all_trials if t.state == TrialState.RUNNING]
    assert len([t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == trials
    killed = [t for t in all_trials if t.state == TrialState.FAIL and t.user_attrs.get("reason") == "interrupted"]
    assert len(killed) == 1
    retried = [t for t in all_trials if t.user_attrs.get("retry_of") == killed[0].number]
    # The settings it had drawn, if any: on a busy machine the kill can land between ask and draw.
    assert len(retried) == 1 and killed[0].params.items() <= retried[0].params.items()


def test_two_workers_share_the_default_storage(tmp_path):
    out = tmp_path / "run"
    done = cli("run", *SMALL, "--trials", "6", "--epochs", "2", "--workers", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{out / 'study.db'}")
    # A trial asked for in the same instant as the last needed one is failed as "surplus"
    # before it starts, and no record shows it.
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("reason") != "surplus"]
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 6
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    assert "locked" not in done.stderr


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished run whose files must survive every bad command below untouched."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    done = cli("run", *SMALL, "--trials", "2", "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "imagenet"),
        (["--arch", "transformer"], "transformer"),
        (["--space", "nope"], "nope"),
        (["--sampler", "bayes"], "bayes"),
        (["--pruner", "asha"], "asha"),
        (["--trials", "0"], "trials"),
        (["--spec", "no-such-study"], "no-such-study"),
        (["--space", "{bad_space}"], "low"),
        (["--storage", "postgresql://alice:s3cret@127.0.0.1:1/db"], "keeps this study in another storage"),
        (["--space", "sofim"], "different search space"),
        (["--enqueue", "{corrupt_json}"], "not a sofim-tune v1 recommendation"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_earlier_results(args, message, earlier_run, tmp_path, monkeypatch, capsys):
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("optimizer: sofim\nparams:\n  lr: {type: float, low: 5.0, high: 1.0}\n")
    corrupt = tmp_path / "best.json"
    corrupt.write_text('{"schema": "sofim-tune/recommendation/v1", "dataset": ')
    before = digest(earlier_run)
    args = [a.format(bad_space=bad_space, corrupt_json=corrupt) for a in args]
    # In-process through the command's own entry point (Click's usage errors included): the
    # same code as the subprocess tests above, without paying an interpreter start per case.
    monkeypatch.setattr(sys, "argv", ["sofim-tune", "run", "--dataset", "digits", "--device", "cpu", "--epochs", "1", "--trials", "2", "--out", str(earlier_run), *args])
    with pytest.raises(SystemExit) as exited:
        main()
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert exited.value.code == 2, stderr
    assert len(lines) == 1 and message in lines[0], stderr
    assert "s3cret" not in stderr + stdout
    assert digest(earlier_run) == before


def test_run_folder_remembers_its_storage(earlier_run):
    assert json.loads((earlier_run / "run.json").read_text())["backend"] == "optuna"


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_cleanly_and_marks_the_trial_interrupted(tmp_path, workers):
    """SIGINT to sofim-tune alone (``kill -INT``, not a terminal's whole process group) reaches its workers."""
    out = tmp_path / "run"
    args = ["run", *SMALL, "--trials", "4", "--epochs", "300", "--pruner", "none", "--workers", str(workers), "--batch-trials", "1", "--out", str(out)]
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{out / 'study.db'}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            if states(storage).count(TrialState.RUNNING) == workers:
                break
        except Exception:  # the study may not exist yet
            continue
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    study = optuna.load_study(study_name="digits-mlp", storage=storage)
    # Every trial running at the signal ends interrupted and none stays RUNNING (a worker the
    # signal missed would leave one). In the two seconds sofim-tune gives a terminal's Ctrl-C
    # to arrive first, a worker may finish its trial, and start another that is interrupted.
    failed = [t.user_attrs.get("reason") for t in study.trials if t.state == TrialState.FAIL]
    assert failed and set(failed) == {"interrupted"}
    assert TrialState.RUNNING not in states(storage)


def test_a_retry_that_is_interrupted_again_is_retried_once(tmp_path):
    from sofim_tune.space import load_space

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna_backend.open_study(load_spec("digits").replace(trials=2), load_space("sofim"), url)
    for generation in range(3):  # the original, then two retries, each interrupted
        trial = study.ask()  # takes the queued retry when there is one
        trial.suggest_float("lr", 1e-4, 10.0, log=True)
        trial.set_user_attr("reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        assert optuna_backend.recover_interrupted(study, url) == 1, generation
        assert optuna_backend.recover_interrupted(study, url) == 0
    tried = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len({t.params["lr"] for t in tried}) == 1
    assert [t.user_attrs.get("retry_of") for t in tried] == [None, 0, 1]


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_trial_whose_process_died_inside_ask_is_retried_with_the_settings_it_took(tmp_path, storage):
    # Killed after study.ask created the trial and before it named its worker. On SQLite, recovery
    # holds the ask lock, so such a trial is dead at once; elsewhere after GRACE_SECONDS.
    from sofim_tune.space import load_space

    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else f"journal:{tmp_path / 'study.log'}"
    study = optuna_backend.open_study(load_spec("digits").replace(trials=2), load_space("sofim"), url)
    queued = {"lr": 0.5, "rho": 2.0, "beta1": 0.9}
    for age in (optuna_backend.GRACE_SECONDS + 5, 1):
        # It took queued settings (the spec's first, say) and drew none of its own yet.
        left = optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={"fixed_params": queued})
        left.datetime_start = datetime.now() - timedelta(seconds=age)
        study.add_trial(left)
    old, young = study.trials
    failed = [old, young] if storage == "sqlite" else [old]
    assert optuna_backend.recover_interrupted(study, url) == len(failed)
    trials = study.trials
    assert [(t.state, t.user_attrs.get("reason")) for t in trials[:2]] == [(TrialState.FAIL, "interrupted") if t in failed else (TrialState.RUNNING, None) for t in (old, young)]
    retries = trials[2:]
    assert [(t.state, t.system_attrs["fixed_params"], t.user_attrs["retry_of"]) for t in retries] == [(TrialState.WAITING, queued, t.number) for t in failed]


def test_study_ask_names_the_worker_before_it_lets_go_of_the_ask_lock(tmp_path):
    from sofim_tune.space import load_space

    spec, url = load_spec("digits").replace(trials=2), f"sqlite:///{tmp_path / 'study.db'}"
    optuna_backend.open_study(spec, load_space("sofim"), url)
    study = optuna_backend._worker_study(spec, load_space("sofim"), url, optuna_backend._Planner(spec, load_space("sofim")))
    trial = study.ask()
    # Recovery, holding the lock, finds the trial named: it is this live process's, not an orphan.
    assert optuna_backend.recover_interrupted(study, url) == 0
    assert study.trials[trial.number].user_attrs["worker"]["pid"] == os.getpid()
    assert study.trials[trial.number].state == TrialState.RUNNING


def test_two_processes_recovering_one_orphan_at_once_both_go_on(tmp_path, monkeypatch):
    from sofim_tune.space import load_space

    study = optuna_backend.open_study(load_spec("digits").replace(trials=2), load_space("sofim"), f"sqlite:///{tmp_path / 'study.db'}")
    left = optuna.trial.create_trial(state=TrialState.RUNNING)
    left.datetime_start = datetime.now() - timedelta(seconds=optuna_backend.GRACE_SECONDS + 5)
    study.add_trial(left)
    seen_running = study.get_trials(deepcopy=True, states=(TrialState.RUNNING,))
    study._storage.set_trial_state_values(seen_running[0]._trial_id, TrialState.FAIL)  # the other process was first
    get_trials = study.get_trials
    monkeypatch.setattr(study, "get_trials", lambda deepcopy=True, states=None: seen_running if states == (TrialState.RUNNING,) else get_trials(deepcopy=deepcopy, states=states))
    optuna_backend.recover_interrupted(study, f"sqlite:///{tmp_path / 'study.db'}")  # does not raise UpdateFinishedTrialError


def test_resume_with_other_epochs_is_refused(tmp_path):
    options = RunOptions(out_dir=tmp_path, device="cpu", export=False)
    tune(load_spec("digits").replace(trials=1, epochs=1), options)
    with pytest.raises(UserInputError, match="epochs=1, not 2"):
        tune(load_spec("digits").replace(trials=1, epochs=2), options)


def test_a_run_folder_of_another_study_is_refused(tmp_path):
    options = RunOptions(out_dir=tmp_path, device="cpu", export=False)
    tune(load_spec("digits").replace(trials=1, epochs=1), options)
    other = RunOptions(out_dir=tmp_path, storage=f"journal:{tmp_path / 'other.log'}", device="cpu", export=False)
    with pytest.raises(UserInputError, match=r"keeps this study in another storage \(study.db\)"):
        tune(load_spec("digits").replace(trials=1, epochs=1), other)
    with pytest.raises(UserInputError, match="already holds another study"):
        tune(load_spec("digits", "cnn").replace(trials=1, epochs=1), options)


def test_diverged_trials_are_pruned_with_their_reason(tmp_path, monkeypatch):
    """Detection itself is tested in test_trial.py; here, how the study records it."""
    real = optuna_backend.train_trial

    def first_diverges(config, reporter=None):
        result = real(config, reporter)
        if config.seed == 0:
            result.status, result.diverged_epoch = "diverged", 1
        return result

    monkeypatch.setattr(optuna_backend, "train_trial", first_diverges)
    study = tune(load_spec("digits").replace(trials=2, epochs=1), RunOptions(out_dir=tmp_path, device="cpu", export=False)).study
    diverged = study.trials[0]
    assert diverged.state == "pruned" and diverged.diverged and diverged.attrs["diverged_epoch"] == 1
    assert not study.trials[1].diverged


def test_a_diverged_trial_tells_the_sampler_the_worst_value_where_it_diverged(tmp_path, monkeypatch):
    """A trial that trained 2 good epochs, then diverged in its 3rd, reads 0 at epoch 3 to TPE."""
    real = optuna_backend.train_trial

    def diverges_in_third(config, reporter=None):
        result = real(config.__class__(**{**config.__dict__, "epochs": 2}), reporter)
        result.status, result.diverged_epoch = "diverged", 3
        return result

    monkeypatch.setattr(optuna_backend, "train_trial", diverges_in_third)
    study = tune(load_spec("digits").replace(trials=1, epochs=4, pruner="none"), RunOptions(out_dir=tmp_path, device="cpu", export=False)).study
    assert study.trials[0].intermediate[3] == 0.0 and study.trials[0].intermediate[2] > 0.5


def test_relative_out_folder_is_readable_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tune(load_spec("digits").replace(trials=1, epochs=1), RunOptions(out_dir=Path("runs/d"), device="cpu", export=False))
    monkeypatch.chdir(tmp_path.parent)
    done = CliRunner().invoke(app, ["show", str(tmp_path / "runs" / "d")])
    assert done.exit_code == 0, done.output
    assert "1 of 1" in done.stdout


def test_rerunning_a_finished_study_reuses_its_confirmations(tmp_path, monkeypatch):
    spec = load_spec("digits").replace(trials=2, epochs=1, confirm_top=1, confirm_seeds=2)
    options = RunOptions(out_dir=tmp_path, device="cpu")
    first = tune(spec, options)
    calls = []
    monkeypatch.setattr(optuna_backend, "train_trial", lambda *a, **k: calls.append(a))
    second = tune(spec, options)
    assert calls == []
    assert second.study.confirmations == first.study.confirmations
    assert load_recommendation(second.best_json).metric.test_accuracy is not None


# --------------------------------------------------------------------------- resumes and workers


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_an_extended_study_does_not_replay_its_sampler(tmp_path, sampler):
    """Seeded from the study's state: trials added on a rerun are new settings, not copies."""
    spec = load_spec("digits").replace(epochs=1, sampler=sampler, pruner="none", enqueue=[])
    options = RunOptions(out_dir=tmp_path, device="cpu", export=False)
    tune(spec.replace(trials=3), options)
    trials = tune(spec.replace(trials=6), options).study.trials
    first, added = [t.params for t in trials[:3]], [t.params for t in trials[3:]]
    assert len(added) == 3
    assert not [p for p in added if p in first]


def test_a_grid_reaches_its_trial_count(tmp_path):
    """A 10-trial grid over three parameters needs 3 values per axis (27 points), not 2 (8)."""
    outcome = tune(load_spec("digits").replace(trials=10, epochs=1, sampler="grid", pruner="none", confirm_top=1, confirm_seeds=2), RunOptions(out_dir=tmp_path, device="cpu"))
    assert len(outcome.study.by_state("complete")) == 10
    assert load_recommendation(outcome.best_json).study.final


def test_an_image_folder_without_test_split_finishes_with_null_test_accuracy(tmp_path):
    from fake_datasets import write_image_folder

    folder = tmp_path / "shapes"
    for split, seed in (("train", 0), ("val", 1)):
        write_image_folder(folder / split, ["a", "b"], per_class=8, seed=seed)
    spec = load_spec(str(folder)).replace(trials=2, epochs=1, confirm_top=1, confirm_seeds=2)
    outcome = tune(spec, RunOptions(out_dir=tmp_path / "run", device="cpu"))
    rec = load_recommendation(outcome.best_json)
    assert rec.study.final and rec.metric.confirm is not None
    assert rec.metric.test_accuracy is None
    # A rerun reuses the stored confirmation instead of failing the same way again.
    assert tune(spec, RunOptions(out_dir=tmp_path / "run", device="cpu")).study.confirmations == outcome.study.confirmations


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_killed_worker_is_named_and_the_others_finish_the_study(tmp_path):
    out, trials = tmp_path / "run", 6
    args = ["run", *SMALL, "--trials", str(trials), "--epochs", "15", "--pruner", "none", "--workers", "2", "--out", str(out)]
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{out / 'study.db'}"
    victim = None
    try:
        deadline = time.monotonic() + 180
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.3)
            if not (out / "run.json").exists():
                continue
            workers = set(_children(process.pid))
            study = optuna.load_study(study_name="digits-mlp", storage=optuna_backend.open_storage(storage))
            running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("worker", {}).get("pid") in workers]
            if running and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                victim = running[0]
        assert victim is not None, "no worker ran a trial in time"
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    pid = victim.user_attrs["worker"]["pid"]
    warning = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    assert f"pid {pid}) was killed by SIGKILL" in warning[0]
    study = optuna.load_study(study_name="digits-mlp", storage=optuna_backend.open_storage(storage))
    all_trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("reason") != "surplus"]
    assert not [t for t in all_trials if t.state == TrialState.RUNNING]
    assert len([t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == trials
    assert load_recommendation(out / "best.json").study.final and (out / "report.html").exists()
    # The trial it was training when the signal landed: the one seen running or, if that one
    # finished in the instant before, the next it had started; none if it was between the two.
    killed = [t for t in all_trials if t.user_attrs.get("worker", {}).get("pid") == pid and t.state == TrialState.FAIL]
    if not killed:
        assert "it left no trial" in warning[0] and study.trials[victim.number].state == TrialState.COMPLETE
        return
    (left,) = killed
    assert left.number >= victim.number and left.user_attrs["reason"] == "interrupted"
    assert f"it left trial {left.number}" in warning[0]
    (retried,) = [t for t in all_trials if t.user_attrs.get("retry_of") == left.number]
    assert left.params.items() <= retried.params.items()  # empty when the kill landed between ask and draw


def test_a_log_without_a_terminal_gets_a_line_per_finished_trial(tmp_path):
    done = cli("run", *SMALL, "--trials", "4", "--epochs", "2", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("digits-mlp trial ")]
    # One line per trial, in the order they finish (two workers: not always the order they started).
    assert sorted(line.split()[2] for line in lines) == ["0", "1", "2", "3"]
    assert all("/4 finished" in line and "lr=" in line for line in lines)


# --------------------------------------------------------------------------- bad input, nothing lost


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--timeout", "-5"], "--timeout must be > 0"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--storage", "postgresql://alice:s3cret@127.0.0.1:1/db"], "cannot open storage"),
        (["--storage", "alice:s3cret@127.0.0.1/db"], "cannot open storage"),
    ],
)
def test_a_run_refused_at_the_start_leaves_no_files(tmp_path, extra, message):
    out = tmp_path / "new"
    done = CliRunner().invoke(app, ["run", "--dataset", "digits", "--device", "cpu", "--trials", "2", "--out", str(out), *extra])
    assert done.exit_code == 2, done.output
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert "s3cret" not in done.stderr
    assert not out.exists()


def test_out_that_is_not_a_run_folder_is_refused_and_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "best.json").write_text("my own notes")
    (mine / "report.html").write_text("<p>mine</p>")
    before = digest(mine)
    done = CliRunner().invoke(app, ["run", "--dataset", "digits", "--device", "cpu", "--trials", "2", "--out", str(mine)])
    assert done.exit_code == 2
    assert "is not empty and is not a sofim-tune run folder" in done.stderr
    assert digest(mine) == before and sorted(p.name for p in mine.iterdir()) == ["best.json", "report.html"]


def test_out_that_is_a_file_says_so(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    done = CliRunner().invoke(app, ["run", "--dataset", "digits", "--device", "cpu", "--trials", "2", "--out", str(target)])
    assert done.exit_code == 2 and "is a file" in done.stderr and "storage" not in done.stderr
    assert target.read_text() == "x"


def test_study_file_names_the_dataset(tmp_path):
    spec_file = tmp_path / "mine.toml"
    spec_file.write_text('dataset = "digits"\nname = "my-digits"\ntrials = 2\nepochs = 1\nconfirm_top = 1\nconfirm_seeds = 2\n')
    done = CliRunner().invoke(app, ["run", "--spec", str(spec_file), "--device", "cpu", "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert load_recommendation(tmp_path / "run" / "best.json").study.name == "my-digits"


def test_a_spec_name_cannot_leave_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_file = tmp_path / "evil.toml"
    spec_file.write_text('dataset = "digits"\nname = "../escaped"\n')
    done = CliRunner().invoke(app, ["run", "--spec", str(spec_file), "--device", "cpu"])
    assert done.exit_code == 2 and "not a safe study name" in done.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_storage_from_the_environment(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MY_STUDY_DB", url)
    out = tmp_path / "run"
    done = CliRunner().invoke(app, ["run", *SMALL, "--trials", "2", "--epochs", "1", "--storage-env", "MY_STUDY_DB", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "elsewhere.db").exists() and not (out / "study.db").exists()
    shown = CliRunner().invoke(app, ["show", "--storage-env", "MY_STUDY_DB"])
    assert shown.exit_code == 0 and "2 of 2" in shown.stdout
    unset = CliRunner().invoke(app, ["show", "--storage-env", "NOT_SET_ANYWHERE"])
    assert unset.exit_code == 2 and "NOT_SET_ANYWHERE" in unset.stderr


@pytest.mark.parametrize("space_name", ["adamw", "sgd-momentum"])
def test_baseline_spaces_work_with_every_shipped_spec(space_name):
    """A spec's enqueue names SOFIM's settings; with a baseline's space it does not apply."""
    from sofim_tune.space import load_space
    from sofim_tune.spec import spec_names
    from sofim_tune.study import settings_to_enqueue

    options = RunOptions(out_dir=Path("unused"))
    space = load_space(space_name)
    first = {"adamw": {"lr": 1e-3, "beta1": 0.9, "weight_decay": 1e-2}, "sgd-momentum": {"lr": 0.1, "momentum": 0.9}}[space_name]
    for name in spec_names():
        spec = load_spec(study=name)
        # Not SOFIM's settings: the baseline's own usual first ones.
        assert settings_to_enqueue(spec, space, options) == [space.from_hyperparameters(first)]
        assert settings_to_enqueue(spec, load_space(spec.search_space), options)  # its own space keeps them


def test_a_baseline_study_on_digits(tmp_path):
    done = cli("run", *SMALL, "--space", "adamw", "--trials", "2", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    rec = load_recommendation(tmp_path / "run" / "best.json")
    assert rec.optimizer == "adamw" and "rho" not in rec.hyperparameters
    import optuna

    first = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").trials[0]
    assert first.params == {"lr": 1e-3, "beta1": 0.9, "weight_decay": 1e-2}


def test_every_shipped_spec_gives_every_shipped_space_a_first_setting():
    """A spec's settings are completed (weight_decay for -wd spaces) or replaced by the optimizer's own."""
    from sofim_tune.space import load_space, space_names
    from sofim_tune.spec import spec_names
    from sofim_tune.study import settings_to_enqueue

    options = RunOptions(out_dir=Path("unused"))
    for spec_name in spec_names():
        for space_name in space_names():
            assert len(settings_to_enqueue(load_spec(study=spec_name), load_space(space_name), options)) == 1, (spec_name, space_name)


def test_a_folder_with_its_own_val_selects_on_it_and_measures_on_final_images_from_train(tmp_path):
    from fake_datasets import write_image_folder

    folder = tmp_path / "shapes"
    for split, seed in (("train", 0), ("val", 1)):
        write_image_folder(folder / split, ["a", "b"], per_class=8, seed=seed)
    outcome = tune(load_spec(str(folder)).replace(trials=2, epochs=1, confirm_top=1, confirm_seeds=2), RunOptions(out_dir=tmp_path / "run", device="cpu"))
    selection, final = outcome.study.confirmations
    assert not selection.final and len(set(selection.split_seeds)) == 1  # every selection run validates on val/
    confirm = load_recommendation(outcome.best_json).metric.confirm
    # 10% of train/'s 16 images, as a validation split of it would hold.
    assert final.final and confirm.runs == "final" and confirm.protocol.startswith("final") and confirm.images == 2


# ---------------------------------------------------------------------------------------
# Round 4 (issues 27 and 23): storages that are not ours, surplus trials, faults in workers
# ---------------------------------------------------------------------------------------


def test_a_journal_of_the_same_study_resumes(tmp_path):
    """A valid journal passes check_storage: a rerun on it goes on where it stopped."""
    journal = tmp_path / "study.log"
    spec = load_spec("digits").replace(trials=2, epochs=1)
    options = RunOptions(out_dir=tmp_path / "run", storage=f"journal:{journal}", device="cpu", workers=1, export=False)
    tune(spec, options)
    assert len(tune(spec.replace(trials=3), options).study.trials) == 3


@pytest.mark.parametrize(
    "content, accepted",
    [
        (b"", True),
        (b'{"op_code":0,"worker_id":"w","study_name":"s","directions":[1]}\n', True),
        (b"hello\n", False),
        (b'{"op_code":4,"worker_id":"w"}\n', False),  # a journal starts by creating a study
        (b'{"op_code":0}\n', False),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", False),
    ],
)
def test_a_journal_must_be_new_empty_or_a_journal(tmp_path, content, accepted):
    file = tmp_path / "f.txt"
    file.write_bytes(content)
    if accepted:
        optuna_backend.check_storage(f"journal:{file}")
    else:
        with pytest.raises(UserInputError, match="is not an Optuna journal"):
            optuna_backend.open_storage(f"journal:{file}")
    assert file.read_bytes() == content


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://", "sqlite:///file::memory:?cache=shared"])
def test_a_storage_in_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="in memory"):
        tune(load_spec("digits").replace(trials=2, epochs=1), RunOptions(out_dir=tmp_path / "run", storage=url, device="cpu", workers=1))
    assert list(tmp_path.iterdir()) == []


def test_a_grid_larger_than_the_limit_is_refused_before_anything_is_written(tmp_path):
    from sofim_tune.space import load_space
    from sofim_tune.study import MAX_GRID_POINTS, grid_axes

    space = load_space("sofim")
    largest = max(n for n in range(2, 100) if n ** len(space.params) <= MAX_GRID_POINTS)
    assert len(grid_axes(space, largest ** len(space.params))["lr"]) == largest
    with pytest.raises(UserInputError, match="--sampler grid"):
        grid_axes(space, 10**18)  # answered at once, not after counting up to a billion
    with pytest.raises(UserInputError, match=f"limit of {MAX_GRID_POINTS:,}"):
        tune(load_spec("digits").replace(trials=MAX_GRID_POINTS + 1, epochs=1, sampler="grid"), RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1))
    assert not (tmp_path / "run").exists()


def test_workers_beyond_the_target_create_no_surplus_trials_and_the_progress_agrees(tmp_path):
    """Six workers for two trials: the four that find the target reached ask for no trial at
    all (issue 27.7 found hundreds of failed "surplus" trials), and the last progress record
    shows what the storage holds."""
    records = []
    options = RunOptions(out_dir=tmp_path, device="cpu", workers=6, threads_per_trial=1, batch_trials=1, parallelism="six workers (test)", export=False)
    outcome = tune(load_spec("digits").replace(trials=2, epochs=1, pruner="none"), options, on_progress=records.append)
    trials = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}").get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    finished = [t for t in records[-1].trials if t.state in ("complete", "pruned")]
    assert len(finished) == 2 and len(outcome.study.trials) == 2


def test_importing_the_optuna_backend_leaves_optuna_and_warnings_alone():
    """Issue 23.10: Optuna's verbosity and its warnings stay as the importer set them (what torch
    adds to the filters when imported is torch's; the whole package is checked in test_package)."""
    code = (
        "import warnings, optuna\n"
        "before = list(warnings.filters)\n"
        "import sofim_tune.backends.optuna\n"
        "added = [f for f in warnings.filters if f not in before and f[2].__module__.startswith('optuna')]\n"
        "assert optuna.logging.get_verbosity() == optuna.logging.INFO and not added, added\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
