"""sofim-tune: find good lr, rho and beta1 for the SOFIM optimizer."""

from sofim_tune.errors import TrialPruned, UserInputError
from sofim_tune.optim import SOFIM, sofim

__version__ = "0.1.0"

__all__ = ["SOFIM", "TrialPruned", "UserInputError", "__version__", "sofim"]
