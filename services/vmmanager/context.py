"""The instance context on the host side: build it, validate it, write it as an ISO 9660 image
(volume label VMGRID-CTX, one file context.json) for the instance's virtual CD-ROM, like cloud-init's
config drive. The format is guestd.context's (docs/guestd.md); pycdlib writes the image in process
(ISO 9660 level 1 with Joliet and Rock Ridge names, as ``genisoimage -J -r`` did, without a process per
deployment)."""
from __future__ import annotations

import io
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pycdlib

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

    Raises ContextError if the image cannot be written.
    """
    if refresh_time:
        context = validate({**json.loads(context.to_json()), "time": time.time()})
    body = context.to_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        image = _image_of(body)
        with open(partial, "wb") as f:
            f.write(image)
        os.replace(partial, path)
    except (pycdlib.pycdlibexception.PyCdlibException, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise ContextError(f"writing the context image failed: {exc}") from None
    return path


# The image's layout depends only on the length of context.json (one file, fixed names and label): pycdlib
# lays it out once per length, with a random filler as the file's bytes, and each instance's image is that
# layout with its own context.json written over the filler (0.2 ms instead of pycdlib's 3 ms per instance).
# The volume's dates are those of the layout's making (guestd reads the file, never the dates).
_LAYOUTS: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
_LAYOUTS_MAX = 32
_LAYOUTS_LOCK = threading.Lock()


def _image_of(body: bytes) -> bytes:
    with _LAYOUTS_LOCK:
        layout = _LAYOUTS.get(len(body))
        if layout is not None:
            _LAYOUTS.move_to_end(len(body))
    if layout is None:
        layout = _layout(len(body))
        with _LAYOUTS_LOCK:
            _LAYOUTS[len(body)] = layout
            while len(_LAYOUTS) > _LAYOUTS_MAX:
                _LAYOUTS.popitem(last=False)
    template, offset = layout
    if offset < 0:                       # no unique place for the file's bytes: a whole image of its own
        return _pycdlib_image(body)
    return b"".join((template[:offset], body, template[offset + len(body):]))


def _layout(length: int) -> tuple[bytes, int]:
    """(an image whose context.json is ``length`` random bytes, where those bytes start; -1 if not unique)."""
    filler = secrets.token_bytes(length)
    template = _pycdlib_image(filler)
    offset = template.find(filler)
    if length < 16 or offset < 0 or template.find(filler, offset + 1) >= 0:
        return template, -1
    return template, offset


def _pycdlib_image(body: bytes) -> bytes:
    iso = pycdlib.PyCdlib()
    try:
        iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
        stem, _, ext = FILE_NAME.upper().partition(".")
        iso.add_fp(io.BytesIO(body), len(body), f"/{stem[:8]}.{ext[:3]};1", rr_name=FILE_NAME,
                   joliet_path=f"/{FILE_NAME}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()
