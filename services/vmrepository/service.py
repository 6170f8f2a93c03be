"""The VMRepository grid service: register, query, show, duplicate, update and remove a VO's images."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from lxml import etree

from services.authz.pep import Enforcer, PolicyDecisionPoint
from services.container.service import CallContext, SoapService, operation
from services.descriptor import NSMAP as WS_NSMAP
from services.descriptor import WS, Descriptor, check_descriptor, set_field, utc_now
from services.faults import (BadQuery, ChecksumMismatch, DuplicateName, ImageInUse, InvalidArgument,
                             InvalidDescriptor, InvalidSource, UnknownImage)
from services.vmrepository.catalogue import Catalogue, Record, new_image_id
from services.vmrepository.query import XPATH_DIALECT, Criterion, compile_xpath, order_column, prepare_groups
from services.common.crash import crashpoint
from services.common.xsdtime import format_datetime
from services.vmrepository.config import RepositoryConfig
from services.vmrepository.store import ImageStore, image_format_of
from services.vmrepository.xpath_scan import scanner

REPO = "http://vmgrid.org/ns/vmrepository/1"
WSRF_RP = "http://docs.oasis-open.org/wsrf/rp-2"
NS = {"repo": REPO, "ws": WS, "wsrf-rp": WSRF_RP}


def _el(name: str, text: object | None = None) -> etree._Element:
    el = etree.Element(f"{{{REPO}}}{name}", nsmap={"repo": REPO})
    if text is not None:
        el.text = str(text)
    return el


def _sub(parent: etree._Element, name: str, text: object | None = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{REPO}}}{name}")
    if text is not None:
        el.text = str(text)
    return el


def _text(req: etree._Element, path: str) -> str | None:
    el = req.find(path, NS)
    return el.text if el is not None else None


def _resource(rec: Record) -> dict[str, str]:
    return {"type": "image", "vo": rec.vo, "owner": rec.owner, "name": rec.name, "id": rec.image_id}


class VMRepositoryService(SoapService):
    name = "VMRepositoryService"
    wsdl = "vmrepository.wsdl"

    def __init__(self, state_dir: Path, config: RepositoryConfig, pdp: PolicyDecisionPoint):
        super().__init__(state_dir)
        self.config = config
        self.authz = Enforcer(pdp)
        self.store = ImageStore(self.state_dir / "images")
        self.catalogue = Catalogue(self.state_dir / "catalogue.sqlite", self.store)
        self.upload_dir = Path(config.upload_dir) if config.upload_dir else self.state_dir / "uploads"
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        report = self.catalogue.reconcile()
        self.log.info("catalogue reconciled: %s", report)
        self.transfers = None  # set by attach_transfers: the GridFTP server of the store

    def attach_transfers(self, host: str, credential, trust) -> None:
        """Serve the image store and the upload area over GridFTP (started with the container)."""
        from services.vmrepository.transfer import RepositoryTransfers

        c = self.config
        self.transfers = RepositoryTransfers(self, c.gridftp_host or host, max(c.gridftp_port, 0), credential, trust,
                                             c.gridftp_public_host)

    def start(self) -> None:
        if self.transfers is not None:
            self.transfers.start()

    def close(self) -> None:
        if self.transfers is not None:
            self.transfers.stop()
        self.catalogue.close()

    def _transfers(self):
        if self.transfers is None:
            raise InvalidArgument("this repository serves no GridFTP (its gridftp_port is -1)", argument="gridftp")
        return self.transfers

    # -- helpers ------------------------------------------------------------------------------
    def _lookup(self, ref: str) -> Record:
        ref = ref.strip()
        if ref.startswith("img-"):
            rec = self.catalogue.get(ref)
        elif "/" in ref:
            vo, _, name = ref.partition("/")
            rec = self.catalogue.find(vo, name)
        else:
            raise InvalidArgument(f"image reference {ref!r} is neither an image id (img-...) nor VO/name",
                                  argument="image")
        if rec is None:
            raise UnknownImage(f"no image {ref}", image=ref)
        return rec

    def _visible(self, ctx: CallContext, ref: str, action: str = "image.read") -> Record:
        rec = self._lookup(ref)
        self.authz.check(ctx.caller, action, _resource(rec))
        return rec

    def _source_path(self, ctx: CallContext, source: etree._Element) -> tuple[Path, str]:
        kind = etree.QName(source).localname
        value = (source.text or "").strip()
        if kind == "localPath":
            path = Path(os.path.realpath(value))
            allowed = [Path(os.path.realpath(d)) for d in self.config.ingest_dirs]
            if not any(path == d or d in path.parents for d in allowed):
                raise InvalidSource(f"{value} is not inside an ingest directory of this repository "
                                    f"({', '.join(map(str, allowed)) or 'none configured'})", source=value)
        else:  # upload: a file name in the caller's own directory of the upload area
            from services.vmrepository.transfer import NAME, upload_area

            if not NAME.fullmatch(value):
                raise InvalidSource(f"bad upload name {value!r}", source=value)
            path = self.upload_dir / upload_area(ctx.dn) / value
        if not path.is_file():
            raise InvalidSource(f"{value}: no such file", source=value)
        return path, kind

    # -- operations ---------------------------------------------------------------------------
    @operation("RegisterImage")
    def register_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        ws = copy.deepcopy(req.find("ws:workspace", NS))
        check_descriptor(ws)
        d = Descriptor(ws)
        if d.image_id:
            raise InvalidDescriptor("a new image must not carry an imageId: the repository assigns it")
        owner = d.owner or ctx.dn
        source, kind = self._source_path(ctx, req.find("repo:source", NS)[0])
        self.authz.check(ctx.caller, "image.register",
                         {"type": "image", "vo": d.vo, "owner": owner, "name": d.name},
                         {"source": "local" if kind == "localPath" else "upload", "memory": str(d.memory),
                          "vcpus": str(d.vcpus)})
        if owner != ctx.dn:
            self.authz.check(ctx.caller, "image.register-for-other", {"type": "image", "vo": d.vo, "owner": owner})
        if self.catalogue.find(d.vo, d.name):
            raise DuplicateName(f"an image named {d.name!r} already exists in VO {d.vo!r}", vo=d.vo, name=d.name)
        actual_format = image_format_of(source)
        if actual_format != d.image_format:
            raise InvalidDescriptor(f"the descriptor says format {d.image_format} but the file is {actual_format}",
                                    schemaMessage="image format mismatch")
        try:
            ingested = self.store.ingest(source, self.config.max_image_bytes)
        except ValueError as exc:
            raise InvalidSource(f"{source}: {exc}", source=str(source)) from None
        except OSError as exc:
            raise InvalidSource(f"{source}: cannot read ({exc.strerror})", source=str(source)) from None
        try:
            if d.sha256 and d.sha256 != ingested.sha256:
                raise ChecksumMismatch(f"the descriptor's sha256 {d.sha256} does not match the image bytes "
                                       f"{ingested.sha256}", expected=d.sha256, actual=ingested.sha256)
            if d.size is not None and d.size != ingested.size:
                raise ChecksumMismatch(f"the descriptor's size {d.size} does not match the image ({ingested.size} bytes)",
                                       expected=str(d.size), actual=str(ingested.size))
            set_field(ws, "identity", "imageId", new_image_id())
            set_field(ws, "identity", "owner", owner)
            set_field(ws, "identity", "created", utc_now())
            set_field(ws, "image", "sha256", ingested.sha256)
            set_field(ws, "image", "size", ingested.size)
            check_descriptor(ws)
            self.catalogue.add(ws, ingested)
            crashpoint("register.committed")
        except BaseException:
            self.store.discard(ingested)
            raise
        if kind == "upload":
            source.unlink(missing_ok=True)
        self.log.info("registered %s %s/%s sha256=%s size=%d by %s", Descriptor(ws).image_id, d.vo, d.name,
                      ingested.sha256, ingested.size, ctx.dn)
        resp = _el("RegisterImageResponse")
        resp.append(ws)
        return resp

    @operation("QueryImages")
    def query_images(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self.authz.check(ctx.caller, "image.query", {"type": "catalogue"})
        vos = self.authz.groups(ctx.caller)
        order = order_column(_text(req, "repo:orderBy") or "name")
        descending = (_text(req, "repo:descending") or "false").strip() in ("true", "1")
        offset = int(_text(req, "repo:offset") or 0)
        limit = int(_text(req, "repo:limit") or self.config.default_limit)
        expr = req.find("wsrf-rp:QueryExpression", NS)
        if expr is not None:
            dialect = expr.get("Dialect")
            if dialect != XPATH_DIALECT:
                raise BadQuery(f"unsupported query dialect {dialect!r}; supported: {XPATH_DIALECT}",
                               reason="unsupported dialect")
            xp = compile_xpath((expr.text or "").strip(), {k: v for k, v in expr.nsmap.items() if k})
            total, ids = scanner(self.catalogue.path).query(xp, vos, order, descending, offset, limit)
            page = self.catalogue.records(ids)
        else:
            groups = []
            for g in req.iterfind("repo:criteria/repo:group", NS):
                groups.append([Criterion(c.findtext("repo:field", namespaces=NS).strip(),
                                         c.findtext("repo:operator", namespaces=NS).strip(),
                                         c.findtext("repo:value", namespaces=NS) or "")
                               for c in g.iterfind("repo:criterion", NS)])
            total, page = self.catalogue.query(prepare_groups(groups), vos, order, descending, offset, limit)
        resp = _el("QueryImagesResponse")
        _sub(resp, "total", total)
        _sub(resp, "offset", offset)
        for rec in page:
            resp.append(rec.element())
        return resp

    @operation("GetDescriptor")
    def get_descriptor(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        rec = self._visible(ctx, _text(req, "repo:image"))
        resp = _el("GetDescriptorResponse")
        resp.append(rec.element())
        return resp

    @operation("DuplicateImage")
    def duplicate_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        rec = self._visible(ctx, _text(req, "repo:image"))
        name = _text(req, "repo:name").strip()
        ws = rec.element()
        set_field(ws, "identity", "name", name)
        set_field(ws, "identity", "imageId", new_image_id())
        set_field(ws, "identity", "owner", ctx.dn)
        set_field(ws, "identity", "created", utc_now())
        changes = req.find("repo:changes", NS)
        if changes is not None:
            for child in changes:
                local, value = etree.QName(child).localname, (child.text or "").strip()
                if local == "version":
                    set_field(ws, "identity", "version", value)
                elif local == "description":
                    set_field(ws, "identity", "description", value)
                elif local in ("vcpus", "memory"):
                    set_field(ws, "hardware", local, value)
                elif local == "containerCommand":
                    set_field(ws, "container", "command", value)
        new = Descriptor(ws)
        self.authz.check(ctx.caller, "image.duplicate", {**_resource(rec), "name": name},
                         {"memory": str(new.memory), "vcpus": str(new.vcpus)})
        check_descriptor(ws)
        self.catalogue.add(ws)
        resp = _el("DuplicateImageResponse")
        resp.append(ws)
        return resp

    @operation("UpdateDescriptor")
    def update_descriptor(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        rec = self._lookup(_text(req, "repo:image"))
        self.authz.check(ctx.caller, "image.update", _resource(rec))
        ws = copy.deepcopy(req.find("ws:workspace", NS))
        new = Descriptor(ws)
        old = Descriptor(rec.element())
        if new.image_id and new.image_id != rec.image_id:
            raise InvalidDescriptor(f"the descriptor's imageId {new.image_id} is not {rec.image_id}")
        if new.vo != rec.vo:
            raise InvalidDescriptor(f"an image cannot move from VO {rec.vo} to {new.vo}; duplicate it instead")
        for what, a, b in (("sha256", new.sha256, old.sha256), ("size", new.size, old.size),
                           ("format", new.image_format, old.image_format)):
            if a is not None and a != b:
                raise InvalidDescriptor(f"the image bytes cannot change: {what} {a} is not {b}",
                                        schemaMessage="image section changed")
        set_field(ws, "identity", "imageId", rec.image_id)
        set_field(ws, "identity", "owner", old.owner)
        set_field(ws, "identity", "created", old.created)
        set_field(ws, "image", "sha256", old.sha256)
        set_field(ws, "image", "size", old.size)
        check_descriptor(ws)
        self.catalogue.replace(ws, utc_now())
        resp = _el("UpdateDescriptorResponse")
        resp.append(ws)
        return resp

    @operation("RemoveImage")
    def remove_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        rec = self._lookup(_text(req, "repo:image"))
        self.authz.check(ctx.caller, "image.remove", _resource(rec))
        deleted, holders = self.catalogue.remove(rec.image_id)
        if holders:
            raise ImageInUse(f"{rec.vo}/{rec.name} is held by {len(holders)} deployment(s): {', '.join(holders)}",
                             imageId=rec.image_id, holder=holders)
        self.log.info("removed %s %s/%s (bytes deleted: %s) by %s", rec.image_id, rec.vo, rec.name, deleted, ctx.dn)
        resp = _el("RemoveImageResponse")
        _sub(resp, "imageId", rec.image_id)
        _sub(resp, "bytesDeleted", "true" if deleted else "false")
        return resp

    @operation("ListVOs")
    def list_vos(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        self.authz.check(ctx.caller, "image.list-vos", {"type": "catalogue"})
        resp = _el("ListVOsResponse")
        for vo, n in sorted(self.catalogue.vo_counts(self.authz.groups(ctx.caller)).items()):
            v = _sub(resp, "vo")
            _sub(v, "name", vo)
            _sub(v, "images", n)
        return resp

    @operation("GetImageLocation")
    def get_image_location(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        rec = self._visible(ctx, _text(req, "repo:image"))
        resp = _el("GetImageLocationResponse")
        _sub(resp, "url", f"{self._transfers().base_url}/images/{rec.sha256}")
        _sub(resp, "sha256", rec.sha256)
        _sub(resp, "size", rec.size)
        _sub(resp, "format", Descriptor(rec.element()).image_format)
        return resp

    @operation("GetUploadLocation")
    def get_upload_location(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        from services.vmrepository.transfer import upload_area

        self.authz.check(ctx.caller, "image.upload", {"type": "catalogue"})
        resp = _el("GetUploadLocationResponse")
        _sub(resp, "url", f"{self._transfers().base_url}/uploads/{upload_area(ctx.dn)}/")
        return resp

    @operation("HoldImage")
    def hold_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        rec = self._lookup(_text(req, "repo:image"))
        seconds = int(_text(req, "repo:seconds"))
        # the duration is in the authorization context; the hold lasts at most the policy's max_lifetime
        decision = self.authz.check(ctx.caller, "image.hold", _resource(rec), {"seconds": str(seconds)})
        if seconds > self.config.max_hold_seconds:
            raise InvalidArgument(f"a hold lasts at most {self.config.max_hold_seconds} s", argument="seconds")
        seconds = min(seconds, int(decision.obligations.get("max_lifetime", seconds)))
        hold_id, expires = self.catalogue.hold(rec.image_id, _text(req, "repo:holder"), ctx.dn, seconds)
        resp = _el("HoldImageResponse")
        _sub(resp, "holdId", hold_id)
        _sub(resp, "expires", format_datetime(expires, fraction=False))
        return resp

    @operation("ReleaseImage")
    def release_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        hold_id = _text(req, "repo:holdId").strip()
        hold = self.catalogue.get_hold(hold_id)
        if hold is None:
            raise InvalidArgument(f"no hold {hold_id}", argument="holdId")
        image_id, holder, owner, _ = hold
        rec = self.catalogue.get(image_id)
        resource = {**(_resource(rec) if rec else {"type": "image", "id": image_id}), "owner": owner}
        self.authz.check(ctx.caller, "image.release", resource)
        resp = _el("ReleaseImageResponse")
        _sub(resp, "released", "true" if self.catalogue.release(hold_id) else "false")
        return resp
