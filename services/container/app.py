"""The container's WSGI application: serves the published WSDL and schemas, and dispatches signed
SOAP requests (verified by the WS-Security middleware in front of it) to the services' handlers."""
from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from typing import Iterable
from urllib.parse import parse_qs

from lxml import etree

from security.wssec import must_understand_violations
from services.container import soap
from services.container.addressing import AddressingFault, check_request, normalize
from services.container.contract import SCHEMA_PATH, SERVICES_PATH, expected_value, served_schema
from services.container.service import CallContext, SoapService
from services.descriptor import WORKSPACE_TAG, check_descriptor
from services.faults import InternalFault, InvalidArgument, StorageFull, VMGridFault, is_storage_full

call_log = logging.getLogger("vmgrid.calls")

# Faults the container itself answers for any operation: a request that fails schema validation, an unexpected
# error. Every operation declares them (tests/unit/contract checks), so typed stacks (Axis, gSOAP) map them.
# A write that finds its disk full is StorageFull wherever it happens (every operation may write: state, audit).
CONTAINER_FAULTS = ("InvalidArgumentFault", "InternalFault", "StorageFullFault")

CALLER_KEY = "vmgrid.caller"
ENVELOPE_KEY = "vmgrid.envelope"
RESPONSE_KEY = "vmgrid.response_envelope"
# Set by the WS-Security middleware when it will sign and serialize the envelope left in RESPONSE_KEY itself:
# the application then does not serialize it a first time for nothing.
SIGNS_RESPONSE_KEY = "vmgrid.signs_response"


class SoapApplication:
    """Hosts services at /wsrf/services/<Name> (POST: SOAP; GET ?wsdl: the contract) and the schemas
    at /wsrf/share/schema/<file>. Needs the WS-Security middleware in front: a request without a
    verified caller is refused."""

    def __init__(self, services: Iterable[SoapService], *, public_url: str | None = None,
                 validate_responses: bool = False):
        self.services = {s.name: s for s in services}
        self.public_url = public_url.rstrip("/") if public_url else None
        self.aliases: dict[str, str] = {}
        self.validate_responses = validate_responses

    # -- WSGI ------------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        base = self.base_url(environ)
        if path.startswith(SERVICES_PATH):
            service = self.services.get(path[len(SERVICES_PATH):])
            if service is None:
                return _plain(start_response, "404 Not Found", f"no service at {path}\n")
            if method == "POST":
                return self._dispatch(service, environ, start_response, base)
            if method in ("GET", "HEAD"):
                query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
                if "wsdl" in query or "WSDL" in query:
                    return _xml(start_response, "200 OK", service.contract.served_wsdl(base, service.name))
                return _plain(start_response, "200 OK", f"{service.name}: WSDL at {base}{path}?wsdl\n")
            return _plain(start_response, "405 Method Not Allowed", "POST SOAP, or GET ?wsdl\n",
                          [("Allow", "GET, HEAD, POST")])
        if path.startswith(SCHEMA_PATH) and method in ("GET", "HEAD"):
            data = served_schema(path[len(SCHEMA_PATH):], base)
            if data is None:
                return _plain(start_response, "404 Not Found", "no such schema\n")
            return _xml(start_response, "200 OK", data)
        if path in ("/", "/wsrf/services", "/wsrf/services/") and method in ("GET", "HEAD"):
            lines = [f"{name}\t{base}{SERVICES_PATH}{name}?wsdl" for name in sorted(self.services)]
            return _plain(start_response, "200 OK", "\n".join(lines) + "\n")
        return _plain(start_response, "404 Not Found", "not found\n")

    def bind(self, base_url: str, *aliases: str) -> None:
        """The container serves at ``base_url`` (configured or bound): each service learns its public address;
        ``aliases`` (the bound address) are also accepted in a request's wsa:To."""
        self.public_url = base_url.rstrip("/")
        self.aliases = {normalize(a): a.rstrip("/") for a in aliases}
        for s in self.services.values():
            s.bind(f"{self.public_url}{SERVICES_PATH}{s.name}")
            s.addresses = (s.address, *(f"{a.rstrip('/')}{SERVICES_PATH}{s.name}" for a in aliases))

    def base_url(self, environ) -> str:
        """The base URL the contract is served with: the configured public URL, or the container's bound
        address when the request names that (a fixed set: nothing a request names grows the caches)."""
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME')}:{environ.get('SERVER_PORT')}"
        asked = f"{environ.get('wsgi.url_scheme', 'http')}://{host}"
        if self.public_url:
            return self.aliases.get(normalize(asked), self.public_url)
        return asked

    # -- SOAP dispatch -----------------------------------------------------------------------
    def _dispatch(self, service: SoapService, environ, start_response, base: str):
        started = time.perf_counter()
        caller = environ.get(CALLER_KEY)
        root = environ.get(ENVELOPE_KEY)
        op_name = "?"
        outcome = "ok"
        dn = getattr(caller, "dn", None)
        wsa: dict[str, str] = {}        # the verified request's WS-Addressing values, once read
        try:
            if caller is None or root is None:
                # Defence in depth: the container never dispatches a message security did not verify.
                raise soap.EnvelopeError("the message was not verified by WS-Security", "Client")
            headers, payload = soap.split_envelope(root)
            wsa = soap.wsa_headers(headers)
            # per service: another service of this container may understand a header this one does not
            not_understood = must_understand_violations(root, service.understood_headers)
            if not_understood:
                raise soap.EnvelopeError(f"header {not_understood[0]} is not understood", "MustUnderstand")
            op = service.contract.by_input.get(payload.tag)
            if op is None:
                raise soap.EnvelopeError(f"{service.name} has no operation for {payload.tag}")
            op_name = op.name
            check_request(headers, service.addresses, op.soap_action, environ.get("HTTP_SOAPACTION"))
            self._validate_request(service, payload)
            ctx = CallContext(service, op.name, caller, headers, wsa, base)
            result = service.handlers[op.name](ctx, payload)
            if self.validate_responses:
                service.contract.validator.assertValid(result)
            env = soap.envelope(result, soap.response_headers(wsa, op.soap_action + "Response") + ctx.reply_headers)
            status = "200 OK"
        except VMGridFault as exc:
            outcome = f"fault:{exc.element}"
            if self.validate_responses and op_name in service.contract.operations and \
                    exc.element not in service.contract.operations[op_name].faults:
                # checked in tests: a fault the WSDL does not declare for the operation breaks typed clients
                exc = InternalFault(f"{service.name}.{op_name} answered {exc.element}, which its WSDL operation "
                                    f"does not declare: {exc.description}")
            env, status = soap.typed_fault_envelope(exc, soap.fault_headers(wsa)), "500 Internal Server Error"
        except AddressingFault as exc:
            outcome = f"fault:wsa-{exc.code}"
            env, status = exc.envelope(soap.fault_headers(wsa)), "500 Internal Server Error"
        except soap.EnvelopeError as exc:
            outcome = f"fault:soap-{exc.code}"
            env, status = soap.fault_envelope(exc.code, str(exc), None, soap.fault_headers(wsa)), \
                "500 Internal Server Error"
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes a fault
            if is_storage_full(exc):
                service.log.warning("%s.%s: storage full: %s", service.name, op_name, exc)
                outcome = "fault:StorageFullFault"
                env = soap.typed_fault_envelope(StorageFull(
                    f"{service.name}.{op_name} could not write its state: the disk holding it is full ({exc}); "
                    f"nothing was half-written", store=f"{service.name} state"), soap.fault_headers(wsa))
            else:
                incident = uuid.uuid4().hex[:12]
                service.log.error("incident %s in %s.%s\n%s", incident, service.name, op_name,
                                  traceback.format_exc())
                outcome = "fault:InternalFault"
                env = soap.typed_fault_envelope(InternalFault(
                    f"internal error in {service.name}.{op_name}; incident {incident} is in the service log",
                    incident=incident), soap.fault_headers(wsa))
            status = "500 Internal Server Error"
        environ[RESPONSE_KEY] = env
        body = b"" if environ.get(SIGNS_RESPONSE_KEY) else soap.serialize(env)
        if call_log.isEnabledFor(logging.INFO):      # the JSON line is built only when it is written
            call_log.info(json.dumps({
                "service": service.name, "operation": op_name, "caller": dn,
                "ms": round((time.perf_counter() - started) * 1000, 2), "outcome": outcome,
            }, separators=(",", ":")))
        return _xml(start_response, status, body)

    def _validate_request(self, service: SoapService, payload: etree._Element) -> None:
        validator = service.contract.validator
        if validator.validate(payload):
            return
        err = validator.error_log.last_error
        # A descriptor inside the request gets its own, line-numbered InvalidDescriptor fault.
        for ws in payload.iter(WORKSPACE_TAG):
            check_descriptor(ws)
        where = soap.element_path(payload, err.path) or etree.QName(payload).localname
        message = soap.schema_message(err.message)
        if "of the local atomic type" in message:       # libxml2 names no type for an anonymous restriction
            expected = expected_value(payload.tag, where)
            if expected:
                message = f"{message.rstrip('.')}: expected {expected}"
        raise InvalidArgument(f"invalid {etree.QName(payload).localname} request: {where}: {message}",
                              argument=where)


def _xml(start_response, status: str, body: bytes):
    start_response(status, [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


def _plain(start_response, status: str, text: str, extra=()):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *extra])
    return [body]
