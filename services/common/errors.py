"""Errors every layer may raise towards a person."""
from __future__ import annotations


class CLIError(Exception):
    """A user-facing error of a ``vmgrid`` command: printed as `vmgrid: <message>`, exit status 1."""
