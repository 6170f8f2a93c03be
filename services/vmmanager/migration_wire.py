"""Migration on the wire: Migrate, AcceptMigration and CompleteMigration requests parsed into the core's
values and built for zeep (the client and the source node, which calls the target, share this)."""
from __future__ import annotations

import copy

from lxml import etree

from services.common.xsdtime import format_datetime, parse_datetime
from services.descriptor import Descriptor, check_descriptor
from services.faults import InvalidArgument
from services.vmmanager.values import MigrationFile, MigrationOffer
from services.vmmanager.wire import NS, q, response
from services.wsrf.properties import sub


def _text(req: etree._Element, name: str) -> str | None:
    value = req.findtext(f"vmm:{name}", namespaces=NS)
    return value.strip() if value is not None else None


# -- Migrate (client -> source) ---------------------------------------------------------------------------------
def parse_migrate(req: etree._Element) -> tuple[str, str, bytes]:
    """(target URL, mode, delegated proxy PEM)."""
    return _text(req, "target") or "", _text(req, "mode") or "Cold", (_text(req, "delegatedProxy") or "").encode()


def migrate_request(target: str, proxy_pem: bytes, mode: str = "Cold") -> dict:
    return {"target": target, "mode": mode, "delegatedProxy": proxy_pem.decode()}


# -- AcceptMigration (source -> target) ---------------------------------------------------------------------------
def parse_accept(req: etree._Element) -> MigrationOffer:
    ws = copy.deepcopy(req.find("ws:workspace", NS))
    check_descriptor(ws)
    files = tuple(MigrationFile(f.findtext("vmm:name", namespaces=NS), int(f.findtext("vmm:size", namespaces=NS)),
                                (f.findtext("vmm:sha256", namespaces=NS) or "").strip().lower(),
                                (f.findtext("vmm:blake3", namespaces=NS) or "").strip().lower())
                  for f in req.iterfind("vmm:file", NS))
    phases = tuple((p.findtext("vmm:name", namespaces=NS), float(p.findtext("vmm:seconds", namespaces=NS)))
                   for p in req.iterfind("vmm:phase", NS))
    max_lifetime = _text(req, "maxLifetime")
    try:
        termination = parse_datetime(_text(req, "terminationTime"))
    except ValueError:
        raise InvalidArgument("terminationTime is not an xs:dateTime", argument="terminationTime") from None
    return MigrationOffer(key=_text(req, "InstanceKey"), identifier=_text(req, "identifier"), owner=_text(req, "owner"),
                          descriptor=Descriptor(ws), descriptor_xml=etree.tostring(ws),
                          termination=termination, max_lifetime=int(max_lifetime) if max_lifetime else None,
                          state=_text(req, "state"), source=_text(req, "source"), files_url=_text(req, "files"),
                          files=files, phases=phases, uuid=_text(req, "uuid") or "",
                          guest_token=_text(req, "guestToken") or "",
                          step=_text(req, "step") or "", vmm=_text(req, "vmmKind") or "", proof=_proof(req),
                          subscriptions=tuple(
                              (sub_el.findtext("vmm:consumer", namespaces=NS).strip(),
                               sub_el.findtext("vmm:subscriber", namespaces=NS).strip(),
                               parse_datetime(sub_el.findtext("vmm:expires", namespaces=NS).strip()))
                              for sub_el in req.iterfind("vmm:subscription", NS)))


def _proof(req: etree._Element) -> tuple[str, str, str]:
    """sourceProof: (the source's host certificate chain, PEM; when it signed; the signature, base64), or ()."""
    el = req.find("vmm:sourceProof", NS)
    if el is None:
        return ()
    return tuple((el.findtext(f"vmm:{name}", namespaces=NS) or "").strip()
                 for name in ("certificate", "issued", "signature"))


def accept_request(offer: MigrationOffer, to_zeep) -> dict:
    kwargs = {"InstanceKey": offer.key, "identifier": offer.identifier, "owner": offer.owner,
              "workspace": to_zeep(etree.fromstring(offer.descriptor_xml)),
              "terminationTime": format_datetime(offer.termination), "state": offer.state, "source": offer.source,
              "files": offer.files_url,
              "file": [{"name": f.name, "size": f.size, **({"sha256": f.sha256} if f.sha256 else {}),
                        **({"blake3": f.blake3} if f.blake3 else {})} for f in offer.files],
              "phase": [{"name": n, "seconds": s} for n, s in offer.phases]}
    if offer.uuid:
        kwargs["uuid"] = offer.uuid
    if offer.guest_token:
        kwargs["guestToken"] = offer.guest_token
    if offer.subscriptions:
        kwargs["subscription"] = [{"consumer": c, "subscriber": who, "expires": format_datetime(e)}
                                  for c, who, e in offer.subscriptions]
    if offer.max_lifetime:
        kwargs["maxLifetime"] = offer.max_lifetime
    if offer.step:
        kwargs["step"] = offer.step
    if offer.vmm:
        kwargs["vmmKind"] = offer.vmm
    if offer.proof:
        kwargs["sourceProof"] = {"certificate": offer.proof[0], "issued": offer.proof[1],
                                 "signature": offer.proof[2]}
    return kwargs


# -- CompleteMigration (source -> target) -------------------------------------------------------------------------
def parse_complete(req: etree._Element) -> bool:
    return (_text(req, "commit") or "false") in ("true", "1")


def complete_response(outcome: str, instance: etree._Element | None) -> etree._Element:
    resp = response("CompleteMigrationResponse")
    sub(resp, q("outcome"), outcome)
    if instance is not None:
        resp.append(instance)
    return resp


def instance_of(resp: etree._Element) -> etree._Element | None:
    return resp.find("vmm:Instance", NS)


def add_phases(instance: etree._Element, phases: list[tuple[str, float]]) -> etree._Element:
    """Append phases to an Instance element's PhaseTimings (the source's release, after the target answered)."""
    timings = instance.find("vmm:PhaseTimings", NS)
    if timings is None:
        return instance
    for name, seconds in phases:
        p = sub(timings, q("phase"))
        sub(p, q("name"), name)
        sub(p, q("seconds"), repr(float(seconds)))
    return instance
