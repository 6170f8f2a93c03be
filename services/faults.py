"""Typed errors of the vmgrid services, and their one mapping to and from SOAP fault details.

Each class is one fault element of ``wsdl/faults.xsd``. Services raise them; the container turns
them into SOAP 1.1 Faults (:func:`to_detail`); the client turns received details back into the
same classes (:func:`from_detail`), so a scientist's script catches ``UnknownImage``, not a
generic SOAP error.
"""
from __future__ import annotations

import errno
import sqlite3
from typing import ClassVar

from lxml import etree

from services.common.xsdtime import now_datetime

FAULTS_NS = "http://vmgrid.org/ns/faults/1"


def _now() -> str:
    return now_datetime()


class VMGridFault(Exception):
    """Base of every typed fault. ``fields`` are the element's children after Timestamp/Description."""

    element: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    client_error: ClassVar[bool] = True  # soapenv:Client (the request is wrong) or soapenv:Server

    def __init__(self, description: str, **values):
        super().__init__(description)
        self.description = description
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        self.values = values

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in type(self).fields:
            return None
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {self.values!r})"


class InvalidDescriptor(VMGridFault):
    element = "InvalidDescriptorFault"
    fields = ("line", "column", "schemaMessage")


class UnknownImage(VMGridFault):
    element = "UnknownImageFault"
    fields = ("image",)


class DuplicateName(VMGridFault):
    element = "DuplicateNameFault"
    fields = ("vo", "name")


class BadQuery(VMGridFault):
    element = "BadQueryFault"
    fields = ("reason", "criterion")


class ImageInUse(VMGridFault):
    element = "ImageInUseFault"
    fields = ("imageId", "holder")  # holder: a list


class ChecksumMismatch(VMGridFault):
    element = "ChecksumMismatchFault"
    fields = ("expected", "actual")


class InvalidSource(VMGridFault):
    element = "InvalidSourceFault"
    fields = ("source",)


class InvalidArgument(VMGridFault):
    element = "InvalidArgumentFault"
    fields = ("argument",)


class AccessDenied(VMGridFault):
    element = "AccessDeniedFault"
    fields = ("subject", "action", "resource", "rule")


class LimitExceeded(VMGridFault):
    element = "LimitExceededFault"
    fields = ("limit", "allowed", "requested")


class ServiceUnavailable(VMGridFault):
    element = "ServiceUnavailableFault"
    fields = ("service",)
    client_error = False


class ResourceUnknown(VMGridFault):
    element = "ResourceUnknownFault"
    fields = ("resource",)


class IllegalTransition(VMGridFault):
    element = "IllegalTransitionFault"
    fields = ("state", "operation")


class NoCapacity(VMGridFault):
    element = "NoCapacityFault"
    fields = ("resource",)
    client_error = False


class VMMFault(VMGridFault):
    element = "VMMFault"
    fields = ("operation",)
    client_error = False


class TransferFault(VMGridFault):
    element = "TransferFault"
    fields = ("source",)
    client_error = False


class InternalFault(VMGridFault):
    element = "InternalFault"
    fields = ("incident",)
    client_error = False


class StorageFull(VMGridFault):
    """A write failed for lack of space (ENOSPC, EDQUOT, SQLite's "database or disk is full"); ``store``
    names what is full. Nothing was half-written; operations that only read keep working."""

    element = "StorageFullFault"
    fields = ("store",)
    client_error = False


def is_storage_full(exc: BaseException) -> bool:
    """Is ``exc`` a write that failed because a disk (or quota) is full?"""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or \
            "database or disk is full" in str(exc)
    return False


# Faults a later try of the same request may overcome: the service down, its disk full, an unexpected failure.
RETRYABLE: tuple[type[VMGridFault], ...] = (ServiceUnavailable, StorageFull, InternalFault)

class MigrationFault(VMGridFault):
    """A migration failed in ``phase`` and was rolled back (the instance runs on the source as before)."""
    element = "MigrationFault"
    fields = ("phase", "target", "cause")
    client_error = False


class InstanceMoved(VMGridFault):
    """The instance was migrated: ``address`` is the VMManager it lives on now (same InstanceKey)."""
    element = "InstanceMovedFault"
    fields = ("resource", "address")


_REGISTRY: dict[str, type[VMGridFault]] = {}


def register(cls: type[VMGridFault]) -> type[VMGridFault]:
    """Make a fault class (possibly of another namespace/service module) known to the mapping."""
    _REGISTRY[cls.element] = cls
    return cls


for _cls in (InvalidDescriptor, UnknownImage, DuplicateName, BadQuery, ImageInUse, ChecksumMismatch,
             InvalidSource, InvalidArgument, AccessDenied, LimitExceeded, ServiceUnavailable, InternalFault,
             ResourceUnknown, IllegalTransition, NoCapacity, VMMFault, TransferFault, StorageFull, MigrationFault,
             InstanceMoved):
    register(_cls)


def to_detail(fault: VMGridFault) -> etree._Element:
    """The fault's detail element, in the order faults.xsd declares."""
    ns = getattr(fault, "namespace", FAULTS_NS)
    el = etree.Element(f"{{{ns}}}{fault.element}", nsmap={"f": ns})
    etree.SubElement(el, f"{{{ns}}}Timestamp").text = _now()
    etree.SubElement(el, f"{{{ns}}}Description").text = fault.description
    for name in fault.fields:
        value = fault.values.get(name)
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            etree.SubElement(el, f"{{{ns}}}{name}").text = str(item)
    return el


def from_detail(detail: etree._Element) -> VMGridFault | None:
    """The typed fault a received detail element stands for, or None when it is not a vmgrid fault."""
    name = etree.QName(detail).localname
    cls = _REGISTRY.get(name)
    if cls is None:
        return None
    description = ""
    values: dict[str, object] = {}
    for child in detail:
        local = etree.QName(child).localname
        if local == "Description":
            description = child.text or ""
        elif local in cls.fields:
            if local in values:
                prev = values[local]
                values[local] = (prev if isinstance(prev, list) else [prev]) + [child.text or ""]
            else:
                values[local] = child.text or ""
    for name in cls.fields:
        if name in ("holder",) and name in values and not isinstance(values[name], list):
            values[name] = [values[name]]
    return cls(description, **values)
