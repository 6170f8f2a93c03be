"""Typed errors of the VMM interface; the VMManager maps each one to a SOAP fault in one place."""
from __future__ import annotations


class VMMError(Exception):
    """A VMM operation failed (the hypervisor refused or broke); the message says why."""


class InvalidSpec(VMMError):
    """An InstanceSpec (or a value given to a verb) is malformed; nothing was defined or changed."""


class InstanceNotFound(VMMError):
    """No instance of that name is defined on this node."""


# The name for the same error; hypervisor wording, kept as an alias for callers.
DomainNotFound = InstanceNotFound


class InstanceExists(VMMError):
    """An instance of that name (or uuid) is already defined on this node."""


class IllegalState(VMMError):
    """The verb is not allowed in the instance's current state (e.g. pause of a shut-off instance)."""

    def __init__(self, instance: str, state: str, verb: str) -> None:
        super().__init__(f"cannot {verb} instance {instance!r} in state {state}")
        self.instance, self.state, self.verb = instance, state, verb


class Unsupported(VMMError):
    """This VMM backend lacks the capability the verb needs (see VMM.capabilities)."""

    def __init__(self, backend: str, capability: str) -> None:
        super().__init__(f"the {backend} VMM does not support {capability.replace('_', ' ')}")
        self.backend, self.capability = backend, capability


class GuestUnavailable(VMMError):
    """guestd did not answer on the guest channel (not booted yet, not installed, or timed out)."""


class GuestChannelError(VMMError):
    """guestd answered with an error, a bad token or a malformed message."""


class GuestWaitCancelled(VMMError):
    """A wait on the guest channel was interrupted by its caller (a Destroy, the node stopping) or
    because the channel was retired (the instance was destroyed, saved or shut down meanwhile)."""
