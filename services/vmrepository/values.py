"""The typed values of the VMRepository's operations (what :mod:`services.vmrepository.registry` takes and
returns), in a module of their own: the wire conversion and the client use them without importing the
registry core (its catalogue, the query index and numpy: a quarter of a `vmgrid repo` command's start)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from services.vmrepository.query import Criterion

if TYPE_CHECKING:
    from services.vmrepository.catalogue import Record


# -- the typed values of the operations ------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a new image's bytes are: ``localPath`` on the repository host (inside an ingest directory)
    or ``upload``, a file name in the caller's own upload area."""
    kind: str
    value: str

    @property
    def context(self) -> str:
        return "local" if self.kind == "localPath" else "upload"


@dataclass(frozen=True)
class Query:
    """A catalogue search: criteria groups (OR of ANDs) or an XPath expression in ``dialect``."""
    groups: list[list[Criterion]] = field(default_factory=list)
    xpath: str | None = None
    dialect: str | None = None
    namespaces: dict[str, str] = field(default_factory=dict)
    order_by: str = "name"
    descending: bool = False
    offset: int = 0
    limit: int | None = None


@dataclass(frozen=True)
class QueryPage:
    total: int
    offset: int
    records: list[Record]


@dataclass(frozen=True)
class Changes:
    """What a duplicate changes from its original (None: kept)."""
    version: str | None = None
    description: str | None = None
    vcpus: str | None = None
    memory: str | None = None
    container_command: str | None = None


@dataclass(frozen=True)
class Removed:
    image_id: str
    bytes_deleted: bool


@dataclass(frozen=True)
class Location:
    url: str
    sha256: str
    size: int
    image_format: str


@dataclass(frozen=True)
class Hold:
    hold_id: str
    expires: datetime | float
