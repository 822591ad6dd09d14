"""Connecting to a Ray cluster: the address, token authentication, and whether a trial fits.

Ray 2.60 starts a head with token authentication whenever a token exists on the head
machine (``~/.ray/auth_token``, written by any earlier local Ray), but a client that
names the head's address connects without a token unless ``RAY_AUTH_MODE=token`` is set.
It then retries for about half a minute and reports "Failed to connect". So before
``ray.init`` this module turns token mode on when this machine has a token, and asks the
head one gRPC question with a deadline: a refused token, an address where nothing
answers and an address that is not Ray each fail within ``CONNECT_LIMIT_S`` seconds, in
one line that names the setting to change.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import grpc
import ray

from sofim_tune.errors import UserInputError
from sofim_tune.study import RunOptions

# The promise: a cluster that cannot be used is reported within this many seconds of
# starting to connect (the TCP connection, then one authenticated gRPC call).
CONNECT_LIMIT_S = 5.0
TCP_TIMEOUT_S = 3.0
_DEFAULT_CLIENT_PORT = 10001
_DEFAULT_GCS_PORT = 6379
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
# Where Ray looks for a token, in its order (ray._raylet.AuthenticationTokenLoader).
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
TOKEN_HELP = f"run `ray get-auth-token` on the head and put its output in {DEFAULT_TOKEN_FILE} (or {TOKEN_VARIABLE}) here"


def token_source() -> str | None:
    """Where Ray would read this machine's token from, or None when it has none."""
    if os.environ.get(TOKEN_VARIABLE):
        return TOKEN_VARIABLE
    path = os.environ.get(TOKEN_PATH_VARIABLE)
    if path:
        return f"{TOKEN_PATH_VARIABLE}={path}" if Path(path).expanduser().is_file() else None
    return str(DEFAULT_TOKEN_FILE) if DEFAULT_TOKEN_FILE.expanduser().is_file() else None


def use_token_if_present() -> None:
    """Turn on token authentication for this process and its children when a token exists.

    An explicit ``RAY_AUTH_MODE`` is respected. A head without authentication ignores
    the token, so having one costs nothing.
    """
    if os.environ.get(AUTH_MODE_VARIABLE) is not None or token_source() is None:
        return
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    # Sets RAY_AUTH_MODE=token and refreshes Ray's cached configuration, which ray.init
    # and the workers it starts read.
    _enable_token_auth()


def _token_mode() -> bool:
    return os.environ.get(AUTH_MODE_VARIABLE, "").lower() == "token"


def probe_target(address: str) -> tuple[str, int]:
    """The host and port that ``ray.init(address)`` would connect to first."""
    if address.startswith("ray://"):
        host, _, port = address.removeprefix("ray://").partition(":")
        return host, int(port or _DEFAULT_CLIENT_PORT)
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        # Ray's own lookup: RAY_ADDRESS, then the cluster a `ray start` on this machine
        # recorded or is running. It fails at once when there is none.
        address = canonicalize_bootstrap_address_or_die("auto")
    host, _, port = address.rpartition(":")
    if not host:
        return address, _DEFAULT_GCS_PORT
    return host.strip("[]"), int(port)  # [::1]:6379 is an IPv6 host


def _authentication_metadata() -> tuple[tuple[str, str], ...]:
    if not _token_mode():
        return ()
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the token may have been written since Ray first looked
    return tuple(loader.get_token_for_http_header().items()) if loader.has_token() else ()


def _ask_head(host: str, port: int, deadline_s: float) -> grpc.StatusCode:
    """One authenticated gRPC call to the head; its status code (OK when it answered).

    The call is the GCS's cluster-id question; Ray Client's port (ray://) answers it with
    UNIMPLEMENTED, after the same token check, which is what matters here.
    """
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=deadline_s, metadata=_authentication_metadata())
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def check_cluster(address: str) -> None:
    """Raise UserInputError within ``CONNECT_LIMIT_S`` when ``address`` cannot be used.

    Checks, in order: the address names a cluster, a TCP connection opens, and the head
    accepts this machine's authentication.
    """
    started = time.monotonic()
    try:
        host, port = probe_target(address)
    except ValueError:
        raise UserInputError(f"cannot reach Ray at {address}: not an address (use auto, HOST:6379 or ray://HOST:10001)") from None
    except ConnectionError as exc:
        raise UserInputError(f"cannot reach Ray at {address}: {str(exc).splitlines()[0]}") from None
    # "auto" names no host; say which one it found.
    label = f"{address} ({host}:{port})" if address == "auto" else address
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserInputError(f"cannot reach Ray at {label}: {exc.strerror or exc or type(exc).__name__}") from None
    source = token_source()
    if _token_mode() and source is None:
        raise UserInputError(f"{AUTH_MODE_VARIABLE}=token is set but this machine has no Ray token: {TOKEN_HELP}")
    remaining = max(1.0, CONNECT_LIMIT_S - (time.monotonic() - started))
    status = _ask_head(host, port, remaining)
    if status == grpc.StatusCode.UNAUTHENTICATED:
        if not _token_mode():
            raise UserInputError(f"Ray at {label} requires token authentication and this machine has no token: set {AUTH_MODE_VARIABLE}=token and {TOKEN_HELP}")
        raise UserInputError(f"Ray at {label} refused the token from {source}: it is not the head's; {TOKEN_HELP}")
    if status in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        raise UserInputError(f"cannot reach Ray at {label}: the port is open but no Ray head answered within {remaining:.0f} s")
    # OK from a head; UNIMPLEMENTED from Ray Client's server, which checked the token first.


def cluster_address(options: RunOptions) -> str | None:
    """The cluster ``options`` name (``--address``, else RAY_ADDRESS), checked to be usable.

    None means a private local Ray. Raises UserInputError within ``CONNECT_LIMIT_S`` for a
    cluster that cannot be used (see :func:`check_cluster`).
    """
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        use_token_if_present()
        check_cluster(address)
    return address


def connect(options: RunOptions) -> None:
    """Connect to the cluster of ``options.address`` (or RAY_ADDRESS), or start a private local Ray.

    A Ray already initialized in this process (by the caller, or by an earlier study) is
    used as it is.
    """
    address = cluster_address(options)
    if ray.is_initialized():
        return
    try:
        # "local": without an address, a new Ray on this machine with all its CPUs and
        # GPUs, even when `ray start` runs a cluster here (ray.init(None) would join it).
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
        raise UserInputError(f"cannot reach Ray at {address or 'a new local instance'}: {str(exc).splitlines()[0]}") from None


def check_cluster_fits(options: RunOptions) -> None:
    """Raise UserInputError when no node of the cluster can hold one trial."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if options.ray_cpus_per_trial > cpus:
        raise UserInputError(f"--cpus-per-trial {options.ray_cpus_per_trial:g}: no node of the Ray cluster has that many CPUs (the largest has {cpus:g})")
    if options.ray_gpus_per_trial > gpus:
        having = f"the largest has {gpus:g}" if gpus else "the cluster has no GPUs"
        raise UserInputError(f"--gpus-per-trial {options.ray_gpus_per_trial:g}: no node of the Ray cluster has that many GPUs ({having})")
