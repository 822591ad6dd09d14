"""Time one optimizer step of SOFIM against SGD with momentum and AdamW.

The parameters are those of a CIFAR-style ResNet-18 (11M). Every optimizer steps its own
copy of the parameters, interleaved in one process, so that the machine's drift hits all
alike; the script prints median times and, as the median over rounds of the ratio within
each round, the ratios that the targets are stated in:
SOFIM <= 1.10x SGD with momentum and <= 0.5x AdamW on the CPU, <= 1.25x SGD with momentum
on a GPU. On CUDA it also checks that SOFIM's step makes no host synchronisation and that
it can be captured in a CUDA graph.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--repeats 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from sofim_tune import SOFIM
from sofim_tune.data import dataset_info
from sofim_tune.models import build_model

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sofim": lambda ps: SOFIM(ps, lr=0.1, rho=0.5, beta1=0.9),
    "sofim-loop": lambda ps: SOFIM(ps, lr=0.1, rho=0.5, beta1=0.9, foreach=False),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
}


def resnet18_parameters(device: torch.device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [p.detach().to(device) for p in build_model("resnet18", dataset_info("cifar100")).parameters()]
    return [torch.nn.Parameter(p.clone()) for p in params]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(device: torch.device, repeats: int, steps_per_sample: int) -> dict[str, list[float]]:
    optimizers = {}
    for name, make in OPTIMIZERS.items():
        params = resnet18_parameters(device)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[name] = make(params)
        optimizers[name].step()  # creates the state outside the timed region
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    order = list(optimizers)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)  # no optimizer always follows the cache footprint of the same other one
        for name in order:
            opt = optimizers[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_sample):
                opt.step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / steps_per_sample)
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the ratio within a round: the machine's drift between rounds cancels."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def check_cuda_graph(device: torch.device) -> tuple[bool, float, float]:
    """SOFIM's step under sync-debug 'error', captured in a CUDA graph: (ok, eager ms, graph ms)."""
    params = resnet18_parameters(device)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = SOFIM(params, lr=0.1, rho=0.5)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    reference = [p.detach().clone() for p in params]
    graph.replay()
    synchronize(device)
    moved = any(not torch.equal(p, r) for p, r in zip(params, reference))

    def median_ms(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return moved, median_ms(opt.step), median_ms(graph.replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    device = torch.device(args.device)
    steps_per_sample = 20 if device.type == "cuda" else 2
    samples = time_steps(device, args.repeats, steps_per_sample)
    median = {name: statistics.median(s) for name, s in samples.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; ResNet-18 parameters; median of {args.repeats} samples")
    for opt_name, seconds in median.items():
        print(f"  {opt_name:<13} {seconds * 1e3:9.3f} ms/step")
    for baseline in ("sgd-momentum", "adamw"):
        print(f"  ratio sofim / {baseline:<12} = {paired_ratio(samples['sofim'], samples[baseline]):.3f}")
    if device.type == "cuda":
        moved, eager_ms, graph_ms = check_cuda_graph(device)
        print(f"  no host sync in step: ok; CUDA graph capture: {'ok' if moved else 'did not update'}")
        print(f"  sofim eager {eager_ms:.3f} ms, sofim CUDA-graph replay {graph_ms:.3f} ms")


if __name__ == "__main__":
    main()
