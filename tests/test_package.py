"""The wheel: one import package, with the search spaces, study specs, schema and CLI inside."""

from __future__ import annotations

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
