"""Cold migration, the poster's second flow: freeze the instance on this node, have the target node
register it *as the user* (an RFC 3820 proxy the client delegated to this node), let the target pull the
overlay and the saved memory state over GridFTP, restore and resume it there, then release it here.

Who decides: the target. Its CompleteMigration(commit) is the one commit point; until it answers
``committed`` the instance is the source's (Migrating here, Incoming there: prepared, then restored paused), and
every failure rolls back: the target drops what it holds, the source restores the instance as it was. A node that
restarts settles its half with the other node (:func:`reconcile`): an Incoming instance is dropped (never
committed), a Migrating one asks the target, which answers committed or aborted; while the target cannot
be reached the instance stays Migrating (frozen, not running anywhere) and the sweep asks again.

Phases (``states.MIGRATION_PHASES``), timed into the instance's PhaseTimings on the target: authorize (source),
prepare (target, AcceptMigration step prepare, while the guest still runs at the source: the downtime does not
count it), freeze (source), transfer and restore (target, AcceptMigration step transfer), resume and fixup (target,
CompleteMigration; guestd answers only once the guest runs), release (source). The guest is frozen only after the
target said yes to the prepare; a prepared instance whose files never come is dropped by the target's sweep
(``migration_prepare_timeout``) or when the source aborts or settles. Crashpoints ``migration.<step>`` for the kill
tests.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Protocol
from urllib.parse import urlsplit, urlunsplit

import gridftp
from gridftp.checksum import hash_file
from gridftp.face import GridFTPFace
from gridftp.growing import Following, Growth
from security.client import host_authorizer
from security.delegation import DelegationError, accept as accept_delegation
from security.pki import Credential, host_of
from services.common.crash import crashpoint
from services.common.errors import printable
from services.soapclient import ClientError
from services.faults import (AccessDenied, IllegalTransition, InstanceMoved, InternalFault, InvalidArgument,
                             LimitExceeded, MigrationFault, ResourceUnknown, ServiceUnavailable, TransferFault,
                             VMGridFault, VMMFault, ChecksumMismatch)
from services.vmmanager import guestcred, phases, states
from services.vmmanager.context import build_context, new_token
from services.vmmanager.phases import vmm_call
from services.vmmanager.states import State
from services.vmmanager.store import Instance
from services.vmmanager.values import InstanceView, MigrationFile, MigrationOffer
from services.vmmanager.vmm import Disk, VMMError
from services.wsrf.notification import Destination, Unresolved, lookup

if TYPE_CHECKING:        # the types the node core's parts have (imported for the annotations only)
    from security.trust import TrustStore
    from services.authz.pep import Enforcer
    from services.vmmanager.config import VMManagerConfig
    from services.vmmanager.imagecache import ImageCache
    from services.vmmanager.phases import NodeParts
    from services.vmmanager.store import LeaseRange, NodeStore
    from services.vmmanager.vmm import VMM
    from services.wsrf.notification import ConsumerPolicy

log = logging.getLogger("vmgrid.vmmanager.migration")

SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    key       TEXT PRIMARY KEY,
    role      TEXT NOT NULL,          -- source | target | moved (the instance left: moved_to says where)
    peer      TEXT NOT NULL,          -- the other node's VMManager URL
    prior     TEXT NOT NULL,          -- the instance's state before it was frozen
    proxy     BLOB,                   -- source: the delegated proxy chain (public; its key is the host key)
    started   REAL NOT NULL
);
"""
STATE_FILE = "state.save"
FILE_NAME = re.compile(r"^[a-z]+[0-9]*\.(qcow2|save)$")
MAX_FILES = 16
GUEST_TOKEN = "guest.token"      # on the target, from the offer to the fixup: the token guestd holds (0600)
_GUEST_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
FOLLOW_READY = 10.0              # seconds the prepare waits for the target's GridFTP sessions to be up
PROOF_AGE = 600.0                # seconds a source's countersignature of an offer is taken after it was made
PROOF_AHEAD = 300.0              # ... and before (the nodes' clocks apart)
MAX_INCOMING_PER_USER = 8        # Incoming instances (prepared or transferred, not committed) of one owner here
MAX_INCOMING_PER_NODE = 32       # ... of everyone


@dataclass(frozen=True)
class Record:
    key: str
    role: str
    peer: str
    prior: str
    proxy: bytes | None
    started: float


class Records:
    """The node's migration records, in the node's database (a table of their own), and what a prepared migration
    holds in memory beside its record while it lives: the source pinned at the prepare (:class:`SourceFiles`) and
    the followers of its files (:func:`_follow`). Both are the node's (one ``Records`` a node) and go with the
    record: whatever ends a migration here (commit, abort, a failure, the sweep, a restart) removes its record, and
    that removes them."""

    def __init__(self, store):
        self.store = store
        store.db.conn().executescript(SCHEMA)
        self._lock = threading.Lock()
        self._sources: dict[str, SourceFiles] = {}              # key -> a prepared migration's pinned source
        self._following: dict[str, dict[str, Following]] = {}   # key -> file name -> its follower

    def pin(self, key: str, source: SourceFiles) -> None:
        with self._lock:
            self._sources[key] = source

    def pinned(self, key: str) -> SourceFiles | None:
        with self._lock:
            return self._sources.get(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def follow(self, key: str, followers: dict[str, Following]) -> dict[str, Following]:
        """``followers`` are now those of ``key``'s files; the ones they replace (the caller cancels them)."""
        with self._lock:
            old = self._following.pop(key, None) or {}
            self._following[key] = followers
        return old

    def take_followers(self, key: str) -> dict[str, Following]:
        """The followers of ``key``'s files, no longer held here (the caller takes or cancels them)."""
        with self._lock:
            return self._following.pop(key, None) or {}

    def held(self, key: str) -> bool:
        """Whether anything of ``key``'s migration is held in memory here (a pinned source, followers)."""
        with self._lock:
            return key in self._sources or key in self._following

    def _let_go(self, key: str) -> None:
        """The record of ``key`` is gone: so is what its migration held in memory (followers cancelled)."""
        self.unpin(key)
        for f in self.take_followers(key).values():
            f.cancel()

    def put(self, key: str, role: str, peer: str, prior: str, proxy: bytes | None = None) -> None:
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO migrations (key, role, peer, prior, proxy, started) VALUES (?,?,?,?,?,?)",
                       (key, role, peer, prior, proxy, time.time()))

    def get(self, key: str) -> Record | None:
        row = self.store.db.conn().execute("SELECT key, role, peer, prior, proxy, started FROM migrations WHERE key = ?",
                                           (key,)).fetchone()
        return Record(*row) if row else None

    def of_role(self, role: str) -> list[Record]:
        return [Record(*r) for r in self.store.db.conn().execute(
            "SELECT key, role, peer, prior, proxy, started FROM migrations WHERE role = ?", (role,))]

    def drop(self, key: str) -> None:
        with self.store.write() as db:
            db.execute("DELETE FROM migrations WHERE key = ?", (key,))
        self._let_go(key)

    def forget_instance(self, key: str) -> None:
        """Remove the instance's row entirely (the target's half of an aborted migration leaves nothing)."""
        with self.store.write() as db:
            db.execute("DELETE FROM instances WHERE key = ?", (key,))
            db.execute("DELETE FROM subscriptions WHERE instance_key = ?", (key,))
            db.execute("DELETE FROM migrations WHERE key = ?", (key,))
        self._let_go(key)


class _ExportSpace(gridftp.LocalFileSpace):
    """The instance directories, with the files of a migration that are still being written served as they grow."""

    def __init__(self, root: Path, exports: "Exports"):
        super().__init__(root)
        self.exports = exports

    def growing(self, vpath: str):
        return self.exports.growths.get(vpath)


class Exports:
    """The source's GridFTP face over its instance directories: during a migration, exactly that instance's
    files, read-only, to the target node's host certificate; nothing else, and nothing once it is over.

    From the prepare on, the files are exported as still being written (:mod:`gridftp.growing`): the target asks
    for them at once and the face holds its RETRs; the saved state is served while the save writes it (its
    head, which libvirt rewrites at the end, last), the disks once the save is done (:meth:`complete`). A save
    that fails, or a migration rolled back, aborts what the target follows (:meth:`close`)."""

    def __init__(self, instances_dir: Path, credential: Credential, trust, address: str,
                 server_options: dict | None = None):
        self.instances_dir = instances_dir
        self.server_options = server_options or {}     # GridFTPFace's: bounds on sessions, the guests' DN patterns
        self.credential = credential
        self.trust = trust
        self.address = address
        self.port = 0                 # [vmmanager] migration_port (0: any free port), set at start (check_port)
        self.face: GridFTPFace | None = None
        self._allowed: dict[str, object] = {}      # vpath -> authorizer of the target's host DN
        self.growths: dict[str, Growth] = {}       # vpath -> where the file being written stands
        self._lock = threading.Lock()

    def _start(self) -> GridFTPFace:
        host = urlsplit(self.address).hostname or "localhost"
        face = GridFTPFace(_ExportSpace(self.instances_dir, self), face_address(host), self.port, self.credential,
                           self.trust, authorize=self.authorize, upload_area="/nowhere", public_host=host,
                           what="migrating instances", log=log, **{**self.server_options, "refuse_guests": True})
        face.start()
        return face

    def listen(self) -> None:
        """The face opened at the node's start when [vmmanager] migration_port is set: the port the site's firewall
        opens is listened on from then on, and a port this node cannot take stops the start (a ValueError naming
        the key) instead of failing the first migration out."""
        with self._lock:
            if self.face is None:
                try:
                    self.face = self._start()
                except OSError as exc:
                    raise _cannot_listen(self.port, exc) from None

    def open(self, key: str, names: list[str], target: str) -> str:
        """Export ``names`` of instance ``key`` to the node at ``target``, as files still to be written (the state
        file served as it grows, the disks once complete); the base URL of the files."""
        with self._lock:
            if self.face is None:
                try:
                    self.face = self._start()
                except OSError as exc:       # the site's to mend: named, and in the node's log
                    raise _face_fault(self.port, exc) from None
            allowed = host_authorizer(target)
            for name in names:
                vpath = f"/{key}/{name}"
                self._allowed[vpath] = allowed
                self.growths[vpath] = Growth(self.instances_dir / key / name, stream=name == STATE_FILE)
            return self.face.base_url

    def begin(self, key: str) -> None:
        """The save of ``key`` starts now (its state file from now on is the one to send)."""
        for vpath, growth in self._of(key):
            growth.begin()

    def complete(self, key: str) -> None:
        """The files of ``key`` are final: what the target follows is sent to its end."""
        for vpath, growth in self._of(key):
            growth.complete()

    def _of(self, key: str) -> list[tuple[str, Growth]]:
        with self._lock:
            return [(v, g) for v, g in self.growths.items() if v.startswith(f"/{key}/")]

    def close(self, key: str) -> None:
        with self._lock:
            for vpath in [v for v in self._allowed if v.startswith(f"/{key}/")]:
                del self._allowed[vpath]
            for vpath in [v for v in self.growths if v.startswith(f"/{key}/")]:
                self.growths.pop(vpath).fail("the migration is over")

    def authorize(self, dn: str | None, op: str, vpath: str) -> bool:
        allowed = self._allowed.get(vpath)
        return dn is not None and op == "read" and allowed is not None and allowed(SimpleNamespace(dn=dn))

    def stop(self) -> None:
        with self._lock:
            face, self.face = self.face, None
        if face is not None:
            face.stop()


def face_address(host: str) -> str:
    """The address the migration face listens on for a node whose URL names ``host``: loopback for a node known as
    localhost (a local grid), else every address."""
    return "127.0.0.1" if host in ("localhost", "127.0.0.1") else "0.0.0.0"


def check_port_free(host: str, port: int) -> None:
    """`vmgrid serve`, before any state is opened: a set [vmmanager] migration_port that the face of a node whose URL
    names ``host`` cannot listen on is refused (the ValueError :meth:`Exports.listen` gives). Bound as the face binds
    it (SO_REUSEADDR) and let go at once: the face itself is opened at the node's start, which still refuses a port
    another process took in between."""
    if not port:
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((face_address(host), port))
            probe.listen(1)
    except OSError as exc:
        raise _cannot_listen(port, exc) from None


def _cannot_listen(port: int, exc: OSError) -> ValueError:
    held = " (another process listens on it: give a free port, or 0 for any)" if exc.errno == errno.EADDRINUSE else ""
    return ValueError(f"[vmmanager] migration_port = {port}: the migration face cannot listen on it: "
                      f"{exc.strerror or exc}{held}")


def _face_fault(port: int, exc: OSError) -> MigrationFault:
    """The fault of a migration out whose source could not open its migration face, logged as a warning."""
    where = f"[vmmanager] migration_port {port} of the source" if port else "a free port of the source"
    why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror or exc})"
    log.warning("migration face: %s %s: migrations out fail until the node's operator mends it", where, why)
    return MigrationFault(f"{where} {why}: tell the site's operator", cause="MigrationPort")


class Peer(Protocol):
    """The other node's VMManager, called as the user with the delegated proxy (built by the SOAP face:
    :class:`services.vmmanager.migration_peer.SoapPeer`)."""

    url: str

    def accept(self, offer: MigrationOffer) -> object:
        """AcceptMigration; the instance as the target shows it (opaque to the core)."""

    def complete(self, key: str, commit: bool) -> tuple[str, object]:
        """CompleteMigration: ('committed', the instance there) or ('aborted', None); ResourceUnknown if unknown."""

    def close(self) -> None: ...


class MigratingNode(Protocol):
    """What migration needs of the node core (:class:`services.vmmanager.node.Node`, which calls this module: the
    node sits a layer above, so this module names the node's parts it works with here, never imports it)."""

    node: str                      # the node's name
    address: str                   # its public VMManager URL
    config: VMManagerConfig
    store: NodeStore
    parts: NodeParts
    cache: ImageCache
    repository: object             # services.vmmanager.repository.RepositoryAccess (or a test's fake)
    vmm: VMM
    authz: Enforcer
    consumers: ConsumerPolicy
    credential: Credential | None  # the host credential (None: this node cannot migrate)
    trust: TrustStore | None
    peer_factory: Callable[..., Peer] | None   # (url, credential, trust, timeout, *, connect_to) -> Peer
    migrations: Records
    exports: Exports | None

    @property
    def pool(self) -> LeaseRange: ...

    def view(self, inst: Instance) -> InstanceView: ...

    def _authorized(self, caller, key: str, action: str, *, inst: Instance | None = None, **context) -> Instance: ...

    def _locked(self, key: str) -> ContextManager[None]: ...

    def _resource(self, inst: Instance) -> dict[str, str]: ...

    def _set_state(self, key: str, new: State, *, expect: set[State] | None = None, **values) -> bool: ...

    def _release(self, key: str, quiet: bool = False, final: State | None = None, **values) -> None: ...

    def _release_central(self, kind: str, key: str, arg: str = "") -> bool: ...


class Unsettled(Exception):
    """The target could not be asked; the instance stays Migrating until it can."""


# -- helpers ------------------------------------------------------------------------------------------------------
@contextmanager
def timed(into: list, name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    into.append((name, time.perf_counter() - t))


def _cause(exc: BaseException) -> str:
    return getattr(exc, "element", "") or type(exc).__name__


def _describe(exc: BaseException) -> str:
    return getattr(exc, "description", None) or str(exc) or type(exc).__name__


def _check_target(node: MigratingNode, target: str, caller_dn: str | None = None) -> Destination:
    """``target`` checked: a VMManager URL, not this node, its name resolved (within the policy's deadline) to
    addresses this node may call; the migration connects to those addresses only (``Destination.addresses``).
    ``caller_dn``: whom the lookups are for (the user's own bound on lookups under way: wsrf.notification.lookup)."""
    parts = urlsplit(target)
    if parts.scheme not in ("https", "http") or not parts.hostname or not parts.path.endswith("/VMManagerService"):
        raise InvalidArgument(f"the target {target!r} is not a VMManager URL (https://host:port/wsrf/services/"
                              f"VMManagerService)", argument="target")
    if any(_canonical_url(target) == _canonical_url(u) for u in _own_urls(node, target, caller_dn)):
        raise InvalidArgument("the target is this node; migrate to another node", argument="target")
    try:        # the address rule of Subscribe's consumers: not the node's own loopback or link-local ones
        return node.consumers.resolve(target, what="migration target", caller=caller_dn)
    except Unresolved as exc:
        raise ServiceUnavailable(f"the target {target!r} cannot be called now: {exc}", service="DNS") from None
    except PermissionError as exc:
        raise InvalidArgument(f"the target {target!r} is not one this node may call: {exc}", argument="target") from None


def _own_urls(node: MigratingNode, asked: str | None = None, caller_dn: str | None = None) -> Iterator[str]:
    """This node's VMManager URL (its address) and the same URL under each other name that reaches this very
    node: a name its host certificate gives it (the subject's host/NAME, a subjectAltName DNS name or IP address)
    that resolves to an address its address's host resolves to, the scheme, port and path the same
    (``https://127.0.0.1:8444/...`` for ``https://localhost:8444/...``). A source signs its offer for the URL it
    was given and the target takes the offer under any of these (:func:`verify_source`): the proof still names
    this node, only spelt another way. ``asked``: only the spellings that could be that URL are looked for (no
    name is resolved for a URL of another scheme, port or path, or with the address's own host). The address
    comes first, the other names are resolved only when they are asked for (a generator), each lookup counted
    as ``caller_dn``'s (whose request asked for it)."""
    yield node.address
    own = urlsplit(node.address)
    if asked is not None:
        other = urlsplit(asked)
        same_place = (other.scheme.lower(), _port_of(other), other.path.rstrip("/")) == \
            (own.scheme.lower(), _port_of(own), own.path.rstrip("/"))
        if not same_place or (other.hostname or "").lower() == (own.hostname or "").lower():
            return
    cert = node.credential.certificate if node.credential is not None else None
    if cert is None or not own.hostname:
        return
    port = _port_of(own)
    reached = _addresses(own.hostname, port, caller_dn)
    for name in _certificate_names(cert)[:MAX_SPELLINGS]:
        if name.lower() == own.hostname.lower() or not reached & _addresses(name, port, caller_dn):
            continue
        host = f"[{name}]" if ":" in name else name
        yield urlunsplit((own.scheme, f"{host}:{own.port}" if own.port else host, own.path, "", ""))


MAX_SPELLINGS = 16      # names of a host certificate looked at as other spellings of the node's URL


def _port_of(parts) -> int | None:
    try:
        return parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower())
    except ValueError:
        return None


def _addresses(host: str, port: int | None, caller_dn: str | None = None) -> set[str]:
    """The addresses ``host`` resolves to (none when it does not, or not within the resolver's deadline)."""
    try:
        return {info[4][0] for info in lookup(host, port, what="host", caller=caller_dn)}
    except (OSError, UnicodeError, ValueError):
        return set()


def _certificate_names(cert) -> list[str]:
    """The host names a host certificate gives its host: the subject's host/NAME, then its subjectAltName DNS names
    (not wildcards) and IP addresses."""
    from cryptography import x509
    from security.pki import dn_string
    names = [host_of(dn_string(cert.subject)) or ""]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names += [n for n in san.get_values_for_type(x509.DNSName) if "*" not in n]
        names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    return [n for n in dict.fromkeys(names) if n]


def _peer(node: MigratingNode, dest: Destination, credential: Credential) -> Peer:
    """The target at ``dest`` (its URL checked by the node's address policy): connected to at the addresses checked,
    never at what its name resolves to later (DNS rebinding)."""
    if node.peer_factory is None:
        raise InternalFault("this node cannot call other nodes (no peer factory)", incident=dest.url)
    return node.peer_factory(dest.url, credential, node.trust, node.config.migration_timeout,
                             connect_to=dest.addresses)


def _disk_files(home: Path) -> list[str]:
    return sorted(p.name for p in home.glob("*.qcow2"))


# -- the source's side ---------------------------------------------------------------------------------------------
def _file_list(home: Path, names: list[str]) -> tuple[MigrationFile, ...]:
    """The files to send with their sizes and BLAKE3 digests, hashed side by side (the hash lets go of the GIL).
    This is inside the downtime: BLAKE3 (the Rust implementation, on every core) instead of SHA-256 took the
    digests of a 512 MiB guest's files (115-126 MB) from 0.2-0.6 s to 0.06-0.23 s (bench/bench_migrate.py)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda n: hash_file(home / n, "BLAKE3"), names))
    return tuple(MigrationFile(n, (home / n).stat().st_size, blake3=h) for n, h in zip(names, digests))


def migrate(node: MigratingNode, caller, key: str, target: str, mode: str, proxy_pem: bytes) -> tuple[object, list]:
    """Migrate: (the instance as the target shows it: its new EPR, the phases of this node after the target
    answered). MigrationFault on failure (rolled back)."""
    started = time.perf_counter()
    inst = node._authorized(caller, key, "vm.migrate", target=target)
    states.check(inst.state_enum, "migrate")
    if mode != "Cold":
        raise InvalidArgument(f"migration mode {mode!r} is not supported; this node migrates Cold (save, move, "
                              f"restore)", argument="mode")
    dest = _check_target(node, target, caller.dn)
    if node.credential is None:
        raise InternalFault("this node has no host credential to migrate with", incident=key)
    if getattr(caller, "limited", False):
        raise AccessDenied("a limited proxy cannot migrate", subject=caller.dn, action="vm.migrate", resource=key,
                           rule="limited-proxy")
    try:
        credential = accept_delegation(proxy_pem, node.credential, node.trust, expected_dn=caller.dn)
    except DelegationError as exc:
        raise InvalidArgument(f"delegatedProxy: {exc.reason}", argument="delegatedProxy") from None
    if credential.limited:
        raise AccessDenied("the delegated proxy is limited: a limited proxy cannot migrate", subject=caller.dn,
                           action="vm.migrate", resource=key, rule="limited-proxy")
    timings: list[tuple[str, float]] = [("authorize", time.perf_counter() - started)]
    records = node.migrations
    with node._locked(key), _in_progress(node, key):
        inst = node.store.get(key)
        states.check(inst.state_enum, "migrate")
        prior = inst.state_enum
        peer = _peer(node, dest, credential)
        records.put(key, "source", target, prior.value, proxy_pem)
        node._set_state(key, State.MIGRATING, expect={prior})
        phase = "prepare"
        try:
            # prepare at the target while the guest still runs here: the user authorized there, the instance
            # registered Incoming, an address leased, the base image staged; only a yes freezes it
            home = node.parts.home(key)
            names = _disk_files(home) + [STATE_FILE]
            domain_uuid = vmm_call("inspect", node.vmm.spec_of, key).uuid
            base = node.exports.open(key, names, target)
            offer = MigrationOffer(key=key, identifier=inst.identifier, owner=inst.owner,
                                   descriptor=phases.descriptor_of(inst), descriptor_xml=inst.descriptor,
                                   termination=inst.termination, max_lifetime=inst.max_lifetime, state=prior.value,
                                   source=node.address, files_url=base, files=(), phases=tuple(timings),
                                   subscriptions=_subscriptions(node, key), step="prepare", vmm=node.config.vmm)
            prepared = time.perf_counter()
            peer.accept(sign_offer(offer, node.credential, target))
            log.info("instance %s: prepared at %s in %.3f s (before the freeze)", key, target,
                     time.perf_counter() - prepared)
            crashpoint("migration.prepared")
            phase = "freeze"
            with timed(timings, "freeze"):
                frozen = time.perf_counter()
                if prior in (State.RUNNING, State.PAUSED):
                    state_file = home / STATE_FILE
                    state_file.unlink(missing_ok=True)
                    node.exports.begin(key)          # the target, which asked for it, gets it as it is written
                    vmm_call("save", node.vmm.save, key, state_file)
                    node.store.unbind_port(key)       # its tap is gone; the target binds its own (guard.py)
                    phases.sync_guard(node.parts)
                node.exports.complete(key)
                crashpoint("migration.frozen")
                saved = time.perf_counter()
                files = _file_list(home, names)
                log.info("instance %s: freeze phase: save %.3f s, BLAKE3 of %d bytes %.3f s", key,
                         saved - frozen, sum(f.size for f in files), time.perf_counter() - saved)
            phase = "transfer"
            peer.accept(sign_offer(dataclasses.replace(offer, files=files, phases=tuple(timings), uuid=domain_uuid,
                                                       guest_token=_guest_token(node, inst), step="transfer"),
                                   node.credential, target))
            crashpoint("migration.accepted")
        except BaseException as exc:
            failed_in = phase
            phase = getattr(exc, "phase", None) or phase
            # a failed prepare froze nothing: the guest runs on as it was (a state file there is not this one's)
            _rollback(node, key, prior, peer, abort=True, frozen=failed_in != "prepare")
            # the target's prepare claimed the instance's slot (its claimant then) and gave it back when it dropped
            # the instance: it is claimed back here, where the instance runs on
            _claim_back(node, caller, key)
            raise _fault(exc, phase, target) from None
        # the commit: the target resumes the instance, from then on it lives there
        try:
            _, resp = peer.complete(key, commit=True)
        except BaseException as exc:
            log.warning("migration of %s: commit at %s failed (%s); asking the target", key, target, _describe(exc))
            try:
                resp = _settle_with(node, key, peer)
            except Unsettled:
                raise MigrationFault(f"the target did not answer the commit and cannot be asked now: the instance "
                                     f"stays Migrating (frozen) until this node settles it with {target}",
                                     phase="resume", target=target, cause=_cause(exc)) from None
            if resp is None:        # aborted there: it runs here again
                _rollback(node, key, prior, peer, abort=False)
                _claim_back(node, caller, key)
                raise _fault(exc, "resume", target) from None
        crashpoint("migration.committed")
        released = _finish(node, key, target)
    peer.close()
    return resp, [("release", released)]


_ACTIVE: set[tuple[int, str]] = set()     # (node, key) of the migrations this process runs now
_ACTIVE_LOCK = threading.Lock()


@contextmanager
def _in_progress(node: MigratingNode, key: str) -> Iterator[None]:
    with _ACTIVE_LOCK:
        _ACTIVE.add((id(node), key))
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard((id(node), key))


def _running_here(node: MigratingNode, key: str) -> bool:
    with _ACTIVE_LOCK:
        return (id(node), key) in _ACTIVE


def _subscriptions(node: MigratingNode, key: str) -> tuple[tuple[str, str, float], ...]:
    rows = node.store.db.conn().execute("SELECT consumer, subscriber, expires FROM subscriptions "
                                        "WHERE instance_key = ? AND expires > ?", (key, time.time()))
    return tuple((r[0], r[1], r[2]) for r in rows)


def _fault(exc: BaseException, phase: str, target: str) -> MigrationFault:
    if isinstance(exc, ClientError):
        # no typed answer from a VMManager there: what the target answered instead (an HTTP status, a page that is
        # no WSDL) stays in this node's log, the caller is not told (it would make Migrate a scan of what the node
        # reaches)
        log.warning("migration to %s failed in phase %s: %s", target, phase, _describe(exc))
        return MigrationFault(f"migration to {target} failed in phase {phase} and was rolled back: the target was "
                              f"not reachable as a VMManager", phase=phase, target=target, cause="Unreachable")
    if isinstance(exc, MigrationFault):
        return MigrationFault(f"migration to {target} failed in phase {exc.phase or phase} and was rolled back: "
                              f"{exc.description}", phase=exc.phase or phase, target=target, cause=exc.cause)
    return MigrationFault(f"migration to {target} failed in phase {phase} and was rolled back: {_describe(exc)}",
                          phase=phase, target=target, cause=_cause(exc))


def _rollback(node: MigratingNode, key: str, prior: State, peer: Peer | None, *, abort: bool, frozen: bool = True) -> None:
    """The instance as it was on this node; nothing of it at the target. ``frozen`` False: the instance was never
    saved for this migration (it failed in prepare), so it is not restored from a state file."""
    node.exports.close(key)
    if abort and peer is not None:
        try:
            peer.complete(key, commit=False)
        except ResourceUnknown:
            pass
        except Exception as exc:   # noqa: BLE001 - the target drops an Incoming instance by itself (timeout, restart)
            log.warning("migration of %s: could not tell %s to abort: %s", key, peer.url, _describe(exc))
    state_file = node.parts.home(key) / STATE_FILE
    if frozen and prior in (State.RUNNING, State.PAUSED) and state_file.exists():
        try:
            if node.parts.guard is not None and node.store.bind_port(key):    # its tap, guarded again first
                phases.sync_guard(node.parts, strict=True)
            node.vmm.restore(state_file, paused=prior == State.PAUSED)
            state_file.unlink(missing_ok=True)
        except (VMMError, VMMFault) as exc:
            log.error("migration of %s: restoring it here failed: %s", key, exc)
            node._set_state(key, State.SAVED, expect={State.MIGRATING})
            node.migrations.drop(key)
            return
    node._set_state(key, prior, expect={State.MIGRATING})
    node.migrations.drop(key)
    log.info("migration of %s rolled back: %s again on this node", key, prior.value)


def _finish(node: MigratingNode, key: str, target: str) -> float:
    """After the commit: release everything here (not the slot: it moved with the instance); returns the time."""
    t = time.perf_counter()
    node.exports.close(key)
    node._release(key, quiet=True)
    node._set_state(key, State.MIGRATED, expect={State.MIGRATING})
    rec = node.migrations.get(key)
    node.migrations.put(key, "moved", target, rec.prior if rec else "", None)
    log.info("instance %s migrated to %s", key, target)
    return time.perf_counter() - t


def _settle_with(node: MigratingNode, key: str, peer: Peer):
    """Ask the target how the migration ended (an abort that answers committed if it was): the
    CompleteMigrationResponse when committed, None when aborted or unknown there; Unsettled if it cannot be
    reached."""
    try:
        outcome, resp = peer.complete(key, commit=False)
    except ResourceUnknown:
        return None
    except VMGridFault as exc:
        raise Unsettled(exc.description) from None
    except Exception as exc:   # noqa: BLE001 - unreachable, a broken answer: ask again later
        raise Unsettled(str(exc)) from None
    return resp if outcome == "committed" else None


def settle(node: MigratingNode, key: str) -> str:
    """A Migrating instance whose migration was interrupted (a restart, an unanswered commit): 'committed'
    (released here), 'rolled-back' (as it was here), or 'unsettled' (the target cannot be asked yet)."""
    if _running_here(node, key):
        return "in-progress"
    with node._locked(key):
        return _settle(node, key)


def _settle(node: MigratingNode, key: str) -> str:
    rec = node.migrations.get(key)
    inst = node.store.get(key)
    if inst is None or inst.state_enum != State.MIGRATING:
        return "none"
    prior = State(rec.prior) if rec else State.SAVED
    if rec is None or not rec.proxy:
        _rollback(node, key, prior, None, abort=False)
        return "rolled-back"
    try:
        credential = accept_delegation(rec.proxy, node.credential, node.trust)
    except DelegationError:   # expired: the target's Incoming instance has been dropped by then
        _rollback(node, key, prior, None, abort=False)
        return "rolled-back"
    try:        # the target's name is checked again (it may resolve elsewhere now): a refused one is not asked
        dest = node.consumers.resolve(rec.peer, what="migration target", caller=inst.owner)
    except PermissionError as exc:
        log.warning("instance %s: the migration target %s cannot be asked now: %s", key, rec.peer, exc)
        return "unsettled"
    peer = _peer(node, dest, credential)
    try:
        try:
            resp = _settle_with(node, key, peer)
        except Unsettled:
            return "unsettled"
        if resp is not None:
            _finish(node, key, rec.peer)
            return "committed"
        _rollback(node, key, prior, None, abort=False)
    finally:
        peer.close()
    # aborted there: the target may have claimed the slot before its resume failed (it is then the claimant, and
    # its reconciliation would free the slot of an instance that runs here), so it is claimed back as the user who
    # asked for the migration, as the migration itself does when it learns the abort at once
    try:
        caller = node.trust.validate(credential.certificates)
    except Exception as exc:   # noqa: BLE001 - revoked or expired since: the slot stays as it is, said in the log
        log.warning("migration of %s rolled back: its slot cannot be claimed back as the user: %s", key, exc)
    else:
        _claim_back(node, caller, key)
    return "rolled-back"


# -- the source's countersignature of an offer -------------------------------------------------------------------
# AcceptMigration comes signed by the user (the proxy she delegated to the source), and the user could send it
# herself: the target would then restore a memory state and disks of her making, naming a source that never took
# part. So the source node countersigns every offer with its host credential, over what the target acts on (the
# instance, the step, both nodes' URLs, the files and their digests), and the target takes in nothing unless that
# signature is a host certificate's (not a proxy's) naming the source URL's host, a host in migration_sources, made
# for this target in the last minutes; the files then come only from a GridFTP server with that same host DN.
def _offer_bytes(offer: MigrationOffer, target: str, issued: str) -> bytes:
    d = offer.descriptor
    return json.dumps(["vmgrid-migration-offer/1", offer.key, offer.step, _canonical_url(offer.source),
                       _canonical_url(target), offer.files_url,
                       offer.owner, offer.state, offer.vmm, offer.uuid, d.image_id, d.sha256, issued,
                       [[f.name, f.size, f.sha256, f.blake3] for f in offer.files]],
                      separators=(",", ":")).encode()


def _sign(key, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise InternalFault(f"cannot sign a migration offer with a {type(key).__name__}", incident=data[:64].decode())


def _check_signature(public_key, signature: bytes, data: bytes) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        raise ValueError(f"a {type(public_key).__name__} signs no migration offer")


def sign_offer(offer: MigrationOffer, credential: Credential, target: str, now: float | None = None) -> MigrationOffer:
    """The offer countersigned by the source node (``credential``: its host credential) for ``target``."""
    import base64
    from services.common.xsdtime import format_datetime
    issued = format_datetime(time.time() if now is None else now)
    signature = _sign(credential.private_key, _offer_bytes(offer, target, issued))
    return dataclasses.replace(offer, proof=(credential.cert_pem().decode(), issued,
                                             base64.b64encode(signature).decode()))


def _canonical_url(url: str) -> str:
    """A VMManager URL as both nodes sign it: scheme and host in lower case, the port said, no trailing slash."""
    parts = urlsplit((url or "").strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port or ''}{parts.path.rstrip('/')}"


def _signed_for(signer, signature: bytes, offer: MigrationOffer, target: str) -> bool:
    try:
        _check_signature(signer.certificate.public_key(), signature, _offer_bytes(offer, target, offer.proof[1]))
    except Exception:   # noqa: BLE001 - InvalidSignature: another offer, another target, or altered
        return False
    return True


def verify_source(node: MigratingNode, caller, offer: MigrationOffer) -> str:
    """The host DN of the source node that countersigned ``offer`` for this node; AccessDenied (rule
    ``migration-source-proof``) naming why when it did not."""
    import base64

    from cryptography import x509
    from services.common.xsdtime import parse_datetime

    def refuse(why: str) -> AccessDenied:
        return AccessDenied(f"migration of {offer.key} refused: {why}", subject=caller.dn, action="vm.migrate",
                            resource=offer.key or "", rule="migration-source-proof")
    if not offer.proof:
        raise refuse("the offer carries no sourceProof, the source node's signature: this node takes in an "
                     "instance only when the source node itself offers it (a source of an earlier vmgrid version "
                     "cannot migrate here; update it)")
    try:
        chain = x509.load_pem_x509_certificates(offer.proof[0].encode())
        issued = parse_datetime(offer.proof[1])
        signature = base64.b64decode(offer.proof[2], validate=True)
    except ValueError as exc:
        raise refuse(f"its sourceProof cannot be read ({exc})") from None
    try:
        signer = node.trust.validate(chain)
    except Exception as exc:   # noqa: BLE001 - untrusted, revoked, expired: each says what
        raise refuse(f"the sourceProof's certificate is not trusted here: {exc}") from None
    host = host_of(signer.dn)
    if signer.is_proxy or host is None:
        raise refuse(f"the sourceProof is signed by {signer.subject}, not by a host certificate (CN=host/<name>)")
    if not host_authorizer(offer.source)(signer) or _is_guest(node, signer.dn):
        raise refuse(f"the sourceProof is signed by {signer.dn}, not by the host of the source "
                     f"{urlsplit(offer.source).hostname}")
    allowed = [h.lower() for h in node.config.migration_sources]
    if "*" not in allowed and host.lower() not in allowed and (urlsplit(offer.source).hostname or "").lower() \
            not in allowed:
        raise refuse(f"this node takes in no migrations from {host} ([vmmanager] migration_sources)")
    # made for this node under its own address or another name of it (the URL the source was given)
    if not any(_signed_for(signer, signature, offer, url) for url in _own_urls(node, caller_dn=caller.dn)):
        raise refuse(f"the sourceProof of {signer.dn} does not match this offer to {node.address} (another "
                     f"instance, step, target or files; a source that migrates here names this node "
                     f"{node.address}, or another name its host certificate gives it)")
    now = time.time()
    if not now - PROOF_AGE <= issued <= now + PROOF_AHEAD:
        raise refuse(f"the sourceProof was made at {offer.proof[1]}, not within the last {int(PROOF_AGE)} s")
    return signer.dn



# -- the target's side ---------------------------------------------------------------------------------------------
def _check_offer(node: MigratingNode, caller, offer: MigrationOffer) -> None:
    if not offer.key or not re.fullmatch(r"inst-[0-9a-f]{32}", offer.key):
        raise InvalidArgument("InstanceKey is not an instance key", argument="InstanceKey")
    if offer.step not in ("", "prepare", "transfer"):
        raise InvalidArgument(f"step {offer.step!r} is not prepare or transfer", argument="step")
    if offer.state not in (State.RUNNING.value, State.PAUSED.value, State.SAVED.value):
        raise InvalidArgument(f"an instance cannot migrate from state {offer.state}", argument="state")
    if offer.termination <= time.time():
        raise InvalidArgument("the instance's termination time has passed", argument="terminationTime")
    files, source = urlsplit(offer.files_url or ""), urlsplit(offer.source or "")
    if files.scheme != "gsiftp" or not files.hostname or files.hostname != source.hostname:
        raise InvalidArgument("files must be a gsiftp:// URL on the source node's host", argument="files")
    allowed = [h.lower() for h in node.config.migration_sources]
    if "*" not in allowed and (source.hostname or "").lower() not in allowed:
        # the target restores the memory state the source sends: only from the site's own nodes
        raise AccessDenied(f"this node takes in no migrations from {source.hostname or '?'} "
                           "([vmmanager] migration_sources)", subject=caller.dn, action="vm.migrate",
                           resource=offer.key, rule="migration-sources")
    if offer.vmm and offer.vmm != node.config.vmm:
        raise InvalidArgument(f"this node runs the VMM {node.config.vmm!r} and the instance was saved by "
                              f"{offer.vmm!r}: a saved memory state restores only on the kind of VMM that saved it; "
                              f"migrate it to a node with vmm = {offer.vmm!r}", argument="vmmKind")
    d = offer.descriptor
    if not (d.image_id and d.sha256 and d.size is not None and d.owner):
        raise InvalidArgument("the descriptor is not one from the repository", argument="workspace")
    if offer.step == "prepare":
        if offer.files:
            raise InvalidArgument("a prepare step carries no files (they are sent once the instance is frozen)",
                                  argument="file")
        return
    if not all(_HEX64.fullmatch(f.blake3 or f.sha256 or "") for f in offer.files):
        raise InvalidArgument("every file needs its blake3 or sha256 digest (64 hex digits)", argument="file")
    names = [f.name for f in offer.files]
    if STATE_FILE not in names or len(set(names)) != len(names) or len(names) > MAX_FILES or \
            not all(FILE_NAME.match(n) for n in names) or "root.qcow2" not in names:
        raise InvalidArgument("the files must be the instance's root.qcow2, its other disks and state.save, once each",
                              argument="file")
    # a source is untrusted: no file may be larger than it can be (the follower's bound), nor all of them together,
    # so that a pull reserves and receives no more than the instance can hold
    bounds = _expected_files(offer)
    if any(f.size < 0 or f.size > bounds.get(f.name, f.size) for f in offer.files) or \
            sum(f.size for f in offer.files) > sum(bounds.values()):
        raise InvalidArgument("a file is larger than the instance's disks and memory allow", argument="file")


def _check_incoming_bounds(node: MigratingNode, owner: str) -> None:
    """At most MAX_INCOMING_PER_USER Incoming instances of one owner and MAX_INCOMING_PER_NODE in all: each holds a
    lease, a directory and GridFTP sessions here until its source commits or the sweep drops it."""
    incoming = [i for i in node.store.list(None, live_only=True) if i.state_enum == State.INCOMING]
    mine = sum(1 for i in incoming if i.owner == owner)
    if mine >= MAX_INCOMING_PER_USER:
        raise LimitExceeded(f"{owner} has {mine} incoming migrations on node {node.node} already; the limit is "
                            f"{MAX_INCOMING_PER_USER}", limit="incoming_migrations_per_user",
                            allowed=str(MAX_INCOMING_PER_USER), requested=str(mine + 1))
    if len(incoming) >= MAX_INCOMING_PER_NODE:
        raise LimitExceeded(f"node {node.node} has {len(incoming)} incoming migrations already; the limit is "
                            f"{MAX_INCOMING_PER_NODE}", limit="incoming_migrations_per_node",
                            allowed=str(MAX_INCOMING_PER_NODE), requested=str(len(incoming) + 1))


def accept(node: MigratingNode, caller, offer: MigrationOffer) -> InstanceView:
    """AcceptMigration. In two steps (what this source sends): ``prepare`` while the guest still runs at the source
    (authorize the user, register Incoming, lease, stage the base image: outside the downtime), then ``transfer``
    once the source froze it (pull the files, restore paused). Without a step (a source of an earlier version) both
    in one call. On failure nothing of it remains here; MigrationFault names the phase. A prepared instance whose
    files never come is dropped after ``migration_prepare_timeout`` (:func:`sweep`)."""
    if offer.step == "transfer":
        return _accept_files(node, caller, offer)
    _check_offer(node, caller, offer)
    # the source node itself offers it (its host signature), before anything is asked or held here; its files'
    # host looked up once: every pull of the migration connects to that address
    source_dn = verify_source(node, caller, offer)
    source = _resolve_source(node, offer, source_dn, caller.dn)
    d = offer.descriptor
    timings: list[tuple[str, float]] = list(offer.phases)
    key = offer.key
    phase = "prepare"
    registered = claimed = False
    try:
        with timed(timings, "prepare"):
            now = time.time()
            resource = {"type": "instance", "owner": offer.owner, "vo": d.vo, "node": node.node, "id": key,
                        "image": d.image_id}
            amounts = {"memory": str(d.memory), "vcpus": str(d.vcpus), "node": node.node,
                       "lifetime": str(int(offer.termination - now))}
            node.authz.check(caller, "vm.migrate", resource, amounts)
            # and the user may run this image on this node at all (a migration is no way around vm.deploy)
            node.authz.check(caller, "vm.deploy", {"type": "image", "vo": d.vo, "owner": d.owner, "name": d.name,
                                                   "id": d.image_id, "node": node.node}, {**amounts, "image": d.image_id})
            existing = node.store.get(key)
            if existing is not None:
                if existing.state_enum not in states.FINAL:
                    raise InvalidArgument(f"instance {key} is already on this node ({existing.state})",
                                          argument="InstanceKey")
            _check_incoming_bounds(node, offer.owner)
            # the instance's slot, claimed here as a deployment's is: renewed with this node its claimant (the
            # instance holds one at the source: counted once), or counted anew against the owner's limits; given
            # back when the prepare fails or is dropped (the source claims it back when it rolls back)
            node.authz.claim(caller, key, resource, amounts, action="vm.migrate")
            claimed = True
            if existing is not None:
                node.migrations.forget_instance(key)    # it lived here before and moved away: it comes back
            node.repository.verify(d)
            node.store.insert(Instance(
                key=key, identifier=offer.identifier, owner=offer.owner, vo=d.vo, image_id=d.image_id,
                image_name=d.name, sha256=d.sha256, size=d.size, format=d.image_format, memory=d.memory,
                vcpus=d.vcpus, descriptor=offer.descriptor_xml, state=State.INCOMING.value,
                initial_state=offer.state, address=None, mac=None, created=now, termination=offer.termination,
                max_lifetime=offer.max_lifetime, token=new_token(), earlier_phases=_earlier_phases(existing)))
            registered = True
            node.migrations.put(key, "prepared" if offer.step == "prepare" else "target", offer.source, offer.state)
            phases.lease(node.parts, key)
            _adopt_subscriptions(node, key, offer)
            if offer.step == "prepare":
                # the base image from the repository or the cache (a hold) while the guest still runs at the
                # source; and the question the transfer step and the commit ask, asked now (permits are cached)
                phases.stage(node.parts, key)
                node._authorized(caller, key, "vm.migrate")
        crashpoint("migration.target-prepared")
        if offer.step == "prepare":
            # the transfer step pulls from the address checked now (held with the record: it goes with it), and
            # the files are followed from now on; a failure here drops the prepared instance as any other does
            node.migrations.pin(key, source)
            _follow(node, key, offer, source)
        else:
            phase = _transfer_and_restore(node, key, offer, timings, stage=True, source=source)
    except BaseException as exc:
        if registered:
            _drop_incoming(node, key)
        elif claimed:
            node._release_central("slot", key)
        if isinstance(exc, MigrationFault):
            raise
        if isinstance(exc, VMGridFault) and phase == "prepare" and not registered:
            raise       # refused before anything was held: the fault as it is (AccessDenied, InvalidArgument...)
        raise MigrationFault(f"{phase} at {node.node} failed: {_describe(exc)}", phase=getattr(exc, "phase", phase),
                             target=node.address, cause=_cause(exc)) from None
    node.store.update(key, phases=json.dumps([[n, round(s, 6)] for n, s in timings]))
    if offer.step == "prepare":
        log.info("instance %s prepared for %s, offered by %s (%s); Incoming until its files come", key, caller.dn,
                 offer.source, source_dn)
    else:
        log.info("instance %s arrived from %s (%s) for %s; Incoming until the source commits", key, offer.source,
                 source_dn, caller.dn)
    return node.view(node.store.get(key))


def _earlier_phases(existing: Instance | None) -> str:
    """The earlier operations' phases an instance coming back to this node keeps: those its Migrated record here kept,
    then its own (the deployment's, or the migration that brought it here before), so that `vmgrid report` still has
    them (trial16 T3: a deployment's phases vanished when its instance came back)."""
    if existing is None:
        return "[]"
    earlier = json.loads(existing.earlier_phases)
    if existing.phase_list():
        earlier.append([list(p) for p in existing.phase_list()])
    return json.dumps(earlier)


def _accept_files(node: MigratingNode, caller, offer: MigrationOffer) -> InstanceView:
    """The transfer step of a prepared migration: the same source, the same instance, now frozen there."""
    key = offer.key
    inst = node._authorized(caller, key, "vm.migrate")
    with node._locked(key):
        inst = node.store.get(key)
        rec = node.migrations.get(key)
        if rec is None or rec.role != "prepared" or inst.state_enum != State.INCOMING or rec.peer != offer.source \
                or inst.owner != offer.owner:
            # not this source's prepared migration: refused, and a prepared one of another source stays as it is
            raise InvalidArgument(f"no migration of instance {key} from {offer.source} is prepared on this node",
                                  argument="InstanceKey")
        # the files as the source itself lists them; an offer it did not sign leaves its prepared migration alone
        source_dn = verify_source(node, caller, offer)
        phase = "transfer"
        try:
            _check_offer(node, caller, offer)
            node.migrations.put(key, "target", offer.source, offer.state)   # the incoming timeout counts from now
            timings = inst.phase_list()
            timings += [p for p in offer.phases if p[0] not in {n for n, _ in timings}]
            source = _pinned_source(node, key, offer, source_dn, caller.dn)
            phase = _transfer_and_restore(node, key, offer, timings, stage=False, source=source)
        except BaseException as exc:
            _drop_incoming(node, key)
            if isinstance(exc, MigrationFault):
                raise
            raise MigrationFault(f"{phase} at {node.node} failed: {_describe(exc)}",
                                 phase=getattr(exc, "phase", phase), target=node.address, cause=_cause(exc)) from None
        node.store.update(key, phases=json.dumps([[n, round(s, 6)] for n, s in timings]))
        node.migrations.unpin(key)             # nothing more is pulled
    log.info("instance %s: its files arrived from %s (%s); Incoming until the source commits", key, offer.source,
             source_dn)
    return node.view(node.store.get(key))


def _transfer_and_restore(node: MigratingNode, key: str, offer: MigrationOffer, timings: list, *, stage: bool,
                          source: SourceFiles) -> str:
    """Pull the files (and stage the base image beside them when ``stage``), restore paused; ``timings`` gets
    transfer and restore. A failure carries its phase (``exc.phase``)."""
    phase = "transfer"
    try:
        with timed(timings, "transfer"):
            t = time.perf_counter()
            home = node.parts.home(key)
            home.mkdir(parents=True, exist_ok=True)
            if _GUEST_TOKEN.fullmatch(offer.guest_token or ""):
                fd = os.open(home / GUEST_TOKEN, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:                          # guestd's current token, for the fixup
                    f.write(offer.guest_token)
            total = sum(f.size for f in offer.files)
            got: dict[str, int] = {}
            lock = threading.Lock()

            def progress(name: str, n: int) -> None:
                with lock:
                    got[name] = n
                    node.store.update(key, staged_bytes=sum(got.values()))

            def staging() -> float:
                if stage:
                    phases.stage(node.parts, key)
                return time.perf_counter() - t

            # the files side by side (and the base image beside them, when not staged in the prepare step): each
            # GridFTP session's round trips (TLS, commands, data connections) and TCP slow start overlap instead of
            # adding up, which counts across a WAN
            followed = _take_followed(node, key, offer, home, progress) if not stage else set()
            with ThreadPoolExecutor(max_workers=len(offer.files) + 1) as pool:
                staged_f = pool.submit(staging)
                for done in [pool.submit(_pull, node, source, key, home / f.name, f,
                                         lambda n, name=f.name: progress(name, n))
                             for f in offer.files if f.name not in followed]:
                    done.result()
                pulled = time.perf_counter() - t
                staged = staged_f.result()
            node.store.update(key, staged_bytes=sum(got.values()))
            log.info("instance %s: transfer phase: pull of %d bytes %.3f s (%.0f Mbit/s)%s", key, total, pulled,
                     total * 8 / max(pulled, 1e-6) / 1e6,
                     f", beside it the stage of the base image {staged:.3f} s" if stage else "")
        crashpoint("migration.target-transferred")
        phase = "restore"
        with timed(timings, "restore"):
            _restore_here(node, key, offer.uuid)
        crashpoint("migration.target-restored")
    except BaseException as exc:
        if not getattr(exc, "phase", None) and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            try:
                exc.phase = phase
            except AttributeError:
                pass
        raise
    return phase


# -- the files followed from the prepare on (held by the node's Records, with the migration's record) -----------------


def _expected_files(offer: MigrationOffer) -> dict[str, int]:
    """The files a source of this version sends, each with the most bytes it can hold: the disks as this node names
    them (:func:`_restore_here`), an overlay at most its disk's size plus qcow2's metadata, and the saved state, at
    most the guest's memory plus its devices' (video RAM, ROMs) and libvirt's header. A source is untrusted: a
    follower refuses bytes past the bound (the transfer step then pulls the file the ordinary way)."""
    files = {("root.qcow2" if disk.role == "root" else f"{disk.role}{n}.qcow2"):
             disk.size + disk.size // 64 + (64 << 20) for n, disk in enumerate(offer.descriptor.disks)}
    files[STATE_FILE] = (offer.descriptor.memory << 20) + (256 << 20)
    return files


def _follow(node: MigratingNode, key: str, offer: MigrationOffer, source: SourceFiles) -> None:
    """Right after the prepare, before the source freezes: a GridFTP session per file asks for it, so the
    sessions and data connections are up when the save starts, and the saved state comes while it is written
    (the source's export holds the RETRs until then: :class:`Exports`). The transfer step verifies what came
    against the digests the source sends then, and pulls again whatever failed or differs."""
    home = node.parts.home(key)
    home.mkdir(parents=True, exist_ok=True)
    followers = {}
    for name, limit in _expected_files(offer).items():
        followers[name] = Following(source.pinned(key, name), home / name, node.config.staging_parallel,
                                    credential=node.credential, trust=node.trust, gsi=node.config.staging_gsi,
                                    timeout=node.config.migration_timeout, limit=limit,
                                    refuse_server=_refuse_server(node, source.dn), server_dn=source.dn,
                                    identify=_source_identity(node, source))
    for f in node.migrations.follow(key, followers).values():
        f.cancel()
    # the prepare is answered once the sessions are authenticated and the data connections open (a few round
    # trips): the source freezes only then, so none of it is downtime. Bounded: a follower that cannot get there
    # does not hold the migration (the transfer step pulls its file the ordinary way)
    deadline = time.monotonic() + FOLLOW_READY
    for f in followers.values():
        f.wait_ready(max(0.0, deadline - time.monotonic()))


def _unfollow(node: MigratingNode, key: str) -> dict[str, Following]:
    """Stop following the files of ``key`` (the migration is dropped here); waits for the followers."""
    followers = node.migrations.take_followers(key)
    for f in followers.values():
        f.cancel()
    return followers


def _take_followed(node: MigratingNode, key: str, offer: MigrationOffer, home: Path, progress) -> set[str]:
    """The transfer step's files that came through the followers and match the source's sizes and digests;
    the rest (a follower failed, a file differs: removed) is pulled again by the caller."""
    followers = node.migrations.take_followers(key)
    wanted = {f.name: f for f in offer.files}
    for name in [n for n in followers if n not in wanted]:
        followers.pop(name).cancel()
    if not followers:
        return set()
    deadline = time.monotonic() + node.config.migration_timeout
    pending = list(followers.values())
    while pending and time.monotonic() < deadline:
        for name, f in followers.items():
            progress(name, f.received)
        pending[0].wait(0.25)
        pending = [f for f in pending if not f.done()]

    def check(name: str) -> bool:
        f, want = followers[name], wanted[name]
        try:
            size = f.result(0)
        except Exception as exc:   # noqa: BLE001 - pulled again below
            log.warning("instance %s: following %s failed (%s); pulling it again", key, name, exc)
            f.cancel()
            return False
        algorithm, digest = ("BLAKE3", want.blake3) if want.blake3 else ("SHA256", want.sha256)
        if size != want.size or hash_file(home / name, algorithm) != digest:
            log.warning("instance %s: %s as followed differs from the source's (%d bytes, the source said %d); "
                        "pulling it again", key, name, size, want.size)
            (home / name).unlink(missing_ok=True)
            return False
        progress(name, size)
        log.info("instance %s: %s followed from the prepare on: %d bytes, %.3f s before this step's end", key, name,
                 size, time.monotonic() - (f.finished or time.monotonic()))
        return True

    with ThreadPoolExecutor(max_workers=len(followers)) as pool:
        ok = dict(zip(followers, pool.map(check, list(followers))))
    return {name for name, good in ok.items() if good}


@dataclass(frozen=True)
class SourceFiles:
    """Where the target pulls a migration's files from: the source's files URL as its offer names it (the name: what
    its host certificate is checked for), the address that name resolved to once, when the offer was checked (every
    GridFTP control connection of the migration goes there: a name that answers another address later, DNS
    rebinding, is not followed; as HTTPS's ``connect_to``, security/https.py), and the host DN that signed the
    offer (the only server DN taken)."""
    url: str            # gsiftp://NAME:PORT as the offer gives it
    host: str           # NAME
    port: int
    address: str        # the address NAME resolved to when the offer was checked
    dn: str             # the source node's host DN (verify_source)

    def file(self, key: str, name: str) -> str:
        """The URL of one file as the offer names it (for messages)."""
        return f"{self.url}/{key}/{name}"

    def pinned(self, key: str, name: str) -> str:
        """The URL of one file at the checked address (what is connected to)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"gsiftp://{host}:{self.port}/{key}/{name}"


def _resolve_source(node: MigratingNode, offer: MigrationOffer, source_dn: str, caller_dn: str) -> SourceFiles:
    """The files' host (the source's: :func:`_check_offer`) looked up once, within the policy's deadline: the
    first address it gives is the one every pull of this migration connects to. ServiceUnavailable (DNS) when the
    name server does not answer in time, InvalidArgument (files) when the name does not resolve."""
    from gridftp.protocol import DEFAULT_GRIDFTP_PORT

    parts = urlsplit(offer.files_url)
    host = parts.hostname or ""
    try:
        port = parts.port or DEFAULT_GRIDFTP_PORT
        infos = lookup(host, port, node.consumers.resolve_timeout, what="migration source host", caller=caller_dn)
    except Unresolved as exc:
        raise ServiceUnavailable(f"the migration source {offer.source} cannot be reached now: {exc}",
                                 service="DNS") from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidArgument(f"the migration source's host {host!r} does not resolve: {exc}",
                              argument="files") from None
    if not infos:
        raise InvalidArgument(f"the migration source's host {host!r} does not resolve", argument="files")
    return SourceFiles(offer.files_url.rstrip("/"), host, port, infos[0][4][0], source_dn)


def _pinned_source(node: MigratingNode, key: str, offer: MigrationOffer, source_dn: str,
                   caller_dn: str) -> SourceFiles:
    """The transfer step's source: the one pinned at the prepare (same files URL and signer), else (this node
    restarted since, or a source without steps) the files' host looked up now."""
    pinned = node.migrations.pinned(key)
    if pinned is not None and pinned.url == offer.files_url.rstrip("/") and pinned.dn == source_dn:
        return pinned
    return _resolve_source(node, offer, source_dn, caller_dn)


def _source_identity(node: MigratingNode, source: SourceFiles):
    """``identify`` for a pull from the checked address (gridftp.tls.TLSConfig): the server's chain trusted here,
    its end-entity certificate a host certificate naming the source's host (the name, not the address connected to;
    never a proxy), as the client's own check of a URL's host does, and its DN the one that signed the offer, not a
    guest's (:func:`_refuse_server`); its DN."""
    from gridftp.errors import AuthenticationError
    from gridftp.tls import peer_chain
    from security.hostauth import host_refusal

    refuse = _refuse_server(node, source.dn)

    def identify(sock) -> str:
        caller = node.trust.validate(peer_chain(sock))
        why = host_refusal(caller, source.host)
        if why is not None:
            raise AuthenticationError(why)
        if refuse(caller.dn):
            raise AuthenticationError(f"{source.host} presented {caller.dn!r}, a certificate refused here")
        return caller.dn
    return identify


def _is_guest(node: MigratingNode, dn: str) -> bool:
    """A guest container's certificate (guestcred.is_guest): never a migration source, whatever
    ``migration_sources`` says (its address is a guest's)."""
    return guestcred.is_guest(node.config, dn)


def _refuse_server(node: MigratingNode, source_dn: str):
    """The files' GridFTP server is refused unless it presents the host DN that signed the offer (the source node:
    not a user's server naming the host), and never a guest's certificate."""
    return lambda dn: dn != source_dn or _is_guest(node, dn)


def _pull(node: MigratingNode, source: SourceFiles, key: str, dest: Path, f: MigrationFile, progress) -> None:
    """One file from the source over GridFTP: parallel streams, restartable, verified against its digest (BLAKE3
    when the source gave one, else sha256) while it arrives; ``progress(bytes)`` as they do. Connected to the
    source's checked address, its certificate checked for the source's name (:class:`SourceFiles`)."""
    url = source.file(key, f.name)
    try:
        gridftp.download(source.pinned(key, f.name), dest, node.config.staging_parallel, credential=node.credential,
                         trust=node.trust, sha256=None if f.blake3 else f.sha256, blake3=f.blake3 or None,
                         progress=lambda n, _total: progress(n), gsi=node.config.staging_gsi, size=f.size,
                         refuse_server=_refuse_server(node, source.dn), server_dn=source.dn,
                         identify=_source_identity(node, source))
    except gridftp.ChecksumMismatch as exc:
        raise ChecksumMismatch(f"{f.name} from {url}: {exc}", expected=f.digest, actual="(different)") from None
    except gridftp.GridFTPError as exc:
        raise TransferFault(f"pulling {f.name} from {url} failed: {exc}", source=url) from None
    if dest.stat().st_size != f.size:
        raise ChecksumMismatch(f"{f.name}: {dest.stat().st_size} bytes, the source said {f.size}", expected=f.digest,
                               actual="(size differs)")


def _restore_here(node: MigratingNode, key: str, domain_uuid: str) -> None:
    """The pulled overlay on this node's cached base image, a context with this node's lease, the domain
    restored paused from the saved state with this node's file locations."""
    from services.vmmanager import qemuimg
    t0 = time.perf_counter()
    inst = node.store.get(key)
    d = phases.descriptor_of(inst)
    home = node.parts.home(key)
    disks = []
    for n, disk in enumerate(d.disks):
        path = home / ("root.qcow2" if disk.role == "root" else f"{disk.role}{n}.qcow2")
        if not path.is_file():
            raise InvalidArgument(f"the source sent no {path.name}", argument="file")
        if disk.role == "root":
            qemuimg.rebase_unsafe(path, node.cache.path(inst.sha256), inst.format)
        disks.append(Disk(path, "qcow2", disk.bus, disk.role))
    t1 = time.perf_counter()
    iso = phases.context(node.parts, inst, d)
    spec = phases.instance_spec(node.parts, inst, d, disks, iso)
    if domain_uuid:
        spec = dataclasses.replace(spec, uuid=domain_uuid)
    t2 = time.perf_counter()
    phases.bind_port(node.parts, spec)      # bridge mode: its tap sends only as this node's lease (guard.py)
    vmm_call("restore", node.vmm.restore, home / STATE_FILE, spec, paused=True)
    t3 = time.perf_counter()
    (home / STATE_FILE).unlink(missing_ok=True)
    log.info("instance %s: restore phase: rebase %.3f s, context %.3f s, libvirt restore (paused) %.3f s", key,
             t1 - t0, t2 - t1, t3 - t2)
    if node.vmm.capabilities.guest_channel and (home / GUEST_TOKEN).is_file():
        # guestd answers with the source's token until the fixup gives it ours (the resume's set-time too)
        node.vmm.guest_channel(key).accept_previous((home / GUEST_TOKEN).read_text().strip())


def _adopt_subscriptions(node: MigratingNode, key: str, offer: MigrationOffer) -> None:
    """The source's subscribers of the instance, notified from here from the commit on; a consumer this node's
    policy refuses is left out (logged), it does not stop the migration."""
    from services.wsrf.notification import new_subscription_key
    for consumer, subscriber, expires in offer.subscriptions[:64]:
        try:
            node.consumers.check(consumer, caller=subscriber)
        except VMGridFault as exc:
            log.warning("instance %s: subscriber %s not carried over: %s", key, consumer, exc.description)
            continue
        node.store.subscribe(new_subscription_key(), key, consumer, subscriber, min(expires, offer.termination))


def _drop_incoming(node: MigratingNode, key: str) -> None:
    """Everything an Incoming instance holds here goes: domain, files, lease, image hold, record (and with it the
    pinned source)."""
    _unfollow(node, key)                   # before its files go
    node._release(key, quiet=True)
    node.migrations.forget_instance(key)
    # the slot its prepare claimed (only while this node is its claimant: once the source claimed it back, the
    # Authorization service keeps it)
    node._release_central("slot", key)
    log.info("incoming instance %s dropped", key)


def complete(node: MigratingNode, caller, key: str, commit: bool) -> tuple[str, InstanceView | None]:
    """CompleteMigration: ('committed', view) or ('aborted', None)."""
    inst = node._authorized(caller, key, "vm.migrate")
    with node._locked(key):
        inst = node.store.get(key)
        if inst is None:
            raise ResourceUnknown(f"no instance {key} on node {node.node}", resource=key)
        if inst.state_enum != State.INCOMING:
            if inst.state_enum in states.FINAL:
                raise ResourceUnknown(f"no instance {key} on node {node.node} ({inst.state})", resource=key)
            return "committed", node.view(inst)
        if not commit:
            _drop_incoming(node, key)
            return "aborted", None
        rec = node.migrations.get(key)
        if rec is not None and rec.role == "prepared":
            raise IllegalTransition(f"instance {key} is prepared here but its files have not come: it cannot be "
                                    f"committed", state=inst.state, operation="CompleteMigration")
        prior = State(rec.prior if rec else inst.initial_state)
        # the instance's slot moves here (renewed, this node its claimant: not counted twice), asked of the
        # Authorization service while the guest resumes: its round trip is off the downtime. Nothing is answered
        # before the claim is: a refused claim pauses the guest here again, the instance stays Incoming and the
        # source, which got no commit, settles it as aborted (it takes the guest back from its own state)
        claiming = ThreadPoolExecutor(max_workers=1, thread_name_prefix="migration-claim")
        claim = claiming.submit(_claim_slot, node, caller, inst)
        claiming.shutdown(wait=False)
        timings: list[tuple[str, float]] = []
        try:
            with timed(timings, "resume"):
                if prior == State.RUNNING:       # the guest runs again here: the downtime ends
                    vmm_call("resume", node.vmm.resume, key, sync=False)
                elif prior == State.SAVED:
                    state_file = node.parts.home(key) / STATE_FILE
                    vmm_call("save", node.vmm.save, key, state_file)
        finally:
            try:
                claim.result()
            except BaseException:
                if prior == State.RUNNING:
                    _pause_again(node, key)
                raise
        with timed(timings, "fixup"):
            if prior == State.RUNNING and hasattr(node.vmm, "sync_after_wake"):
                node.vmm.sync_after_wake(key)        # guestd sets the clock, then takes its address
            status = _fixup(node, inst, running=prior == State.RUNNING)
        for name, seconds in timings:
            node.store.add_phase(key, name, seconds)
        node.store.update(key, guest_status=status, staged_bytes=inst.size)
        node._set_state(key, prior, expect={State.INCOMING})
        node.migrations.drop(key)
        crashpoint("migration.target-committed")
        log.info("instance %s migrated here from %s: %s", key, rec.peer if rec else "?", prior.value)
        return "committed", node.view(node.store.get(key))


def _claim_slot(node: MigratingNode, caller, inst: Instance) -> None:
    """The instance's slot renewed with this node as its claimant (counted once: the Authorization service keys it
    by the instance)."""
    d = phases.descriptor_of(inst)
    node.authz.claim(caller, inst.key, node._resource(inst),
                     {"memory": str(d.memory), "vcpus": str(d.vcpus), "node": node.node,
                      "lifetime": str(max(1, int(inst.termination - time.time())))}, action="vm.migrate")


def _claim_back(node: MigratingNode, caller, key: str) -> None:
    """After a commit the target did not carry through (its resume failed after its slot claim went through), the
    source claims the slot back, so that the target's reconciliation never frees the slot of an instance that runs
    here."""
    inst = node.store.get(key)
    if inst is None or inst.state_enum in states.FINAL:
        return
    try:
        _claim_slot(node, caller, inst)
    except Exception as exc:   # noqa: BLE001 - the instance runs here either way; the slot stays counted once
        log.warning("migration of %s rolled back: claiming its slot back failed: %s", key, _describe(exc))


def _pause_again(node: MigratingNode, key: str) -> None:
    """The slot did not move: the guest resumed here stops again (the source takes it back from its state)."""
    try:
        node.vmm.pause(key)
    except VMMError as exc:
        log.error("instance %s: pausing it again after a refused slot claim failed: %s", key, exc)


def _fixup(node: MigratingNode, inst: Instance, running: bool) -> str:
    """guestd takes this node's lease as soon as the guest runs here: the ``migrated`` request (guestd/migrated.py)
    with the token guestd holds (the source sent it), the new context (address, MAC, gateway, DNS, a new token)
    and this host's clock; bounded by migration_fixup_timeout. Then the grid container's certificate for the new
    address (guestd sends a new request for the key it keeps). Backends without a guest channel, or a guest that
    stays paused or saved: nothing to tell now. Whatever happens, the GuestStatus this returns says it."""
    from services.vmmanager import guestcred
    home = node.parts.home(inst.key)
    token_file = home / GUEST_TOKEN
    if not node.vmm.capabilities.guest_channel:
        token_file.unlink(missing_ok=True)
        return f"migrated here; address {inst.address} (no guest channel to tell guestd)"
    if not running:      # the token waits here for the guest's first run on this node (readdress_pending)
        return f"migrated here; address {inst.address} not yet told to guestd (the guest is not running)"
    try:
        current = token_file.read_text().strip()
    except OSError:
        current = ""
    token_file.unlink(missing_ok=True)       # used once, whatever happens below
    if not current:
        return f"migrated here; address {inst.address} not told to guestd (the source sent no guest token)"
    hostname = inst.identifier.replace(".", "-").replace("_", "-")[:63]
    ctx = build_context(instance=inst.key, hostname=hostname, mac=inst.mac, address=inst.address,
                        netmask=str(node.pool.network.netmask), gateway=node.pool.gateway, dns=node.config.dns,
                        container_command=None, token=inst.token,
                        grid=guestcred.grid_context(node.config, inst.owner))
    channel = node.vmm.guest_channel(inst.key)
    try:
        status = channel.request("migrated", timeout=node.config.migration_fixup_timeout, token=current,
                                 context=json.loads(ctx.to_json()), time=time.time())
    except Exception as exc:   # noqa: BLE001 - the guest is untrusted; the migration stands, GuestStatus says so
        return f"migrated here; guestd did not take the new address {inst.address}: {printable(exc, 600)}"
    steps = status.get("steps") if isinstance(status.get("steps"), dict) else {}
    net = (steps.get("network") or {}) if isinstance(steps.get("network"), dict) else {}
    detail = net.get("detail") if isinstance(net.get("detail"), dict) else {}    # a guest's status may have any shape
    have = detail.get("address") if net.get("ok") else None
    if have != inst.address:
        migrated = steps.get("migrated") if isinstance(steps.get("migrated"), dict) else {}
        why = net.get("error") or migrated.get("error") or f"guestd reports {have!r}"
        return f"migrated here; guestd did not set the new address {inst.address}: {printable(why, 500)}"
    note = f"migrated here; guestd set address {inst.address}, MAC {inst.mac} and the clock; " \
           f"{phases.guest_summary(status)}"
    cert = guestcred.deliver(node.config, channel, status, inst.address, hostname, home)
    return note if cert is None else f"{note}; {cert}"


def _guest_token(node: MigratingNode, inst: Instance) -> str:
    """The token guestd in the instance holds: the one an earlier migration left pending here (the guest has not
    run on this node since), else this node's."""
    try:
        return (node.parts.home(inst.key) / GUEST_TOKEN).read_text().strip()
    except OSError:
        return inst.token or ""


def readdress_pending(node: MigratingNode, key: str) -> str | None:
    """An instance that arrived paused or saved runs here for the first time (Resume, Restore): the fixup it
    did not get then (a GuestStatus note), or None when it has nothing pending."""
    inst = node.store.get(key)
    if inst is None or not (node.parts.home(key) / GUEST_TOKEN).is_file():
        return None
    return _fixup(node, inst, running=True)


# -- restart and sweep ----------------------------------------------------------------------------------------------
def check_port(node: MigratingNode) -> None:
    """[vmmanager] migration_port checked and given to the node's export (at start: a ValueError naming the key)."""
    port = node.config.migration_port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"[vmmanager] migration_port = {port!r}: a port is 0 to 65535 (0 picks a free one; the "
                         f"other nodes pull migrating instances' files from it)")
    if node.exports is not None:
        node.exports.port = port


def reconcile(node: MigratingNode) -> dict[str, int]:
    """At start, before the node's own reconciliation: [vmmanager] migration_port checked (:func:`check_port`),
    Incoming instances are dropped (never committed); Migrating ones are settled with their target."""
    check_port(node)
    report = {"incoming_dropped": 0, "migrations_committed": 0, "migrations_rolled_back": 0,
              "migrations_unsettled": 0}
    for rec in node.migrations.of_role("target") + node.migrations.of_role("prepared"):
        inst = node.store.get(rec.key)
        if inst is not None and inst.state_enum == State.INCOMING:
            _drop_incoming(node, rec.key)
            report["incoming_dropped"] += 1
        elif inst is None or inst.state_enum != State.INCOMING:
            node.migrations.drop(rec.key)
    for inst in node.store.list(None, live_only=True):
        if inst.state_enum == State.INCOMING and node.migrations.get(inst.key) is None:
            _drop_incoming(node, inst.key)
            report["incoming_dropped"] += 1
    for rec in node.migrations.of_role("source"):
        outcome = settle(node, rec.key)
        if outcome in ("none", "in-progress"):
            continue
        else:
            report[{"committed": "migrations_committed", "rolled-back": "migrations_rolled_back",
                    "unsettled": "migrations_unsettled"}[outcome]] += 1
    return report


def sweep(node: MigratingNode) -> None:
    """Settle unsettled migrations (the target answers again); drop Incoming instances whose source never
    committed within the migration timeout, and the records (with what they hold: the pinned source, followers)
    of incoming migrations whose instance ended otherwise (its termination time passed while it was Incoming)."""
    for rec in node.migrations.of_role("source"):
        try:
            settle(node, rec.key)
        except Exception:   # noqa: BLE001
            log.exception("could not settle the migration of %s", rec.key)
    for rec in node.migrations.of_role("target") + node.migrations.of_role("prepared"):
        inst = node.store.get(rec.key)
        if inst is None or inst.state_enum != State.INCOMING:
            with node._locked(rec.key):
                inst, again = node.store.get(rec.key), node.migrations.get(rec.key)
                if again is not None and again.role == rec.role and (inst is None
                                                                     or inst.state_enum != State.INCOMING):
                    log.info("incoming migration of %s: its instance ended (%s); its record dropped", rec.key,
                             inst.state if inst else "gone")
                    node.migrations.drop(rec.key)
    now = time.time()
    for role, timeout, what in (("target", node.config.migration_incoming_timeout, "no commit"),
                                ("prepared", node.config.migration_prepare_timeout, "no files")):
        for rec in node.migrations.of_role(role):
            if rec.started < now - timeout:
                with node._locked(rec.key):
                    inst, again = node.store.get(rec.key), node.migrations.get(rec.key)
                    if inst is not None and inst.state_enum == State.INCOMING and again is not None \
                            and again.role == role and again.started < now - timeout:
                        log.warning("incoming instance %s: %s from %s in time; dropped", rec.key, what, rec.peer)
                        _drop_incoming(node, rec.key)


def moved(node: MigratingNode, key: str) -> InstanceMoved:
    rec = node.migrations.get(key)
    where = rec.peer if rec else ""
    return InstanceMoved(f"instance {key} was migrated to {where or 'another node'}", resource=key, address=where)
