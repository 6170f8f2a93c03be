"""The GridFTP server: RFC 959 control channel with the GridFTP extensions of GFD.20.

One thread per control connection, secured by AUTH TLS (RFC 4217) or AUTH GSSAPI with the Globus
GSI mechanism (RFC 2228, :mod:`security.gsi`). Every path is authorized for the session's identity (the
end-entity DN of its client certificate or proxy, or None for an anonymous session) by a callback
``authorize(dn, op, path)`` with ``op`` one of ``read``, ``list``, ``write``, ``delete``.
Files being received are written beside their final name and take it only when complete and
verified (:mod:`gridftp.partial`).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import posixpath
import re
import socket
import ssl
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from security.gsi import GSIContext, GSIError

from .checksum import ALGORITHMS as CHECKSUM_ALGORITHMS, hash_fd, hash_file
from .control import ControlChannel, LineTooLong
from .datachannel import (ACCEPT_TIMEOUT, Counter, ModeEReceiver, ModeESender, Throttle, Worker, accept_connections,
                          accept_one, close_all, close_cached, connect_streams, open_listener, receive_stream,
                          send_stream, shutdown_listener)
from .datachannel import NoFreeDataPort
from .errors import (AuthenticationError, ChecksumMismatch, GridFTPError, PathError, ProtocolError, SizeLimitExceeded,
                     TransferError)
from .filespace import (PART_SUFFIX, SIDECAR_SUFFIX, FileSpace, LocalFileSpace, has_control, is_internal,
                        normalize)
from .gridmap import DNSet, GridMap, dn_key
from .partial import PartialFile
from .protocol import (MAX_PARALLELISM, RetrOptions, format_host_port, format_mdtm,
                       format_perf_marker, parse_eprt, parse_host_port, parse_retr_options, split_command)
from .gsidata import GSIData, tls_config as gsi_tls_config
from .ranges import MAX_OFFSET, RangeSet
from .tls import Credential, DataTLS, TLSConfig, TrustStore

log = logging.getLogger("gridftp.server")

Authorize = Callable[[str | None, str, str], bool]
OPS = ("read", "list", "write", "delete")
ACTIVE_CONNECT_FAILED = "Cannot open data connection."
ANONYMOUS_NAMES = ("anonymous", "ftp")
PRE_LOGIN = {"USER", "PASS", "AUTH", "PBSZ", "PROT", "FEAT", "HELP", "SYST", "NOOP", "QUIT", "CCC",
             "ADAT", "ACCT", "OPTS", "SITE", "DCAU"}
PROTECTED_VERBS = ("MIC", "ENC", "CONF")      # RFC 2228 commands carrying a wrapped command
FEATURES = [
    "PARALLEL", "SIZE", "MDTM", "REST STREAM", "ERET", "ESTO",
    "SPAS", "SPOR", "SBUF", "EPSV", "EPRT", "UTF8",
    "CKSM " + "".join(f"{a}:10;" for a in CHECKSUM_ALGORITHMS),
    "MLST type*;size*;modify*;perm*;",
]
# the commands that use the data connection set up by PASV/EPSV/SPAS or PORT/EPRT/SPOR
DATA_VERBS = {"RETR", "ERET", "STOR", "ESTO", "LIST", "NLST", "MLSD"}
# the commands that keep a logged-in session from being idle (``transfer_idle_timeout``): a NOOP or a SIZE does not
WORK_VERBS = DATA_VERBS | {"CKSM"}
_HOST_DN = re.compile(r"/CN=host/[^/=]+$")
_RANGE_FULL = {"logged": -1e9, "since": 0}     # the last warning of a full data port range, passive opens refused since
# a passive data port (PASV/EPSV/SPAS) no data command has taken up within this many seconds is closed: a client
# sends its RETR/STOR within a round trip of the 227/229 (vmgrid's and globus-url-copy alike), so only a session
# holding ports of the data port range waits longer (attack15 H4); the data command's own wait is accept_timeout
PASSIVE_WAIT = 10.0
# the passive data ports one identity may hold at once across its sessions with no data connection reached yet; a
# PASV past them waits up to PASSIVE_GRACE seconds for one of them to be reached before it is refused
PASSIVE_PER_IDENTITY = 2
PASSIVE_GRACE = 2.0


def _warn_range_full(what: str) -> None:
    """A PASV/EPSV refused for a full data port range, in the server's log (its operator can widen the range) at most
    once a minute: a client may fill the range at will."""
    now = time.monotonic()
    _RANGE_FULL["since"] += 1
    if now - _RANGE_FULL["logged"] >= 60:
        log.warning("%s: %d passive data connection(s) refused (425) since the last such warning; widen the range if "
                    "this recurs", what, _RANGE_FULL["since"])
        _RANGE_FULL.update(logged=now, since=0)
# guests' certificates, whose keys VM owners hold: vmgrid's default [vmmanager] guest_ou (and guest_dns, [policy] guests)
DEFAULT_GUESTS = ("/O=Grid/OU=vmgrid-guests/*",)


def _guest_matchers(guests: Iterable[str]) -> tuple[re.Pattern, ...]:
    """Each DN pattern (``/O=Grid/OU=site-guests/*``; a ``*`` stands for any characters, '/' included) as a
    regular expression over :func:`~gridftp.gridmap.dn_key`, so that a DN in other letters is still a guest's; a
    pattern that is no DN raises ValueError."""
    out = []
    for pattern in guests:
        if not isinstance(pattern, str) or not pattern.startswith("/") or "=" not in pattern:
            raise ValueError(f"guest DN pattern {pattern!r} is not a DN pattern (e.g. \"/O=Grid/OU=site-guests/*\")")
        out.append(re.compile(".*".join(re.escape(part) for part in dn_key(pattern).split("*")), re.DOTALL))
    return tuple(out)


_DEFAULT_GUEST_MATCHERS = _guest_matchers(DEFAULT_GUESTS)


def is_host_dn(dn: str | None, guests: Iterable[str] = DEFAULT_GUESTS) -> bool:
    """Whether ``dn`` is a host's end-entity DN (``/O=Grid/OU=site/CN=host/node1.example.org``): a node or a
    service, whose sessions are kept room for (:class:`GridFTPServer`'s ``host_sessions``). A guest container's
    certificate (``/O=Grid/OU=vmgrid-guests/CN=host/ADDRESS`` under the default ``guest_ou``; ``guests``: the site's
    DN patterns of them) is a user's, not a host's."""
    return _is_host(dn, _DEFAULT_GUEST_MATCHERS if guests is DEFAULT_GUESTS else _guest_matchers(guests))


def _is_host(dn: str | None, guest_matchers: tuple[re.Pattern, ...]) -> bool:
    if dn is None or _HOST_DN.search(dn) is None:
        return False
    key = dn_key(dn)
    return not any(m.fullmatch(key) for m in guest_matchers)


# the bounds on sessions (GridFTPServer's keywords): what each may be, given max_sessions
SESSION_LIMITS = ("max_sessions", "max_sessions_per_identity", "max_sessions_per_address", "host_sessions",
                  "transfer_idle_timeout", "passive_per_identity", "passive_wait")


def check_session_limits(values: dict, names: dict[str, str] | None = None) -> None:
    """Each of :data:`SESSION_LIMITS` given in ``values`` (None or missing: its default) within what it may be, or a
    ValueError in one line naming it as ``names`` says (a command line flag, a configuration key; default the
    keyword): ``--host-sessions is 0 to 63 (--max-sessions less one: users need one), not 64``."""
    def name(key: str) -> str:
        return (names or {}).get(key, key)

    def whole(key: str, low: int, high: int | None, why: str = "") -> None:
        value = values.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            rule = f"{low} or more" if high is None else f"{low} to {high}"
            raise ValueError(f"{name(key)} is {rule}{why}, not {value!r}")

    whole("max_sessions", 1, None, " (control connections at once)")
    most = values.get("max_sessions") or 64
    whole("max_sessions_per_identity", 1, most, f" (at most {name('max_sessions')})")
    whole("max_sessions_per_address", 1, most, f" (at most {name('max_sessions')})")
    whole("host_sessions", 0, most - 1, f" ({name('max_sessions')} less one: users need one)")
    whole("passive_per_identity", 1, None, " (passive data ports one identity may hold that no data connection has "
                                           "reached)")

    def seconds(key: str, zero: str) -> None:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < float("inf")):
            raise ValueError(f"{name(key)} is seconds, 0 ({zero}) or more, not {value!r}")

    seconds("transfer_idle_timeout", "no such bound")
    seconds("passive_wait", "an untaken passive data port is never closed")


class _Reply(Exception):
    """Raised by a handler to answer with a negative (or any) reply and stop."""

    def __init__(self, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class _ChecksumCache:
    """Checksums of unchanged files, keyed by inode, size and modification time."""

    def __init__(self, capacity: int = 4096):
        self._items: OrderedDict[tuple, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: str) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


def _cache_key(st: os.stat_result, algorithm: str, offset: int, length: int) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, algorithm, offset, length)


class GridFTPServer:
    """A GridFTP server over a :class:`~gridftp.filespace.FileSpace`.

    ``root_or_vfs``: a directory (served as ``/``) or a :class:`FileSpace`.
    ``credential``/``trust``: the host credential and trusted CAs; with them the server offers
    ``AUTH TLS`` and requires a client certificate (a user certificate or an RFC 3820 proxy).
    ``authorize(dn, op, path) -> bool``: the path authorization callback (default: allow).
    ``anonymous``: accept ``USER anonymous`` without TLS, read-only.
    ``upload_area``: the virtual directory writes are confined to (None: read-only server).
    ``insecure_anonymous_writes``: TEST ONLY; lets anonymous sessions write inside the upload
    area (the interop tests upload with ``globus-url-copy ftp://``). Never enable it in service.
    ``max_rate``: bytes/s per transfer, sent or received (0 = unlimited). ``marker_interval``: seconds between
    ``111``/``112`` markers. ``require_private_data``: TLS sessions must use ``PROT P``.
    ``max_file_size``: no received byte may land beyond it (ALLO above it gets 552).
    ``data_peers``: addresses or networks (``"192.0.2.7"``, ``"10.1.0.0/16"``) this server may open
    data connections to besides the control connection's own peer: the trusted servers of
    third-party transfers. Anything else in PORT/EPRT/SPOR is refused (no FTP bounce, no port scan). The same
    set may connect to a passive data port when no identity is checked there (``DCAU N``, anonymous sessions).
    ``accept_timeout``: seconds a passive data port waits for a data connection that proves itself; others
    (a failed TLS handshake or DCAU check, an address not allowed) are dropped and logged meanwhile.
    ``gsi``: with a credential, also offer ``AUTH GSSAPI`` (the Globus GSI mechanism, :mod:`security.gsi`).
    ``gridmap``: a Globus grid-mapfile (path) or a set of DNs; only those DNs may log in, compared as Globus
    compares them (:func:`gridftp.gridmap.dn_key`: ASCII case ignored, ``UID``/``E``/``Email`` aliases) (None: any
    trusted DN, the path rules decide). ``accept_limited_proxies``: False refuses limited proxies.
    ``max_quota_names``: the most files and directories a quota's directory (:meth:`FileSpace.quota`) may hold
    (empty files cost no bytes but an inode each). ``max_sessions``: control connections at once. Of them, at most ``max_unauthenticated_per_host`` (default
    ``max_sessions // 4``) from one address (grouped as :func:`_address_group` groups them: all of loopback
    one, an IPv6 /64 one) may be not yet logged in, and a session not logged in within
    ``login_timeout`` seconds is closed (421, also while a line trickles in), so a host whose connections never
    authenticate cannot hold every session and keep the users out.
    Logged-in sessions: one identity may hold at most ``max_sessions_per_identity`` (default ``max_sessions // 8``)
    and one address at most ``max_sessions_per_address`` (default ``max_sessions // 4``; anonymous sessions count
    here only), and users together at most ``max_sessions - host_sessions`` (default ``max_sessions // 4`` kept for
    host identities, ``host_identity(dn)``, by default :func:`is_host_dn` with ``guests``: the nodes staging images
    and migrating, which none of these per-user bounds apply to); the login past a bound gets ``421`` naming it and
    is closed. ``guests``: DN patterns of guest containers' certificates (``/O=Grid/OU=<guest_ou>/*``, default
    :data:`DEFAULT_GUESTS`, vmgrid's default ``guest_ou``): they end in ``CN=host/ADDRESS`` but a VM's owner holds
    their keys, so they count as users; ``refuse_guests``: a DN matching ``guests`` may not log in at all (``530``,
    the session then closed): a server where guests have no rights (the repository's, a node's migration export).
    A bound out of its range, or a pattern that is no DN, raises ValueError (:func:`check_session_limits`).
    Logged-in sessions are counted per address as :func:`_address_group` groups them: an IPv4 address, but all of
    loopback (127.0.0.0/8: any local account may bind any of it) as one, and an IPv6 peer by its /64 (one host).
    A logged-in session with no transfer (a data command or a CKSM) for ``transfer_idle_timeout`` seconds (default
    60; 0: only ``idle_timeout``) is closed (421), NOOPs notwithstanding: vmgrid's clients and globus-url-copy send
    their next command within a round trip, so only a session held open waits that long.
    Passive data ports (PASV/EPSV/SPAS), each a port of the data port range (``GLOBUS_TCP_PORT_RANGE``, ``[gridftp]
    data_ports``): one identity (not a host's) may hold at most ``passive_per_identity`` (default 2) across its
    sessions that no data connection has reached yet (a further one, after :data:`PASSIVE_GRACE`, is refused 425
    naming the bound), and one that no data command takes up within ``passive_wait`` seconds (default 10; 0: never)
    is closed, so that one user cannot hold a narrow range and turn the others' uploads away (attack15 H4). A
    passive port kept after a MODE E upload for the next one over the cached connections counts the same until a
    data command takes it up, and closes with them after ``passive_wait`` seconds (:data:`PASSIVE_GRACE` past the
    bound) rather than :data:`DATA_CACHE_IDLE` (attack16 G4).
    """

    def __init__(self, root_or_vfs: str | os.PathLike | FileSpace, host: str = "127.0.0.1", port: int = 0,
                 *, credential: Credential | None = None, trust: TrustStore | str | None = None,
                 authorize: Authorize | None = None, anonymous: bool = False, upload_area: str | None = None,
                 insecure_anonymous_writes: bool = False, max_rate: float = 0, marker_interval: float = 5.0,
                 require_private_data: bool = True, durable: bool = True, max_sessions: int = 64,
                 max_file_size: int = 1 << 40, idle_timeout: float = 900.0, login_timeout: float = 60.0,
                 max_unauthenticated_per_host: int | None = None, max_quota_names: int = 1000,
                 max_sessions_per_identity: int | None = None, max_sessions_per_address: int | None = None,
                 host_sessions: int | None = None, host_identity: Callable[[str | None], bool] | None = None,
                 transfer_idle_timeout: float = 60.0, guests: Iterable[str] = DEFAULT_GUESTS,
                 refuse_guests: bool = False,
                 identify: Callable[[ssl.SSLSocket], str] | None = None,
                 data_peers: Iterable[str] = (), accept_timeout: float = ACCEPT_TIMEOUT, gsi: bool = True,
                 gridmap: str | os.PathLike | set[str] | None = None, accept_limited_proxies: bool = True,
                 passive_per_identity: int = PASSIVE_PER_IDENTITY, passive_wait: float = PASSIVE_WAIT,
                 banner: str = "vmgrid GridFTP server ready."):
        check_session_limits(dict(max_sessions=max_sessions, max_sessions_per_identity=max_sessions_per_identity,
                                  max_sessions_per_address=max_sessions_per_address, host_sessions=host_sessions,
                                  transfer_idle_timeout=transfer_idle_timeout,
                                  passive_per_identity=passive_per_identity, passive_wait=passive_wait))
        self.guests = (guests,) if isinstance(guests, str) else tuple(guests)
        matchers = _guest_matchers(self.guests)     # a pattern that is no DN: refused here, not at a login
        self.files = root_or_vfs if isinstance(root_or_vfs, FileSpace) else LocalFileSpace(root_or_vfs)
        self.host = host
        self._requested_port = port
        self.tls = TLSConfig(credential, trust, identify=identify) if credential is not None else None
        self.authorize_cb = authorize
        self.anonymous = anonymous
        self.upload_area = normalize("/", upload_area) if upload_area is not None else None
        self.insecure_anonymous_writes = insecure_anonymous_writes
        self.max_rate = max_rate
        self.marker_interval = marker_interval
        self.require_private_data = require_private_data
        self.durable = durable
        self.max_sessions = max_sessions
        self.max_file_size = max_file_size
        self.idle_timeout = idle_timeout
        self.login_timeout = login_timeout
        self.max_quota_names = max_quota_names
        self.max_unauthenticated_per_host = max(1, max_sessions // 4 if max_unauthenticated_per_host is None
                                                else max_unauthenticated_per_host)
        self.max_sessions_per_identity = max(1, max_sessions // 8 if max_sessions_per_identity is None
                                             else max_sessions_per_identity)
        self.max_sessions_per_address = max(1, max_sessions // 4 if max_sessions_per_address is None
                                            else max_sessions_per_address)
        self.host_sessions = min(max_sessions - 1, max(0, max_sessions // 4 if host_sessions is None
                                                       else host_sessions))
        self.host_identity = host_identity or (lambda dn: _is_host(dn, matchers))
        self._guest_matchers = matchers
        self.refuse_guests = refuse_guests
        self.transfer_idle_timeout = transfer_idle_timeout
        self.banner = banner
        self.data_peers = [ipaddress.ip_network(p, strict=False) for p in data_peers]
        self.accept_timeout = accept_timeout
        self.gsi = gsi and self.tls is not None
        self.gridmap = (None if gridmap is None else DNSet(gridmap) if isinstance(gridmap, (set, frozenset))
                        else GridMap(gridmap))
        self.accept_limited_proxies = accept_limited_proxies
        self.passive_per_identity = passive_per_identity
        self.passive_wait = passive_wait
        self.checksums = _ChecksumCache()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._sessions: set[_Session] = set()
        self._receiving: set[str] = set()      # virtual paths a session is storing right now
        # (quota directory, file name, the store's own token): bytes granted to a store in progress
        self._granted: dict[tuple[Path, str, object], int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._hashers: dict[str, list] = {}          # identity -> [its CKSM lock, sessions using it]
        self._hash_slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("server not started")
        return self._listener.getsockname()[1]

    def url(self, path: str = "/") -> str:
        scheme = "gsiftp" if self.tls is not None else "ftp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(64)
        self._listener = sock

    def start(self) -> "GridFTPServer":
        """Listen and serve in a background thread; returns self."""
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="gridftp-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("accept failed: %s", exc)     # e.g. out of file descriptors: keep serving
                time.sleep(0.1)
                continue
            group = _address_group(peer[0])     # all of loopback one, an IPv6 /64 one: as logged-in sessions count
            with self._lock:
                waiting = sum(1 for s in self._sessions if not s.logged_in and _address_group(s.peer[0]) == group)
                busy = len(self._sessions) >= self.max_sessions or waiting >= self.max_unauthenticated_per_host
            if busy:
                try:
                    conn.sendall(b"421 Too many sessions; try again later.\r\n")
                finally:
                    conn.close()
                continue
            session = _Session(self, conn, peer)
            with self._lock:
                self._sessions.add(session)
            threading.Thread(target=session.run, name=f"gridftp-session-{peer[1]}", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting, close every session and its data connections."""
        self._stopping.set()
        if self._listener is not None:
            shutdown_listener(self._listener)
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def claim(self, vpath: str) -> bool:
        """Reserve a path for one receiving session; False if another session is storing it."""
        with self._lock:
            if vpath in self._receiving:
                return False
            self._receiving.add(vpath)
            return True

    def release(self, vpath: str) -> None:
        with self._lock:
            self._receiving.discard(vpath)

    def grant(self, vpath: str, real: Path, wanted: int | None, limit: int) -> "Grant | None":
        """Reserve room for storing ``vpath`` (at ``real``) within its quota (:meth:`FileSpace.quota`): ``wanted``
        bytes (its ALLO size), or, not announced, all the quota leaves. The files of the quota's directory
        count at their size, except ``real``'s own (it is being replaced) and those another store is
        receiving, which count at what was granted to it. None when ``vpath`` has no quota; raises
        :class:`QuotaExceeded` when the room is not there (before a byte is written)."""
        q = self.files.quota(vpath)
        if q is None:
            return None
        area, quota = q
        name = real.name
        with self._lock:
            receiving = {n for (a, n, _) in self._granted if a == area}
            used = sum(g for (a, _, _), g in self._granted.items() if a == area)
            try:
                entries = list(os.scandir(area))
            except FileNotFoundError:
                entries = []
            for entry in entries:
                base = entry.name.removesuffix(SIDECAR_SUFFIX).removesuffix(PART_SUFFIX)
                if base == name or base in receiving:
                    continue
                try:
                    used += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
            room = quota - used
            advice = dict(advice=self.files.quota_advice, too_small=self.files.quota_too_small)
            if (wanted is None and room <= 0) or (wanted is not None and wanted > room):
                raise QuotaExceeded(quota, used, wanted, **advice)
            names = {e.name.removesuffix(SIDECAR_SUFFIX).removesuffix(PART_SUFFIX) for e in entries} | receiving
            if name not in names and len(names) >= self.max_quota_names:
                raise QuotaExceeded(quota, used, wanted, names=self.max_quota_names, **advice)
            granted = min(room if wanted is None else wanted, limit)
            key = (area, name, object())       # ESTOs of one file from several sessions: one grant each
            self._granted[key] = granted
        return Grant(self, key, quota, used, granted)

    @contextmanager
    def hashing(self, who: str) -> Iterator[None]:
        """A CKSM's hashing: one at a time per identity, and at most one per CPU in all, so that one user's
        sessions asking CKSMs of large ranges at once wait for each other instead of taking every CPU."""
        with self._lock:
            mine = self._hashers.setdefault(who, [threading.Lock(), 0])
            mine[1] += 1
        try:
            with mine[0], self._hash_slots:
                yield
        finally:
            with self._lock:
                mine[1] -= 1
                if mine[1] == 0:
                    del self._hashers[who]

    def log_in(self, session: "_Session", dn: str | None) -> str | None:
        """Mark ``session`` logged in as ``dn`` (None: anonymous) unless that passes a bound on logged-in sessions;
        else the 421 text that names the bound (the session is then closed)."""
        with self._lock:
            if not self.host_identity(dn):
                users = [s for s in self._sessions if s.logged_in and not self.host_identity(s.dn)]
                address = _address_group(session.peer[0])
                if dn is not None and sum(1 for s in users if s.dn == dn) >= self.max_sessions_per_identity:
                    return (f"Too many sessions for {dn}: at most {self.max_sessions_per_identity} logged in at "
                            f"once per identity; end one, or try again later.")
                if sum(1 for s in users if _address_group(s.peer[0]) == address) >= self.max_sessions_per_address:
                    return (f"Too many sessions from {_address_label(address)}: at most {self.max_sessions_per_address} logged in "
                            f"at once per address; end one, or try again later.")
                if len(users) >= self.max_sessions - self.host_sessions:
                    return (f"Too many sessions: the users' {self.max_sessions - self.host_sessions} are in use (the "
                            f"other {self.host_sessions} are kept for hosts); try again later.")
            session.dn = dn
            session.logged_in = True
        return None

    def passive_room(self, session: "_Session", grace: float = PASSIVE_GRACE) -> str | None:
        """Reserve a passive data port for ``session`` (its :attr:`_DataSetup.unreached`) unless its identity holds
        ``passive_per_identity`` already that no data connection has reached, across its sessions (a listener kept
        after an upload and not yet taken up by a data command counts too: attack16 G4); else the 425 text naming
        the bound. At the bound it waits up to ``grace`` (:data:`PASSIVE_GRACE`) seconds for one of them to be
        reached first: a client's concurrent transfers (globus-url-copy -cc) each hold theirs for a round trip only.
        Host identities (nodes, services) and anonymous sessions (bounded per address) are not counted."""
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                dn = session.dn
                held = 0
                if dn is not None and not self.host_identity(dn):
                    held = sum(1 for s in self._sessions if s is not session and s.dn == dn and s.data.unreached)
                if held < self.passive_per_identity:
                    session.data.unreached = True
                    return None
            if time.monotonic() >= deadline or self._stopping.is_set():
                return (f"Cannot open a passive data port: {dn} holds {held} already that no data connection has "
                        f"reached, at most {self.passive_per_identity} per identity across its sessions: use them "
                        f"(send the data command) or end those sessions first.")
            time.sleep(0.05)

    def _forget(self, session: "_Session") -> None:
        with self._lock:
            self._sessions.discard(session)

    def __enter__(self) -> "GridFTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- policy ------------------------------------------------------------------------------------
    def allowed(self, dn: str | None, op: str, vpath: str) -> bool:
        if self.authorize_cb is None:
            return True
        try:
            return bool(self.authorize_cb(dn, op, vpath))
        except Exception:  # a broken policy denies
            log.exception("authorization callback failed for %s %s %s", dn, op, vpath)
            return False

    def may_connect(self, control_peer: str, host: str) -> bool:
        """May a session whose control connection comes from ``control_peer`` have this server
        open data connections to ``host``? Only to that peer itself or to a configured trusted server."""
        try:
            target = _plain_address(host)
        except ValueError:
            return False
        if target == _plain_address(control_peer):
            return True
        return any(target.version == net.version and target in net for net in self.data_peers)

    def is_guest(self, dn: str | None) -> bool:
        """Whether ``dn`` matches one of ``guests`` (a guest container's certificate, or a proxy of one)."""
        if dn is None:
            return False
        key = dn_key(dn)
        return any(m.fullmatch(key) for m in self._guest_matchers)

    def accepts(self, dn: str) -> str | None:
        """None if ``dn`` may log in here, else why not."""
        if self.gridmap is not None and dn not in self.gridmap:
            return f"{dn} is not in this server's grid-mapfile"
        return None

    def in_upload_area(self, vpath: str) -> bool:
        area = self.upload_area
        if area is None:
            return False
        return area == "/" or vpath == area or vpath.startswith(area + "/")


class QuotaExceeded(Exception):
    """A store the quota of its directory has no room for (552): bytes, or names (``names``: the most it holds).
    ``advice`` and ``too_small`` (the file space's :attr:`FileSpace.quota_advice` and ``quota_too_small``) say what
    to do: make room, or, for a file larger than the whole quota, which no deletion makes room for, ask for more."""

    def __init__(self, quota: int, used: int, wanted: int | None, *, names: int | None = None,
                 advice: str = FileSpace.quota_advice, too_small: str = FileSpace.quota_too_small):
        self.quota, self.used, self.wanted = quota, used, wanted
        need = f"{wanted} bytes" if wanted is not None else "more bytes"
        if names is not None:
            super().__init__(f"Upload quota exceeded: this directory holds at most {names} files and directories; "
                             f"{advice}.")
        elif wanted is not None and wanted > quota:
            super().__init__(f"Upload quota exceeded: this needs {need}, more than all {quota} bytes of your quota; "
                             f"{too_small}.")
        else:
            super().__init__(f"Upload quota exceeded: this needs {need}, and {used} of your {quota} bytes are in "
                             f"use; {advice}.")


@dataclass
class Grant:
    """Room reserved for one store within its quota (:meth:`GridFTPServer.grant`); :meth:`release` it."""

    server: "GridFTPServer"
    key: tuple[Path, str, object]
    quota: int
    used: int
    granted: int

    def release(self) -> None:
        with self.server._lock:
            self.server._granted.pop(self.key, None)

    def exceeded(self) -> QuotaExceeded:
        files = self.server.files
        return QuotaExceeded(self.quota, self.used + self.granted, None, advice=files.quota_advice,
                             too_small=files.quota_too_small)


def _plain_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address with an IPv4-mapped IPv6 form (``::ffff:a.b.c.d``) taken as the IPv4 address."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _address_group(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """What a peer's sessions are counted under as one address (the bounds per address): its IPv4 address, all of
    loopback (127.0.0.0/8, and ::1) for a local peer, since one local account may bind any loopback address, and an
    IPv6 address's /64 (a host is given a /64 and may take any address of it)."""
    address = _plain_address(text)
    if address.is_loopback:
        return ipaddress.ip_network("127.0.0.0/8")
    if address.version == 6:
        return ipaddress.ip_network(f"{address}/64", strict=False)
    return ipaddress.ip_network(address)


def _address_label(group: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    if group.network_address.is_loopback:
        return "loopback (127.0.0.0/8, ::1)"
    return str(group.network_address) if group.num_addresses == 1 else str(group)


DATA_CACHE_IDLE = 120.0     # seconds cached MODE E data connections may wait for the session's next transfer


@dataclass
class _DataSetup:
    """A session's data channel set-up, and the MODE E connections kept from its last transfer (GFD.20 data channel
    caching: Globus clients send the next RETR/STOR of ``-r`` or ``-f`` without a new PORT/PASV). Cached connections
    belong to this session only, and carry data only in the direction and under the DCAU/PROT they were set up with
    (``purpose``); a new PORT/PASV, a MODE/PROT/DCAU change, an error, ABOR, QUIT or :data:`DATA_CACHE_IDLE` seconds
    unused close them (:meth:`clear`)."""

    passive: list[socket.socket] = field(default_factory=list)      # listeners (PASV/EPSV/SPAS)
    active: list[tuple[str, int]] = field(default_factory=list)     # peers to connect (PORT/EPRT/SPOR)
    cached: list[socket.socket] = field(default_factory=list)       # kept from the last transfer
    purpose: tuple | None = None                                    # ("send" or "recv", security) they serve
    claimed: list[socket.socket] = field(default_factory=list)      # taken by the transfer starting
    # a passive listener no data connection has reached yet (reserved before it is opened: counted per identity by
    # GridFTPServer.passive_room); ``engaged``: a data command waits on it (its accept_timeout bounds the wait)
    unreached: bool = False
    engaged: bool = False
    # the passive listener kept after an upload for the next one over the cached connections, no data command has
    # taken it up since (counted as ``unreached`` when the identity's bound had room; closed with the cached
    # connections when no data command comes in time: attack16 G4)
    idle_kept: bool = False
    closed_why: str | None = None       # why PASSIVE_WAIT closed the passive listener: told to the next data command
    _timer: threading.Timer | None = None
    _passive_timer: threading.Timer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self._lock:
            self._stop_timer()
            dropped = self._drop()
            passive, self.passive, self.active = self.passive, [], []
            self._stop_passive()
        dropped()
        close_all(passive)

    def _stop_passive(self) -> None:
        """(Under the lock.) No passive listener waits for its first connection any more."""
        self.unreached = self.engaged = self.idle_kept = False
        if self._passive_timer is not None:
            self._passive_timer.cancel()
            self._passive_timer = None

    def listen(self, listener: socket.socket, wait: float) -> None:
        """``listener`` is the session's passive data port (PASV/EPSV/SPAS), reserved by :attr:`unreached`: closed
        when no data command has taken it up within ``wait`` seconds (0: never)."""
        with self._lock:
            self.passive, self.closed_why = [listener], None
            if wait > 0:
                timer = threading.Timer(wait, lambda: self._unused(listener, wait))
                timer.daemon = True
                self._passive_timer = timer
                timer.start()

    def _unused(self, listener: socket.socket, wait: float) -> None:
        with self._lock:
            if self.passive != [listener] or not self.unreached or self.engaged:
                return
            self.passive = []
            self._stop_passive()
            self.closed_why = (f"the passive data port was closed: no data command took it up within {wait:g} s of "
                               f"the PASV or EPSV")
        log.info("closed a passive data port no data command took up within %.0f s", wait)
        shutdown_listener(listener)

    def engage(self) -> None:
        """A data command takes up the passive listener: :attr:`PASSIVE_WAIT` closes it no more; a kept one is held
        by the transfer now (as a reached one: while the transfer runs)."""
        with self._lock:
            if self.passive:
                self.engaged = True
                if self.idle_kept:
                    self.idle_kept = self.unreached = False

    def keep_listener(self, listener: socket.socket, counted: bool, wait: float) -> None:
        """After an upload that kept its connections: ``listener`` stays for the next upload over them (the sender
        may add connections) until ``wait`` seconds pass without a data command, then it closes with the cached
        connections (they carry no upload without it). ``counted``: it holds one of the identity's passive ports
        (:meth:`GridFTPServer.passive_room`) meanwhile."""
        with self._lock:
            self._stop_passive()
            self.passive, self.closed_why = [listener], None
            self.unreached, self.idle_kept = counted, True
            timer = threading.Timer(wait, lambda: self._kept_unused(listener, wait))
            timer.daemon = True
            self._passive_timer = timer
            timer.start()

    def _kept_unused(self, listener: socket.socket, wait: float) -> None:
        with self._lock:
            if self.passive != [listener] or not self.idle_kept or self.engaged:
                return
            self.passive = []
            self._stop_passive()
            self._stop_timer()
            dropped = self._drop()
            self.closed_why = (f"the passive data port kept after the last upload was closed: no data command took it "
                               f"up within {wait:g} s")
        log.info("closed a passive data port kept after an upload that no data command took up within %.0f s", wait)
        dropped()
        shutdown_listener(listener)

    def reached(self) -> None:
        """The passive listener's first data connection arrived: it holds a port of the range for a transfer now."""
        with self._lock:
            self._stop_passive()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop(self) -> Callable[[], int]:
        """Forget the cached and claimed connections (under the lock); returns what closes them (and counts them)."""
        socks, self.cached, self.claimed = self.cached + self.claimed, [], []
        sender = self.purpose is not None and self.purpose[0] == "send"
        self.purpose = None

        def close() -> int:
            close_cached(socks, sender=sender)
            return len(socks)
        return close

    def keep(self, socks: list[socket.socket], purpose: tuple, idle: float) -> None:
        """Cache the connections of a transfer that ended well, for the next one of the same ``purpose``."""
        with self._lock:
            self._stop_timer()
            self.cached, self.purpose = list(socks), purpose
            timer = threading.Timer(idle, lambda: self._expire(timer))
            timer.daemon = True
            self._timer = timer
        timer.start()

    def _expire(self, timer: threading.Timer) -> None:
        with self._lock:
            if self._timer is not timer or self.claimed:
                return
            self._timer = None
            dropped = self._drop()
            passive, self.passive = self.passive, []        # kept only for its cached connections
        if dropped():
            log.info("closed the cached data connections of a session idle for %.0f s", timer.interval)
        close_all(passive)

    def take(self, purpose: tuple) -> None:
        """A transfer of ``purpose`` begins: the cached connections become its :attr:`claimed` ones if they
        serve that purpose, else they are closed."""
        with self._lock:
            self._stop_timer()
            if self.cached and self.purpose == purpose:
                self.claimed, self.cached = self.cached, []
                return
            dropped = self._drop()
        dropped()

    def claim(self) -> list[socket.socket]:
        """The connections :meth:`take` claimed (the caller owns them now)."""
        with self._lock:
            socks, self.claimed = self.claimed, []
            return socks


class _Session:
    """One control connection: its state machine and command handlers."""

    def __init__(self, server: GridFTPServer, conn: socket.socket, peer):
        self.server = server
        self.control = ControlChannel(conn)
        self.peer = peer
        self.local_host = conn.getsockname()[0]
        self.user: str | None = None
        self.logged_in = False
        self.anonymous = False
        self.dn: str | None = None          # TLS- or GSI-authenticated identity
        self.gss: GSIContext | None = None  # AUTH GSSAPI: the session's security context
        self._gsi_tls: TLSConfig | None = None
        self.auth_failure: str | None = None
        self.pending_user: str | None = None
        self.cwd = "/"
        self.type = "A"
        self.mode = "S"
        self.data = _DataSetup()
        self._completed = False     # the transfer in progress has been answered 226 (its data channel may be kept)
        self.rest: RangeSet | int | None = None
        self.retr_opts = RetrOptions()
        self.sbuf: int | None = None
        self.allo: int | None = None
        self.scks: tuple[str, str] | None = None
        self._grant: Grant | None = None       # the quota room of the store in progress
        self._overrun = False                  # that store ran past it (refused 552, discarded)
        self.rnfr: str | None = None
        self.pbsz = False
        self.prot = "C"
        self.dcau: tuple[str, str | None] = ("A", None)
        self.queued: list[str] = []
        self._held: list[tuple[int, str | list[str]]] | None = None   # final replies kept back
        self._transfer_cancel: Callable[[], None] | None = None
        self.idle_by: float | None = None      # logged in: closed when still waiting for a command then
        # the refusal a login got (421: a bound on sessions; 530: a guest where guests may not log in): every
        # command then gets it, and the session ends
        self.turned_away: tuple[int, str] | None = None

    # -- loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        ctl = self.control
        login_by = time.monotonic() + self.server.login_timeout
        try:
            ctl.sock.settimeout(min(self.server.idle_timeout, self.server.login_timeout))
            ctl.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ctl.send_reply(220, self.server.banner)
            while not ctl.closed:
                if not self.logged_in:
                    if time.monotonic() >= login_by:
                        log.warning("session %s not logged in within %.0f s: closed", self.peer,
                                    self.server.login_timeout)
                        ctl.send_reply(421, "Login timed out; closing the connection.")
                        break
                    ctl.deadline = login_by         # also a line trickled in a byte at a time
                elif self.idle_by is not None and time.monotonic() >= self.idle_by and not self.queued:
                    log.info("session %s (%s): no transfer for %.0f s: closed", self.peer, self.dn,
                             self.server.transfer_idle_timeout)
                    ctl.send_reply(421, f"No transfer for {self.server.transfer_idle_timeout:.0f} s; closing the "
                                        f"connection.")
                    break
                else:
                    # NOOPs do not renew this deadline; a transfer does (_worked). While a command runs there is none.
                    ctl.sock.settimeout(self.server.idle_timeout)
                    ctl.deadline = self.idle_by
                if self.queued:
                    line = self.queued.pop(0)
                else:
                    try:
                        line = ctl.readline()
                    except LineTooLong:
                        ctl.send_reply(500, "Command line too long.")
                        continue
                    except TimeoutError:
                        if ctl.deadline is not None and time.monotonic() >= ctl.deadline:
                            continue        # the login or no-transfer deadline: answered 421 above
                        raise
                    finally:
                        if self.logged_in:
                            ctl.deadline = None
                            ctl.sock.settimeout(self.server.idle_timeout)
                    if line is None:
                        break
                    line = self._unprotect(line)
                    if line is None:
                        continue
                if not self.handle(line):
                    break
        except (OSError, ssl.SSLError, EOFError):
            pass
        except Exception:
            log.exception("session %s failed", self.peer)
        finally:
            self.data.clear()
            ctl.close()
            self.server._forget(self)

    def kill(self) -> None:
        if self._transfer_cancel is not None:
            self._transfer_cancel()
        try:
            self.control.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.control.close()

    def reply(self, code: int, text: str | list[str]) -> None:
        """Send a reply; while a transfer's final replies are held back (:meth:`_holding_replies`),
        a completion reply waits until the transfer has let go of everything it held."""
        if self._held is not None and code >= 200:
            self._held.append((code, text))
            return
        self.control.send_reply(code, text)

    def _unprotect(self, line: str) -> str | None:
        """The command a line carries: in a GSI session every command comes wrapped in MIC, ENC or
        CONF (RFC 2228) and is unwrapped here; None when the line was refused (and answered)."""
        verb, arg = split_command(line.strip())
        protected = verb.upper() in PROTECTED_VERBS
        if self.gss is None or not self.gss.complete:
            if protected:
                self.control.send_reply(503, "No security context: use AUTH GSSAPI and ADAT first.")
                return None
            return line
        if not protected:
            self.control.send_reply(533, "Commands must be protected (MIC or ENC) once GSSAPI is in use.")
            return None
        try:
            data = self.gss.unwrap(base64.b64decode(arg.strip(), validate=True))
        except (GSIError, ValueError, binascii.Error) as exc:
            # a forged or damaged record ends the TLS session inside the context: nothing can be
            # wrapped any more, so say why in clear and close the session
            log.warning("session %s (%s): a protected command does not verify: %s", self.peer, self.dn, exc)
            self.control.wrap = None
            self.control.send_reply(535, "Failed security check: the protected command does not verify; closing.")
            self.control.close()
            return None
        text = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        if text.endswith("\n"):
            text = text[:-1]
        text = text.rstrip("\r")
        if "\n" in text or "\r" in text:
            self.control.send_reply(500, "One command per protected message.")
            return None
        return text

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for code, text in held:
            self.control.send_reply(code, text)

    def handle(self, line: str) -> bool:
        """Run one command; False ends the session."""
        verb, arg = split_command(line.strip())
        if not verb or not verb.isalpha() or len(verb) > 8:
            self.reply(500, "Syntax error, command unrecognized.")
            return True
        handler = getattr(self, f"cmd_{verb}", None)
        if handler is None:
            self.reply(500, f"'{verb}': command not understood.")
            return True
        if self.turned_away is not None:
            self.reply(*self.turned_away)
            return self.control.line_waiting(1.0)   # then closed once the commands in flight are answered
        if not self.logged_in and verb not in PRE_LOGIN:
            self.reply(530, "Please log in first.")
            return True
        if verb in DATA_VERBS:
            self._completed = False     # set again by this transfer's 226 (its data connections may then be kept)
        try:
            result = handler(arg.strip() if verb not in ("PASS",) else arg)
            if verb in WORK_VERBS:
                self._worked()
        except (_Reply, PathError, ProtocolError) as exc:
            if verb in DATA_VERBS:
                # a refused transfer leaves no data setup behind: a passive listener closed, a PORT forgotten
                # (was: a path the file space refused before the handler's own reset kept the PASV port open)
                self._reset_transfer_state()
            if isinstance(exc, _Reply):
                self.reply(exc.code, exc.text)
            else:
                self.reply(550 if isinstance(exc, PathError) else 501, str(exc))
            return True
        return result is not False

    # -- helpers --------------------------------------------------------------------------------------
    def _worked(self) -> None:
        """A transfer ended (or the login): the no-transfer clock (``transfer_idle_timeout``) starts again."""
        if self.server.transfer_idle_timeout > 0:
            self.idle_by = time.monotonic() + self.server.transfer_idle_timeout

    def _path(self, arg: str, *, required: bool = True) -> str:
        if not arg and required:
            raise _Reply(501, "A path is required.")
        vpath = normalize(self.cwd, arg)
        if is_internal(vpath):
            raise _Reply(550, f"{vpath}: no such file.")
        return vpath

    def _authorize(self, op: str, vpath: str) -> None:
        if op in ("write", "delete"):
            if not self.server.in_upload_area(vpath):
                raise _Reply(550, f"{vpath}: permission denied (outside the upload area).")
            if self.anonymous and not self.server.insecure_anonymous_writes:
                raise _Reply(550, f"{vpath}: permission denied (anonymous access is read-only).")
        if not self.server.allowed(self.dn, op, vpath):
            # a path one may not read is answered as a missing one would be, and says both: whether it exists is
            # not this caller's to learn (an image's bytes, another user's job), and "permission denied" alone
            # read as a refusal of a file that was in fact not there
            if op in ("read", "list"):
                raise _Reply(550, f"{vpath}: no such file, or permission denied.")
            raise _Reply(550, f"{vpath}: permission denied.")

    def _real(self, vpath: str) -> Path:
        return self.server.files.real_path(vpath)

    def _stat(self, vpath: str) -> tuple[Path, os.stat_result]:
        real = self._real(vpath)
        try:
            return real, os.stat(real)
        except FileNotFoundError:
            raise _Reply(550, f"{vpath}: no such file or directory.") from None
        except OSError as exc:
            raise _Reply(550, f"{vpath}: {exc.strerror}.") from None

    def _file(self, vpath: str) -> tuple[Path, os.stat_result]:
        real, st = self._stat(vpath)
        if not stat.S_ISREG(st.st_mode):
            raise _Reply(550, f"{vpath}: not a plain file.")
        return real, st

    def _reset_transfer_state(self) -> None:
        self.rest = None
        self.allo = None
        self.scks = None
        if not (self._completed and self.data.cached):     # kept: a MODE E transfer that ended well (GFD.20 caching)
            self.data.clear()

    @staticmethod
    def _int(text: str, what: str) -> int:
        text = text.strip()
        if not text.isdigit() or len(text) > 19:
            raise _Reply(501, f"Bad {what}: {text[:40]!r}.")
        return int(text)

    # -- login and security (RFC 959, RFC 4217, GFD.20 DCAU) ---------------------------------------
    def cmd_USER(self, arg: str):
        if not arg:
            raise _Reply(501, "USER needs a name.")
        if self.auth_failure is not None:
            raise _Reply(535, f"Failed security check: {self.auth_failure}")
        if self.logged_in:
            raise _Reply(503, "Already logged in.")
        if self.dn is not None:
            if self.server.refuse_guests and self.server.is_guest(self.dn):
                log.warning("session %s (%s): login refused: a guest's certificate", self.peer, self.dn)
                return self._turn_away(f"{self.dn} is a guest container's certificate: guests have no rights on this "
                                       f"server.", 530)
            refusal = self.server.log_in(self, self.dn)
            if refusal is not None:
                log.warning("session %s (%s): login refused: %s", self.peer, self.dn, refusal)
                return self._turn_away(refusal)
            self.user = arg
            self._worked()
            how = "GSSAPI" if self.gss is not None else "TLS client certificate"
            self.reply(232, f"User {self.dn} logged in, authorized by {how}.")
            return
        if arg.lower() in ANONYMOUS_NAMES:
            if not self.server.anonymous:
                raise _Reply(530, "Anonymous access is disabled; log in with AUTH TLS and a grid certificate.")
            self.pending_user = arg
            self.reply(331, "Anonymous login ok, send your e-mail address as password.")
            return
        raise _Reply(530, "Log in with AUTH TLS and a grid certificate.")

    def cmd_PASS(self, arg: str):
        if self.logged_in and self.gss is not None:
            self.reply(230, "User logged in; GSSAPI needs no password.")   # globus-url-copy sends one
            return
        if self.logged_in:
            raise _Reply(503, "Already logged in.")
        if self.pending_user is None:
            raise _Reply(503, "Send USER first.")
        refusal = self.server.log_in(self, None)
        if refusal is not None:
            log.warning("session %s (anonymous): login refused: %s", self.peer, refusal)
            return self._turn_away(refusal)
        self.user, self.anonymous = self.pending_user, True
        self.pending_user = None
        self._worked()
        self.reply(230, "Anonymous user logged in (read-only).")

    def _turn_away(self, refusal: str, code: int = 421):
        """A login past a bound on sessions (421), or a guest's where guests may not log in (530): the session ends,
        after answering the same reply to the commands a client sent behind its login (vmgrid's client and Globus's pipeline PASS, PBSZ, PROT, DCAU after USER: a
        connection closed under them would hide the reason); a short grace, not ``login_timeout``."""
        self.turned_away = (code, refusal)
        self.reply(code, refusal)
        return self.control.line_waiting(1.0)

    def cmd_ACCT(self, arg: str):
        self.reply(202, "ACCT not needed.")

    def cmd_AUTH(self, arg: str):
        mech = arg.upper()
        if mech == "GSSAPI" and self.server.gsi:
            return self._auth_gssapi()
        if mech not in ("TLS", "TLS-C", "SSL"):
            offered = "AUTH TLS or AUTH GSSAPI" if self.server.gsi else "AUTH TLS"
            raise _Reply(504, f"AUTH {arg[:20]} not supported; use {offered}.")
        if isinstance(self.control.sock, ssl.SSLSocket) or self.gss is not None:
            raise _Reply(503, "Security already active.")
        if self.logged_in:
            raise _Reply(503, "AUTH must come before login.")
        if self.server.tls is None or self.server.tls.server_context is None:
            raise _Reply(431, "TLS is not configured on this server.")
        self.reply(234, "AUTH TLS successful.")
        try:
            sock = self.control.start_tls(self.server.tls.server_context, server_side=True)
        except ProtocolError:
            return False
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", self.peer, exc)
            return False
        try:
            dn = self.server.tls.identify(sock)
            refusal = self.server.accepts(dn)
            if refusal is not None:
                raise AuthenticationError(refusal)
            self.dn = dn
        except AuthenticationError as exc:
            # keep the session: closing now would reset the connection over commands already in
            # flight, and the client would never learn why
            self.auth_failure = str(exc)
            log.info("session %s presented an unacceptable certificate: %s", self.peer, exc)
            return
        log.info("session %s authenticated as %s", self.peer, self.dn)

    def _auth_gssapi(self):
        if self.gss is not None or isinstance(self.control.sock, ssl.SSLSocket):
            raise _Reply(503, "Security already active.")
        if self.logged_in:
            raise _Reply(503, "AUTH must come before login.")
        self.gss = GSIContext(self.server.tls.credential, self.server.tls.trust, initiate=False,
                              accept_limited=self.server.accept_limited_proxies)
        self.reply(334, "Using authentication type GSSAPI; ADAT must follow.")

    def cmd_ADAT(self, arg: str):
        """One token of the GSI context (RFC 2228): 335 with the answer while it goes on, 235 once
        established (the client then wraps every command), 535 when the peer is not acceptable."""
        if self.gss is None:
            raise _Reply(503, "Send AUTH GSSAPI first.")
        if self.gss.complete:
            raise _Reply(503, "Security context already established.")
        if self.gss.state == "failed":
            raise _Reply(503, "The security context failed; reconnect.")
        try:
            token = base64.b64decode(arg.strip(), validate=True)
        except (ValueError, binascii.Error):
            raise _Reply(501, "ADAT token is not base64.") from None
        try:
            out = self.gss.step(token)
        except GSIError as exc:
            log.info("session %s: GSI authentication failed: %s", self.peer, exc.reason)
            self.auth_failure = exc.reason
            raise _Reply(535, f"Failed security check: {exc.reason}") from None
        answer = base64.b64encode(out).decode("ascii")
        if not self.gss.complete:
            self.reply(335, f"ADAT={answer}")
            return
        dn = self.gss.peer.dn
        refusal = self.server.accepts(dn)
        if refusal is not None:
            self.auth_failure = refusal
            log.info("session %s: %s", self.peer, refusal)
        else:
            self.dn = dn
            log.info("session %s authenticated by GSI as %s%s", self.peer, dn,
                     " (delegated a proxy)" if self.gss.delegated else "")
        self.reply(235, f"ADAT={answer}" if out else "GSSAPI Authentication succeeded.")
        self.control.wrap, self.control.unwrap = self.gss.wrap, self.gss.unwrap

    def _tls(self) -> None:
        if not isinstance(self.control.sock, ssl.SSLSocket) and not (self.gss is not None and self.gss.complete):
            raise _Reply(503, "Use AUTH TLS or AUTH GSSAPI first.")

    def cmd_PBSZ(self, arg: str):
        self._tls()
        size = self._int(arg, "buffer size")
        self.pbsz = True
        if self.gss is not None:       # GSSAPI: the largest protected buffer, at most what we take
            self.reply(200, f"PBSZ={min(size, 1 << 20) if size else 1 << 20}")
        else:
            self.reply(200, "PBSZ=0")

    def cmd_PROT(self, arg: str):
        self._tls()
        if not self.pbsz:
            raise _Reply(503, "Send PBSZ first.")
        level = arg.upper()
        if level == "S" and self.gss is not None:
            pass                # GSI: integrity-protected data (GSS wrap without confidentiality)
        elif level in ("S", "E"):
            raise _Reply(536, f"PROT {level} is not supported; use C or P.")
        if level not in ("C", "P") and not (level == "S" and self.gss is not None):
            raise _Reply(504, "PROT takes C or P.")
        if level != self.prot:
            self.data.clear()       # cached data connections serve the old level only
        self.prot = level
        self.reply(200, f"Protection level set to {level}.")

    def cmd_CCC(self, arg: str):
        raise _Reply(533, "The control channel stays protected.")

    def cmd_DCAU(self, arg: str):
        self._tls()
        mode, _, subject = arg.partition(" ")
        mode = mode.upper()
        if mode in ("N", "A") and not subject:
            dcau = (mode, None)
        elif mode == "S" and subject.strip():
            dcau = ("S", subject.strip())
        else:
            raise _Reply(504, "DCAU takes N, A or S <subject>.")
        if self.dcau != dcau:
            self.data.clear()       # cached data connections were authenticated the old way
        self.dcau = dcau
        self.reply(200, f"DCAU {mode}.")

    def _protection(self) -> DataTLS | None:
        if self.dn is None:
            return None
        if self.gss is not None:
            return self._gsi_protection()
        if self.prot != "P":
            if self.server.require_private_data:
                raise _Reply(521, "Data connections must be protected: send PBSZ 0 and PROT P "
                                   "(globus-url-copy: -dcpriv).")
            return None
        mode, subject = self.dcau
        if mode == "S":     # server to server (third party): the connecting side is the TLS client
            return DataTLS(self.server.tls, subject, tls_server=None)
        return DataTLS(self.server.tls, self.dn if mode == "A" else None, tls_server=True)

    def _data_allow(self, protection) -> Callable[[str], bool] | None:
        """Who may connect to this session's passive port. With an identity to prove (DCAU A or S), anyone: the
        handshake decides. Without one (DCAU N, anonymous, no TLS) only the control connection's peer and the
        configured ``data_peers``, the addresses PORT/EPRT may name: else whoever reached the port first would
        get or write the data."""
        if protection is not None and getattr(protection, "expect", None) is not None:
            return None
        control_peer = self.peer[0]
        return lambda host: self.server.may_connect(control_peer, host)

    def _gsi_protection(self) -> GSIData | None:
        """The data channel of a GSI session: DCAU and PROT as Globus does them (:mod:`gridftp.gsidata`),
        with the credential the client delegated (else the host's)."""
        mode, subject = self.dcau
        if self.prot == "C" and self.server.require_private_data:
            raise _Reply(521, "Data connections must be protected: send PBSZ and PROT P (globus-url-copy: -dcpriv).")
        if mode == "N":
            if self.prot != "C":
                raise _Reply(503, "PROT S and P need data channel authentication (DCAU A or S).")
            return None
        credential = self.gss.delegated or self.server.tls.credential
        if self._gsi_tls is None or self._gsi_tls.credential is not credential:
            self._gsi_tls = gsi_tls_config(credential, self.server.tls.trust)
        expect = self.dn if mode == "A" else subject
        return GSIData(credential, self.server.tls.trust, expect, private=self.prot in ("S", "P"),
                       tls=self._gsi_tls)

    # -- session state (RFC 959) -------------------------------------------------------------------------
    def cmd_QUIT(self, arg: str):
        self.reply(221, "Goodbye.")
        return False

    def cmd_NOOP(self, arg: str):
        self.reply(200, "NOOP ok.")

    def cmd_SYST(self, arg: str):
        self.reply(215, "UNIX Type: L8")

    def cmd_FEAT(self, arg: str):
        tls = ["AUTH TLS", "PBSZ", "PROT", "DCAU"] if self.server.tls is not None else []
        if self.server.gsi:
            tls.insert(1, "AUTH GSSAPI")
        self.reply(211, ["Extensions supported:", *tls, *FEATURES, "End."])

    def cmd_HELP(self, arg: str):
        verbs = sorted(n[4:] for n in dir(self) if n.startswith("cmd_"))
        rows = [" ".join(f"{v:<5}" for v in verbs[i:i + 10]) for i in range(0, len(verbs), 10)]
        self.reply(214, ["The following commands are recognized:", *rows, "End."])

    def cmd_SITE(self, arg: str):
        sub, _, rest = arg.partition(" ")
        sub = sub.upper()
        if sub == "HELP":
            return self.cmd_HELP(rest)
        if sub == "CLIENTINFO":
            self.reply(250, "OK.")
            return
        if sub in ("BUFSIZE", "RBUFSIZE", "SBUFSIZE", "RETRBUFSIZE", "STORBUFSIZE", "RBUFSZ", "SBUFSZ"):
            return self.cmd_SBUF(rest)
        raise _Reply(504, f"SITE {sub[:20]} not supported.")

    def cmd_OPTS(self, arg: str):
        name, _, value = arg.partition(" ")
        name = name.upper()
        if name == "RETR":
            self.retr_opts = parse_retr_options(value)
            self.reply(200, "OPTS Command Successful.")
        elif name == "UTF8" and value.strip().upper() in ("ON", ""):
            self.reply(200, "UTF8 always on.")
        else:
            raise _Reply(501, f"OPTS {name[:20]} not understood.")

    def cmd_TYPE(self, arg: str):
        parts = arg.upper().split()
        if not parts:
            raise _Reply(501, "TYPE needs an argument.")
        if parts[0] == "I" and len(parts) == 1:
            self.type = "I"
        elif parts[0] == "A" and parts[1:] in ([], ["N"]):
            self.type = "A"     # files still travel unchanged (no end-of-line rewriting), as vsftpd does
        elif parts == ["L", "8"]:
            self.type = "I"
        else:
            raise _Reply(504, f"TYPE {arg[:20]} not supported.")
        self.reply(200, f"Type set to {parts[0]}.")

    def cmd_MODE(self, arg: str):
        m = arg.upper()
        if m not in ("S", "E", "B", "C"):
            raise _Reply(501, "MODE takes S or E.")
        if m not in ("S", "E"):
            raise _Reply(504, f"MODE {m} not supported.")
        if m != self.mode:
            self.data.clear()       # MODE S has no cached data connections
        self.mode = m
        self.reply(200, f"Mode set to {m}.")

    def cmd_STRU(self, arg: str):
        s = arg.upper()
        if s == "F":
            self.reply(200, "Structure set to F.")
        elif s in ("R", "P"):
            raise _Reply(504, f"STRU {s} not supported.")
        else:
            raise _Reply(501, "STRU takes F.")

    def cmd_ALLO(self, arg: str):
        first = arg.split()[0] if arg.split() else ""
        size = self._int(first, "ALLO size")
        if size > self.server.max_file_size:
            raise _Reply(552, _too_large(self.server.max_file_size))
        self.allo = size
        self.reply(200, "ALLO command successful.")

    def cmd_REST(self, arg: str):
        if not arg:
            raise _Reply(501, "REST needs an offset or ranges.")
        if arg.isdigit():
            offset = self._int(arg, "restart offset")
            if offset > MAX_OFFSET:
                raise _Reply(501, f"Bad restart offset: {arg[:40]!r}.")
            self.rest = RangeSet([(0, offset)]) if self.mode == "E" else offset
        else:
            try:
                self.rest = RangeSet.parse(arg)
            except ProtocolError as exc:
                raise _Reply(501, f"Bad restart marker: {exc}.") from None
        self.reply(350, "Restart Marker OK.")

    def cmd_SBUF(self, arg: str):
        size = self._int(arg, "buffer size")
        if not 1024 <= size <= 1 << 30:
            raise _Reply(501, "Buffer size must be between 1 KiB and 1 GiB.")
        if size != self.sbuf:
            self.data.clear()       # cached data connections have the old buffers
        self.sbuf = size
        self.reply(200, f"Buffer size set to {size}.")

    def cmd_SCKS(self, arg: str):
        parts = arg.split()
        if len(parts) != 2:
            raise _Reply(501, "SCKS takes an algorithm and a checksum.")
        alg = parts[0].upper()
        if alg not in CHECKSUM_ALGORITHMS:
            raise _Reply(504, f"Checksum algorithm {parts[0][:20]} not supported.")
        self.scks = (alg, parts[1].lower())
        self.reply(200, "Checksum set.")

    def cmd_ABOR(self, arg: str):
        self.data.clear()
        self.reply(226, "No transfer to abort.")

    def cmd_REIN(self, arg: str):
        raise _Reply(502, "REIN not implemented.")

    # -- navigation and metadata (RFC 959, RFC 3659) ------------------------------------------------------
    def cmd_PWD(self, arg: str):
        self.reply(257, '"' + self.cwd.replace('"', '""') + '" is the current directory.')

    cmd_XPWD = cmd_PWD

    def cmd_CWD(self, arg: str):
        vpath = self._path(arg)
        self._authorize("list", vpath)
        _, st = self._stat(vpath)
        if not stat.S_ISDIR(st.st_mode):
            raise _Reply(550, f"{vpath}: not a directory.")
        self.cwd = vpath
        self.reply(250, f"CWD command successful: {vpath}.")

    def cmd_CDUP(self, arg: str):
        return self.cmd_CWD("..")

    def cmd_SIZE(self, arg: str):
        vpath = self._path(arg)
        self._authorize("read", vpath)
        _, st = self._file(vpath)
        self.reply(213, str(st.st_size))

    def cmd_MDTM(self, arg: str):
        vpath = self._path(arg)
        self._authorize("read", vpath)
        _, st = self._stat(vpath)
        self.reply(213, format_mdtm(st.st_mtime))

    def cmd_CKSM(self, arg: str):
        parts = arg.split(" ", 3)
        if len(parts) != 4:
            raise _Reply(501, "CKSM takes: algorithm offset length path.")
        alg, off_s, len_s, path = parts
        alg = alg.upper()
        if alg not in CHECKSUM_ALGORITHMS:
            raise _Reply(504, f"Checksum algorithm {alg[:20]} not supported.")
        offset = self._int(off_s, "offset")
        length = -1 if len_s.strip() == "-1" else self._int(len_s, "length")
        vpath = self._path(path)
        self._authorize("read", vpath)
        real, st = self._file(vpath)
        if offset > st.st_size or (length >= 0 and offset + length > st.st_size):
            raise _Reply(501, "Offset and length reach beyond the end of the file.")
        whole = offset == 0 and (length < 0 or length == st.st_size)
        known = self.server.files.known_checksum(vpath, alg) if whole else None
        if known is None:
            key = _cache_key(st, alg, offset, length if length >= 0 else st.st_size - offset)
            known = self.server.checksums.get(key)
            if known is None:
                try:
                    with self.server.hashing(self.dn or f"anonymous@{self.peer[0]}"):
                        known = hash_file(real, alg, offset, length)
                except OSError as exc:
                    raise _Reply(451, f"Cannot read {vpath}: {exc.strerror}.") from None
                except GridFTPError:         # it shrank since the stat above
                    raise _Reply(451, f"Cannot read {vpath}: it changed while it was read.") from None
                self.server.checksums.put(key, known)
        self.reply(213, known)

    def _listing_entries(self, vpath: str) -> list[tuple[str, os.stat_result]]:
        real, st = self._stat(vpath)
        if not stat.S_ISDIR(st.st_mode):
            return [(posixpath.basename(vpath), st)]
        out = []
        try:
            names = sorted(os.listdir(real))
        except OSError as exc:
            raise _Reply(550, f"{vpath}: {exc.strerror}.") from None
        for name in names:
            if is_internal(name) or name.endswith(".tmp") and is_internal(name[:-4]):
                continue
            if has_control(name):
                # made by a local process (a job): a CR/LF in it would forge listing lines, an ESC reach the
                # reader's terminal; no path holding one can be asked for either (normalize)
                log.warning("listing %s: a name with control characters left out: %r", vpath, name)
                continue
            try:
                out.append((name, os.stat(real / name)))
            except OSError:
                continue
        return out

    @staticmethod
    def _facts(name: str, st: os.stat_result) -> str:
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        perm = "el" if kind == "dir" else "r"
        return f"type={kind};size={st.st_size};modify={format_mdtm(st.st_mtime)};perm={perm}; {name}"

    @staticmethod
    def _ls_line(name: str, st: os.stat_result) -> str:
        kind = "d" if stat.S_ISDIR(st.st_mode) else "-"
        mode = stat.filemode(st.st_mode)[1:]
        when = time.strftime("%b %d %H:%M", time.gmtime(st.st_mtime))
        return f"{kind}{mode} 1 vmgrid vmgrid {st.st_size:>12} {when} {name}"

    def cmd_MLST(self, arg: str):
        vpath = self._path(arg, required=False)
        self._authorize("list", vpath)
        _, st = self._stat(vpath)
        self.reply(250, [f"Listing {vpath}", " " + self._facts(vpath, st), "End."])

    def cmd_STAT(self, arg: str):
        if not arg:
            lines = [f"vmgrid GridFTP status: connected from {self.peer[0]}",
                     f"Logged in as {self.dn or self.user or 'nobody'}", f"TYPE {self.type}, MODE {self.mode}",
                     "End of status."]
            self.reply(211, lines)
            return
        vpath = self._path(arg)
        self._authorize("list", vpath)
        entries = self._listing_entries(vpath)
        self.reply(213, [f"Status of {vpath}:", *[self._ls_line(n, st) for n, st in entries], "End of status."])

    # -- namespace changes (upload area only) --------------------------------------------------------------
    def cmd_MKD(self, arg: str):
        vpath = self._path(arg)
        self._authorize("write", vpath)
        real = self._real(vpath)
        if self.server.files.quota(vpath) is not None and not real.exists():
            try:        # a directory is one more name of a quota's directory (no bytes are granted to it)
                self.server.grant(vpath, real, 0, 0).release()
            except QuotaExceeded as exc:
                raise _Reply(552, str(exc)) from None
        try:
            os.mkdir(self._real(vpath))
        except FileExistsError:
            raise _Reply(550, f"{vpath}: already exists.") from None
        except OSError as exc:
            raise _Reply(550, f"{vpath}: {exc.strerror}.") from None
        self.reply(257, '"' + vpath.replace('"', '""') + '" created.')

    def cmd_RMD(self, arg: str):
        vpath = self._path(arg)
        self._authorize("delete", vpath)
        try:
            os.rmdir(self._real(vpath))
        except OSError as exc:
            raise _Reply(550, f"{vpath}: {exc.strerror}.") from None
        self.reply(250, f"{vpath} removed.")

    def cmd_DELE(self, arg: str):
        """Delete a file, or the partial upload of that name (its restart state with it): what an abandoned upload
        left counts against an upload quota, and only DELE of its name can remove it."""
        vpath = self._path(arg)
        self._authorize("delete", vpath)
        real = self._real(vpath)
        partial = [p for p in (real.with_name(real.name + PART_SUFFIX), real.with_name(real.name + SIDECAR_SUFFIX))
                   if p.is_file()]
        if not partial:
            real, _ = self._file(vpath)
        if not self.server.claim(vpath):
            raise _Reply(450, f"{vpath} is being stored by another session.")
        try:
            for p in partial + ([real] if real.is_file() else []):
                os.unlink(p)
        except OSError as exc:
            raise _Reply(550, f"{vpath}: {exc.strerror}.") from None
        finally:
            self.server.release(vpath)
        self.reply(250, f"{vpath} deleted.")

    def cmd_RNFR(self, arg: str):
        vpath = self._path(arg)
        self._authorize("delete", vpath)
        self._stat(vpath)
        self.rnfr = vpath
        self.reply(350, "Ready for RNTO.")

    def cmd_RNTO(self, arg: str):
        if self.rnfr is None:
            raise _Reply(503, "Send RNFR first.")
        source, self.rnfr = self.rnfr, None
        vpath = self._path(arg)
        self._authorize("write", vpath)
        try:
            os.rename(self._real(source), self._real(vpath))
        except OSError as exc:
            raise _Reply(550, f"{vpath}: {exc.strerror}.") from None
        self.reply(250, f"Renamed to {vpath}.")

    # -- data connection set-up (RFC 959, RFC 2428, GFD.20) -------------------------------------------------
    def _listen(self) -> socket.socket:
        """A passive data port for this session (the one it had closed first), within the identity's bound on
        ports no data connection has reached (:meth:`GridFTPServer.passive_room`); closed if no data command takes
        it up within ``passive_wait`` seconds."""
        self.data.clear()
        why = self.server.passive_room(self)
        if why is not None:
            log.info("session %s (%s): passive data port refused: %d per identity held", self.peer, self.dn,
                     self.server.passive_per_identity)
            raise _Reply(425, why)
        try:
            listener = open_listener(self.local_host, self.sbuf)
        except NoFreeDataPort as exc:       # the operator's to widen: in the log, and said so to the client
            self.data.clear()
            _warn_range_full(exc.strerror)
            raise _Reply(425, f"Cannot open a passive data port: {exc.strerror}, all in use: the server's operator "
                              f"can widen the range.") from None
        except OSError as exc:
            self.data.clear()
            raise _Reply(425, f"Cannot open a passive data port: {exc.strerror}.") from None
        self.data.listen(listener, self.server.passive_wait)
        return listener

    def _keep_listener(self, listener: socket.socket) -> None:
        """The passive listener of an upload that kept its connections stays for the next upload (GFD.20 caching), as
        one of the identity's passive ports (:meth:`GridFTPServer.passive_room`) while no data command takes it up,
        and for ``passive_wait`` seconds at most; past the identity's bound for :data:`PASSIVE_GRACE` seconds only (a
        client's next STOR comes within a round trip). Else a session's tiny upload a minute held a port of the range
        for :data:`DATA_CACHE_IDLE` seconds, renewed, outside the bound (attack16 G4)."""
        counted = self.server.passive_room(self, grace=0) is None     # counts the identity's other sessions
        wait = self.server.passive_wait if counted else PASSIVE_GRACE
        if wait <= 0:
            wait = DATA_CACHE_IDLE
        self.data.keep_listener(listener, counted, wait)

    def cmd_PASV(self, arg: str):
        if ":" in self.local_host and not self.local_host.startswith("::ffff:"):
            raise _Reply(425, "Use EPSV on IPv6.")
        listener = self._listen()
        self.reply(227, f"Entering Passive Mode ({format_host_port(self.local_host, listener.getsockname()[1])})")

    def cmd_EPSV(self, arg: str):
        if arg.upper() == "ALL":
            self.reply(200, "EPSV ALL ok.")
            return
        listener = self._listen()
        self.reply(229, f"Entering Extended Passive Mode (|||{listener.getsockname()[1]}|)")

    def cmd_SPAS(self, arg: str):
        if self.mode != "E":
            raise _Reply(503, "SPAS needs MODE E.")
        listener = self._listen()
        self.reply(229, ["Entering Striped Passive Mode",
                         format_host_port(self.local_host, listener.getsockname()[1]), "End"])

    def _check_port(self, host: str, port: int) -> None:
        if port < 1024:
            raise _Reply(501, "Refusing a privileged data port.")
        if not self.server.may_connect(self.peer[0], host):
            log.warning("session %s (%s) asked for a data connection to %s:%d: refused", self.peer, self.dn,
                        host, port)
            raise _Reply(501, "Refusing a data connection to an address other than yours "
                              "(third-party transfers only between servers this site trusts).")

    def cmd_PORT(self, arg: str):
        self.data.clear()       # a refused PORT leaves no earlier one behind
        host, port = parse_host_port(arg)
        self._check_port(host, port)
        self.data.active = [(host, port)]
        self.reply(200, "PORT Command successful.")

    def cmd_EPRT(self, arg: str):
        self.data.clear()
        host, port = parse_eprt(arg)
        self._check_port(host, port)
        self.data.active = [(host, port)]
        self.reply(200, "EPRT Command successful.")

    def cmd_SPOR(self, arg: str):
        if self.mode != "E":
            raise _Reply(503, "SPOR needs MODE E.")
        if not arg.split():
            raise _Reply(501, "SPOR needs at least one host-port.")
        self.data.clear()
        if len(arg.split()) > MAX_PARALLELISM:
            raise _Reply(501, f"SPOR takes at most {MAX_PARALLELISM} host-ports.")
        addresses = [parse_host_port(hp) for hp in arg.split()]
        for host, port in addresses:
            self._check_port(host, port)
        self.data.active = addresses
        self.reply(200, "SPOR Command successful.")

    # -- transfers ---------------------------------------------------------------------------------------------
    def _data_purpose(self, sending: bool) -> tuple:
        """What cached MODE E connections must have been set up for to carry this transfer: the same direction,
        identity, DCAU and PROT (the session's own connections only: the cache is the session's)."""
        delegated = self.gss.delegated if self.gss is not None else None
        return ("send" if sending else "recv", self.dn, id(delegated), self.dcau, self.prot, self.sbuf)

    def _need_data(self, sending: bool) -> None:
        self._completed = False
        self.data.engage()      # from here on the transfer's accept_timeout bounds the passive listener's wait
        closed = self.data.closed_why       # PASSIVE_WAIT closed it: said so rather than "send PASV" alone
        if self.mode == "E":
            self.data.take(self._data_purpose(sending))
            if sending and not self.data.active:
                raise _Reply(503, "In MODE E the sender opens the data connections: send PORT or SPOR first.")
            if not sending and not self.data.passive:
                raise _Reply(503, f"In MODE E the receiver listens: {closed + '; ' if closed else ''}send PASV or "
                                  f"SPAS first.")
        elif not self.data.active and not self.data.passive:
            raise _Reply(425, f"{closed[0].upper()}{closed[1:]}; send PORT or PASV again." if closed else
                         "Send PORT or PASV first.")

    def _wait(self, done: Callable[[float], bool], on_tick: Callable[[], None], cancel: Callable[[], None]) -> bool:
        """Wait for a transfer while answering markers and ABOR; False if aborted."""
        interval = self.server.marker_interval
        next_tick = time.monotonic() + interval
        self._transfer_cancel = cancel
        try:
            while True:
                if done(min(0.2, interval)):
                    return True
                if self.control.line_waiting(0):
                    line = self.control.readline()
                    if line is None:
                        cancel()
                        done(10)
                        return False
                    line = self._unprotect(line)
                    if line is None:
                        continue
                    verb, _ = split_command(line.strip())
                    if verb.upper() == "ABOR":
                        cancel()
                        done(10)
                        return False
                    if verb.upper() == "STAT":
                        self.control.send_reply(213, "Transfer in progress.")
                    else:
                        self.queued.append(line)
                if time.monotonic() >= next_tick:
                    on_tick()
                    next_tick = time.monotonic() + interval
        finally:
            self._transfer_cancel = None

    def _aborted(self) -> None:
        self.reply(426, "Connection closed; transfer aborted.")
        self.reply(226, "Abort successful.")

    def _throttle(self) -> Throttle | None:
        return Throttle(self.server.max_rate) if self.server.max_rate else None

    def cmd_RETR(self, arg: str):
        vpath = self._path(arg)
        self._send_file(vpath, 0, None)

    def cmd_ERET(self, arg: str):
        parts = arg.split(" ", 3)
        if len(parts) != 4 or parts[0].upper() != "P":
            raise _Reply(501, "ERET takes: P offset length path.")
        offset = self._int(parts[1], "offset")
        length = self._int(parts[2], "length")
        vpath = self._path(parts[3])
        self._send_file(vpath, offset, length)

    def _send_file(self, vpath: str, section_start: int, section_length: int | None) -> None:
        try:
            self._authorize("read", vpath)
            growth = self.server.files.growing(vpath)
            if growth is not None and growth.state != "complete":     # pending, growing or failed
                return self._send_growing(vpath, growth, section_start, section_length)
            real, st = self._file(vpath)
            self._need_data(sending=True)
            protection = self._protection()
            size = st.st_size
            end = size if section_length is None else min(size, section_start + section_length)
            if section_start > size:
                raise _Reply(501, "ERET offset beyond the end of the file.")
            view_size = end - section_start
            rest = self.rest
            if isinstance(rest, RangeSet) and self.mode == "S":
                if len(rest) > 1 or rest.contiguous_end(0) != rest.total():
                    raise _Reply(554, "Restart ranges other than 0-N need MODE E.")
                rest = rest.total()
            if isinstance(rest, int):
                if rest > view_size:
                    raise _Reply(554, "Restart offset beyond the end of the file.")
                todo = [(section_start + rest, end)]
            elif isinstance(rest, RangeSet):
                todo = [(a + section_start, b + section_start) for a, b in rest.missing(0, view_size)]
            else:
                todo = [(section_start, end)]
            try:
                # non-blocking: a FIFO swapped in since the stat (a job's process can) must not hold the session
                fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise _Reply(550, f"{vpath}: {exc.strerror}.") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise _Reply(550, f"{vpath}: not a plain file.")
        except _Reply:
            self._reset_transfer_state()
            raise
        try:
            self.reply(150, f"Opening BINARY mode data connection for {vpath} ({view_size} bytes).")
            if self.mode == "E":
                self._send_mode_e(fd, todo, section_start, protection)
            else:
                self._send_mode_s(fd, todo, protection)
        finally:
            os.close(fd)
            self._reset_transfer_state()

    def _send_growing(self, vpath: str, growth, section_start: int, section_length: int | None) -> None:
        """RETR of a file still being written (:mod:`gridftp.growing`): whole, in MODE E, as it grows."""
        from .growing import FAILED, GrowingSender
        try:
            if growth.state == FAILED:
                raise _Reply(451, f"{vpath}: the file was not completed: {growth.reason}.")
            if self.mode != "E":
                raise _Reply(504, f"{vpath} is still being written: it is sent in MODE E only.")
            if section_start or section_length is not None or self.rest is not None:
                raise _Reply(504, f"{vpath} is still being written: no ERET or REST before it is complete.")
            self._need_data(sending=True)
            protection = self._protection()
        except _Reply:
            self._reset_transfer_state()
            raise
        try:
            self.reply(150, f"Opening BINARY mode data connection for {vpath} (being written: sent as it grows).")
            counter = Counter()
            self._run_sender(GrowingSender(growth, counter=counter), counter, protection, "of a growing file ")
        finally:
            self._reset_transfer_state()

    def _per_address(self, parallel: int) -> int:
        return max(1, min(parallel, MAX_PARALLELISM // max(1, len(self.data.active))))

    def _open_active(self, per_address: int, protection) -> list[socket.socket]:
        """``per_address`` connections to each PORT/SPOR address, at most MAX_PARALLELISM in all (each costs a
        socket and a thread while it connects)."""
        per_address = self._per_address(per_address)
        try:
            return connect_streams(self.data.active, per_address, protection=protection, sbuf=self.sbuf)
        except (AuthenticationError, TransferError) as exc:
            raise _Reply(*self._connect_failed(exc)) from None

    def _connect_failed(self, exc: BaseException) -> tuple[int, str]:
        """The one answer to every failed active data connection (refused, timed out, handshake or
        authentication failed): the replies must not tell a closed port from an open one."""
        log.info("session %s: data connection to %s failed: %s", self.peer, self.data.active, exc)
        return 425, ACTIVE_CONNECT_FAILED

    def _send_mode_e(self, source: int | bytes, todo, shift: int, protection) -> None:
        counter = Counter()
        self._run_sender(ModeESender(source, todo, shift=shift, throttle=self._throttle(), counter=counter,
                                     keep_open=True), counter, protection)

    def _run_sender(self, sender, counter: Counter, protection, what: str = "") -> None:
        """A RETR's MODE E sender run over the negotiated parallel data connections: perf markers while it runs,
        then 226, or the abort's or the failure's reply. The connections cached from the session's last transfer
        carry it when there are as many as wanted (else they are closed and new ones opened); a sender that keeps
        its connections open (``keep_open``) leaves them cached for the next transfer."""
        parallel = max(1, min(self.retr_opts.parallelism, MAX_PARALLELISM))
        socks = self.data.claim()
        reused = len(socks)
        if socks and len(socks) != self._per_address(parallel) * len(self.data.active):
            close_cached(socks, sender=True)
            socks, reused = [], 0
        if not socks:
            socks = self._open_active(parallel, protection)
        worker = Worker(lambda: sender.run(socks), "gridftp-retr")
        finished = self._wait(worker.join, lambda: self.reply(112, format_perf_marker(counter.total)), sender.cancel)
        worker.join()
        if not finished or worker.error is not None:
            close_all(socks)
        if not finished:
            self._aborted()
            return
        if worker.error is not None:
            raise _Reply(426, f"Transfer aborted: {worker.error}")
        log.info("session %s: sent %d bytes %sover %d MODE E streams%s", self.peer, counter.total, what, len(socks),
                 f" (reused {reused} cached data connections)" if reused else "")
        if getattr(sender, "keep_open", False):
            self.data.keep(socks, self._data_purpose(True), DATA_CACHE_IDLE)
        self._complete()

    def _complete(self) -> None:
        """226 for a transfer that ended well: its MODE E data connections, if kept, may carry the next one."""
        self._completed = True
        self.reply(226, "Transfer Complete.")

    def _stream_mode(self, move: Callable[[socket.socket], object], protection) -> bool:
        """Run one MODE S transfer: open the data connection and ``move`` in a worker while this
        thread answers ABOR. True when done; otherwise the failure has been replied to."""
        holder: list[socket.socket] = []

        def run() -> None:
            if self.data.active:
                sock = connect_streams(self.data.active, 1, protection=protection, sbuf=self.sbuf)[0]
            else:
                sock = accept_one(self.data.passive[0], protection=protection, allow=self._data_allow(protection),
                                  timeout=self.server.accept_timeout, what=f"session {self.peer} ({self.dn})")
                self.data.reached()
            holder.append(sock)
            move(sock)

        worker = Worker(run, "gridftp-stream")

        def cancel() -> None:
            for listener in self.data.passive:
                shutdown_listener(listener)
            for sock in holder:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        finished = self._wait(worker.join, lambda: None, cancel)
        worker.join()
        if not finished:
            self._aborted()
            return False
        error = worker.error
        if error is None:
            return True
        if not holder and self.data.active:
            self.reply(*self._connect_failed(error))
        elif isinstance(error, AuthenticationError):
            self.reply(432, f"Data channel authentication failed: {error}")
        elif not holder:
            self.reply(425, f"Cannot open data connection: {error}")
        elif not self._size_overrun(error):
            self.reply(426, f"Transfer aborted: {error}")
        return False

    def _size_overrun(self, error: BaseException) -> bool:
        """A store no ALLO announced that ran past the bound it was given: 552 naming that bound, the room its
        quota granted it (the quota and what is in use) or the server's max_file_size, and True (the caller
        discards what a STOR received). With an ALLO the bound is the size the client announced (426 as before)."""
        if self.allo is not None or not _past_bound(error):
            return False
        grant = getattr(self, "_grant", None)
        self._overrun = True
        if grant is not None and grant.granted < self.server.max_file_size:
            self.reply(552, str(grant.exceeded()))
        else:
            self.reply(552, _too_large(self.server.max_file_size, "this file is larger, and nothing of it was kept"))
        return True

    def _send_mode_s(self, source: int | bytes, todo, protection) -> None:
        start, end = todo[0] if todo else (0, 0)
        if self._stream_mode(lambda sock: send_stream(sock, source, start, end, throttle=self._throttle()),
                             protection):
            self.reply(226, "Transfer Complete.")

    def _send_listing(self, text: str) -> None:
        data = text.encode("utf-8", "surrogateescape")
        protection = self._protection()
        self.reply(150, "Opening data connection for the listing.")
        if self.mode == "E":
            self._send_mode_e(data, [(0, len(data))] if data else [], 0, protection)
        else:
            self._send_mode_s(data, [(0, len(data))], protection)

    def _listing(self, arg: str, render: Callable[[str, os.stat_result], str]) -> None:
        try:
            args = [a for a in arg.split() if not a.startswith("-")]   # "LIST -la" is common
            vpath = self._path(args[0] if args else "", required=False)
            self._authorize("list", vpath)
            entries = self._listing_entries(vpath)
            self._need_data(sending=True)
        except _Reply:
            self._reset_transfer_state()
            raise
        try:
            self._send_listing("".join(render(n, st) + "\r\n" for n, st in entries))
        finally:
            self._reset_transfer_state()

    def cmd_LIST(self, arg: str):
        self._listing(arg, self._ls_line)

    def cmd_NLST(self, arg: str):
        self._listing(arg, lambda n, st: n)

    def cmd_MLSD(self, arg: str):
        self._listing(arg, self._facts)

    def cmd_STOR(self, arg: str):
        vpath = self._path(arg)
        self._receive_file(vpath)

    def cmd_ESTO(self, arg: str):
        parts = arg.split(" ", 2)
        if len(parts) != 3 or parts[0].upper() != "A":
            raise _Reply(501, "ESTO takes: A offset path.")
        offset = self._int(parts[1], "offset")
        vpath = self._path(parts[2])
        self._receive_in_place(vpath, offset)

    def cmd_APPE(self, arg: str):
        raise _Reply(502, "APPE not implemented; use ESTO A <offset>.")

    def cmd_STOU(self, arg: str):
        raise _Reply(502, "STOU not implemented.")

    def _writable_target(self, vpath: str) -> Path:
        self._authorize("write", vpath)
        real = self._real(vpath)
        if not real.parent.is_dir():
            raise _Reply(553, f"{posixpath.dirname(vpath)}: no such directory.")
        if real.is_dir():
            raise _Reply(553, f"{vpath} is a directory.")
        return real

    def _receive_file(self, vpath: str) -> None:
        try:
            real = self._writable_target(vpath)
            self._need_data(sending=False)
            protection = self._protection()
            if not self.server.claim(vpath):
                raise _Reply(450, f"{vpath} is being stored by another session.")
            try:
                grant = self.server.grant(vpath, real, self.allo, self.server.max_file_size)
            except QuotaExceeded as exc:
                self.server.release(vpath)
                raise _Reply(552, str(exc)) from None
        except _Reply:
            self._reset_transfer_state()
            raise
        # the 226 (or any final reply) of this STOR, aborted or not, goes out only once the path is
        # released: a client that reads it may store the same path again at once
        self._held = []
        self._grant, self._overrun = grant, False
        try:
            self._store(vpath, real, protection)
        finally:
            self._grant = None
            if grant is not None:
                grant.release()
            self.server.release(vpath)
            self._release_held()

    def _store(self, vpath: str, real: Path, protection) -> None:
        rest = self.rest
        if isinstance(rest, int):
            rest = RangeSet([(0, rest)]) if rest else None
        try:
            partial = PartialFile(real, {"path": vpath, "size": self.allo}, size=self.allo,
                                  resume=False, restart=rest, durable=self.server.durable)
        except (TransferError, OSError) as exc:
            self._reset_transfer_state()
            if isinstance(exc, TransferError):
                raise _Reply(554, f"Cannot restart: {exc}.") from None
            raise _Reply(553, f"{vpath}: {exc.strerror}.") from None
        allo, scks = self.allo, self.scks
        limit = allo if allo is not None else self.server.max_file_size
        if self._grant is not None:
            limit = min(limit, self._grant.granted)
        try:
            self.reply(150, f"Opening BINARY mode data connection for {vpath}.")
            if self.mode == "E":
                ok = self._receive_mode_e(partial, 0, limit, protection)
            else:
                ok = self._receive_mode_s(partial, partial.held.contiguous_end(0), limit, protection)
            if ok:
                self._commit(vpath, real, partial, allo, scks)
            elif self._overrun:
                partial.discard()       # refused for the quota: nothing of it stays to count against it
        finally:
            partial.close()
            self._reset_transfer_state()

    def _receive_mode_e(self, sink, shift: int, limit: int | None, protection) -> bool:
        """Receive into ``sink``; sends markers; returns True when all data arrived (else replied)."""
        counter = Counter()
        receiver = ModeEReceiver(sink, shift=shift, limit=limit, counter=counter, keep_open=True,
                                 throttle=self._throttle(), drain=self.allo is None)
        cached = self.data.claim()
        for sock in cached:     # the connections kept from the session's last upload (GFD.20 caching)
            receiver.add_connection(sock, reused=True)
        listener = self.data.passive[0]     # still open: the sender may add connections
        acceptor = accept_connections(listener, receiver, protection=protection, allow=self._data_allow(protection),
                                      timeout=self.server.accept_timeout, on_first=self.data.reached,
                                      what=f"session {self.peer} ({self.dn})")
        partial = sink if isinstance(sink, PartialFile) else None

        def markers() -> None:
            if partial is not None:
                fresh = partial.checkpoint()
                if fresh:
                    self.reply(111, f"Range Marker {fresh.format()}")
            self.reply(112, format_perf_marker(counter.total))

        def cancel() -> None:
            receiver.fail(TransferError("transfer aborted"))

        finished = self._wait(receiver.wait, markers, cancel)
        keep = finished and receiver.error is None and receiver.kept
        if not keep:
            shutdown_listener(listener)
        # else the listener stays for the next transfer over the kept connections (the sender may add some); the
        # acceptor ends at once all the same (the receiver's end wakes it)
        acceptor.join(timeout=5)
        kept = receiver.close()
        if kept:
            self.data.keep(kept, self._data_purpose(False), DATA_CACHE_IDLE)
            if keep:
                self._keep_listener(listener)
        if partial is not None:
            fresh = partial.checkpoint()
            if fresh:
                self.reply(111, f"Range Marker {fresh.format()}")
        if not finished:
            self._aborted()
            return False
        if receiver.error is not None:
            if self._size_overrun(receiver.error):
                return False
            code = 432 if isinstance(receiver.error, AuthenticationError) else 426
            self.reply(code, f"Transfer aborted: {receiver.error}")
            return False
        if receiver.corrupt_blocks:
            self.reply(451, f"{len(receiver.corrupt_blocks)} blocks flagged as corrupt; restart to resend them.")
            return False
        log.info("session %s: received %d bytes over %d MODE E streams%s", self.peer, counter.total,
                 receiver.connections, f" (reused {len(cached)} cached data connections)" if cached else "")
        return True

    def _receive_mode_s(self, sink, start: int, limit: int | None, protection) -> bool:
        done = self._stream_mode(lambda sock: receive_stream(sock, sink, start, limit=limit, throttle=self._throttle(),
                                                             drain=self.allo is None), protection)
        if isinstance(sink, PartialFile):
            sink.checkpoint()
        return done

    def _commit(self, vpath: str, real: Path, partial: PartialFile, allo: int | None,
                scks: tuple[str, str] | None) -> None:
        size = allo if allo is not None else partial.held.contiguous_end(0)
        expected = scks[1] if scks and scks[0] == "SHA256" else None
        if scks and scks[0] != "SHA256" and not partial.missing(size):
            actual = hash_fd(partial.fd, scks[0], 0, size)
            if actual != scks[1]:
                partial.discard()
                self.reply(554, f"Checksum mismatch: {scks[0]} {actual} is not {scks[1]}; file discarded.")
                return
        try:
            digest = partial.commit(size, expected)
        except TransferError as exc:
            self.reply(451, f"Transfer incomplete: {exc}")
            return
        except ChecksumMismatch as exc:
            partial.discard()
            self.reply(554, f"Checksum mismatch: received sha256 {exc.actual} is not {exc.expected}; file discarded.")
            return
        except OSError as exc:
            self.reply(451, f"Cannot store {vpath}: {exc.strerror}.")
            return
        try:
            st = os.stat(real)
            self.server.checksums.put(_cache_key(st, "SHA256", 0, st.st_size), digest)
            self.server.files.committed(vpath, real, digest)
        except Exception:
            log.exception("post-commit hook failed for %s", vpath)
        self._complete()

    def _receive_in_place(self, vpath: str, offset: int) -> None:
        try:
            real = self._writable_target(vpath)
            self._need_data(sending=False)
            protection = self._protection()
            if self.rest is not None:
                raise _Reply(503, "REST is not used with ESTO; the offset says where the data goes.")
            self.allo = None            # ESTO's size is where its data ends: only the quota bounds it
            try:
                grant = self.server.grant(vpath, real, None, self.server.max_file_size)
            except QuotaExceeded as exc:
                raise _Reply(552, str(exc)) from None
            if offset >= (self.server.max_file_size if grant is None else grant.granted):
                # no byte at that offset could land: refused now, before a file is made for it
                if grant is not None:
                    grant.release()
                    raise _Reply(552, f"{grant.exceeded()}")
                raise _Reply(552, _too_large(self.server.max_file_size))
            try:
                fd = os.open(real, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                if grant is not None:
                    grant.release()
                raise _Reply(553, f"{vpath}: {exc.strerror}.") from None
        except _Reply:
            self._reset_transfer_state()
            raise
        sink = _FdSink(fd)
        limit = self.server.max_file_size if grant is None else grant.granted
        self._grant, self._overrun = grant, False
        try:
            self.reply(150, f"Opening BINARY mode data connection for {vpath} at offset {offset}.")
            if self.mode == "E":
                ok = self._receive_mode_e(sink, offset, limit, protection)
            else:
                ok = self._receive_mode_s(sink, offset, limit, protection)
            if ok:
                self._complete()
        finally:
            self._grant = None
            if grant is not None:
                grant.release()
            os.close(fd)
            self._reset_transfer_state()


def _too_large(limit: int, then: str = "") -> str:
    """The 552 of a file over the server's bound on files (``max_file_size``), which no quota or deletion changes."""
    return f"Files may not exceed {limit} bytes here (the server's max_file_size){'; ' + then if then else ''}."


def _past_bound(error: BaseException) -> bool:
    """Is ``error`` the data channel's refusal of bytes past the bound it was given (:class:`SizeLimitExceeded`, from
    ModeEReceiver and receive_stream)? Other protocol errors (a stream closed before its end, a bad EOF block) are
    not, whatever their words."""
    return isinstance(error, SizeLimitExceeded)


class _FdSink:
    """Writes received blocks straight into an open file (ESTO)."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def record(self, start: int, end: int) -> None:
        """Spliced bytes need no bookkeeping here."""


