"""The hostile-input suite: every malformed or hostile input we know of, as one parametrized test.

Each case ends as the README's "Files and safety" section promises: one line and exit 2 (or the
documented exit), no traceback, no earlier file changed, no process left behind, memory bounded
where it is about memory, and no secret printed. The cases live in ``hostile_*.py`` beside this
file, one module per area; ``hostile.py`` is the harness that checks all of the above.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import hostile_cli
import hostile_ray
import hostile_results
import hostile_runtime
import hostile_storage
from hostile import ApiCase, CliCase, run_cli_case
from sofim_tune.errors import UserInputError
from sofim_tune.spec import load_spec
from sofim_tune.tuning import RunOptions, tune

AREAS = [hostile_cli, hostile_ray, hostile_results, hostile_runtime, hostile_storage]
CLI_CASES: list[CliCase] = [case for area in AREAS for case in area.CLI_CASES]
API_CASES: list[ApiCase] = [case for area in AREAS for case in area.API_CASES]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny digits run folder; each case that needs one gets its own copy."""
    out = tmp_path_factory.mktemp("hostile") / "digits-mlp"
    spec = load_spec("digits").replace(trials=3, epochs=1, confirm_top=1, confirm_seeds=2)
    tune(spec, RunOptions(out_dir=out, device="cpu", workers=1))
    return out


def test_case_ids_are_unique():
    ids = [case.id for case in CLI_CASES] + [case.id for case in API_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda case: case.id)
def test_cli(case: CliCase, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_dir = None
    if case.needs_run:
        run_dir = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("finished_run"), run_dir, symlinks=True)
    run_cli_case(case, tmp_path, run_dir)


@pytest.mark.parametrize("case", API_CASES, ids=lambda case: case.id)
def test_api(case: ApiCase, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    with pytest.raises(UserInputError, match=case.message):
        case.call(tmp_path)
