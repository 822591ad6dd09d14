"""How many trials run at once, with how many threads, and that the choice reaches the workers."""

from __future__ import annotations

import logging
import os
import subprocess
import time
import sys
from pathlib import Path

import optuna
import pytest

from sofim_tune.backends.optuna import BACKEND, storage_url
from sofim_tune.parallelism import (
    CGROUP_ROOT_ENV,
    OVERSUBSCRIPTION,
    SMALL_MODEL_PARAMETERS,
    TRIALS_PER_GPU_SMALL,
    allocatable_memory,
    available_cpus,
    available_memory,
    physical_cores,
    plan,
    worker_memory,
)
from sofim_tune.spec import load_spec
from sofim_tune.study import torch_threads, train_in_parallel
from sofim_tune.trial import TrialConfig, train_trial
from sofim_tune.tuning import RunOptions, tune

SMALL = 85_000
GiB = 2**30


def cpu_plan(**overrides: object) -> tuple[int, int]:
    values = {"on_gpu": False, "gpus": 1, "model_parameters": SMALL, "data_bytes": 10**6, "trials": 40, "cores": 8, "cpus": 16, "memory": 64 * GiB, **overrides}
    chosen = plan(**values)  # type: ignore[arg-type]
    return chosen.workers, chosen.threads


def test_on_the_cpu_every_core_runs_a_trial_at_one_thread() -> None:
    assert cpu_plan() == (8, 1)
    # Large models too: on this project's machine two single-thread processes beat one
    # two-thread process even for ResNet-18 (benchmarks/study_throughput.py --threads-only).
    assert cpu_plan(model_parameters=11_000_000) == (8, 1)


def test_a_trial_keeps_one_thread_whatever_the_workers_or_trials_left() -> None:
    # Its numbers depend on its thread count, and a study must not depend on its workers.
    assert cpu_plan(trials=2) == (2, 1)
    assert cpu_plan(trials=1) == (1, 1)
    assert cpu_plan(workers=1) == (1, 1)


def test_no_more_workers_than_the_lookahead_lets_run_at_once() -> None:
    chosen = plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=40, lookahead=3, cores=8, memory=64 * GiB)
    assert (chosen.workers, chosen.threads) == (3, 1) and "at most --lookahead 3" in chosen.reason
    assert plan(on_gpu=True, gpus=4, model_parameters=SMALL, data_bytes=0, trials=40, lookahead=6, cores=8, memory=64 * GiB).workers == 6
    with Warnings() as warned:
        assert plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=40, workers=5, lookahead=3, cores=8, cpus=8, memory=64 * GiB).workers == 3
    assert warned.messages == ["--workers 5 lowered to 3: at most --lookahead 3 (trials that may run at once) and 4 per CPU on 8 CPUs and one per trial (40 trials)"]


def test_memory_limits_the_workers() -> None:
    per_worker = worker_memory(11_000_000, 150 * 2**20)
    assert cpu_plan(model_parameters=11_000_000, data_bytes=150 * 2**20, memory=3 * per_worker + 1) == (3, 1)
    assert "memory" in plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=40, cores=8, memory=worker_memory(SMALL, 0)).reason


def test_the_users_choice_is_kept() -> None:
    assert cpu_plan(workers=3) == (3, 1)
    assert cpu_plan(threads=2) == (4, 2)
    assert cpu_plan(workers=2, threads=3) == (2, 3)
    assert "--workers" in plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=40, workers=2, cores=8, memory=GiB).reason


class Warnings(logging.Handler):
    """The warnings that ``sofim_tune.parallelism`` logs while installed (whatever the CLI did
    to the ``sofim_tune`` logger's propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        logging.getLogger("sofim_tune.parallelism").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("sofim_tune.parallelism").removeHandler(self)


def test_more_workers_than_trials_or_cpus_are_lowered_with_a_warning() -> None:
    with Warnings() as warned:
        assert cpu_plan(workers=100_000, trials=4) == (4, 1)
    assert warned.messages == ["--workers 100000 lowered to 4: at most one per trial (4 trials) and 4 per CPU on 16 CPUs"]
    assert cpu_plan(workers=100_000, trials=1000)[0] == OVERSUBSCRIPTION * 16
    on_gpu = plan(on_gpu=True, gpus=2, model_parameters=SMALL, data_bytes=0, trials=1000, workers=100_000, cores=16, cpus=16, memory=GiB)
    assert on_gpu.workers == OVERSUBSCRIPTION * TRIALS_PER_GPU_SMALL * 2 and "per GPU" in on_gpu.reason
    large = plan(on_gpu=True, gpus=2, model_parameters=SMALL_MODEL_PARAMETERS + 1, data_bytes=0, trials=1000, workers=100_000, cores=16, cpus=16, memory=GiB)
    assert large.workers == OVERSUBSCRIPTION * 2
    with Warnings() as warned:
        assert cpu_plan(workers=4 * 16, trials=64) == (64, 1)
    assert not warned.messages


def test_more_threads_than_cpus_are_lowered_with_a_warning() -> None:
    with Warnings() as warned:
        assert cpu_plan(threads=100_000, cpus=6) == (1, 6)
    assert warned.messages == ["--threads-per-trial 100000 lowered to 6: at most the 6 CPUs this process may use"]
    assert "lowered to 6" in plan(on_gpu=False, gpus=1, model_parameters=SMALL, data_bytes=0, trials=4, threads=100_000, cores=8, cpus=6, memory=GiB).reason
    assert cpu_plan(threads=6, cpus=6, cores=12) == (2, 6)


def fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    """A cgroup mount written by the test: ``files`` maps paths under ``root`` to their text."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


MiB = 2**20


def test_available_memory_is_what_a_cgroup_v2_limit_leaves(tmp_path: Path) -> None:
    # Usage counts without the inactive file cache, which the kernel reclaims first.
    root = fake_cgroup(tmp_path, {"memory.max": f"{1024 * MiB}\n", "memory.current": f"{400 * MiB}\n", "memory.stat": f"anon 1\ninactive_file {100 * MiB}\n"})
    assert available_memory(root) == 724 * MiB
    (root / "memory.max").write_text("max\n")  # no limit: the machine's available memory, which is more here
    assert available_memory(root) > 724 * MiB


def test_available_memory_is_what_a_cgroup_v1_limit_leaves(tmp_path: Path) -> None:
    root = fake_cgroup(tmp_path, {"memory/memory.limit_in_bytes": f"{512 * MiB}\n", "memory/memory.usage_in_bytes": f"{12 * MiB}\n", "memory/memory.stat": "total_inactive_file 0\n"})
    assert available_memory(root) == 500 * MiB


def test_a_memory_limited_container_gets_fewer_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_worker = worker_memory(11_000_000, 150 * 2**20)
    fake_cgroup(tmp_path, {"memory.max": f"{2 * per_worker + MiB}\n", "memory.current": "0\n"})
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(tmp_path))
    chosen = plan(on_gpu=False, gpus=1, model_parameters=11_000_000, data_bytes=150 * 2**20, trials=40, cores=8, cpus=8)
    assert (chosen.workers, chosen.threads) == (2, 1) and "memory" in chosen.reason
    assert allocatable_memory() == 2 * per_worker + MiB


def test_a_cgroup_cpu_quota_caps_the_cpus(tmp_path: Path) -> None:
    assert available_cpus(fake_cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})) == min(2, len(os.sched_getaffinity(0)))
    assert physical_cores(fake_cgroup(tmp_path / "v1", {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"})) == 1
    assert available_cpus(tmp_path / "none") == len(os.sched_getaffinity(0))


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
    ended: list[int] = []
    parallel = train_in_parallel(configs, workers=2, threads=1, on_done=ended.append)
    assert [r.config.seed for r in parallel] == [1, 2, 3]
    assert ended == [1, 2, 3]  # one call per run that ends, in the order they end
    # At the workers' one thread: a reduction over two threads sums in another order.
    with torch_threads(1):
        for result, config in zip(parallel, configs, strict=True):
            assert result.history == train_trial(config).history
    assert BACKEND.confirm(configs[:1], RunOptions(out_dir=Path("unused"), workers=2, threads_per_trial=1))[0].history == parallel[0].history


def test_the_confirmations_progress_is_logged_with_an_estimate_of_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    from sofim_tune.tuning import ConfirmationProgress

    clock = iter([100.0, 110.0, 120.0, 150.0])  # started, then three runs ending
    progress = ConfirmationProgress(3, clock=lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="sofim_tune"):
        for done in (1, 2, 3):
            progress(done)
    assert [r.getMessage() for r in caplog.records] == [
        "confirmation: 1/3 runs done · 10 s · about 20 s left",
        "confirmation: 2/3 runs done · 20 s · about 10 s left",
        "confirmation: 3/3 runs done · 50 s",
    ]


def test_a_study_logs_every_confirmation_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sofim_tune"):
        outcome = tune(small_spec(trials=4), RunOptions(out_dir=tmp_path / "run", device="cpu", workers=2, threads_per_trial=1))
    runs = sum(len(c.values) + sum(len(v) for v in c.neighbours.values()) for c in outcome.study.confirmations if not c.final)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("confirmation: ")]
    assert [line.split()[1] for line in lines] == [f"{n}/{runs}" for n in range(1, runs + 1)]
    finals = len(next(c for c in outcome.study.confirmations if c.final).values)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("final runs: ") and "runs done" in r.getMessage()]
    assert [line.split()[2] for line in lines] == [f"{n}/{finals}" for n in range(1, finals + 1)]


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
