"""sofim-tune: find good lr, rho and beta1 for the SOFIM optimizer."""

from __future__ import annotations

import importlib
from typing import Any

from sofim_tune.errors import TrialPruned, UserInputError
from sofim_tune.optim import SOFIM, sofim

__version__ = "0.1.0"

# Imported on first use: they pull in torchvision, scikit-learn, Optuna and plotly, which
# `import sofim_tune` for the optimizer alone should not pay for.
_LAZY = {
    "TrialConfig": "sofim_tune.trial",
    "TrialResult": "sofim_tune.trial",
    "train_trial": "sofim_tune.trial",
    "Recommendation": "sofim_tune.recommend",
    "load_recommendation": "sofim_tune.recommend",
    "optimizer_from_recommendation": "sofim_tune.recommend",
    "recipe_from_recommendation": "sofim_tune.recommend",
    "StudySpec": "sofim_tune.spec",
    "load_spec": "sofim_tune.spec",
    "OptunaReporter": "sofim_tune.backends.optuna",
    "RunOptions": "sofim_tune.tuning",
    "tune": "sofim_tune.tuning",
    "compare": "sofim_tune.tuning",
}

__all__ = ["SOFIM", "TrialPruned", "UserInputError", "__version__", "sofim", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sofim_tune' has no attribute {name!r}")
