"""Search spaces: which optimizer hyperparameters a study searches, and over which ranges.

A space is a YAML file (format in docs/architecture.md). The shipped ones live in ``search_spaces/``
and are loaded by name (``load_space("sofim")``); a user's own is loaded by path.
:func:`load_space` validates everything a sampler or an optimizer would otherwise trip
over later, and raises :class:`UserInputError` with one line naming the file and the key.

The helpers under "Shared validation" are also used by :mod:`sofim_tune.spec`, so that
both file formats report errors the same way.

A user's file is untrusted input: it is read only up to :data:`MAX_FILE_BYTES`, parsed
without aliases, anchors or deep nesting (so no "billion laughs"), and any value quoted
back in a message is cut to a short :func:`excerpt`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from sofim_tune.errors import UserInputError
from sofim_tune.files import read_head
from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, hyperparameter_problem

__all__ = [
    "MAX_FILE_BYTES",
    "OPTIMIZER_HYPERPARAMETERS",
    "ParamRange",
    "SearchSpace",
    "load_space",
    "space_names",
]

# ---------------------------------------------------------------------------------------
# Shared validation (also used by spec.py)
# ---------------------------------------------------------------------------------------


#: Largest user's file (space or spec) read; a bigger one is refused before parsing.
MAX_FILE_BYTES = 2**20

EXCERPT_LIMIT = 60
_EXCERPT_REPR = reprlib.Repr()
_EXCERPT_REPR.maxlevel = 2  # a nested value shows its outer levels only
_EXCERPT_REPR.maxstring = _EXCERPT_REPR.maxother = EXCERPT_LIMIT
for _attr in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_EXCERPT_REPR, _attr, 4)

# Keys shown as they are in "<file>: <key>: ..."; any other key is shown as an excerpt.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,60}")

# Integers a file may give: anything a trial could use, and what SQLite stores as an int.
_MAX_INTEGER = 2**63 - 1


def excerpt(value: Any, limit: int = EXCERPT_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting a user's value in a message.

    A longer text or container ends in ``…`` and says how long it was, so a message that
    quotes a user's file stays one short line however big the value (``'aaa…' (1,000,000
    characters)``). Never builds the full ``repr`` of a big value.
    """
    size = ""
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
        size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(value):,} bytes"
        if len(value) <= limit and len(text) <= limit + 3:
            return text
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # repr of a huge int is slow, and refused past 4300 digits.
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}<an integer of about {digits:,} digits>"
    else:
        try:
            text = _EXCERPT_REPR.repr(value)
        except Exception:  # a value whose repr fails still gets a message
            text = f"<{type(value).__name__}>"
        if isinstance(value, Collection):
            try:
                size = f"{len(value):,} items"
            except Exception:
                size = ""
        if len(text) <= limit:
            return text
    return f"{text[:limit]}…" + (f" ({size})" if size else "")


def one_line(text: Any, limit: int = 160) -> str:
    """``str(text)`` on one line, at most about ``limit`` characters (for a parser's message)."""
    text = " ".join(str(text)[: limit * 4].split())
    return text if len(text) <= limit else text[:limit] + "…"


def key_text(key: Any) -> str:
    """``key`` as a message shows it: a plain short name as is, anything else as an excerpt."""
    return key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else excerpt(key)


def input_error(source: str, key: str, message: str) -> UserInputError:
    """The one-line error for bad input: ``"<file>: <key>: <message>"`` (key may be empty).

    Quote a user's value in ``message`` with :func:`excerpt` and a user's key in ``key``
    with :func:`key_text`, never as it is.
    """
    return UserInputError(f"{source}: {key}: {message}" if key else f"{source}: {message}")


def check_keys(table: Mapping[Any, Any], allowed: Collection[str], source: str, prefix: str = "") -> None:
    """Raise for the first key of ``table`` that is not in ``allowed``, listing the valid ones.

    ``prefix`` is the dotted path of ``table`` inside the file, ending in ``"."``.
    """
    for key in table:
        if not isinstance(key, str) or key not in allowed:
            raise input_error(source, f"{prefix}{key_text(key)}", f"unknown key; valid keys: {', '.join(allowed)}")


def _check_type(value: Any, types: tuple[type, ...], wanted: str, source: str, key: str) -> None:
    # bool is an int to Python, but `epochs = true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, types):
        raise input_error(source, key, f"expected {wanted}, got {excerpt(value)}")


def as_number(value: Any, source: str, key: str) -> float:
    """``value`` as a finite float; raises for text, booleans, NaN, infinities and huge ints."""
    _check_type(value, (int, float), "a number", source, key)
    try:
        number = float(value)
    except OverflowError:  # an int past the float range
        number = math.inf
    require(math.isfinite(number), source, key, f"expected a finite number, got {excerpt(value)}")
    return number


def as_integer(value: Any, source: str, key: str) -> int:
    """``value`` as a signed 64-bit int; raises for floats (even ``10.0``), text and booleans."""
    _check_type(value, (int,), "an integer", source, key)
    require(
        -_MAX_INTEGER <= value <= _MAX_INTEGER,
        source,
        key,
        f"expected an integer of at most 19 digits, got {excerpt(value)}",
    )
    return int(value)


def require(condition: bool, source: str, key: str, message: str) -> None:
    """Raise ``input_error(source, key, message)`` unless ``condition`` holds."""
    if not condition:
        raise input_error(source, key, message)


class SourceFile(NamedTuple):
    """A spec or space file, shipped or the user's, read as text."""

    label: str  # how messages name it: "search_spaces/sofim.yaml" or the path as given
    name: str  # the file name without its suffix
    text: str
    folder: Path | None  # folder of a user's file (relative paths in it start there); None if shipped


def shipped_names(package: str, suffixes: tuple[str, ...]) -> list[str]:
    """Names (file stems) of the files with one of ``suffixes`` shipped in ``package``."""
    return sorted(
        entry.name.rsplit(".", 1)[0]
        for entry in files(package).iterdir()
        if entry.is_file() and entry.name.endswith(suffixes)
    )


def is_shipped_name(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is meant as the name of a shipped file rather than a path.

    A bare word without a suffix (``"sofim"``, ``"cifar100-resnet18"``) is a name; anything
    with a folder or a suffix (``"my.yaml"``, ``"./sofim"``) is a path.
    """
    return isinstance(name_or_path, str) and Path(name_or_path).name == name_or_path and "." not in name_or_path


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a user's file, in a few words; None for a regular file.

    Asked before opening: opening a named pipe would wait for a writer forever.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    except ValueError:  # a NUL in the path
        return "cannot read: not a valid path"
    if stat.S_ISDIR(mode):
        return "a folder, not a regular file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def read_source(name_or_path: str | Path, package: str, suffixes: tuple[str, ...], what: str) -> SourceFile:
    """Read a shipped file by name, or a user's file by path.

    ``what`` names the kind of file in messages (``"search space"``); ``suffixes`` are the
    endings shipped files have, the first being the one to suggest.
    """
    if is_shipped_name(name_or_path):
        name = str(name_or_path)
        known = shipped_names(package, suffixes)
        if name not in known:
            raise UserInputError(
                f"unknown {what} {excerpt(name)}; shipped: {', '.join(known)}; or give a path to a {suffixes[0]} file"
            )
        folder = files(package)
        entry = next(folder.joinpath(name + s) for s in suffixes if folder.joinpath(name + s).is_file())
        return SourceFile(f"{package.rsplit('.', 1)[-1]}/{entry.name}", name, entry.read_text(encoding="utf-8"), None)
    path = Path(name_or_path)
    label = str(path)
    problem = not_a_file(path)
    if problem == "no such file":
        raise input_error(label, "", f"{what} file not found")
    if problem is not None:
        raise input_error(label, "", problem)
    try:
        data = read_head(path, MAX_FILE_BYTES + 1)  # no more, whatever the file is
    except UserInputError as exc:  # it changed since not_a_file looked
        raise input_error(label, "", str(exc)) from None
    if data is None:
        raise input_error(label, "", f"{what} file not found")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise input_error(label, "", "not a text file (expected UTF-8)") from None
    require(
        len(data) <= MAX_FILE_BYTES,
        label,
        "",
        f"larger than {MAX_FILE_BYTES // 2**20} MiB; a {what} file is a few lines",
    )
    return SourceFile(label, path.stem, text, path.parent)


# ---------------------------------------------------------------------------------------
# What the optimizers take
# ---------------------------------------------------------------------------------------

# Training settings a space may pin next to the optimizer's hyperparameters: counts, >= 1.
_TRAINING_KEYS = ("batch_size", "epochs")
_INTEGER_KEYS = frozenset(_TRAINING_KEYS)

# "lr_over_rho": the sampler searches lr/rho and rho; lr = lr_over_rho * rho. See
# search_spaces/sofim-effective.yaml for why.
_REPARAMETERIZATIONS = ("lr_over_rho",)

_TOP_KEYS = ("optimizer", "params", "fixed", "reparameterization")
_RANGE_KEYS = ("type", "low", "high", "log")
_TYPES = ("float", "int")
_SUFFIXES = (".yaml", ".yml")
_PACKAGE = "sofim_tune.search_spaces"

# A value computed back from a reparameterized setting (lr / rho) can land an ulp outside
# a bound it was sampled at; this much relative slack keeps such a setting enqueueable.
_BOUND_RTOL = 1e-9


def _optimizer_name(param: str) -> str:
    """The optimizer hyperparameter a searched parameter sets (lr_over_rho sets lr)."""
    return "lr" if param == "lr_over_rho" else param


def _check_domain(name: str, value: float, source: str, key: str) -> None:
    """Raise unless ``value`` lies in the domain of ``name`` (checked for fixed values and both ends
    of a range): a training setting's (>= 1), or the optimizer's own rule, which trial configs and
    best.json follow too (``optim.HYPERPARAMETER_DOMAINS``)."""
    if name in _INTEGER_KEYS:
        require(value >= 1, source, key, f"must be >= 1 (got {value:g})")
        return
    # lr = lr_over_rho * rho with rho > 0, so lr_over_rho has lr's domain.
    problem = hyperparameter_problem(_optimizer_name(name), value, label=name)
    require(problem is None, source, key, str(problem))


# ---------------------------------------------------------------------------------------
# The space
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRange:
    """One searched parameter.

    Attributes:
        name: the sampler's name for it (an optimizer hyperparameter, or ``lr_over_rho``).
        type: ``"float"`` or ``"int"`` (integer bounds, integer samples).
        low, high: inclusive bounds, ``low < high``, in the parameter's own units.
        log: sample uniformly in log space (``low > 0``); right for scale parameters
            such as ``lr`` and ``rho`` that matter by orders of magnitude.
    """

    name: str
    type: Literal["float", "int"]
    low: float
    high: float
    log: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in ``[low, high]`` (up to float round-off at the ends)."""
        def at_least(a: float, b: float) -> bool:
            return a >= b or math.isclose(a, b, rel_tol=_BOUND_RTOL)

        integral = self.type == "float" or float(value).is_integer()
        return integral and at_least(value, self.low) and at_least(self.high, value)


@dataclass(frozen=True)
class SearchSpace:
    """What a study searches and what it holds fixed. Build it with :func:`load_space`.

    Attributes:
        name: the file's name without suffix (``"sofim"``).
        optimizer: ``"sofim"``, ``"sgd-momentum"`` or ``"adamw"``.
        params: what the sampler searches, in file order, by the sampler's names.
        fixed: values passed unchanged to every trial: optimizer hyperparameters
            (``weight_decay``, ...) as floats, ``batch_size`` and ``epochs`` as ints.
        reparameterization: None, or ``"lr_over_rho"`` (the sampler searches ``lr_over_rho``
            and ``rho``; the optimizer gets ``lr = lr_over_rho * rho``).
        source: the file it came from, as error messages name it.
    """

    name: str
    optimizer: str
    params: dict[str, ParamRange]
    fixed: dict[str, Any]
    reparameterization: str | None = None
    source: str = ""

    def to_hyperparameters(self, searched: Mapping[str, float]) -> dict[str, float]:
        """The optimizer's hyperparameters (``lr``, ``rho``, ...) for one sampled point.

        ``searched`` maps every name in :attr:`params` to its sampled value; the result
        holds the searched hyperparameters only (merge :attr:`fixed` for the rest).
        """
        hyperparameters: dict[str, float] = {}
        for name in self.params:
            if name == "lr_over_rho":
                hyperparameters["lr"] = float(searched["lr_over_rho"]) * float(searched["rho"])
            else:
                hyperparameters[name] = float(searched[name])
        return hyperparameters

    def from_hyperparameters(self, hyperparameters: Mapping[str, float]) -> dict[str, float]:
        """The sampler's values for a known setting, inverse of :meth:`to_hyperparameters`.

        Used to enqueue a setting (a spec's ``enqueue`` entry, a previous ``best.json``).
        Every searched hyperparameter must be given; a fixed one may be given only with
        its fixed value. Raises :class:`UserInputError` for an unknown or missing name, or
        a value outside the space, naming the space's file and the parameter.
        """
        wanted = [_optimizer_name(name) for name in self.params]
        for key, value in hyperparameters.items():
            if key in wanted or (key in self.fixed and value == self.fixed[key]):
                continue
            reason = (
                f"fixed at {self.fixed[key]:g} by this space, got {excerpt(value)}"
                if key in self.fixed
                else f"not searched by this space (it searches {', '.join(wanted)})"
            )
            raise input_error(self.source, key_text(key), reason)
        missing = [key for key in wanted if key not in hyperparameters]
        require(not missing, self.source, ", ".join(missing), "missing from the setting to enqueue")
        values = {key: as_number(hyperparameters[key], self.source, key) for key in wanted}

        searched: dict[str, float] = {}
        # Check rho (> 0) before lr_over_rho divides by it.
        for name in sorted(self.params, key=lambda n: n == "lr_over_rho"):
            bounds = self.params[name]
            value = values["lr"] / searched["rho"] if name == "lr_over_rho" else values[name]
            shown = "lr/rho" if name == "lr_over_rho" else name
            allowed = (
                f"the integers {bounds.low}..{bounds.high}" if bounds.type == "int" else f"[{bounds.low:g}, {bounds.high:g}]"
            )
            require(bounds.contains(value), self.source, f"params.{name}", f"{shown} = {value:g} is not in {allowed}")
            searched[name] = min(max(value, bounds.low), bounds.high)
        return {name: searched[name] for name in self.params}

    @property
    def log_hyperparameters(self) -> frozenset[str]:
        """Optimizer hyperparameters best shown on log axes: those searched on a log scale."""
        return frozenset(_optimizer_name(name) for name, p in self.params.items() if p.log)

    def fingerprint(self) -> str:
        """A 12-hex-digit hash of what the space searches and fixes.

        Stable across runs and independent of file order, name and location, so a study
        can tell whether it was created with the same space.
        """
        canonical = json.dumps(self._content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Inverse of :meth:`to_dict`, validated like a file (for spaces stored with a study)."""
        raw = {key: data[key] for key in _TOP_KEYS if data.get(key) is not None}
        return _parse_space(raw, data["name"], data.get("source") or data["name"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, with its fingerprint, for storing in study attributes."""
        return {"name": self.name, **self._content(), "source": self.source, "fingerprint": self.fingerprint()}

    def _content(self) -> dict[str, Any]:
        # What decides the trials' settings; name and source do not.
        return {
            "optimizer": self.optimizer,
            "params": {
                name: {"type": p.type, "low": p.low, "high": p.high, "log": p.log} for name, p in self.params.items()
            },
            "fixed": dict(self.fixed),
            "reparameterization": self.reparameterization,
        }


def space_names() -> list[str]:
    """Names of the shipped search spaces (``"sofim"``, ``"sofim-effective"``, ...)."""
    return shipped_names(_PACKAGE, _SUFFIXES)


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a shipped space by name, or a user's ``.yaml`` file by path.

    Raises :class:`UserInputError` naming the file and the key for anything invalid. A
    user's file is refused above :data:`MAX_FILE_BYTES`, with YAML aliases or anchors,
    nested deeper than 16 levels, or with more than 10,000 values.
    """
    file = read_source(name_or_path, _PACKAGE, _SUFFIXES, "search space")
    try:
        raw = yaml.load(file.text, Loader=_SpaceLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = one_line(str(getattr(exc, "problem", None) or "cannot parse"))
        prefix = "" if isinstance(exc, _RefusedYAML) else "not valid YAML: "
        raise input_error(file.label, "", f"{prefix}{problem}{where}") from None
    return _parse_space(raw, file.name, file.label)


# A space is three levels deep (params -> name -> range) and has a few dozen values; more
# is a mistake, or an attack on PyYAML's recursive composer and its slow pure-Python parser.
_MAX_DEPTH = 16
_MAX_NODES = 10_000


class _RefusedYAML(yaml.composer.ComposerError):
    """Valid YAML that a space may not use."""


class _SpaceLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only) without aliases, anchors or deep nesting.

    An alias makes a small file expand to a huge value ("billion laughs"); a space never
    needs one. Errors a value's constructor raises (a date in year 0, an int of 5000
    digits) become YAML errors with the value's line.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedYAML(
                None,
                None,
                f"YAML aliases (*{one_line(event.anchor, 40)}) are not allowed in a search space; write the values out",
                event.start_mark,
            )
        if event.anchor is not None:
            raise _RefusedYAML(
                None,
                None,
                f"YAML anchors (&{one_line(event.anchor, 40)}) and aliases are not allowed in a search space; write the values out",
                event.start_mark,
            )
        if self._depth >= _MAX_DEPTH:
            raise _RefusedYAML(None, None, f"nested deeper than {_MAX_DEPTH} levels", event.start_mark)
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise _RefusedYAML(None, None, f"more than {_MAX_NODES:,} values; a search space has a few dozen", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            reason = str(exc).split(";")[0]  # Python's int limit goes on about sys.set_int_max_str_digits
            shown = excerpt(node.value) if isinstance(node.value, str) else "here"
            message = f"cannot read the value {shown}: {reason}"
            raise yaml.constructor.ConstructorError(None, None, one_line(message), node.start_mark) from None


def _parse_space(raw: Any, name: str, source: str) -> SearchSpace:
    require(
        isinstance(raw, dict),
        source,
        "",
        f"expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(raw).__name__}",
    )
    check_keys(raw, _TOP_KEYS, source)
    for key in ("optimizer", "params"):
        require(key in raw, source, key, "missing")
    optimizer = raw["optimizer"]
    require(
        isinstance(optimizer, str) and optimizer in OPTIMIZER_HYPERPARAMETERS,
        source,
        "optimizer",
        f"unknown optimizer {excerpt(optimizer)}; choose one of {', '.join(OPTIMIZER_HYPERPARAMETERS)}",
    )
    reparameterization = raw.get("reparameterization")
    require(
        reparameterization is None or reparameterization in _REPARAMETERIZATIONS,
        source,
        "reparameterization",
        f"unknown reparameterization {excerpt(reparameterization)}; choose one of {', '.join(_REPARAMETERIZATIONS)} or leave it out",
    )
    takes = OPTIMIZER_HYPERPARAMETERS[optimizer]
    if reparameterization == "lr_over_rho":
        require("rho" in takes, source, "reparameterization", f"lr_over_rho needs an optimizer with rho, not {optimizer}")
        searchable = tuple("lr_over_rho" if key == "lr" else key for key in takes)
    else:
        searchable = takes

    params_raw = raw["params"]
    require(
        isinstance(params_raw, dict) and bool(params_raw),
        source,
        "params",
        "expected a non-empty mapping of name -> {type, low, high, log}",
    )
    params: dict[str, ParamRange] = {}
    for key, spec in params_raw.items():
        if reparameterization == "lr_over_rho" and key == "lr":
            raise input_error(source, "params.lr", "with reparameterization lr_over_rho, search lr_over_rho instead")
        require(
            key in searchable,
            source,
            f"params.{key_text(key)}",
            f"optimizer {optimizer} takes no {excerpt(key)}; searchable: {', '.join(searchable)}",
        )
        params[key] = _parse_range(key, spec, source)
    if reparameterization == "lr_over_rho":
        require(
            "lr_over_rho" in params and "rho" in params,
            source,
            "reparameterization",
            "lr_over_rho needs both params.lr_over_rho and params.rho",
        )

    fixed_raw = raw.get("fixed") or {}
    require(isinstance(fixed_raw, dict), source, "fixed", "expected a mapping of name -> value")
    fixable = tuple(key for key in searchable if key != "lr_over_rho") + _TRAINING_KEYS
    check_keys(fixed_raw, fixable, source, "fixed.")
    fixed: dict[str, Any] = {}
    for key, value in fixed_raw.items():
        where = f"fixed.{key}"
        require(key not in params, source, where, f"also searched under params.{key}; keep one")
        fixed[key] = (as_integer if key in _INTEGER_KEYS else as_number)(value, source, where)
        _check_domain(key, fixed[key], source, where)

    return SearchSpace(name, optimizer, params, fixed, reparameterization, source)


def _parse_range(name: str, spec: Any, source: str) -> ParamRange:
    where = f"params.{name}"
    require(isinstance(spec, dict), source, where, "expected a mapping like {type: float, low: 0.1, high: 1.0}")
    check_keys(spec, _RANGE_KEYS, source, f"{where}.")
    kind = spec.get("type", "float")
    require(kind in _TYPES, source, f"{where}.type", f"unknown type {excerpt(kind)}; choose one of {', '.join(_TYPES)}")
    bounds = []
    for bound in ("low", "high"):
        require(bound in spec, source, f"{where}.{bound}", "missing")
        value = spec[bound]
        # PyYAML follows YAML 1.1, which reads 1e-4 (no decimal point) as text.
        require(
            not (isinstance(value, str) and _is_float_text(value)),
            source,
            f"{where}.{bound}",
            f"{excerpt(value)} is text to YAML; write the exponent with a decimal point, e.g. 1.0e-4",
        )
        bounds.append((as_integer if kind == "int" else as_number)(value, source, f"{where}.{bound}"))
    low, high = bounds
    log = spec.get("log", False)
    require(isinstance(log, bool), source, f"{where}.log", f"expected true or false, got {excerpt(log)}")
    require(low < high, source, where, f"low ({low}) must be < high ({high})")
    require(not log or low > 0, source, f"{where}.low", f"must be > 0 for a log range (got {low})")
    _check_domain(name, low, source, f"{where}.low")
    _check_domain(name, high, source, f"{where}.high")
    return ParamRange(name, kind, low, high, log)


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
