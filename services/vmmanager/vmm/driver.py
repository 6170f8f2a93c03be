"""The VMM interface: the one contract the VMManager speaks to, whatever hypervisor is behind it.

Vocabulary (as Nova's ComputeDriver): an *instance* is vmgrid's identity, named by the instance name of
its InstanceSpec; domains, UUID lookups and connection URIs stay inside the backends. A *node* is one
VMM connection (one VMManager process). The *guest channel* is the virtio-serial line to guestd.
"""
from __future__ import annotations

import abc
import enum
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable

from .errors import Unsupported
from .spec import InstanceSpec

if TYPE_CHECKING:
    from .channel import GuestChannelClient


class InstanceState(enum.Enum):
    """What the hypervisor says an instance is doing."""

    RUNNING = "running"
    PAUSED = "paused"            # frozen in memory, no CPU used, resumes instantly
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"          # defined, not running
    SAVED = "saved"              # shut off because its memory was saved to a file (restore to continue)
    CRASHED = "crashed"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"      # guest-initiated power management suspend
    UNKNOWN = "unknown"


class LifecycleEventKind(enum.Enum):
    """A change reported by the hypervisor (libvirt's lifecycle events, renamed)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    CRASHED = "crashed"


@dataclass(frozen=True)
class LifecycleEvent:
    """One lifecycle change of one instance; ``detail`` is the hypervisor's reason in words."""

    instance: str
    kind: LifecycleEventKind
    detail: str
    node: str


@dataclass(frozen=True)
class InstanceInfo:
    """An instance as listed on a node."""

    name: str
    uuid: str
    state: InstanceState
    persistent: bool


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared once and checked in one place (VMM.require)."""

    guest_channel: bool        # talk to guestd (and so sync the guest clock after resume/restore)
    acpi_shutdown: bool        # ask the guest to power off (otherwise shutdown stops it at once)
    device_attach: bool        # hot-plug disks/NICs into a running instance
    live_migration: bool       # hypervisor-to-hypervisor migration (vmgrid migrates by save/copy/restore)
    console: bool              # open the serial console as a stream
    real_guest: bool           # a real guest OS runs (its disks, kernel and context must exist)

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


EventCallback = Callable[[LifecycleEvent], None]


class VMM(abc.ABC):
    """A node's virtual machine monitor: defines, runs, freezes and removes instances.

    Every verb names the instance by its name. Verbs raise InstanceNotFound for an unknown instance,
    IllegalState when the instance's state forbids the verb, Unsupported when the backend lacks the
    capability, and VMMError for any other hypervisor failure. Verbs are safe to call from several
    threads.
    """

    backend: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def require(self, capability: str) -> None:
        """Raise Unsupported unless this backend has ``capability`` (a Capabilities field name)."""
        if not getattr(self.capabilities, capability):
            raise Unsupported(self.backend, capability)

    @property
    @abc.abstractmethod
    def node(self) -> str:
        """The node's identity (the hypervisor connection it stands for)."""

    @abc.abstractmethod
    def define(self, spec: InstanceSpec) -> None:
        """Define an instance from ``spec`` without starting it.

        The spec is validated first (InvalidSpec). An instance of the same name or uuid must not
        exist (InstanceExists). A real-guest backend also checks that the disk, CD-ROM and kernel
        files exist. The definition is persistent: it outlives the process and the instance's runs.
        """

    @abc.abstractmethod
    def start(self, instance: str, paused: bool = False) -> None:
        """Power on a defined, shut-off instance; with ``paused`` its CPUs stay frozen until resume.

        Only from SHUTOFF (IllegalState otherwise; a SAVED instance is continued with restore).
        """

    @abc.abstractmethod
    def pause(self, instance: str) -> None:
        """Freeze a running instance in memory.

        A paused instance doesn't use CPU cycles of the host anymore; its memory stays allocated and
        it continues exactly where it stopped on resume. Its guest clock stands still meanwhile.
        Only from RUNNING.
        """

    @abc.abstractmethod
    def resume(self, instance: str, sync: bool = True) -> bool:
        """Unfreeze a paused instance, then have guestd set the guest clock to the host's.

        Only from PAUSED. Returns True when guestd confirmed the clock (False when the backend has no
        guest channel or guestd did not answer in time: the resume itself still stands). ``sync`` False:
        the caller sets the clock itself, later (sync_guest_time; a migration does it in its fix-up).
        """

    @abc.abstractmethod
    def save(self, instance: str, path: Path, hang_up: bool = True) -> None:
        """Write a running or paused instance's memory and device state to ``path``, then stop it.

        A 'stronger' pause: the instance no longer holds host memory. Its disks must not change
        until restore. The instance stays defined, in state SAVED. ``path`` must not exist yet.
        ``hang_up`` False: the guest channel is closed only once the state is written, so the saved
        guest never saw its host leave (a warm template: its clones wake in guestd's wait on a connected
        channel, not in its back-off for a host-less one).
        """

    @abc.abstractmethod
    def restore(self, path: Path, spec: InstanceSpec | None = None, paused: bool = False, sync: bool = True) -> str:
        """Continue the instance saved in ``path``; return its instance name.

        Works on the node that saved it and on another node (the migration path: save on the
        source, copy the file and the disk overlay, restore on the target). ``spec`` gives the
        instance's file locations on this node (disks, CD-ROMs, kernel, ports, channel); the
        devices themselves must be those of the saved instance. After restore the instance is
        defined here too. Unless ``paused``, guestd is asked to set the clock (``sync`` False: the caller
        does it, with sync_after_wake, and learns whether guestd confirmed it).
        """

    @abc.abstractmethod
    def shutdown(self, instance: str, timeout: float = 60.0, cancel: threading.Event | None = None) -> bool:
        """Ask the guest to power off (ACPI power button); if still running after ``timeout``
        seconds, or as soon as ``cancel`` is set, stop it by force. Returns True for a clean
        power-off, False when forced. Only from RUNNING (a paused instance is destroyed or resumed first).
        """

    @abc.abstractmethod
    def destroy(self, instance: str) -> None:
        """Stop a running, paused or shutting-down instance at once, like pulling the plug.

        The definition and disks stay. Destroying a shut-off instance does nothing.
        """

    @abc.abstractmethod
    def undefine(self, instance: str) -> None:
        """Remove the definition of an instance that is not running (IllegalState otherwise).

        Its files (disks, save files, context) are the caller's to delete.
        """

    @abc.abstractmethod
    def state(self, instance: str) -> InstanceState:
        """The instance's current state as the hypervisor sees it."""

    @abc.abstractmethod
    def list_instances(self) -> list[InstanceInfo]:
        """The vmgrid instances defined or running on this node (nothing the node holds otherwise)."""

    @abc.abstractmethod
    def spec_of(self, instance: str) -> InstanceSpec:
        """The InstanceSpec the instance was defined from, read back from the hypervisor."""

    @abc.abstractmethod
    def guest_channel(self, instance: str) -> "GuestChannelClient":
        """The instance's channel to guestd (one per instance, shared by callers, reconnecting).

        Needs the guest_channel capability and a running instance defined with a channel.
        """

    @abc.abstractmethod
    def sync_guest_time(self, instance: str, timeout: float = 5.0) -> float:
        """Have guestd set the guest clock to the host's now; return the remaining offset in seconds
        (guest minus host) measured right after. GuestUnavailable when guestd does not answer.
        """

    @abc.abstractmethod
    def subscribe(self, callback: EventCallback, kinds: Iterable[LifecycleEventKind] | None = None) -> int:
        """Call ``callback`` with every LifecycleEvent of this node's instances (only those of ``kinds``, when
        given); return a handle.

        Callbacks run on the VMM's event thread: they must return quickly and not call the VMM.
        """

    @abc.abstractmethod
    def unsubscribe(self, handle: int) -> None:
        """Stop the callbacks registered under ``handle``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection and guest channels; the instances keep running."""

    def __enter__(self) -> "VMM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
