"""Context source: the kernel command line, ``vmgrid.context=<base64url of context.json>``."""
from __future__ import annotations

import base64
import binascii

from ..context import ContextError, InstanceContext, loads
from ..system import Roots

PARAMETER = "vmgrid.context"


def encode(context_json: bytes) -> str:
    """The command-line parameter carrying ``context_json`` (for the host side)."""
    return f"{PARAMETER}=" + base64.urlsafe_b64encode(context_json).decode().rstrip("=")


class CmdlineSource:
    name = "cmdline"

    def __init__(self, roots: Roots) -> None:
        self.roots = roots

    def read(self) -> InstanceContext | None:
        try:
            words = (self.roots.proc / "cmdline").read_text().split()
        except OSError:
            return None
        for word in words:
            key, _, value = word.partition("=")
            if key == PARAMETER:
                try:
                    data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
                except (binascii.Error, ValueError):
                    raise ContextError(f"{PARAMETER} is not base64url") from None
                return loads(data)
        return None
