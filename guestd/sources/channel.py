"""Context source: the host pushes the context over the guest channel (a ``context`` message)."""
from __future__ import annotations

from ..context import InstanceContext


class ChannelSource:
    name = "channel"

    def __init__(self, port, timeout: float = 30.0) -> None:
        self.port, self.timeout = port, timeout

    def read(self) -> InstanceContext | None:
        return self.port.wait_context(self.timeout)
