"""The ``sofim-tune`` command line, installed as ``sofim_tune.cli``."""
