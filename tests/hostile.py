"""The harness of the hostile-input suite (``tests/test_hostile.py``).

A :class:`CliCase` is one command a careless or hostile user could type, with the files it finds
in its folder. Running it checks what every such case must keep, whatever it is about:

- the exit code (2 for bad input: one line on stderr, naming the problem), and no traceback;
- every file that existed before the command, in the case's folder and in the finished run
  folder it was given, has the same bytes after it (sha256), and no symlink has moved;
- no process that the command started is left running;
- where ``memory_mb`` is set, the command ran under that address-space limit (``RLIMIT_AS``),
  so a runaway allocation fails inside the limit instead of swapping the machine to death;
- none of ``secrets`` shows up in its output.

An :class:`ApiCase` is the same for a Python call: it must raise the project's ``UserInputError``
(a ``ValueError``), not a ``RecursionError``, ``TypeError`` or nothing at all.

Cases live in ``tests/hostile_*.py`` modules, one per area, each exporting ``CLI_CASES`` and
``API_CASES``; ``test_hostile.py`` collects them all into one parametrized suite.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

CLI = [sys.executable, "-m", "sofim_tune.cli.app"]


@dataclass(frozen=True)
class CliCase:
    """One hostile command line.

    Attributes:
        id: the test id, e.g. ``"journal-into-a-users-file"``.
        args: the CLI arguments, given the case's scratch folder (the command's working
            directory) and the path of a finished digits run folder (``None`` unless
            ``needs_run``); it may write the files the command is to find.
        exit_code: the exit code the command must end with.
        message: text the one stderr line must contain (for exit code 2).
        needs_run: the case gets a copy of a finished tiny digits run folder
            (``<scratch>/run``) before ``args`` is called.
        memory_mb: an address-space limit for the command, in MiB.
        timeout: seconds before the case fails as a runaway.
        secrets: strings that must appear nowhere in stdout or stderr.
        check: more assertions on the finished command: ``check(scratch, completed)``.
    """

    id: str
    args: Callable[[Path, Path | None], Sequence[str]]
    exit_code: int = 2
    message: str = ""
    needs_run: bool = False
    memory_mb: int | None = None
    timeout: float = 180.0
    secrets: tuple[str, ...] = ()
    check: Callable[[Path, subprocess.CompletedProcess[str]], None] | None = None


@dataclass(frozen=True)
class ApiCase:
    """One hostile Python call: ``call(scratch)`` must raise ``UserInputError`` matching ``message``."""

    id: str
    call: Callable[[Path], Any]
    message: str = ""
    setup: Callable[[Path], None] | None = field(default=None)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` and the target of every symlink, by relative path.

    Symlinks are recorded, never followed, so a link to a folder outside ``root`` is not walked.
    """
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*files, *dirs]:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "symlink -> " + os.readlink(path)
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    """Every file of ``before`` still exists under ``root`` with the same bytes (new files are allowed)."""
    after = snapshot(root)
    changed = {key: (digest, after.get(key, "missing")) for key, digest in before.items() if after.get(key) != digest}
    assert not changed, f"files changed by the command: {changed}"


def _limit_memory(megabytes: int | None) -> Callable[[], None] | None:
    if megabytes is None:
        return None

    def preexec() -> None:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return preexec


def leftover_processes(session_leader: int) -> list[str]:
    """Command lines of every process still alive in the command's session (it runs in a new one)."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getsid(proc.pid) == session_leader and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(" ".join(proc.info["cmdline"] or []) or str(proc.pid))
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def run_cli_case(case: CliCase, scratch: Path, run_dir: Path | None) -> subprocess.CompletedProcess[str]:
    """Run ``case`` in ``scratch`` and assert everything every hostile case must keep."""
    args = [str(a) for a in case.args(scratch, run_dir)]
    before = snapshot(scratch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        [*CLI, *args],
        cwd=scratch,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_limit_memory(case.memory_mb),
    )
    try:
        stdout, stderr = process.communicate(timeout=case.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise AssertionError(f"{case.id}: still running after {case.timeout} s (a runaway)") from None
    finally:
        left = leftover_processes(process.pid)
        if left:
            os.killpg(process.pid, 9)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    output = stdout + stderr
    assert "Traceback" not in output, output
    assert done.returncode == case.exit_code, f"exit {done.returncode}, expected {case.exit_code}:\n{output}"
    if case.exit_code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("error:") and case.message in lines[0], stderr
    elif case.message:
        assert case.message in output, output
    for secret in case.secrets:
        assert secret not in output, f"{secret!r} leaked: {output}"
    assert not left, f"processes left behind: {left}"
    assert_unchanged(before, scratch)
    if case.check is not None:
        case.check(scratch, done)
    return done
