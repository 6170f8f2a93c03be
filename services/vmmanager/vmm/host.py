"""The libvirt connection of a node: the process-wide event loop, opening, and error translation."""
from __future__ import annotations

import logging
import threading

import libvirt

from .errors import InstanceExists, InstanceNotFound, VMMError

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_started = False


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; vmgrid raises them as typed errors instead."""


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once per process).

    Must happen before the first connection is opened, or lifecycle events never arrive.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_silence, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # keep the loop alive whatever a callback did
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def open_connection(uri: str) -> libvirt.virConnect:
    """Open ``uri`` read-write with the event loop running; VMMError with libvirt's reason on failure."""
    ensure_event_loop()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VMMError(f"cannot open the hypervisor connection {uri}: {exc.get_error_message()}") from None


def translate(exc: libvirt.libvirtError, what: str) -> VMMError:
    """A typed VMM error for a libvirt error raised while doing ``what``."""
    code = exc.get_error_code()
    message = f"{what}: {exc.get_error_message()}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return InstanceNotFound(message)
    if code in (libvirt.VIR_ERR_DOM_EXIST,):
        return InstanceExists(message)
    return VMMError(message)
