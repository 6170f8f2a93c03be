"""Where guestd finds its context: one module per source, each with one ``read()`` (cloud-init's datasources).

A source returns the validated InstanceContext, None when it has nothing, and raises ContextError
when it found a context that is broken (guestd then reports that and does not guess).
"""
from __future__ import annotations

from typing import Protocol

from ..context import InstanceContext


class Source(Protocol):
    name: str

    def read(self) -> InstanceContext | None: ...
