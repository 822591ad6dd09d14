"""SOFIM against a float64 reference written from the explicit Sherman–Morrison formula."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch

from sofim_tune import SOFIM, optim, sofim
from sofim_tune.errors import UserInputError
from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, REQUIRED_HYPERPARAMETERS, build_optimizer

SHAPES = [(4, 3), (5,), (2, 2, 3)]
STEPS = 30


def sherman_morrison_direction(m_hat: np.ndarray, rho: float) -> np.ndarray:
    """F⁻¹m̂ for F = m̂m̂ᵀ + ρI, from (A + uvᵀ)⁻¹ = A⁻¹ − A⁻¹uvᵀA⁻¹ / (1 + vᵀA⁻¹u), A = ρI."""
    mm = float(m_hat @ m_hat)
    return m_hat / rho - m_hat * mm / (rho**2 * (1.0 + mm / rho))


def gradient(theta: np.ndarray, step: int, seed: int) -> np.ndarray:
    """A deterministic gradient that depends on θ, so that the trajectory matters."""
    noise = np.random.default_rng(seed * 1000 + step).standard_normal(theta.shape)
    return 0.3 * theta + noise


class ReferenceSOFIM:
    """The paper's SOFIM on flat float64 vectors, one instance per block."""

    def __init__(self, theta, lr, rho, beta1, weight_decay=0.0, decoupled=False, bias_correction=True, maximize=False):
        self.theta = theta.astype(np.float64).copy()
        self.m = np.zeros_like(self.theta)
        self.t = 0
        self.lr, self.rho, self.beta1, self.wd = lr, rho, beta1, weight_decay
        self.decoupled, self.bias_correction, self.maximize = decoupled, bias_correction, maximize

    def step(self, g):
        g = -g if self.maximize else g
        if self.wd and not self.decoupled:
            g = g + self.wd * self.theta
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        m_hat = self.m / (1 - self.beta1**self.t) if self.bias_correction else self.m
        if self.wd and self.decoupled:
            self.theta = self.theta * (1 - self.lr * self.wd)
        self.theta = self.theta - self.lr * sherman_morrison_direction(m_hat, self.rho)


def make_params(seed: int, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


def set_grads(params, step: int, seed_offset: int = 0) -> None:
    for i, p in enumerate(params):
        p.grad = torch.from_numpy(gradient(p.detach().numpy(), step, seed=100 * seed_offset + i))


def assert_close_rel(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-9) -> None:
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"relative error {err:.3e}"


def run_against_reference(groups_kwargs, *, norm_scope="group", foreach, decoupled=False, maximize=False, bias_correction=True):
    """Run SOFIM with one param group per entry of groups_kwargs and the reference side by side."""
    groups = [make_params(seed=i) for i in range(len(groups_kwargs))]
    opt = SOFIM(
        [dict(params=ps, **kw) for ps, kw in zip(groups, groups_kwargs)],
        decoupled_weight_decay=decoupled,
        norm_scope=norm_scope,
        maximize=maximize,
        bias_correction=bias_correction,
        foreach=foreach,
    )
    blocks = []  # (list of params in the block, reference)
    for ps, kw in zip(groups, groups_kwargs):
        members = [[p] for p in ps] if norm_scope == "tensor" else [ps]
        for block in members:
            flat = torch.cat([p.detach().flatten() for p in block]).numpy()
            ref = ReferenceSOFIM(flat, float(kw["lr"]), kw["rho"], kw["beta1"], kw.get("weight_decay", 0.0), decoupled, bias_correction, maximize)
            blocks.append((block, ref))
    for step in range(STEPS):
        for gi, ps in enumerate(groups):
            set_grads(ps, step, seed_offset=gi)
        for block, ref in blocks:
            ref.step(torch.cat([p.grad.flatten() for p in block]).numpy())
        opt.step()
    for block, ref in blocks:
        assert_close_rel(torch.cat([p.detach().flatten() for p in block]).numpy(), ref.theta)
    return opt


@pytest.fixture(params=["loop", "foreach", "foreach-as-on-accelerators"])
def step_path(request, monkeypatch):
    """foreach for SOFIM; the third value runs, on the CPU, the foreach code that CUDA runs:
    multi-tensor lerp and norm, and scalars kept as device tensors."""
    if request.param == "foreach-as-on-accelerators":
        monkeypatch.setattr(optim, "_has_multi_tensor_kernels", lambda tensor: True)
        monkeypatch.setattr(optim, "_scalars_on_host", lambda buckets, lr: False)
    return request.param != "loop"


class TestAgainstReference:
    def test_one_group(self, step_path):
        run_against_reference([dict(lr=0.1, rho=0.5, beta1=0.9)], foreach=step_path)

    def test_several_groups_with_their_own_values(self, step_path):
        run_against_reference(
            [dict(lr=0.1, rho=0.5, beta1=0.9), dict(lr=0.03, rho=2.0, beta1=0.5, weight_decay=0.01), dict(lr=1.0, rho=10.0, beta1=0.99)],
            foreach=step_path,
        )

    @pytest.mark.parametrize("decoupled", [False, True])
    def test_weight_decay(self, step_path, decoupled):
        run_against_reference([dict(lr=0.2, rho=1.0, beta1=0.8, weight_decay=0.1)], foreach=step_path, decoupled=decoupled)

    def test_tensor_scope(self, step_path):
        run_against_reference([dict(lr=0.1, rho=0.3, beta1=0.9), dict(lr=0.05, rho=1.0, beta1=0.7)], norm_scope="tensor", foreach=step_path)

    def test_maximize(self, step_path):
        run_against_reference([dict(lr=0.1, rho=0.5, beta1=0.9, weight_decay=0.05)], maximize=True, foreach=step_path)

    def test_without_bias_correction(self, step_path):
        run_against_reference([dict(lr=0.1, rho=0.5, beta1=0.9)], bias_correction=False, foreach=step_path)


def test_sherman_morrison_matches_the_explicit_inverse():
    m_hat = np.random.default_rng(0).standard_normal(7)
    fisher = np.outer(m_hat, m_hat) + 0.3 * np.eye(7)
    assert_close_rel(sherman_morrison_direction(m_hat, 0.3), np.linalg.solve(fisher, m_hat), rtol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_foreach_and_loop_agree_in_float32(foreach):
    def run(flag):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = SOFIM(params, lr=0.1, rho=0.5, foreach=flag)
        for step in range(10):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + i + 1))
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(foreach), run(not foreach)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_float16_parameters_keep_float32_moments_and_a_float32_norm(step_path):
    p = torch.nn.Parameter(torch.zeros(70_000, dtype=torch.float16))
    opt = SOFIM([p], lr=7e5, rho=1.0, foreach=step_path)
    p.grad = torch.full_like(p, 10.0)
    opt.step()
    assert p.dtype == torch.float16
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["step"].dtype == torch.float32
    # One step from a zero moment: m̂ = g = 10, so θ = −η·10/(ρ + 7·10⁶). ‖m‖² = 70,000 is past
    # float16's largest value (65,504): a norm kept in float16 would be inf and θ would not move.
    torch.testing.assert_close(p.detach().float(), torch.full((70_000,), -7e6 / (1.0 + 7e6)), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_moments_do_not_stall(step_path, dtype):
    """g = 1 for 3,000 steps with β1 = 0.999: m = 1 − 0.999³⁰⁰⁰ ≈ 0.9503. Kept in its parameter's
    dtype, (1 − β1)(g − m) rounds away once m nears the gradient: bfloat16 stalls at 0.25, float16 at 0.76."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = SOFIM([p], lr=1e-4, rho=1.0, beta1=0.999, foreach=step_path)
    grad = torch.ones(4, dtype=dtype)
    for _ in range(3000):
        p.grad = grad
        opt.step()
    exp_avg = opt.state[p]["exp_avg"]
    assert exp_avg.dtype == torch.float32 and p.dtype == dtype
    torch.testing.assert_close(exp_avg, torch.full((4,), 1.0 - 0.999**3000), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_moments_survive_a_state_dict_round_trip(step_path, dtype):
    """torch.optim casts loaded state to the parameter's dtype; the float32 moment must come back unrounded."""

    def fresh():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
        return params, SOFIM(params, lr=0.05, rho=0.5, beta1=0.9, foreach=step_path)

    def run(params, opt, steps):
        for step in steps:
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach().float() * (step + i + 1)).to(dtype)
            opt.step()

    params, opt = fresh()
    run(params, opt, range(8))
    uninterrupted = [p.detach().clone() for p in params]

    params, opt = fresh()
    run(params, opt, range(4))
    saved = copy.deepcopy({"params": [p.detach() for p in params], "optim": opt.state_dict()})
    params, opt = fresh()
    with torch.no_grad():
        for p, s in zip(params, saved["params"]):
            p.copy_(s)
    opt.load_state_dict(saved["optim"])
    for p, s in zip(params, saved["optim"]["state"].values()):
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and torch.equal(opt.state[p]["exp_avg"], s["exp_avg"])
    run(params, opt, range(4, 8))
    for p, expected in zip(params, uninterrupted):
        assert torch.equal(p.detach(), expected)


def complex_twins(seed: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """A group mixing complex and real tensors, and the same values with each complex tensor
    replaced by its torch.view_as_real twin."""
    gen = torch.Generator().manual_seed(seed)
    values = [
        torch.randn(4, 3, generator=gen, dtype=torch.complex128),
        torch.randn(5, generator=gen, dtype=torch.float64),
        torch.randn(2, 2, 3, generator=gen, dtype=torch.complex128),
        torch.randn((), generator=gen, dtype=torch.complex128),
    ]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    twins = [torch.nn.Parameter(torch.view_as_real(v).clone() if v.is_complex() else v.clone()) for v in values]
    return params, twins


@pytest.mark.parametrize("norm_scope", ["group", "tensor"])
@pytest.mark.parametrize("weight_decay", ["none", "coupled", "decoupled"])
def test_complex_parameters_step_as_their_real_views(step_path, norm_scope, weight_decay):
    params, twins = complex_twins(seed=7)
    kwargs = dict(
        lr=0.1,
        rho=0.5,
        beta1=0.8,
        weight_decay=0.0 if weight_decay == "none" else 0.05,
        decoupled_weight_decay=weight_decay == "decoupled",
        norm_scope=norm_scope,
        foreach=step_path,
    )
    opt, twin_opt = SOFIM(params, **kwargs), SOFIM(twins, **kwargs)
    for step in range(6):
        for i, (p, twin) in enumerate(zip(params, twins)):
            gen = torch.Generator().manual_seed(100 * step + i)
            p.grad = 0.3 * p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype)
            twin.grad = torch.view_as_real(p.grad).clone() if p.is_complex() else p.grad.clone()
        opt.step()
        twin_opt.step()
    for p, twin in zip(params, twins):
        assert p.dtype == (torch.complex128 if p.ndim != 1 else torch.float64)
        assert opt.state[p]["exp_avg"].dtype == p.dtype and not opt.state[p]["step"].is_complex()
        assert torch.equal(torch.view_as_real(p.detach()) if p.is_complex() else p.detach(), twin.detach())


def test_a_complex_block_norm_is_the_sum_of_squared_moduli():
    """m̂ = g after one step without momentum: the step is η·g/(ρ + Σ|g|²), against the reference."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    opt = SOFIM([p], lr=1.0, rho=1.0, beta1=0.0)
    p.grad = torch.tensor([1 + 1j, 1j], dtype=torch.complex128)
    opt.step()
    torch.testing.assert_close(p.detach(), -p.grad / (1.0 + 3.0), rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("decoupled", [False, True])
def test_tensor_lr_of_any_one_element_shape(step_path, shape, decoupled):
    lr = torch.full(shape, 0.2, dtype=torch.float64)
    opt = run_against_reference([dict(lr=lr, rho=1.0, beta1=0.8, weight_decay=0.1)], foreach=step_path, decoupled=decoupled)
    assert opt.param_groups[0]["lr"] is lr  # schedulers change a tensor lr in place


def test_tensor_lr_can_be_changed_in_place(step_path):
    lr = torch.tensor([0.1], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SOFIM([p], lr=lr, rho=1.0, beta1=0.0, foreach=step_path)
    moves = []
    for new_lr in (1.0, 0.5):
        lr.fill_(new_lr)
        before = p.item()
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        moves.append(before - p.item())
    assert moves == pytest.approx([0.5, 0.25], rel=1e-15)


def test_multi_element_tensor_lr_raises():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        SOFIM([p], lr=torch.tensor([0.1, 0.1]))
    opt = SOFIM([p])
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": torch.zeros(2, 1)})
    assert len(opt.param_groups) == 1


def trained_state_dict(step_path, steps=STEPS // 2):
    params = make_params(seed=3)
    opt = SOFIM(params, lr=0.1, rho=0.5, beta1=0.9, weight_decay=0.01, foreach=step_path)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("number", [int, float])
def test_load_state_dict_with_a_numeric_step(step_path, number):
    """Checkpoints of torch's optimizers before 1.12 (and hand-made ones) hold "step" as a number."""
    values, state_dict = trained_state_dict(step_path)
    resumed = copy.deepcopy(state_dict)
    for state in resumed["state"].values():
        state["step"] = number(state["step"].item())

    def continue_from(state_dict):
        params = make_params(seed=3)
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        opt = SOFIM(params, lr=0.1, rho=0.5, beta1=0.9, weight_decay=0.01, foreach=step_path)
        opt.load_state_dict(state_dict)
        for step in range(STEPS // 2, STEPS):
            set_grads(params, step)
            opt.step()
        return opt, params

    opt, params = continue_from(resumed)
    for p in params:
        step = opt.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float64 and step.item() == STEPS
    for p, expected in zip(params, continue_from(state_dict)[1]):
        assert torch.equal(p.detach(), expected.detach())


def test_load_state_dict_post_hooks_see_and_keep_the_final_state():
    _, state_dict = trained_state_dict(step_path=False)
    for state in state_dict["state"].values():
        state["step"] = state["step"].float()  # as torch.optim.Adam keeps it: float32, whatever the parameter
    params = make_params(seed=3)
    opt = SOFIM(params, lr=0.1, rho=0.5)
    seen = []

    def hook(optimizer):
        seen.append([optimizer.state[p]["step"].dtype for p in params])
        optimizer.state[params[0]]["step"] = torch.tensor(3.0)  # a hook's change, in float32
        optimizer.state["hook"] = {"step": 1}

    opt.register_load_state_dict_post_hook(hook)
    opt.load_state_dict(state_dict)
    assert seen == [[torch.float64] * len(params)]
    assert opt.state[params[0]]["step"].dtype == torch.float32 and opt.state[params[0]]["step"].item() == 3.0
    assert opt.state["hook"] == {"step": 1}


def test_non_parameter_keys_in_state_survive_load_state_dict(step_path):
    values, state_dict = trained_state_dict(step_path)
    state_dict["state"]["extra"] = {"step": torch.tensor(5.0), "note": "kept as is"}
    params = make_params(seed=3)
    opt = SOFIM(params, lr=0.1, rho=0.5, beta1=0.9, weight_decay=0.01, foreach=step_path)
    opt.load_state_dict(state_dict)
    assert opt.state["extra"]["note"] == "kept as is" and opt.state["extra"]["step"].dtype == torch.float32
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    set_grads(params, STEPS // 2)
    opt.step()
    assert opt.state_dict()["state"]["extra"]["note"] == "kept as is"


def test_channels_last_parameters_step_like_contiguous_ones(step_path):
    def run(memory_format):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=memory_format))
        opt = SOFIM([weight], lr=0.1, rho=0.5, foreach=step_path)
        for step in range(5):
            weight.grad = torch.sin(weight.detach() * (step + 1))
            opt.step()
        assert opt.state[weight]["exp_avg"].is_contiguous(memory_format=memory_format)
        return weight.detach().contiguous()

    torch.testing.assert_close(run(torch.channels_last), run(torch.contiguous_format), rtol=1e-6, atol=1e-7)


def test_resume_from_state_dict_continues_exactly(step_path):
    def fresh():
        params = make_params(seed=3)
        return params, SOFIM(params, lr=0.1, rho=0.5, beta1=0.9, weight_decay=0.01, foreach=step_path)

    params, opt = fresh()
    for step in range(STEPS):
        set_grads(params, step)
        opt.step()
    uninterrupted = [p.detach().clone() for p in params]

    params, opt = fresh()
    for step in range(STEPS // 2):
        set_grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    params, opt = fresh()
    with torch.no_grad():
        for p, s in zip(params, saved["params"]):
            p.copy_(s)
    opt.load_state_dict(saved["optim"])
    for step in range(STEPS // 2, STEPS):
        set_grads(params, step)
        opt.step()
    for p, expected in zip(params, uninterrupted):
        assert torch.equal(p.detach(), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-0.1), "lr=-0.1"),
        (dict(rho=0.0), "rho=0.0"),
        (dict(rho=-1.0), "rho=-1.0"),
        (dict(rho=float("nan")), "rho=nan"),
        (dict(beta1=1.0), "beta1=1.0"),
        (dict(beta1=-0.1), "beta1=-0.1"),
        (dict(weight_decay=-1e-4), "weight_decay=-0.0001"),
        (dict(norm_scope="layer"), "norm_scope='layer'"),
        (dict(lr=float("inf")), "lr=inf: it must be finite"),
        (dict(lr=float("-inf")), "lr=-inf: it must be finite"),
        (dict(lr=torch.tensor(float("inf"))), "lr=tensor(inf): it must be finite"),
        (dict(rho=float("inf")), "rho=inf: it must be finite"),
        (dict(weight_decay=float("inf")), "weight_decay=inf: it must be finite"),
        (dict(beta1=float("-inf")), "beta1=-inf: it must be finite"),
    ],
)
def test_invalid_values_raise_naming_the_value(kwargs, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        SOFIM([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=float("inf")), dict(rho=float("inf")), dict(weight_decay=float("inf")), dict(rho=0.0)])
def test_the_functional_step_refuses_what_the_optimizer_refuses(kwargs):
    param = torch.zeros(2)
    settings = dict(lr=0.1, rho=1.0, beta1=0.9) | kwargs
    with pytest.raises(UserInputError, match="must"):
        sofim([param], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(())], **settings)
    assert torch.equal(param, torch.zeros(2))


@pytest.mark.parametrize(
    ("name", "hyperparameters"),
    [("sofim", {"lr": float("inf")}), ("sofim-tensor", {"lr": 0.1, "weight_decay": float("inf")}), ("sgd-momentum", {"lr": float("inf")}),
     ("sgd-momentum", {"lr": 0.1, "momentum": float("nan")}), ("adamw", {"lr": 1e-3, "weight_decay": float("inf")}), ("adamw", {"lr": 1e-3, "beta2": 1.0})],
)
def test_build_optimizer_refuses_infinite_and_out_of_domain_values(name, hyperparameters):
    with pytest.raises(UserInputError, match="must"):
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], hyperparameters)


VALID_SETTINGS = {"lr": 0.1, "rho": 1.0, "beta1": 0.9, "beta2": 0.999, "momentum": 0.9, "weight_decay": 0.0}


@pytest.mark.parametrize(("name", "required"), [(n, r) for n in OPTIMIZER_HYPERPARAMETERS for r in REQUIRED_HYPERPARAMETERS])
def test_build_optimizer_names_a_missing_hyperparameter(name, required):
    # Everything else the optimizer takes is given: only the missing name is to blame.
    given = {key: VALID_SETTINGS[key] for key in OPTIMIZER_HYPERPARAMETERS[name] if key != required}
    with pytest.raises(UserInputError, match=f"^optimizer '{name}' needs {required}, which was not given$"):
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], given)
    assert build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], {**given, required: VALID_SETTINGS[required]}) is not None


def test_invalid_group_value_raises():
    with pytest.raises(ValueError, match="rho=0"):
        SOFIM([{"params": [torch.nn.Parameter(torch.zeros(2))], "rho": 0}])


def test_closure_runs_with_grad_enabled_and_returns_loss():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    opt = SOFIM([p], lr=0.1, rho=1.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(9.0)
    assert p.item() < 3.0


def test_parameters_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = SOFIM([a, b], lr=0.1, rho=1.0)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))
    assert b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3))


def test_a_tensor_that_joins_late_is_bias_corrected_by_its_own_step_count(step_path):
    """b gets its first gradient at step 6: m̂ of each tensor uses its own t, the norm spans both."""
    lr, rho, beta1 = 0.1, 0.5, 0.9
    a, b = make_params(seed=5, shapes=[(4,), (3, 2)])
    opt = SOFIM([a, b], lr=lr, rho=rho, beta1=beta1, foreach=step_path)
    theta = [a.detach().numpy().ravel().copy(), b.detach().numpy().ravel().copy()]
    moments, counts = [np.zeros(4), np.zeros(6)], [0, 0]
    for step in range(12):
        members = [0, 1] if step >= 6 else [0]
        grads = [gradient(p.detach().numpy(), step, seed=i) for i, p in enumerate((a, b))]
        a.grad = torch.from_numpy(grads[0])
        b.grad = torch.from_numpy(grads[1]) if step >= 6 else None
        m_hats = []
        for i in members:
            counts[i] += 1
            moments[i] = beta1 * moments[i] + (1 - beta1) * grads[i].ravel()
            m_hats.append(moments[i] / (1 - beta1 ** counts[i]))
        direction = sherman_morrison_direction(np.concatenate(m_hats), rho)
        offset = 0
        for i in members:
            theta[i] = theta[i] - lr * direction[offset : offset + theta[i].size]
            offset += theta[i].size
        opt.step()
    assert [opt.state[p]["step"].item() for p in (a, b)] == [12, 6]
    assert_close_rel(np.concatenate([a.detach().numpy().ravel(), b.detach().numpy().ravel()]), np.concatenate(theta))


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        SOFIM(emb.parameters()).step()


def test_one_buffer_per_parameter():
    params = make_params(seed=0)
    opt = SOFIM(params)
    set_grads(params, 0)
    opt.step()
    for p in params:
        tensors = {k: v for k, v in opt.state[p].items() if v.dim() > 0}
        assert list(tensors) == ["exp_avg"] and tensors["exp_avg"].shape == p.shape


def test_scheduler_drives_the_learning_rate():
    """With ‖m̂‖² fixed by a constant gradient, the step is proportional to the scheduled lr."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SOFIM([p], lr=1.0, rho=1.0, beta1=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moves = []
    for _ in range(3):
        before = p.item()
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        sched.step()
        moves.append(before - p.item())
    # g = 1, ρ = 1: each step moves lr·1/(1 + 1) = lr/2.
    assert moves == pytest.approx([0.5, 0.25, 0.125])


def test_grad_scaler_unscales_before_the_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = SOFIM(model.parameters(), lr=0.1, rho=0.5)
    ref_opt = SOFIM(reference.parameters(), lr=0.1, rho=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_step_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    eager = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    compiled = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    eager_opt = SOFIM(eager, lr=0.1, rho=0.5)
    compiled_opt = SOFIM(compiled, lr=0.1, rho=0.5)
    compiled_step = torch.compile(compiled_opt.step)
    for step in range(3):
        for a, b in zip(eager, compiled):
            a.grad = torch.cos(a.detach() + step)
            b.grad = torch.cos(b.detach() + step)
        eager_opt.step()
        compiled_step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_rosenbrock_converges_to_the_minimum():
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = SOFIM([xy], lr=0.02, rho=1.0, beta1=0.9)
    for _ in range(3000):
        opt.zero_grad()
        x, y = xy
        ((1 - x) ** 2 + 100 * (y - x**2) ** 2).backward()
        opt.step()
    assert torch.allclose(xy.detach(), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-3)
