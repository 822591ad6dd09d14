"""Search spaces: shipped files, reparameterization, fingerprints, and every rejected input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sofim_tune.errors import UserInputError
from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, hyperparameter_problem
from sofim_tune.space import MAX_FILE_BYTES, ParamRange, SearchSpace, excerpt, load_space, space_names

SOFIM_YAML = """\
optimizer: sofim
params:
  lr:    {type: float, low: 1.0e-4, high: 100.0, log: true}
  rho:   {type: float, low: 1.0e-4, high: 100.0, log: true}
  beta1: {type: float, low: 0.5, high: 0.999}
fixed:
  weight_decay: 0.0
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_spaces() -> None:
    assert set(space_names()) == {"sofim", "sofim-effective", "sofim-wd", "sofim-tensor", "sofim-tensor-wd", "sgd-momentum", "sgd-momentum-wd", "adamw"}
    for name in space_names():
        space = load_space(name)
        assert space.name == name
        assert space.source == f"search_spaces/{name}.yaml"


def test_sofim_space_is_the_shipped_one() -> None:
    space = load_space("sofim")
    assert space.optimizer == "sofim"
    assert space.reparameterization is None
    assert list(space.params) == ["lr", "rho", "beta1"]
    assert space.params["lr"] == ParamRange("lr", "float", 1e-4, 100.0, log=True)
    assert space.params["rho"] == ParamRange("rho", "float", 1e-4, 100.0, log=True)
    assert space.params["beta1"] == ParamRange("beta1", "float", 0.5, 0.999, log=False)
    assert space.fixed == {"weight_decay": 0.0}
    assert space.log_hyperparameters == {"lr", "rho"}


def test_user_file_equals_shipped_file(tmp_path: Path) -> None:
    mine = load_space(write(tmp_path, SOFIM_YAML))
    assert mine.name == "space"
    assert mine.source == str(tmp_path / "space.yaml")
    assert mine.fingerprint() == load_space("sofim").fingerprint()


def test_sofim_effective_round_trip() -> None:
    space = load_space("sofim-effective")
    assert space.reparameterization == "lr_over_rho"
    assert space.log_hyperparameters == {"lr", "rho"}
    searched = {"lr_over_rho": 0.05, "rho": 2.0, "beta1": 0.9}
    hyperparameters = space.to_hyperparameters(searched)
    assert hyperparameters == pytest.approx({"lr": 0.1, "rho": 2.0, "beta1": 0.9})
    assert space.from_hyperparameters(hyperparameters) == pytest.approx(searched)


def test_round_trip_at_a_bound_survives_round_off() -> None:
    space = load_space("sofim-effective")
    searched = {"lr_over_rho": 10.0, "rho": 0.3, "beta1": 0.5}
    back = space.from_hyperparameters(space.to_hyperparameters(searched))
    assert back["lr_over_rho"] <= 10.0
    assert back == pytest.approx(searched)


def test_plain_space_round_trip_and_fixed_values() -> None:
    space = load_space("sofim")
    setting = {"lr": 0.1, "rho": 1.0, "beta1": 0.9}
    assert space.from_hyperparameters(setting) == setting
    assert space.to_hyperparameters(setting) == setting
    # A fixed hyperparameter may come along when it agrees with the space.
    assert space.from_hyperparameters({**setting, "weight_decay": 0.0}) == setting


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"lr": 500.0, "rho": 1.0, "beta1": 0.9}, "params.lr"),
        ({"lr": 0.1, "rho": 1.0}, "beta1"),
        ({"lr": 0.1, "rho": 1.0, "beta1": 0.9, "momentum": 0.9}, "momentum"),
        ({"lr": 0.1, "rho": 1.0, "beta1": 0.9, "weight_decay": 0.1}, "weight_decay"),
        ({"lr": 0.1, "rho": "one", "beta1": 0.9}, "rho"),
    ],
)
def test_from_hyperparameters_rejects(setting: dict, key: str) -> None:
    with pytest.raises(UserInputError, match=r"^search_spaces/sofim\.yaml: ") as info:
        load_space("sofim").from_hyperparameters(setting)
    assert key in str(info.value)


def test_from_hyperparameters_effective_range_and_zero_rho() -> None:
    space = load_space("sofim-effective")
    with pytest.raises(UserInputError, match=r"params\.lr_over_rho: lr/rho = 1000 is not in \[0\.001, 10\]"):
        space.from_hyperparameters({"lr": 100.0, "rho": 0.1, "beta1": 0.9})
    with pytest.raises(UserInputError, match=r"params\.rho"):
        space.from_hyperparameters({"lr": 0.1, "rho": 0.0, "beta1": 0.9})


def test_fingerprint_is_stable_and_sees_ranges(tmp_path: Path) -> None:
    base = load_space(write(tmp_path, SOFIM_YAML))
    assert base.fingerprint() == load_space(write(tmp_path, SOFIM_YAML)).fingerprint()
    assert len(base.fingerprint()) == 12
    # Neither the order of keys nor 0 for 0.0 changes what the space searches.
    reordered = """\
fixed: {weight_decay: 0}
params:
  beta1: {high: 0.999, low: 0.5}
  rho:   {log: true, low: 1.0e-4, high: 100.0}
  lr:    {type: float, low: 1.0e-4, high: 100.0, log: true}
optimizer: sofim
"""
    assert load_space(write(tmp_path, reordered, "r.yaml")).fingerprint() == base.fingerprint()
    narrower = SOFIM_YAML.replace("high: 0.999", "high: 0.99")
    assert load_space(write(tmp_path, narrower, "n.yaml")).fingerprint() != base.fingerprint()
    effective = load_space("sofim-effective")
    assert effective.fingerprint() != base.fingerprint()


def test_to_dict_is_json_and_carries_the_fingerprint() -> None:
    space = load_space("adamw")
    data = json.loads(json.dumps(space.to_dict()))
    assert data["optimizer"] == "adamw"
    assert data["fingerprint"] == space.fingerprint()
    assert list(data["params"]) == list(space.params)


def test_space_is_frozen() -> None:
    space = load_space("sofim")
    assert isinstance(space, SearchSpace)
    with pytest.raises(AttributeError):
        space.optimizer = "adamw"  # type: ignore[misc]


def test_unknown_shipped_name() -> None:
    with pytest.raises(UserInputError, match=r"unknown search space 'nope'; shipped: adamw, "):
        load_space("nope")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: search space file not found$"):
        load_space(path)


# Each case replaces one line of SOFIM_YAML (or the whole text) and names the key the
# message must point at.
BAD_SPACES = {
    "not yaml": ("optimizer: [sofim\n", "not valid YAML"),
    "not a mapping": ("- lr\n- rho\n", "expected a mapping"),
    "empty file": ("", "expected a mapping"),
    "unknown top-level key": (SOFIM_YAML + "sampler: tpe\n", "sampler: unknown key"),
    "missing optimizer": (SOFIM_YAML.replace("optimizer: sofim\n", ""), "optimizer: missing"),
    "missing params": ("optimizer: sofim\n", "params: missing"),
    "empty params": ("optimizer: sofim\nparams: {}\n", "params: expected a non-empty mapping"),
    "unknown optimizer": (SOFIM_YAML.replace("sofim", "lion"), "optimizer: unknown optimizer 'lion'"),
    "unknown type": (SOFIM_YAML.replace("lr:    {type: float", "lr:    {type: double"), "params.lr.type"),
    "param not a mapping": (SOFIM_YAML.replace("{type: float, low: 0.5, high: 0.999}", "0.9"), "params.beta1:"),
    "unknown param key": (SOFIM_YAML.replace("high: 0.999}", "high: 0.999, step: 0.1}"), "params.beta1.step"),
    "missing low": (SOFIM_YAML.replace("low: 0.5, ", ""), "params.beta1.low: missing"),
    "low >= high": (
        SOFIM_YAML.replace("lr:    {type: float, low: 1.0e-4, high: 100.0", "lr:    {type: float, low: 5.0, high: 1.0"),
        "params.lr: low (5.0) must be < high (1.0)",
    ),
    "log with low 0": (SOFIM_YAML.replace("lr:    {type: float, low: 1.0e-4", "lr:    {type: float, low: 0.0"), "params.lr.low"),
    "log not a bool": (SOFIM_YAML.replace("high: 100.0, log: true}\n  beta1", "high: 100.0, log: yes please}\n  beta1"), "params.rho.log"),
    "beta1 high 1": (SOFIM_YAML.replace("high: 0.999", "high: 1.0"), "params.beta1.high: beta1 must lie in [0, 1), got 1.0"),
    "beta1 low < 0": (SOFIM_YAML.replace("low: 0.5", "low: -0.1"), "params.beta1.low: beta1 must lie in [0, 1), got -0.1"),
    "rho low 0": (
        SOFIM_YAML.replace("rho:   {type: float, low: 1.0e-4, high: 100.0, log: true}", "rho: {low: 0.0, high: 1.0}"),
        "params.rho.low: rho must be > 0, got 0.0",
    ),
    "lr low < 0": (
        SOFIM_YAML.replace("lr:    {type: float, low: 1.0e-4, high: 100.0, log: true}", "lr: {low: -1.0, high: 1.0}"),
        "params.lr.low: lr must be > 0, got -1.0",
    ),
    # lr = 0 trains nothing: every optimizer refuses it, so a space must not offer it.
    "lr low 0": (
        SOFIM_YAML.replace("lr:    {type: float, low: 1.0e-4, high: 100.0, log: true}", "lr: {low: 0.0, high: 1.0}"),
        "params.lr.low: lr must be > 0, got 0.0",
    ),
    "sgd lr low 0": ("optimizer: sgd-momentum\nparams:\n  lr: {low: 0.0, high: 1.0}\n", "params.lr.low: lr must be > 0, got 0.0"),
    "fixed lr 0": (
        "optimizer: sgd-momentum\nparams:\n  momentum: {low: 0.5, high: 0.9}\nfixed:\n  lr: 0.0\n",
        "fixed.lr: lr must be > 0, got 0.0",
    ),
    "fixed lr inf": (
        "optimizer: sgd-momentum\nparams:\n  momentum: {low: 0.5, high: 0.9}\nfixed:\n  lr: .inf\n",
        "fixed.lr: expected a finite number, got inf",
    ),
    "lr_over_rho low 0": (
        SOFIM_YAML.replace("  lr:    {type: float, low: 1.0e-4", "  lr_over_rho: {type: float, low: 0.0").replace("high: 100.0, log: true}\n  rho", "high: 100.0}\n  rho", 1)
        + "reparameterization: lr_over_rho\n",
        "params.lr_over_rho.low: lr_over_rho must be > 0, got 0.0",
    ),
    "momentum high 1": ("optimizer: sgd-momentum\nparams:\n  momentum: {low: 0.5, high: 1.0}\n", "params.momentum.high: momentum must lie in [0, 1), got 1.0"),
    "param the optimizer does not take": (SOFIM_YAML.replace("beta1:", "momentum:"), "params.momentum: optimizer sofim takes no"),
    "non-numeric low": (SOFIM_YAML.replace("low: 0.5", "low: half"), "params.beta1.low: expected a number"),
    "exponent YAML reads as text": (SOFIM_YAML.replace("low: 1.0e-4", "low: 1e-4", 1), "params.lr.low: '1e-4' is text"),
    "boolean bound": (SOFIM_YAML.replace("low: 0.5", "low: true"), "params.beta1.low: expected a number"),
    "infinite bound": (SOFIM_YAML.replace("high: 0.999", "high: .inf"), "params.beta1.high: expected a finite number"),
    "int range with float bound": (SOFIM_YAML.replace("beta1: {type: float", "beta1: {type: int"), "params.beta1.low: expected an integer"),
    "unknown fixed key": (SOFIM_YAML + "  momentum: 0.9\n", "fixed.momentum: unknown key"),
    "fixed not a mapping": (SOFIM_YAML.replace("fixed:\n  weight_decay: 0.0\n", "fixed: 3\n"), "fixed: expected a mapping"),
    "searched and fixed": (SOFIM_YAML + "  beta1: 0.9\n", "fixed.beta1: also searched"),
    "fixed out of range": (SOFIM_YAML.replace("weight_decay: 0.0", "weight_decay: -1.0"), "fixed.weight_decay: weight_decay must be >= 0, got -1.0"),
    "fixed batch_size not int": (SOFIM_YAML + "  batch_size: 64.5\n", "fixed.batch_size: expected an integer"),
    "fixed epochs 0": (SOFIM_YAML + "  epochs: 0\n", "fixed.epochs: must be >= 1"),
    "unknown reparameterization": (SOFIM_YAML + "reparameterization: log_lr\n", "reparameterization: unknown"),
    "lr_over_rho without lr_over_rho": (
        SOFIM_YAML.replace("  lr:    {type: float, low: 1.0e-4, high: 100.0, log: true}\n", "")
        + "reparameterization: lr_over_rho\n",
        "reparameterization: lr_over_rho needs both",
    ),
    "lr_over_rho with lr": (SOFIM_YAML + "reparameterization: lr_over_rho\n", "params.lr: with reparameterization lr_over_rho"),
    "lr_over_rho fixing lr": (
        SOFIM_YAML.replace("  lr:", "  lr_over_rho:") + "  lr: 0.1\nreparameterization: lr_over_rho\n",
        "fixed.lr: unknown key",
    ),
    "lr_over_rho without reparameterization": (SOFIM_YAML.replace("  lr:", "  lr_over_rho:"), "params.lr_over_rho: optimizer sofim takes no"),
    "lr_over_rho for sgd": (
        "optimizer: sgd-momentum\nreparameterization: lr_over_rho\nparams:\n  momentum: {low: 0.5, high: 0.9}\n",
        "reparameterization: lr_over_rho needs an optimizer with rho",
    ),
    "sgd takes no beta1": (
        "optimizer: sgd-momentum\nparams:\n  beta1: {low: 0.5, high: 0.9}\n",
        "params.beta1: optimizer sgd-momentum takes no",
    ),
    "adamw takes no rho": (
        "optimizer: adamw\nparams:\n  lr: {low: 1.0e-4, high: 1.0, log: true}\nfixed:\n  rho: 1.0\n",
        "fixed.rho: unknown key",
    ),
    "adamw beta2 fixed at 1": (
        "optimizer: adamw\nparams:\n  lr: {low: 1.0e-4, high: 1.0, log: true}\nfixed:\n  beta2: 1.0\n",
        "fixed.beta2: beta2 must lie in [0, 1), got 1.0",
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_bad_space_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("optimizer", "name"), [(o, n) for o, names in OPTIMIZER_HYPERPARAMETERS.items() for n in names])
def test_a_space_takes_exactly_the_values_the_optimizer_takes(tmp_path: Path, optimizer: str, name: str) -> None:
    # One rule for spaces, trial configs, build_optimizer and best.json: optim.HYPERPARAMETER_DOMAINS.
    searched = "weight_decay" if name == "lr" else "lr"
    for value in (-1.0, -0.001, 0.0, 0.001, 0.5, 0.999, 1.0, 3.0):
        text = f"optimizer: {optimizer}\nparams:\n  {searched}: {{low: 0.01, high: 0.1}}\nfixed:\n  {name}: {value!r}\n"
        problem = hyperparameter_problem(name, value)
        if problem is None:
            assert load_space(write(tmp_path, text)).fixed[name] == value
        else:
            with pytest.raises(UserInputError, match=f"^{re.escape(str(tmp_path / 'space.yaml'))}: fixed.{name}: {re.escape(problem)}$"):
                load_space(write(tmp_path, text))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserInputError, match="not a text file"):
        load_space(path)


def test_int_range_is_accepted(tmp_path: Path) -> None:
    # No optimizer hyperparameter is an integer today, but the format allows int ranges.
    text = "optimizer: sgd-momentum\nparams:\n  lr: {type: int, low: 1, high: 3}\n"
    space = load_space(write(tmp_path, text))
    assert space.params["lr"] == ParamRange("lr", "int", 1, 3)
    with pytest.raises(UserInputError, match=r"params\.lr: lr = 1\.5 is not in the integers 1\.\.3"):
        space.from_hyperparameters({"lr": 1.5})


# ---------------------------------------------------------------------------------------
# Hostile files: aliases, size, depth, huge values
# ---------------------------------------------------------------------------------------


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A valid space but for ``fixed.weight_decay``: ``width**levels`` "lol"s through aliases."""
    lines = ["optimizer: sofim", "params:", "  lr: {low: 0.1, high: 1.0}", "fixed:", "  weight_decay:"]
    lines.append(f"    - &l0 [{', '.join(['lol'] * width)}]")
    for level in range(1, levels):
        lines.append(f"    - &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


# Runs in a child process, its address space capped at what the import took plus 1 GiB,
# so that a regression fails (MemoryError, or the parent's timeout) instead of eating the
# machine or hanging CI.
_GUARDED_LOAD = """\
import sys, time
from sofim_tune.errors import UserInputError
from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, hyperparameter_problem
from sofim_tune.space import load_space
try:
    import resource
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
except (ImportError, OSError, StopIteration, ValueError):
    pass
started = time.monotonic()
try:
    load_space(sys.argv[1])
except UserInputError as exc:
    print(f"{time.monotonic() - started:.3f}")
    print(exc)
else:
    print("loaded")
"""


def guarded_load(path: Path) -> tuple[float, str]:
    """(seconds load_space took, its error message), run in a capped child process."""
    done = subprocess.run(
        [sys.executable, "-c", _GUARDED_LOAD, str(path)], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout != "loaded\n", "load_space accepted the file"
    seconds, message = done.stdout.split("\n", 1)
    return float(seconds), message.rstrip("\n")


def test_billion_laughs_is_refused_fast_and_short(tmp_path: Path) -> None:
    path = write(tmp_path, billion_laughs())
    seconds, message = guarded_load(path)
    assert seconds < 1.0
    assert message.startswith(f"{path}: YAML anchors (&l0) and aliases are not allowed in a search space"), message
    assert "line 6" in message
    assert "\n" not in message and len(message) < 300


def test_alias_is_refused(tmp_path: Path) -> None:
    # No anchor defines it: refused as an alias before PyYAML would call it undefined.
    text = SOFIM_YAML.replace("weight_decay: 0.0", "weight_decay: *zero")
    with pytest.raises(UserInputError, match=r": YAML aliases \(\*zero\) are not allowed in a search space; .* at line 7, column 17$"):
        load_space(write(tmp_path, text))


def test_anchor_alone_is_refused(tmp_path: Path) -> None:
    text = SOFIM_YAML.replace("weight_decay: 0.0", "weight_decay: &zero 0.0")
    with pytest.raises(UserInputError, match=r"YAML anchors \(&zero\) and aliases are not allowed .* at line 7"):
        load_space(write(tmp_path, text))


def test_file_over_a_mebibyte_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, SOFIM_YAML + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: larger than 1 MiB; a search space file is a few lines$"):
        load_space(path)
    # Just under the limit still loads.
    load_space(write(tmp_path, SOFIM_YAML + "#" * (MAX_FILE_BYTES - len(SOFIM_YAML) - 1) + "\n"))


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    # PyYAML's composer recurses once per level: 100000 levels was a RecursionError.
    path = write(tmp_path, "optimizer: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: nested deeper than 16 levels at line 1"):
        load_space(path)


def test_too_many_values_are_refused(tmp_path: Path) -> None:
    # 200,000 values took PyYAML's pure-Python parser 6 s; it now stops at the 10,001st.
    path = write(tmp_path, SOFIM_YAML.replace("weight_decay: 0.0", f"weight_decay: [{', '.join(['1'] * 200_000)}]"))
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: more than 10,000 values; a search space has a few dozen at line 7"):
        load_space(path)


MEGABYTE = 1_000_000

HUGE_SPACES = {
    "value": f"optimizer: {'a' * MEGABYTE}\nparams: {{}}\n",
    "key": f"? {'k' * MEGABYTE}\n: 1\n",
    "param name": f"optimizer: sofim\nparams:\n  ? {'p' * MEGABYTE}\n  : {{low: 0.1, high: 1.0}}\n",
    "range type": SOFIM_YAML.replace("type: float, low: 0.5", f"type: {'t' * MEGABYTE}, low: 0.5"),
    "log": SOFIM_YAML.replace("high: 0.999}", f"high: 0.999, log: {'y' * MEGABYTE}}}"),
    "fixed value": SOFIM_YAML.replace("weight_decay: 0.0", f"weight_decay: {'w' * MEGABYTE}"),
    "list value": SOFIM_YAML.replace("weight_decay: 0.0", f"weight_decay: [{', '.join(['1'] * 9_000)}]"),
    "float text": SOFIM_YAML.replace("low: 0.5", f"low: 1{'0' * MEGABYTE}e-4"),
    "tag": f"optimizer: !{'x' * MEGABYTE} sofim\n",
}


@pytest.mark.parametrize("text", HUGE_SPACES.values(), ids=HUGE_SPACES.keys())
def test_huge_values_are_quoted_short(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message[:300]
    assert len(message) - len(str(path)) < 300, message[:600]
    assert "\n" not in message


ODD_VALUES = {
    "list optimizer (unhashable)": ("optimizer: [sofim]\nparams: {}\n", "optimizer: unknown optimizer ['sofim']"),
    "int of 5000 digits": (SOFIM_YAML.replace("low: 0.5", "low: " + "1" * 5000), "not valid YAML: cannot read the value '111"),
    "int past a float": (SOFIM_YAML.replace("weight_decay: 0.0", "weight_decay: " + "1" * 400), "fixed.weight_decay: expected a finite number, got <an integer of about 400 digits>"),
    "int past 64 bits": (SOFIM_YAML + "  epochs: " + "9" * 20 + "\n", "fixed.epochs: expected an integer of at most 19 digits"),
    "year 0": (SOFIM_YAML.replace("low: 0.5", "low: 0000-01-01"), "not valid YAML: cannot read the value '0000-01-01': year 0 is out of range at line 5"),
    "python tag": (SOFIM_YAML.replace("weight_decay: 0.0", "weight_decay: !!python/object/apply:os.system [echo hi]"), "not valid YAML: could not determine a constructor"),
    "non-string key": (SOFIM_YAML + "1: one\n", "1: unknown key"),
    "key with a newline": (SOFIM_YAML + '"a\\nb": 1\n', "'a\\nb': unknown key"),
}


@pytest.mark.parametrize(("text", "expected"), ODD_VALUES.values(), ids=ODD_VALUES.keys())
def test_odd_values_give_one_line_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message and len(message) - len(str(path)) < 300


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("short", "'short'"),
        ("a" * 100, "'" + "a" * 59 + "… (100 characters)"),
        ("\x00" * 100, "'" + "\\x00" * 14 + "\\x0… (100 characters)"),
        (list(range(100)), "[0, 1, 2, 3, ...]"),
        ([[["deep"]]], "[[[...]]]"),
        (10**5000, "<an integer of about 5,001 digits>"),
        (-(10**100), "-<an integer of about 101 digits>"),
        (1.5, "1.5"),
        (None, "None"),
    ],
    ids=["short", "long", "escapes", "list", "nested", "huge int", "big negative int", "float", "None"],
)
def test_excerpt(value: object, expected: str) -> None:
    assert excerpt(value) == expected
    assert len(excerpt(value)) < 100
