"""The VMRepository from a scientist's side: register, query, show, duplicate, update, remove. Responses
are read with :mod:`services.vmrepository.wire`, the module the service renders them with."""
from __future__ import annotations

import re
from pathlib import Path

from lxml import etree

from services.soapclient import GridServiceClient
from services.descriptor import parse_descriptor
from services.faults import InvalidArgument
from services.vmrepository import wire
from services.vmrepository.query import XPATH_DIALECT, Criterion, parse_cli
from services.vmrepository.wire import NS, QUERY_EXPRESSION, REPO, QueryResult

__all__ = ["RepositoryClient", "QueryResult", "NS", "REPO", "QUERY_EXPRESSION"]


def _descriptor(value: bytes | str | Path | etree._Element) -> etree._Element:
    if isinstance(value, etree._Element):
        return value
    if isinstance(value, Path):
        value = value.read_bytes()
    if isinstance(value, str):
        value = value.encode()
    return parse_descriptor(value)


# what XML 1.0 cannot carry: NUL and the other C0 controls but tab, newline and return; lone surrogates; U+FFFE/FFFF
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _check_xml_text(value, where: str) -> None:
    """Refuse, before anything is sent, a value no XML message can carry (lxml raised a bare ValueError, a
    traceback on the command line, for `vmgrid repo show 'bio/a<ESC>'` or a criterion with a NUL)."""
    if isinstance(value, str):
        m = _NOT_XML.search(value)
        if m:
            raise InvalidArgument(f"{where} {value!r} holds {m.group()!r} at {m.start()}, a character no XML message "
                                  f"can carry (NUL, a control character, a lone surrogate): nothing was sent",
                                  argument=where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_xml_text(item, key if isinstance(key, str) else where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_xml_text(item, where)


class _CheckedService:
    """The service client, with every string argument of a call checked by :func:`_check_xml_text` first."""

    def __init__(self, service: GridServiceClient):
        self._service = service

    def call(self, operation: str, *args, text_fill: dict | None = None, **kwargs):
        _check_xml_text(kwargs, operation)
        _check_xml_text(list(args), operation)
        if text_fill:
            _check_xml_text(list(text_fill.values()), "XPath expression")
        return self._service.call(operation, *args, text_fill=text_fill, **kwargs)

    def __getattr__(self, name):
        return getattr(self._service, name)


class RepositoryClient:
    def __init__(self, service: GridServiceClient):
        self.service = service
        self._calls = _CheckedService(service)

    def register(self, descriptor, *, local_path: str | None = None, upload: str | None = None) -> etree._Element:
        """Register an image from a path on the repository host (admins) or an uploaded file."""
        if (local_path is None) == (upload is None):
            raise ValueError("give exactly one of local_path (on the repository host) or upload")
        source = {"localPath": str(local_path)} if local_path is not None else {"upload": upload}
        resp = self._calls.call("RegisterImage", workspace=self.service.to_zeep(_descriptor(descriptor)),
                                 source=source)
        return wire.read_workspace(resp)

    def query(self, criteria: list[str] | list[list[Criterion]] | None = None, *, xpath: str | None = None,
              namespaces: dict[str, str] | None = None, order_by: str | None = None, descending: bool = False,
              offset: int = 0, limit: int | None = None) -> QueryResult:
        """Criteria as command-line strings (``'ram >= 512'``, ``'or'`` between groups) or groups of
        Criterion; or an XPath 1.0 expression (prefix ``ws`` is the descriptor namespace)."""
        kwargs: dict = {}
        fill = None
        if xpath is not None:
            if namespaces:
                raise ValueError("XPath namespaces other than ws: are not supported by this client")
            kwargs["QueryExpression"] = {"Dialect": XPATH_DIALECT}
            fill = {QUERY_EXPRESSION: xpath}
        else:
            groups = criteria or []
            if groups and isinstance(groups[0], str):
                groups = parse_cli(list(groups))
            kwargs["criteria"] = {"group": [{"criterion": [{"field": c.field, "operator": c.op, "value": c.value}
                                                           for c in g]} for g in groups]}
        if order_by:
            kwargs["orderBy"] = order_by
        if descending:
            kwargs["descending"] = True
        if offset:
            kwargs["offset"] = offset
        if limit is not None:           # 0 is not "the default": the service refuses it (1 to 1000)
            kwargs["limit"] = limit
        resp = self._calls.call("QueryImages", text_fill=fill, **kwargs)
        return wire.read_query(resp)

    def show(self, image: str) -> etree._Element:
        return wire.read_workspace(self._calls.call("GetDescriptor", image=image))

    def duplicate(self, image: str, name: str, *, memory: int | None = None, vcpus: int | None = None,
                  container_command: str | None = None, description: str | None = None,
                  version: str | None = None) -> etree._Element:
        changes = {k: v for k, v in (("version", version), ("description", description), ("vcpus", vcpus),
                                     ("memory", memory), ("containerCommand", container_command)) if v is not None}
        kwargs = {"image": image, "name": name}
        if changes:
            kwargs["changes"] = changes
        return wire.read_workspace(self._calls.call("DuplicateImage", **kwargs))

    def update(self, image: str, descriptor) -> etree._Element:
        resp = self._calls.call("UpdateDescriptor", image=image,
                                 workspace=self.service.to_zeep(_descriptor(descriptor)))
        return wire.read_workspace(resp)

    def import_images(self, descriptors: list, *, move: bool = False) -> list[str]:
        """Register descriptors naming bytes the repository already has (at most 1000), all or none; their
        new image ids, in order. A fault's description names the descriptor by its position. With ``move``
        the given elements themselves go into the request (no copy; `vmgrid repo import`, which sends each
        once): they are then children of the request."""
        elements = [_descriptor(d) for d in descriptors]
        if not elements:
            raise ValueError("nothing to import")
        # built as lxml inside the envelope it goes in, sent without zeep rendering anything
        into = self.service.new_request(f"{{{REPO}}}ImportImages", {"repo": REPO})
        req = wire.import_request(elements, move=move, into=into)
        resp = self._calls.call("ImportImages", payload=req)
        return wire.read_imported(resp)

    def remove(self, image: str) -> bool:
        """Remove an image; True when its bytes were deleted too (no other descriptor used them)."""
        resp = self._calls.call("RemoveImage", image=image)
        return wire.read_removed(resp)

    def vos(self) -> list[tuple[str, int]]:
        return wire.read_vos(self._calls.call("ListVOs"))

    def upload_location(self, descriptor=None) -> str:
        """gsiftp:// URL of the caller's own directory in the repository's upload area; with the descriptor the
        upload is for, the repository refuses it now (the fault RegisterImage would answer), before any upload."""
        if descriptor is None:
            return wire.read_url(self._calls.call("GetUploadLocation"))
        return wire.read_url(self._calls.call("GetUploadLocation",
                                               workspace=self.service.to_zeep(_descriptor(descriptor))))

    def location(self, image: str) -> str:
        """gsiftp:// URL of an image's bytes."""
        return wire.read_url(self._calls.call("GetImageLocation", image=image))

    def hold(self, image: str, holder: str, seconds: int) -> tuple[str, str]:
        return wire.read_hold(self._calls.call("HoldImage", image=image, holder=holder, seconds=seconds))

    def release(self, hold_id: str) -> bool:
        return wire.read_released(self._calls.call("ReleaseImage", holdId=hold_id))
