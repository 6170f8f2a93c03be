"""`vmgrid transfer SRC DST` (with a progress bar) and `vmgrid gridftp-server`."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from services.common.errors import CLIError

from .errors import ChecksumMismatch, GridFTPError, GSIOnlyServer

SCHEMES = ("ftp://", "gsiftp://")


def register(subparsers) -> None:
    """Add `transfer` and `gridftp-server` to the `vmgrid` parser."""
    p = subparsers.add_parser(
        "transfer", help="copy a file with GridFTP (parallel, restartable, verified)",
        description="Copy SRC to DST. Each is a local path or an ftp:// (anonymous) or gsiftp:// "
                    "(grid credential: AUTH TLS, or AUTH GSSAPI where the server refuses AUTH TLS, as a "
                    "globus-gridftp-server does) URL; two URLs make a third-party "
                    "transfer between the servers. "
                    "An interrupted transfer resumes where it stopped when run again. The result is "
                    "verified against the source before it takes its name: a download from a vmgrid server "
                    "with BLAKE3 (which both ends speak; several times faster than SHA-256 without the CPU's "
                    "SHA extensions), otherwise and from any other server with SHA-256. A local DST that exists is "
                    "refused unless --overwrite (globus-url-copy replaces it); a remote one is replaced, as STOR does.")
    p.add_argument("src")
    p.add_argument("dst", help="a path, a directory, or a URL (ending in / to keep the source's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a local DST file that exists (refused otherwise; the old file stays until the new "
                        "one is complete and verified)")
    p.add_argument("-p", "--parallel", type=int, default=4, metavar="N", help="parallel TCP streams (default 4)")
    p.add_argument("--sha256", help="the expected sha256 of the file, when known (skips asking the source)")
    p.add_argument("--blake3", help="the expected BLAKE3 digest of a downloaded file, when known (a descriptor's "
                                    "image/blake3): verified with BLAKE3 without asking the source")
    p.add_argument("--checksum", choices=["auto", "sha256"], default="auto",
                   help="a download without an expected digest: auto (default) asks the source for BLAKE3 when "
                        "it lists it in FEAT, else SHA256; sha256 always SHA256")
    p.add_argument("--retries", type=int, default=2, help="automatic resumes after a broken transfer (default 2)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a server that takes longer than this to connect, to answer a command or to move data "
                        "fails the attempt (then --retries more follow; default 60)")
    p.add_argument("--cert-dir", help="trusted CA directory (default $X509_CERT_DIR)")
    p.add_argument("--proxy", help="credential file (default $X509_USER_PROXY, /tmp/x509up_u<uid>, ~/.globus)")
    p.add_argument("--state-dir", help="where restart markers of uploads are kept (default ~/.cache/vmgrid/gridftp)")
    p.add_argument("--gsi", action="store_true",
                   help="authenticate gsiftp:// with AUTH GSSAPI (Globus GSI) without trying AUTH TLS first (by "
                        "default a server that refuses AUTH TLS, as a globus-gridftp-server does, is asked for AUTH "
                        "GSSAPI on the same connection, and checked the same way). Under GSI the server gets a limited "
                        "proxy of your credential (as globus-url-copy delegates): what its data channels need to prove "
                        "your identity; it can read and write your files there and elsewhere, not start jobs or change "
                        "policies as you")
    p.add_argument("--full-delegation", action="store_true",
                   help="under GSI: delegate a full (impersonation) proxy instead of the limited one: the server "
                        "can then do ANYTHING you can, at any service, for the proxy's 12 hours (start jobs, change "
                        "a VO's policy). Only for a server you trust that must act as you elsewhere and refuses "
                        "limited proxies")
    p.add_argument("--prot", choices=["C", "S", "P"], default="P",
                   help="under GSI: data channel protection, clear (C), integrity (S) or private (P, default); "
                        "the data connections are authenticated (DCAU A) in every case")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="draw the progress bar even when stderr is not a terminal")
    g.add_argument("-q", "--quiet", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_transfer)

    p = subparsers.add_parser(
        "gridftp-server", help="run a standalone GridFTP server",
        description="Serve a directory over GridFTP. With a host credential it offers AUTH TLS and "
                    "AUTH GSSAPI (Globus GSI) and requires grid certificates or proxies; --anonymous adds "
                    "read-only anonymous access.")
    p.add_argument("--root", required=True, type=Path, help="the directory served as /")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=2811, help="port (default 2811; 0 picks a free one)")
    p.add_argument("--cert", help="host certificate (default /etc/grid-security/hostcert.pem if present)")
    p.add_argument("--key", help="host key")
    p.add_argument("--cert-dir", help="trusted CA directory (default $X509_CERT_DIR)")
    p.add_argument("--no-tls", action="store_true", help="no AUTH TLS (anonymous only)")
    p.add_argument("--anonymous", action="store_true", help="allow anonymous read-only access (ftp://)")
    p.add_argument("--upload-area", help="the virtual directory writes are allowed in (default: none)")
    p.add_argument("--allow-dn", action="append", default=[], metavar="DN",
                   help="only these grid identities may log in (repeatable; default: any trusted identity)")
    p.add_argument("--insecure-anonymous-writes", action="store_true",
                   help="TESTING ONLY: let anonymous sessions write inside the upload area")
    p.add_argument("--grid-mapfile", metavar="FILE",
                   help="only the DNs this Globus grid-mapfile names may log in (default: any trusted DN)")
    p.add_argument("--data-peer", action="append", default=[], metavar="ADDR[/PREFIX]",
                   help="a trusted server this one may open data connections to in third-party transfers "
                        "(repeatable; by default only the client's own address)")
    p.add_argument("--max-rate", type=float, default=0,
                   help="bytes per second per transfer, what the server sends (RETR) and what it receives (STOR) "
                        "alike (0: unlimited)")
    p.add_argument("--marker-interval", type=float, default=5.0, help="seconds between 111/112 markers")
    s = p.add_argument_group("sessions", "bounds on sessions (docs/gridftp.md, \"Security\")")
    s.add_argument("--max-sessions", type=int, default=64, metavar="N", help="control connections at once (default 64)")
    s.add_argument("--max-sessions-per-identity", type=int, metavar="N",
                   help="logged-in sessions of one user identity (default: --max-sessions / 8)")
    s.add_argument("--max-sessions-per-address", type=int, metavar="N",
                   help="logged-in user sessions from one address, anonymous ones too (default: --max-sessions / 4)")
    s.add_argument("--host-sessions", type=int, metavar="N",
                   help="sessions kept for host identities (CN=host/NAME); users together get --max-sessions less "
                        "these (default: --max-sessions / 4)")
    s.add_argument("--transfer-idle-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a logged-in session with no transfer for this long is closed, NOOPs notwithstanding "
                        "(default 60; 0: no such bound)")
    s.add_argument("--guest-dn", action="append", default=None, metavar="PATTERN",
                   help="DN pattern of guest containers' certificates (repeatable; default "
                        "\"/O=Grid/OU=vmgrid-guests/*\", the default [vmmanager] guest_ou): they end in CN=host/ADDRESS "
                        "but count as users, not hosts; give your site's guest_ou as \"/O=Grid/OU=<guest_ou>/*\"")
    s.add_argument("--refuse-guests", action="store_true",
                   help="a login whose DN matches a --guest-dn pattern is refused outright (530, then closed), as the "
                        "repository's face and a node's migration export refuse guest containers; by default guests "
                        "log in as users")
    s.add_argument("--passive-per-identity", type=int, default=2, metavar="N",
                   help="passive data ports (PASV/EPSV/SPAS) no data connection has reached yet that one user identity "
                        "may hold across its sessions; a further one gets 425 naming the bound (default 2; hosts not "
                        "counted)")
    s.add_argument("--passive-wait", type=float, default=10.0, metavar="SECONDS",
                   help="a passive data port no data command takes up within this long is closed (default 10; 0: "
                        "never)")
    p.add_argument("--data-ports", metavar="LOW,HIGH",
                   help="accept data connections (PASV/EPSV/SPAS) only on ports LOW to HIGH, for a site firewall "
                        "(default: $GLOBUS_TCP_PORT_RANGE, as Globus reads it, else any free port); the control "
                        "port is --port")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_server)


# -- vmgrid transfer --------------------------------------------------------------------------------------
def _is_url(text: str) -> bool:
    return text.lower().startswith(SCHEMES)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A one-line progress bar on a stream: percent, bytes, rate (over the last seconds) and ETA."""

    WIDTH = 28

    def __init__(self, stream, label: str):
        from services.common.errors import printable

        self.stream = getattr(stream, "unfiltered", stream)     # its own carriage returns, not escaped
        self.label = printable(label, 200)
        self.started = time.monotonic()
        self._samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self.drawn = False

    def rate(self) -> float:
        """Bytes per second over the last three seconds."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, done: int, total: int) -> str:
        frac = done / total if total else 1.0
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        rate = self.rate()
        eta = _duration((total - done) / rate) if rate > 0 and done < total else "--:--"
        return (f"{self.label} [{bar}] {frac * 100:5.1f}% {_human(done)}/{_human(total)} "
                f"{rate * 8 / 1e6:7.1f} Mbit/s ETA {eta}")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > 3.0:
                self._samples.pop(0)
            if now - self._last_draw < 0.2 and done < total:
                return
            self._last_draw = now
            self.stream.write("\r" + self.line(done, total))
            self.stream.flush()
            self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _credential(args):
    if not args.proxy:
        return None
    from security.pki import CredentialError, load_credential
    try:
        return load_credential(proxy=args.proxy)
    except CredentialError as exc:
        raise CLIError(str(exc)) from exc


def _expired_credential(args) -> str:
    """Why a server refused the credential, when it is that the credential expired (looked at only then: the
    server's TLS alert does not say it in one way)."""
    import datetime as dt

    from security.pki import PKIError, load_credential

    try:
        cred = load_credential(proxy=args.proxy) if args.proxy else load_credential()
    except PKIError:
        return ""
    now = dt.datetime.now(dt.timezone.utc)
    for cert in (cred.certificate, *cred.chain):
        if cert.not_valid_after_utc <= now:
            which = "proxy" if cert is cred.certificate and cred.chain else "certificate"
            return (f": your {which} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: make a new proxy "
                    f"with `vmgrid proxy-init` (or grid-proxy-init)")
    return ""


def _mismatch_hint(args, *, upload: bool, download: bool) -> str:
    """What to do after a failed verification: nothing of the transfer was kept to resume from (a wrong digest
    or wrong bytes), so the command run again starts afresh; with the digest the user gave, check it."""
    given = "--blake3" if download and args.blake3 else "--sha256" if args.sha256 else ""
    if given:
        without = "the file's own is then computed" if upload else "the source's is then asked"
        return (f"; nothing of it is kept: check {given} and run the command again with the right digest "
                f"(or without {given}: {without})")
    return "; nothing of it is kept: the same command run again transfers the file afresh"


def cmd_transfer(args) -> int:
    from . import transfer

    DELEGATE_FULL = "full"      # security.gsi.DELEGATE_FULL (not imported: the command starts without cryptography)

    src, dst = args.src, args.dst
    if not _is_url(src) and not _is_url(dst):
        raise CLIError("one of SRC and DST must be an ftp:// or gsiftp:// URL")
    if args.parallel < 1 or args.parallel > 64:
        raise CLIError("-p must be between 1 and 64")
    name = os.path.basename(src.rstrip("/").split("?", 1)[0]) or "file"
    if _is_url(dst) and dst.endswith("/"):
        dst += name
    elif not _is_url(dst) and Path(dst).is_dir():
        dst = str(Path(dst) / name)
    if not 0 < args.timeout <= 86400 or args.retries < 0:
        raise CLIError("--timeout is seconds, more than 0 and at most a day; --retries 0 or more")
    if not _is_url(src) and not Path(src).is_file():
        raise CLIError(f"{src}: no such file")
    if not _is_url(dst) and not Path(dst).parent.is_dir():      # as cp does: a mistyped path makes no folders
        raise CLIError(f"{dst}: no directory {Path(dst).parent} (create it first)")
    if not _is_url(dst) and os.path.lexists(dst) and not args.overwrite:   # unlike globus-url-copy: data is not lost
        raise CLIError(f"{dst} exists: nothing transferred (give --overwrite to replace it)")
    again = ""
    if _is_url(src) and not _is_url(dst):
        again = "run the same command again: it fetches only the bytes still missing"
    elif _is_url(dst) and not _is_url(src):
        again = ("run the same command again: it sends only what the server has not confirmed (its restart markers, "
                 "every few seconds)")
    args.interrupt_note = again or None
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = ProgressBar(sys.stderr, name[:24]) if show else None
    # AUTH TLS (nothing of the user's is lent to the server), or with --gsi AUTH GSSAPI, which lends the server a
    # limited proxy: the user's choice, never taken on a server's 504 (a VM owner's job service face answering 504
    # got a proxy of whoever followed `vmgrid job info`'s advice: attack16 G2)
    common = dict(credential=_credential(args), trust=args.cert_dir, progress=bar, retries=args.retries,
                  gsi=bool(args.gsi), prot=args.prot, timeout=args.timeout,
                  delegate=DELEGATE_FULL if args.full_delegation else True)
    try:
        if _is_url(src) and _is_url(dst):
            result = transfer.third_party(src, dst, args.parallel, sha256=args.sha256,
                                          state_dir=args.state_dir, **common)
        elif _is_url(src):
            result = transfer.download(src, dst, args.parallel, sha256=args.sha256, blake3=args.blake3,
                                       checksum=args.checksum, **common)
        else:
            result = transfer.upload(src, dst, args.parallel, sha256=args.sha256, state_dir=args.state_dir,
                                     **common)
    except GridFTPError as exc:
        if bar is not None:
            bar.finish()
        # a transfer cut short (the connection lost, a server gone or busy) resumes as after Ctrl-C: say so; not
        # for this side's own disk (full, read-only), which the same command alone does not mend
        hint = f"; {again}" if again and transfer._retryable(exc) and not getattr(exc, "local", False) else ""
        if "no free data port" in str(exc):     # the server's data ports all taken: its operator's, not a resume's
            hint = ""
        if isinstance(exc, ChecksumMismatch):
            hint = _mismatch_hint(args, upload=_is_url(dst) and not _is_url(src), download=not _is_url(dst))
        if isinstance(exc, GSIOnlyServer):
            hint = GSI_HINT
        raise CLIError(f"{exc}{_expired_credential(args) if 'refused the credential' in str(exc) else ''}{hint}") \
            from exc
    except OSError as exc:
        if bar is not None:
            bar.finish()
        raise CLIError(f"{exc.filename}: {exc.strerror}" if exc.filename else f"{exc.strerror or exc}") from exc
    if bar is not None:
        bar.finish()
    reused = f", {_human(result.bytes_reused)} resumed from an earlier attempt" if result.bytes_reused else ""
    repaired = f", {_human(result.repaired_bytes)} re-fetched after a checksum mismatch" if result.repaired_bytes else ""
    print(f"{result.source} -> {result.destination}")
    print(f"{_human(result.size)} in {result.seconds:.2f} s ({result.mbit_per_s:.1f} Mbit/s), "
          f"{result.parallelism} streams, {result.attempts} attempt(s){reused}{repaired}")
    print(f"{result.verified_with} verified")
    return 0


# what a server refusing AUTH TLS (504) gets said: --gsi lends it a proxy of the user's, which only she may decide
GSI_HINT = ("; nothing was lent to it or transferred. To log in with GSI add --gsi: that lends the server a limited "
            "proxy of yours (it may then act as you at other GridFTP servers until the proxy ends), so only for a "
            "server you trust (a site's storage, not a VM's job service)")


# -- vmgrid gridftp-server --------------------------------------------------------------------------------
def cmd_server(args) -> int:
    import logging
    import signal

    from .server import DEFAULT_GUESTS, SESSION_LIMITS, GridFTPServer, check_session_limits, is_host_dn

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port is 0 to 65535 (0 picks a free one), not {args.port}")
    if not args.max_rate >= 0 or not args.marker_interval > 0:
        raise CLIError("--max-rate is bytes a second, 0 (unlimited) or more; --marker-interval seconds, more than 0")
    from .datachannel import PORT_RANGE_ENV, PORT_RANGE_FORM, data_port_range, parse_port_range
    try:
        if args.data_ports is not None:
            if parse_port_range(args.data_ports, "--data-ports") is None:
                raise ValueError(f"--data-ports: {PORT_RANGE_FORM}")
            os.environ[PORT_RANGE_ENV] = args.data_ports    # this process's listeners (datachannel.open_listener)
            from .datachannel import name_port_range
            name_port_range(args.data_ports, "--data-ports")    # a full range's 425 names the option
        data_port_range()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    limits = {key: getattr(args, key) for key in SESSION_LIMITS}
    try:
        check_session_limits(limits, {key: "--" + key.replace("_", "-") for key in SESSION_LIMITS})
        guests = tuple(args.guest_dn) if args.guest_dn is not None else DEFAULT_GUESTS
        is_host_dn(None, guests)        # a pattern that is no DN: refused before anything starts
    except ValueError as exc:
        raise CLIError(str(exc).replace("guest DN pattern", "--guest-dn")) from None
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    credential = None
    if not args.no_tls:
        from security.pki import CredentialError, load_host_credential
        if args.cert or os.path.exists("/etc/grid-security/hostcert.pem") or os.environ.get("X509_USER_CERT"):
            try:
                credential = load_host_credential(args.cert, args.key)
            except CredentialError as exc:
                raise CLIError(str(exc)) from exc
    if credential is None and not args.anonymous:
        raise CLIError("no host credential (--cert/--key) and no --anonymous: nobody could log in")
    allowed = set(args.allow_dn)
    authorize = (lambda dn, op, path: dn is None or dn in allowed) if allowed else None
    try:
        server = GridFTPServer(args.root, args.host, args.port, credential=credential, trust=args.cert_dir,
                               authorize=authorize, anonymous=args.anonymous, upload_area=args.upload_area,
                               insecure_anonymous_writes=args.insecure_anonymous_writes,
                               max_rate=args.max_rate, marker_interval=args.marker_interval,
                               data_peers=args.data_peer, gridmap=args.grid_mapfile, guests=guests,
                               refuse_guests=args.refuse_guests, **limits)
        server.bind()
    except OSError as exc:
        what = (f"{exc.filename}: {exc.strerror}" if exc.filename else      # the root, a grid-mapfile; else the address
                f"{args.host}:{args.port}: {exc.strerror or exc}")
        raise CLIError(f"cannot start the server: {what}") from None
    except (GridFTPError, ValueError) as exc:
        raise CLIError(f"cannot start the server: {exc}") from None
    print(f"{server.port}", flush=True)
    print(f"gridftp-server serving {args.root} at {server.url('/')}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: server.stop())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
