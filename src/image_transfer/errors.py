"""Errors a user can act on: reported as one clear message and a non-zero exit.

May import: nothing of the package.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input, model or configuration; the message says what to fix. Raised before output is written."""


class RunFailed(Exception):
    """The run cannot count as a success (exit status 1): the model failed, or too many rows did."""


class TooManyFailures(RunFailed):
    """More than the allowed fraction of rows failed; the output is written and says which and why."""


def first_line(exc: Any) -> str:
    """The line of an error that says what went wrong (for TensorFlow's "Graph execution error:", its last)."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if lines and lines[0].rstrip(":") == "Graph execution error":
        reasons = [ln for ln in lines[1:] if not ln.startswith(("[[", "Detected at node", "File "))]
        lines = reasons[-1:] or lines
    return lines[0][:500] if lines else type(exc).__name__
