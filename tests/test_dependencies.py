"""Every third-party module the package imports is a declared dependency in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "sofim_tune", ROOT / "cli"]
# Import names whose distribution is named otherwise, for modules not installed here (the
# installed ones are looked up in their metadata).
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "grpc": "grpcio"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level_modules() -> dict[str, set[str]]:
    """Top-level names of every absolute import under the package's sources, with the files importing each."""
    found: dict[str, set[str]] = {}
    for source in SOURCES:
        for path in source.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: files for name, files in modules.items() if name not in sys.stdlib_module_names and name not in ("sofim_tune", "__future__")}


def declared_distributions() -> set[str]:
    """The distributions pyproject.toml's [project] dependencies name, markers and extras aside."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {_normalized(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)) for requirement in project["dependencies"]}


def distributions_of(module: str) -> set[str]:
    installed = importlib.metadata.packages_distributions().get(module)
    return {_normalized(name) for name in installed} if installed else {_normalized(DISTRIBUTIONS.get(module, module))}


def test_the_walk_sees_the_imports_it_checks():
    """The check would pass vacuously if the walk found nothing: it must see torch and typer, and no stdlib module."""
    found = third_party(imported_top_level_modules())
    assert {"torch", "optuna", "typer"} <= set(found)
    assert not {"json", "os", "pathlib"} & set(found)


def test_every_imported_third_party_module_is_declared():
    declared = declared_distributions()
    undeclared = {module: sorted(files) for module, files in third_party(imported_top_level_modules()).items() if not distributions_of(module) & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml's dependencies: {undeclared}"


def test_torch_and_torchvision_keep_their_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert {"torch>=2.4", "torchvision>=0.19"} <= set(project["dependencies"])
