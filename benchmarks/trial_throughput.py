"""Epoch time of train_trial against a minimal loop and a DataLoader loop, side by side.

Three loops train the same model with the same optimizer and batch size on the same data:
- ``train_trial``: sofim-tune's loop (device-resident uint8 data, index batches);
- ``minimal``: the fewest lines that do the same work (permutation, gather, the same
  on-device crop/flip, normalise, forward, backward, step, then the same validation pass),
  the floor for any loop;
- ``dataloader``: the common torchvision recipe, a Dataset that converts and augments one
  sample at a time in Python behind a ``DataLoader``.

Targets: train_trial <= 1.05x minimal, and >= 2x faster than the DataLoader loop on the MNIST-
and CIFAR-sized sets. The datasets are digits (real) and synthetic tensors of MNIST
(1x28x28) and CIFAR (3x32x32) shape; ``--samples`` sets their size so that a CPU run stays
short. ``--gpu-epoch`` instead times one ResNet-18 epoch on 50,000 CIFAR-100-shaped images
with bf16 autocast and channels_last (target <= 1.0 s on an H100).

    python benchmarks/trial_throughput.py [--samples 4096] [--arch mlp] [--repeats 3]
    python benchmarks/trial_throughput.py --gpu-epoch
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from sofim_tune.data import DatasetInfo, LoadedData, TensorSplit, data_from_tensors, load_data, random_augment
from sofim_tune.models import build_model
from sofim_tune.optim import build_optimizer
from sofim_tune.trial import TrialConfig, train_trial

SETTINGS = {"lr": 0.05, "rho": 1.0, "beta1": 0.9}


def synthetic(info: DatasetInfo, samples: int, val_samples: int, device: str) -> LoadedData:
    gen = torch.Generator().manual_seed(0)
    shape = (info.channels, info.image_size, info.image_size)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, info.num_classes, (n,), generator=gen)

    return data_from_tensors(info, images(samples), labels(samples), images(val_samples), labels(val_samples), device=device)


def epoch_of_train_trial(data: LoadedData, arch: str, batch_size: int, device: str, epochs: int) -> float:
    """Seconds of the last epoch, from the reporter's timestamps (validation included)."""
    stamps: list[float] = []

    class Clock:
        def report(self, epoch: int, metrics: object) -> None:
            stamps.append(time.perf_counter())

    config = TrialConfig(dataset=data.info.name, arch=arch, hyperparameters=SETTINGS, epochs=epochs, batch_size=batch_size, device=device)
    started = time.perf_counter()
    train_trial(config, Clock(), data=data)
    return stamps[-1] - (stamps[-2] if len(stamps) > 1 else started)


def epoch_of_minimal_loop(data: LoadedData, arch: str, batch_size: int, device: str) -> float:
    split = data.train
    assert isinstance(split, TensorSplit)
    torch.manual_seed(0)
    model = build_model(arch, data.info).to(device)
    optimizer = build_optimizer("sofim", model.parameters(), SETTINGS)
    scale, shift = split._scale, split._shift
    gen = torch.Generator(device=device).manual_seed(0)
    synchronize(device)
    started = time.perf_counter()
    order = torch.randperm(len(split), generator=gen, device=device)
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        x = split.images[index]
        if data.info.augment != "none":
            x = random_augment(x, data.info.augment, gen)
        x = x.float().mul_(scale).add_(shift)
        loss = F.cross_entropy(model(x), split.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum() for x, y in data.val.batches(512, shuffle=False, augment=False))
    float(correct)
    model.train()
    synchronize(device)
    return time.perf_counter() - started


class _PerSampleDataset(Dataset):
    """The usual recipe: one PIL-free sample at a time through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float], augment: str, size: int) -> None:
        self.images, self.labels = images, labels
        steps: list[torch.nn.Module] = [v2.ToImage()]
        if "crop" in augment:
            steps.append(v2.RandomCrop(size, padding=4, padding_mode="reflect"))
        if "flip" in augment:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def epoch_of_dataloader_loop(data: LoadedData, arch: str, batch_size: int, device: str, workers: int) -> float:
    split = data.train
    assert isinstance(split, TensorSplit)
    images = split.images.permute(0, 2, 3, 1).cpu().numpy()  # HWC, as torchvision datasets hold them
    dataset = _PerSampleDataset(images, split.labels.cpu().numpy(), split.mean.tolist(), split.std.tolist(), data.info.augment, data.info.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=device.startswith("cuda"))
    torch.manual_seed(0)
    model = build_model(arch, data.info).to(device)
    optimizer = build_optimizer("sofim", model.parameters(), SETTINGS)
    synchronize(device)
    started = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare_loops(args: argparse.Namespace) -> None:
    device = "cpu"
    sets = {
        "digits": load_data("digits", device=device),
        "mnist-sized": synthetic(DatasetInfo("mnist-sized", 10, 1, 28, args.arch), args.samples, 512, device),
        "cifar-sized": synthetic(DatasetInfo("cifar-sized", 100, 3, 32, args.arch, augment="crop-flip"), args.samples, 512, device),
    }
    print(f"CPU, {torch.get_num_threads()} threads; arch {args.arch}; batch {args.batch_size}; {args.samples} synthetic samples; median of {args.repeats}")
    print(f"{'dataset':<13}{'train_trial':>12}{'minimal':>10}{'dataloader':>12}{'vs minimal':>12}{'dataloader/us':>15}")
    for name, data in sets.items():
        times: dict[str, list[float]] = {"train_trial": [], "minimal": [], "dataloader": []}
        for _ in range(args.repeats):  # interleaved, so that drift hits all three alike
            times["train_trial"].append(epoch_of_train_trial(data, args.arch, args.batch_size, device, epochs=2))
            times["minimal"].append(epoch_of_minimal_loop(data, args.arch, args.batch_size, device))
            times["dataloader"].append(epoch_of_dataloader_loop(data, args.arch, args.batch_size, device, args.workers))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{name:<13}{med['train_trial']:>11.3f}s{med['minimal']:>9.3f}s{med['dataloader']:>11.3f}s"
            f"{med['train_trial'] / med['minimal']:>11.3f}x{med['dataloader'] / med['train_trial']:>14.2f}x"
        )
    print("train_trial and minimal include a validation pass over 512 samples; the DataLoader loop has none.")


def gpu_epoch(args: argparse.Namespace) -> None:
    info = DatasetInfo("cifar100-synthetic", 100, 3, 32, "resnet18", augment="crop-flip")
    data = synthetic(info, 50_000, 1_000, "cuda")
    seconds = [epoch_of_train_trial(data, "resnet18", args.batch_size, "cuda", epochs=3)]
    minimal = [epoch_of_minimal_loop(data, "resnet18", args.batch_size, "cuda") for _ in range(2)]  # fp32, no autocast
    print(f"{torch.cuda.get_device_name()}: ResNet-18, 50,000 images 3x32x32, batch {args.batch_size}, bf16 autocast + channels_last")
    print(f"  train_trial epoch (3rd, with 1,000-image validation): {seconds[0]:.3f} s")
    print(f"  minimal fp32 loop epoch (2nd, no autocast, same validation): {minimal[-1]:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="synthetic training samples per set")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--gpu-epoch", action="store_true")
    args = parser.parse_args()
    if args.gpu_epoch:
        gpu_epoch(args)
    else:
        compare_loops(args)


if __name__ == "__main__":
    main()
