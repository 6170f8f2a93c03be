"""The client side of grid message security for zeep: sign every request with the user's proxy (or certificate),
verify every response and check it was signed by the host that was called (GSI host authorization).

Stable API:

    client = grid_client(wsdl_url, credential, trust)                  # a zeep.Client wired with all of the below
    wsse = GridWSSE(credential, trust, expected_host_dn=None)          # zeep `wsse=` object (apply + verify)
    transport = GridTransport(wsse, session=grid_session(cert_dir))    # TLS against the CA dir, tells wsse the URL
    host_authorizer(url) -> predicate on trust.Caller                  # CN=host/<hostname> of the URL
    answer_authorizer(url) -> predicate on trust.Caller                # that, or CN=<service>/<hostname>

zeep applies WS-Addressing and plugins before `wsse.apply`, so the signature covers every header; on the way back it
calls `wsse.verify` before plugins. Failures raise wssec.WSSecurityError subclasses (typed, with a WSS fault code).
"""
from __future__ import annotations

import functools
import ipaddress
import ssl
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests
import urllib3
import zeep
from lxml import etree

from . import safexml
from .pki import Credential, host_of, service_host_of
from .replay import MemoryReplayCache, ReplayCache
from .https import HTTPSError, HTTPSPool
from .middleware import addressing_headers
from .tls import client_ssl_context, grid_session
from .trust import Caller, TrustStore
from .wssec import (DEFAULT_POLICY, SOAP11, WSSE, FailedAuthentication, InvalidSecurity, SecurityPolicy,
                    sign_in_place, verify_envelope)

_LOOPBACK_NAMES = ("localhost",)


def _url_host_names(url: str) -> frozenset[str]:
    """The names a host certificate of ``url``'s host may give (a loopback address also localhost)."""
    hostname = (urlsplit(url).hostname or "").lower()
    names = {hostname}
    try:
        if ipaddress.ip_address(hostname).is_loopback:
            names |= set(_LOOPBACK_NAMES)
    except ValueError:
        if hostname in _LOOPBACK_NAMES:
            names |= {"127.0.0.1", "::1"}
    return frozenset(names)


@functools.lru_cache(maxsize=256)
def host_authorizer(url: str) -> Callable[[Caller], bool]:
    """GSI host authorization: the response must be signed by a host certificate whose CN is `host/<hostname>` of
    the URL (a loopback address also accepts `host/localhost`): the chain's end-entity DN, never a proxy's subject,
    and not through a proxy at all (a host signs with its own certificate; security.hostauth). One predicate per
    URL, kept (bounded): a client asks for it on every answer it verifies, and parsing the URL and the address each time was about 3% of a
    node's CPU per deploy+destroy."""
    hostname = (urlsplit(url).hostname or "").lower()
    return _signed_by_names(_url_host_names(url), (host_of,), f"signed by host/{hostname}")


@functools.lru_cache(maxsize=256)
def answer_authorizer(url: str) -> Callable[[Caller], bool]:
    """Who may sign the answer of a service called at ``url``: that host (:func:`host_authorizer`), or a service
    certificate of that host, `CN=<service>/<hostname>` (`vmgrid ca host NAME --service jobs`: a service that should
    not hold the host's rights, the job service, serves with one). Only for "is this answer from the host I
    called": where a host's rights are judged (a migration's source proof, a node's staging), host_authorizer."""
    names = _url_host_names(url)
    return _signed_by_names(names, (host_of, service_host_of), f"signed by host/{min(names)} or a service of it")


def _signed_by_names(names, readers, what: str) -> Callable[[Caller], bool]:
    """A predicate: the caller's DN, read by one of ``readers`` (host_of, service_host_of), names one of ``names``.
    A verified Caller signing through a proxy is never taken (a host or a service signs with its own certificate);
    callers that hold only a DN (a GridFTP session's identity, a notification's recorded signer) pass an object with
    ``dn`` alone."""

    def authorized(caller: Caller) -> bool:
        if getattr(caller, "is_proxy", False):
            return False
        for read in readers:
            name = read(caller.dn)
            if name is not None and name.lower() in names:
                return True
        return False

    authorized.__doc__ = what
    return authorized


class GridWSSE:
    """A zeep `wsse=` object: `apply` signs the outgoing envelope (BinarySecurityToken, Timestamp, exclusive c14n,
    RSA-SHA256 over Body, Timestamp and every header); `verify` checks the response signature, its freshness, the
    signer's chain against `trust`, and that the signer is `expected_host_dn` (or the host of the URL called, which
    GridTransport reports). The last verified signer is in `last_signer` (per thread)."""

    def __init__(self, credential: Credential, trust: TrustStore, *, expected_host_dn: str | None = None,
                 policy: SecurityPolicy = DEFAULT_POLICY, ttl: float = 300.0, replay: ReplayCache | None = None,
                 require_relates_to: bool = False):
        self.credential = credential
        self.require_relates_to = require_relates_to
        self.trust = trust
        self.expected_host_dn = expected_host_dn
        self.policy = policy
        self.ttl = ttl
        self.replay = replay if replay is not None else MemoryReplayCache()
        self._local = threading.local()

    def expect_address(self, url: str) -> None:
        """Record the URL the next response comes from (GridTransport calls this before each POST)."""
        self._local.address = url

    @property
    def last_signer(self) -> Caller | None:
        return getattr(self._local, "signer", None)

    def apply(self, envelope: etree._Element, headers: dict) -> tuple[etree._Element, dict]:
        sign_in_place(envelope, self.credential, ttl=self.ttl)
        self._local.message_id = _addressing(envelope, "MessageID")
        return envelope, headers

    def _expected(self) -> str | Callable[[Caller], bool]:
        if self.expected_host_dn is not None:
            return self.expected_host_dn
        address = getattr(self._local, "address", None)
        if address is None:
            raise FailedAuthentication("cannot authorize the responding host: no expected host DN and no URL "
                                       "(use GridTransport or pass expected_host_dn)")
        return answer_authorizer(address)

    def verify(self, envelope: etree._Element) -> etree._Element:
        root = envelope.getroot() if isinstance(envelope, etree._ElementTree) else envelope
        caller, _ = verify_envelope(root, self.trust, replay=self.replay, policy=self.policy,
                                    expected_signer=self._expected())
        _check_relates_to(root, getattr(self._local, "message_id", None), self.require_relates_to)
        self._local.signer = caller
        return envelope


def _addressing(envelope: etree._Element, name: str) -> str | None:
    """The text of the envelope's WS-Addressing header `name` (1.0 or 2004/08), or None."""
    return next((text for _, text in addressing_headers(envelope, name)), None)


def _refused_unread(fault: etree._Element) -> bool:
    """A fault of the security layer's refusing a request before it was verified, so before its WS-Addressing
    headers could be read (its MessageID is unknown there): faultcode wsse:*, or soap:Server without detail (an
    error while verifying). Every other fault of vmgrid's container names the request in a wsa:RelatesTo."""
    code = (fault.findtext("faultcode") or "").strip()
    prefix, _, local = code.rpartition(":")
    namespace = fault.nsmap.get(prefix or None)
    if namespace == WSSE:
        return True
    return namespace == SOAP11 and local == "Server" and fault.find("detail") is None


def _check_relates_to(response: etree._Element, message_id: str | None, required: bool) -> None:
    """A verified answer that names the request it answers (its signed wsa:RelatesTo) must name the MessageID this
    client sent: a signed answer to another request of the same host (another call's, another user's) is refused,
    which TLS alone would not catch when it is off or ends before the service. `required` (vmgrid's services): every
    answer must carry it, faults too, except the security layer's refusals of a request it could not verify
    (:func:`_refused_unread`: nothing of the request was read, its MessageID included)."""
    if message_id is None:
        return
    relates = _addressing(response, "RelatesTo")
    if relates == message_id:
        return
    body = response.find(f"{{{SOAP11}}}Body")
    fault = body.find(f"{{{SOAP11}}}Fault") if body is not None else None
    if relates is None and (not required or (fault is not None and _refused_unread(fault))):
        return
    raise InvalidSecurity(f"the answer relates to {relates or 'no request'}, not to this request ({message_id}): "
                          f"a signed answer to another request is refused")


class GridTransport(zeep.Transport):
    """zeep Transport whose TLS checks servers against the trusted CA directory, which screens every response with
    the hardened parser before anything else reads it, and which tells the GridWSSE the URL being called.

    SOAP messages (``post``, ``post_xml``) go over kept-alive connections of its own (security.https: http.client,
    no requests preparation per call; TLS against the CA directory, the credential as TLS client certificate,
    answers read up to ``limits.max_bytes``); the WSDL and its imports are loaded through the requests session.
    A transport given a ``session`` of the caller's sends through that session instead. Failures to get an answer
    are requests.exceptions.ConnectionError either way."""

    def __init__(self, wsse: GridWSSE | None = None, *, session=None, cert_dir: Path | str | None = None,
                 timeout: float = 60, operation_timeout: float | None = 120, limits: safexml.Limits | None = None):
        own = session is None
        cert_dir = Path(cert_dir if cert_dir is not None else wsse.trust.cert_dir) if own else None
        if session is None:
            # the signing credential is also the TLS client certificate, for containers that ask for one
            # ([container] tls_client_certs, GT4's transport security)
            session = grid_session(cert_dir, wsse.credential if wsse is not None else None)
        super().__init__(timeout=timeout, operation_timeout=operation_timeout, session=session)
        self.wsse = wsse
        self.limits = limits or (wsse.policy.limits if wsse is not None else safexml.Limits())
        self._lean = own
        self._cert_dir = cert_dir
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[str, HTTPSPool] = {}
        self._pools_lock = threading.Lock()
        self.connect_to: tuple[tuple[int, tuple], ...] | None = None      # HTTPSPool's: a subclass pins its addresses

    def _pool(self, address: str) -> HTTPSPool:
        pool = self._pools.get(address)
        if pool is None:
            with self._pools_lock:
                pool = self._pools.get(address)
                if pool is None:
                    if self._ssl is None and address.startswith("https:"):
                        self._ssl = client_ssl_context(self._cert_dir,
                                                       self.wsse.credential if self.wsse is not None else None)
                    pool = HTTPSPool(address, self._ssl or ssl.create_default_context(),
                                     timeout=self.operation_timeout or self.load_timeout or 120,
                                     max_answer=self.limits.max_bytes, connect_to=self.connect_to)
                    if len(self._pools) >= 64:       # a client of many URLs: the oldest origin's connections go
                        self._pools.pop(next(iter(self._pools))).close()
                    self._pools[address] = pool
        return pool

    def post(self, address, message, headers):
        if self._lean:
            try:
                return self._pool(address).post(message, headers, timeout=self.operation_timeout)
            except HTTPSError as exc:
                raise requests.exceptions.ConnectionError(str(exc)) from None
            except ValueError as exc:        # not an http(s) URL
                raise requests.exceptions.InvalidURL(str(exc)) from None
        try:
            return super().post(address, message, headers)
        except requests.exceptions.ConnectionError as exc:
            if not _dropped_connection(exc):
                raise
        # The server closed a kept-alive connection as the request went out (its idle limit met the request):
        # nothing was answered. The same bytes once more on a new connection; never re-signed, so if the server
        # did act on the first copy its replay cache refuses the second (a typed fault), never a second action.
        return super().post(address, message, headers)

    def post_xml(self, address, envelope, headers):
        """POST the envelope; the answer's screened document (parsed once, by the hardened parser) is its
        ``envelope`` attribute (None for an empty answer), for the caller to read instead of parsing again."""
        if self.wsse is not None:
            self.wsse.expect_address(address)
        response = self.post(address, etree.tostring(envelope, xml_declaration=True, encoding="utf-8"), headers)
        response.envelope = None
        if response.content:
            try:
                response.envelope = safexml.parse(response.content, self.limits)
            except safexml.UnsafeXML as exc:
                raise InvalidSecurity(f"response from {address} refused by the XML parser: {exc}") from None
        return response

    def close(self) -> None:
        """Close every kept-alive connection (its own and the session's)."""
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        self.session.close()


def _dropped_connection(exc: requests.exceptions.ConnectionError) -> bool:
    """Whether a connection that was open broke before any answer (urllib3's ProtocolError: "Connection aborted",
    RemoteDisconnected, reset), as opposed to one that could not be opened (refused, no route, TLS failure)."""
    reason = exc.args[0] if exc.args else None
    return isinstance(reason, urllib3.exceptions.ProtocolError)


def grid_client(wsdl: str, credential: Credential, trust: TrustStore, *, expected_host_dn: str | None = None,
                cert_dir: Path | str | None = None, plugins: list | None = None,
                settings: zeep.Settings | None = None, session=None) -> zeep.Client:
    """A zeep.Client for a grid service: TLS checked against the CA directory, requests signed with `credential`,
    responses verified and host-authorized. The WSDL itself is fetched over the same checked TLS session."""
    wsse = GridWSSE(credential, trust, expected_host_dn=expected_host_dn)
    transport = GridTransport(wsse, session=session, cert_dir=cert_dir)
    settings = settings or zeep.Settings(strict=True, xml_huge_tree=False, forbid_dtd=True, forbid_entities=True,
                                         forbid_external=True)
    return zeep.Client(wsdl, wsse=wsse, transport=transport, plugins=plugins or [], settings=settings)
