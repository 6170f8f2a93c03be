"""A GridFTP client session: one control connection, login (anonymous, AUTH TLS or AUTH GSSAPI), commands, data set-up.

:class:`GridFTPClient` is the protocol layer the transfer functions of :mod:`gridftp.transfer`
are built on; use those for whole-file transfers with restart and verification.
"""
from __future__ import annotations

import base64
import binascii
import socket
from collections.abc import Callable, Sequence
from collections import namedtuple
from urllib.parse import unquote, urlsplit

from .control import ControlChannel
from .errors import AuthenticationError, GridFTPError, GSIOnlyServer, ProtocolError, TransferError, reply_error
from .protocol import (DEFAULT_FTP_PORT, DEFAULT_GRIDFTP_PORT, Reply, find_host_ports, format_eprt,
                       format_host_port, parse_epsv_reply)

TYPE_CHECKING = False   # what typing.TYPE_CHECKING is at run time, without importing typing (the command's start)
if TYPE_CHECKING:       # the TLS and GSI modules (ssl, cryptography, pyOpenSSL) load only for gsiftp://
    import ssl

    from security.gsi import GSIContext

    from .tls import Credential, DataTLS, TLSConfig

CONTROL_TIMEOUT = 60.0
# gsi=GSI_FALLBACK: AUTH TLS, then AUTH GSSAPI if the server refuses AUTH TLS with 504 (what a gsiftp:// URL of
# anyone's server needs: a job service's stage-ins and stage-outs, services/jobs/staging.py; `vmgrid transfer`)
GSI_FALLBACK = "fallback"


class GridFTPURL(namedtuple("GridFTPURL", "scheme host port path")):
    """``ftp://host[:port]/path`` (anonymous) or ``gsiftp://host[:port]/path`` (AUTH TLS): ``scheme``, ``host``,
    ``port`` (int), ``path`` (a named tuple, see :class:`gridftp.protocol.Reply`)."""

    __slots__ = ()

    @property
    def secure(self) -> bool:
        return self.scheme == "gsiftp"

    @classmethod
    def parse(cls, url: str) -> "GridFTPURL":
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("ftp", "gsiftp"):
            raise GridFTPError(f"{url}: not an ftp:// or gsiftp:// URL")
        if not parts.hostname:
            raise GridFTPError(f"{url}: no host")
        if parts.username or parts.password:
            raise GridFTPError(f"{url}: user names in URLs are not supported (identity comes from the credential)")
        path = unquote(parts.path) or "/"
        if "\r" in path or "\n" in path or "\0" in path:
            raise GridFTPError(f"{url}: control characters in the path")
        try:
            port = parts.port or (DEFAULT_GRIDFTP_PORT if scheme == "gsiftp" else DEFAULT_FTP_PORT)
        except ValueError as exc:
            raise GridFTPError(f"{url}: {exc}") from None
        return cls(scheme, parts.hostname, port, path)

    def with_path(self, path: str) -> "GridFTPURL":
        return GridFTPURL(self.scheme, self.host, self.port, path)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def _host_refusal(caller, host: str) -> str | None:
    """GSI host authorization of the server (security.hostauth): its chain's end-entity certificate must be a host
    certificate naming ``host``; a proxy's subject or CN never counts, and a proxy chain is refused."""
    from security.hostauth import host_refusal
    return host_refusal(caller, host)


def older_proxy_refusal(credential: Credential, gsi: bool, prot: str) -> str | None:
    """Why ``credential`` cannot authenticate a TLS channel, said before connecting: a chain holding a GT2 legacy
    (grid-proxy-init -old) or GT3 draft (-draft) proxy is refused by OpenSSL's check, which AUTH TLS (both ends)
    and PROT S/P data channels use (only GSI's own contexts, with PROT C, take it). The server's refusal would come
    as a bare EOF, or as data connections dropped and a 426 that running the command again cannot mend."""
    from security.pki import any_proxy_info

    if gsi and prot == "C":
        return None
    for cert in credential.certificates:
        try:
            found = any_proxy_info(cert)
        except ValueError:
            return None             # an unreadable extension: the handshake's own check says what is wrong
        if found is not None and found[2] in ("legacy", "draft"):
            made = "grid-proxy-init -old" if found[2] == "legacy" else "grid-proxy-init -draft"
            where = "AUTH TLS" if not gsi else f"PROT {prot} data channels"
            return (f"{credential.subject} is a {found[2]} proxy ({made}), and GridFTP over TLS ({where}) takes "
                    f"RFC 3820 proxies only: make one with `vmgrid proxy-init` or `grid-proxy-init -rfc`; nothing "
                    f"was transferred")
    return None


# the TLS alerts a server sends for a refused client certificate that say the cause
_REFUSAL_ALERTS = {"TLSV1_ALERT_UNKNOWN_CA": "the server does not trust its CA",
                   "SSLV3_ALERT_CERTIFICATE_EXPIRED": "a certificate of it has expired",
                   "SSLV3_ALERT_CERTIFICATE_REVOKED": "a certificate of it is revoked"}


def _refused_in_handshake(host: str, exc: ssl.SSLError) -> str:
    """A credential the server refused in the TLS 1.3 handshake: the client learns it only at its first read, as the
    server's alert or as a bare EOF, so the cause is named when the alert says it, else the likely causes (the
    server's log has its reason)."""
    import ssl

    reason = getattr(exc, "reason", None)
    said = _REFUSAL_ALERTS.get(reason or "")
    if said is None:
        alert = "" if isinstance(exc, ssl.SSLEOFError) else f" ({reason or exc})"
        said = f"the server may not trust its CA, or it is an expired, revoked or legacy proxy{alert}"
    return (f"{host} refused the credential during the TLS handshake: {said} (`vmgrid proxy-info` shows what you "
            f"present)")


class GridFTPClient:
    """One control session. Use as a context manager; :meth:`connect` logs in.

    ``credential``/``trust``: used for ``gsiftp://`` (AUTH TLS, then PBSZ 0 / PROT P).
    ``server_dn``: the DN the server must present; by default its chain's end-entity certificate must be a host
    certificate naming the URL's host (security.hostauth: never a proxy, whatever CN the proxy added).
    ``prelude``: commands sent in the same write as the login (one round trip for all of them on a
    long path); their replies are in :attr:`prelude_replies`.
    ``gsi``: authenticate with ``AUTH GSSAPI`` (the Globus GSI mechanism, as globus-url-copy does:
    a limited proxy is delegated to the server, every command is wrapped) instead of AUTH TLS; needed for a
    Globus server. ``delegate`` (with GSI): True (default) a limited proxy, which is what the server's data
    channels (``DCAU A``) need to prove the user's DN; ``security.gsi.DELEGATE_FULL`` an inherit-all proxy (the
    server may then do anything as the user: asked for by name only); False none (a session that opens no data
    channel, e.g. CKSM). The server is checked (``server_dn``, else its host certificate, and ``refuse_server``)
    inside the GSI exchange, before the delegation flag: a server that is not the one meant gets nothing.
    ``gsi=GSI_FALLBACK``: AUTH TLS, and AUTH GSSAPI on the same connection when the server refuses AUTH TLS with 504 (a GSI-only server, e.g. globus-gridftp-server): no weaker than either, as both
    authenticate the server by the same check (``server_dn``, else its host certificate, and ``refuse_server``),
    under GSI as soon as the handshake has authenticated it, before the delegation; without it such a 504 is a
    :class:`GSIOnlyServer`. ``data_protection_level``: with GSI, ``P`` (default), ``S`` or ``C``, always with
    ``DCAU A``. ``refuse_server(dn) -> bool``: a server whose authenticated DN it returns True for is
    refused (:class:`AuthenticationError`) before any command: e.g. a VMManager refuses guests' certificates.
    """

    def __init__(self, url: GridFTPURL | str, *, credential: Credential | None = None, trust=None,
                 server_dn: str | None = None, timeout: float = CONTROL_TIMEOUT,
                 identify: Callable[[ssl.SSLSocket], str] | None = None, prelude: Sequence[str] = (),
                 gsi: bool | str = False, data_protection_level: str = "P", delegate: bool | str = True,
                 refuse_server: Callable[[str], bool] | None = None):
        self.url = GridFTPURL.parse(url) if isinstance(url, str) else url
        self.prelude = list(prelude)
        self.prelude_replies: list[Reply] = []
        self.timeout = timeout
        self.expected_server_dn = server_dn
        self.refuse_server = refuse_server
        self.tls: TLSConfig | None = None
        self.gsi = gsi is True and self.url.secure
        self.gsi_fallback = gsi == GSI_FALLBACK and self.url.secure
        self.gss: GSIContext | None = None
        self.prot = data_protection_level.upper()
        if self.prot not in ("C", "S", "P"):
            raise GridFTPError(f"data protection level {data_protection_level!r}: use C, S or P")
        self.delegate = delegate
        self._gsi_tls: TLSConfig | None = None
        if self.url.secure:
            from security.pki import CredentialError, load_user_credential

            from .tls import TLSConfig
            if credential is None:
                try:
                    credential = load_user_credential()
                except CredentialError as exc:
                    raise AuthenticationError(str(exc)) from exc
            why = older_proxy_refusal(credential, self.gsi, self.prot)
            if why is not None:
                raise AuthenticationError(why)
            self.tls = TLSConfig(credential, trust, identify=identify)
        self.server_dn: str | None = None
        self.control: ControlChannel | None = None
        self.features: dict[str, str] = {}
        self.local_host = ""
        self.mode = "S"

    # -- connection -------------------------------------------------------------------------------
    def connect(self) -> "GridFTPClient":
        try:
            sock = socket.create_connection((self.url.host, self.url.port), timeout=self.timeout)
        except OSError as exc:
            raise TransferError(f"cannot connect to {self.url.host}:{self.url.port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_host = sock.getsockname()[0]
        self.control = ControlChannel(sock)
        self.control.reply_time = self.timeout      # a reply trickled in a byte at a time ends there
        try:
            greeting = self.read_reply()
            while greeting.code == 120:
                greeting = self.read_reply()
            if greeting.code != 220:
                raise reply_error("(greeting)", greeting.code, greeting.text)
            if not self.gsi and self.tls is not None and not self._auth_tls():
                self.gsi = True         # refused with 504, and GSI_FALLBACK: a GSI-only server
            if self.gsi:
                self._auth_gssapi()
                login = ["USER :globus-mapping:", "PASS dummy", "PBSZ 1048576", f"PROT {self.prot}", "DCAU A"]
                replies = self.pipeline([*login, *self.prelude])
                user, password = replies[:2]
                if user.code in (530, 535) or (user.code == 331 and password.code in (530, 535)):
                    bad = user if user.code != 331 else password
                    raise AuthenticationError(f"{self.url.host} refused the credential: {bad.code} {bad.text}")
                if user.code not in (230, 232, 331) or (user.code == 331 and password.code != 230):
                    raise reply_error("USER", user.code, user.text)
                self.expect_ok(replies[2:5], login[2:])
                self.prelude_replies = replies[5:]
            elif self.tls is not None:
                try:
                    replies = self.pipeline(["PBSZ 0", "PROT P", "USER :globus-mapping:", *self.prelude])
                except TransferError as exc:
                    import ssl
                    if isinstance(exc.__cause__, ssl.SSLError):   # TLS 1.3: a refused certificate shows here
                        raise AuthenticationError(_refused_in_handshake(self.url.host, exc.__cause__)) from exc
                    raise
                for reply, cmd in zip(replies, ["PBSZ 0", "PROT P", "USER"]):
                    if reply.code in (530, 535):
                        raise AuthenticationError(f"{self.url.host} refused the credential: {reply.code} {reply.text}")
                    if not reply.ok:
                        raise reply_error(cmd, reply.code, reply.text)
                self.prelude_replies = replies[3:]
            else:
                replies = self.pipeline(["USER anonymous", "PASS vmgrid@", *self.prelude])
                if replies[0].code not in (230, 331):
                    raise reply_error("USER anonymous", replies[0].code, replies[0].text)
                if replies[0].code == 331 and replies[1].code != 230:
                    raise reply_error("PASS", replies[1].code, replies[1].text)
                self.prelude_replies = replies[2:]
        except BaseException:
            self.close()
            raise
        return self

    def _auth_tls(self) -> bool:
        """AUTH TLS and the server's check; False (nothing done) when the server refused it with 504 and
        ``gsi=GSI_FALLBACK`` lets AUTH GSSAPI follow."""
        reply = self.command("AUTH TLS")
        if reply.code == 504 and self.gsi_fallback:
            return False
        if reply.code == 504:
            raise GSIOnlyServer(reply.code, reply.text)
        if reply.code != 234:
            raise AuthenticationError(f"server refused AUTH TLS: {reply.code} {reply.text}")
        try:
            sock = self.control.start_tls(self.tls.client_context, server_side=False)
        except OSError as exc:          # ssl.SSLError is an OSError
            raise AuthenticationError(f"TLS handshake with {self.url.host} failed: {exc}") from exc
        self.server_dn = self.tls.identify(sock)
        if self.expected_server_dn is not None:
            why = self._server_refusal(self.server_dn, None)
        else:
            why = self._server_refusal(self.server_dn, self.tls.authenticate(sock))
        if why is not None:
            raise AuthenticationError(why)
        return True

    def _server_refusal(self, dn: str, caller) -> str | None:
        """Why the authenticated server is not the one meant, or None: ``server_dn`` when given, else a host
        certificate naming the URL's host (``caller``: its security.trust.Caller), and ``refuse_server``. The same
        check for AUTH TLS (after the handshake) and AUTH GSSAPI (inside the context, before any delegation)."""
        if self.expected_server_dn is not None:
            if dn != self.expected_server_dn:
                return f"server is {dn!r}, expected {self.expected_server_dn!r}"
        else:
            why = _host_refusal(caller, self.url.host)
            if why is not None:
                return why if self.url.host in why else f"{why} (expected a host certificate naming {self.url.host})"
        if self.refuse_server is not None and self.refuse_server(dn or ""):
            return f"{self.url.host} presented {dn!r}, a certificate refused here"
        return None

    def _auth_gssapi(self) -> None:
        """RFC 2228 with the GSI mechanism: the context's tokens in ADAT commands, a proxy delegated once the
        server is known to be the one meant (attack16 G1: never before)."""
        from security.gsi import GSIContext, GSIError
        reply = self.command("AUTH GSSAPI")
        if reply.code != 334:
            raise AuthenticationError(f"server refused AUTH GSSAPI: {reply.code} {reply.text}")
        refused: list[str] = []

        def authorize(caller) -> str | None:
            why = self._server_refusal(caller.dn, caller)
            if why is not None:
                refused.append(why)
            return why

        self.gss = GSIContext(self.tls.credential, self.tls.trust, initiate=True, delegate=self.delegate,
                              authorize=authorize)
        try:
            token = self._gss_step(None)
            while True:
                reply = self.command("ADAT " + base64.b64encode(token).decode("ascii"))
                data = reply.text.strip()
                answer = base64.b64decode(data[5:], validate=True) if data.startswith("ADAT=") else b""
                if reply.code == 335:
                    token = self._gss_step(answer)
                    continue
                if reply.code == 235:
                    if answer or not self.gss.complete:
                        token = self._gss_step(answer)
                        if token or not self.gss.complete:
                            raise AuthenticationError("the server ended the GSI exchange early")
                    break
                raise AuthenticationError(f"{self.url.host} refused the credential: {reply.code} {reply.text}")
        except GSIError as exc:
            if refused:             # the server is not the one meant: refused before the delegation flag
                raise AuthenticationError(f"{refused[0]} (GSI: nothing was delegated to it)") from None
            raise AuthenticationError(f"GSI authentication with {self.url.host} failed: {exc.reason}") from None
        except (ValueError, binascii.Error):
            raise AuthenticationError(f"{self.url.host} sent an ADAT reply that is not base64") from None
        if self.server_dn is None:          # never: the context completes only past the handshake
            raise AuthenticationError(f"the GSI exchange with {self.url.host} ended without authenticating it")
        self.control.wrap, self.control.unwrap = self.gss.wrap, self.gss.unwrap

    def _gss_step(self, answer: bytes | None) -> bytes:
        """The context's next token. The server it is for passed the same check as under AUTH TLS (``server_dn``,
        else a host certificate naming the URL's host; ``refuse_server``) inside the context, as soon as the handshake
        authenticated it and before the delegation flag was even made (``GSIContext(authorize=)``), so that no server
        the check refuses is delegated a proxy (a 504 forged on the way to make the client fall back from AUTH TLS
        gains nothing); its DN is the session's ``server_dn`` from then on."""
        token = self.gss.step(answer)
        if self.server_dn is None and self.gss.peer is not None:
            self.server_dn = self.gss.peer.dn
        return token

    def close(self) -> None:
        if self.control is not None:
            self.control.close()

    def quit(self) -> None:
        """Say goodbye politely, then close."""
        if self.control is not None and not self.control.closed:
            try:
                self.control.sock.settimeout(5)
                self.command("QUIT")
            except (GridFTPError, OSError, EOFError):
                pass
        self.close()

    def __enter__(self) -> "GridFTPClient":
        if self.control is None:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.quit()

    # -- commands ------------------------------------------------------------------------------------
    def read_reply(self) -> Reply:
        try:
            return self.control.read_reply()
        except EOFError as exc:
            raise TransferError(f"{self.url.host}: control connection closed") from exc
        except (TimeoutError, socket.timeout) as exc:
            raise TransferError(f"{self.url.host}: control connection failed: {exc} (no whole reply within "
                                f"{self.timeout:g} s)") from exc
        except OSError as exc:          # ssl.SSLError included
            raise TransferError(f"{self.url.host}: control connection failed: {exc}") from exc

    def send(self, line: str) -> None:
        try:
            self.control.send_line(line)
        except OSError as exc:
            raise TransferError(f"{self.url.host}: control connection failed: {exc}") from exc

    def command(self, line: str) -> Reply:
        """Send one command and return its reply (negative replies are returned, not raised)."""
        self.send(line)
        return self.read_reply()

    def pipeline(self, lines: list[str]) -> list[Reply]:
        """Send several commands in one write and read their replies in order (saves round trips)."""
        try:
            self.control.send_lines(lines)
        except OSError as exc:
            raise TransferError(f"{self.url.host}: control connection failed: {exc}") from exc
        return [self.read_reply() for _ in lines]

    @staticmethod
    def expect_ok(replies: list[Reply], commands: list[str]) -> None:
        for reply, cmd in zip(replies, commands):
            if not reply.ok:
                raise reply_error(cmd, reply.code, reply.text)

    def ok(self, line: str) -> Reply:
        """Send a command; raise :class:`ReplyError` unless the reply is positive (2xx/3xx)."""
        reply = self.command(line)
        if not reply.ok:
            raise reply_error(line, reply.code, reply.text)
        return reply

    def feat(self) -> dict[str, str]:
        reply = self.command("FEAT")
        self.features = {}
        if reply.code == 211:
            for line in reply.lines[1:-1]:
                name, _, params = line.strip().partition(" ")
                self.features[name.upper()] = params
        return self.features

    def size(self, path: str) -> int:
        text = self.ok(f"SIZE {path}").text.strip()
        if not text.isdigit():
            raise ProtocolError(f"SIZE reply {text[:40]!r}")
        return int(text)

    def checksum(self, path: str, algorithm: str = "SHA256", offset: int = 0, length: int = -1) -> str:
        text = self.ok(f"CKSM {algorithm.upper()} {offset} {length} {path}").text.strip().lower()
        if not text or any(c not in "0123456789abcdef" for c in text):
            raise ProtocolError(f"CKSM reply {text[:80]!r}")
        return text

    # -- data channel set-up ----------------------------------------------------------------------------
    def port_command(self, host: str, port: int) -> str:
        if ":" in host and not host.startswith("::ffff:"):
            return f"EPRT {format_eprt(host, port)}"
        return f"PORT {format_host_port(host, port)}"

    def data_listener(self) -> socket.socket:
        """A listener for this session's incoming data connections (PORT/EPRT/SPOR: a MODE E download), on a port of
        the data port range (GLOBUS_TCP_PORT_RANGE, or the configuration key that took its place) when one is set.
        A range whose every port is in use is :class:`~gridftp.datachannel.NoFreeDataPort` naming it and what to do:
        this side's range, so this side's to widen or unset (trial15 N6: the message named the range alone)."""
        from .datachannel import PORT_RANGE_ENV, NoFreeDataPort, open_listener

        try:
            return open_listener(self.local_host)
        except NoFreeDataPort as exc:
            named = exc.strerror.removeprefix("no free data port in ").rsplit(" ", 1)[0]
            todo = (f"widen or unset {PORT_RANGE_ENV} (the ports this client listens on for data connections)"
                    if named == PORT_RANGE_ENV else f"widen {named} (this process's data ports)")
            raise NoFreeDataPort(exc.errno, f"{exc.strerror}, all in use: {todo}") from None

    def passive_command(self) -> str:
        return "EPSV" if ":" in self.local_host and not self.local_host.startswith("::ffff:") else "PASV"

    def passive_addresses(self, reply: Reply) -> list[tuple[str, int]]:
        """Addresses from a 227 (PASV), 229 (EPSV) or 229 striped (SPAS) reply."""
        if reply.code == 227 or (reply.code == 229 and "Striped" in reply.text):
            found = find_host_ports(reply.text)
            if not found:
                raise ProtocolError(f"no address in {reply.text[:80]!r}")
            return found
        if reply.code == 229:
            return [(self.control.sock.getpeername()[0], parse_epsv_reply(reply.text))]
        raise ProtocolError(f"unexpected passive reply {reply.code}")

    def data_protection(self, expect: str | None = None) -> DataTLS | None:
        """PROT P data channel protection for this session (the server's DN is expected by default)."""
        if self.tls is None:
            return None
        from .gsidata import GSIData, tls_config as gsi_tls_config
        from .tls import DataTLS
        if self.gsi:
            # DCAU A: the server's data side uses the proxy we delegated, so it proves our own DN
            if self._gsi_tls is None and self.prot != "C":
                self._gsi_tls = gsi_tls_config(self.tls.credential, self.tls.trust)
            return GSIData(self.tls.credential, self.tls.trust,
                           expect if expect is not None else self.tls.credential.identity,
                           private=self.prot != "C", tls=self._gsi_tls)
        return DataTLS(self.tls, expect if expect is not None else self.server_dn, tls_server=False)
