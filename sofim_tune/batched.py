"""Many trials of one small model trained as one stacked model.

A trial of the digits MLP spends about half its time outside its matrix products, dispatching
small ops one trial at a time. :class:`TrialBatch`
trains up to ``slots`` trials of one architecture, optimizer and batch size on shared data in
lockstep: every weight becomes a K×(its shape) tensor, a linear layer one batched matmul and a
convolution one grouped convolution over the K members' channels (so that BatchNorm's
per-channel statistics stay per member), and the optimizer steps all members with a few ops
per tensor. Each member keeps what makes it a trial of its own: seed, initial weights, batch
order and augmentation (its own ``torch.Generator``), hyperparameters, learning-rate schedule,
label smoothing, weight-decay coupling and step count.

On the CPU a member computes what :func:`sofim_tune.trial.train_trial` computes for its config,
bit for bit for the digits MLP and CNN with every optimizer (measured): where a batched kernel
sums in another order than the single one, the batch runs it per member (the loss, the weight
gradients, SOFIM's norms), since some settings amplify a last-bit difference to 1e-2 within a
few epochs; the one known exception left is the output of a grouped convolution with fewer
than 16 input channels per member, such as a first layer on RGB images. Two more things
would make a member's bits depend on its slot or its settings, and are done as the sequential
run does them: a dot product of a row that starts mid cache line (see :func:`_squared_norms`),
and powers such as β₁ᵗ, taken on the host (see :meth:`_Update.host_table`). Per-member scalars are
K-element tensors, computed in float64 as the host computes them for ``sofim_tune.optim`` and
``torch.optim`` and rounded to float32 where a tensor op takes them; a step never waits for
the host.

Typical use (a study's scheduler refills slots as members finish)::

    batch = TrialBatch(data, arch="mlp", optimizer="sofim", batch_size=64, slots=16)
    for config in configs[:16]:
        batch.add(config)
    while batch.members:
        for slot, outcome in batch.train_epoch().items():
            if outcome.done:
                results.append(batch.finish(slot))
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from sofim_tune import interrupts
from sofim_tune.data import DatasetInfo, LoadedData, Split, TensorSplit
from sofim_tune.errors import UserInputError
from sofim_tune.models import build_model
from sofim_tune.schedules import build_scheduler
from sofim_tune.trial import DIVERGENCE_CHECK_INTERVAL, FISHER_SAMPLE_INTERVAL, TrialConfig, TrialResult, resolve_device, trial_optimizer

__all__ = ["EpochOutcome", "TrialBatch", "batch_problem"]

_IMAGE_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)
_SUPPORTED = "Flatten, Linear, Conv2d, BatchNorm2d, ReLU, MaxPool2d and AdaptiveAvgPool2d"


def batch_problem(config: TrialConfig, data: LoadedData) -> str | None:
    """Why ``config`` cannot be trained in a :class:`TrialBatch` on ``data``, in one line; None when it can.

    A batch trains an ``nn.Sequential`` of Flatten, Linear, Conv2d, BatchNorm2d, ReLU, MaxPool2d
    and AdaptiveAvgPool2d layers (``mlp``, ``cnn``; not the ResNets or ``tv:`` models) on data
    held on the device. An invalid config gives the message :func:`train_trial` would raise.
    """
    try:
        config.validate()
        device = resolve_device(config.device)
    except UserInputError as error:
        return str(error)
    if config.final:
        return "a final run reports the outcome of every final image, which a batch does not record"
    problem = _arch_problem(config.arch or data.info.default_arch, data.info)
    if problem is not None:
        return problem
    if not isinstance(data.train, TensorSplit):
        return "the training images stream from disk; a batch would decode them once per member"
    if data.train.device.type != device.type or (data.train.device.index or 0) != (device.index or 0):
        return f"the data lives on {data.train.device} but the trial asks for {device}"
    if config.image_size is not None and config.image_size != data.info.image_size:
        return f"the data's images are {data.info.image_size}x{data.info.image_size}, not the image size {config.image_size} asked for"
    return None


def _arch_problem(arch: str, info: DatasetInfo) -> str | None:
    """Why ``arch`` cannot run stacked, in one line; None when it can."""
    if arch.startswith("tv:"):
        return f"{arch} is a torchvision model; a batch trains only plain stacks of {_SUPPORTED} layers"
    try:
        problem = _layer_problem(_template(arch, info))
    except UserInputError as error:
        return str(error)
    return None if problem is None else f"{arch}: {problem}; a batch trains only plain stacks of {_SUPPORTED} layers"


def _template(arch: str, info: DatasetInfo) -> nn.Module:
    # On the meta device: the layers are all a template is for, and no initialisation draws from the global RNG.
    with torch.device("meta"):
        return build_model(arch, info)


def _layer_problem(model: nn.Module) -> str | None:
    """What keeps ``model`` from running stacked (see :class:`_StackedNet`); None when nothing does."""
    if not isinstance(model, nn.Sequential):
        return f"a {type(model).__name__}, not an nn.Sequential"
    flat = False
    for name, layer in model.named_children():
        if isinstance(layer, nn.Flatten):
            if flat or (layer.start_dim, layer.end_dim) != (1, -1):
                return f"layer {name} flattens other dimensions than one image's"
            flat = True
        elif (isinstance(layer, nn.Linear) and not flat) or (isinstance(layer, _IMAGE_LAYERS) and flat):
            return f"layer {name} ({type(layer).__name__}) is on the wrong side of the Flatten"
        elif isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            return f"layer {name} pads as {layer.padding!r} with {layer.padding_mode!r}"
        elif isinstance(layer, nn.BatchNorm2d) and (layer.momentum is None or not layer.track_running_stats):
            return f"layer {name} keeps no exponential running statistics"
        elif not isinstance(layer, (nn.Linear, nn.ReLU, *_IMAGE_LAYERS)):
            return f"layer {name} is a {type(layer).__name__}"
    return None if flat else "no Flatten before the classifier"


class _StackedNet:
    """An ``nn.Sequential`` (checked by :func:`_layer_problem`) run for K members at once.

    Activations are K×N×C×H×W on entry, N×(K·C)×H×W from the first image layer
    on (so a convolution with ``groups`` × K groups and BatchNorm over K·C channels act per
    member) and K×N×F after the Flatten. ``tensors`` maps the model's parameter and buffer names
    to K×(shape) tensors; training-mode BatchNorm updates the running statistics in place.
    """

    def __init__(self, model: nn.Sequential) -> None:
        self.layers = list(model.named_children())

    def __call__(self, tensors: Mapping[str, Tensor], x: Tensor, *, training: bool) -> Tensor:
        k, n = x.shape[:2]
        h, layout = x, "stacked"
        for name, layer in self.layers:
            if layout == "stacked" and isinstance(layer, _IMAGE_LAYERS):
                # train_trial's memory format: channels last on CUDA, NCHW on the CPU (where channels
                # last runs the grouped convolutions 1.4x faster but sums them in another order).
                h = h.transpose(0, 1).reshape(n, -1, *h.shape[3:])
                h, layout = h.contiguous(memory_format=torch.channels_last if h.is_cuda else torch.contiguous_format), "grouped"
            weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
            if isinstance(layer, nn.Flatten):
                h = h.reshape(k, n, -1) if layout == "stacked" else h.reshape(n, k, -1).transpose(0, 1)
                layout = "features"
            elif isinstance(layer, nn.Linear):
                h = _Linear.apply(h, weight, bias)
            elif isinstance(layer, nn.Conv2d):
                h = _Conv2d.apply(h, weight, bias, layer)
            elif isinstance(layer, nn.BatchNorm2d):
                running = (tensors[f"{name}.running_mean"].view(-1), tensors[f"{name}.running_var"].view(-1))
                flat_weight, flat_bias = (None if t is None else t.flatten() for t in (weight, bias))
                h = F.batch_norm(h, *running, flat_weight, flat_bias, training, layer.momentum, layer.eps)
            else:  # ReLU and the pools act on each channel alone: the module itself serves every layout
                h = layer(h)
        return h


class _Linear(torch.autograd.Function):
    """K linear layers, K×N×in to K×N×out: ``F.linear`` per member, differentiated as torch differentiates it.

    The weight's gradient is gradᵀ·input per member, as ``addmm``'s derivative computes it:
    the very product train_trial computes (MKL's batched product sums a 10-class head's in
    another order), in the weight's own layout (autograd's derivative of ``bmm`` would return
    it transposed, and elementwise steps over mixed layouts run ten times slower).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.bmm(x, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None]:
        # In the gradient's dtype: bfloat16 under CUDA autocast, as autocast's own derivatives compute.
        x, weight = (t.to(grad.dtype) for t in ctx.saved_tensors)
        grad_weight = torch.empty_like(weight)
        for member_grad, member_x, out in zip(grad, x, grad_weight):
            torch.mm(member_grad.t(), member_x, out=out)
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, grad.sum(1) if ctx.has_bias else None


class _Conv2d(torch.autograd.Function):
    """K convolutions, N×(K·C)×H×W to N×(K·out)×H'×W': one convolution grouped over the members,
    differentiated as torch differentiates each member's own.

    The weight gradient is taken per member, as train_trial takes it: oneDNN's grouped kernel
    sums it in another order below 8 input channels per group (the digits CNN's one-channel
    first layer), a last-bit difference that some settings amplify to 1e-2 within three epochs.
    The output and the input gradient stay grouped: from 16 input channels per group on they
    are the member's own to the bit; with fewer, oneDNN sums them in another order too (a
    3-channel first layer's output, whose input needs no gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Conv2d) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        flat_bias = None if bias is None else bias.flatten()
        return F.conv2d(x, weight.flatten(0, 1), flat_bias, layer.stride, layer.padding, layer.dilation, layer.groups * len(weight))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None, None]:
        x, weight = (t.to(grad.dtype) for t in ctx.saved_tensors)  # see _Linear.backward
        layer, k = ctx.layer, len(weight)

        def convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, groups: int, mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
            bias_sizes = [len(weight)] if ctx.has_bias else None
            return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, layer.stride, layer.padding, layer.dilation, False, [0, 0], groups, mask)

        grad_x = convolution_backward(grad, x, weight.flatten(0, 1), layer.groups * k, [True, False, False])[0] if ctx.needs_input_grad[0] else None
        members = [convolution_backward(g.contiguous(), m.contiguous(), w, layer.groups, [False, True, ctx.has_bias]) for g, m, w in zip(grad.chunk(k, 1), x.chunk(k, 1), weight)]
        grad_bias = torch.stack([b for _, _, b in members]) if ctx.has_bias else None
        return grad_x, torch.stack([w for _, w, _ in members]), grad_bias, None


@dataclass(frozen=True)
class EpochOutcome:
    """One member's epoch, as :meth:`TrialBatch.train_epoch` reports it.

    Attributes:
        epoch: the member's own epoch number, from 1.
        metrics: the epoch's entry of :attr:`TrialResult.history` (``epoch``, ``train_loss``,
            ``val_loss`` in nats, ``val_accuracy`` in 0..1, and for SOFIM ``fisher_ratio``);
            None when the member diverged in this epoch.
        done: the member trains no more (it diverged, or finished its epochs); call
            :meth:`TrialBatch.finish` for its result.
    """

    epoch: int
    metrics: dict[str, float] | None
    done: bool

    @property
    def diverged(self) -> bool:
        return self.metrics is None


@dataclass(eq=False)
class _Member:
    config: TrialConfig
    slot: int
    augment: str
    group: dict[str, Any]  # the optimizer's settings as train_trial's optimizer holds them
    learning_rates: list[float]  # the lr of every step of the full budget, from train_trial's scheduler
    generator: torch.Generator
    tensors: dict[str, Tensor]  # weights, BatchNorm statistics and optimizer state, by name
    started: float
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    fisher_samples: list[float] = field(default_factory=list)
    diverged_epoch: int | None = None

    @property
    def done(self) -> bool:
        return self.diverged_epoch is not None or len(self.history) == self.config.epochs


class TrialBatch:
    """Up to ``slots`` trials of one architecture, optimizer and batch size, trained in lockstep on ``data``.

    Members join (:meth:`add`) and leave (:meth:`finish`) at any epoch boundary, each with its
    own config; :meth:`train_epoch` trains every member that is not done for one epoch.

    Args:
        data: the splits every member trains and validates on, resident on the device the
            members run on (see :func:`batch_problem`).
        arch: the architecture; None takes the dataset's default.
        optimizer: ``sofim``, ``sofim-tensor``, ``sgd-momentum`` or ``adamw``.
        batch_size: examples per step, >= 1.
        slots: the most members at once, >= 1; memory and time per step grow with it.
    """

    def __init__(self, data: LoadedData, *, arch: str | None = None, optimizer: str = "sofim", batch_size: int, slots: int) -> None:
        if optimizer not in _UPDATES:
            raise UserInputError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(_UPDATES)}")
        if batch_size < 1 or slots < 1:
            raise UserInputError(f"batch size and slots must be >= 1, got {batch_size} and {slots}")
        self.data = data
        self.arch = arch or data.info.default_arch
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.slots = slots
        self.steps_per_epoch = math.ceil(len(data.train) / batch_size)
        self.device = torch.device(getattr(data.train, "device", "cpu"))
        problem = _arch_problem(self.arch, data.info)
        if problem is not None:
            raise UserInputError(problem)
        template = _template(self.arch, data.info)
        self._param_names = [name for name, _ in template.named_parameters()]
        self._net = _StackedNet(template)
        self._members: dict[int, _Member] = {}
        self._stack: dict[str, Tensor] = {}
        self._stacked: list[_Member] = []

    @property
    def members(self) -> dict[int, TrialConfig]:
        """The config of each occupied slot, finished or not."""
        return {slot: member.config for slot, member in sorted(self._members.items())}

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._members)

    def add(self, config: TrialConfig) -> int:
        """Start a trial of ``config`` in a free slot and return the slot.

        Its weights, optimizer and schedule are built as :func:`train_trial` builds them.
        Raises :class:`UserInputError` for a config :func:`batch_problem` rejects or that
        does not share this batch's architecture, optimizer and batch size, and
        ``RuntimeError`` when no slot is free.
        """
        config.validate()  # an invalid config fails with train_trial's message
        problem = batch_problem(config, self.data)
        if problem is None and (config.arch or self.data.info.default_arch, config.optimizer, config.batch_size) != (self.arch, self.optimizer, self.batch_size):
            problem = f"this batch trains {self.arch} with {self.optimizer} at batch size {self.batch_size}"
        if problem is not None:
            raise UserInputError(f"cannot add the trial to the batch: {problem}")
        if not self.free_slots:
            raise RuntimeError(f"all {self.slots} slots are taken; finish a member first")
        started = time.perf_counter()
        torch.manual_seed(config.seed)
        model = build_model(self.arch, self.data.info).to(self.device)
        optimizer = trial_optimizer(config, model.parameters())
        tensors = {name: t.detach() for name, t in model.state_dict().items() if not name.endswith("num_batches_tracked")}
        for name in _UPDATES[self.optimizer].state:
            tensors.update({f"{name}/{p}": torch.zeros_like(tensors[p]) for p in self._param_names})
        slot = min(set(range(self.slots)) - set(self._members))
        self._members[slot] = _Member(
            config=config,
            slot=slot,
            augment=config.augment if config.augment is not None else self.data.info.augment,
            group={key: value for key, value in optimizer.param_groups[0].items() if key != "params"},
            learning_rates=_learning_rates(optimizer, config, self.steps_per_epoch),
            generator=torch.Generator(device=self.device).manual_seed(config.seed),
            tensors=tensors,
            started=started,
        )
        return slot

    def train_epoch(self, slots: Collection[int] | None = None) -> dict[int, EpochOutcome]:
        """Train every member that is not done for one epoch; the outcome of each, by slot.

        ``slots`` limits the epoch to the members in those slots (None: all); the others
        keep their state and epoch count, so members may advance at their own pace (a
        member's numbers never depend on who trains beside it). The host reads the device's
        numbers once per divergence check (every ``DIVERGENCE_CHECK_INTERVAL`` batches) and
        once at the end, for all members together.
        """
        members = [member for slot, member in sorted(self._members.items()) if not member.done and (slots is None or slot in slots)]
        if not members:
            return {}
        epochs = [len(member.history) + 1 for member in members]
        stack = self._restack(members)
        update = _UPDATES[self.optimizer](members, self.steps_per_epoch, self.device)
        # Who samples the Fisher ratio after which batch: train_trial's rule on each member's own step count.
        sampling = [[(m.step + b) % FISHER_SAMPLE_INTERVAL == 0 for m in members] for b in range(self.steps_per_epoch)] if update.fisher else []
        loss_sums, samples = self._train(members, epochs, stack, update, sampling)
        val_loss, val_correct = self._evaluate(stack, self.data.val)
        rows = torch.stack([t.double() for t in (loss_sums, val_loss, val_correct, *samples)]).T.tolist()
        sampled = [row for row in sampling if any(row)]
        return {m.slot: self._end_epoch(m, epoch, row, [r[i] for r in sampled]) for i, (m, epoch, row) in enumerate(zip(members, epochs, rows))}

    def _train(self, members: list[_Member], epochs: list[int], stack: dict[str, Tensor], update: _Update, sampling: list[list[bool]]) -> tuple[Tensor, list[Tensor]]:
        """One pass over the training split: each member's summed loss (K) and the Fisher-ratio samples (K each)."""
        params = [stack[name] for name in self._param_names]
        state = {kind: [stack[f"{kind}/{name}"] for name in self._param_names] for kind in update.state}
        loss_sums = torch.zeros(len(members), device=self.device)
        samples = []
        split = self.data.train
        for b, pairs in enumerate(zip(*(split.batches(self.batch_size, shuffle=True, augment=m.augment, generator=m.generator) for m in members))):
            interrupts.check()  # as train_trial: a Ctrl-C that the garbage collector swallowed stops here
            x, y = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
            with self._autocast():
                logits = self._net(stack, x, training=True)
            # Per member, the very loss of train_trial (a vectorised one would sum the batch in another order).
            losses = torch.stack([F.cross_entropy(z, t, label_smoothing=m.config.label_smoothing) for z, t, m in zip(logits.float(), y, members)])
            grads = torch.autograd.grad(losses.sum(), params)
            with torch.no_grad():
                fisher = update.step(b, params, grads, state, sample=bool(sampling) and any(sampling[b]))
            if fisher is not None:
                samples.append(fisher)
            loss_sums += losses.detach() * y.shape[1]
            if (b + 1) % DIVERGENCE_CHECK_INTERVAL == 0:
                for member, epoch, total in zip(members, epochs, loss_sums.tolist()):
                    if not math.isfinite(total) and member.diverged_epoch is None:
                        member.diverged_epoch = epoch
                if all(member.diverged_epoch is not None for member in members):
                    break  # as train_trial stops a diverged run; the others' NaNs stay in their own rows
        return loss_sums, samples

    def _end_epoch(self, member: _Member, epoch: int, numbers: list[float], sampled: list[bool]) -> EpochOutcome:
        """Record a member's epoch from its numbers (summed train loss, summed val loss, correct, Fisher samples) as train_trial does."""
        member.step += self.steps_per_epoch
        train_sum, val_sum, correct, *fisher = numbers
        train_loss, val_loss = train_sum / len(self.data.train), val_sum / len(self.data.val)
        if member.diverged_epoch is None and not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            member.diverged_epoch = epoch
        if member.diverged_epoch is not None:
            return EpochOutcome(epoch, None, done=True)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": correct / len(self.data.val)}
        taken = [value for value, sample in zip(fisher, sampled) if sample]
        if taken:
            member.fisher_samples += taken
            metrics["fisher_ratio"] = statistics.median(member.fisher_samples)
        member.history.append(metrics)
        return EpochOutcome(epoch, dict(metrics), done=member.done)

    def finish(self, slot: int, *, pruned: bool = False) -> TrialResult:
        """End the member in ``slot``, free the slot, and return its result as :func:`train_trial` would.

        The status is ``diverged`` for a member that diverged, else ``pruned`` when ``pruned``
        (stopped early, as a reporter raising ``TrialPruned`` would), else ``completed``, which
        needs all of its epochs trained; a completed ``config.evaluate_test`` run measures the
        test split now. ``seconds`` is the wall-clock time since :meth:`add`, which the
        member shared with the others.
        """
        member = self._members.get(slot)
        if member is None:
            raise KeyError(f"slot {slot} holds no member")
        if not (member.done or pruned):
            raise ValueError(f"the member in slot {slot} trained {len(member.history)} of {member.config.epochs} epochs; pass pruned=True to stop it early")
        del self._members[slot]
        status = "diverged" if member.diverged_epoch is not None else "pruned" if pruned else "completed"
        if status == "completed" and member.config.evaluate_test and self.data.test is not None:
            with torch.no_grad():
                _, correct = self._evaluate({name: t.unsqueeze(0) for name, t in member.tensors.items()}, self.data.test)
            member.history[-1]["test_accuracy"] = correct.item() / len(self.data.test)
        return TrialResult(
            status=status,
            metrics=dict(member.history[-1]) if member.history else {},
            history=member.history,
            epochs=len(member.history),
            seconds=time.perf_counter() - member.started,
            device=str(self.device),
            arch=self.arch,
            config=member.config,
            diverged_epoch=member.diverged_epoch,
            augment=member.augment,
            preprocessing=self.data.info.preprocessing,
        )

    def _restack(self, members: list[_Member]) -> dict[str, Tensor]:
        """The members' tensors stacked in this order; rebuilt only when the members changed.

        Each member's tensors then are rows of the stack, so that a member who leaves or a
        new stack takes its current values along.
        """
        if members != self._stacked:
            self._stack = {name: torch.stack([m.tensors[name] for m in members]) for name in members[0].tensors}
            for name in self._param_names:
                self._stack[name].requires_grad_(True)
            for row, member in enumerate(members):
                member.tensors = {name: t.detach()[row] for name, t in self._stack.items()}
            self._stacked = members
        return self._stack

    def _evaluate(self, tensors: Mapping[str, Tensor], split: Split) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy and correct count (K each) over ``split``, batched as train_trial's evaluation, without a host sync."""
        loss_sum = correct = None
        k = next(iter(tensors.values())).shape[0]
        with torch.no_grad(), self._autocast():
            for x, y in split.batches(max(self.batch_size, 512), shuffle=False, augment="none"):
                logits = self._net(tensors, x.expand(k, *x.shape), training=False).float()
                batch_loss = torch.stack([F.cross_entropy(z, y, reduction="sum") for z in logits])
                batch_correct = (logits.argmax(-1) == y).sum(1)
                loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
                correct = batch_correct if correct is None else correct + batch_correct
        return loss_sum, correct

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        # As train_trial: bf16 on CUDA with float32 master weights; on the CPU it would only slow things down.
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()


def _learning_rates(optimizer: Optimizer, config: TrialConfig, steps_per_epoch: int) -> list[float]:
    """The lr of each step of ``config``'s full budget, from the scheduler train_trial builds on ``optimizer``."""
    scheduler = build_scheduler(optimizer, config.schedule, steps_per_epoch=steps_per_epoch, epochs=config.epochs, warmup_epochs=config.warmup_epochs)
    group = optimizer.param_groups[0]
    rates = [group["lr"]]
    if scheduler is None:
        return rates * (steps_per_epoch * config.epochs)
    optimizer.step()  # no gradients, so no change: it only lets the scheduler step without torch's out-of-order warning
    for _ in range(steps_per_epoch * config.epochs - 1):
        scheduler.step()
        rates.append(group["lr"])
    return rates


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """K values shaped to broadcast over K×(shape) ``like``."""
    return values.view(-1, *[1] * (like.ndim - 1))


def _squared_norms(moments: Tensor) -> Tensor:
    """Each member's ‖m‖² (K), summed as ``sofim_tune.optim`` sums it: a BLAS dot per tensor on
    the CPU (the same order of additions, so the same step), one norm kernel on an accelerator.

    BLAS orders a dot's additions by where the vector starts within a cache line. A tensor of its
    own starts on one (torch's CPU allocator aligns to 64 bytes); a member's row of the stack does
    only when the rows before it fill whole lines, so another row (a 10-class head's bias in slot
    1, say) is summed from an aligned copy.
    """
    rows = moments.flatten(1)
    if rows.is_cpu:
        aligned = [row if row.data_ptr() % _CACHE_LINE_BYTES == 0 else row.clone() for row in rows]
        return torch.stack([torch.dot(row, row) for row in aligned])
    return torch.linalg.vector_norm(rows, dim=1).square()


_CACHE_LINE_BYTES = 64


class _Update:
    """One optimizer's steps over one epoch for K stacked members.

    Built at the start of each epoch from the members' settings: every per-member scalar the
    epoch needs (learning rates, bias corrections, decay factors) is a steps×K table on the
    device, computed once in float64 as the host computes them in the sequential run. Powers
    such as β₁ᵗ are taken on the host too (:meth:`host_table`): torch's vectorised ``pow``
    differs from the C library's in the last bit now and then (0.95²¹, for one).
    """

    state: tuple[str, ...] = ()  # per-parameter buffers, each zero at the start
    fisher = False  # whether step() can return SOFIM's ‖m̂‖²/ρ

    def __init__(self, members: list[_Member], steps_per_epoch: int, device: torch.device) -> None:
        self.tensor = partial(torch.tensor, dtype=torch.float64, device=device)
        self.lrs = self.tensor([m.learning_rates[m.step : m.step + steps_per_epoch] for m in members]).T
        self.step_numbers = [[m.step + b + 1 for m in members] for b in range(steps_per_epoch)]
        self.groups = [m.group for m in members]

    def host_table(self, value: Callable[[dict[str, Any], int], float]) -> Tensor:
        """steps×K: ``value(group, step)`` of each member at each step of the epoch (from 1), in Python floats."""
        return self.tensor([[value(group, step) for group, step in zip(self.groups, row)] for row in self.step_numbers])

    def setting(self, key: str) -> Tensor:
        return self.tensor([group[key] for group in self.groups])

    def step(self, b: int, params: list[Tensor], grads: Sequence[Tensor], state: dict[str, list[Tensor]], *, sample: bool) -> Tensor | None:
        """Update ``params`` and ``state`` in place with the gradients of batch ``b`` (from 0)."""
        raise NotImplementedError


class _SofimUpdate(_Update):
    """``sofim_tune.optim.sofim`` with the CPU path's float64 step coefficients, per member."""

    state = ("exp_avg",)
    fisher = True

    def __init__(self, members: list[_Member], steps_per_epoch: int, device: torch.device) -> None:
        super().__init__(members, steps_per_epoch, device)
        self.blocks_per_tensor = members[0].group["norm_scope"] == "tensor"
        beta1, self.rho = self.setting("beta1"), self.setting("rho")
        self.moment_weight = (1 - beta1).float()
        self.correction = self.host_table(lambda group, step: 1.0 - group["beta1"] ** step)
        # Each member's weight decay goes either into the gradient or into a shrink of θ.
        coupled = [0.0 if g["decoupled_weight_decay"] else g["weight_decay"] for g in self.groups]
        decoupled = [g["weight_decay"] if g["decoupled_weight_decay"] else 0.0 for g in self.groups]
        self.coupled = self.tensor(coupled).float() if any(coupled) else None
        self.shrink = (1 - self.lrs * self.tensor(decoupled)).float() if any(decoupled) else None

    def step(self, b: int, params: list[Tensor], grads: Sequence[Tensor], state: dict[str, list[Tensor]], *, sample: bool) -> Tensor | None:
        squared = []
        for param, grad, moment in zip(params, grads, state["exp_avg"]):
            if self.coupled is not None:
                grad = grad.addcmul(param, _per_member(self.coupled, param))
            moment.lerp_(grad, _per_member(self.moment_weight, moment))
            squared.append(_squared_norms(moment))
        correction = self.correction[b]
        corrected = torch.stack(squared).double() / correction.square()  # tensors×K: ‖m̂‖² per tensor
        block = corrected if self.blocks_per_tensor else corrected.sum(0)
        coefficients = (-self.lrs[b] / ((block + self.rho) * correction)).float()
        for i, (param, moment) in enumerate(zip(params, state["exp_avg"])):
            if self.shrink is not None:
                param.mul_(_per_member(self.shrink[b], param))
            param.addcmul_(moment, _per_member(coefficients[i] if self.blocks_per_tensor else coefficients, param))
        return self._fisher_ratio(b, squared) if sample else None

    def _fisher_correction(self, b: int) -> Tensor:
        """(1 - β₁ᵗ)² of each member at batch ``b`` (K), as ``SOFIM.fisher_ratio()`` computes it:
        in float32, from a 0-dim step tensor (the vectorised float32 ``pow`` rounds otherwise)."""
        corrections = [(1 - group["beta1"] ** torch.tensor(float(step), device=self.lrs.device)).square() for group, step in zip(self.groups, self.step_numbers[b])]
        return torch.stack(corrections)

    def _fisher_ratio(self, b: int, squared: list[Tensor]) -> Tensor:
        """``SOFIM.fisher_ratio()`` of each member (K), in its float32 arithmetic and order of additions."""
        ratios = [s / self._fisher_correction(b) for s in squared]
        if self.blocks_per_tensor:
            # Members by rows, each a contiguous run of its tensors' ratios: mean() then adds them as for one trial.
            return (torch.stack(ratios) / self.rho.float()).T.contiguous().mean(1)
        block = ratios[0]
        for ratio in ratios[1:]:
            block = block + ratio
        return block / self.rho.float()


class _SgdUpdate(_Update):
    """``torch.optim.SGD`` with momentum (no dampening, no Nesterov), per member."""

    state = ("momentum_buffer",)

    def __init__(self, members: list[_Member], steps_per_epoch: int, device: torch.device) -> None:
        super().__init__(members, steps_per_epoch, device)
        self.negative_lrs = (-self.lrs).float()
        self.momentum = self.setting("momentum").float()
        self.decay = self.setting("weight_decay").float() if any(g["weight_decay"] for g in self.groups) else None

    def step(self, b: int, params: list[Tensor], grads: Sequence[Tensor], state: dict[str, list[Tensor]], *, sample: bool) -> Tensor | None:
        for param, grad, buffer in zip(params, grads, state["momentum_buffer"]):
            if self.decay is not None:
                grad = grad.addcmul(param, _per_member(self.decay, param))
            # From a zero buffer the first step gives the gradient itself, as torch's clone of it.
            buffer.mul_(_per_member(self.momentum, buffer)).add_(grad)
            param.addcmul_(buffer, _per_member(self.negative_lrs[b], param))
        return None


class _AdamWUpdate(_Update):
    """``torch.optim.AdamW`` (no AMSGrad), per member."""

    state = ("exp_avg", "exp_avg_sq")

    def __init__(self, members: list[_Member], steps_per_epoch: int, device: torch.device) -> None:
        super().__init__(members, steps_per_epoch, device)
        beta1, beta2 = self.tensor([g["betas"][0] for g in self.groups]), self.tensor([g["betas"][1] for g in self.groups])
        self.shrink = (1 - self.lrs * self.setting("weight_decay")).float()
        self.weight1, self.beta2, self.weight2 = (1 - beta1).float(), beta2.float(), (1 - beta2).float()
        self.negative_step_sizes = (-self.lrs / self.host_table(lambda group, step: 1 - group["betas"][0] ** step)).float()
        self.correction2_sqrt = self.host_table(lambda group, step: (1 - group["betas"][1] ** step) ** 0.5).float()
        self.eps = self.setting("eps").float()

    def step(self, b: int, params: list[Tensor], grads: Sequence[Tensor], state: dict[str, list[Tensor]], *, sample: bool) -> Tensor | None:
        for param, grad, moment, second in zip(params, grads, state["exp_avg"], state["exp_avg_sq"]):
            param.mul_(_per_member(self.shrink[b], param))
            moment.lerp_(grad, _per_member(self.weight1, moment))
            second.mul_(_per_member(self.beta2, second)).addcmul_(grad * _per_member(self.weight2, grad), grad)
            denominator = second.sqrt().div_(_per_member(self.correction2_sqrt[b], second)).add_(_per_member(self.eps, second))
            param.addcdiv_(moment * _per_member(self.negative_step_sizes[b], moment), denominator)
        return None


_UPDATES: dict[str, type[_Update]] = {"sofim": _SofimUpdate, "sofim-tensor": _SofimUpdate, "sgd-momentum": _SgdUpdate, "adamw": _AdamWUpdate}
