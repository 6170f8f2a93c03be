"""What a grid service is to the container: a contract (WSDL), operation handlers, and the context
each call runs in (the verified caller, the headers, authorization)."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lxml import etree

from services.container.contract import Contract
from security.middleware import DEFAULT_UNDERSTOOD

Handler = Callable[["CallContext", etree._Element], etree._Element]


def operation(name: str):
    """Mark a method as the handler of the WSDL operation ``name``."""

    def mark(func):
        func._soap_operation = name
        return func

    return mark


@dataclass
class CallContext:
    """One call: which operation, who called (verified by WS-Security), and the request headers."""

    service: "SoapService"
    operation: str
    caller: Any  # security's verified identity: .dn, .limited
    headers: list[etree._Element]
    wsa: dict[str, str]
    base_url: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    reply_headers: list[etree._Element] = field(default_factory=list)   # a handler's headers for its answer

    @property
    def dn(self) -> str:
        return self.caller.dn

    def header(self, tag: str) -> etree._Element | None:
        for h in self.headers:
            if h.tag == tag:
                return h
        return None


class SoapService:
    """Base of the grid services. Subclasses set ``name`` and ``wsdl`` and mark handlers with
    :func:`operation`; every WSDL operation must have a handler and every handler an operation."""

    name: str = ""
    wsdl: str = ""
    extra_understood_headers: frozenset[str] = frozenset()

    def __init__(self, state_dir: Path | None = None):
        self.state_dir = Path(state_dir) if state_dir else None
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.contract = Contract(self.wsdl)
        self.log = logging.getLogger(f"vmgrid.{self.name}")
        self.handlers: dict[str, Handler] = {}
        for attr in dir(type(self)):
            func = getattr(type(self), attr, None)
            op = getattr(func, "_soap_operation", None)
            if op:
                self.handlers[op] = getattr(self, attr)
        missing = set(self.contract.operations) - set(self.handlers)
        extra = set(self.handlers) - set(self.contract.operations)
        if missing or extra:
            raise TypeError(f"{self.name}: operations without handlers {sorted(missing)}, "
                            f"handlers without operations {sorted(extra)}")
        self.understood_headers = DEFAULT_UNDERSTOOD | self.extra_understood_headers
        self.address = ""   # this service's public URL, from the configuration (see bind)
        self.addresses: tuple[str, ...] = ()   # what a request's signed wsa:To may say: address and aliases

    def bind(self, address: str) -> None:
        """Called by the container once it knows where it serves: ``address`` is this service's public URL
        (the configured [container] public_url, else the bound host and port), never a caller's Host."""
        self.address = address
        self.addresses = (address,)

    def start(self) -> None:
        """Called once the container is serving (background tasks start here)."""

    def close(self) -> None:
        """Release resources when the container stops."""
