"""Errors a user can act on: reported as one clear message and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, model or configuration; the message says what to fix. Raised before output is written."""


class RunFailed(Exception):
    """The run cannot count as a success (exit status 1): the model failed, or too many rows did."""


class TooManyFailures(RunFailed):
    """More than the allowed fraction of rows failed; the output is written and says which and why."""
