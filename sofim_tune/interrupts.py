"""Ctrl-C that is never lost.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. Where
that is a weakref callback or a ``__del__`` that the garbage collector runs, the exception is
printed ("Exception ignored in ...") and dropped, and the run goes on as if no Ctrl-C had
come: about one interrupt in ten of a digits study on a CPU was lost this way (it then trained
to the end). :func:`catching` installs a handler that also remembers the request, and the
training loops call :func:`check` at every batch, where a dropped KeyboardInterrupt is raised
again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["catching", "check"]

_requested = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) raises KeyboardInterrupt, as Python's own handler does,
    and is remembered until the block ends, for :func:`check`. Outside the main thread, where
    Python lets no one set a handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came within :func:`catching` (one that the garbage
    collector swallowed, for example); cheap enough for every batch."""
    if _requested.is_set():
        raise KeyboardInterrupt
