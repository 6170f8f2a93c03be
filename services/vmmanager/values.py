"""The typed values the node core takes and returns (light: the client's wire imports them without
libvirt)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.descriptor import Descriptor
from services.vmmanager.store import Instance


@dataclass(frozen=True)
class DeployRequest:
    """Deploy: the descriptor as the repository gave it, the client's identifier and a lifetime (s)."""

    descriptor: Descriptor
    descriptor_xml: bytes
    identifier: str
    lifetime: int
    initial_state: str = "Running"
    wait: bool = False


@dataclass(frozen=True)
class InstanceView:
    """An instance as its resource properties show it: the record, the node, staging progress now."""

    inst: Instance
    node: str
    progress: tuple[int, int] | None = None
    home: Path | None = None        # the instance's directory on the node (overlay, context, logs)


@dataclass(frozen=True)
class Subscribed:
    key: str
    expires: float
