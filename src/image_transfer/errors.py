"""Errors a user can act on: reported as one clear message and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, model or configuration; the message says what to fix. Raised before output is written."""
