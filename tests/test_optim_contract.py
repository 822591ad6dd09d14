"""SOFIM's OptimizerInfo, and the generic behaviours of torch.optim optimizers that it enables.

Modelled on ``optim_db`` in torch/testing/_internal/common_optimizers.py and on PyTorch's
test/test_optim.py. Neither can be used here (the former imports torch's test-only
dependencies, the latter is not installed), so the classes below have the fields of
torch's, and the tests re-implement the key generic checks compactly, on the CPU. Each
config runs on the three step paths: the loop (``foreach=False``), the CPU foreach path,
and, emulated on the CPU, the foreach path of accelerators (scalars kept as tensors).
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pytest
import torch
from torch.nn import Parameter

from sofim_tune import SOFIM, optim

# ---------------------------------------------------------------------------------------------
# The OptimizerInfo machinery, with the fields of torch.testing._internal.common_optimizers.


@dataclass
class OptimizerInput:
    """Args and kwargs of an optimizer constructor; ``params=None`` lets the test provide them."""

    params: Any
    kwargs: dict[str, Any]
    desc: str = ""


class OptimizerErrorEnum(Enum):
    CONSTRUCTION_ERROR = 0
    STEP_ERROR = 1


@dataclass
class ErrorOptimizerInput:
    optimizer_error_input: OptimizerInput
    error_on: OptimizerErrorEnum = OptimizerErrorEnum.CONSTRUCTION_ERROR
    error_type: type[BaseException] | type[Warning] = RuntimeError
    error_regex: str = ""


@dataclass
class OptimizerInfo:
    optim_cls: type[torch.optim.Optimizer]
    optim_inputs_func: Callable[..., list[OptimizerInput]]
    optim_error_inputs_func: Callable[..., list[ErrorOptimizerInput]]
    # Of the global-cliquey flags (foreach, fused, differentiable), the ones supported.
    supported_impls: tuple[str, ...] = ("foreach", "differentiable")
    supports_sparse: bool = False
    has_capturable_arg: bool = False
    supports_complex: bool = True
    step_requires_closure: bool = False
    supports_param_groups: bool = True
    supports_multiple_devices: bool = True
    supports_fused_on: tuple[str, ...] = ()
    scheduler_inputs: tuple[Callable[[torch.optim.Optimizer], Any], ...] = field(default=())

    @property
    def name(self) -> str:
        return self.optim_cls.__name__


def optim_inputs_func_sofim(device: str, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """Constructor configs without the global-cliquey flags, which the tests add themselves."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.05}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.02)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "rho": 0.1}, desc="small rho"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "beta1": 0.5}, desc="beta1"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "beta1": 0.0}, desc="no momentum"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"),
        OptimizerInput(
            params=None, kwargs={"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True}, desc="decoupled weight_decay"
        ),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "norm_scope": "tensor"}, desc="tensor norm_scope"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"bias_correction": False}, desc="no bias correction"),
    ]


def _error(kwargs: dict[str, Any], desc: str, regex: str, error_type: type = ValueError, params: Any = None, **more: Any) -> ErrorOptimizerInput:
    return ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs, desc=desc), error_type=error_type, error_regex=regex, **more)


def optim_error_inputs_func_sofim(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    sample = Parameter(torch.randn(1, 1, device=device, dtype=dtype))
    sample2 = Parameter(torch.randn(1, 1, device=device, dtype=dtype))
    sparse = torch.nn.Embedding(4, 2, sparse=True)
    sparse(torch.tensor([1])).sum().backward()
    return [
        # torch's get_error_inputs_for_all_optims
        _error({}, "invalid param type", "params argument given to the optimizer should be an iterable of Tensors or dicts", TypeError, params=sample),
        _error({}, "duplicate parameters in a group", ".*a parameter group with duplicate parameters.*", UserWarning, params=[sample, sample]),
        _error({}, "duplicate parameters across groups", "some parameters appear in more than one parameter group", params=[{"params": sample}, {"params": sample}]),
        _error({"lr": torch.tensor([0.001, 0.001])}, "Tensor lr must be 1-element", "^Tensor lr must be 1-element$"),
        _error({}, "names on some params only", "all optimizer params should be with/without names", params=[("weight", sample), sample2]),
        # SOFIM's own
        _error({"lr": -0.01}, "negative lr", r"^Invalid learning rate lr=-0\.01: it must be >= 0$"),
        _error({"lr": torch.tensor(-0.01)}, "negative tensor lr", r"^Invalid learning rate lr=tensor\(-0\.0100\)"),
        _error({"lr": float("nan")}, "NaN lr", "^Invalid learning rate lr=nan"),
        _error({"lr": float("inf")}, "infinite lr", r"^Invalid learning rate lr=inf: it must be finite$"),
        _error({"lr": torch.tensor(float("inf"))}, "infinite tensor lr", r"^Invalid learning rate lr=tensor\(inf\): it must be finite$"),
        _error({"rho": float("inf")}, "infinite rho", r"^Invalid regularization rho=inf: it must be finite$"),
        _error({"weight_decay": float("inf")}, "infinite weight_decay", r"^Invalid weight_decay=inf: it must be finite$"),
        _error({"rho": 0.0}, "rho must be > 0", r"^Invalid regularization rho=0\.0: it must be > 0$"),
        _error({"rho": -1.0}, "negative rho", r"^Invalid regularization rho=-1\.0"),
        _error({"beta1": 1.0}, "beta1 must be < 1", r"^Invalid beta1=1\.0: it must lie in \[0, 1\)$"),
        _error({"beta1": -0.1}, "negative beta1", r"^Invalid beta1=-0\.1"),
        _error({"weight_decay": -0.1}, "negative weight_decay", r"^Invalid weight_decay=-0\.1: it must be >= 0$"),
        _error({"norm_scope": "layer"}, "unknown norm_scope", r"^Invalid norm_scope='layer': expected one of group, tensor$"),
        _error({"capturable": True}, "no capturable argument", "unexpected keyword argument 'capturable'", TypeError),
        _error({"fused": True}, "no fused implementation", "unexpected keyword argument 'fused'", TypeError),
        _error(
            {},
            "sparse gradients",
            "SOFIM does not support sparse gradients",
            RuntimeError,
            params=list(sparse.parameters()),
            error_on=OptimizerErrorEnum.STEP_ERROR,
        ),
    ]


SOFIM_INFO = OptimizerInfo(
    SOFIM,
    optim_inputs_func=optim_inputs_func_sofim,
    optim_error_inputs_func=optim_error_inputs_func_sofim,
    supported_impls=("foreach",),
    supports_sparse=False,
    has_capturable_arg=False,
    supports_complex=True,
    supports_fused_on=(),
    scheduler_inputs=(
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, gamma=0.5, step_size=2),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4),
    ),
)
optim_db = [SOFIM_INFO]

PATHS = ("loop", "foreach", "foreach-as-on-accelerators")


def optim_inputs_with_impls(info: OptimizerInfo, device: str = "cpu", dtype: torch.dtype | None = None) -> list[tuple[OptimizerInput, str]]:
    """Each config on each step path: torch's _get_optim_inputs_including_global_cliquey_kwargs
    (foreach False, then True), plus the emulated accelerator path."""
    assert info.supported_impls == ("foreach",)
    out = []
    for optim_input in info.optim_inputs_func(device, dtype):
        for path in PATHS:
            kwargs = {**copy.deepcopy(optim_input.kwargs), "foreach": path != "loop"}
            out.append((OptimizerInput(None, kwargs, f"{optim_input.desc} & {path}"), path))
    return out


CONFIGS = SOFIM_INFO.optim_inputs_func("cpu")
CONFIGS_ON_PATHS = optim_inputs_with_impls(SOFIM_INFO)


def _ids(items: list[Any]) -> list[str]:
    return [(item[0] if isinstance(item, tuple) else item).desc.replace(" ", "_") for item in items]


def emulate_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerators' foreach code, on the CPU: multi-tensor lerp and norm, scalars as tensors."""
    if path == "foreach-as-on-accelerators":
        monkeypatch.setattr(optim, "_has_multi_tensor_kernels", lambda tensor: True)
        monkeypatch.setattr(optim, "_scalars_on_host", lambda buckets, lr: False)


def with_lr(kwargs: dict[str, Any], lr: Any) -> dict[str, Any]:
    return {**kwargs, "lr": lr}


# ---------------------------------------------------------------------------------------------
# A small model as a list of parameters (an MLP with a scalar gain), its loss and training loop.

SHAPES = [(5, 4), (5,), (3, 5), (3,), ()]


def model_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [Parameter((0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)) for s in SHAPES]


_X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def model_loss(params: list[torch.Tensor]) -> torch.Tensor:
    w1, b1, w2, b2, gain = (p.to(torch.float64) for p in params)
    hidden = torch.tanh(_X @ w1.T + b1)
    out = gain * (hidden @ w2.T) + b2
    return (out - 0.3).square().mean() + 0.1 * torch.sin(out).sum()


def train(opt: torch.optim.Optimizer, params: list[Parameter], steps: int, start: int = 0, scheduler: Any = None) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        model_loss(params).backward()
        if step % 3 == 2:
            params[-1].grad = None  # a tensor without a gradient now and then
        opt.step()
        if scheduler is not None:
            scheduler.step()


def values(params: list[Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e), (a, e)


STEPS = 6

# ---------------------------------------------------------------------------------------------
# The declared OptimizerInfo itself.


def test_the_info_declares_what_sofim_supports():
    info = SOFIM_INFO
    assert info.name == "SOFIM" and optim_db == [info]
    p = Parameter(torch.zeros(2))
    for impl in ("foreach", "fused", "differentiable", "capturable"):
        supported = impl in info.supported_impls or (impl == "capturable" and info.has_capturable_arg)
        if supported:
            info.optim_cls([p], **{impl: True})
        else:
            with pytest.raises(TypeError):
                info.optim_cls([p], **{impl: True})
    assert info.supports_complex and not info.supports_sparse and not info.step_requires_closure
    descs = [c.desc for c in info.optim_inputs_func("cpu")]
    assert len(descs) == len(set(descs))
    assert not any(k in c.kwargs for c in info.optim_inputs_func("cpu") for k in ("foreach", "fused", "differentiable"))


@pytest.mark.parametrize("error_input", SOFIM_INFO.optim_error_inputs_func("cpu", torch.float32), ids=lambda e: e.optimizer_error_input.desc.replace(" ", "_"))
def test_errors(error_input: ErrorOptimizerInput):
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(1))]
    if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt = SOFIM_INFO.optim_cls(params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            opt.step()
    elif issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            SOFIM_INFO.optim_cls(params, **optim_input.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            SOFIM_INFO.optim_cls(params, **optim_input.kwargs)


def test_a_bad_param_group_raises_and_is_not_added():
    opt = SOFIM([Parameter(torch.zeros(2))])
    for error_input in SOFIM_INFO.optim_error_inputs_func("cpu", torch.float32):
        kwargs = error_input.optimizer_error_input.kwargs
        if error_input.error_type is not ValueError or error_input.optimizer_error_input.params is not None:
            continue
        with pytest.raises(ValueError, match=error_input.error_regex):
            opt.add_param_group({"params": [Parameter(torch.zeros(2))], **kwargs})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------------------------
# Generic behaviours, for every config.


@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_foreach_matches_forloop(config: OptimizerInput, monkeypatch: pytest.MonkeyPatch):
    """torch's test_foreach_matches_forloop: all three paths, in float64, to rounding."""
    results = {}
    for path in PATHS:
        with monkeypatch.context() as patch:
            emulate_path(path, patch)
            params = model_params()
            opt = SOFIM(params, **config.kwargs, foreach=path != "loop")
            train(opt, params, STEPS)
            results[path] = (values(params), [opt.state[p]["exp_avg"].clone() for p in params])
    for path in PATHS[1:]:
        for a, b in zip(results[path][0] + results[path][1], results["loop"][0] + results["loop"][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS, ids=_ids(CONFIGS_ON_PATHS))
def test_complex_matches_view_as_real(config: OptimizerInput, path: str, monkeypatch: pytest.MonkeyPatch):
    """torch's test_complex: complex parameters (mixed with a real one in the same group) step
    exactly as their torch.view_as_real twins do."""
    emulate_path(path, monkeypatch)
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(3, 4, generator=gen, dtype=torch.complex64), torch.randn(5, generator=gen), torch.randn(2, generator=gen, dtype=torch.complex64)]
    targets = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in start]
    complex_params = [Parameter(t.clone()) for t in start]
    real_params = [Parameter(torch.view_as_real(t).clone() if t.is_complex() else t.clone()) for t in start]

    def loss(params: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for i, (p, target) in enumerate(zip(params, targets)):
            diff = p - target
            squared = diff.real.square() + diff.imag.square() if diff.is_complex() else diff.square()
            total = total + (i + 1) * squared.sum() + 0.1 * squared.square().sum()
        return total

    complex_opt = SOFIM(complex_params, **config.kwargs)
    real_opt = SOFIM(real_params, **copy.deepcopy(config.kwargs))
    for _ in range(STEPS):
        complex_opt.zero_grad()
        real_opt.zero_grad()
        loss(complex_params).backward()
        loss([torch.view_as_complex(p) if p.ndim == q.ndim + 1 else p for p, q in zip(real_params, complex_params)]).backward()
        complex_opt.step()
        real_opt.step()
    for c, r in zip(complex_params, real_params):
        assert torch.equal(torch.view_as_real(c.detach()) if c.is_complex() else c.detach(), r.detach())
        assert torch.equal(torch.view_as_real(complex_opt.state[c]["exp_avg"]) if c.is_complex() else complex_opt.state[c]["exp_avg"], real_opt.state[r]["exp_avg"])


@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS, ids=_ids(CONFIGS_ON_PATHS))
def test_state_dict_resume_equals_uninterrupted(config: OptimizerInput, path: str, monkeypatch: pytest.MonkeyPatch):
    """torch's test_state_dict_deterministic, plus resuming from a pickled state dict."""
    emulate_path(path, monkeypatch)
    params = model_params()
    opt = SOFIM(params, **config.kwargs)
    train(opt, params, 2 * STEPS)
    uninterrupted = values(params)

    params = model_params()
    opt = SOFIM(params, **copy.deepcopy(config.kwargs))
    train(opt, params, STEPS)
    saved_params = values(params)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    assert saved["param_groups"][0]["foreach"] == config.kwargs["foreach"]

    params = model_params(seed=5)
    with torch.no_grad():
        for p, v in zip(params, saved_params):
            p.copy_(v)
    resumed = SOFIM(params, lr=0.5)  # every saved group entry replaces the constructor's
    resumed.load_state_dict(saved)
    state_dict = resumed.state_dict()
    for key, value in saved["param_groups"][0].items():
        loaded = state_dict["param_groups"][0][key]
        assert torch.equal(loaded, value) if isinstance(value, torch.Tensor) else loaded == value
    train(resumed, params, STEPS, start=STEPS)
    assert_equal(values(params), uninterrupted)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_deepcopy_steps_like_the_original(config: OptimizerInput):
    """copy.deepcopy (and unpickling) goes through __setstate__: the copy steps as the original."""
    params = model_params()
    opt = SOFIM(params, **config.kwargs)
    train(opt, params, 2)
    copied = copy.deepcopy({"params": params, "opt": opt})  # together, so the state is keyed by the copied params
    copied_params, copied_opt = copied["params"], copied["opt"]
    assert all(copied_opt.state[q]["exp_avg"] is not opt.state[p]["exp_avg"] for p, q in zip(params, copied_params))
    train(opt, params, 3, start=2)
    train(copied_opt, copied_params, 3, start=2)
    assert_equal(values(copied_params), values(params))


@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS[::2], ids=_ids(CONFIGS_ON_PATHS[::2]))
def test_load_state_dict_post_hook_sees_the_final_state(config: OptimizerInput, path: str, monkeypatch: pytest.MonkeyPatch):
    """torch's test_load_state_dict_post_hook: a post hook sees the state that the next step
    uses (step counts as tensors on the parameter's device, float32 moments for 16-bit
    parameters), and what it changes stays changed."""
    emulate_path(path, monkeypatch)
    params = [Parameter(p.detach().to(torch.bfloat16) if i == 1 else p.detach()) for i, p in enumerate(model_params())]
    opt = SOFIM(params, **config.kwargs)
    train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        if "step" in state:
            state["step"] = int(state["step"].item())  # as an old or hand-written checkpoint holds it
    saved["state"]["run"] = {"epoch": 3}  # a key that is no parameter: kept as is
    seen = {}

    def post_hook(optimizer: torch.optim.Optimizer) -> None:
        for p in params:
            state = optimizer.state[p]
            seen[p] = (state["step"].dtype, state["step"].device, state["exp_avg"].dtype)
        optimizer.state[params[0]]["exp_avg"].zero_()
        optimizer.state["hook"] = "ran"

    fresh = SOFIM(params, **copy.deepcopy(config.kwargs))
    fresh.register_load_state_dict_post_hook(post_hook)
    fresh.load_state_dict(saved)
    for p in params:
        real = torch.float64 if p.dtype == torch.float64 else torch.float32
        assert seen[p] == (real, p.device, real)
        assert torch.equal(fresh.state[p]["exp_avg"], torch.zeros_like(p, dtype=real) if p is params[0] else opt.state[p]["exp_avg"])
    assert fresh.state["run"] == {"epoch": 3} and fresh.state["hook"] == "ran"
    train(fresh, params, 1, start=2)


@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS, ids=_ids(CONFIGS_ON_PATHS))
def test_tensor_lr_of_each_shape_equals_float_lr(config: OptimizerInput, path: str, monkeypatch: pytest.MonkeyPatch):
    """torch's test_tensor_lr: a 1-element tensor lr of any shape steps as the float."""
    emulate_path(path, monkeypatch)
    lr = float(config.kwargs.get("lr", 1e-2))
    params = model_params()
    opt = SOFIM(params, **with_lr(config.kwargs, lr))
    train(opt, params, STEPS)
    expected = values(params)
    for shape in [(), (1,), (1, 1)]:
        params = model_params()
        lr_tensor = torch.full(shape, lr, dtype=torch.float64)
        opt = SOFIM(params, **with_lr(config.kwargs, lr_tensor))
        train(opt, params, STEPS)
        assert opt.param_groups[0]["lr"] is lr_tensor
        for a, e in zip(values(params), expected):
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("make_scheduler", SOFIM_INFO.scheduler_inputs, ids=["StepLR", "LinearLR"])
@pytest.mark.parametrize("path", PATHS)
def test_schedulers_drive_a_tensor_lr_as_a_float_one(make_scheduler: Callable, path: str, monkeypatch: pytest.MonkeyPatch):
    emulate_path(path, monkeypatch)
    results = []
    for lr in (0.05, torch.tensor([[0.05]], dtype=torch.float64)):
        params = model_params()
        opt = SOFIM(params, lr=lr, foreach=path != "loop")
        train(opt, params, STEPS, scheduler=make_scheduler(opt))
        results.append(values(params))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS[::3], ids=_ids(CONFIGS_ON_PATHS[::3]))
def test_param_groups_with_different_configs_step_as_separate_optimizers(config: OptimizerInput, path: str, monkeypatch: pytest.MonkeyPatch):
    """torch's test_param_groups_lr / test_param_groups_weight_decay: each group is its own block."""
    emulate_path(path, monkeypatch)
    overrides = {"lr": torch.tensor(0.03, dtype=torch.float64), "rho": 2.0, "beta1": 0.7, "weight_decay": 0.05}
    params = model_params()
    opt = SOFIM([{"params": params[:2]}, {"params": params[2:], **overrides}], **config.kwargs)
    train(opt, params, STEPS)

    separate = model_params()
    first = SOFIM(separate[:2], **copy.deepcopy(config.kwargs))
    second = SOFIM(separate[2:], **{**copy.deepcopy(config.kwargs), **overrides})
    for step in range(STEPS):
        first.zero_grad()
        second.zero_grad()
        model_loss(separate).backward()
        if step % 3 == 2:
            separate[-1].grad = None
        first.step()
        second.step()
    assert_equal(values(params), values(separate))


@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS, ids=_ids(CONFIGS_ON_PATHS))
def test_params_without_grads_are_skipped(config: OptimizerInput, path: str, monkeypatch: pytest.MonkeyPatch):
    """torch's test_step_is_noop_when_params_have_no_grad, and empty tensors: untouched, no state,
    and the others step as if they were not there."""
    emulate_path(path, monkeypatch)
    params = model_params()
    opt = SOFIM(params, **config.kwargs)
    train(opt, params, STEPS)

    others = model_params()
    no_grad, empty = Parameter(torch.ones(3, dtype=torch.float64)), Parameter(torch.zeros(0, 2, dtype=torch.float64))
    opt = SOFIM([*others, no_grad, empty], **copy.deepcopy(config.kwargs))
    opt.step()  # no gradients at all: nothing happens
    assert not opt.state
    for step in range(STEPS):
        opt.zero_grad()
        model_loss(others).backward()
        empty.grad = torch.zeros_like(empty)
        if step % 3 == 2:
            others[-1].grad = None
        opt.step()
    assert_equal(values(others), values(params))
    assert torch.equal(no_grad.detach(), torch.ones(3, dtype=torch.float64)) and no_grad not in opt.state
    assert empty.shape == (0, 2) and opt.state[empty]["step"].item() == STEPS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("config", "path"), CONFIGS_ON_PATHS, ids=_ids(CONFIGS_ON_PATHS))
def test_half_precision_params_track_float32(config: OptimizerInput, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch):
    """16-bit parameters keep their dtype and float32 moments, and their displacement follows
    the float32 run's to within a few roundings of their dtype (a stalled θ would be off by 1)."""
    emulate_path(path, monkeypatch)
    kwargs = copy.deepcopy(config.kwargs)
    kwargs["lr"] = kwargs.get("lr", 1e-2) * 20  # moves of ~0.01-0.05 per element: many roundings of θ
    runs = {}
    for run_dtype in (torch.float32, dtype):
        params = model_params(run_dtype)
        start = [p.detach().float().clone() for p in params]
        opt = SOFIM(params, **kwargs)
        train(opt, params, STEPS)
        displacement = torch.cat([(p.detach().float() - s).flatten() for p, s in zip(params, start)])
        runs[run_dtype] = (params, opt, displacement)
    (reference, reference_opt, expected), (half, half_opt, actual) = runs[torch.float32], runs[dtype]
    eps = torch.finfo(dtype).eps
    assert (actual - expected).norm() <= 8 * eps * expected.norm()
    for p, q in zip(half, reference):
        state = half_opt.state[p]
        assert p.dtype == dtype and state["exp_avg"].dtype == torch.float32 and state["step"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"], reference_opt.state[q]["exp_avg"], rtol=0.05, atol=20 * eps)


def test_loads_state_dicts_of_older_versions():
    """torch's test_can_load_older_state_dict: groups without the flags added later, and
    numeric step counts, load and step."""
    params = model_params()
    opt = SOFIM(params, lr=0.05)
    train(opt, params, 2)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in ("decoupled_weight_decay", "norm_scope", "bias_correction", "maximize", "foreach"):
            del group[flag]
    for state in old["state"].values():
        state["step"] = float(state["step"].item())
    loaded = SOFIM(params, lr=0.05)
    loaded.load_state_dict(old)
    group = loaded.param_groups[0]
    assert (group["decoupled_weight_decay"], group["norm_scope"], group["bias_correction"], group["maximize"], group["foreach"]) == (
        False,
        "group",
        True,
        False,
        None,
    )
    train(loaded, params, 1, start=2)
    assert all(loaded.state[p]["step"].item() == 3 for p in params if p.grad is not None)


def test_step_runs_under_warnings_as_errors():
    """No deprecation or user warnings from the step, on any path."""
    params = model_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for foreach in (False, True):
            opt = SOFIM(params, lr=torch.tensor([0.01]), foreach=foreach)
            train(opt, params, 2)
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            train(opt, params, 1)


def test_every_error_regex_compiles():
    for error_input in SOFIM_INFO.optim_error_inputs_func("cpu", torch.float32):
        re.compile(error_input.error_regex)
