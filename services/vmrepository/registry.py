"""The VMRepository's registry core, below SOAP: the operations of the image catalogue on typed values
(descriptors, image references, :class:`Source`, :class:`Query`, ...). Every operation authorizes before
it reveals anything: the ones on one image reach it only through :meth:`Registry._authorized` (an
unauthorized caller learns nothing about whether the image exists), the catalogue-wide ones authorize on
their first line, RegisterImage before it looks at the source file, ReleaseImage before it says whether
the hold exists. Built from its parts: the content-addressed store, the SQLite catalogue, the enforcement
point and the upload area. The wire form is in :mod:`services.vmrepository.wire`; the SOAP face in
:mod:`services.vmrepository.service`. It knows no SOAP and no XML parser: a descriptor is handled through
:mod:`services.descriptor` only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Protocol

from services.authz.pep import Enforcer, PolicyDecisionPoint, Subject
from services.common.crash import crashpoint
from services.common.reserve import SpaceReserve
from services.descriptor import Descriptor, check_descriptor, set_field, set_fields, simple_fields, utc_now
from services.faults import (AccessDenied, BadQuery, ChecksumMismatch, DuplicateName, ImageInUse, InvalidArgument,
                             InvalidDescriptor, InvalidSource, StorageFull, UnknownImage, VMGridFault,
                             is_storage_full)
from services.vmrepository.catalogue import Catalogue, Record, new_image_id
from services.vmrepository.config import RepositoryConfig
from services.vmrepository.query import XPATH_DIALECT, compile_xpath, order_column, prepare_groups
from services.vmrepository.store import ImageStore, image_format_of
from services.vmrepository.values import Changes, Hold, Location, Query, QueryPage, Removed, Source
from services.vmrepository.xpath_scan import scanner

__all__ = ["Registry", "Changes", "Hold", "Location", "Query", "QueryPage", "Removed", "Source", "MAX_IMPORT"]

log = logging.getLogger("vmgrid.VMRepositoryService")

MAX_IMPORT = 1000   # descriptors in one ImportImages call (the WSDL's maxOccurs)

# an uploaded file's name, and a user's directory in the upload area (also the GridFTP face's rules)
UPLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}")


def upload_area(dn: str) -> str:
    """A user's directory in the upload area: a stable name derived from the DN."""
    return hashlib.sha256(dn.encode()).hexdigest()[:24]


def image_resource(rec: Record) -> dict[str, str]:
    return {"type": "image", "vo": rec.vo, "owner": rec.owner, "name": rec.name, "id": rec.image_id}


class Transfers(Protocol):
    """The repository's GridFTP face, as the core sees it: where its files are served, and the claim a session
    storing a path holds on it (:meth:`gridftp.server.GridFTPServer.claim`)."""

    @property
    def base_url(self) -> str: ...

    def claim(self, vpath: str) -> bool: ...

    def release(self, vpath: str) -> None: ...


PAGE_BYTES = 8 * 1024 * 1024   # descriptors in one QueryImages answer: half of what a client reads (16 MiB)
PAGE_ITEMS = 500_000           # and half of the markup items a client parses (security.safexml.DEFAULT_MAX_NODES)


def _within_page_bytes(records: list) -> list:
    """The first records of a page whose descriptors come to at most PAGE_BYTES and PAGE_ITEMS (the first always): a
    page of 1,000 descriptors of up to 260 KiB each is longer than any client reads, and twenty of 260 KiB of empty
    elements hold more markup than a client parses, so a VO member's long descriptors would break every query of the
    VO. A shorter page keeps its offset and total; the next page starts after it."""
    used = items = 0
    for n, rec in enumerate(records):
        used += len(rec.descriptor)
        items += rec.descriptor.count(b"<") + rec.descriptor.count(b"=")
        if (used > PAGE_BYTES or items > PAGE_ITEMS) and n:
            return records[:n]
    return records


def _in_import(exc: VMGridFault, label: str) -> VMGridFault:
    """The same typed fault, its description saying which descriptor of an import it is about."""
    exc.description = f"{label}: {exc.description}"
    exc.args = (exc.description,)
    return exc


class Registry:
    """One repository's catalogue of images, without SOAP. ``caller`` is a verified identity (``.dn``)."""

    def __init__(self, state_dir: Path, config: RepositoryConfig, pdp: PolicyDecisionPoint):
        self.config = config
        self.state_dir = Path(state_dir)
        log.info("opening the catalogue in %s", self.state_dir)    # these lines time a start (bench_repository_start)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.authz = Enforcer(pdp)
        self.store = ImageStore(self.state_dir / "images")
        self.catalogue = Catalogue(self.state_dir / "catalogue.sqlite", self.store)
        log.info("catalogue opened")
        self.upload_dir = Path(config.upload_dir) if config.upload_dir else self.state_dir / "uploads"
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self.reserve = SpaceReserve(self.state_dir / "reserve", config.reserve_bytes)
        self.reconcile_report = self.catalogue.reconcile()
        log.info("catalogue reconciled: %s", self.reconcile_report)
        self.index_report = self.catalogue.warm()
        log.info("query index of %d descriptors: %s", self.catalogue.count(), self.index_report)
        self.transfers: Transfers | None = None   # the GridFTP face, when this repository serves one
        self._upload_lock = threading.Lock()
        self._registering: set[Path] = set()      # uploads a RegisterImage is reading (kept from the sweep)

    def close(self) -> None:
        self.catalogue.close()

    # -- the upload areas ---------------------------------------------------------------------------------
    def sweep_uploads(self, now: float | None = None) -> list[str]:
        """Remove the uploads nobody registered: each file of an upload area (with what a cut upload left for a
        restart, ``NAME.vmgrid-part`` and its ranges) whose newest part was last written more than
        ``upload_max_age`` seconds ago, unless a GridFTP session is storing it or a RegisterImage is reading it
        right now. What a refused register (a checksum mismatch) or an abandoned upload left would otherwise
        count against its owner's quota for ever. Returns the virtual paths removed."""
        max_age = self.config.upload_max_age
        if max_age <= 0:
            return []
        cutoff = (time.time() if now is None else now) - max_age
        removed = []
        for area in sorted(self.upload_dir.iterdir()):
            if not area.is_dir() or area.is_symlink():
                continue
            uploads: dict[str, list[tuple[Path, float]]] = {}
            for entry in os.scandir(area):
                if entry.is_file(follow_symlinks=False):
                    base = entry.name.removesuffix(".vmgrid-part.ranges").removesuffix(".vmgrid-part")
                    uploads.setdefault(base, []).append((Path(entry.path), entry.stat(follow_symlinks=False).st_mtime))
            for base, files in sorted(uploads.items()):
                if max(m for _, m in files) > cutoff:
                    continue
                vpath = f"/uploads/{area.name}/{base}"
                with self._upload_lock:
                    if area / base in self._registering:
                        continue
                    if self.transfers is not None and not self.transfers.claim(vpath):
                        continue                    # a session is storing it
                    try:
                        for path, _ in files:
                            path.unlink(missing_ok=True)
                    finally:
                        if self.transfers is not None:
                            self.transfers.release(vpath)
                log.info("upload %s removed: unregistered for more than %d s", vpath, max_age)
                removed.append(vpath)
        return removed

    # -- authorization first ----------------------------------------------------------------------------
    def _lookup(self, ref: str) -> tuple[Record | None, dict[str, str]]:
        """The record ``ref`` names (or None) and the resource to authorize when there is none."""
        ref = (ref or "").strip()
        if ref.startswith("img-"):
            return self.catalogue.get(ref), {"type": "image", "id": ref}
        if "/" in ref:
            vo, _, name = ref.partition("/")
            return self.catalogue.find(vo, name), {"type": "image", "vo": vo, "name": name}
        raise InvalidArgument(f"image reference {ref!r} is neither an image id (img-...) nor VO/name",
                              argument="image")

    def _authorized(self, caller, ref: str, action: str, resource: dict[str, str] | None = None,
                    context: dict[str, str] | None = None) -> tuple[Record, object]:
        """The image ``ref`` for ``caller`` doing ``action``, and the decision: authorized first. The one way
        an operation reaches an image. A missing image is reported (UnknownImage) only to a caller who may
        read what the reference names: by VO/name, a reader of that VO's images (who could find the name in
        a query anyway); by id (a random token, nothing to guess), a caller who may search the catalogue.
        Anyone else gets AccessDenied, as for an image that exists."""
        rec, missing = self._lookup(ref)
        if rec is None:
            if "vo" in missing:
                self.authz.check(caller, "image.read", missing)
            else:
                self.authz.check(caller, "image.query", {"type": "catalogue"})
            raise UnknownImage(f"no image {ref.strip()}", image=ref.strip())
        decision = self.authz.check(caller, action, {**image_resource(rec), **(resource or {})}, context or {})
        return rec, decision

    def _source_path(self, caller, source: Source) -> Path:
        value = source.value.strip()
        if source.kind == "localPath":
            path = Path(os.path.realpath(value))
            allowed = [Path(os.path.realpath(d)) for d in self.config.ingest_dirs]
            if not any(path == d or d in path.parents for d in allowed):
                raise InvalidSource(f"{value} is not inside an ingest directory of this repository "
                                    f"({', '.join(map(str, allowed)) or 'none configured'})", source=value)
        elif source.kind == "upload":
            if not UPLOAD_NAME.fullmatch(value):
                raise InvalidSource(f"bad upload name {value!r}", source=value)
            path = self.upload_dir / upload_area(caller.dn) / value
        else:
            raise InvalidSource(f"unknown kind of source {source.kind!r}", source=value)
        if not path.is_file():
            raise InvalidSource(f"{value}: no such file", source=value)
        return path

    def _base_url(self) -> str:
        if self.transfers is None:
            raise InvalidArgument("this repository serves no GridFTP (its gridftp_port is -1)", argument="gridftp")
        return self.transfers.base_url

    # -- operations -------------------------------------------------------------------------------------
    def register(self, caller, workspace, source: Source):
        """Register a new image from ``source``; ``workspace`` is the caller's descriptor element (changed
        in place: the repository assigns its id, owner, creation time, sha256 and size). Returns it."""
        ws = workspace
        d = self._admit(caller, ws, source.context)
        owner = d.owner or caller.dn
        path = self._source_path(caller, source)
        fd = self._open_source(path, source)
        try:
            if source.kind != "upload":
                return self._register_from(caller, ws, d, owner, path, source, fd)
            with self._upload_lock:
                self._registering.add(path)            # the upload sweep leaves it alone meanwhile
            try:
                return self._register_from(caller, ws, d, owner, path, source, fd)
            finally:
                with self._upload_lock:
                    self._registering.discard(path)
        finally:
            os.close(fd)

    def _open_source(self, path: Path, source: Source) -> int:
        """The source file checked by :meth:`_source_path`, opened once for everything that reads it: without
        following a symbolic link, without waiting (a FIFO or a device put in its place after the check would block a
        request thread for ever), a regular file, and still where the check found it (the file a descriptor opened,
        read back from /proc: a directory of its path swapped for a link in between leads elsewhere)."""
        value = source.value.strip()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidSource(f"{value}: cannot open ({exc.strerror})", source=value) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidSource(f"{value}: not a regular file", source=value)
            opened = os.readlink(f"/proc/self/fd/{fd}")
            # a localPath was resolved (realpath) by the check; an upload's directory is the repository's own
            expected = str(path) if source.kind != "upload" else os.path.join(os.path.realpath(path.parent), path.name)
            if opened != expected:
                raise InvalidSource(f"{value}: changed while it was being checked (now {opened})", source=value)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _register_from(self, caller, ws, d: Descriptor, owner: str, path: Path, source: Source, fd: int):
        if self.catalogue.find(d.vo, d.name):
            raise DuplicateName(f"an image named {d.name!r} already exists in VO {d.vo!r}", vo=d.vo, name=d.name)
        opened = Path(f"/proc/self/fd/{fd}")        # the file checked and opened, whatever its name now leads to
        actual_format = image_format_of(opened)
        if actual_format != d.image_format:
            raise InvalidDescriptor(f"the descriptor says format {d.image_format} but the file is {actual_format}",
                                    schemaMessage="image format mismatch")
        try:
            ingested = self.store.ingest(opened, self.config.max_image_bytes)
        except ValueError as exc:
            raise InvalidSource(f"{path}: {exc}", source=str(path)) from None
        except OSError as exc:
            if is_storage_full(exc):
                raise StorageFull(f"the image store is full: {path} ({exc.strerror}) was not registered, and nothing "
                                  f"of it was kept", store=f"VMRepository image store {self.store.root}") from None
            raise InvalidSource(f"{path}: cannot read ({exc.strerror})", source=str(path)) from None
        try:
            if d.sha256 and d.sha256 != ingested.sha256:
                raise ChecksumMismatch(f"the descriptor's sha256 {d.sha256} does not match the image bytes "
                                       f"{ingested.sha256}", expected=d.sha256, actual=ingested.sha256)
            if d.size is not None and d.size != ingested.size:
                raise ChecksumMismatch(f"the descriptor's size {d.size} does not match the image ({ingested.size} bytes)",
                                       expected=str(d.size), actual=str(ingested.size))
            if d.blake3 and d.blake3 != ingested.blake3:
                raise ChecksumMismatch(f"the descriptor's blake3 {d.blake3} does not match the image bytes "
                                       f"{ingested.blake3}", expected=d.blake3, actual=ingested.blake3)
            set_field(ws, "identity", "imageId", new_image_id())
            set_field(ws, "identity", "owner", owner)
            set_field(ws, "identity", "created", utc_now())
            set_field(ws, "image", "sha256", ingested.sha256)
            set_field(ws, "image", "size", ingested.size)
            set_field(ws, "image", "blake3", ingested.blake3)
            check_descriptor(ws)
            self.catalogue.add(ws, ingested)
            crashpoint("register.committed")
        except BaseException:
            self.store.discard(ingested)
            raise
        if source.kind == "upload":
            path.unlink(missing_ok=True)
        log.info("registered %s %s/%s sha256=%s size=%d by %s", Descriptor(ws).image_id, d.vo, d.name,
                 ingested.sha256, ingested.size, caller.dn)
        return ws

    def _admit(self, caller, ws, source_context: str) -> Descriptor:
        """RegisterImage's checks of a new descriptor before any source is looked at: valid, authorized
        (image.register, and image.register-for-other for another owner), without an imageId."""
        check_descriptor(ws)
        d = Descriptor(ws)
        owner = d.owner or caller.dn
        self.authz.check(caller, "image.register", {"type": "image", "vo": d.vo, "owner": owner, "name": d.name},
                         {"source": source_context, "memory": str(d.memory), "vcpus": str(d.vcpus)})
        if owner != caller.dn:
            self.authz.check(caller, "image.register-for-other", {"type": "image", "vo": d.vo, "owner": owner})
        if d.image_id:
            raise InvalidDescriptor("a new image must not carry an imageId: the repository assigns it")
        return d

    def import_images(self, caller, workspaces: list, *, schema_checked: bool = False) -> list:
        """Register many descriptors at once, all or none: each names image bytes the repository already has
        by its ``image/sha256`` (its ``size``, when given, must be theirs). Each is validated and authorized
        as RegisterImage does (``image.register`` with context ``source=import``, ``image.register-for-other``
        for another owner), and the caller must be allowed to read an image already made of those bytes
        (as DuplicateImage requires): a hash alone never grants access to bytes. A fault names the
        descriptor by its position (1-based) in the request. Returns the registered descriptors.

        ``schema_checked``: each descriptor was validated against workspace.xsd as received (the SOAP face's
        container validates the whole request against the WSDL's schema, whose ImportImages holds each
        ``ws:workspace`` to it). Then only the fields the repository sets are new, the same kinds of value in
        every descriptor (a generated id, this call's time, the caller's DN or the descriptor's own owner), set in
        schema order: one descriptor with the caller's DN as owner, and the first, are validated again whole
        (which checks those values), not every one (a second workspace.xsd validation of each was 5-9% of the
        repository's CPU in an import)."""
        if not workspaces:
            raise InvalidArgument("nothing to import", argument="workspace")
        if len(workspaces) > MAX_IMPORT:
            raise InvalidArgument(f"at most {MAX_IMPORT} descriptors in one import", argument="workspace")
        created = utc_now()
        recheck_dn = recheck_first = True      # with schema_checked: what still needs a whole validation (above)
        # 1. each descriptor validated with the fields the repository sets, and its authorization questions
        checked: list[tuple[str, dict[str, str]]] = []       # (label, the descriptor's simple fields)
        requests, asked_by = [], []                          # the questions, and whose (index into checked)
        for n, ws in enumerate(workspaces, 1):
            label = f"descriptor {n}"
            try:
                f = simple_fields(ws)
                if f.get("identity.imageId"):
                    raise InvalidDescriptor("a new image must not carry an imageId: the repository assigns it")
                owner = f.get("identity.owner") or caller.dn
                image_id = new_image_id()
                try:
                    set_fields(ws, "identity", {"imageId": image_id, "owner": owner, "created": created})
                except (AttributeError, TypeError, ValueError):
                    check_descriptor(ws)        # says what is wrong with it
                    raise
                by_dn = not f.get("identity.owner")     # the caller's DN set here, not the descriptor's own
                if not schema_checked or recheck_first or (by_dn and recheck_dn):
                    check_descriptor(ws)        # with the fields the repository sets
                    recheck_first, recheck_dn = False, recheck_dn and not by_dn
            except VMGridFault as exc:
                raise _in_import(exc, label) from None
            f.update({"identity.imageId": image_id, "identity.owner": owner, "identity.created": created})
            vo, name = f["identity.vo"], f["identity.name"]
            checked.append((f"descriptor {n} ({vo}/{name})", f))
            requests.append(("image.register", {"type": "image", "vo": vo, "owner": owner, "name": name},
                             {"source": "import", "memory": str(int(f["hardware.memory"])),
                              "vcpus": str(int(f["hardware.vcpus"]))}))
            asked_by.append(n - 1)
            if owner != caller.dn:
                requests.append(("image.register-for-other", {"type": "image", "vo": vo, "owner": owner}, {}))
                asked_by.append(n - 1)
        # 2. authorized all at once (a policy point that answers batches is asked once), each answer its own
        for i, answer in zip(asked_by, self.authz.check_many(caller, requests)):
            if isinstance(answer, VMGridFault):
                raise _in_import(answer, checked[i][0]) from None
        # 3. the bytes each names: the caller must be allowed to read an image already made of them
        readable: dict[str, tuple[int, str | None]] = {}   # sha256 -> (size, blake3), bytes the caller may read
        names: set[tuple[str, str]] = set()
        for (label, f), ws in zip(checked, workspaces):
            try:
                vo, name, sha256 = f["identity.vo"], f["identity.name"], f.get("image.sha256")
                given_blake3 = f.get("image.blake3")
                given_size = int(f["image.size"]) if "image.size" in f else None
                if not sha256:
                    raise InvalidDescriptor("an imported descriptor names its image bytes by image/sha256",
                                            schemaMessage="image/sha256 missing")
                if sha256 not in readable:
                    readable[sha256] = self._readable_size(caller, sha256)
                size, digest3 = readable[sha256]
                if given_blake3 and digest3 and given_blake3 != digest3:
                    raise ChecksumMismatch(f"the descriptor's blake3 {given_blake3} is not that of its image bytes "
                                           f"({digest3})", expected=given_blake3, actual=digest3)
                if given_size is not None and given_size != size:
                    raise ChecksumMismatch(f"the descriptor's size {given_size} is not the size of its image bytes "
                                           f"({size} bytes)", expected=str(given_size), actual=str(size))
                if (vo, name) in names:
                    raise DuplicateName(f"the name {name!r} comes twice in VO {vo!r}", vo=vo, name=name)
                names.add((vo, name))
                image: dict[str, object] = {}
                if given_size is None:
                    image["size"] = size
                    f["image.size"] = str(size)
                if digest3:
                    image["blake3"] = digest3       # a given one that is not theirs was refused above
                elif given_blake3:
                    image["blake3"] = None          # bytes ingested before BLAKE3: nothing vouches for it
                if image:
                    set_fields(ws, "image", image)
            except VMGridFault as exc:
                raise _in_import(exc, label) from None
        try:
            self.catalogue.add_many(workspaces, check=True, fields=[f for _, f in checked])
        except VMGridFault as exc:
            raise _in_import(exc, f"descriptor {getattr(exc, 'position', '?')}") from None
        log.info("imported %d descriptors by %s", len(workspaces), caller.dn)
        return workspaces

    def _readable_size(self, caller, sha256: str) -> tuple[int, str | None]:
        """The size (and BLAKE3, when known) of bytes ``sha256`` if the caller may read an image made of them;
        the same UnknownImage whether no image has them or none of those is the caller's to read."""
        for record in self.catalogue.made_of(sha256):
            try:
                self.authz.check(caller, "image.read", image_resource(record))
            except AccessDenied:
                continue
            return record.size, self.catalogue.blake3_of(sha256)
        raise UnknownImage(f"no image you may read has the bytes {sha256}: register an image with them first",
                           image=sha256)

    def query(self, caller, q: Query) -> QueryPage:
        """The caller's VOs' images matching ``q``, one page of them, and how many match in all."""
        self.authz.check(caller, "image.query", {"type": "catalogue"})
        vos = self.authz.groups(caller)
        order = order_column(q.order_by or "name")
        limit = q.limit if q.limit is not None else self.config.default_limit
        if q.xpath is not None:
            if q.dialect != XPATH_DIALECT:
                raise BadQuery(f"unsupported query dialect {q.dialect!r}; supported: {XPATH_DIALECT}",
                               reason="unsupported dialect")
            xp = compile_xpath(q.xpath.strip(), q.namespaces)
            total, ids = scanner(self.catalogue.path).query(xp, vos, order, q.descending, q.offset, limit)
            return QueryPage(total, q.offset, _within_page_bytes(self.catalogue.records(ids)))
        total, page = self.catalogue.query(prepare_groups(q.groups), vos, order, q.descending, q.offset, limit)
        return QueryPage(total, q.offset, _within_page_bytes(page))

    def get(self, caller, ref: str) -> Record:
        return self._authorized(caller, ref, "image.read")[0]

    def duplicate(self, caller, ref: str, name: str, changes: Changes = Changes()):
        """A new descriptor named ``name``, owned by the caller, sharing ``ref``'s image bytes."""
        rec, _ = self._authorized(caller, ref, "image.read")
        name = name.strip()
        ws = rec.element()
        set_field(ws, "identity", "name", name)
        set_field(ws, "identity", "imageId", new_image_id())
        set_field(ws, "identity", "owner", caller.dn)
        set_field(ws, "identity", "created", utc_now())
        for section, fld, value in (("identity", "version", changes.version),
                                    ("identity", "description", changes.description),
                                    ("hardware", "vcpus", changes.vcpus), ("hardware", "memory", changes.memory),
                                    ("container", "command", changes.container_command)):
            if value is not None:
                set_field(ws, section, fld, value.strip())
        new = Descriptor(ws)
        self.authz.check(caller, "image.duplicate", {**image_resource(rec), "name": name},
                         {"memory": str(new.memory), "vcpus": str(new.vcpus)})
        check_descriptor(ws)
        self.catalogue.add(ws)
        return ws

    def update(self, caller, ref: str, workspace):
        """Replace ``ref``'s descriptor by ``workspace`` (its identity and image bytes stay). Returns it. Authorized with
        the new descriptor's memory and vCPUs in the context, as RegisterImage, ImportImages and DuplicateImage are: an
        update may not raise them past the policy's limits (registered at 512 MiB, then updated to 999,999)."""
        ws = workspace
        asked = simple_fields(ws)
        context = {key: asked[f"hardware.{key}"].strip() for key in ("memory", "vcpus") if f"hardware.{key}" in asked}
        rec, _ = self._authorized(caller, ref, "image.update", context=context)
        new = Descriptor(ws)
        old = Descriptor(rec.element())
        if new.image_id and new.image_id != rec.image_id:
            raise InvalidDescriptor(f"the descriptor's imageId {new.image_id} is not {rec.image_id}")
        if new.vo != rec.vo:
            raise InvalidDescriptor(f"an image cannot move from VO {rec.vo} to {new.vo}; duplicate it instead")
        for what, a, b in (("sha256", new.sha256, old.sha256), ("size", new.size, old.size),
                           ("format", new.image_format, old.image_format), ("blake3", new.blake3, old.blake3)):
            if a is not None and a != b:
                raise InvalidDescriptor(f"the image bytes cannot change: {what} {a} is not {b}",
                                        schemaMessage="image section changed")
        set_field(ws, "identity", "imageId", rec.image_id)
        set_field(ws, "identity", "owner", old.owner)
        set_field(ws, "identity", "created", old.created)
        set_field(ws, "image", "sha256", old.sha256)
        set_field(ws, "image", "size", old.size)
        set_field(ws, "image", "blake3", old.blake3)
        check_descriptor(ws)
        self.catalogue.replace(ws, utc_now())
        return ws

    def remove(self, caller, ref: str) -> Removed:
        rec, _ = self._authorized(caller, ref, "image.remove")
        try:
            deleted, holders = self.catalogue.remove(rec.image_id)
        except Exception as exc:
            if not is_storage_full(exc) or not self.reserve.release():
                raise
            # the disk is full: the reserve's space lets the catalogue record the removal that frees it
            log.warning("removing %s on a full disk: the space reserve was released", rec.image_id)
            deleted, holders = self.catalogue.remove(rec.image_id)
        self.reserve.restore()
        if holders:
            raise ImageInUse(f"{rec.vo}/{rec.name} is held by {len(holders)} deployment(s): {', '.join(holders)} "
                             f"(a node gives its hold back once its last instance of the image has ended, after its "
                             f"hold_linger, 10 s unless set: remove it then)",
                             imageId=rec.image_id, holder=holders)
        log.info("removed %s %s/%s (bytes deleted: %s) by %s", rec.image_id, rec.vo, rec.name, deleted, caller.dn)
        return Removed(rec.image_id, bool(deleted))

    def vos(self, caller) -> list[tuple[str, int]]:
        """The caller's VOs that have images, with their image counts."""
        self.authz.check(caller, "image.list-vos", {"type": "catalogue"})
        return sorted(self.catalogue.vo_counts(self.authz.groups(caller)).items())

    def location(self, caller, ref: str) -> Location:
        """Where an image's bytes are served (gsiftp://)."""
        rec, _ = self._authorized(caller, ref, "image.read")
        return Location(f"{self._base_url()}/images/{rec.sha256}", rec.sha256, rec.size,
                        Descriptor(rec.element()).image_format)

    def upload_location(self, caller, workspace=None) -> str:
        """The gsiftp:// URL of the caller's own directory in the upload area. With the descriptor the upload is
        for, it is checked first as RegisterImage will check it (its faults come now, not after the bytes)."""
        self.authz.check(caller, "image.upload", {"type": "catalogue"})
        if workspace is not None:
            d = self._admit(caller, workspace, "upload")
            if self.catalogue.find(d.vo, d.name):
                raise DuplicateName(f"an image named {d.name!r} already exists in VO {d.vo!r}", vo=d.vo, name=d.name)
        return f"{self._base_url()}/uploads/{upload_area(caller.dn)}/"

    def hold(self, caller, ref: str, holder: str, seconds: int) -> Hold:
        """Pin an image for ``seconds``: the duration is in the authorization context, and the hold lasts
        at most the policy's max_lifetime obligation and the repository's max_hold_seconds."""
        rec, decision = self._authorized(caller, ref, "image.hold", context={"seconds": str(seconds)})
        if seconds > self.config.max_hold_seconds:
            raise InvalidArgument(f"a hold lasts at most {self.config.max_hold_seconds} s", argument="seconds")
        seconds = min(seconds, int(decision.obligations.get("max_lifetime", seconds)))
        hold_id, expires = self.catalogue.hold(rec.image_id, holder, caller.dn, seconds)
        return Hold(hold_id, expires)

    def release(self, caller, hold_id: str) -> bool:
        """Release a hold. Authorized first: a hold that does not exist is authorized as the caller's own
        (hold ids are random tokens), so a caller who may release no holds learns nothing of any."""
        hold_id = (hold_id or "").strip()
        hold = self.catalogue.get_hold(hold_id)
        if hold is None:
            self.authz.check(caller, "image.release", {"type": "image", "owner": caller.dn})
            raise InvalidArgument(f"no hold {hold_id}", argument="holdId")
        image_id, _holder, owner, _ = hold
        rec = self.catalogue.get(image_id)
        resource = {**(image_resource(rec) if rec else {"type": "image", "id": image_id}), "owner": owner}
        self.authz.check(caller, "image.release", resource)
        return self.catalogue.release(hold_id)

    # -- the GridFTP face's question ------------------------------------------------------------------------
    def may_read_bytes(self, dn: str, sha256: str) -> bool:
        """May ``dn`` read these bytes: is it authorized to read some image made of them? Fails closed
        when the policy point is down."""
        subject = Subject(dn)
        for record in self.catalogue.made_of(sha256):
            try:
                self.authz.check(subject, "image.read", image_resource(record), {"via": "gridftp"})
                return True
            except AccessDenied:
                continue
            except Exception:  # noqa: BLE001 - the policy point is down: fail closed
                log.warning("cannot authorize %s to read %s: policy point unavailable", dn, sha256)
                return False
        return False
