"""The VMM interface and its libvirt backends (the test driver and QEMU); see docs/vmm.md."""
from .channel import GuestChannelClient
from .driver import (VMM, Capabilities, InstanceInfo, InstanceState, LifecycleEvent,
                     LifecycleEventKind)
from .errors import (DomainNotFound, GuestChannelError, GuestUnavailable, GuestWaitCancelled, IllegalState,
                     InstanceExists, InstanceNotFound, InvalidSpec, Unsupported, VMMError)
from .libvirt_driver import LibvirtDriver, LibvirtQemuDriver, LibvirtTestDriver, qemu_user_missing
from .config import tap_name
from .spec import Disk, GuestChannel, InstanceSpec, KernelBoot, Nic, Port

__all__ = [
    "VMM", "Capabilities", "InstanceInfo", "InstanceState", "LifecycleEvent", "LifecycleEventKind",
    "GuestChannelClient", "DomainNotFound", "GuestChannelError", "GuestUnavailable", "GuestWaitCancelled",
    "IllegalState",
    "InstanceExists", "InstanceNotFound", "InvalidSpec", "Unsupported", "VMMError", "LibvirtDriver",
    "LibvirtQemuDriver", "LibvirtTestDriver", "qemu_user_missing", "Disk", "GuestChannel", "InstanceSpec",
    "KernelBoot", "Nic", "Port", "open_vmm", "tap_name",
]


def open_vmm(kind: str = "test", **options) -> VMM:
    """Open a node's VMM by kind: 'test' (libvirt's test driver) or 'qemu' (root=DIR or uri=URI)."""
    if kind == "test":
        return LibvirtTestDriver(**options)
    if kind == "qemu":
        return LibvirtQemuDriver(**options)
    raise InvalidSpec(f"unknown VMM kind {kind!r} (test or qemu)")
