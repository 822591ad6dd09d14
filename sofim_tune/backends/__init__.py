"""Search backends behind one protocol (:class:`sofim_tune.study.Backend`).

Each backend is imported on first use: Ray takes seconds to import, and an Optuna study
should not pay for it.
"""

from __future__ import annotations

import importlib

from sofim_tune.choices import BACKENDS
from sofim_tune.errors import UserInputError
from sofim_tune.study import Backend


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``optuna`` or ``ray``)."""
    if name not in BACKENDS:
        raise UserInputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"sofim_tune.backends.{name}").BACKEND
