"""Trials per minute of whole studies, side by side in one process, as ratios.

Two studies: the default digits study (``sofim-tune run --dataset digits``: the MLP, its
spec's trials, epochs and pruner) and a CNN study on an MNIST-sized ImageFolder (1×28×28,
10 classes) that this script writes with synthetic, learnable images. Each runs in every
setup, search only (no confirmation or report), from a cold data cache:

- ``today``: one worker at torch's default thread count (the first release's behaviour);
- ``default``: what sofim-tune picks now (``workers``/``threads_per_trial`` unset);
- ``one-thread``: one worker at one thread, trials one at a time;
- ``batched``: one worker at one thread training 16 trials at once as one stacked model
  (``--batch-trials 16``).

Targets on 2 CPU cores: default >= 1.8x today; batched >= 3x one-thread. On one GPU
(``--device cuda``): batched >= 8x one-thread. ``--threads-only`` instead measures the rule in
``sofim_tune/parallelism.py``: samples per second of one process at all cores' threads
against one single-thread process per core, for models from the digits MLP to ResNet-18.
``--ray`` runs the digits study's search through the Ray backend on a private Ray with
the machine's CPUs, one trial per Ray trial against ``--batch-trials K`` (each batched trial
still a Ray actor of its own, the training done by batch servers).
``--bare`` measures batching without a study, at one thread: 16 digits trials trained by
``train_trial`` one after another against the same 16 as one ``TrialBatch``, and the ceiling
that any batching has on this CPU: the sequential time over the time the trials' floating-point
operations would take at the core's measured matrix-multiply peak.

    OMP_NUM_THREADS unset, on a quiet machine:
    python benchmarks/study_throughput.py [--digits-trials 40] [--cnn-trials 12] [--samples 4096]
    python benchmarks/study_throughput.py --threads-only [--seconds 5]
    python benchmarks/study_throughput.py --bare [--bare-epochs 3]
    python benchmarks/study_throughput.py --ray [--ray-batch 4 8] [--digits-trials 40] [--device cuda]
    python benchmarks/study_throughput.py --device cuda --cnn-trials 48   # the GPU variant
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from PIL import Image

from sofim_tune.batched import TrialBatch
from sofim_tune.data import LoadedData, dataset_info, load_data
from sofim_tune.models import build_model
from sofim_tune.optim import build_optimizer
from sofim_tune.parallelism import physical_cores
from sofim_tune.spec import StudySpec, load_spec
from sofim_tune.trial import TrialConfig, TrialResult, clear_data_cache, train_trial
from sofim_tune.tuning import RunOptions, tune

DEFAULT_THREADS = torch.get_num_threads()


def write_synthetic_folder(root: Path, samples: int, seed: int = 0) -> Path:
    """An MNIST-sized ImageFolder: per class a fixed random template plus noise, so a CNN can learn it."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28))
    for split, count in (("train", samples), ("test", samples // 8)):
        for index in range(count):
            label = index % 10
            pixels = np.clip(templates[label] * 180 + rng.normal(0, 60, (28, 28)), 0, 255).astype(np.uint8)
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    return root


def trials_per_minute(spec: StudySpec, out: Path, device: str, **setup: object) -> tuple[float, int, str]:
    """Run the study's search from a cold data cache; trials per minute, trials, parallelism."""
    clear_data_cache()
    torch.set_num_threads(DEFAULT_THREADS)
    options = RunOptions(out_dir=out, device=device, export=False, **setup)  # type: ignore[arg-type]
    started = time.perf_counter()
    outcome = tune(spec, options)
    seconds = time.perf_counter() - started
    finished = len([t for t in outcome.study.trials if t.state in ("complete", "pruned")])
    return 60.0 * finished / seconds, finished, outcome.parallelism or ""


BATCH = 16
SETUPS = {
    "today": {"workers": 1, "threads_per_trial": DEFAULT_THREADS, "batch_trials": 1},
    "one-thread": {"workers": 1, "threads_per_trial": 1, "batch_trials": 1},
    "default": {},
    "batched": {"workers": 1, "threads_per_trial": 1, "batch_trials": BATCH},
}


def compare_setups(studies: dict[str, StudySpec], work: Path, device: str) -> None:
    for name, spec in studies.items():
        rates = {}
        for setup, values in SETUPS.items():
            rate, finished, parallelism = trials_per_minute(spec, work / f"{name}-{setup}", device, **values)
            rates[setup] = rate
            print(f"{name:>6} {setup:>10}: {rate:7.1f} trials/min ({finished} trials; {parallelism})", flush=True)
        target = "8x on a GPU" if device.startswith("cuda") else "3x"
        print(f"{name:>6} default/today = {rates['default'] / rates['today']:.2f}x (target >= 1.8x); batched/one-thread = {rates['batched'] / rates['one-thread']:.2f}x (target >= {target})", flush=True)


# ---------------------------------------------------------------------------------------
# --threads-only: the measurement behind sofim_tune/parallelism.py's rule
# ---------------------------------------------------------------------------------------

MODELS = {"mlp on digits": ("mlp", 1, 8, 64), "cnn on digits": ("cnn", 1, 8, 64), "cnn on 28x28": ("cnn", 1, 28, 64), "resnet18 on 32x32": ("resnet18", 3, 32, 128)}


def _samples_per_second(model: str, threads: int, seconds: float, results: multiprocessing.Queue) -> None:
    torch.set_num_threads(threads)
    arch, channels, side, batch = MODELS[model]
    info = dataclasses.replace(dataset_info("digits"), channels=channels, image_size=side)
    torch.manual_seed(0)
    net = build_model(arch, info)
    optimizer = build_optimizer("sofim", net.parameters(), {"lr": 0.05, "rho": 1.0, "beta1": 0.9})
    x, y = torch.randn(batch, channels, side, side), torch.randint(0, 10, (batch,))
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    results.put(steps * batch / (time.perf_counter() - started))


def threads_against_processes(seconds: float) -> None:
    cores = physical_cores()
    context = multiprocessing.get_context("fork")
    for model in MODELS:
        rates = {}
        for label, processes, threads in (("1 process x all threads", 1, cores), (f"{cores} processes x 1 thread", cores, 1)):
            queue = context.Queue()
            workers = [context.Process(target=_samples_per_second, args=(model, threads, seconds, queue)) for _ in range(processes)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            rates[label] = sum(queue.get() for _ in workers)
        one, many = rates.values()
        print(f"{model:>18}: {one:9.0f} samples/s with 1 process x {cores} threads, {many:9.0f} with {cores} x 1 thread: {many / one:.2f}x", flush=True)


# ---------------------------------------------------------------------------------------
# --bare: batching without a study, and the most any batching could gain on this CPU
# ---------------------------------------------------------------------------------------


def _bare_configs(arch: str, epochs: int) -> list[TrialConfig]:
    """BATCH digits trials with settings spread over the shipped space's stable region (none diverges)."""
    grid = [(lr, rho, beta1) for lr in (0.03, 0.1, 0.3, 1.0) for rho, beta1 in ((0.3, 0.9), (1.0, 0.8), (3.0, 0.95), (10.0, 0.9))]
    return [
        TrialConfig(dataset="digits", arch=arch, hyperparameters={"lr": lr * rho, "rho": rho, "beta1": beta1}, epochs=epochs, seed=seed, val_fraction=0.3, device="cpu")
        for seed, (lr, rho, beta1) in enumerate(grid[:BATCH])
    ]


def _flops_per_sample(arch: str) -> tuple[float, float]:
    """Floating-point operations per sample of a training step (forward and backward) and of an evaluation (forward), as torch counts them."""
    net = build_model(arch, dataset_info("digits"))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(net(x), y).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        net.eval()(x)
    return step.get_total_flops() / 64, evaluation.get_total_flops() / 64


def _matmul_peak() -> float:
    """FLOP/s of one thread multiplying 512×512 float32 matrices, the best of 10 rounds: the fastest this core computes."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    rounds = []
    for _ in range(10):
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        rounds.append(time.perf_counter() - started)
    return 2 * 512**3 * 10 / min(rounds)


def _train_batch(data: LoadedData, arch: str, configs: list[TrialConfig]) -> list[TrialResult]:
    batch = TrialBatch(data, arch=arch, batch_size=configs[0].batch_size, slots=len(configs))
    for config in configs:
        batch.add(config)
    while any(not outcome.done for outcome in batch.train_epoch().values()):
        pass
    return [batch.finish(slot) for slot in list(batch.members)]


def bare_batching(epochs: int) -> None:
    torch.set_num_threads(1)
    data = load_data("digits", val_fraction=0.3)
    peak = _matmul_peak()
    print(f"one thread multiplies matrices at {peak / 1e9:.1f} GFLOP/s", flush=True)
    for arch in ("mlp", "cnn"):
        configs = _bare_configs(arch, epochs)
        # Warm-ups: the first call of each path builds its kernels once per process.
        train_trial(configs[0], data=data)
        _train_batch(data, arch, configs[:2])
        started = time.perf_counter()
        sequential = [train_trial(config, data=data) for config in configs]
        sequential_seconds = time.perf_counter() - started
        started = time.perf_counter()
        batched = _train_batch(data, arch, configs)
        batched_seconds = time.perf_counter() - started
        gap = max(abs(x[key] - y[key]) / abs(x[key]) for a, b in zip(sequential, batched) for x, y in zip(a.history, b.history, strict=True) for key in x if x[key])
        step, evaluation = _flops_per_sample(arch)
        floor = epochs * BATCH * (len(data.train) * step + len(data.val) * evaluation) / peak
        print(
            f"{arch:>4}: {BATCH} trials x {epochs} epochs: {sequential_seconds:.2f} s one at a time, {batched_seconds:.2f} s batched:"
            f" {sequential_seconds / batched_seconds:.2f}x (largest relative gap of a member's metrics from its sequential twin's: {gap:.1e});"
            f" at the matmul peak the operations take {floor:.2f} s, so no batching can exceed {sequential_seconds / floor:.1f}x",
            flush=True,
        )


# ---------------------------------------------------------------------------------------
# --ray: batched trials through the Ray backend
# ---------------------------------------------------------------------------------------


def ray_batching(spec: StudySpec, batches: list[int], work: Path, device: str) -> None:
    """Seconds and trials per minute of the study's search (no confirmation) at each batch size, on one private Ray.

    On a GPU (``device`` cuda) every trial, or every batch server, takes a quarter of one.
    """
    import ray

    from sofim_tune.backends.ray import run_ray_study
    from sofim_tune.space import load_space

    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    ray.init(num_cpus=physical_cores(), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    space = load_space(spec.search_space)
    rates = {}
    try:
        for batch in [1, *batches]:
            clear_data_cache()
            options = RunOptions(out_dir=work / f"ray-{batch}", device=device, batch_trials=batch if batch > 1 else None, gpus_per_trial=0.25 if gpus else 0.0)
            started = time.perf_counter()
            record = run_ray_study(spec, space, options)
            seconds = time.perf_counter() - started
            finished = len(record.by_state("complete")) + len(record.by_state("pruned"))
            rates[batch] = 60.0 * finished / seconds
            label = "one per trial" if batch == 1 else f"batched {batch}"
            print(f"ray, {label}: {seconds:6.1f} s, {rates[batch]:7.1f} trials/min ({finished} trials)", flush=True)
    finally:
        ray.shutdown()
    for batch in batches:
        print(f"ray batched {batch} / one per trial = {rates[batch] / rates[1]:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-trials", type=int, default=None, help="trials of the digits study (default: its spec's)")
    parser.add_argument("--digits-epochs", type=int, default=None, help="epochs of the digits study (default: its spec's)")
    parser.add_argument("--cnn-trials", type=int, default=12)
    parser.add_argument("--cnn-epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4096, help="training images of the synthetic MNIST-sized folder")
    parser.add_argument("--device", default="cpu", help="where the trials run: cpu, or cuda for the GPU variant (batched target >= 8x)")
    parser.add_argument("--threads-only", action="store_true", help="only the threads-against-processes measurement")
    parser.add_argument("--seconds", type=float, default=5.0, help="--threads-only: seconds per measurement")
    parser.add_argument("--bare", action="store_true", help="only batching without a study, and its ceiling on this CPU")
    parser.add_argument("--bare-epochs", type=int, default=3, help="--bare: epochs of each trial")
    parser.add_argument("--ray", action="store_true", help="only the digits study through the Ray backend, one trial per Ray trial against batched")
    parser.add_argument("--ray-batch", type=int, nargs="+", default=[4, 8], help="--ray: trials per batch server to measure")
    args = parser.parse_args()
    print(f"{physical_cores()} physical cores; torch's default {DEFAULT_THREADS} threads", flush=True)
    if args.threads_only:
        threads_against_processes(args.seconds)
        return
    if args.bare:
        bare_batching(args.bare_epochs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.ray:
            ray_batching(load_spec("digits").replace(trials=args.digits_trials, epochs=args.digits_epochs), args.ray_batch, work, args.device)
            return
        folder = write_synthetic_folder(work / "mnist-like", args.samples)
        studies = {
            "digits": load_spec("digits").replace(trials=args.digits_trials, epochs=args.digits_epochs),
            "cnn": load_spec(str(folder), "cnn").replace(trials=args.cnn_trials, epochs=args.cnn_epochs),
        }
        compare_setups(studies, work, args.device)


if __name__ == "__main__":
    main()
