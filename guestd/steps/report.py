"""Step report: send each step's result, then ``ready``, to the VMManager over the guest channel,
each message carrying the instance token (the port queues them until the host is connected)."""
from __future__ import annotations

from typing import Any

from ..context import InstanceContext
from . import StepResult

NAME = "report"


def handle(ctx: InstanceContext, results: dict[str, StepResult], port: Any) -> dict[str, Any]:
    port.set_token(ctx.token)
    for result in results.values():
        port.send(result.as_report())
    ready = {"op": "ready", "instance": ctx.instance, "ok": all(r.ok for r in results.values()),
             "steps": {name: r.as_report() for name, r in results.items()}}
    port.send(ready)
    return ready
