"""The Ray Tune backend on a local Ray with 2 CPUs: search, early stopping, resume, checks.

Every test trains the digits MLP for a few epochs on the CPU; one Ray instance serves them
all, because starting Ray costs seconds, and one finished study (``finished_run``) serves
every test that only reads it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import ray.cloudpickle
import torch
from hostile import assert_unchanged, snapshot
from optuna.trial import TrialState
from ray import tune as ray_tune

from sofim_tune.backends import ray as ray_backend
from sofim_tune.backends import ray_member
from sofim_tune.backends.ray import BACKEND, MAX_CONSECUTIVE_FAILURES, NUMBER_KEY, load_ray_record, run_ray_study
from sofim_tune.errors import UserInputError
from sofim_tune.recommend import SCHEMA_ID, load_recommendation
from sofim_tune.records import StudyRecord
from sofim_tune.runs import load_run
from sofim_tune.space import ParamRange, SearchSpace, load_space
from sofim_tune.spec import StudySpec, load_spec
from sofim_tune.study import trial_config, worst_value
from sofim_tune.trial import TrialConfig, TrialResult
from sofim_tune.tuning import RunOptions, TuneOutcome, tune

pytestmark = pytest.mark.slow

EPOCHS = 6


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The stand-in trainables and tasks below run in Ray's workers, which cannot import
    # this file: Ray sends them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def small_spec(**overrides: object) -> StudySpec:
    # The sofim space (lr, rho, beta1), whose names the hand-made trials of these tests use.
    return load_spec("digits").replace(**{"trials": 9, "epochs": EPOCHS, "confirm_top": 1, "confirm_seeds": 2, "search_space": "sofim", **overrides})


def options(out_dir: Path, **overrides: object) -> RunOptions:
    return RunOptions(out_dir=out_dir, **{"device": "cpu", **overrides})  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    spec: StudySpec
    out: Path
    outcome: TuneOutcome
    seen: list[StudyRecord]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One study with ASHA, confirmed and exported by ``tune``."""
    spec = small_spec()
    out = tmp_path_factory.mktemp("finished") / "run"
    seen: list[StudyRecord] = []
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    outcome = tune(spec, options(out), backend="ray", on_progress=seen.append)
    # Set for Ray's run only: the process's environment is as it was.
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    return FinishedRun(spec, out, outcome, seen)


def searcher_study(experiment: Path) -> optuna.Study:
    """The Optuna study inside the searcher's last saved state (Ray's pickle; the test trusts it)."""
    state_file = max(experiment.glob("searcher-state-*.pkl"))
    with state_file.open("rb") as f:
        return pickle.load(f)["_ot_study"]


def test_tune_end_to_end(finished_run: FinishedRun) -> None:
    spec, out, outcome, seen = finished_run.spec, finished_run.out, finished_run.outcome, finished_run.seen
    study = outcome.study

    assert study.backend == "ray" and study.pruner == "asha" and study.sampler == "tpe"
    assert len(study.trials) == spec.trials
    assert [t.number for t in study.trials] == list(range(spec.trials))
    assert {t.state for t in study.trials} <= {"complete", "pruned"}
    # The spec's enqueued default runs first, with the seed of trial 0.
    assert study.trials[0].params == pytest.approx({"lr": 0.1, "rho": 1.0, "beta1": 0.9})
    completed, pruned = study.by_state("complete"), study.by_state("pruned")
    assert completed and pruned, "ASHA stopped no trial early"
    for trial in completed:
        assert sorted(trial.intermediate) == list(range(1, EPOCHS + 1))
        assert trial.attrs["fisher_ratio"] > 0  # SOFIM's, as the Optuna backend records it
        assert trial.value == trial.intermediate[EPOCHS]
        assert trial.started is not None and trial.finished is not None
    for trial in pruned:
        assert trial.attrs["reason"] == "pruned" and trial.value is None
        assert 1 <= len(trial.intermediate) < EPOCHS
    # The live view saw every result; its last call, the search's end (before confirmation).
    assert len(seen) > spec.trials and seen[-1] == dataclasses.replace(study, confirmations=[])

    rec = load_recommendation(outcome.best_json)
    assert rec.study.backend == "ray" and rec.study.trials == spec.trials and rec.study.final
    assert rec.to_dict()["schema"] == SCHEMA_ID
    assert outcome.report is not None and (out / "report.html").is_file()
    assert json.loads((out / "run.json").read_text()) == {"backend": "ray", "storage": str(out.resolve() / "ray" / spec.name), "study": spec.name}
    # The run folder alone gives the study back, confirmations included.
    assert load_ray_record(out) == study
    assert [c.final for c in study.confirmations] == [False, True]  # the selection runs, then the final runs


def test_sampler_sees_stopped_trials_as_pruned(finished_run: FinishedRun) -> None:
    # Ray's OptunaSearch tells Optuna an ASHA-stopped trial is COMPLETE with its last
    # epoch's value; the sampler must see what the Optuna backend would show it.
    study = finished_run.outcome.study
    searched = searcher_study(finished_run.out / "ray" / finished_run.spec.name)
    states = {t.number: t.state for t in searched.trials}
    assert states == {t.number: TrialState.PRUNED if t.state == "pruned" else TrialState.COMPLETE for t in study.trials}
    values = {t.number: t.value for t in searched.trials if t.state == TrialState.COMPLETE}
    assert values == {t.number: t.value for t in study.by_state("complete")}
    for trial in searched.trials:
        assert trial.intermediate_values == study.trials[trial.number].intermediate


def _no_unpickling(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a run folder was unpickled")


def test_run_folder_is_read_from_plain_files(finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading a run folder someone sent runs no code from it: nothing is unpickled.
    study = finished_run.outcome.study
    for module in (pickle, ray.cloudpickle):
        monkeypatch.setattr(module, "loads", _no_unpickling)
        monkeypatch.setattr(module, "load", _no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", _no_unpickling)
    assert load_ray_record(finished_run.out) == study

    # A copy reads the same with the original out of the way.
    copy = tmp_path / "copy"
    shutil.copytree(finished_run.out, copy)
    hidden = finished_run.out.with_name("hidden")
    finished_run.out.rename(hidden)
    try:
        assert load_ray_record(copy) == study
        assert load_run(copy) == study  # as show, plot and export read it
    finally:
        hidden.rename(finished_run.out)


@pytest.mark.parametrize("batch_trials", [None, 3], ids=["one-per-trial", "batched"])
def test_interrupted_run_resumes(tmp_path: Path, batch_trials: int | None) -> None:
    spec = small_spec(trials=10)
    space = load_space(spec.search_space)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(record: StudyRecord) -> None:
        # As a user would: Ray saves its state and the run raises KeyboardInterrupt.
        if sum(t.state != "running" for t in record.trials) >= 4 and not press_ctrl_c.sent:  # type: ignore[attr-defined]
            press_ctrl_c.sent = True  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGINT)

    press_ctrl_c.sent = False  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        run_ray_study(spec, space, options(out, batch_trials=batch_trials), on_progress=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is handler, "Tune's Ctrl-C handler was left installed"
    before = load_ray_record(out)
    kept = [t for t in before.trials if t.state != "running"]
    assert 4 <= len(kept) < spec.trials and not before.finished

    # A different space or budget must not touch the experiment.
    state = sorted(p.name for p in (out / "ray" / spec.name).iterdir())
    with pytest.raises(UserInputError, match="different search space"):
        run_ray_study(spec, load_space("sofim-effective"), options(out))
    with pytest.raises(UserInputError, match="--trials 10 --epochs 6"):
        run_ray_study(spec.replace(trials=12), space, options(out))
    assert sorted(p.name for p in (out / "ray" / spec.name).iterdir()) == state

    after = run_ray_study(spec, space, options(out))
    assert len(after.trials) == spec.trials and after.finished
    by_number = {t.number: t for t in after.trials}
    for trial in kept:
        # Restored, not run again: the same record, timestamps included.
        assert by_number[trial.number] == trial

    # Once finished, running the command again changes nothing.
    assert run_ray_study(spec, space, options(out)) == after


@pytest.mark.parametrize("batch_trials", [None, 2], ids=["one-per-trial", "batched"])
def test_diverged_and_failed_trials(tmp_path: Path, batch_trials: int | None) -> None:
    # A trial that fails inside: lr = 0 fails the optimizer (and Ray retries it). load_space
    # refuses a range holding a value the optimizer refuses, so the space is built as it is.
    # lr = 80 with momentum blows the loss up in the first epoch.
    space = SearchSpace("steep", "sgd-momentum", {"lr": ParamRange("lr", "float", 0.0, 100.0), "momentum": ParamRange("momentum", "float", 0.9, 0.95)}, {}, source="steep")
    spec = small_spec(trials=2, epochs=3, search_space="sgd-momentum", enqueue=[{"lr": 0.0, "momentum": 0.9}, {"lr": 80.0, "momentum": 0.9}])
    study = run_ray_study(spec, space, options(tmp_path / "run", batch_trials=batch_trials))

    # The diverged trial's result holds the same finite worst value as in the Optuna
    # backend (not ±1e300, which flattens a GP sampler's standardisation).
    experiment = tmp_path / "run" / "ray" / spec.name
    (folder,) = experiment.glob("trial_0001_*")
    last = json.loads((folder / "result.json").read_text().splitlines()[-1])
    assert last["reason"] == "diverged" and last[spec.metric] == worst_value(spec.direction) == 0.0

    # The failed trial (after Ray's retries) does not count: a third one ran in its place.
    failed, diverged, third = study.trials
    assert failed.state == "failed" and failed.attrs["reason"] == "failed"
    assert failed.attrs["error"] == "UserInputError: lr must be > 0, got 0.0"
    assert diverged.state == "pruned" and diverged.diverged and diverged.attrs["diverged_epoch"] == 1
    assert diverged.value is None and diverged.intermediate == {}
    assert third.state in ("complete", "pruned") and study.finished
    # The sampler sees a failed trial and a pruned one that reported nothing, as with Optuna.
    searched = searcher_study(experiment).trials
    assert [t.state for t in searched[:2]] == [TrialState.FAIL, TrialState.PRUNED]
    assert searched[1].intermediate_values == {}


def _comparable(record: StudyRecord) -> list[tuple[Any, ...]]:
    """What a trial trained and how it ended; not when, nor for how long."""
    return [(t.number, t.state, t.params, t.value, t.intermediate, {k: v for k, v in t.attrs.items() if k != "seconds"}) for t in record.trials]


def result_rows(experiment: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(experiment.glob("trial_*/result.json")) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def batched_and_sequential(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudySpec, Path, StudyRecord, StudyRecord]:
    """One study run twice, without early stopping and with a sampler whose draws do not
    depend on the order in which trials end: once one trial per Ray trial, once batched."""
    spec = small_spec(trials=6, epochs=3, sampler="random", pruner="none")
    space = load_space(spec.search_space)
    work = tmp_path_factory.mktemp("batched")
    sequential = run_ray_study(spec, space, options(work / "sequential"))
    batched = run_ray_study(spec, space, options(work / "batched", batch_trials=3))
    return spec, work / "batched", sequential, batched


def test_batched_trials_equal_their_sequential_twins(batched_and_sequential: tuple[StudySpec, Path, StudyRecord, StudyRecord]) -> None:
    spec, out, sequential, batched = batched_and_sequential
    assert len(batched.trials) == spec.trials and batched.finished
    assert _comparable(batched) == _comparable(sequential)
    # Trained by batch servers of 3 slots, which every result says (how many trials shared an
    # epoch depends on when Ray started their processes; test_a_batch_server_... checks sharing).
    rows = result_rows(out / "ray" / spec.name)
    assert len(rows) == spec.trials * spec.epochs and {row["trained_together"] for row in rows} <= {1, 2, 3}
    assert json.loads((out / "ray_study.json").read_text())["batch_trials"] == 3


def test_a_batched_experiment_resumes_batched(batched_and_sequential: tuple[StudySpec, Path, StudyRecord, StudyRecord]) -> None:
    spec, out, _, batched = batched_and_sequential
    space = load_space(spec.search_space)
    state = sorted(p.name for p in (out / "ray" / spec.name).iterdir())
    with pytest.raises(UserInputError, match="trains 3 trials per batch, and Ray cannot change that on resume; use --batch-trials 3"):
        run_ray_study(spec, space, options(out, batch_trials=1))
    assert sorted(p.name for p in (out / "ray" / spec.name).iterdir()) == state
    # Without --batch-trials, a rerun takes the experiment's own.
    assert run_ray_study(spec, space, options(out)) == batched


def test_batched_slots_are_refilled_after_early_stopping(tmp_path: Path) -> None:
    # One server of 2 slots (--max-concurrent 2) serves all 9 trials, ASHA stopping most after an epoch.
    spec = small_spec(trials=9, epochs=4)
    study = run_ray_study(spec, load_space(spec.search_space), options(tmp_path / "run", batch_trials=2, max_concurrent=2))
    assert len(study.by_state("complete")) + len(study.by_state("pruned")) == spec.trials and study.finished
    assert study.by_state("pruned") and study.by_state("complete")
    rows = result_rows(tmp_path / "run" / "ray" / spec.name)
    assert len(rows) >= spec.trials and {row["trained_together"] for row in rows} <= {1, 2}


@ray.remote(num_cpus=0)
class _Process:
    """Stands in for a member's process, which the server pings when the member is late."""


def test_a_batch_server_trains_on_without_late_members_and_frees_dead_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "STRAGGLER_SECONDS", 0.5)
    monkeypatch.setattr(ray_backend, "REAP_SECONDS", 0.2)
    spec = small_spec(epochs=3)
    space = load_space(spec.search_space)
    threads = torch.get_num_threads()
    server = ray_backend.BatchServer(spec, space, options(tmp_path), 2)
    torch.set_num_threads(threads)
    alive, dead = _Process.remote(), _Process.remote()
    ray.kill(dead)

    def config(number: int) -> dict[str, Any]:
        return {"lr": 0.1, "rho": 1.0, "beta1": 0.9, NUMBER_KEY: number}

    try:
        assert server.join("a@1", "a", config(0), "1", alive) and server.join("b@2", "b", config(1), "2", dead)
        assert not server.join("c@3", "c", config(2), "3", alive) and server.free_slots() == 0
        # b never asks: a's first round waits for it, then trains alone; b's dead process loses its slot.
        first = server.epoch("a@1")
        assert (first["epoch"], first["trained_together"]) == (1, 1)
        deadline = time.monotonic() + 10
        while server.free_slots() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.free_slots() == 1
        # c joins in b's slot and does not ask either, but its process lives: it keeps its slot, and
        # once late, a's rounds no longer wait for it.
        assert server.join("c@3", "c", config(2), "3", alive)
        assert server.epoch("a@1")["epoch"] == 2
        started = time.monotonic()
        last = server.epoch("a@1")
        assert time.monotonic() - started < 0.5 and last["epoch"] == 3 and last["done"]
        assert server.free_slots() == 1  # a finished and left
        # c asks at last and trains; then Ray ends its trial, and the slot is free.
        assert server.epoch("c@3")["epoch"] == 1
        server.trial_ended("c")
        assert server.free_slots() == 2
        with pytest.raises(ray_backend.TrialFailed, match="holds no slot"):
            server.epoch("c@3")
        # A process that joins again (Tune reuses it for its next trial) leaves its old seat.
        assert server.join("d@3", "d", config(3), "3", alive) and server.join("e@3", "e", config(4), "3", alive)
        assert server.free_slots() == 1
        # Two members that ask at once train as one batch (however slowly the second thread starts).
        monkeypatch.setattr(ray_backend, "STRAGGLER_SECONDS", 60.0)
        assert server.join("f@4", "f", config(5), "4", alive)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = [future.result()["trained_together"] for future in [pool.submit(server.epoch, "e@3"), pool.submit(server.epoch, "f@4")]]
        assert together == [2, 2]
    finally:
        server.close()


def _raises_in_trial_1(config: dict[str, Any], **kwargs: Any) -> None:
    """sofim_trial, except that trial 1 crashes."""
    if int(config[NUMBER_KEY]) == 1:
        raise RuntimeError("the worker lost its GPU")
    _sofim_trial(config, **kwargs)


_sofim_trial = ray_backend.sofim_trial


def test_errored_trial_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "sofim_trial", _raises_in_trial_1)
    monkeypatch.setattr(ray_backend, "MAX_FAILURES", 0)  # no retries: they cost seconds each
    spec = small_spec(trials=3, epochs=2, pruner="none")
    space = load_space(spec.search_space)
    out = tmp_path / "run"
    study = run_ray_study(spec, space, options(out))

    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    crashed = study.trials[1]
    assert crashed.state == "failed" and crashed.attrs["error"] == "RuntimeError: the worker lost its GPU"
    assert len(study.by_state("complete")) + len(study.by_state("pruned")) == spec.trials
    # Not "still running": the run is over and the study has its target.
    assert study.finished and not study.by_state("running")
    assert load_ray_record(out) == study
    assert [t.state for t in searcher_study(out / "ray" / spec.name).trials][1] == TrialState.FAIL
    # A rerun resumes nothing: the failed trial stays failed, no trial runs again.
    assert run_ray_study(spec, space, options(out)) == study


def test_time_budget_ends_the_study(tmp_path: Path) -> None:
    # Ray's time budget stops the running trials without telling the searcher: they are
    # pruned (or, before their first epoch, left out), never "running" after the run.
    # (On a loaded machine no trial may finish an epoch in time; the budget still ends
    # the run, and trials it stopped before their first epoch are left out.)
    spec = small_spec(trials=100)
    out = tmp_path / "run"
    study = run_ray_study(spec, load_space(spec.search_space), options(out, timeout=8.0))
    assert not study.by_state("running") and not study.finished
    assert load_ray_record(out) == study
    # Ray cannot go on with a search its time budget ended: a rerun returns the same study
    # (rather than claiming to be interrupted for ever).
    assert run_ray_study(spec, load_space(spec.search_space), options(out)) == study


def test_searcher_records_trials_as_the_optuna_backend() -> None:
    search = ray_backend._SofimSearch(
        load_space("sofim"), metric="val_accuracy", mode="max", points_to_evaluate=None, sampler=optuna.samplers.RandomSampler(seed=0), epochs=4, target=3
    )

    def row(epoch: int, value: float, **extra: object) -> dict[str, Any]:
        return {"val_accuracy": value, "epoch": epoch, "training_iteration": epoch, **extra}

    stopped, errored, diverged = (search.suggest(t) for t in ("stopped", "errored", "diverged"))
    assert stopped and errored and diverged
    assert search.suggest("fourth") is None, "3 trials running for a target of 3: wait for one to end"
    search.on_trial_result("stopped", row(1, 0.5))
    search.on_trial_complete("stopped", result=row(2, 0.6))  # ASHA stopped it after epoch 2 of 4
    search.on_trial_complete("errored", error=True)
    search.on_trial_result("diverged", row(1, 0.0, reason="diverged"))
    search.on_trial_complete("diverged", result=row(1, 0.0, reason="diverged"))
    assert search.suggest("complete")
    for epoch in range(1, 5):
        search.on_trial_result("complete", row(epoch, 0.2 * epoch))
    search.on_trial_complete("complete", result=row(4, 0.8))
    assert search.suggest("fifth") == ray_backend.Searcher.FINISHED

    trials = search._ot_study.trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[1].intermediate_values == {} and trials[2].intermediate_values == {}
    assert trials[3].value == 0.8
    summary = search.summary()
    assert summary["finished"] and [t["state"] for t in summary["trials"]] == ["pruned", "failed", "pruned", "complete"]

    # Trials that all fail stop the search, as in the Optuna backend.
    failing = ray_backend._SofimSearch(
        load_space("sofim"), metric="val_accuracy", mode="max", points_to_evaluate=None, sampler=optuna.samplers.RandomSampler(seed=0), epochs=4, target=3
    )
    for i in range(MAX_CONSECUTIVE_FAILURES):
        assert failing.suggest(f"t{i}")
        failing.on_trial_complete(f"t{i}", error=True)
    assert failing.suggest("next") == ray_backend.Searcher.FINISHED


_confirmation_run = ray_backend.confirmation_run


def _confirmation_with_pid(config: TrialConfig, options: RunOptions) -> TrialResult:
    """confirmation_run, and where it ran."""
    result = _confirmation_run(config, options)
    result.metrics.update(pid=float(os.getpid()), threads=float(torch.get_num_threads()))
    return result


def test_confirmation_runs_as_ray_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "confirmation_run", _confirmation_with_pid)
    spec = small_spec(epochs=2)
    space = load_space(spec.search_space)
    opts = options(tmp_path)
    settings = {"lr": 0.1, "rho": 1.0, "beta1": 0.9}
    configs = [
        trial_config(spec, space, settings, seed=5, device="auto", options=opts),
        trial_config(spec, space, {**settings, "lr": 0.0}, seed=6, device="auto", options=opts),  # fails
        trial_config(spec, space, settings, seed=7, device="auto", options=opts),
    ]
    results = BACKEND.confirm(configs, opts)

    assert [r.config.seed for r in results] == [5, 6, 7]
    assert [r.status for r in results] == ["completed", "failed", "completed"]
    assert results[1].error == "UserInputError: lr must be > 0, got 0.0"
    for result in (results[0], results[2]):
        assert result.metrics["pid"] != os.getpid(), "a confirmation ran in the driver"
        assert result.device == "cpu" and result.metrics["threads"] == 1
        assert result.epochs == 2


@pytest.mark.parametrize("address", ["ray://127.0.0.1:1", "127.0.0.1:1"])
def test_unreachable_address_fails_fast(tmp_path: Path, address: str) -> None:
    started = time.monotonic()
    with pytest.raises(UserInputError, match=f"cannot reach Ray at {address}"):
        run_ray_study(small_spec(), load_space("sofim"), options(tmp_path, address=address))
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"cpus_per_trial": 64.0}, "no node of the Ray cluster has that many CPUs"),
        ({"gpus_per_trial": 0.25}, "the cluster has no GPUs"),
        ({"gpus_per_trial": 1.5}, "must be a whole number"),
        ({"cpus_per_trial": -1.0}, "must be >= 0"),
    ],
)
def test_impossible_resources_are_refused(tmp_path: Path, resources: dict[str, float], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        run_ray_study(small_spec(), load_space("sofim"), options(tmp_path, **resources))
    assert not (tmp_path / "ray").exists()


def test_unwritable_storage_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserInputError, match="cannot write Ray storage"):
        run_ray_study(small_spec(), load_space("sofim"), options(tmp_path / "run", storage_path=str(blocker / "ray")))


def test_load_ray_record_needs_a_ray_run(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="holds no Ray study"):
        load_ray_record(tmp_path)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b'{"backend": "ray"}', b"{not json"])
def test_a_damaged_ray_study_json_is_one_clear_line(tmp_path: Path, content: bytes) -> None:
    from sofim_tune import runs

    (tmp_path / "run.json").write_text(json.dumps({"backend": "ray", "storage": "x", "study": "s"}))
    (tmp_path / "ray_study.json").write_bytes(content)
    with pytest.raises(UserInputError, match="ray_study.json"):
        runs.load_run(tmp_path)


def test_importing_the_backend_changes_no_environment_variable() -> None:
    # In a fresh process, after what the module imports (Ray itself sets RAY_CLIENT_MODE).
    code = (
        "import os, optuna, ray, ray.tune, ray.tune.search.optuna, torch, sofim_tune.study, sofim_tune.trial, sofim_tune.backends.ray_cluster, sofim_tune.backends.ray_member\n"
        "before = dict(os.environ)\n"
        "import sofim_tune.backends.ray\n"
        "print(sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k)))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "RAY_AIR_NEW_OUTPUT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize(
    ("given", "option", "instead"),
    [
        ({"workers": 2}, "--workers", "--max-concurrent"),
        ({"threads_per_trial": 2}, "--threads-per-trial", "--cpus-per-trial"),
        ({"gpus": (0,)}, "--gpus", "--gpus-per-trial"),
        ({"device": "cuda:1"}, "--device cuda:1", "--gpus-per-trial"),
        ({"storage": "sqlite:///x.db"}, "--storage", "--storage-path"),
    ],
)
def test_optuna_options_are_refused_before_ray_starts(tmp_path: Path, given: dict[str, Any], option: str, instead: str) -> None:
    message = f"^{option} is for the Optuna backend and does nothing with --backend ray: .*{instead}"
    with pytest.raises(UserInputError, match=message):
        BACKEND.check_options(options(tmp_path / "run", **given))
    with pytest.raises(UserInputError, match=message):
        run_ray_study(small_spec(), load_space("sofim"), options(tmp_path / "run", **given))
    assert not (tmp_path / "run").exists()


def test_a_cuda_device_agrees_with_gpus_per_trial(tmp_path: Path) -> None:
    # A trial that reserves a GPU trains on it: --device cuda then says the same, and is not refused.
    BACKEND.check_options(options(tmp_path / "run", device="cuda", gpus_per_trial=1.0))


def test_a_rerun_that_would_orphan_the_experiment_is_refused(finished_run: FinishedRun, tmp_path: Path) -> None:
    spec, space = finished_run.spec, load_space(finished_run.spec.search_space)
    copy = tmp_path / "run"
    shutil.copytree(finished_run.out, copy)
    before = snapshot(copy)
    assert load_ray_record(copy).confirmations

    # Another --storage-path would start a new experiment and forget this one and its confirmations.
    with pytest.raises(UserInputError, match=f"^{copy} holds the Ray experiment .*, not .*elsewhere.*; to resume it, leave --storage-path out; to start afresh, choose a new --out$"):
        run_ray_study(spec, space, options(copy, storage_path=str(tmp_path / "elsewhere")))
    assert not (tmp_path / "elsewhere").exists()
    assert_unchanged(before, copy)

    # An experiment Ray cannot restore (killed before its first save) is not replaced either.
    (copy / "ray" / spec.name / "tuner.pkl").unlink()
    before = snapshot(copy)
    with pytest.raises(UserInputError, match="which Ray cannot restore .*; to start afresh, choose a new --out$"):
        run_ray_study(spec, space, options(copy))
    assert_unchanged(before, copy)


@ray.remote(num_cpus=0)
class _StandInServer:
    """A batch server that seats every member and answers an epoch at once, or never (``stuck``).

    One call at a time, so a stuck epoch leaves every later call unanswered, as a server stuck
    restarting does.
    """

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck

    def free_slots(self) -> int:
        return 1

    def join(self, member: str, trial_id: str, config: dict[str, Any], process_id: str, process: Any) -> bool:
        return True

    def epoch(self, member: str) -> dict[str, Any]:
        if self.stuck:
            time.sleep(3600)
        return {"val_accuracy": 0.5, "epoch": 1}

    def leave(self, member: str) -> None:
        pass


MARGIN = 0.5


def _member(servers: list[Any]) -> Any:
    """A batch member in a Ray process of its own, as Tune starts it, with a straggler margin of ``MARGIN`` s."""
    trainable = ray_tune.with_parameters(ray_member.BatchMember, servers=servers, straggler_seconds=MARGIN)
    return ray.remote(num_cpus=0)(trainable).remote(config={"lr": 0.1, NUMBER_KEY: 0})


def test_a_member_fails_its_trial_when_its_server_stops_answering_or_dies() -> None:
    stuck = _StandInServer.remote(stuck=True)
    member = _member([stuck])
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="BatchServerLost: the trial's batch server stopped answering"):
        ray.get(member.train.remote(), timeout=60)
    assert time.monotonic() - started < 30

    stuck = _StandInServer.remote(stuck=True)
    member = _member([stuck])
    ray.get(member.__ray_ready__.remote(), timeout=60)  # joined
    waiting = member.train.remote()
    time.sleep(MARGIN / 2)
    ray.kill(stuck)
    with pytest.raises(ray.exceptions.RayTaskError, match="BatchServerLost: the trial's batch server was lost during its epoch"):
        ray.get(waiting, timeout=60)


def test_a_member_skips_dead_servers_when_it_joins() -> None:
    dead, alive = _StandInServer.remote(), _StandInServer.remote()
    ray.kill(dead)
    member = _member([dead, alive])
    assert ray.get(member.train.remote(), timeout=60)["epoch"] == 1

    others = [_StandInServer.remote(), _StandInServer.remote()]
    for server in others:
        ray.kill(server)
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError, match="BatchServerLost: every batch server of the study died"):
        ray.get(_member(others).train.remote(), timeout=60)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_the_reader_caps_each_trial_file(tmp_path: Path, uri: bool) -> None:
    from hostile_ray import ray_run_folder

    from sofim_tune.files import MAX_JSON_BYTES

    experiment = ray_run_folder(tmp_path / "run")
    trial = experiment / "trial_0000_a1b2c3"
    files = ray_backend._Files(f"file://{experiment}" if uri else str(experiment))  # file://: read through pyarrow, as s3:// is
    # Sparse files (os.truncate): as large as allowed, result.json's lines are read; a byte more, none is.
    os.truncate(trial / "result.json", ray_backend.MAX_RESULT_BYTES)
    assert [row["epoch"] for row in files.rows(trial.name, "val_accuracy")] == [1, 2]
    os.truncate(trial / "result.json", ray_backend.MAX_RESULT_BYTES + 1)
    assert files.rows(trial.name, "val_accuracy") == []
    (trial / "params.json").write_text(" " * MAX_JSON_BYTES + "{}")
    assert files.json(trial.name, "params.json") is None
    (experiment / ray_backend.SEARCH_FILE).write_text(" " * ray_backend.MAX_SEARCH_FILE_BYTES + "{}")
    assert files.json(ray_backend.SEARCH_FILE, limit=ray_backend.MAX_SEARCH_FILE_BYTES) is None
    # error.txt: its last line is the message, so a long one is read from its end.
    (trial / "error.txt").write_text("x" * 2 * MAX_JSON_BYTES + "\nsofim_tune.errors.UserInputError: boom\n")
    assert files.text(trial.name, "error.txt", tail=True).endswith("\nsofim_tune.errors.UserInputError: boom\n")


def test_a_trial_with_a_long_error_file_reads_as_failed_with_its_message(tmp_path: Path) -> None:
    from hostile_ray import ray_run_folder

    trial = ray_run_folder(tmp_path / "run") / "trial_0000_a1b2c3"
    (trial / "result.json").unlink()
    (trial / "error.txt").write_text("Traceback (most recent call last):\n" + "  a frame\n" * 500_000 + "sofim_tune.errors.UserInputError: boom\n")
    (failed,) = load_ray_record(tmp_path / "run").trials
    assert failed.state == "failed" and failed.attrs["error"] == "UserInputError: boom"

