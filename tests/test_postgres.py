"""Optuna studies in PostgreSQL, end to end through the CLI: workers, a worker killed, no password anywhere.

These tests need a PostgreSQL server whose URL is in ``SOFIM_TUNE_TEST_POSTGRES``
(``postgresql://USER:PASSWORD@HOST:PORT/DB``, a role that may create databases: each test gets
its own). ``.ci/run`` starts Debian's server and sets it. Without it they skip, except under
``CI=true``, where they fail: CI never skips them. With a superuser URL, the tests make their
own role with a random password, so that the password they look for in every output and file
is one no text holds by chance.

The CLI always gets the URL through ``--storage-env``, set only in its own environment.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.errors import UserInputError
from sofim_tune.files import redact_storage_message, redact_storage_url

ENV = "SOFIM_TUNE_TEST_POSTGRES"
STORAGE_VAR = "SOFIM_TUNE_TEST_STORAGE"  # the variable the CLI reads, in its own environment only
CLI = [sys.executable, "-m", "sofim_tune.cli.app"]
SMALL = ["--device", "cpu", "--confirm-top", "1", "--confirm-seeds", "2"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HOW = (
    f"set {ENV}=postgresql://USER:PASSWORD@HOST:PORT/DB (a role that may CREATE DATABASE), "
    "or run .ci/run, which installs and starts Debian's postgresql and sets it"
)
# A digits epoch takes a few hundredths of a second; this many keeps a trial running for
# a second or more, long enough to kill its worker in the middle of it.
KILL_EPOCHS = 30


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(why: str) -> None:
    message = f"PostgreSQL tests need a server: {why}; {HOW}"
    if _in_ci():
        pytest.fail(f"{message} (CI=true: these tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def _conninfo(url: str) -> str:
    """The URL as libpq reads it: ``postgresql://``, without SQLAlchemy's ``+driver``."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Server:
    """Where the tests' databases live: a role, its password, and an admin connection."""

    admin: object  # psycopg.Connection, autocommit
    base_url: str  # SQLAlchemy URL of the role the CLI uses
    password: str
    can_create_databases: bool
    created: list[str]
    own_role: str | None = None

    @property
    def distinctive(self) -> bool:
        """Whether the password is one no output or file holds by chance."""
        return len(self.password) >= 12 and self.password not in redact_storage_url(self.base_url)

    def database(self) -> str:
        """A fresh, empty database for one test (or the URL's own when the role may not create one)."""
        if not self.can_create_databases:
            return self.base_url
        name = f"sofim_test_{secrets.token_hex(6)}"
        owner = f" OWNER {self.own_role}" if self.own_role else ""
        self.admin.execute(f"CREATE DATABASE {name}{owner}")
        self.created.append(name)
        return make_url(self.base_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    url = os.environ.get(ENV)
    if not url:
        _unavailable(f"{ENV} is not set")
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[test]')")
    try:
        admin = psycopg.connect(_conninfo(url), autocommit=True, connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - any reason the server cannot be reached
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _unavailable(f"cannot connect to {redact_storage_url(url)}: {redact_storage_url(reason)}")
    superuser, createdb = admin.execute("SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone()
    server = Server(admin=admin, base_url=url, password=make_url(url).password or "", can_create_databases=superuser or createdb, created=[])
    if superuser:
        # A role of our own, with a password no text holds by chance.
        server.own_role, server.password = f"sofim_test_{secrets.token_hex(4)}", f"pw{secrets.token_hex(16)}"
        admin.execute(f"CREATE ROLE {server.own_role} LOGIN PASSWORD '{server.password}'")
        server.base_url = make_url(url).set(username=server.own_role, password=server.password).render_as_string(hide_password=False)
    try:
        yield server
    finally:
        for name in server.created:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if server.own_role:
            admin.execute(f"DROP ROLE IF EXISTS {server.own_role}")
        admin.close()


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


class Cli:
    """One ``sofim-tune`` process in a session of its own, so that it and its workers can be killed together."""

    def __init__(self, args: list[str], storage: str | None, logs: Path, *, command: list[str] = CLI) -> None:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if storage is not None:
            env[STORAGE_VAR] = storage
        logs.mkdir(parents=True, exist_ok=True)
        # Files, not pipes: nobody reads a pipe while the test polls the study.
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([*command, *map(str, args)], env=env, stdout=stdout, stderr=stderr, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float) -> Done:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"sofim-tune did not end within {timeout:.0f} s; stderr:\n{self.stderr_path.read_text(errors='replace')[-4000:]}")
        return Done(self.process.returncode, self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace"))

    def kill(self) -> None:
        """SIGKILL the CLI and every worker left in its session (its process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=30)


def run_cli(args: list[str], storage: str | None, logs: Path, timeout: float = 240, **kwargs: object) -> Done:
    cli = Cli(args, storage, logs, **kwargs)
    try:
        return cli.wait(timeout)
    finally:
        cli.kill()


def write_spec(folder: Path) -> tuple[Path, str]:
    """A study spec of its own (the study name comes from the spec), on digits."""
    name = f"pg-{secrets.token_hex(6)}"
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\ndataset = "digits"\n')
    return path, name


def trials_of(url: str, name: str) -> list[FrozenTrial]:
    storage = RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def real(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Without the trials that never ran: asked for in a race at the very end ("surplus"), or
    stepped back for a queued retry ("deferred"; the backend's NOT_RUN)."""
    from sofim_tune.backends.optuna import NOT_RUN

    return [t for t in trials if t.user_attrs.get("reason") not in NOT_RUN]


def describe(trials: list[FrozenTrial]) -> str:
    """One line per trial, for assertion messages."""
    return "\n".join(f"  {t.number} {t.state.name} {t.user_attrs} epochs={len(t.intermediate_values)}" for t in trials)


def assert_no_password(server: Server, texts: list[str], *folders: Path) -> None:
    """The password is in no output and in no byte of any file under ``folders``."""
    if not server.distinctive:
        return  # a password like "postgres" is in every redacted URL; test_no_password_... says so
    secret = server.password
    # Booleans, not `secret in text`: a failing assertion must not print the password either.
    for text in texts:
        leaked = secret in text
        assert not leaked, "the password is in an output:\n" + text.replace(secret, "<PASSWORD>")
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert files, folders
    leaked_into = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked_into, f"the password is in {leaked_into}"


# -- a: several workers on one study ------------------------------------------------------


@pytest.fixture(scope="module")
def three_workers(postgres: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Done, Path, str, str, Path]:
    """A 9-trial study run by three worker processes against PostgreSQL."""
    folder = tmp_path_factory.mktemp("three-workers")
    spec, name = write_spec(folder)
    url = postgres.database()
    out = folder / "run"
    args = ["run", "--spec", spec, "--workers", "3", "--trials", "9", "--epochs", "2", *SMALL, "--out", out, "--storage-env", STORAGE_VAR]
    return run_cli(args, url, folder / "logs"), out, url, name, folder


def test_three_workers_share_one_postgres_study(three_workers, postgres):
    done, out, url, name, _ = three_workers
    assert done.returncode == 0, done.stderr
    assert (out / "best.json").is_file() and (out / "report.html").is_file()
    everything = trials_of(url, name)
    context = f"trials:\n{describe(everything)}\nstderr:\n{done.stderr}"
    trials = real(everything)
    assert len([t for t in trials if t.state in FINISHED]) == 9, context
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], context
    assert not [t.number for t in trials if t.state == TrialState.FAIL], context
    pids = {t.user_attrs["worker"]["pid"] for t in trials if t.state in FINISHED}
    assert len(pids) >= 2, context
    assert_no_password(postgres, [done.stdout, done.stderr], out)


# -- b: a worker SIGKILLed in the middle of a trial ---------------------------------------


def _study_exists(url: str, name: str) -> bool:
    """Asked with psycopg: Optuna's RDBStorage would create tables while the CLI does too."""
    import psycopg

    try:
        with psycopg.connect(_conninfo(url), autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT to_regclass('studies')").fetchone()[0] is None:
                return False
            return conn.execute("SELECT 1 FROM studies WHERE study_name = %s", (name,)).fetchone() is not None
    except psycopg.Error:
        return False


def test_a_worker_killed_mid_trial_is_reported_and_its_trial_retried(postgres, tmp_path):
    spec, name = write_spec(tmp_path)
    url = postgres.database()
    out = tmp_path / "run"
    args = ["run", "--spec", spec, "--workers", "3", "--trials", "9", "--epochs", KILL_EPOCHS, "--pruner", "none", *SMALL, "--out", out, "--storage-env", STORAGE_VAR]
    cli = Cli(args, url, tmp_path / "logs")
    try:
        deadline = time.monotonic() + 180
        while not _study_exists(url, name):
            assert cli.process.poll() is None, cli.stderr_path.read_text()
            assert time.monotonic() < deadline, "the study never appeared in PostgreSQL"
            time.sleep(0.2)
        storage = RDBStorage(url)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            victim = None
            while victim is None:
                assert cli.process.poll() is None, f"sofim-tune ended before a worker could be killed:\n{cli.stderr_path.read_text()}"
                assert time.monotonic() < deadline, "no worker was ever seen in the middle of a trial"
                for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    worker = trial.user_attrs.get("worker", {})
                    # In the middle: it has reported an epoch and has most of its epochs ahead,
                    # so the kill cannot land between two trials.
                    if worker.get("pid") not in (None, cli.pid) and 1 <= len(trial.intermediate_values) <= KILL_EPOCHS // 2:
                        victim = (trial.number, worker["pid"])
                        break
                else:
                    time.sleep(0.05)
            number, pid = victim
            # The URL travels to the workers in their environment, never on a command line (ps).
            for process in (cli.pid, pid) if postgres.distinctive else ():
                on_command_line = postgres.password.encode() in Path(f"/proc/{process}/cmdline").read_bytes()
                assert not on_command_line, f"the password is on the command line of pid {process}"
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
        finally:
            storage.engine.dispose()
        done = cli.wait(timeout=240)
    finally:
        cli.kill()

    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if f"(pid {pid})" in line]
    assert len(lines) == 1, done.stderr
    assert re.search(r"sofim-tune-worker-\d", lines[0]) and "SIGKILL" in lines[0] and f"trial {number}," in lines[0], lines[0]
    everything = trials_of(url, name)
    context = f"killed trial {number} (pid {pid}); trials:\n{describe(everything)}\nstderr:\n{done.stderr}"
    trials = real(everything)
    assert len([t for t in trials if t.state in FINISHED]) == 9, context
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], context
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [(t.number, t.user_attrs.get("reason")) for t in failed] == [(number, "interrupted")], context
    retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert len(retries) == 1 and retries[0].state in FINISHED and retries[0].params == failed[0].params, context
    for produced in ("best.json", "report.html"):
        assert (out / produced).stat().st_mtime >= killed_at, produced
    assert_no_password(postgres, [done.stdout, done.stderr], out)


# -- c: the password shows nowhere --------------------------------------------------------


def test_no_password_in_outputs_files_or_the_study(three_workers, postgres):
    """Every command that takes a storage, and every file they write, redact the password."""
    if not postgres.distinctive:
        _unavailable(f"the password in {ENV} is too short or common to search outputs for (use 12+ random characters, or a superuser URL)")
    done, out, url, name, folder = three_workers
    assert done.returncode == 0, done.stderr
    run_file = json.loads((out / "run.json").read_text())
    assert run_file["storage"] == redact_storage_url(url) and ":***@" in run_file["storage"]

    storage = ["--storage-env", STORAGE_VAR, "--study-name", name]
    exported, plots = folder / "exported" / "best.json", folder / "plots"
    commands = {
        "show": (["show", *storage], url),
        "export": (["export", *storage, "--out", exported], url),
        "plot": (["plot", *storage, "--out", plots], url),
        # The run folder names the storage without its password, and says how to give it.
        "hint": (["show", out], None),
    }
    # At once: each is mostly an interpreter importing torch.
    running = {key: Cli(args, env_url, folder / f"logs-{key}") for key, (args, env_url) in commands.items()}
    try:
        results = {key: cli.wait(timeout=180) for key, cli in running.items()}
    finally:
        for cli in running.values():
            cli.kill()
    for key in ("show", "export", "plot"):
        assert results[key].returncode == 0, (key, results[key].stderr)
    assert exported.is_file() and (plots / "report.html").is_file()
    assert results["hint"].returncode == 2 and "--storage-env" in results["hint"].stderr, results["hint"].stderr
    outputs = [done.stdout, done.stderr, *(text for r in results.values() for text in (r.stdout, r.stderr))]

    assert_no_password(postgres, outputs, out, exported.parent, plots)
    rdb = RDBStorage(url)
    try:
        study = optuna.load_study(study_name=name, storage=rdb)
        system_attrs = rdb.get_study_system_attrs(rdb.get_study_id_from_name(name))
        kept = json.dumps([study.user_attrs, system_attrs, [t.user_attrs for t in study.get_trials(deepcopy=False)]], default=str)
    finally:
        rdb.engine.dispose()
    in_study = postgres.password in kept
    assert not in_study, "the password is in the study's attributes: " + kept.replace(postgres.password, "<PASSWORD>")


# -- d: no driver -------------------------------------------------------------------------

# The CLI as its console script runs it, with psycopg made unimportable first.
WITHOUT_PSYCOPG = [
    sys.executable,
    "-c",
    "import runpy, sys; sys.modules['psycopg'] = None; sys.argv[0] = 'sofim-tune'; runpy.run_module('sofim_tune.cli.app', run_name='__main__')",
]


def test_a_missing_driver_names_the_package_to_install(tmp_path):
    """Needs no server: the driver is imported before any connection."""
    secret = f"pw{secrets.token_hex(16)}"
    url = f"postgresql://alice:{secret}@127.0.0.1:1/sofim"
    out = tmp_path / "run"
    done = run_cli(["run", "--dataset", "digits", "--trials", "1", "--epochs", "1", "--device", "cpu", "--out", out, "--storage-env", STORAGE_VAR], url, tmp_path / "logs", timeout=120, command=WITHOUT_PSYCOPG)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "pip install 'sofim-tune[postgres]'" in lines[0], lines[0]
    assert secret not in done.stdout + done.stderr
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


# --- Needs no server: URLs that a driver would misread, and its messages (issue 27.4) ---------


def test_an_unescaped_at_in_the_password_is_refused_before_connecting(tmp_path):
    secret = f"Sec@{secrets.token_hex(8)}"
    url = f"postgresql://bob:{secret}@127.0.0.1:1/db"
    with pytest.raises(UserInputError, match="percent-encode it as %40") as refused:
        optuna_backend.open_storage(url)
    assert secret.split("@")[1] not in str(refused.value) and "bob:***@127.0.0.1:1/db" in str(refused.value)
    # Escaped, it is a password like any other: the driver is asked, and its refusal names no part of it.
    with pytest.raises(UserInputError, match="cannot open storage") as refused:
        optuna_backend.open_storage(url.replace("Sec@", "Sec%40"))
    assert secret.split("@")[1] not in str(refused.value)


@pytest.mark.parametrize(
    "url, message, shown",
    [
        ("postgresql://bob:Sec@ret99Z@127.0.0.1:1/db", "could not translate host name \"ret99Z@127.0.0.1\"", 'could not translate host name "***@127.0.0.1"'),
        ("postgresql://bob:Sec%40ret99Z@h/db", "password authentication failed: Sec@ret99Z, Sec%40ret99Z", "password authentication failed: ***, ***"),
        ("postgresql://bob:abc:defgh@h/db", "user 'bob' host 'defgh' and ab", "user 'bob' host '***' and ab"),  # pieces under three characters stay
        ("postgresql://bob:p/ss@h/db", "at postgresql://bob:p/ss@h/db: p/ss", "at postgresql://bob:***@h/db: ***"),
        ("mysql://h/db?password=hunter22&ssl=1", "denied for hunter22", "denied for ***"),
        ("sqlite:///runs/x/study.db", "unable to open database file", "unable to open database file"),
    ],
)
def test_a_drivers_message_shows_no_piece_of_the_password(url, message, shown):
    assert redact_storage_message(message, url) == shown
