"""Studies whose workers train several trials at once as one batched model (``--batch-trials``).

Each member is a trial of its own in Optuna's storage, recorded as a sequential trial is; a
batched study is the same as a sequential one (tests/test_reproducible.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.backends.optuna import storage_url
from sofim_tune.batched import TrialBatch
from sofim_tune.spec import load_spec
from sofim_tune.study import torch_threads, train_in_parallel, trial_config
from sofim_tune.space import load_space
from sofim_tune.trial import train_trial
from sofim_tune.tuning import RunOptions, tune

pytestmark = pytest.mark.slow

def stored(out: Path, name: str = "digits-mlp") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage_url(RunOptions(out_dir=out))).get_trials(deepcopy=False)


def test_a_batched_study_records_what_a_sequential_one_does(tmp_path: Path) -> None:
    # SGD with momentum, whose lr reaches far enough to diverge.
    space_file = tmp_path / "sgd.yaml"
    space_file.write_text("optimizer: sgd-momentum\nparams:\n  lr: {type: float, low: 1.0e-3, high: 1.0e+4, log: true}\n  momentum: {type: float, low: 0.5, high: 0.99}\n")
    spec = load_spec("digits").replace(trials=8, epochs=4, pruner="median", search_space=str(space_file))
    tune(spec, RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1, threads_per_trial=1, batch_trials=3, enqueue=({"lr": 1e4, "momentum": 0.9},), export=False))
    trials = stored(tmp_path / "run")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 8 and not [t for t in trials if t.state == TrialState.RUNNING]
    # Slots were refilled: only 3 ran at first, so every later trial started after one ended.
    first_end = min(t.datetime_complete for t in trials[:3])
    assert all(t.datetime_start >= first_end for t in trials[3:])
    diverged = [t for t in trials if t.user_attrs.get("reason") == "diverged"]
    enqueued = [t for t in diverged if t.params["lr"] == pytest.approx(1e4)]
    assert len(enqueued) == 1 and all(t.state == TrialState.PRUNED for t in diverged)
    assert enqueued[0].value == 0.0  # the worst value, as the sequential path reports it
    assert {"worker", "hyperparameters", "seconds"} <= set(trials[1].user_attrs)
    # Each member is its sequential twin: the same seed, the same numbers.
    space = load_space(spec.search_space)
    with torch_threads(1):
        for trial in [t for t in trials if t.state == TrialState.COMPLETE][:2]:
            config = trial_config(spec, space, trial.user_attrs["hyperparameters"], seed=spec.seed + trial.number, device="cpu", options=RunOptions(out_dir=tmp_path))
            alone = train_trial(config)
            assert [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)] == pytest.approx([h["val_accuracy"] for h in alone.history], abs=1e-6)


def test_members_beat_from_the_moment_they_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker on another host killed during its members' first epoch: the RDB heartbeat must
    # find them stale, which it does only for trials that beat at least once.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    stale_in_first_epoch = []
    train_epoch = TrialBatch.train_epoch

    def first_epoch_checked(batch: TrialBatch) -> dict:
        if not stale_in_first_epoch:
            time.sleep(2.2)  # past the shortest grace Optuna allows, on SQLite's clock of whole seconds
            watcher = RDBStorage(url, heartbeat_interval=1, grace_period=1)
            study_id = watcher.get_study_id_from_name("digits-mlp")
            stale_in_first_epoch.append(len(watcher._get_stale_trial_ids(study_id)))
        return train_epoch(batch)

    monkeypatch.setattr(TrialBatch, "train_epoch", first_epoch_checked)
    tune(load_spec("digits").replace(trials=3, epochs=1), RunOptions(out_dir=tmp_path / "run", storage=url, device="cpu", workers=1, threads_per_trial=1, batch_trials=3, export=False))
    assert stale_in_first_epoch == [3]


def test_a_batched_worker_retries_the_members_of_a_worker_that_died_on_another_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optuna_backend, "GRACE_SECONDS", 1)  # Optuna's shortest grace, instead of two minutes
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = load_spec("digits").replace(trials=3, epochs=1, search_space="sofim")  # the dead trial drew lr
    study = optuna_backend.open_study(spec, load_space(spec.search_space), url)
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 10.0, log=True)})
    dead.set_user_attr("worker", {"host": "another-host", "pid": 1, "threads": 1})
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(2.2)  # past the grace, on SQLite's clock of whole seconds
    tune(spec, RunOptions(out_dir=tmp_path / "run", storage=url, device="cpu", workers=1, threads_per_trial=1, batch_trials=2, export=False))
    trials = optuna.load_study(study_name=spec.name, storage=url).get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == dead.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params["lr"] == dead.params["lr"]
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_an_unbatchable_model_falls_back_and_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = load_spec("digits", "resnet18").replace(trials=1, epochs=1, pruner="none", confirm_top=1)
    outcome = tune(spec, RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1, batch_trials=4, export=False))
    warnings = [r.getMessage() for r in caplog.records if "--batch-trials" in r.getMessage()]
    assert warnings == ["--batch-trials 4: resnet18: a _ResNet, not an nn.Sequential; a batch trains only plain stacks of Flatten, Linear, Conv2d, BatchNorm2d, ReLU, MaxPool2d and AdaptiveAvgPool2d layers; trials run one at a time"]
    assert "one at a time" in (outcome.parallelism or "")
    assert len([t for t in stored(tmp_path / "run", spec.name) if t.state == TrialState.COMPLETE]) == 1


def test_the_ray_backend_takes_the_batch_size_the_model_allows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sofim_tune.tuning import check_inputs

    spec = load_spec("digits")
    space = load_space(spec.search_space)
    assert check_inputs(spec, space, RunOptions(out_dir=tmp_path / "a", batch_trials=4), "ray").batch_trials == 4
    assert check_inputs(spec, space, RunOptions(out_dir=tmp_path / "b"), "ray").batch_trials is None  # a resume keeps its experiment's
    resnet = load_spec("digits", "resnet18")
    assert check_inputs(resnet, load_space(resnet.search_space), RunOptions(out_dir=tmp_path / "c", batch_trials=4), "ray").batch_trials == 1
    assert [r.getMessage() for r in caplog.records if "--batch-trials" in r.getMessage()] == [
        "--batch-trials 4: resnet18: a _ResNet, not an nn.Sequential; a batch trains only plain stacks of Flatten, Linear, Conv2d, BatchNorm2d, ReLU, MaxPool2d and AdaptiveAvgPool2d layers; trials run one at a time"
    ]


# ---------------------------------------------------------------------------------------
# Faults (issue 23.4): a failure stays with the members it hit; nothing is left RUNNING
# ---------------------------------------------------------------------------------------


def test_a_batched_confirmation_that_raises_fails_its_members_and_the_rest_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec("digits").replace(epochs=1)
    space = load_space(spec.search_space)
    configs = [trial_config(spec, space, {"lr": lr, "rho": 1.0, "beta1": 0.9}, seed=seed, device="cpu", options=RunOptions(out_dir=Path("."))) for seed, lr in enumerate((0.1, 0.05, 0.02))]
    train_epoch, calls = TrialBatch.train_epoch, []

    def out_of_memory_once(batch: TrialBatch, slots: object = None) -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_epoch(batch, slots)  # type: ignore[arg-type]

    monkeypatch.setattr(TrialBatch, "train_epoch", out_of_memory_once)
    results = train_in_parallel(configs, workers=1, threads=1, batch_trials=2)
    assert [r.status for r in results] == ["failed", "failed", "completed"]
    assert results[0].error == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert results[2].metrics["val_accuracy"] > 0.1


def test_a_batched_worker_that_stops_on_an_error_leaves_no_member_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_finish(batch: TrialBatch, slot: int, *, pruned: bool = False) -> None:
        raise RuntimeError("the batch lost its slot table")

    monkeypatch.setattr(TrialBatch, "finish", broken_finish)
    with pytest.raises(RuntimeError, match="slot table"):
        tune(load_spec("digits").replace(trials=3, epochs=1, pruner="none"), RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1, threads_per_trial=1, batch_trials=3, export=False))
    trials = stored(tmp_path / "run")
    assert len(trials) == 3 and {t.state for t in trials} == {TrialState.FAIL}
    assert {(t.user_attrs["reason"], t.user_attrs["error"]) for t in trials} == {("failed", "RuntimeError: the batch lost its slot table")}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_heartbeat_that_fails_once_is_logged_and_beats_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(optuna_backend, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(optuna_backend, "HEARTBEAT_RETRY_SECONDS", 0.05)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = optuna_backend.open_storage(url)
    trial = optuna.create_study(storage=storage).ask()
    beats: list[int] = []
    record_heartbeat = storage.record_heartbeat

    def blinks_once(trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) == 2:  # the first beat of the thread, after start()'s own
            raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("database is locked"))
        record_heartbeat(trial_id)

    monkeypatch.setattr(storage, "record_heartbeat", blinks_once)
    heartbeats = optuna_backend._Heartbeats(storage, url)
    heartbeats.start(trial)
    deadline = time.monotonic() + 30
    while len(beats) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    heartbeats.close()
    assert len(beats) >= 4, "the thread stopped beating after one failed beat"
    warned = [r for r in caplog.records if r.name == "sofim_tune" and r.levelname == "WARNING"]
    assert warned and warned[0].getMessage() == f"heartbeat of trial {trial.number} failed ((builtins.Exception) database is locked); trying again in 0.05 s"
