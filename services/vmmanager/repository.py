"""What a node needs from the VMRepository, asked with the node's host credential: the
authoritative descriptor of an image, a hold while instances run from it, and its bytes (GridFTP)."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gridftp
from services.common.xsdtime import parse_datetime
from services.descriptor import Descriptor
from services.faults import (RETRYABLE, ChecksumMismatch, InvalidDescriptor, ServiceUnavailable, StorageFull,
                             TransferFault, VMGridFault)
from services.soapclient import ClientError, GridServiceClient
from services.vmrepository.client import RepositoryClient

log = logging.getLogger("vmgrid.vmmanager.repository")

# what Deploy's descriptor must share with the repository's (hardware may differ)
VERIFIED_FIELDS = ("image_id", "name", "vo", "owner", "sha256", "size", "image_format")
MAX_VERDICTS = 4096


class RepositoryAccess:
    """``refuse_server(dn) -> bool``: GridFTP servers never staged from whatever host they name (a guest
    container's certificate: services.vmmanager.guestcred.is_guest)."""

    def __init__(self, url: str, credential, trust, *, parallel: int = 4, gsi: bool = False,
                 verdict_seconds: float = 30.0, refuse_server=None):
        self.url = url
        self.refuse_server = refuse_server
        self.credential = credential
        self.trust = trust
        self.parallel = parallel
        self.gsi = gsi
        self._repo = None
        self._lock = threading.Lock()
        # the repository's verdict on a descriptor's identity, reused for verdict_seconds (bounded, oldest
        # dropped first): identity fields -> monotonic time of the verdict
        self.verdict_seconds = verdict_seconds
        self._verdicts: OrderedDict[tuple, float] = OrderedDict()

    def _client(self):
        """One client for all threads: the WSDL and its schemas are loaded once, not per thread
        (zeep's calls, the WS-Security signer and the response capture are thread-safe)."""
        with self._lock:
            if self._repo is None:
                if not self.url:
                    raise ServiceUnavailable("this node has no VMRepository configured ([vmmanager] repository)",
                                             service="VMRepository")
                try:
                    self._repo = RepositoryClient(GridServiceClient(self.url, self.credential, self.trust))
                except ClientError as exc:
                    raise ServiceUnavailable(f"the VMRepository cannot be reached: {exc}", service=self.url) from None
            return self._repo

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except VMGridFault:
            raise
        except ClientError as exc:
            raise ServiceUnavailable(f"the VMRepository failed: {exc}", service=self.url) from None

    def close(self) -> None:
        with self._lock:
            repo, self._repo = self._repo, None
        if repo is not None:
            repo.service.close()

    def verify(self, d: Descriptor) -> None:
        """The deployed descriptor's identity and image must be the repository's (hardware may differ).

        The repository's yes is reused for ``verdict_seconds`` for the same identity (the image's id, name,
        VO, owner and bytes), so a steady stream of deployments asks once per image and period instead of
        once per deployment. What a reused verdict cannot miss: the image's bytes, owner and VO never change
        under its id (an update keeps them), and a removed image never deploys, because staging then asks
        the repository for a hold on it, which it refuses (and that refusal drops the verdicts on the image,
        :meth:`hold`). What it may miss for up to ``verdict_seconds``: a rename."""
        identity = tuple(getattr(d, what) for what in VERIFIED_FIELDS)
        if self._verdict(identity):
            return
        theirs = Descriptor(self._call("show", d.image_id))
        for what in VERIFIED_FIELDS:
            mine, repo = getattr(d, what), getattr(theirs, what)
            if mine != repo:
                raise InvalidDescriptor(f"the descriptor's {what} {mine!r} is not the repository's {repo!r} "
                                        f"for image {d.image_id}", schemaMessage="descriptor differs from repository")
        if self.verdict_seconds > 0:
            with self._lock:
                self._verdicts[identity] = time.monotonic()
                self._verdicts.move_to_end(identity)
                while len(self._verdicts) > MAX_VERDICTS:
                    self._verdicts.popitem(last=False)

    def _verdict(self, identity: tuple) -> bool:
        with self._lock:
            when = self._verdicts.get(identity)
            if when is None:
                return False
            if time.monotonic() - when < self.verdict_seconds:
                return True
            del self._verdicts[identity]
            return False

    def forget(self, image_id: str) -> None:
        """Drop the verdicts on an image (the repository refused something about it)."""
        with self._lock:
            for identity in [i for i in self._verdicts if i[0] == image_id]:
                del self._verdicts[identity]

    def hold(self, image_id: str, holder: str, seconds: int) -> str:
        return self.hold_until(image_id, holder, seconds)[0]

    def hold_until(self, image_id: str, holder: str, seconds: int) -> tuple[str, float]:
        """A hold on the image for ``holder``: its id and when it expires (the repository may grant less
        than asked). A refusal (the image removed, the node no longer allowed) also drops this node's
        verdicts on the image: the next deployment asks the repository again."""
        try:
            hold_id, expires = self._call("hold", image_id, holder, seconds)
        except RETRYABLE:
            raise
        except VMGridFault:
            self.forget(image_id)
            raise
        return hold_id, parse_datetime(expires)

    def release(self, hold_id: str) -> None:
        """Release a hold. Raises what a later try may overcome (the repository unreachable, its disk full);
        a hold it no longer has (or refuses to release) is logged: retrying would not change it."""
        try:
            self._call("release", hold_id)
        except RETRYABLE:
            raise
        except VMGridFault as exc:
            log.warning("could not release hold %s: %s", hold_id, exc.description)

    def release_holder(self, image_id: str, holder: str) -> None:
        """Release ``holder``'s hold on an image without knowing its id: holds are one per image and holder,
        so asking again (for a second) names it."""
        try:
            hold_id = self._call("hold", image_id, holder, 1)[0]
        except RETRYABLE:
            raise
        except VMGridFault as exc:
            log.warning("could not find the hold of %s on %s: %s", holder, image_id, exc.description)
            return
        self.release(hold_id)

    def fetch(self, image_id: str, sha256: str, size: int, dest: Path, progress, blake3: str | None = None) -> None:
        """Stage the image over GridFTP, verified against the descriptor's BLAKE3 when it has one (several
        times faster than SHA-256 on CPUs without SHA extensions), else its sha256."""
        location = self._location(image_id)
        try:
            gridftp.download(location, dest, self.parallel, credential=self.credential, trust=self.trust,
                             sha256=sha256, blake3=blake3, progress=progress, gsi=self.gsi,
                             refuse_server=self.refuse_server)
        except gridftp.ChecksumMismatch as exc:
            raise ChecksumMismatch(f"staging {image_id}: {exc}", expected=blake3 or sha256,
                                   actual="(different)") from None
        except gridftp.GSIOnlyServer as exc:    # staging_gsi = false: what the node's operator sets, not a flag
            raise TransferFault(f"staging {image_id} from {location} failed: {exc}; this node stages with AUTH TLS: "
                                f"its operator sets staging_gsi = true in the node's [vmmanager] configuration to "
                                f"stage with AUTH GSSAPI (Globus GSI)", source=location) from None
        except gridftp.GridFTPError as exc:
            if getattr(exc, "local", False):     # this node's own write failed (its disk full), not the transfer
                raise StorageFull(f"the node's image cache is full: staging {image_id} stopped: {exc}",
                                  store=f"VMManager image cache {dest.parent.parent}") from None
            raise TransferFault(f"staging {image_id} from {location} failed: {exc}", source=location) from None

    def _location(self, image_id: str) -> str:
        return self._call("location", image_id)
