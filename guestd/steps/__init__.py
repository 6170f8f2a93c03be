"""guestd's boot steps, one module per step (cloud-init's cc_* modules), run in ORDER.

Each module has NAME and ``handle(ctx, env) -> StepResult``; a step never raises: a failure is a
StepResult with ok False and the reason, reported to the VMManager like any other result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..context import InstanceContext
from ..system import Roots, System

ORDER = ("clock", "hostname", "network", "grid", "container")


@dataclass
class StepResult:
    step: str
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    at: float = field(default_factory=time.time)

    def as_report(self) -> dict[str, Any]:
        # by hand, not dataclasses.asdict (a recursive deep copy): every report is built three times per
        # boot or recontext, and under software emulation that copying was a visible share of it
        return {"op": "report", "step": self.step, "ok": self.ok, "detail": self.detail, "error": self.error,
                "at": self.at}


@dataclass
class Environment:
    """What steps act on: the system (real or a test fake), its roots, and a place for live state."""

    system: System
    roots: Roots
    state: dict[str, Any] = field(default_factory=dict)


def guarded(name: str, fn: Callable[[InstanceContext, Environment], dict[str, Any]],
            ctx: InstanceContext, env: Environment) -> StepResult:
    """Run one step body, turning any exception into a failed StepResult."""
    try:
        return StepResult(name, True, fn(ctx, env))
    except Exception as exc:
        return StepResult(name, False, error=f"{type(exc).__name__}: {exc}")


def run_all(ctx: InstanceContext, env: Environment,
            seconds: dict[str, float] | None = None) -> dict[str, StepResult]:
    """Run every step in ORDER; return each step's result by name (and each step's duration in
    ``seconds`` when given)."""
    from . import clock, container, grid, hostname, network
    modules = {"clock": clock, "hostname": hostname, "network": network, "grid": grid, "container": container}
    results = {}
    for name in ORDER:
        t = time.monotonic()
        results[name] = modules[name].handle(ctx, env)
        if seconds is not None:
            seconds[name] = round(time.monotonic() - t, 4)
    return results
