"""The names a user picks from, declared once: the CLI offers them as choices (``--help`` lists
them, and shell completion), and the modules that act on them check them: ``spec.py`` (sampler,
pruner), ``data.py`` (augmentation), ``schedules.py`` (schedule) and ``backends`` (backend)."""

from __future__ import annotations

__all__ = ["AUGMENT_MODES", "BACKENDS", "PRUNERS", "SAMPLERS", "SCHEDULES"]

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp", "grid")
PRUNERS = ("hyperband", "median", "sha", "none")
AUGMENT_MODES = ("none", "crop", "flip", "crop-flip")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
BACKENDS = ("optuna", "ray")
