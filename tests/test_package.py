"""The wheel: one import package, with the search spaces, study specs, schema and CLI inside."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300, cwd=out,
    )
    assert build.returncode == 0, build.stderr
    return zipfile.ZipFile(next(out.glob("sofim_tune-*.whl")))


def test_wheel_exposes_only_sofim_tune(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"sofim_tune"}


def test_wheel_carries_spaces_specs_schema_and_cli(wheel):
    names = set(wheel.namelist())
    for space in ("sofim", "sofim-effective", "sgd-momentum", "adamw"):
        assert f"sofim_tune/search_spaces/{space}.yaml" in names
    assert "sofim_tune/studies/cifar100-resnet18.toml" in names
    assert "sofim_tune/studies/digits-mlp.toml" in names
    assert "sofim_tune/recommendation.schema.json" in names
    assert "sofim_tune/cli/app.py" in names
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sofim-tune = sofim_tune.cli.app:main" in entry_points


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("train", "run", "export", "plot", "show", "recommend"):
        assert command in done.stdout


def test_the_layers_hold():
    """pyproject.toml's import-linter contracts: every import points down, and the backends
    do not import each other (docs/architecture.md draws the layers)."""
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_docs_cite_files_that_exist():
    """Docstrings and comments point at the README or docs/, never at a file the project lacks."""
    cited = set()
    for path in [*ROOT.joinpath("sofim_tune").rglob("*.py"), *ROOT.joinpath("cli").glob("*.py"), *ROOT.joinpath("benchmarks").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        cited |= {word.strip("`'\"(),.:;") for word in text.split() if word.strip("`'\"(),.:;").endswith(".md")}
    assert cited, "no citations found: the check itself is broken"
    assert {name for name in cited if not (ROOT / name).exists()} == set()


_GLOBAL_STATE = r"""
import ast, contextlib, importlib, json, logging, os, pathlib, pkgutil, sys, warnings

# torch, Ray and others configure loggers and variables of their own when imported: they are
# imported first, every module the project's sources name, so what is left is the project's doing.
sources = [*pathlib.Path("sofim_tune").rglob("*.py"), *pathlib.Path("cli").glob("*.py")]
for tree in (ast.parse(path.read_text()) for path in sources):
    for node in ast.walk(tree):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            if name.split(".")[0] not in ("sofim_tune", "cli"):
                with contextlib.suppress(Exception):
                    importlib.import_module(name)

def state():
    loggers = {"": logging.getLogger()} | {name: logger for name, logger in logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
    return {
        # A logger created by an import is no change; one that a module configured is.
        "loggers": {name: [logger.level, [type(h).__name__ for h in logger.handlers], logger.propagate, logger.disabled]
                    for name, logger in loggers.items() if logger.level or logger.handlers or not logger.propagate or logger.disabled},
        "disable": logging.root.manager.disable,
        "warnings": [repr(f) for f in warnings.filters],
        "environ": dict(os.environ),
    }

before = state()
import sofim_tune
for module in pkgutil.walk_packages(sofim_tune.__path__, "sofim_tune."):
    importlib.import_module(module.name)
importlib.import_module("sofim_tune.cli.app")
after = state()
def changed(old, new):
    if isinstance(old, dict):
        return {key: [old.get(key), new.get(key)] for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
    if isinstance(old, list):
        return [item for item in new if item not in old] + [f"removed {item}" for item in old if item not in new]
    return [old, new] if old != new else None
print(json.dumps({key: found for key in before if (found := changed(before[key], after[key]))}))
"""


def test_importing_the_library_changes_nothing_global():
    """Importing every module of sofim_tune, the CLI's included, leaves the process as it was:
    the level, handlers and propagation of every logger, the warning filters and os.environ.
    (The CLI sets its log handler, Optuna's verbosity and its warning filter when a command starts.)"""
    done = subprocess.run([sys.executable, "-c", _GLOBAL_STATE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def test_verbose_and_quiet_set_what_the_cli_prints():
    """-q leaves the library's notes out, -v adds Optuna's INFO lines; giving both is refused."""
    script = (
        "import logging, optuna, warnings\n"
        "from sofim_tune.cli.app import configure_output\n"
        "configure_output(verbose={verbose}, quiet={quiet})\n"
        "logging.getLogger('sofim_tune.study').info('a library note')\n"
        "print(optuna.logging.get_verbosity(), sum(1 for f in warnings.filters if f[2] is optuna.exceptions.ExperimentalWarning))\n"
    )
    for verbose, quiet, shown, verbosity in ((False, False, True, "40"), (True, False, True, "20"), (False, True, False, "40")):
        done = subprocess.run([sys.executable, "-c", script.format(verbose=verbose, quiet=quiet)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert ("note: a library note" in done.stderr) is shown
        assert done.stdout.split() == [verbosity, "1"]
    both = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "-v", "-q", "show"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and both.stderr.strip() == "error: give --verbose or --quiet, not both"


def _readme_example(needle: str) -> str:
    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if needle in block)


def test_the_readmes_python_api_examples_run_as_written(tmp_path):
    """The README's whole study from Python, and its own Optuna study with OptunaReporter."""
    for needle, expected in (("tune(load_spec(", "best.json"), ("OptunaReporter(trial)", "'lr': ")):
        done = subprocess.run([sys.executable, "-c", _readme_example(needle)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout, done.stdout
    assert (tmp_path / "runs" / "from-python" / "best.json").is_file()


def test_the_api_the_cli_uses_is_importable_from_the_package():
    import sofim_tune

    for name in ("tune", "compare", "load_spec", "StudySpec", "RunOptions", "OptunaReporter", "train_trial", "TrialConfig"):
        assert name in sofim_tune.__all__ and getattr(sofim_tune, name) is not None
