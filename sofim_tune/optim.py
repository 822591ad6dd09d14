"""SOFIM: stochastic optimization with the regularized Fisher information matrix.

Sen et al., 2024, "SOFIM: Stochastic Optimization Using Regularized Fisher Information
Matrix" (arXiv 2403.02833). For one block of parameters θ at step t with gradient g_t::

    m_t  = β1·m_{t−1} + (1 − β1)·g_t
    m̂_t  = m_t / (1 − β1^t)
    F_t  = m̂_t m̂_tᵀ + ρ·I
    θ_t  = θ_{t−1} − η·F_t⁻¹ m̂_t  =  θ_{t−1} − η·m̂_t / (ρ + ‖m̂_t‖²)      (Sherman–Morrison)

A block is one param group (``norm_scope="group"``, the paper's whole-vector SOFIM) or one
tensor (``norm_scope="tensor"``). The optimizer keeps one buffer per parameter, as SGD with
momentum does, and pays one extra reduction (the block norm) per step.

On an accelerator every scalar (step counts, bias corrections, norms) stays a tensor on
the parameter's device, so ``step()`` never synchronises with the host and can be captured
in a CUDA graph. On the CPU, where reading a scalar costs no synchronisation, the scalar
arithmetic runs on Python floats instead, as ``torch.optim.Adam`` does when not capturable.

A complex parameter steps exactly as its ``torch.view_as_real`` twin (so ‖m‖² = Σ|z|²). A
float16 or bfloat16 parameter keeps a float32 moment: in 16 bits the increment (1 − β1)(g − m)
rounds away long before m reaches g (with β1 = 0.999 a bfloat16 moment of g = 1 stalls at 0.25).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _device_has_foreach_support

from sofim_tune.errors import UserInputError

__all__ = ["SOFIM", "sofim"]

NormScope = Literal["group", "tensor"]
_NORM_SCOPES = ("group", "tensor")


_Rule = tuple[str, Callable[[Any], Any]]
_POSITIVE: _Rule = ("be > 0", lambda value: value > 0)
_NON_NEGATIVE: _Rule = ("be >= 0", lambda value: value >= 0)
_AVERAGE_WEIGHT: _Rule = ("lie in [0, 1)", lambda value: 0 <= value < 1)  # a weight of 1 never forgets

HYPERPARAMETER_DOMAINS: dict[str, _Rule] = {
    "lr": _POSITIVE,
    "rho": _POSITIVE,  # F = m̂m̂ᵀ + ρI is only invertible for ρ > 0
    "beta1": _AVERAGE_WEIGHT,
    "beta2": _AVERAGE_WEIGHT,
    "momentum": _AVERAGE_WEIGHT,
    "weight_decay": _NON_NEGATIVE,
}
"""What each hyperparameter of ``OPTIMIZER_HYPERPARAMETERS`` may be, besides finite: the rule of
trial configs, of :func:`build_optimizer` and of best.json (whose JSON Schema states it too).
SOFIM itself also takes lr = 0, as torch.optim does."""


def _rule_problem(value: Any, rule: _Rule) -> str | None:
    """What ``value`` must be and is not (``"be finite"``, ``"be > 0"``), or None when it obeys ``rule``.

    NaN is neither finite nor ordered, so it fails the first test. A tensor value must hold one
    element, whose reading syncs with its device: this runs when an optimizer is built, never per step.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        return "be a number"
    if not math.isfinite(value):
        return "be finite"
    return None if rule[1](value) else rule[0]


def hyperparameter_problem(name: str, value: Any, *, label: str | None = None) -> str | None:
    """Why ``value`` cannot be hyperparameter ``name`` (``"lr must be > 0, got 0.0"``), or None
    when it can (or when ``name`` has no rule). ``label`` names the value in the message instead
    of ``name`` (a search space's ``lr_over_rho``, which has lr's domain)."""
    rule = HYPERPARAMETER_DOMAINS.get(name)
    problem = None if rule is None else _rule_problem(value, rule)
    return None if problem is None else f"{label or name} must {problem}, got {value!r}"


def _check_hyperparameters(lr: Any, rho: Any, beta1: Any, weight_decay: Any, norm_scope: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")  # torch.optim's wording
    for label, value, rule in (
        ("learning rate lr", lr, _NON_NEGATIVE),
        ("regularization rho", rho, HYPERPARAMETER_DOMAINS["rho"]),
        ("beta1", beta1, HYPERPARAMETER_DOMAINS["beta1"]),
        ("weight_decay", weight_decay, HYPERPARAMETER_DOMAINS["weight_decay"]),
    ):
        problem = _rule_problem(value, rule)
        if problem is not None:
            raise UserInputError(f"Invalid {label}={value!r}: it must {problem}")
    if norm_scope not in _NORM_SCOPES:
        raise UserInputError(f"Invalid norm_scope={norm_scope!r}: expected one of {', '.join(_NORM_SCOPES)}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters, the parameter's own dtype above that (complex64
    for complex32). The dtype of the moment and of its norm's accumulation."""
    return torch.promote_types(dtype, torch.float32)


def _step_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a parameter's step count: real, float32 at least."""
    return _accumulation_dtype(dtype.to_real())


_FLAG_DEFAULTS: dict[str, Any] = dict(decoupled_weight_decay=False, norm_scope="group", bias_correction=True, maximize=False, foreach=None)
"""Group entries that state dicts of older versions may lack."""


class SOFIM(Optimizer):
    """SOFIM as a ``torch.optim`` optimizer.

    Args:
        params: parameters or param groups. Groups may set their own ``lr``, ``rho``,
            ``beta1`` and ``weight_decay``. Parameters may be real or complex; a complex
            tensor steps exactly as its ``torch.view_as_real`` twin. float16 and bfloat16
            parameters keep a float32 moment; the update is computed in float32 and then
            rounded to the parameter's dtype.
        lr: learning rate η, >= 0, a float or a 1-element tensor (of any shape; a tensor lr
            can be changed in place, and on an accelerator it is never read by the host).
            The step length η‖m̂‖/(ρ + ‖m̂‖²) never exceeds η/(2√ρ).
        rho: regularization ρ of the Fisher information, > 0. When ‖m̂‖² ≪ ρ the update is
            SGD with momentum at learning rate η/ρ, so (lr, rho) pairs with equal lr/rho
            behave alike.
        beta1: decay of the first moment, in [0, 1).
        weight_decay: λ >= 0. Added to the gradient as λθ before the moment (SGD's
            semantics), or, with ``decoupled_weight_decay=True``, applied as θ ← (1 − ηλ)θ
            (AdamW's semantics).
        norm_scope: ``"group"`` makes each param group one block (the paper's SOFIM);
            ``"tensor"`` makes each tensor its own block (block-diagonal Fisher).
        bias_correction: divide the moment by 1 − β1^t, as the paper and Adam do.
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor path. ``None`` picks it whenever the parameters are
            dense tensors on a device with foreach kernels.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        rho: float = 1.0,
        beta1: float = 0.9,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        norm_scope: NormScope = "group",
        bias_correction: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr, rho, beta1, weight_decay, norm_scope)
        defaults = dict(
            lr=lr,
            rho=rho,
            beta1=beta1,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            norm_scope=norm_scope,
            bias_correction=bias_correction,
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Checked before the group is added, so that a caught ValueError leaves no bad group behind.
        merged = {**self.defaults, **param_group}
        _check_hyperparameters(merged["lr"], merged["rho"], merged["beta1"], merged["weight_decay"], merged["norm_scope"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts every saved tensor but "step" to its parameter's dtype, which would
        # round the float32 moments of 16-bit parameters. This pre-hook runs last, after any
        # registered ones, and sets the saved moments aside for __setstate__.
        handle = self.register_load_state_dict_pre_hook(_set_aside_half_precision_moments)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self.__dict__.pop("_loaded_moments", None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.optim.Optimizer.load_state_dict calls this before its post-hooks, so that they
        # see, and may change, the final state; unpickling and copy.deepcopy call it too.
        super().__setstate__(state)
        loaded_moments: dict[Tensor, Tensor] = self.__dict__.pop("_loaded_moments", {})
        for group in self.param_groups:
            for key, default in _FLAG_DEFAULTS.items():
                group.setdefault(key, default)
            for param in group["params"]:
                param_state = self.state.get(param)
                if not param_state:
                    continue
                # torch.optim leaves "step" as saved: a tensor, often on the CPU, or a number.
                # It must be a tensor on the parameter's device for a sync-free step.
                step = param_state.get("step")
                if isinstance(step, Tensor):
                    if step.is_complex():  # saved by versions that counted complex parameters' steps in complex
                        step = step.real
                    param_state["step"] = step.to(device=param.device, dtype=_step_dtype(param.dtype))
                elif step is not None:
                    param_state["step"] = torch.tensor(float(step), dtype=_step_dtype(param.dtype), device=param.device)
                exp_avg = loaded_moments.get(param, param_state.get("exp_avg"))
                if isinstance(exp_avg, Tensor):
                    param_state["exp_avg"] = exp_avg.to(device=param.device, dtype=_accumulation_dtype(param.dtype))

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], steps: list[Tensor]
    ) -> None:
        # torch.compile recognises this name and signature (torch.optim's convention) and
        # runs the lazy state initialisation outside the traced graph.
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("SOFIM does not support sparse gradients")
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=_step_dtype(param.dtype), device=param.device)
                state["exp_avg"] = torch.zeros_like(param, dtype=_accumulation_dtype(param.dtype), memory_format=torch.preserve_format)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one SOFIM step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, steps)
            if params:
                _sofim_step(
                    params,
                    grads,
                    exp_avgs,
                    steps,
                    lr=group["lr"],
                    rho=group["rho"],
                    beta1=group["beta1"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    norm_scope=group["norm_scope"],
                    bias_correction=group["bias_correction"],
                    maximize=group["maximize"],
                    foreach=group["foreach"],
                )
        return loss

    @torch.no_grad()
    def fisher_ratio(self) -> Tensor | None:
        """‖m̂‖²/ρ of the current moments, averaged over the Fisher blocks; None before the first step.

        It says which regime the steps are in. Well below 1, the curvature term does nothing:
        the update is SGD with averaged momentum at rate η/ρ. Well above 1, it is a
        normalised step of length about η/‖m̂‖. A 0-dim float32 tensor on the first
        parameter's device, computed without reading anything back to the host.
        """
        ratios: list[Tensor] = []
        for group in self.param_groups:
            blocks: list[list[Tensor]] = []
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                moment = torch.view_as_real(state["exp_avg"]) if state["exp_avg"].is_complex() else state["exp_avg"]
                squared = _squared_norm(moment, _accumulation_dtype(moment.dtype)).float()
                if group["bias_correction"]:
                    squared = squared / (1 - group["beta1"] ** state["step"].float()).square()
                if group["norm_scope"] == "tensor" or not blocks:
                    blocks.append([])
                blocks[-1].append(squared)
            ratios += [sum(block) / group["rho"] for block in blocks]
        if not ratios:
            return None
        device = ratios[0].device
        return torch.stack([ratio.to(device) for ratio in ratios]).mean()


def _set_aside_half_precision_moments(optimizer: SOFIM, state_dict: dict[str, Any]) -> None:
    """load_state_dict pre-hook: the saved moments of 16-bit parameters, by parameter."""
    saved_state = state_dict["state"]
    saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
    params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
    moments = {}
    for saved_id, param in zip(saved_ids, params):
        saved = saved_state.get(saved_id)
        if param.dtype != _accumulation_dtype(param.dtype) and isinstance(saved, dict) and isinstance(saved.get("exp_avg"), Tensor):
            moments[param] = saved["exp_avg"]
    optimizer._loaded_moments = moments


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _foreach_supported(tensors: list[Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return True  # the compiler lowers foreach ops itself
    # Tensor subclasses (DTensor and friends) may not implement the foreach ops. Devices are
    # checked once each: this runs every step, for every parameter.
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors) and all(_device_has_foreach_support(d) for d in {t.device for t in tensors})


def sofim(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    rho: float,
    beta1: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    norm_scope: NormScope = "group",
    bias_correction: bool = True,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    """Functional SOFIM step over one block set (the tensors of one param group).

    ``exp_avgs`` and ``steps`` are updated in place; ``steps`` are 0-dim real tensors on each
    parameter's device. ``exp_avgs`` have the dtype of their parameter, float32 for 16-bit
    ones. ``lr`` is a float or a 1-element tensor. With ``norm_scope="group"`` all ``params``
    form one block. The hyperparameters are checked as :class:`SOFIM` checks them (a
    ``UserInputError`` for an infinite, NaN or out-of-range value), except a tensor ``lr``,
    whose reading would make every step wait for its device.
    """
    _check_hyperparameters(0.0 if isinstance(lr, Tensor) else lr, rho, beta1, weight_decay, norm_scope)
    _sofim_step(
        params, grads, exp_avgs, steps, lr=lr, rho=rho, beta1=beta1, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        norm_scope=norm_scope, bias_correction=bias_correction, maximize=maximize, foreach=foreach,
    )


def _sofim_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    rho: float,
    beta1: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    norm_scope: NormScope,
    bias_correction: bool,
    maximize: bool,
    foreach: bool | None,
) -> None:
    """:func:`sofim` without the checks: :class:`SOFIM` checked its groups when they were added."""
    if foreach is None:
        foreach = _foreach_supported(params)
    if isinstance(lr, Tensor) and lr.ndim != 0:
        lr = lr.reshape(())  # [1] or [1, 1] would broadcast the coefficients and the decay
    moment_weight_decay = 0.0 if decoupled_weight_decay else weight_decay
    if foreach:
        # Grouped once for both passes: the grouping costs as much as a foreach op.
        buckets = list(Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, steps], with_indices=True).values())
        _view_complex_buckets_as_real(buckets)
        squared_norms = _update_moments_foreach(buckets, len(params), beta1=beta1, weight_decay=moment_weight_decay, maximize=maximize)
        step_coefficients = _host_step_coefficients if _scalars_on_host(buckets, lr) else _step_coefficients
    else:
        if any(map(Tensor.is_complex, params)):
            params, grads, exp_avgs = _as_real(params), _as_real(grads), _as_real(exp_avgs)
        squared_norms = _update_moments_loop(params, grads, exp_avgs, steps, beta1=beta1, weight_decay=moment_weight_decay, maximize=maximize)
        step_coefficients = _step_coefficients
    coefficients = step_coefficients(
        steps, squared_norms, lr=lr, rho=rho, beta1=beta1, norm_scope=norm_scope, bias_correction=bias_correction
    )
    # Decided on plain Python values: lr may be a tensor, and a branch on it would sync.
    decay = 1.0 - lr * weight_decay if decoupled_weight_decay and weight_decay != 0.0 else None
    if foreach:
        _apply_update_foreach(buckets, coefficients, decay=decay)
    else:
        _apply_update_loop(params, exp_avgs, coefficients, decay=decay)


def _as_real(tensors: list[Tensor]) -> list[Tensor]:
    """Complex tensors as their real views (a trailing dimension of 2): on these every op of
    the step, the norm Σ|z|² included, is the one of the real twin."""
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def _view_complex_buckets_as_real(buckets: _Buckets) -> None:
    compiling = torch.compiler.is_compiling()
    for position, ((dev_params, dev_grads, dev_exp_avgs, dev_steps), indices) in enumerate(buckets):
        # A bucket holds one dtype, but under torch.compile there is a single bucket of all tensors.
        if compiling or torch.is_complex(dev_params[0]):
            buckets[position] = ((_as_real(dev_params), _as_real(dev_grads), _as_real(dev_exp_avgs), dev_steps), indices)


def _step_coefficients(
    steps: list[Tensor],
    squared_norms: list[Tensor],
    *,
    lr: float | Tensor,
    rho: float,
    beta1: float,
    norm_scope: NormScope,
    bias_correction: bool,
) -> list[Tensor]:
    """Per tensor c with θ ← θ − c·m, from the raw squared moment norms ‖m‖².

    All scalars are stacked into one vector so that the arithmetic is a handful of
    vector ops instead of a few per tensor.
    """
    devices = {s.device for s in squared_norms}
    one_device = len(devices) == 1
    device = squared_norms[0].device
    # .to() per tensor only when a group spans devices: 60 no-op calls cost more than the math.
    moment_sq = torch.stack(squared_norms if one_device else [s.to(device) for s in squared_norms])
    if bias_correction:
        step_vector = torch.stack(steps if one_device else [s.to(device) for s in steps]).to(moment_sq.dtype)
        correction = 1.0 - torch.pow(beta1, step_vector)
        corrected_sq = moment_sq / correction.square()
    else:
        correction = None
        corrected_sq = moment_sq
    block_sq = corrected_sq.sum() if norm_scope == "group" else corrected_sq
    # η·m̂/(ρ + ‖m̂‖²) with m̂ = m/(1 − β1^t): the bias correction folds into the coefficient.
    denominator = block_sq + rho
    if correction is not None:
        denominator = denominator * correction
    coefficients = (lr / denominator).expand_as(moment_sq).unbind()
    return list(coefficients) if one_device else [c.to(s.device) for c, s in zip(coefficients, steps)]


def _scalars_on_host(buckets: _Buckets, lr: float | Tensor) -> bool:
    """Whether the step's scalars can be Python floats: all tensors on the CPU, where reading
    a scalar costs no synchronisation, and no compiler tracing (``.item()`` breaks its graph)."""
    return not isinstance(lr, Tensor) and not torch.compiler.is_compiling() and all(tensors[0][0].is_cpu for tensors, _ in buckets)


def _host_step_coefficients(
    steps: list[Tensor],
    squared_norms: list[Tensor],
    *,
    lr: float,
    rho: float,
    beta1: float,
    norm_scope: NormScope,
    bias_correction: bool,
) -> list[float]:
    """:func:`_step_coefficients` in Python floats (float64), for CPU tensors.

    A dozen ops on 0-dim tensors cost about twice the float arithmetic, and a uniform
    coefficient lets the update use a plain scaled add.
    """
    corrections = [1.0 - beta1 ** step.item() for step in steps] if bias_correction else [1.0] * len(steps)
    corrected_sq = [squared.item() / (correction * correction) for squared, correction in zip(squared_norms, corrections)]
    if norm_scope == "group":
        block_sq = sum(corrected_sq)
        return [lr / ((block_sq + rho) * correction) for correction in corrections]
    return [lr / ((squared + rho) * correction) for squared, correction in zip(corrected_sq, corrections)]


def _squared_norm(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """‖t‖², accumulated in ``dtype`` (``_accumulation_dtype(tensor.dtype)``, passed in
    because callers know it for a whole list and this runs for every tensor).

    On the CPU the reduction, not memory, limits the norm kernel; BLAS dot reads the same
    bytes about 25% faster.
    """
    if tensor.dtype == dtype and tensor.is_cpu and tensor.is_contiguous():
        # 1-D tensors (biases, norm weights: most tensors of a typical model) need no view.
        flat = tensor if tensor.ndim == 1 else tensor.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(tensor, dtype=dtype).square()


def _update_moments_loop(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], steps: list[Tensor], *, beta1: float, weight_decay: float, maximize: bool
) -> list[Tensor]:
    squared_norms = []
    for param, grad, exp_avg, step in zip(params, grads, exp_avgs, steps):
        dtype = exp_avg.dtype
        if grad.dtype != dtype:
            grad = grad.to(dtype)  # the float32 moment of a 16-bit parameter
        if maximize:
            grad = -grad
        if weight_decay != 0.0:
            grad = grad.add(param, alpha=weight_decay)
        step.add_(1)
        exp_avg.lerp_(grad, 1.0 - beta1)
        squared_norms.append(_squared_norm(exp_avg, _accumulation_dtype(dtype)))
    return squared_norms


def _apply_update_loop(params: list[Tensor], exp_avgs: list[Tensor], coefficients: list[Tensor], *, decay: float | Tensor | None) -> None:
    for param, exp_avg, coefficient in zip(params, exp_avgs, coefficients):
        if decay is not None:
            param.mul_(decay)
        param.addcmul_(exp_avg, coefficient, value=-1.0)


_Buckets = list[tuple[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]], list[int]]]
"""(params, grads, exp_avgs, steps) of one device and dtype, with their indices in the group."""


def _has_multi_tensor_kernels(tensor: Tensor) -> bool:
    """Whether foreach ops on this tensor's device launch one kernel for many tensors. On the
    CPU they loop over the tensors one op at a time, as Python would."""
    return not tensor.is_cpu


def _update_moments_foreach(buckets: _Buckets, count: int, *, beta1: float, weight_decay: float, maximize: bool) -> list[Tensor]:
    squared_norms: list[Tensor] = [torch.empty(0)] * count
    compiling = torch.compiler.is_compiling()
    for (dev_params, dev_grads, dev_exp_avgs, dev_steps), indices in buckets:
        if compiling or dev_grads[0].dtype != dev_exp_avgs[0].dtype:
            # The float32 moments of 16-bit parameters (one bucket of all dtypes when compiling).
            dev_grads = [grad.to(exp_avg.dtype) for grad, exp_avg in zip(dev_grads, dev_exp_avgs)]
        if maximize:
            dev_grads = torch._foreach_neg(dev_grads)
        if weight_decay != 0.0:
            dev_grads = torch._foreach_add(dev_grads, dev_params, alpha=weight_decay)
        dtype = _accumulation_dtype(dev_exp_avgs[0].dtype)
        if _has_multi_tensor_kernels(dev_exp_avgs[0]):
            torch._foreach_add_(dev_steps, 1.0)
            torch._foreach_lerp_(dev_exp_avgs, dev_grads, 1.0 - beta1)
            norms = torch._foreach_norm(dev_exp_avgs, 2, dtype=dtype)
            for index, squared in zip(indices, torch._foreach_mul(norms, norms)):
                squared_norms[index] = squared
            continue
        # A per-tensor loop anyway: a scalar wrapped into a tensor once costs a quarter of a
        # Python scalar wrapped per tensor (torch.optim.Adam does the same).
        torch._foreach_add_(dev_steps, torch.tensor(1.0), alpha=1.0)
        # Nothing is lost by a loop here, and the norm of a moment taken right after its lerp
        # reads part of it from cache: 5-10% off the moment pass of a ResNet-18 on two cores.
        for index, exp_avg, grad in zip(indices, dev_exp_avgs, dev_grads):
            exp_avg.lerp_(grad, 1.0 - beta1)
            squared_norms[index] = _squared_norm(exp_avg, dtype)
    return squared_norms


def _apply_update_foreach(buckets: _Buckets, coefficients: list[Tensor] | list[float], *, decay: float | Tensor | None) -> None:
    for (dev_params, _, dev_exp_avgs, _), indices in buckets:
        if decay is not None:
            torch._foreach_mul_(dev_params, decay)
        dev_coefficients = [coefficients[i] for i in indices]
        first = dev_coefficients[0]
        if isinstance(first, float):
            if dev_coefficients.count(first) == len(dev_coefficients):
                # One block whose tensors share a step count: the common case of norm_scope="group".
                torch._foreach_add_(dev_params, dev_exp_avgs, alpha=-first)
                continue
            dev_coefficients = list(torch.tensor(dev_coefficients, dtype=torch.float64).unbind())
        torch._foreach_addcmul_(dev_params, dev_exp_avgs, dev_coefficients, value=-1.0)


OPTIMIZER_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "sofim": ("lr", "rho", "beta1", "weight_decay"),
    "sofim-tensor": ("lr", "rho", "beta1", "weight_decay"),
    "sgd-momentum": ("lr", "momentum", "weight_decay"),
    "adamw": ("lr", "beta1", "beta2", "weight_decay"),
}
"""Hyperparameters each optimizer takes, by the names that search spaces and best.json use."""

REQUIRED_HYPERPARAMETERS: tuple[str, ...] = ("lr",)
"""What :func:`build_optimizer` needs for every optimizer: no learning rate suits every model, so
none is assumed; every other hyperparameter has the optimizer's usual default."""


def optimizer_names() -> list[str]:
    return list(OPTIMIZER_HYPERPARAMETERS)


def build_optimizer(name: str, params: Iterable[Tensor], hyperparameters: dict[str, float], *, decoupled_weight_decay: bool = False) -> Optimizer:
    """SOFIM or a torch.optim baseline, from the hyperparameter names of ``OPTIMIZER_HYPERPARAMETERS``.

    ``sofim-tensor`` is SOFIM with ``norm_scope="tensor"`` (a Fisher block per tensor).
    Baselines compare SOFIM at an equal budget: ``sgd-momentum`` is ``torch.optim.SGD`` with
    momentum (default 0.9), ``adamw`` is ``torch.optim.AdamW`` (beta2 default 0.999).
    ``decoupled_weight_decay`` is SOFIM's choice of coupling (AdamW always decouples, SGD
    never does). Raises ValueError for an unknown optimizer or hyperparameter, and
    ``UserInputError`` (a ValueError) for a missing one (``REQUIRED_HYPERPARAMETERS``) or a
    value outside ``HYPERPARAMETER_DOMAINS``.
    """
    if name not in OPTIMIZER_HYPERPARAMETERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_HYPERPARAMETERS)}")
    unknown = set(hyperparameters) - set(OPTIMIZER_HYPERPARAMETERS[name])
    if unknown:
        raise ValueError(f"optimizer {name!r} takes no {', '.join(sorted(unknown))}")
    missing = [key for key in REQUIRED_HYPERPARAMETERS if key not in hyperparameters]
    if missing:
        raise UserInputError(f"optimizer {name!r} needs {', '.join(missing)}, which was not given")
    for key, value in hyperparameters.items():
        problem = hyperparameter_problem(key, value)
        if problem is not None:
            raise UserInputError(problem)
    hp = dict(hyperparameters)
    if name in ("sofim", "sofim-tensor"):
        # sofim-tensor: every tensor its own Fisher block instead of the paper's whole vector.
        return SOFIM(params, **hp, decoupled_weight_decay=decoupled_weight_decay, norm_scope="tensor" if name == "sofim-tensor" else "group")
    if decoupled_weight_decay and name == "sgd-momentum":
        raise ValueError("torch.optim.SGD adds weight decay to the gradient; it has no decoupled form")
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp.get("momentum", 0.9), weight_decay=hp.get("weight_decay", 0.0))
    return torch.optim.AdamW(
        params, lr=hp["lr"], betas=(hp.get("beta1", 0.9), hp.get("beta2", 0.999)), weight_decay=hp.get("weight_decay", 0.01)
    )
