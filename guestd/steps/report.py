"""Step report: send each step's result, then ``ready``, to the VMManager over the guest channel,
each message carrying the instance token (the port queues them until the host is connected)."""
from __future__ import annotations

from typing import Any

from ..context import InstanceContext
from . import StepResult

NAME = "report"


def handle(ctx: InstanceContext, results: dict[str, StepResult], port: Any, each: bool = True) -> dict[str, Any]:
    """Send the reports and ``ready``; ``each`` False sends ``ready`` alone (it carries every step's report,
    which the host files as if each had come by itself): a recontext, whose answer the host waits for."""
    port.set_token(ctx.token)
    steps = {name: r.as_report() for name, r in results.items()}
    if each:
        for step in steps.values():
            port.send(step)
    ready = {"op": "ready", "instance": ctx.instance, "ok": all(r.ok for r in results.values()), "steps": steps}
    port.send(ready)
    return ready
