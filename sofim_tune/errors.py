"""Exceptions shared by the library, the backends and the CLI."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from a user: an unknown name, an out-of-range value, a missing file.

    The CLI prints the message as one line and exits with code 2; Python callers get a
    ``ValueError`` subclass, so ``except ValueError`` keeps working.
    """


class NothingFound(UserInputError):
    """The input was fine, but what was asked for does not exist yet: a study with no completed
    trial, no recommendation for a dataset under a results folder.

    The CLI prints the message as one line and exits with code 1 (grep's "no match"), so that a
    script can tell "not yet" from bad input (2).
    """


class TrialPruned(Exception):
    """Raised by a reporter to stop a trial early.

    ``train_trial`` catches it and returns a result with status ``"pruned"``; backends
    translate it into their own notion of a stopped trial.
    """
