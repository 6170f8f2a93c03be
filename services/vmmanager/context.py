"""The instance context on the host side: build it, validate it, write it as an ISO 9660 image
(volume label VMGRID-CTX, one file context.json) for the instance's virtual CD-ROM, like cloud-init's
config drive. The format is guestd.context's (docs/guestd.md); genisoimage writes the image."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from guestd.context import (DEFAULT_CHANNEL, FILE_NAME, FORMAT_VERSION, VOLUME_LABEL, ContextError,
                            InstanceContext, validate)

__all__ = ["ContextError", "InstanceContext", "build_context", "write_context_iso", "new_token"]


def new_token() -> str:
    """A fresh per-instance token (URL-safe, 128 bits) guestd must put in every report."""
    return secrets.token_urlsafe(16)


def build_context(*, instance: str, hostname: str, mac: str, address: str, netmask: str,
                  gateway: str | None = None, dns: list[str] | tuple[str, ...] = (),
                  container_command: list[str] | None = None, container_restart: str = "always",
                  container_environment: dict[str, str] | None = None, token: str | None = None,
                  channel: str = DEFAULT_CHANNEL, now: float | None = None,
                  grid: dict | None = None) -> InstanceContext:
    """The validated context of one instance; ContextError names the first bad field."""
    body = {
        "version": FORMAT_VERSION, "instance": instance, "token": token or new_token(),
        "hostname": hostname, "time": time.time() if now is None else now, "channel": channel,
        "network": {"mac": mac, "address": address, "netmask": netmask, "dns": list(dns),
                    **({"gateway": gateway} if gateway else {})},
        "container": None if container_command is None else {
            "command": list(container_command), "restart": container_restart,
            "environment": dict(container_environment or {})},
    }
    if grid is not None:
        body["grid"] = grid
    return validate(json.loads(json.dumps(body)))


def write_context_iso(context: InstanceContext, path: Path, refresh_time: bool = True) -> Path:
    """Write the context ISO at ``path`` (atomically); with ``refresh_time`` the host time in it is now.

    Raises ContextError if genisoimage is missing or fails.
    """
    if refresh_time:
        context = validate({**json.loads(context.to_json()), "time": time.time()})
    tool = shutil.which("genisoimage") or shutil.which("mkisofs")
    if tool is None:
        raise ContextError("genisoimage is not installed (Debian package genisoimage)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmgrid-ctx-") as tmp:
        staging = Path(tmp) / "iso"
        staging.mkdir()
        (staging / FILE_NAME).write_bytes(context.to_json())
        out = Path(tmp) / "context.iso"
        proc = subprocess.run([tool, "-quiet", "-V", VOLUME_LABEL, "-J", "-r", "-o", str(out), str(staging)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ContextError(f"genisoimage failed: {proc.stderr.strip()}")
        partial = path.with_name(path.name + ".part")
        shutil.copyfile(out, partial)
        os.replace(partial, path)
    return path
