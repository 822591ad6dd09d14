"""How many trials run at once, and with how many threads each.

Small models gain nothing from torch's intra-op threads, and lose badly when the machine is
shared: two threads spinning on a busy core made a digits MLP step 200× slower here. They
gain from several trials at once, one thread each. Measured on this project's 2-core machine
(``python benchmarks/study_throughput.py --threads-only``): two single-thread processes beat
one two-thread process for every model tried, from the digits MLP (2.05×) to ResNet-18 on
32×32 images (1.04-1.13×), so on the CPU the rule is one trial per physical core, one thread each,
whatever the model. What stops it is memory, estimated per worker from the data and the
model against what the machine and this process's cgroups (a container's ``--memory``) leave
available, the number of trials left and the study's lookahead (the trials it lets run at once).
Fewer trials than cores leave the spare cores idle rather than give them to a trial as threads:
a trial's numbers depend on its thread count, and a study must not depend on its workers.

On a GPU, a small model (at most ``SMALL_MODEL_PARAMETERS``) leaves the device mostly idle,
so ``TRIALS_PER_GPU_SMALL`` trials share each GPU; a larger one gets a GPU per trial.

Workers and threads the user names are kept up to what can run (see :func:`plan`), and lowered
with a warning beyond it.
"""

from __future__ import annotations

import logging
import math
import os
import resource
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

OVERSUBSCRIPTION = 4
"""An explicit ``--workers`` may run this many times as many trials at once as the automatic
rule would on this machine (per CPU, or per trial slot of a GPU); more only queue for the
same cores and devices."""

log = logging.getLogger(__name__)


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


CGROUP_ROOT_ENV = "SOFIM_TUNE_CGROUP_ROOT"
"""Environment variable naming the folder where the cgroup file systems are mounted, in place
of ``/sys/fs/cgroup`` (tests point it at a fake one)."""

_DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_root() -> Path:
    """Where the cgroup file systems are mounted: ``$SOFIM_TUNE_CGROUP_ROOT``, else ``/sys/fs/cgroup``."""
    return Path(os.environ.get(CGROUP_ROOT_ENV) or _DEFAULT_CGROUP_ROOT)


def _own_cgroups(root: Path, controller: str) -> list[Path]:
    """The folders of this process's cgroup and of every cgroup above it, that exist under ``root``.

    ``controller`` is ``""`` for the unified (v2) hierarchy, mounted at ``root`` itself, or a
    v1 controller (``"memory"``, ``"cpu"``) mounted at ``root/<controller>``. A limit set on
    any of them applies to this process. In a container that shows its own cgroup as the
    root, the process's path (from ``/proc/self/cgroup``) does not exist there, and the root
    is what is left.
    """
    base = root / controller if controller else root
    relative = "/"
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controllers == "" and not controller) or (controller and controller in controllers.split(",")):
                relative = path
                break
    except (OSError, ValueError):
        pass
    own = base / relative.strip("/")
    return [folder for folder in (own, *own.parents) if folder.is_relative_to(base) and folder.is_dir()]


def _read_number(path: Path) -> int | None:
    """The integer in a cgroup file, or None when the file is missing, says ``max`` or holds no integer."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time this process's cgroups allow (a container's ``--cpus``), or None when unlimited."""
    quotas: list[float] = []
    for folder in _own_cgroups(root, ""):
        try:
            quota, period = (folder / "cpu.max").read_text().split()
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    for folder in _own_cgroups(root, "cpu"):
        quota, period = _read_number(folder / "cpu.cfs_quota_us"), _read_number(folder / "cpu.cfs_period_us")
        if quota is not None and quota > 0 and period:
            quotas.append(quota / period)
    return min(quotas, default=None)


def _allowed_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def available_cpus(cgroup: Path | None = None) -> int:
    """Logical CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota
    (rounded up). ``cgroup`` is where cgroups are mounted; None: :func:`cgroup_root`."""
    cpus = len(_allowed_cpus())
    quota = _cpu_quota(cgroup or cgroup_root())
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def physical_cores(cgroup: Path | None = None) -> int:
    """Physical cores this process may use: its CPU affinity, hyper-threads counted once,
    capped by a cgroup CPU quota (a container's ``--cpus``; see :func:`available_cpus`)."""
    allowed = _allowed_cpus()
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
    return min(max(1, cores), available_cpus(cgroup))


def _cgroup_memory_left(root: Path) -> int | None:
    """Bytes the memory limits of this process's cgroups leave, or None where none is set.

    For each cgroup with a limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``): the
    limit less the usage (``memory.current``, ``memory.usage_in_bytes``), not counting the
    inactive file cache (``memory.stat``), which the kernel reclaims before it kills. The
    smallest over the cgroup and those above it.
    """
    left: list[int] = []
    for controller, limit_file, usage_file, cache_key in (
        ("", "memory.max", "memory.current", "inactive_file"),
        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        for folder in _own_cgroups(root, controller):
            limit = _read_number(folder / limit_file)
            if limit is None:
                continue
            usage = _read_number(folder / usage_file) or 0
            left.append(max(0, limit - max(0, usage - _memory_stat(folder / "memory.stat", cache_key))))
    return min(left, default=None)


def _memory_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _mem_available() -> int | None:
    """Linux's MemAvailable in bytes, or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(cgroup: Path | None = None) -> int | None:
    """Bytes of memory available now to this process and the workers it starts, or None where unknown.

    The smaller of the machine's available memory (Linux's MemAvailable) and what the memory
    limits of this process's cgroups leave (a container's ``--memory``; see
    :func:`_cgroup_memory_left`). ``cgroup`` is where cgroups are mounted; None: :func:`cgroup_root`.
    """
    known = [m for m in (_mem_available(), _cgroup_memory_left(cgroup or cgroup_root())) if m is not None]
    return min(known, default=None)


def _address_space_left() -> int | None:
    """Bytes this process may still map under its address-space limit (``ulimit -v``), or None when unlimited."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, limit - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return limit


def allocatable_memory(cgroup: Path | None = None) -> int | None:
    """Bytes this process itself may still allocate: :func:`available_memory`, and no more
    than its address-space limit leaves; None where neither is known."""
    known = [m for m in (available_memory(cgroup), _address_space_left()) if m is not None]
    return min(known, default=None)


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
    lookahead: int | None = None,
    cores: int | None = None,
    cpus: int | None = None,
    memory: int | None = None,
) -> Parallelism:
    """Workers and threads per trial for a study; ``workers``/``threads`` given are kept
    where they can run, and lowered with a warning where they cannot.

    An explicit ``threads`` is at most ``cpus``: more threads than CPUs only wait for each
    other. An explicit ``workers`` is at most ``trials`` (a worker without a trial would only
    start a surplus one), and at most :data:`OVERSUBSCRIPTION` times what the automatic rule
    runs at once on this machine: that many workers per CPU, or per trial slot of a GPU
    (``TRIALS_PER_GPU_SMALL`` for a small model, 1 for a large one). Lowering changes how
    fast a study runs, not which trials it runs, so a command written for a bigger machine
    still runs on a smaller one.

    Args:
        on_gpu: trials run on CUDA devices.
        gpus: how many GPUs the workers are spread over (``--gpus``), >= 1 when ``on_gpu``.
        model_parameters: the model's parameter count.
        data_bytes: the size of the training and validation images as stored (uint8).
        trials: trials the study still has to run, >= 1.
        workers, threads, batch_trials: the user's choice, or None for automatic.
        batch_problem: why this study's trials cannot be batched (``sofim_tune.batched``),
            or None when they can.
        lookahead: the most trials the study lets run at once (``StudySpec.lookahead``), or
            None for no limit: workers beyond it would only wait.
        cores, cpus, memory: the machine's physical cores, the logical CPUs this process may
            use and the bytes available (:func:`available_memory`: a cgroup limit counts);
            None measures them.
    """
    cores = cores or physical_cores()
    cpus = cpus or available_cpus()
    trials = max(1, trials)
    small = model_parameters <= SMALL_MODEL_PARAMETERS
    size = f"{'small' if small else 'large'} model ({model_parameters / 1e6:.2g}M parameters)"
    per_gpu = TRIALS_PER_GPU_SMALL if small else 1
    lowered: list[str] = []
    if threads is not None:
        threads = _lowered("--threads-per-trial", threads, [(cpus, f"the {_count(cpus, 'CPU')} this process may use")], lowered)
    if workers is not None:
        if on_gpu:
            machine = (OVERSUBSCRIPTION * per_gpu * max(1, gpus), f"{OVERSUBSCRIPTION * per_gpu} per GPU for a {size} on {_count(max(1, gpus), 'GPU')}")
        else:
            machine = (OVERSUBSCRIPTION * cpus, f"{OVERSUBSCRIPTION} per CPU on {_count(cpus, 'CPU')}")
        limits = [(trials, f"one per trial ({_count(trials, 'trial')})"), machine]
        if lookahead is not None:
            limits.append((lookahead, f"--lookahead {lookahead} (trials that may run at once)"))
        workers = _lowered("--workers", workers, limits, lowered)
        why = "--workers"
    elif on_gpu:
        workers = min(trials, max(1, gpus) * per_gpu, lookahead or trials)
        why = f"{size}: {_count(per_gpu, 'trial')} per GPU on {_count(max(1, gpus), 'GPU')}"
    else:
        by_threads = max(1, cores // threads) if threads else cores
        memory = memory if memory is not None else available_memory()
        by_memory = memory // worker_memory(model_parameters, data_bytes) if memory else by_threads
        workers = max(1, min(by_threads, trials, by_memory, lookahead or trials))
        why = f"{size} on {_count(cores, 'physical core')}: one trial per core"
        if workers == trials < by_threads:
            why += ", fewer for lack of trials"
        elif workers == by_memory < by_threads:
            why += ", fewer for lack of memory"
        elif workers < by_threads:
            why += f", at most --lookahead {lookahead}"
    if threads is None:
        # On the CPU a trial's numbers depend on its thread count (a reduction over two threads
        # sums in another order), so it stays at one whatever the workers or the trials left:
        # a study is then the same with any --workers (sofim_tune.backends.views). CUDA's
        # kernels do not use these threads.
        threads = max(1, cores // workers) if on_gpu else 1
    else:
        why += ", --threads-per-trial"
    why = "; ".join([why, *lowered])
    text = f"{_count(workers, 'worker')} × {_count(threads, 'thread')} ({why})"
    slots = _batch_slots(batch_trials, batch_problem)
    refused = batch_problem if slots == 1 and (batch_trials or 1) > 1 else None
    if slots > 1:
        text += f", each training {slots} trials at once as one batched model"
    elif refused is not None:
        text += f"; trials one at a time: {refused}"
    return Parallelism(workers, threads, slots, text, refused)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _lowered(option: str, asked: int, bounds: list[tuple[int, str]], notes: list[str]) -> int:
    """``asked``, or else the smallest of ``bounds`` (each a limit and what it is, in words),
    with a warning and a note appended to ``notes`` when ``asked`` exceeds it."""
    bound = min(limit for limit, _ in bounds)
    if asked <= bound:
        return asked
    note = f"{option} {asked} lowered to {bound}: at most {' and '.join(text for _, text in sorted(bounds))}"
    log.warning("%s", note)
    notes.append(note)
    return bound


def _batch_slots(asked: int | None, problem: str | None) -> int:
    """Trials per batched model: ``asked`` when the model can be batched, else 1.

    Automatic is 1: on this project's CPU machine no model gained enough to batch by
    default; the README's Performance section gives the numbers of
    ``benchmarks/study_throughput.py`` (a batched digits study gained 1.09x, the CNN study lost).
    """
    if problem is not None or asked is None:
        return 1
    return asked
