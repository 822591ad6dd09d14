"""How many trials run at once, and with how many threads each.

Small models gain nothing from torch's intra-op threads, and lose badly when the machine is
shared: two threads spinning on a busy core made a digits MLP step 200× slower here. They
gain from several trials at once, one thread each. Measured on this project's 2-core machine
(``python benchmarks/study_throughput.py --threads-only``): two single-thread processes beat
one two-thread process for every model tried, from the digits MLP (2.05×) to ResNet-18 on
32×32 images (1.04-1.13×), so on the CPU the rule is one trial per physical core, one thread each,
whatever the model. What stops it is memory, estimated per worker from the data and the
model, and the number of trials left. Fewer trials than cores get the spare cores as threads.

On a GPU, a small model (at most ``SMALL_MODEL_PARAMETERS``) leaves the device mostly idle,
so ``TRIALS_PER_GPU_SMALL`` trials share each GPU; a larger one gets a GPU per trial.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# A model with at most this many parameters is small: several of its trials share a GPU.
# The digits MLP and CNN have ~0.1M, ResNet-18 11M.
SMALL_MODEL_PARAMETERS = 2_000_000
TRIALS_PER_GPU_SMALL = 4
# A worker's memory, roughly: its copy of the data, the interpreter with torch, and the
# model's weights, gradients, optimizer state and activations (a multiple of its size;
# ResNet-18 at batch 128 on 32×32 images peaks near 40× its weights).
_WORKER_BASE_BYTES = 300 * 2**20
_MODEL_MEMORY_FACTOR = 40


@dataclass(frozen=True)
class Parallelism:
    """A study's plan: ``workers`` worker processes with ``threads`` intra-op threads each,
    every worker training ``batch_trials`` trials at once as one stacked model (1: one at a time).

    ``reason`` says in words what was chosen and why (the CLI prints it); ``refused_batch``
    why the batch the user asked for cannot be trained, if so.
    """

    workers: int
    threads: int
    batch_trials: int
    reason: str
    refused_batch: str | None = None


def physical_cores() -> int:
    """Physical cores this process may use: its CPU affinity, hyper-threads counted once,
    capped by a cgroup CPU quota (a container's ``--cpus``)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = len(allowed)
    try:
        # "processor", then its "physical id" and "core id": a hyper-thread sibling repeats a pair.
        pairs, processor, physical = set(), None, "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                processor = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id" and processor in allowed:
                pairs.add((physical, value))
        cores = len(pairs) or cores
    except (OSError, ValueError):
        pass
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_memory(model_parameters: int, data_bytes: int) -> int:
    """The rough peak memory of one CPU worker, in bytes."""
    return _WORKER_BASE_BYTES + data_bytes + _MODEL_MEMORY_FACTOR * 4 * model_parameters


def plan(
    *,
    on_gpu: bool,
    gpus: int,
    model_parameters: int,
    data_bytes: int,
    trials: int,
    workers: int | None = None,
    threads: int | None = None,
    batch_trials: int | None = None,
    batch_problem: str | None = None,
    cores: int | None = None,
    memory: int | None = None,
) -> Parallelism:
    """Workers and threads per trial for a study; ``workers``/``threads`` given are kept.

    Args:
        on_gpu: trials run on CUDA devices.
        gpus: how many GPUs the workers are spread over (``--gpus``), >= 1 when ``on_gpu``.
        model_parameters: the model's parameter count.
        data_bytes: the size of the training and validation images as stored (uint8).
        trials: trials the study still has to run, >= 1.
        workers, threads, batch_trials: the user's choice, or None for automatic.
        batch_problem: why this study's trials cannot be batched (``sofim_tune.batched``),
            or None when they can.
        cores, memory: the machine's physical cores and available bytes; None measures them.
    """
    cores = cores or physical_cores()
    trials = max(1, trials)
    small = model_parameters <= SMALL_MODEL_PARAMETERS
    size = f"{'small' if small else 'large'} model ({model_parameters / 1e6:.2g}M parameters)"
    if workers is not None:
        why = "--workers"
    elif on_gpu:
        per_gpu = TRIALS_PER_GPU_SMALL if small else 1
        workers = min(trials, max(1, gpus) * per_gpu)
        why = f"{size}: {per_gpu} trial{'s' if per_gpu > 1 else ''} per GPU on {max(1, gpus)} GPU{'s' if gpus > 1 else ''}"
    else:
        by_threads = cores // threads if threads else cores
        memory = memory if memory is not None else available_memory()
        by_memory = memory // worker_memory(model_parameters, data_bytes) if memory else by_threads
        workers = max(1, min(by_threads, trials, by_memory))
        why = f"{size} on {cores} physical core{'s' if cores > 1 else ''}: one trial per core"
        if workers < by_threads:
            why += f", fewer for lack of {'trials' if trials <= by_memory else 'memory'}"
    if threads is None:
        threads = max(1, cores // workers)
    else:
        why += ", --threads-per-trial"
    text = f"{workers} worker{'s' if workers > 1 else ''} × {threads} thread{'s' if threads > 1 else ''} ({why})"
    slots = _batch_slots(batch_trials, batch_problem)
    refused = batch_problem if slots == 1 and (batch_trials or 1) > 1 else None
    if slots > 1:
        text += f", each training {slots} trials at once as one batched model"
    elif refused is not None:
        text += f"; trials one at a time: {refused}"
    return Parallelism(workers, threads, slots, text, refused)


def _batch_slots(asked: int | None, problem: str | None) -> int:
    """Trials per batched model: ``asked`` when the model can be batched, else 1.

    Automatic is 1: on this project's CPU machine no model gained enough to batch by
    default; the README's Performance section gives the numbers of
    ``benchmarks/study_throughput.py`` (a batched digits study gained 1.09x, the CNN study lost).
    """
    if problem is not None or asked is None:
        return 1
    return asked
