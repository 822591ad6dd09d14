"""The Ray Tune backend on a local Ray with 2 CPUs: search, early stopping, resume, checks.

Every test trains the digits MLP for a few epochs on the CPU; one Ray instance serves them
all, because starting Ray costs seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from sofim_tune.backends.ray import load_ray_record, run_ray_study
from sofim_tune.errors import UserInputError
from sofim_tune.recommend import SCHEMA_ID, load_recommendation
from sofim_tune.records import StudyRecord
from sofim_tune.space import load_space
from sofim_tune.spec import StudySpec, load_spec
from sofim_tune.tuning import RunOptions, tune

pytestmark = pytest.mark.slow

EPOCHS = 6


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_spec(**overrides: object) -> StudySpec:
    return load_spec("digits").replace(**{"trials": 9, "epochs": EPOCHS, "confirm_top": 1, "confirm_seeds": 1, **overrides})


def options(out_dir: Path, **overrides: object) -> RunOptions:
    return RunOptions(out_dir=out_dir, device="cpu", **overrides)  # type: ignore[arg-type]


def test_tune_end_to_end(tmp_path: Path) -> None:
    spec = small_spec()
    out = tmp_path / "run"
    seen: list[StudyRecord] = []
    outcome = tune(spec, options(out), backend="ray", on_progress=seen.append)
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
    assert outcome.report is not None and outcome.report.is_file()
    assert json.loads((out / "run.json").read_text()) == {"backend": "ray", "storage": str(out.resolve() / "ray" / spec.name), "study": spec.name}
    # The run folder alone gives the study back, confirmations included.
    assert load_ray_record(out) == study
    assert len(study.confirmations) == 1


def test_interrupted_run_resumes(tmp_path: Path) -> None:
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
        run_ray_study(spec, space, options(out), on_progress=press_ctrl_c)
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


def test_diverged_and_failed_trials(tmp_path: Path) -> None:
    space_file = tmp_path / "steep.yaml"
    space_file.write_text(
        "optimizer: sgd-momentum\n"
        "params:\n"
        "  lr:       {type: float, low: 0.0, high: 100.0}\n"
        "  momentum: {type: float, low: 0.9, high: 0.95}\n"
    )
    # lr = 0 passes the space but not the optimizer: the trial fails (and Ray retries it).
    # lr = 80 with momentum blows the loss up in the first epoch.
    spec = small_spec(trials=2, epochs=3, search_space=str(space_file), enqueue=[{"lr": 0.0, "momentum": 0.9}, {"lr": 80.0, "momentum": 0.9}])
    study = run_ray_study(spec, load_space(space_file), options(tmp_path / "run"))

    failed, diverged = study.trials
    assert failed.state == "failed" and failed.attrs["reason"] == "failed"
    assert failed.attrs["error"] == "UserInputError: lr must be > 0, got 0.0"
    assert diverged.state == "pruned" and diverged.diverged and diverged.attrs["diverged_epoch"] == 1
    assert diverged.value is None and diverged.intermediate == {}


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
