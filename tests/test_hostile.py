"""The hostile-input suite: every malformed or hostile input we know of, as one parametrized test.

Each case ends as the README's "Files and safety" section promises: one line and exit 2 (or the
documented exit), no traceback, no earlier file changed, no process left behind, memory bounded
where it is about memory, and no secret printed. The cases live in ``hostile_*.py`` beside this
file, one module per area; ``hostile.py`` is the harness that checks all of the above.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
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


@pytest.fixture(scope="module")
def cli_outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseException | None]:
    """Every selected CLI case, run ahead two at a time, each in a folder of its own: what it raised, by id.

    Most of a case is the CLI's start (importing torch), one core's work, so two at once halve
    the suite's time on a 2-core machine. Each case runs in its own session and folder, so the
    harness's checks (files, processes) see only its own.
    """
    selected = [item.callspec.params["case"] for item in request.session.items if getattr(item, "originalname", None) == "test_cli"]
    finished = request.getfixturevalue("finished_run") if any(case.needs_run for case in selected) else None

    def attempt(case: CliCase) -> BaseException | None:
        scratch = tmp_path_factory.mktemp(case.id)
        run_dir = None
        if case.needs_run:
            run_dir = scratch / "run"
            shutil.copytree(finished, run_dir, symlinks=True)
        try:
            run_cli_case(case, scratch, run_dir)
        except BaseException as exc:  # noqa: BLE001 - reported by the case's own test
            return exc
        return None

    with ThreadPoolExecutor(2) as pool:
        return dict(zip((case.id for case in selected), pool.map(attempt, selected)))


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda case: case.id)
def test_cli(case: CliCase, cli_outcomes: dict[str, BaseException | None]) -> None:
    outcome = cli_outcomes[case.id]
    if outcome is not None:
        raise outcome


@pytest.mark.parametrize("case", API_CASES, ids=lambda case: case.id)
def test_api(case: ApiCase, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    with pytest.raises(UserInputError, match=case.message):
        case.call(tmp_path)
