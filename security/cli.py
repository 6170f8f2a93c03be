"""Command-line sub-commands (placeholder until implemented)."""
from __future__ import annotations


def register(subparsers) -> None:
    """Add this module's sub-commands to the `vmgrid` parser."""
