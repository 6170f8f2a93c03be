"""Calling a vmgrid grid service: zeep built from the served WSDL, every request signed with the
user's proxy and every response verified (security.client), faults turned back into the typed
errors of services.faults, and the verified response payload handed back as XML."""
from __future__ import annotations

import threading
import uuid
from pathlib import Path

import requests
import zeep
from lxml import etree
from zeep.exceptions import Error as ZeepError
from zeep.plugins import Plugin, apply_egress, apply_ingress

from urllib.parse import urlsplit

from security import safexml
from security.client import GridTransport, GridWSSE
from security.https import HTTPSError, HTTPSPool
from security.wssec import WSU, InvalidSecurity
from services.container.addressing import WSA, request_headers
from services.container.contract import SERVICES_PATH
from security.pki import Credential
from security.trust import TrustStore
from services.common.errors import printable
from services.faults import VMGridFault, from_detail

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


class ClientError(Exception):
    """A call that did not reach a typed answer from the service."""


class Unreachable(ClientError):
    """The service could not be reached (connection refused, TLS failure, timeout)."""


class SoapFaultError(ClientError):
    """A SOAP fault without a vmgrid detail (e.g. a WS-Security refusal: ``code`` is wsse:...)."""

    def __init__(self, message: str, code: str | None):
        super().__init__(f"{message} [{code}]" if code else message)
        self.code = code


class _Capture(Plugin):
    """Keeps the verified response envelope (zeep verifies WS-Security before ingress plugins), and
    fills in element text zeep cannot render (the mixed content of a WS-RP QueryExpression) before
    the request is signed (zeep applies plugins before WS-Security)."""

    def __init__(self, url: str = ""):
        self.local = threading.local()
        self.url = url

    def egress(self, envelope, http_headers, operation, binding_options):
        # WS-Addressing To / Action / MessageID, signed with the rest: the service refuses a request
        # addressed elsewhere or to another operation (services.container.addressing)
        header = envelope.find(f"{{{SOAP_ENV}}}Header")
        if header is None:
            header = etree.Element(f"{{{SOAP_ENV}}}Header")
            envelope.insert(0, header)
        if header.find(f"{{{WSA}}}To") is None:
            action = getattr(operation, "soapaction", "") or ""
            for h in request_headers(self.url, action, f"urn:uuid:{uuid.uuid4()}"):
                header.append(h)
        fill = getattr(self.local, "text_fill", None)
        if fill:
            for tag, text in fill.items():
                for el in envelope.iter(tag):
                    el.text = text
            self.local.text_fill = None
        payload = getattr(self.local, "payload", None)
        if payload is not None:
            body = envelope.find(f"{{{SOAP_ENV}}}Body")
            for child in list(body):
                body.remove(child)
            body.append(payload)
            self.local.payload = None
        return envelope, http_headers

    def ingress(self, envelope, http_headers, operation):
        self.local.envelope = envelope
        return envelope, http_headers

    def _root(self) -> etree._Element:
        env = self.local.envelope
        return env.getroot() if isinstance(env, etree._ElementTree) else env

    def payload(self) -> etree._Element:
        body = self._root().find(f"{{{SOAP_ENV}}}Body")
        return next(c for c in body if isinstance(c.tag, str))

    def header(self, tag: str) -> etree._Element | None:
        header = self._root().find(f"{{{SOAP_ENV}}}Header")
        return None if header is None else header.find(tag)


class SameOriginTransport(GridTransport):
    """Loads the WSDL and the schemas it imports only from the service's own origin (scheme, host,
    port), over the connections signed calls use (TLS checked against the trusted CAs): each answer read
    only up to the hardened parser's byte limit and within the timeout as a whole (a server that drips or never
    ends its answer is cut off), and a redirect refused, never followed (it would leave the origin).

    ``connect_to``: the addresses the caller checked the origin's host name against (security.https.HTTPSPool's
    ``connect_to``): every connection, the WSDL's and the calls', goes to one of them and the name is not resolved
    again; TLS still checks the certificate for the name."""

    def __init__(self, url: str, wsse: GridWSSE, *, timeout: float | None = None,
                 connect_to: tuple[tuple[int, tuple], ...] | None = None):
        if timeout is None:
            super().__init__(wsse)
        else:
            super().__init__(wsse, timeout=timeout, operation_timeout=timeout)
        parts = urlsplit(url)
        self.origin = (parts.scheme, parts.hostname, parts.port)
        self.connect_to = connect_to

    def _pool(self, address: str) -> HTTPSPool:
        parts = urlsplit(address)
        if self.connect_to is not None and (parts.scheme, parts.hostname, parts.port) != self.origin:
            raise HTTPSError(f"refusing to call {address}: not the service's origin")   # the addresses are its only
        return super()._pool(address)

    def load(self, url):
        parts = urlsplit(str(url))
        if (parts.scheme, parts.hostname, parts.port) != self.origin:
            raise ClientError(f"refusing to load {url}: not from the service's origin")
        return super().load(url)

    def _load_remote_data(self, url):
        parts = urlsplit(str(url))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            answer = self._pool(f"{parts.scheme}://{parts.netloc}/").get(path, timeout=self.load_timeout)
        except HTTPSError as exc:
            what = f"the WSDL of {str(url).split('?')[0]}" if parts.query.lower() == "wsdl" else url
            raise Unreachable(f"cannot fetch {what}: {_reason(exc, str(url))}") from None
        if 300 <= answer.status_code < 400:
            raise ClientError(f"refusing to load {url}: the server redirects it elsewhere "
                              f"({printable(answer.headers.get('Location') or '', 200)}); "
                              f"give the service's own URL")
        if answer.status_code != 200:
            raise ClientError(f"cannot fetch {url}: HTTP {answer.status_code}")
        return answer.content


def service_url(text: str, service: str) -> str:
    """The URL of the grid service ``service`` (VMManagerService, ...) named by ``text``: its own URL
    (https://HOST:PORT/wsrf/services/<service>), or the container's (https://HOST:PORT, with or without a path of
    / or /wsrf/services), completed with the service's path. Anything else that is not an http(s) URL with a host
    is a ClientError saying what to give."""
    text = text.strip()
    parts = urlsplit(text)
    if not _is_service_url(text):
        guess = f"; did you mean https://{text}?" if "://" not in text and text and _is_service_url(f"https://{text}") \
            else ""
        raise ClientError(f"{text!r} is not a {service} URL: give https://HOST:PORT{SERVICES_PATH}{service} "
                          f"(or https://HOST:PORT){guess}")
    if parts.path.rstrip("/") in ("", SERVICES_PATH.rstrip("/")) and not parts.query:
        return f"{parts.scheme}://{parts.netloc}{SERVICES_PATH}{service}"
    if parts.path.endswith("/") and not parts.query:        # …/VMManagerService/: the service is at …/VMManagerService
        return text.rstrip("/")
    return text


def _is_service_url(text: str) -> bool:
    """An http(s) URL with a host and a valid port, without spaces or control characters."""
    if any(c.isspace() or not c.isprintable() for c in text):
        return False
    parts = urlsplit(text)
    try:
        parts.port                      # a port out of range or not a number raises
    except ValueError:
        return False
    return parts.scheme.lower() in ("https", "http") and bool(parts.hostname)


class GridServiceClient:
    """One grid service at ``url`` (…/wsrf/services/<Name>), called as ``credential``. ``service``: the name of the
    service expected there (its WSDL's wsdl:service); another service's URL is refused, naming both. ``connect_to``:
    the addresses the caller checked the URL's host against (the only ones connected to: SameOriginTransport)."""

    def __init__(self, url: str, credential: Credential, trust: TrustStore, *,
                 expected_host_dn: str | None = None, timeout: float | None = None, service: str | None = None,
                 connect_to: tuple[tuple[int, tuple], ...] | None = None, _wsdl=None):
        if not _is_service_url(url):
            raise ClientError(f"{url!r} is not a grid service URL: give https://HOST:PORT{SERVICES_PATH}NAME")
        self.url = url.split("?")[0]
        self.credential = credential
        self.trust = trust
        self.expected_host_dn = expected_host_dn
        self.timeout = timeout          # seconds for one call, and for the WSDL and each schema (default 120)
        self.connect_to = connect_to
        self._capture = _Capture(self.url)
        # vmgrid's services answer with a signed wsa:RelatesTo: an answer to another request is refused
        wsse = GridWSSE(credential, trust, expected_host_dn=expected_host_dn, require_relates_to=True)
        transport = SameOriginTransport(self.url, wsse, timeout=timeout, connect_to=connect_to)
        settings = zeep.Settings(strict=True, xml_huge_tree=False, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=False)  # imports are fetched, from the service's origin only
        try:
            self.zeep = zeep.Client(_wsdl or self.url + "?wsdl", wsse=wsse, transport=transport,
                                    plugins=[self._capture], settings=settings)
        except requests.exceptions.RequestException as exc:
            raise Unreachable(f"cannot fetch the WSDL of {self.url}: {_reason(exc, self.url)}") from None
        except ZeepError as exc:        # an answer that is not a WSDL (a web page, another server)
            raise ClientError(f"{self.url} is not a grid service: its ?wsdl answer is not a WSDL "
                              f"({printable(exc, 200)}); give https://HOST:PORT{SERVICES_PATH}NAME") from None
        self.served = next(iter(self.zeep.wsdl.services), "")     # the wsdl:service's name (VMManagerService, ...)
        if not self.served:        # XML zeep could read (a schema, another document) that describes no service
            raise ClientError(f"{self.url} is not a grid service: its ?wsdl answer describes no service; give "
                              f"https://HOST:PORT{SERVICES_PATH}{service or 'NAME'}")
        if service is not None and self.served != service:
            raise ClientError(f"{self.url} is the {self.served}, not the {service}: give the "
                              f"{service}'s URL (https://HOST:PORT{SERVICES_PATH}{service})")
        self._binding = self._first_binding()
        self.service = self.zeep.create_service(self._binding.name.text, self.url)

    def _first_binding(self):
        for service in self.zeep.wsdl.services.values():
            for port in service.ports.values():
                return port.binding
        raise ClientError(f"{self.url}: the WSDL describes no service")

    def _operation(self, operation: str):
        """The binding's ``operation``; one the service does not have says which service this is (a URL of another
        service, given where a client expected this one)."""
        try:
            return self._binding.get(operation)
        except ValueError:
            raise ClientError(f"{self.url} is the {self.served}, which has no operation "
                              f"{operation}: give the URL of the service that has it "
                              f"(https://HOST:PORT{SERVICES_PATH}NAME)") from None

    def another(self) -> GridServiceClient:
        """A client of the same service, as the same credential, on connections of its own, with the WSDL this one
        fetched and parsed (a tenth of a second of CPU each time): `vmgrid repo import` keeps two calls under way."""
        return GridServiceClient(self.url, self.credential, self.trust, expected_host_dn=self.expected_host_dn,
                                 timeout=self.timeout, service=self.served or None, connect_to=self.connect_to,
                                 _wsdl=self.zeep.wsdl)

    def close(self) -> None:
        """Close the HTTP connections this client keeps open."""
        self.zeep.transport.close()

    def to_zeep(self, element: etree._Element):
        """An lxml element (e.g. a descriptor) as the zeep value of its global element."""
        return self.zeep.get_element(element.tag).parse(element, self.zeep.wsdl.types)

    def new_request(self, tag: str, nsmap: dict[str, str] | None = None) -> etree._Element:
        """An empty request element ``tag`` already inside the envelope that ``call(operation, payload=it)`` sends:
        a large request (an ImportImages of a thousand descriptors) is built in place. Moving a finished request into
        an envelope costs lxml a namespace reconciliation of every element against every declaration met so far,
        quadratic in descriptors (41 ms a thousand); the Body declares wsu, so the signer's wsu:Id does not make it
        copy the Body and move the request once more."""
        envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soap-env": SOAP_ENV})
        etree.SubElement(envelope, f"{{{SOAP_ENV}}}Header")
        body = etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body", nsmap={"wsu": WSU})
        return etree.SubElement(body, tag, nsmap=nsmap)

    def call(self, operation: str, *args, text_fill: dict[str, str] | None = None,
             payload: etree._Element | None = None, **kwargs) -> etree._Element:
        """Call ``operation``; returns the verified response payload element, or raises the typed fault.
        ``text_fill`` sets the text of elements (by tag) zeep cannot render itself. ``payload``: the request
        element, already built as lxml: given alone, zeep renders nothing (the cheapest call); given with
        arguments, it replaces the Body zeep renders from them (which must still make a valid request) before
        the message is signed. The service validates it against the schema like any request."""
        self._capture.local.text_fill = text_fill
        self._operation(operation)              # another service's URL: named, not an AttributeError of zeep's
        try:
            if payload is not None and not args and not kwargs:
                self._capture.local.payload = None
                response = self._post(operation, payload)
            else:
                # zeep renders the request (the plugins and the signature as below); the answer comes back raw:
                # every caller reads the verified payload with lxml, so zeep's object form of it (most of a
                # call's client time) is never built
                self._capture.local.payload = payload
                with self.zeep.settings(raw_response=True):
                    response = getattr(self.service, operation)(*args, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise Unreachable(f"cannot reach {self.url}: {_reason(exc, self.url)}") from None
        return self._reply(operation, response)

    def _post(self, operation: str, payload: etree._Element):
        """Send ``payload`` (the whole request element, built as lxml) as ``operation`` without zeep rendering
        anything: the envelope, the egress plugins (WS-Addressing headers), the signature and the HTTP headers
        as zeep's SOAP 1.1 binding makes them."""
        op = self._operation(operation)
        body = payload.getparent()
        if body is not None and body.tag == f"{{{SOAP_ENV}}}Body" and len(body) == 1:     # made by new_request
            envelope = body.getparent()
        else:
            envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soap-env": SOAP_ENV})
            etree.SubElement(envelope, f"{{{SOAP_ENV}}}Header")
            etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body").append(payload)
        headers = {"SOAPAction": f'"{op.soapaction or ""}"', "Content-Type": "text/xml; charset=utf-8"}
        envelope, headers = apply_egress(self.zeep, envelope, headers, op, {"address": self.url})
        envelope, headers = self.zeep.wsse.apply(envelope, headers)
        return self.zeep.transport.post_xml(self.url, envelope, headers)

    def _reply(self, operation: str, response) -> etree._Element:
        """The verified payload of ``response`` (as zeep's own reply processing checks it: the hardened parser,
        the signature and the responding host, then the ingress plugins), or the typed fault it carries."""
        if not response.content:
            raise SoapFaultError(f"{self.url} answered HTTP {response.status_code} without a SOAP message", None)
        doc = getattr(response, "envelope", None)     # GridTransport.post_xml screened it: not parsed twice
        if doc is None:
            try:
                doc = safexml.parse(response.content, self.zeep.transport.limits)
            except safexml.UnsafeXML as exc:
                raise InvalidSecurity(f"response from {self.url} refused by the XML parser: {exc}") from None
        self.zeep.wsse.verify(doc)
        doc, _ = apply_ingress(self.zeep, doc, response.headers, self._binding.get(operation))
        body = doc.find(f"{{{SOAP_ENV}}}Body")
        fault = body.find(f"{{{SOAP_ENV}}}Fault") if body is not None else None
        if fault is not None:
            detail = fault.find("detail")
            for child in detail if detail is not None else ():
                if isinstance(child.tag, str):
                    typed = from_detail(child)
                    if typed is not None:
                        raise typed
            raise SoapFaultError(fault.findtext("faultstring") or "SOAP fault", fault.findtext("faultcode"))
        if response.status_code != 200 or body is None:
            raise SoapFaultError(f"{self.url} answered HTTP {response.status_code} without a SOAP fault", None)
        return self._capture.payload()

    def response_header(self, tag: str) -> etree._Element | None:
        """A header block of this thread's last verified response (its signature covers every header), or None."""
        return self._capture.header(tag)


def _reason(exc: Exception, url: str) -> str:
    text = str(exc)
    parts = urlsplit(str(url))
    where = parts.netloc or url
    if "WRONG_VERSION_NUMBER" in text and parts.scheme == "https":
        # the first bytes back were not TLS: a GridFTP server's 220 greeting, or an HTTP server's plain answer
        return (f"{where} does not answer TLS/HTTPS: is it a SOAP container's port? (GridFTP is gsiftp://; a "
                f"container without TLS is http://)")
    if "Remote end closed connection without response" in text and parts.scheme == "http":
        # a TLS server reads the plain request as a bad handshake and closes without a word
        return f"{where} closed the connection without an answer: it may serve https://, not http://"
    for marker in ("Connection refused", "certificate verify failed", "timed out", "Name or service not known"):
        if marker in text:
            return marker
    return text[:300]


def default_trust(cert_dir: str | Path | None = None) -> TrustStore:
    from security.pki import default_cert_dir

    return TrustStore(Path(cert_dir) if cert_dir else default_cert_dir())


__all__ = ["GridServiceClient", "ClientError", "Unreachable", "SoapFaultError", "VMGridFault", "default_trust",
           "service_url"]
