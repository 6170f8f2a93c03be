"""WSGI middleware that verifies WS-Security on every SOAP request before the service sees it and signs every SOAP
response with the host credential.

Stable API:

    app = WSSecurityMiddleware(service_app, host_credential, TrustStore(cert_dir), state_dir=state_dir)

On a verified POST the service finds in its environ:
    environ["vmgrid.caller"]    a trust.Caller (dn, subject, chain, limited, is_proxy, not_after)
    environ["vmgrid.envelope"]  the verified lxml Envelope root: dispatch from THIS tree (its Body and header blocks
                                are exactly the signed ones); wsgi.input replays the same bytes.
The service may put its response Envelope root in environ["vmgrid.response_envelope"] to spare a re-parse; when
environ["vmgrid.signs_response"] is true, the middleware signs and serializes that envelope itself and ignores the
body the service returns (which may then be empty).
GET (WSDL) passes through unsigned. A refused request gets a SOAP 1.1 Fault (HTTP 500, text/xml) whose faultcode is
wsse:InvalidSecurity, wsse:FailedCheck, wsse:MessageExpired, wsse:SecurityTokenUnavailable or
wsse:FailedAuthentication (or soap:MustUnderstand), signed like every response.
"""
from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lxml import etree

from services.common.errors import printable

from . import safexml
from .pki import Credential
from .replay import MemoryReplayCache, ReplayCache, SQLiteReplayCache
from .trust import TrustStore
from .wssec import (DEFAULT_POLICY, Q_BODY, Q_ENVELOPE, SOAP11, WSSE, InvalidSecurity, SecurityPolicy,
                    WSSecurityError, must_understand_violations, sign_envelope, verify_envelope)

log = logging.getLogger(__name__)

WSA = "http://www.w3.org/2005/08/addressing"
WSA_2004 = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
# Header blocks vmgrid's container understands, in addition to wsse:Security (SOAP 1.1 mustUnderstand).
DEFAULT_UNDERSTOOD = frozenset(f"{{{ns}}}{name}" for ns in (WSA, WSA_2004) for name in
                               ("To", "Action", "MessageID", "ReplyTo", "FaultTo", "From", "RelatesTo"))

CHUNK = 64 * 1024
MAX_FAULT_TEXT = 1000            # characters of a WS-Security fault's reason; the rest is counted, not echoed
RESPONSE_ENVELOPE = "vmgrid.response_envelope"
SIGNS_RESPONSE = "vmgrid.signs_response"
DRAIN_LIMIT = 64 * 1024 * 1024
# The parse trees of the requests a process verifies and answers at once. libxml2 spends 70-130 bytes per markup item
# ('<' or '=', safexml's count): a request of safexml's million items holds a tree of about 130 MiB, before its
# signature is looked at. Without a bound, 16 clients sending such messages, unsigned, took a repository process to
# 2.1-2.2 GiB. A body up to COUNTED_BODY_BYTES is not counted (at most
# 64k items, about 8 MiB: bounded by the request threads); a longer one takes its items from MARKUP_HELD for as long
# as its request runs, and one that finds no room is refused at once (a Server fault), its thread let go.
MARKUP_HELD = 4_000_000
COUNTED_BODY_BYTES = 64 * 1024

StartResponse = Callable[..., Callable[[bytes], object]]


def fault_envelope(faultcode: etree.QName | str, faultstring: str, *, detail: etree._Element | None = None,
                   relates_to: tuple[str, str] | None = None) -> etree._Element:
    """A SOAP 1.1 Fault envelope. `faultcode` is a QName in the wsse or soap namespace. `relates_to`: (WS-Addressing
    namespace, MessageID) of a verified request: the fault names it in a wsa:RelatesTo (signed with the rest)."""
    qname = etree.QName(faultcode)
    nsmap = {"soap": SOAP11}
    prefix = "soap"
    if qname.namespace == WSSE:
        nsmap["wsse"], prefix = WSSE, "wsse"
    elif qname.namespace != SOAP11:
        nsmap["f"], prefix = qname.namespace, "f"
    env = etree.Element(Q_ENVELOPE, nsmap=nsmap)
    if relates_to is not None:
        ns, message_id = relates_to
        header = etree.SubElement(env, f"{{{SOAP11}}}Header")
        etree.SubElement(header, f"{{{ns}}}RelatesTo", nsmap={"wsa": ns}).text = message_id
    body = etree.SubElement(env, Q_BODY)
    fault = etree.SubElement(body, f"{{{SOAP11}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"{prefix}:{qname.localname}"
    etree.SubElement(fault, "faultstring").text = faultstring
    if detail is not None:
        etree.SubElement(fault, "detail").append(detail)
    return env


def addressing_headers(envelope: etree._Element, name: str) -> Iterator[tuple[str, str]]:
    """(namespace, stripped text) of each WS-Addressing header ``name`` of the envelope, 1.0 before 2004/08."""
    header = envelope.find(f"{{{SOAP11}}}Header")
    for ns in (WSA, WSA_2004) if header is not None else ():
        el = header.find(f"{{{ns}}}{name}")
        if el is not None:
            yield ns, (el.text or "").strip()


def _message_id(root: etree._Element) -> tuple[str, str] | None:
    """The WS-Addressing namespace and MessageID of a verified request, or None."""
    return next(((ns, text) for ns, text in addressing_headers(root, "MessageID") if text), None)


def _libc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):    # not glibc
        return None


_MALLOC_TRIM = _libc_trim()


def _trim() -> None:
    """Give the freed memory of a large request's trees back to the system. glibc keeps what a thread freed in that
    thread's arena: without this, 16 request threads each kept the high-water mark of the largest tree they had
    built, and the process held them all even with the budget bounding the trees alive at once."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class MarkupBudget:
    """The markup items (safexml's count) of the large requests under way in this process, at most ``limit``."""

    def __init__(self, limit: int = MARKUP_HELD):
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, items: int) -> bool:
        with self._lock:
            if self.held + items > self.limit:
                return False
            self.held += items
            return True

    def give(self, items: int) -> None:
        with self._lock:
            self.held -= items


class WSSecurityMiddleware:
    """Verify signed SOAP requests, sign SOAP responses (see the module docstring).

    state_dir: where the replay cache lives (SQLite WAL, shared by all worker processes of a container); without it,
    an in-process cache (one worker only). understood_headers: QNames ('{ns}local') of header blocks the service
    processes; a mustUnderstand="1" block outside them (and wsse:Security) is refused with soap:MustUnderstand.
    """

    def __init__(self, app: Callable, host_credential: Credential, trust: TrustStore, *,
                 state_dir: Path | str | None = None, replay: ReplayCache | None = None,
                 policy: SecurityPolicy = DEFAULT_POLICY,
                 understood_headers: Iterable[str] = DEFAULT_UNDERSTOOD,
                 sign_responses: bool = True, drain_limit: int = DRAIN_LIMIT, markup_held: int = MARKUP_HELD):
        self.app = app
        self.markup = MarkupBudget(max(markup_held, policy.limits.max_nodes))   # room for one message at least
        self.credential = host_credential
        self.trust = trust
        self.policy = policy
        if replay is None:
            replay = (SQLiteReplayCache(state_dir, window=(policy.max_age + policy.clock_skew).total_seconds(),
                                        skew=policy.clock_skew.total_seconds())
                      if state_dir is not None else MemoryReplayCache())
        self.replay = replay
        self.understood = frozenset(understood_headers)
        self.sign_responses = sign_responses
        self.drain_limit = drain_limit

    def close(self) -> None:
        """Release the replay cache's connections (the container calls this when it stops)."""
        close = getattr(self.replay, "close", None)
        if close is not None:
            close()

    # -- request ----------------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() != "POST":
            return self.app(environ, start_response)
        try:
            body = self._read_body(environ)
        except Exception as exc:  # noqa: BLE001 - never an HTTP 500 without a SOAP fault
            return self._refused(environ, start_response, exc, "read")
        items = 0
        if len(body) > COUNTED_BODY_BYTES:
            counted = safexml.markup_items(body)
            if counted <= self.policy.limits.max_nodes:    # more: safexml refuses it before building a node
                if not self.markup.take(counted):
                    log.warning("refused a request of %d markup items from %s: %d of %d are held by the requests "
                                "under way", counted, environ.get("REMOTE_ADDR", "?"), self.markup.held,
                                self.markup.limit)
                    return self._fault(start_response, etree.QName(SOAP11, "Server"),
                                       f"the service is busy with other large requests (this one holds {counted} "
                                       f"markup items): send it again in a few seconds")
                items = counted
        try:
            return self._verified(environ, start_response, body)
        finally:
            if items:
                environ.pop("vmgrid.envelope", None)        # the trees go with this frame, not with the environ
                environ.pop(RESPONSE_ENVELOPE, None)
                self.markup.give(items)
                _trim()

    def _verified(self, environ: dict, start_response: StartResponse, body: bytes) -> Iterable[bytes]:
        try:
            caller, root = verify_envelope(body, self.trust, replay=self.replay, policy=self.policy)
        except Exception as exc:  # noqa: BLE001 - never an HTTP 500 without a SOAP fault
            return self._refused(environ, start_response, exc, "verified")
        not_understood = must_understand_violations(root, self.understood)
        if not_understood:
            names = ", ".join(str(etree.QName(q).localname) for q in not_understood)
            return self._fault(start_response, etree.QName(SOAP11, "MustUnderstand"),
                               f"header blocks marked mustUnderstand are not understood: {names}",
                               relates_to=_message_id(root))
        environ["vmgrid.caller"] = caller
        environ["vmgrid.envelope"] = root
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ[SIGNS_RESPONSE] = self.sign_responses
        return self._call_and_sign(environ, start_response)

    def _refused(self, environ: dict, start_response: StartResponse, exc: Exception, step: str) -> list[bytes]:
        """The fault for a request refused as it was read or verified: its WS-Security fault, or a Server fault for
        an internal error (logged with its traceback)."""
        if isinstance(exc, WSSecurityError):
            log.info("refused a request from %s: %s", environ.get("REMOTE_ADDR", "?"),
                     printable(exc, MAX_FAULT_TEXT))
            return self._fault(start_response, exc.qname, exc.reason)
        log.error("could not get a request from %s %s", environ.get("REMOTE_ADDR", "?"), step, exc_info=exc)
        return self._fault(start_response, etree.QName(SOAP11, "Server"),
                           f"the message could not be {step} (an internal error; see the service log)")

    def _read_body(self, environ: dict) -> bytes:
        stream = environ["wsgi.input"]
        limit = self.policy.limits.max_bytes
        raw_length = environ.get("CONTENT_LENGTH") or ""
        if raw_length.strip():
            try:
                length = int(raw_length)
            except ValueError:
                raise InvalidSecurity(f"bad Content-Length {raw_length!r}") from None
            if length < 0:
                raise InvalidSecurity("bad Content-Length")
            if length > limit:
                self._drain(stream, length)
                raise InvalidSecurity(f"message of {length} bytes exceeds the limit of {limit} bytes")
            chunks, left = [], length
            while left > 0:
                chunk = stream.read(min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        # No Content-Length (chunked transfer): read up to the limit.
        chunks, size = [], 0
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                self._drain(stream, None)
                raise InvalidSecurity(f"message exceeds the limit of {limit} bytes")
            chunks.append(chunk)

    def _drain(self, stream, length: int | None) -> None:
        """Read and discard an oversized body in small chunks, so the client can read the fault."""
        left = min(length, self.drain_limit) if length is not None else self.drain_limit
        while left > 0:
            chunk = stream.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)

    # -- response ---------------------------------------------------------------------------------
    def _fault(self, start_response: StartResponse, code: etree.QName, reason: str,
               relates_to: tuple[str, str] | None = None) -> list[bytes]:
        """A signed fault; its reason cut at MAX_FAULT_TEXT characters (with the count of the rest): a reason may
        quote the request (a 2 MB QName came back whole in a 2 MB faultstring: attack F16)."""
        env = fault_envelope(code, printable(reason, MAX_FAULT_TEXT), relates_to=relates_to)
        data = self._sign(env)
        start_response("500 Internal Server Error", [("Content-Type", "text/xml; charset=utf-8"),
                                                     ("Content-Length", str(len(data)))])
        return [data]

    def _sign(self, env: etree._Element) -> bytes:
        if self.sign_responses:
            return sign_envelope(env, self.credential)      # written once, the Security text spliced in as written
        return etree.tostring(env, encoding="utf-8", xml_declaration=True)

    def _call_and_sign(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        captured: dict = {}
        buffer: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info=None):
            if exc_info is not None and captured.get("sent"):
                raise exc_info[1].with_traceback(exc_info[2])
            captured["status"], captured["headers"] = status, headers
            return buffer.append

        result = self.app(environ, capture)
        try:
            for chunk in result:
                if chunk:
                    buffer.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = captured["status"], captured["headers"]
        data = b"".join(buffer)
        content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
        env = environ.get(RESPONSE_ENVELOPE) if self.sign_responses else None
        if self.sign_responses and "xml" in content_type.lower():
            if env is None and data.strip():
                try:
                    env = safexml.parse(data, safexml.Limits(max_bytes=max(len(data), 1)))
                except safexml.UnsafeXML:
                    env = None
            if env is not None and env.tag == Q_ENVELOPE:
                data = self._sign(env)
                headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "content-type")]
                headers += [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(data)))]
                env = None
            else:
                log.warning("response to %s is not a SOAP envelope: sent unsigned", environ.get("PATH_INFO"))
        if env is not None or not self.sign_responses or "xml" not in content_type.lower():
            if env is not None and not data:
                data = etree.tostring(env, encoding="utf-8", xml_declaration=True)   # left to us, not signed
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(data))))
        captured["sent"] = True
        start_response(status, headers)
        return [data]
