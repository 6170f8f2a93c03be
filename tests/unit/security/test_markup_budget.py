"""The parse trees a container process holds at once are bounded (security/middleware.py MarkupBudget,
`[container.limits] max_markup_held`): a request over 64 KiB takes its markup items ('<' and '=') from the budget
for as long as it runs, and one that finds no room is refused at once with a signed soap:Server fault, before any
tree is built, while small requests are never counted. The real middleware with real signatures, called as WSGI;
the service behind it is a test app that holds a large request until the test lets it go (no timing)."""
from __future__ import annotations

import io
import threading

from lxml import etree

from security.middleware import WSSecurityMiddleware
from security.wssec import Q_BODY, SOAP11, sign_envelope, verify_envelope
from tests.fixtures.pki import echo_envelope

BIG = "urn:vmgrid:test:big"


def big_envelope(items: int) -> etree._Element:
    env = echo_envelope("big")
    holder = etree.SubElement(env.find(Q_BODY)[0], f"{{{BIG}}}items", nsmap={"b": BIG})
    for _ in range(items - 1):
        etree.SubElement(holder, f"{{{BIG}}}i")
    return env


class HoldingApp:
    """Answers every request; one with a b:items element waits inside until ``release`` is set."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, environ, start_response):
        root = environ["vmgrid.envelope"]
        if root.find(f".//{{{BIG}}}items") is not None and not self.release.is_set():
            self.entered.set()
            self.release.wait(60)
        answer = etree.Element(f"{{{SOAP11}}}Envelope")
        etree.SubElement(etree.SubElement(answer, Q_BODY), "answered").text = environ["vmgrid.caller"].dn
        data = etree.tostring(answer)
        start_response("200 OK", [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(data)))])
        return [data]


def call(mw, body: bytes) -> tuple[str, etree._Element]:
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"] = status

    environ = {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
               "REMOTE_ADDR": "127.0.0.1", "PATH_INFO": "/echo"}
    data = b"".join(mw(environ, start_response))
    return got["status"], data


def test_large_requests_wait_for_no_room_and_small_ones_are_never_counted(grid_pki):
    app = HoldingApp()
    mw = WSSecurityMiddleware(app, grid_pki.host, grid_pki.trust(), markup_held=1_000_000)
    first = sign_envelope(big_envelope(600_000), grid_pki.alice.proxy)
    second = sign_envelope(big_envelope(500_000), grid_pki.alice.proxy)
    results = {}
    holder = threading.Thread(target=lambda: results.setdefault("first", call(mw, first)))
    holder.start()
    try:
        assert app.entered.wait(60), "the first large request did not reach the service"
        assert mw.markup.held >= 600_000

        # a second large one finds no room: refused at once, signed, nothing of it parsed into a tree
        status, data = call(mw, second)
        assert status.startswith("500")
        _, fault = verify_envelope(data, grid_pki.trust(), expected_signer=grid_pki.host_dn)
        assert fault.findtext(".//faultcode").endswith(":Server")
        assert "busy with other large requests" in fault.findtext(".//faultstring")

        # an unsigned large one too, before its signature is looked at
        status, data = call(mw, etree.tostring(big_envelope(500_000)))
        assert "busy with other large requests" in data.decode()

        # a small request is answered meanwhile
        status, data = call(mw, sign_envelope(echo_envelope("small"), grid_pki.alice.proxy))
        assert status.startswith("200") and b"answered" in data
    finally:
        app.release.set()
        holder.join(60)
    assert results["first"][0].startswith("200")
    assert mw.markup.held == 0                    # given back when the request ended
    status, data = call(mw, second)               # and the second one now goes through
    assert status.startswith("200"), data[:500]
    assert mw.markup.held == 0


def test_a_refused_large_request_gives_its_items_back(grid_pki):
    mw = WSSecurityMiddleware(HoldingApp(), grid_pki.host, grid_pki.trust(), markup_held=1_000_000)
    unsigned = etree.tostring(big_envelope(400_000))
    for _ in range(3):                             # each refusal (unsigned) gives back what it took
        status, data = call(mw, unsigned)
        assert status.startswith("500") and b"InvalidSecurity" in data
        assert mw.markup.held == 0
