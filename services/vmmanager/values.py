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


@dataclass(frozen=True)
class MigrationFile:
    """One file of a migrating instance the target pulls from the source (overlay, data disks, saved state)."""

    name: str
    size: int
    sha256: str = ""    # hex; what a peer without BLAKE3 announces
    blake3: str = ""    # hex; what vmgrid sources announce (hashed inside the downtime: several times faster)

    @property
    def digest(self) -> str:
        """``blake3 <hex>`` or ``sha256 <hex>``: what the target verifies the file against (BLAKE3 when given)."""
        return f"blake3 {self.blake3}" if self.blake3 else f"sha256 {self.sha256}"


@dataclass(frozen=True)
class MigrationOffer:
    """AcceptMigration: what the source tells the target about the instance coming to it."""

    key: str
    identifier: str
    owner: str
    descriptor: Descriptor
    descriptor_xml: bytes
    termination: float
    max_lifetime: int | None
    state: str                  # the state the instance had on the source (Running, Paused or Saved)
    source: str                 # the source VMManager's URL
    files_url: str              # gsiftp:// base URL of the files, "/<key>/<name>" under it
    files: tuple[MigrationFile, ...]
    phases: tuple[tuple[str, float], ...] = ()
    uuid: str = ""              # the hypervisor's id of the saved domain (the restore keeps it)
    subscriptions: tuple[tuple[str, str, float], ...] = ()   # (consumer, subscriber DN, expires) at the source
    guest_token: str = ""       # the token guestd holds now: the target's ``migrated`` request proves itself with it
    step: str = ""              # prepare (before the freeze, no files) | transfer (after it) | "": both in one call
    vmm: str = ""               # the source's VMM kind (a saved state restores only on its own kind); "": not said
    proof: tuple[str, str, str] = ()   # the source node's countersignature: (its host certificate chain as PEM,
    #                                    the xs:dateTime it signed at, the signature in base64); migration.sign_offer


@dataclass(frozen=True)
class DomainRow:
    """A hypervisor domain of this node: its name, UUID and state, and the live instance record it belongs to
    (``instance`` None: an orphan domain)."""

    name: str
    uuid: str
    hypervisor_state: str
    instance: str | None = None
    instance_state: str | None = None


@dataclass(frozen=True)
class NodeDomains:
    """A node's domains beside its instance records: every vmgrid domain, and the live Running/Paused records
    whose domain is missing (key, state)."""

    node: str
    domains: tuple[DomainRow, ...]
    missing: tuple[tuple[str, str], ...]

    @property
    def orphans(self) -> tuple[DomainRow, ...]:
        return tuple(d for d in self.domains if d.instance is None)
