"""Step clock: at boot, never let the guest clock be behind the host's time in the context; later,
set it to the host's clock whenever the host says so (after a pause, a restore or a migration)."""
from __future__ import annotations

from typing import Any

from ..context import InstanceContext
from . import Environment, StepResult, guarded

NAME = "clock"


def _boot(ctx: InstanceContext, env: Environment) -> dict[str, Any]:
    before = env.system.now()
    if before < ctx.time:
        env.system.set_clock(ctx.time)
        return {"set": True, "offset_before": before - ctx.time, "time": env.system.now()}
    return {"set": False, "offset_before": before - ctx.time, "time": before}


def handle(ctx: InstanceContext, env: Environment) -> StepResult:
    return guarded(NAME, _boot, ctx, env)


def set_time(env: Environment, host_time: float) -> dict[str, Any]:
    """The set-time request: step the clock to ``host_time``; report the offset that was corrected."""
    before = env.system.now()
    env.system.set_clock(float(host_time))
    after = env.system.now()
    env.state["clock_synced_at"] = after
    return {"offset_before": before - float(host_time), "time": after}
