"""How many trials run at once, with how many threads, and that the choice reaches the workers."""

from __future__ import annotations

import os
import subprocess
import time
import sys
from pathlib import Path

import optuna
import pytest

from sofim_tune.backends.optuna import BACKEND, storage_url
from sofim_tune.parallelism import SMALL_MODEL_PARAMETERS, TRIALS_PER_GPU_SMALL, physical_cores, plan, worker_memory
from sofim_tune.spec import load_spec
from sofim_tune.study import torch_threads, train_in_parallel
from sofim_tune.trial import TrialConfig, train_trial
from sofim_tune.tuning import RunOptions, tune

SMALL = 85_000
GiB = 2**30


def cpu_plan(**overrides: object) -> tuple[int, int]:
    values = {"on_gpu": False, "gpus": 1, "model_parameters": SMALL, "data_bytes": 10**6, "trials": 40, "cores": 8, "memory": 64 * GiB, **overrides}
    chosen = plan(**values)  # type: ignore[arg-type]
    return chosen.workers, chosen.threads


def test_on_the_cpu_every_core_runs_a_trial_at_one_thread() -> None:
    assert cpu_plan() == (8, 1)
    # Large models too: on this project's machine two single-thread processes beat one
    # two-thread process even for ResNet-18 (benchmarks/study_throughput.py --threads-only).
    assert cpu_plan(model_parameters=11_000_000) == (8, 1)


def test_fewer_trials_than_cores_get_the_spare_cores_as_threads() -> None:
    assert cpu_plan(trials=2) == (2, 4)
    assert cpu_plan(trials=1) == (1, 8)


def test_memory_limits_the_workers() -> None:
    per_worker = worker_memory(11_000_000, 150 * 2**20)
    assert cpu_plan(model_parameters=11_000_000, data_bytes=150 * 2**20, memory=3 * per_worker + 1) == (3, 2)
    assert "memory" in plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=40, cores=8, memory=worker_memory(SMALL, 0)).reason


def test_the_users_choice_is_kept() -> None:
    assert cpu_plan(workers=3) == (3, 2)
    assert cpu_plan(threads=2) == (4, 2)
    assert cpu_plan(workers=2, threads=3) == (2, 3)
    assert "--workers" in plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=40, workers=2, cores=8, memory=GiB).reason


def test_small_models_share_a_gpu_and_large_ones_do_not() -> None:
    small = plan(on_gpu=True, gpus=2, model_parameters=SMALL, data_bytes=0, trials=40, cores=16, memory=GiB)
    assert (small.workers, small.threads) == (2 * TRIALS_PER_GPU_SMALL, 2)
    large = plan(on_gpu=True, gpus=2, model_parameters=SMALL_MODEL_PARAMETERS + 1, data_bytes=0, trials=40, cores=16, memory=GiB)
    assert (large.workers, large.threads) == (2, 8)


def test_physical_cores_follow_the_cpu_affinity() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from sofim_tune.parallelism import physical_cores; print(physical_cores())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "1"
    assert physical_cores() >= 1


def small_spec(**overrides: object):
    return load_spec("digits").replace(**{"trials": 6, "epochs": 2, "pruner": "none", **overrides})


def test_the_thread_settings_reach_the_worker_processes(tmp_path: Path) -> None:
    outcome = tune(small_spec(), RunOptions(out_dir=tmp_path / "run", device="cpu", workers=2, threads_per_trial=1, export=False))
    study = optuna.load_study(study_name=outcome.study.name, storage=storage_url(RunOptions(out_dir=tmp_path / "run")))
    workers = [t.user_attrs["worker"] for t in study.trials]
    assert len(workers) == 6 and all(w["threads"] == 1 for w in workers)
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert outcome.parallelism is not None and outcome.parallelism.startswith("2 workers × 1 thread")


def test_one_worker_runs_here_with_its_threads(tmp_path: Path) -> None:
    outcome = tune(small_spec(trials=2), RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1, threads_per_trial=2, export=False))
    study = optuna.load_study(study_name=outcome.study.name, storage=storage_url(RunOptions(out_dir=tmp_path / "run")))
    assert {(t.user_attrs["worker"]["pid"], t.user_attrs["worker"]["threads"]) for t in study.trials} == {(os.getpid(), 2)}


def test_confirmation_runs_in_parallel_and_equals_running_them_one_by_one() -> None:
    configs = [TrialConfig(dataset="digits", hyperparameters={"lr": lr, "rho": 1.0, "beta1": 0.9}, epochs=2, seed=seed, device="cpu", val_fraction=0.3) for lr, seed in ((0.05, 1), (0.2, 2), (0.1, 3))]
    parallel = train_in_parallel(configs, workers=2, threads=1)
    assert [r.config.seed for r in parallel] == [1, 2, 3]
    # At the workers' one thread: a reduction over two threads sums in another order.
    with torch_threads(1):
        for result, config in zip(parallel, configs, strict=True):
            assert result.history == train_trial(config).history
    assert BACKEND.confirm(configs[:1], RunOptions(out_dir=Path("unused"), workers=2, threads_per_trial=1))[0].history == parallel[0].history


def test_the_cli_says_what_it_chose(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sofim_tune.cli.app", "run", "--dataset", "digits", "--trials", "2", "--epochs", "1", "--confirm-top", "1", "--confirm-seeds", "2", "--device", "cpu", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cores = physical_cores()
    workers = min(cores, 2)
    assert f"parallelism:    {workers} worker{'s' if workers > 1 else ''} × " in done.stdout


def test_workers_die_with_a_killed_sofim_tune_and_the_rerun_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sofim_tune.cli.app", "run", "--dataset", "digits", "--trials", "6", "--epochs", "30", "--pruner", "none", "--workers", "2", "--device", "cpu", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{out / 'study.db'}"
    deadline = time.monotonic() + 120
    running: list[optuna.trial.FrozenTrial] = []
    while time.monotonic() < deadline and len(running) < 2:
        time.sleep(0.3)
        try:
            running = [t for t in optuna.load_study(study_name="digits-mlp", storage=storage).get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING and "worker" in t.user_attrs]
        except Exception:  # noqa: BLE001 - the study may not exist yet
            continue
    assert len(running) == 2, "two workers never ran at once"
    process.kill()
    process.wait()
    pids = {t.user_attrs["worker"]["pid"] for t in running}
    gone_by = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)], "a worker outlived its sofim-tune"
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="digits-mlp", storage=storage).get_trials(deepcopy=False)
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 6
    assert len([t for t in trials if t.user_attrs.get("reason") == "interrupted"]) == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
