"""Step hostname: set the kernel host name and write /etc/hostname and /etc/hosts to match."""
from __future__ import annotations

from typing import Any

from ..context import InstanceContext
from . import Environment, StepResult, guarded

NAME = "hostname"
MARK = "# vmgrid"


def _set(ctx: InstanceContext, env: Environment) -> dict[str, Any]:
    env.system.set_hostname(ctx.hostname)
    etc = env.roots.etc
    (etc / "hostname").write_text(ctx.hostname + "\n")
    hosts = etc / "hosts"
    lines = hosts.read_text().splitlines() if hosts.exists() else ["127.0.0.1\tlocalhost"]
    lines = [l for l in lines if not l.endswith(MARK)]
    short = ctx.hostname.split(".")[0]
    names = ctx.hostname if short == ctx.hostname else f"{ctx.hostname} {short}"
    lines.append(f"{ctx.network.address}\t{names}\t{MARK}")
    hosts.write_text("\n".join(lines) + "\n")
    return {"hostname": ctx.hostname}


def handle(ctx: InstanceContext, env: Environment) -> StepResult:
    return guarded(NAME, _set, ctx, env)
