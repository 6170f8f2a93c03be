"""The VMRepository on the wire (wsdl/vmrepository.wsdl): its namespace, requests turned into the registry
core's typed values, results turned into response elements, and the reading side the client uses
(:class:`QueryResult`, :func:`read_query`, :func:`read_vos`, :func:`read_hold`, ...), so that both ends
read one element by one name.

Adding an operation: its parse and render functions here, its method in
:mod:`services.vmrepository.registry`, a three-line handler in :mod:`services.vmrepository.service`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lxml import etree

from services.common.xsdtime import format_datetime
from services.descriptor import WS
from services.vmrepository.query import Criterion
from services.vmrepository.values import Changes, Hold, Location, Query, QueryPage, Removed, Source

if TYPE_CHECKING:
    from services.vmrepository.catalogue import Record

REPO = "http://vmgrid.org/ns/vmrepository/1"
WSRF_RP = "http://docs.oasis-open.org/wsrf/rp-2"
NS = {"repo": REPO, "ws": WS, "wsrf-rp": WSRF_RP}
QUERY_EXPRESSION = f"{{{WSRF_RP}}}QueryExpression"

# DuplicateImage's repo:changes children -> the Changes field each sets
CHANGE_FIELDS = {"version": "version", "description": "description", "vcpus": "vcpus", "memory": "memory",
                 "containerCommand": "container_command"}


def element(name: str, text: object | None = None) -> etree._Element:
    el = etree.Element(f"{{{REPO}}}{name}", nsmap={"repo": REPO})
    if text is not None:
        el.text = str(text)
    return el


def sub(parent: etree._Element, name: str, text: object | None = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{REPO}}}{name}")
    if text is not None:
        el.text = str(text)
    return el


def text(req: etree._Element, path: str) -> str | None:
    el = req.find(path, NS)
    return el.text if el is not None else None


def _with_workspace(name: str, ws: etree._Element) -> etree._Element:
    resp = element(name)
    resp.append(ws)
    return resp


# -- requests -> typed values (the service's side) -------------------------------------------------------
def image_ref(req: etree._Element) -> str:
    return text(req, "repo:image") or ""


def workspace(req: etree._Element) -> etree._Element:
    """The request's descriptor, a copy the core may change (None when the request has none)."""
    found = req.find("ws:workspace", NS)
    return None if found is None else copy.deepcopy(found)


def workspaces(req: etree._Element) -> list[etree._Element]:
    """An ImportImages request's descriptors, taken out of it for the core to change (the request is not read
    again; a copy of each cost twice the taking out: a thousand descriptors a call). Each keeps the namespace
    declarations it uses, as a copy would."""
    out = req.findall("ws:workspace", NS)
    for ws in out:
        req.remove(ws)
    return out


def source(req: etree._Element) -> Source:
    el = req.find("repo:source", NS)[0]
    return Source(etree.QName(el).localname, (el.text or "").strip())


def query(req: etree._Element) -> Query:
    order_by = text(req, "repo:orderBy") or "name"
    descending = (text(req, "repo:descending") or "false").strip() in ("true", "1")
    offset = int(text(req, "repo:offset") or 0)
    limit_text = text(req, "repo:limit")
    limit = int(limit_text) if limit_text else None
    expr = req.find("wsrf-rp:QueryExpression", NS)
    if expr is not None:
        return Query(xpath=(expr.text or "").strip(), dialect=expr.get("Dialect"),
                     namespaces={k: v for k, v in expr.nsmap.items() if k}, order_by=order_by,
                     descending=descending, offset=offset, limit=limit)
    groups = [[Criterion(c.findtext("repo:field", namespaces=NS).strip(),
                         c.findtext("repo:operator", namespaces=NS).strip(),
                         c.findtext("repo:value", namespaces=NS) or "")
               for c in g.iterfind("repo:criterion", NS)]
              for g in req.iterfind("repo:criteria/repo:group", NS)]
    return Query(groups=groups, order_by=order_by, descending=descending, offset=offset, limit=limit)


def changes(req: etree._Element) -> Changes:
    found: dict[str, str] = {}
    el = req.find("repo:changes", NS)
    if el is not None:
        for child in el:
            name = CHANGE_FIELDS.get(etree.QName(child).localname)
            if name is not None:
                found[name] = (child.text or "").strip()
    return Changes(**found)


def hold_request(req: etree._Element) -> tuple[str, str, int]:
    """(image, holder, seconds) of a HoldImage request."""
    return image_ref(req), text(req, "repo:holder"), int(text(req, "repo:seconds"))


def hold_id(req: etree._Element) -> str:
    return (text(req, "repo:holdId") or "").strip()


# -- typed values -> responses ------------------------------------------------------------------------------
def registered(ws: etree._Element) -> etree._Element:
    return _with_workspace("RegisterImageResponse", ws)


def imported(workspaces: list[etree._Element]) -> etree._Element:
    resp = element("ImportImagesResponse")
    for ws in workspaces:
        sub(resp, "imageId", ws.findtext("ws:identity/ws:imageId", namespaces=NS))
    return resp


def query_response(page: QueryPage) -> etree._Element:
    resp = element("QueryImagesResponse")
    sub(resp, "total", page.total)
    sub(resp, "offset", page.offset)
    for rec in page.records:
        resp.append(rec.element())
    return resp


def descriptor_response(rec: Record) -> etree._Element:
    return _with_workspace("GetDescriptorResponse", rec.element())


def duplicated(ws: etree._Element) -> etree._Element:
    return _with_workspace("DuplicateImageResponse", ws)


def updated(ws: etree._Element) -> etree._Element:
    return _with_workspace("UpdateDescriptorResponse", ws)


def removed(r: Removed) -> etree._Element:
    resp = element("RemoveImageResponse")
    sub(resp, "imageId", r.image_id)
    sub(resp, "bytesDeleted", "true" if r.bytes_deleted else "false")
    return resp


def vos_response(vos: list[tuple[str, int]]) -> etree._Element:
    resp = element("ListVOsResponse")
    for vo, n in vos:
        v = sub(resp, "vo")
        sub(v, "name", vo)
        sub(v, "images", n)
    return resp


def location_response(loc: Location) -> etree._Element:
    resp = element("GetImageLocationResponse")
    sub(resp, "url", loc.url)
    sub(resp, "sha256", loc.sha256)
    sub(resp, "size", loc.size)
    sub(resp, "format", loc.image_format)
    return resp


def upload_location_response(url: str) -> etree._Element:
    resp = element("GetUploadLocationResponse")
    sub(resp, "url", url)
    return resp


def hold_response(hold: Hold) -> etree._Element:
    resp = element("HoldImageResponse")
    sub(resp, "holdId", hold.hold_id)
    sub(resp, "expires", format_datetime(hold.expires, fraction=False))
    return resp


def released(ok: bool) -> etree._Element:
    resp = element("ReleaseImageResponse")
    sub(resp, "released", "true" if ok else "false")
    return resp


# -- responses -> values (the client's side, the same element names) ----------------------------------------
@dataclass
class QueryResult:
    total: int
    offset: int
    descriptors: list[etree._Element]


def read_workspace(resp: etree._Element) -> etree._Element | None:
    return resp.find("ws:workspace", NS)


def import_request(workspaces: list[etree._Element], move: bool = False,
                   into: etree._Element | None = None) -> etree._Element:
    """An ImportImages request element (the client sends it as built: see GridServiceClient.call's payload).
    ``move`` puts the elements themselves into it instead of copies; ``into``: the empty request element to fill
    (GridServiceClient.new_request's, already in its envelope)."""
    req = element("ImportImages") if into is None else into
    for ws in workspaces:
        req.append(ws if move else copy.deepcopy(ws))
    return req


def read_imported(resp: etree._Element) -> list[str]:
    return [el.text for el in resp.findall("repo:imageId", NS)]


def read_query(resp: etree._Element) -> QueryResult:
    return QueryResult(int(resp.findtext("repo:total", namespaces=NS)), int(resp.findtext("repo:offset", namespaces=NS)),
                       resp.findall("ws:workspace", NS))


def read_removed(resp: etree._Element) -> bool:
    return resp.findtext("repo:bytesDeleted", namespaces=NS) == "true"


def read_vos(resp: etree._Element) -> list[tuple[str, int]]:
    return [(v.findtext("repo:name", namespaces=NS), int(v.findtext("repo:images", namespaces=NS)))
            for v in resp.iterfind("repo:vo", NS)]


def read_url(resp: etree._Element) -> str:
    return resp.findtext("repo:url", namespaces=NS)


def read_hold(resp: etree._Element) -> tuple[str, str]:
    return resp.findtext("repo:holdId", namespaces=NS), resp.findtext("repo:expires", namespaces=NS)


def read_released(resp: etree._Element) -> bool:
    return resp.findtext("repo:released", namespaces=NS) == "true"
