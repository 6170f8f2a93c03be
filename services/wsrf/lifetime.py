"""WS-ResourceLifetime: scheduled termination. The ``TerminationTime`` and ``CurrentTime`` properties,
SetTerminationTime read and answered, and :class:`Sweeper`, the thread that ends expired resources.

A resource kind with a lifetime declares ``TerminationTime(lambda r: r.termination)`` and
``CurrentTime()`` in its :class:`~services.wsrf.properties.PropertySet`; its SetTerminationTime handler
calls :func:`requested_termination` (after authorizing) and answers :func:`set_termination_time_response`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from lxml import etree

from services.common.xsdtime import format_datetime, parse_datetime, parse_duration
from services.faults import InvalidArgument
from services.wsrf.namespaces import RL, XSI
from services.wsrf.properties import ResourceProperty

log = logging.getLogger("vmgrid.wsrf.lifetime")


class TerminationTime(ResourceProperty):
    """wsrf-rl:TerminationTime: when the resource ends (``termination(resource)``: UNIX seconds)."""

    qname = f"{{{RL}}}TerminationTime"

    def __init__(self, termination: Callable[[object], float | None] = lambda r: r.termination):
        self.termination = termination

    def value(self, resource):
        t = self.termination(resource)
        return None if t is None else format_datetime(t)

    @classmethod
    def parse(cls, el):
        from services.common.xsdtime import to_datetime

        return to_datetime(el.text)


class CurrentTime(ResourceProperty):
    """wsrf-rl:CurrentTime: the service's clock, so a client can compare it with TerminationTime."""

    qname = f"{{{RL}}}CurrentTime"

    def value(self, resource):
        return format_datetime(time.time())

    @classmethod
    def parse(cls, el):
        from services.common.xsdtime import to_datetime

        return to_datetime(el.text)


INFINITE = None


def requested_termination(request: etree._Element, now: float) -> float | None:
    """The absolute termination time a wsrf-rl:SetTerminationTime asks for (UNIX seconds): its
    RequestedTerminationTime, or now + RequestedLifetimeDuration; None (:data:`INFINITE`) for a nil
    RequestedTerminationTime. InvalidArgument for a value that is not a time or duration."""
    requested = request.find(f"{{{RL}}}RequestedTerminationTime")
    try:
        if requested is not None:
            if requested.get(f"{{{XSI}}}nil") in ("true", "1"):
                return INFINITE
            return parse_datetime(requested.text or "")
        return now + parse_duration(request.findtext(f"{{{RL}}}RequestedLifetimeDuration") or "")
    except ValueError as exc:
        raise InvalidArgument(str(exc), argument="SetTerminationTime") from None


def set_termination_time_response(new: float | None, now: float | None = None) -> etree._Element:
    """wsrf-rl:SetTerminationTimeResponse with the new termination time (nil: none) and the current time."""
    resp = etree.Element(f"{{{RL}}}SetTerminationTimeResponse", nsmap={"wsrf-rl": RL})
    el = etree.SubElement(resp, f"{{{RL}}}NewTerminationTime")
    if new is None:
        el.set(f"{{{XSI}}}nil", "true")
    else:
        el.text = format_datetime(new)
    etree.SubElement(resp, f"{{{RL}}}CurrentTime").text = format_datetime(time.time() if now is None else now)
    return resp


class Sweeper:
    """Calls ``sweep(now)`` every ``interval`` seconds on a daemon thread until :meth:`stop`; an exception
    is logged and the next round runs."""

    def __init__(self, sweep: Callable[[float], object], interval: float, name: str = "vmgrid-lifetimes"):
        self.sweep = sweep
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep(time.time())
            except Exception:  # noqa: BLE001 - one failed round must not end the sweeping
                log.exception("lifetime sweep failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
