"""A real two-node Ray cluster on this host, set up as the README's cluster section says.

Each node is a ``ray start --block`` process with one CPU, token authentication on, and
its own HOME and RAY_TMPDIR, so nothing leaks into (or from) the user's Ray. The CLI runs
as a subprocess, the way a user runs it. Every process a node started is found from its
``ray start`` process and killed by PID at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sofim_tune.runs import load_run

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# The promise of the README: a cluster that cannot be used is reported within 15 s,
# counted from the CLI's start, imports included.
REPORT_LIMIT_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(home: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Ray settings, HOME and RAY_TMPDIR private."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


class RayNode:
    """One ``ray start --block`` process: a head, or a node joining one."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args], env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"ray start did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def pids(self) -> set[int]:
        try:
            return {self.process.pid, *(p.pid for p in psutil.Process(self.process.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def titles(self) -> set[str]:
        """The command lines of the node's processes (a Ray worker's names what it runs)."""
        found = set()
        for pid in self.pids():
            try:
                found.add(" ".join(psutil.Process(pid).cmdline()))
            except psutil.Error:
                pass
        return found

    def kill(self) -> set[int]:
        """SIGKILL the node and every process it started; the PIDs it killed.

        The processes are stopped first, until no new one appears, so that none can start
        a child that escapes the list.
        """
        pids: set[int] = set()
        while new := self.pids() - pids:
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            pids |= new
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        return pids


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class ProcessWatch:
    """Polls each node's process titles, to see where trials and confirmations ran."""

    def __init__(self, nodes: dict[str, RayNode]) -> None:
        self.nodes = nodes
        self.seen: dict[str, set[str]] = {name: set() for name in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for name, node in self.nodes.items():
                self.seen[name] |= node.titles()
            time.sleep(0.05)

    def ran(self, name: str, what: str) -> bool:
        return any(what in title for title in self.seen[name])

    def running_now(self, name: str, what: str) -> bool:
        return any(what in title for title in self.nodes[name].titles())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def cluster_home(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """A HOME holding a Ray token, and a short RAY_TMPDIR (Ray's socket paths are limited)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    ray_tmp = Path(tempfile.mkdtemp(prefix="sofim-ray-", dir="/tmp"))
    yield home, ray_tmp, token
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator:
    """Start Ray nodes; at the end, kill every process any of them started, by PID."""
    started: list[RayNode] = []

    def start(args: list[str], env: dict[str, str]) -> RayNode:
        node = RayNode(args, env, tmp_path / f"node{len(started)}.log")
        started.append(node)
        node.wait_started()
        return node

    yield start
    killed: set[int] = set()
    for node in started:
        killed |= node.kill()
    leftover = still_running(killed, timeout=10)
    assert not leftover, f"processes still running: {leftover}"


def still_running(pids: set[int], timeout: float) -> dict[int, str]:
    """The processes of ``pids`` still alive (not zombies) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {}
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = " ".join(proc.cmdline())
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def head_args(port: int) -> list[str]:
    return ["--head", f"--port={port}", "--include-dashboard=false"]


def cli(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", *args], env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_a_study_spreads_over_two_nodes_and_survives_losing_one(tmp_path: Path, cluster_home, start_node) -> None:
    home, ray_tmp, _ = cluster_home
    port = free_port()
    # Token mode as the README sets it on every node; a quick health check, so that the
    # head declares the killed node dead in seconds rather than half a minute.
    node_env = clean_environment(home, ray_tmp, RAY_AUTH_MODE="token", RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")
    nodes = {"head": start_node(head_args(port), node_env), "worker": start_node([f"--address=127.0.0.1:{port}"], node_env)}
    watch = ProcessWatch(nodes)
    out = tmp_path / "run"
    # sofim-tune is not told RAY_AUTH_MODE: finding the token in HOME is enough.
    client_env = clean_environment(home, ray_tmp)
    command = [
        sys.executable, "-m", "sofim_tune.cli.app", "run", "--backend", "ray", "--address", f"127.0.0.1:{port}",
        "--dataset", "digits", "--arch", "cnn", "--trials", "6", "--epochs", "12", "--pruner", "none",
        "--confirm-top", "1", "--confirm-seeds", "2", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    try:
        run = subprocess.Popen(command, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not (watch.running_now("worker", "ImplicitFunc") and watch.ran("head", "ImplicitFunc")):
            assert run.poll() is None, f"the study ended before both nodes ran a trial:\n{run.stdout.read()}"
            assert time.monotonic() < deadline, "trials never ran on both nodes"
            time.sleep(0.05)
        nodes["worker"].kill()
        output, _ = run.communicate(timeout=240)
    finally:
        watch.stop()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output
    best = json.loads((out / "best.json").read_text())
    record = load_run(out)
    assert len(record.completed()) == 6, output
    assert best["metric"]["confirm"]["seeds"] and len(best["metric"]["confirm"]["seeds"]) == 2
    # Confirmation retrains ran as Ray tasks on the cluster, which only the head had left.
    assert watch.ran("head", "confirmation_run"), sorted(watch.seen["head"])


def test_a_client_without_the_token_is_told_what_to_set(tmp_path: Path, cluster_home, start_node) -> None:
    home, ray_tmp, _ = cluster_home
    port = free_port()
    start_node(head_args(port), clean_environment(home, ray_tmp, RAY_AUTH_MODE="token"))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    out = tmp_path / "run"
    done, seconds = cli(["run", "--backend", "ray", "--address", f"127.0.0.1:{port}", "--dataset", "digits", "--out", str(out)], clean_environment(stranger, ray_tmp))
    assert done.returncode == 2, done.stdout + done.stderr
    assert seconds < REPORT_LIMIT_S
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert "requires token authentication" in message and "RAY_AUTH_MODE=token" in message and "ray get-auth-token" in message
    assert not out.exists()
    # A wrong token is named as such.
    done, seconds = cli(["run", "--backend", "ray", "--address", f"127.0.0.1:{port}", "--dataset", "digits", "--out", str(out)], clean_environment(stranger, ray_tmp, RAY_AUTH_TOKEN="not-the-token"))
    assert done.returncode == 2 and seconds < REPORT_LIMIT_S
    assert "refused the token from RAY_AUTH_TOKEN" in done.stderr


def test_address_auto_finds_the_head_started_here(tmp_path: Path, cluster_home, start_node) -> None:
    home, ray_tmp, token = cluster_home
    port = free_port()
    start_node(head_args(port), clean_environment(home, ray_tmp, RAY_AUTH_MODE="token"))
    out = tmp_path / "run"
    # The token in an environment variable, as a container would pass it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done, _ = cli(
        ["run", "--backend", "ray", "--address", "auto", "--dataset", "digits", "--trials", "2", "--epochs", "2", "--pruner", "none", "--confirm-top", "1", "--confirm-seeds", "2", "--device", "cpu", "--out", str(out)],
        clean_environment(elsewhere, ray_tmp, RAY_AUTH_TOKEN=token),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = load_run(out)
    assert len(record.completed()) == 2


def test_an_address_that_never_answers_fails_within_the_limit(tmp_path: Path, cluster_home) -> None:
    """A port that accepts connections and says nothing: what a firewall or a wrong service looks like."""
    home, ray_tmp, _ = cluster_home
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        done, seconds = cli(["run", "--backend", "ray", "--address", f"127.0.0.1:{port}", "--dataset", "digits", "--out", str(tmp_path / "run")], clean_environment(home, ray_tmp))
    assert done.returncode == 2, done.stdout + done.stderr
    assert seconds < REPORT_LIMIT_S, seconds
    assert f"cannot reach Ray at 127.0.0.1:{port}" in done.stderr and "no Ray head answered" in done.stderr


def test_the_launcher_config_is_valid_and_sets_up_the_token() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [command for command in starts if "ray start" in command]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in ray_starts)
