"""Whole-file transfers with parallel streams, restart and sha256 verification: the library API.

``download`` (server to local file), ``upload`` (local file to server) and ``third_party``
(server to server, orchestrated from here) all resume an interrupted transfer by asking only
for the missing byte ranges, and all verify the result against the source's sha256 before it
carries its final name. ``checksum`` asks a server for a file's checksum.

Where the restart state lives: a download's receiver is this process, so the ranges sit in a
sidecar beside the partial file (:mod:`gridftp.partial`). For uploads and third-party
transfers the receiver is a server; it persists its own sidecar and reports what is safely on
its disk in ``111 Range Marker`` replies, which this side records in ``state_dir`` to send
back as ``REST`` when the transfer is run again.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

from .checksum import hash_fd, hash_file, new_hash
from .client import GridFTPClient, GridFTPURL
from .datachannel import (Counter, ModeEReceiver, ModeESender, Opening, Throttle, Worker, accept_connections,
                          connect_streams, receive_stream, shutdown_listener)
from .errors import (ChecksumMismatch, ChecksumUnavailable, GridFTPError, ProtocolError, ReplyError,
                     TransferError, reply_error)
from .partial import PartialFile
from .protocol import MAX_PARALLELISM, Reply, parse_perf_marker, parse_range_marker
from .ranges import RangeSet

TYPE_CHECKING = False   # what typing.TYPE_CHECKING is at run time, without importing typing (the command's start)
if TYPE_CHECKING:       # TLS (cryptography) loads only for gsiftp://
    from .tls import Credential

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``: called from a helper thread about five times a second."""

DEFAULT_PARALLEL = 4
IDLE_TIMEOUT = 120.0        # seconds without a byte or a reply before a transfer is declared stuck (2 x timeout)
POLL = 0.25


_RESULT_FIELDS = ("source destination size sha256 seconds bytes_transferred bytes_reused fetched_ranges attempts "
                  "parallelism repaired_bytes blake3")


class TransferResult(namedtuple("TransferResult", _RESULT_FIELDS, defaults=(0, ""))):
    """What one call moved and how it was verified (a named tuple, see :class:`gridftp.protocol.Reply`).

    ``bytes_transferred``: payload bytes that crossed data connections in this call (all
    attempts). ``bytes_reused``: bytes the receiver already held from an interrupted run and
    that were not sent again. ``fetched_ranges``: the byte ranges this call asked the source
    for (``a-b,c-d``, half-open); on a clean first run ``0-size``. ``repaired_bytes``: bytes
    fetched again because verification found them corrupt. A download is verified with SHA-256
    (``sha256`` set) or, between vmgrid peers, with BLAKE3 (``blake3`` set, ``sha256`` empty). ``source`` and
    ``destination`` are strings, ``seconds`` a float, the counts ints, the digests lowercase hex or "".
    """

    __slots__ = ()

    @property
    def verified_with(self) -> str:
        """``sha256 <hex>`` or ``blake3 <hex>``: what the bytes were checked against."""
        return f"blake3 {self.blake3}" if self.blake3 and not self.sha256 else f"sha256 {self.sha256}"

    @property
    def mbit_per_s(self) -> float:
        return self.size * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


class _Options:
    """What every control connection of one call is opened with."""

    def __init__(self, credential: Credential | None, trust: object, timeout: float, identify: object,
                 gsi: bool | str = False, prot: str = "P", refuse_server=None, delegate: bool | str = True):
        self.credential = credential
        self.delegate = delegate
        self.refuse_server = refuse_server
        self.trust = trust
        self.timeout = timeout
        self.identify = identify
        self.gsi = gsi
        self.prot = prot

    def client(self, url: GridFTPURL, server_dn: str | None = None, prelude: list[str] = (),
               gsi: bool | str | None = None, *, delegate: bool | str | None = None) -> GridFTPClient:
        """A session of ``url`` (``gsi``: this one's mechanism in place of the call's; ``delegate``: what it
        delegates under GSI, the call's own by default, False for a session that opens no data channel, a CKSM)."""
        return GridFTPClient(url, credential=self.credential, trust=self.trust, server_dn=server_dn,
                             timeout=self.timeout, identify=self.identify, prelude=prelude,
                             gsi=self.gsi if gsi is None else gsi, data_protection_level=self.prot,
                             refuse_server=self.refuse_server,
                             delegate=self.delegate if delegate is None else delegate)


class _Ticker:
    """Calls ``fn`` every ``interval`` seconds in a thread until stopped."""

    def __init__(self, interval: float, fn: Callable[[], None]):
        self._stop = threading.Event()
        self._fn = fn
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="gridftp-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._fn()
            except Exception:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._fn()
        except Exception:
            pass


def _remote_sha256(opts: _Options, url: GridFTPURL, server_dn: str | None, algorithm: str = "SHA256") -> Worker:
    """Ask a server for a whole file's checksum (SHA256 unless ``algorithm``) on its own control connection,
    in the background, so that the server hashes while the data flows (the worker's ``value`` is the hex
    digest)."""

    def ask() -> str:
        with opts.client(url, server_dn, delegate=False) as session:     # a CKSM needs no delegated proxy
            return _source_sha256(session, url.path, algorithm)

    return Worker(ask, "gridftp-cksm")


def _source_sha256(session: GridFTPClient, path: str, algorithm: str = "SHA256") -> str:
    command = f"CKSM {algorithm} 0 -1 {path}"
    reply = session.command(command)
    if reply.code in (500, 502, 504):
        raise ChecksumUnavailable(f"{session.url.host} cannot compute {algorithm} checksums: {reply.text}")
    if not reply.ok:
        raise reply_error(command, reply.code, reply.text)
    value = reply.text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ProtocolError(f"CKSM reply {value[:80]!r} is not a {algorithm.lower()}")
    return value


def speaks_blake3(feat: Reply) -> bool:
    """Does a FEAT reply list BLAKE3 among the CKSM algorithms (vmgrid's server does; Globus' does not)?"""
    if feat.code != 211:
        return False
    for line in feat.lines[1:-1]:
        name, _, params = line.strip().partition(" ")
        if name.upper() == "CKSM" and "BLAKE3" in [p.split(":")[0].strip().upper() for p in params.split(";")]:
            return True
    return False


def _size_of(reply: Reply, path: str) -> int:
    """The size from a SIZE reply; raises ReplyError or ProtocolError."""
    if not reply.ok:
        raise reply_error(f"SIZE {path}", reply.code, reply.text)
    text = reply.text.strip()
    if not text.isdigit():
        raise ProtocolError(f"SIZE reply {text[:40]!r} is not a size")
    return int(text)


class TooLarge(ProtocolError):
    """A download's source is larger than its ``max_size`` (nothing was received)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ReplyError):
        return exc.transient
    return isinstance(exc, TransferError)


def _await_final(session: GridFTPClient, *, on_marker: Callable[[Reply], None] | None = None,
                 alive: Callable[[], bool] | None = None, idle_timeout: float = IDLE_TIMEOUT) -> Reply:
    """Read replies until a final one, handing 1xx markers to ``on_marker``.

    ``alive()`` says whether data is still moving; a transfer with neither replies nor data
    for ``idle_timeout`` seconds is declared stuck.
    """
    sock = session.control.sock
    previous = sock.gettimeout()
    sock.settimeout(POLL)
    last = time.monotonic()
    try:
        while True:
            try:
                reply = session.read_reply()
            except TransferError as exc:
                if isinstance(exc.__cause__, socket.timeout):
                    if alive is not None and alive():
                        last = time.monotonic()
                    elif time.monotonic() - last > idle_timeout:
                        raise TransferError(f"{session.url.host}: no progress for {idle_timeout:.0f} s") from None
                    continue
                raise
            last = time.monotonic()
            if reply.preliminary:
                if on_marker is not None:
                    on_marker(reply)
                continue
            return reply
    finally:
        sock.settimeout(previous)


def _activity(counter: Counter) -> Callable[[], bool]:
    seen = [counter.total]

    def alive() -> bool:
        now = counter.total
        moved, seen[0] = now != seen[0], now
        return moved

    return alive


def _start_transfer(session: GridFTPClient, setup: list[str], command: str) -> None:
    """Pipeline the set-up commands and the transfer command; raise unless it started (1xx)."""
    replies = session.pipeline(setup + [command])
    session.expect_ok(replies[:-1], setup)
    first = replies[-1]
    if not first.preliminary:
        raise reply_error(command, first.code, first.text) if not first.ok else \
            ProtocolError(f"{command}: no preliminary reply ({first.code})")


PREPARE = ["TYPE I", "MODE E"]


def _prepare(session: GridFTPClient) -> bool:
    """Check the replies to :data:`PREPARE` (sent with the login); False when the server only has stream mode."""
    replies = session.prelude_replies[:2]
    session.expect_ok(replies[:1], ["TYPE I"])
    session.mode = "E" if replies[1].ok else "S"
    return session.mode == "E"


# -- download -------------------------------------------------------------------------------------------
def _check_parallel(parallel: int) -> None:
    """1 to MAX_PARALLELISM streams (0 would open none and wait for ever; a server refuses more)."""
    if not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLELISM:
        raise GridFTPError(f"parallelism must be 1 to {MAX_PARALLELISM} streams, not {parallel}")


def download(url: str, dest_path: str | os.PathLike, parallel: int = DEFAULT_PARALLEL, *,
             credential: Credential | None = None, trust=None, server_dn: str | None = None,
             sha256: str | None = None, progress: Progress | None = None, retries: int = 2,
             retry_delay: float = 1.0, timeout: float = 60.0, durable: bool = False,
             identify=None, gsi: bool | str = False, prot: str = "P", blake3: str | None = None,
             checksum: str = "sha256", size: int | None = None, refuse_server=None,
             max_size: int | None = None, delegate: bool | str = True) -> TransferResult:
    """Fetch ``url`` into ``dest_path`` over ``parallel`` MODE E streams; verified, restartable.

    The file is received as ``dest_path.vmgrid-part`` with its ranges in
    ``dest_path.vmgrid-part.ranges``; a later call (after a crash, a kill or a cut connection)
    fetches only what is missing. ``sha256``: the expected digest if the caller knows it (the
    VMManager does, from the image descriptor); otherwise the source is asked (``CKSM SHA256``)
    on a second control connection while the data flows. A mismatch is located by per-chunk
    checksums and only the corrupt chunks are fetched again; if that fails too,
    :class:`ChecksumMismatch` is raised and the partial file removed.

    ``blake3``: the expected BLAKE3 digest (an image descriptor carries it beside the sha256): the bytes
    are then verified with BLAKE3, several times faster than SHA-256 on CPUs without SHA extensions.
    ``checksum``: with neither digest given, what the source is asked for: ``"sha256"`` (the default;
    the result's ``sha256`` is then the file's) or ``"auto"`` (``CKSM BLAKE3`` when the server lists
    it in FEAT, as vmgrid servers do, else SHA256).

    ``size``: the size the caller was told (a migration's offer): a source whose SIZE answer differs is refused
    (:class:`ProtocolError`) before a byte is received or any room reserved for it.
    ``max_size``: the most bytes the caller has room for (a job's stage-in quota): a larger source is refused
    (:class:`TooLarge`) the same way.
    ``refuse_server(dn) -> bool``: servers refused by their authenticated DN (:class:`GridFTPClient`).
    ``delegate`` (``gsi``): what the data session delegates to the server, a limited proxy by default
    (:class:`GridFTPClient`); the checksum session delegates nothing.
    """
    _check_parallel(parallel)
    if checksum not in ("sha256", "auto"):
        raise ValueError(f"checksum is 'sha256' or 'auto', not {checksum!r}")
    src = GridFTPURL.parse(url)
    dest = Path(dest_path)
    opts = _Options(credential, trust, timeout, identify, gsi, prot, refuse_server, delegate=delegate)
    started = time.monotonic()
    transferred = 0
    reused: int | None = None
    fetched = RangeSet()
    repaired = 0
    attempts = 0
    remote: Worker | None = None
    algorithm = "BLAKE3" if blake3 else "SHA256"
    expected = blake3.lower() if blake3 else sha256.lower() if sha256 else None
    ask_feat = expected is None and checksum == "auto"
    while True:
        attempts += 1
        partial: PartialFile | None = None
        try:
            prelude = PREPARE + [f"SIZE {src.path}", f"MDTM {src.path}"] + (["FEAT"] if ask_feat else [])
            with opts.client(src, server_dn, prelude) as session:
                mode_e = _prepare(session)
                replies = session.prelude_replies[2:]
                announced = _size_of(replies[0], src.path)
                if size is not None and announced != size:
                    raise ProtocolError(f"{src.path}: the server announces {announced} bytes, {size} were expected")
                if max_size is not None and announced > max_size:
                    raise TooLarge(f"{src.path}: {announced} bytes, more than the {max_size} there is room for")
                size = announced
                modify = replies[1].text.strip() if replies[1].ok else None
                if ask_feat and remote is None:
                    algorithm = "BLAKE3" if speaks_blake3(replies[2]) else "SHA256"
                origin = {"source": str(src), "size": size, "modify": modify, "sha256": sha256 and sha256.lower()}
                if algorithm != "SHA256":
                    origin["algorithm"] = algorithm
                partial = PartialFile(dest, origin, size=size, resume=True, durable=durable, algorithm=algorithm,
                                      reserve=True)
                if reused is None:
                    reused = partial.resumed_bytes
                if expected is None and remote is None:
                    remote = _remote_sha256(opts, src, session.server_dn, algorithm)
                missing = partial.missing(size)
                fetched.update(missing)
                if missing:
                    mover = _retrieve_mode_e if mode_e else _retrieve_mode_s
                    moved = Counter()
                    try:
                        mover(session, src.path, partial, size, parallel, moved, progress, timeout)
                    finally:
                        transferred += moved.total
                if expected is None:
                    remote.join()
                    if remote.error is not None:
                        raise remote.error
                    expected = remote.value
                try:
                    digest = partial.commit(size, expected)
                except ChecksumMismatch:
                    if repaired:
                        partial.discard()
                        raise
                    bad = _locate_corruption(session, src.path, partial, size)
                    if not bad:
                        partial.discard()
                        raise
                    for a, b in bad:
                        partial.forget(a, b)
                        repaired += b - a
                    partial.close()
                    attempts -= 1          # a repair round is not a failed attempt
                    continue
            if progress is not None:
                progress(size, size)
            return TransferResult(str(src), str(dest), size, digest if algorithm == "SHA256" else "",
                                  time.monotonic() - started, transferred, reused or 0, fetched.format(), attempts,
                                  parallel, repaired, digest if algorithm == "BLAKE3" else "")
        except (TransferError, ReplyError) as exc:
            if remote is not None and not remote.alive and remote.error is not None:
                remote = None           # ask again on the next attempt
            if not _retryable(exc) or attempts > retries:
                raise
            time.sleep(retry_delay)
        finally:
            if partial is not None:
                partial.close()


def _retrieve_mode_e(session: GridFTPClient, path: str, partial: PartialFile, size: int, parallel: int,
                     counter: Counter, progress: Progress | None, timeout: float) -> None:
    held = partial.snapshot()
    listener = session.data_listener()
    receiver = ModeEReceiver(partial, limit=size, counter=counter)
    protection = session.data_protection()
    base = held.total()
    ticker = _Ticker(POLL, lambda: (partial.checkpoint(),
                                    progress(min(size, base + counter.total), size) if progress else None))
    acceptor = None
    try:
        setup = [f"OPTS RETR Parallelism={parallel},{parallel},{parallel};",
                 session.port_command(*listener.getsockname()[:2])]
        if held:
            setup.append(f"REST {held.format()}")
        # accept (and authenticate) data connections before RETR is answered: Globus with GSI
        # connects and completes the data channel handshake before it sends its 150
        acceptor = accept_connections(listener, receiver, protection=protection, timeout=timeout)
        _start_transfer(session, setup, f"RETR {path}")
        final = _await_final(session, alive=_activity(counter), idle_timeout=2 * timeout)
        if not final.ok:
            if getattr(receiver.error, "local", False):    # the server aborted because this side stopped reading
                raise receiver.error
            receiver.fail(TransferError(f"server ended the transfer: {final.code} {final.text}"))
            raise reply_error(f"RETR {path}", final.code, final.text)
        if not receiver.wait(timeout):
            raise TransferError("the server finished but the data did not all arrive")
        if receiver.error is not None:
            raise receiver.error if isinstance(receiver.error, GridFTPError) else \
                TransferError(str(receiver.error))
    finally:
        if not receiver.done:
            receiver.fail(TransferError("transfer abandoned"))
        shutdown_listener(listener)
        if acceptor is not None:
            acceptor.join(timeout=5)
        receiver.close()
        ticker.stop()


def _retrieve_mode_s(session: GridFTPClient, path: str, partial: PartialFile, size: int, parallel: int,
                     counter: Counter, progress: Progress | None, timeout: float) -> None:
    start = partial.snapshot().contiguous_end(0)
    reply = session.command(session.passive_command())
    if not reply.ok:
        raise reply_error("PASV", reply.code, reply.text)
    host, port = session.passive_addresses(reply)[0]
    setup = [f"REST {start}"] if start else []
    ticker = _Ticker(POLL, lambda: (partial.checkpoint(),
                                    progress(min(size, start + counter.total), size) if progress else None))
    try:
        _start_transfer(session, setup, f"RETR {path}")
        sock = connect_streams([(host, port)], 1, protection=session.data_protection(), timeout=timeout)[0]
        worker = Worker(lambda: receive_stream(sock, partial, start, limit=size, counter=counter), "gridftp-retr-s")
        final = _await_final(session, alive=_activity(counter), idle_timeout=2 * timeout)
        worker.join(timeout)
        if not final.ok:
            raise reply_error(f"RETR {path}", final.code, final.text)
        if worker.error is not None:
            raise worker.error
    finally:
        ticker.stop()


def _locate_corruption(session: GridFTPClient, path: str, partial: PartialFile, size: int) -> list[tuple[int, int]]:
    """Compare per-chunk sha256 with the source's (``CKSM SHA256 offset length``); the bad chunks."""
    chunk = max(1 << 20, -(-size // 64))
    chunks = [(off, min(chunk, size - off)) for off in range(0, size, chunk)]
    try:
        replies = session.pipeline([f"CKSM SHA256 {off} {length} {path}" for off, length in chunks])
    except GridFTPError:
        return []
    bad = []
    for (off, length), reply in zip(chunks, replies):
        if not reply.ok:
            return []
        if reply.text.strip().lower() != hash_fd(partial.fd, "SHA256", off, length):   # every server has SHA256
            bad.append((off, off + length))
    return bad


# -- restart log of transfers whose receiver is a server ------------------------------------------------------
def default_state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vmgrid" / "gridftp"


class _RestartLog:
    """The ``111`` range markers a receiving server confirmed, kept to resume with ``REST``."""

    def __init__(self, state_dir: Path, key: dict):
        self.key = key
        digest = new_hash("SHA256")
        digest.update(json.dumps(key, sort_keys=True).encode())
        digest = digest.hexdigest()[:32]
        self.path = Path(state_dir) / f"{digest}.json"
        self.ranges = RangeSet()
        self.sha256: str | None = None
        self._lock = threading.Lock()
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("key") == key:
                self.ranges = RangeSet.parse(doc["ranges"]) if doc.get("ranges") else RangeSet()
                self.sha256 = doc.get("sha256")
        except (OSError, ValueError, KeyError, GridFTPError):
            pass

    def add_marker(self, reply: Reply) -> None:
        text = parse_range_marker(reply)
        if text is None:
            return
        try:
            ranges = RangeSet.parse(text)
        except ProtocolError:
            return
        with self._lock:
            self.ranges.update(ranges)
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "ranges": self.ranges.format(), "sha256": self.sha256}))
        os.replace(tmp, self.path)

    def reset(self) -> None:
        with self._lock:
            self.ranges = RangeSet()
            self.save()

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _store_setup(size: int, sha256: str, held: RangeSet) -> list[str]:
    setup = [f"ALLO {size}", f"SCKS SHA256 {sha256}"]
    if held:
        setup.append(f"REST {held.format()}")
    return setup


def _check_tolerant(lines: list[str], replies: list[Reply], optional: set[str]) -> None:
    """Raise for the first refused command, except those in ``optional`` (a server may lack SCKS). An ``ALLO``
    refused with 552 is the server's answer that the file will not fit (a vmgrid server's bound on files): raised
    too, not tolerated as a server without ALLO (its STOR then ran into the bound, 426, retried as transient)."""
    for line, reply in zip(lines, replies):
        verb = line.split(" ", 1)[0]
        if not reply.ok and (verb not in optional or (verb == "ALLO" and reply.code == 552)):
            raise reply_error(line, reply.code, reply.text)


def _pipeline_tolerant(session: GridFTPClient, lines: list[str], optional: set[str]) -> list[Reply]:
    replies = session.pipeline(lines)
    _check_tolerant(lines, replies, optional)
    return replies


# what a receiving server says it received when it refuses a STOR for its SCKS digest: vmgrid's server (554 Checksum
# mismatch: received sha256 HEX is not HEX; file discarded.) and globus-gridftp-server (550 GlobusError: v=1
# c=INCORRECT_CHECKSUM / 550-GridFTP-Computed-Checksum: HEX / 550-GridFTP-Expected-Checksum: HEX)
_RECEIVED_SHA256 = re.compile(r"(?:received sha256|Computed-Checksum:)\s*([0-9a-f]{64})\b", re.IGNORECASE)


def _checksum_refusal(exc: BaseException, path: str, expected: str) -> ChecksumMismatch | None:
    """The :class:`ChecksumMismatch` a receiving server's refusal of a ``STOR`` for its ``SCKS`` digest means (see
    above), with what it received when it says so; None for any other error."""
    if not (isinstance(exc, ReplyError) and exc.code >= 500 and exc.command.upper().startswith("STOR")
            and ("checksum mismatch" in exc.text.lower() or "incorrect_checksum" in exc.text.lower())):
        return None
    said = _RECEIVED_SHA256.search(exc.text)
    return ChecksumMismatch(path, expected, said.group(1).lower() if said else "")


def _refused_for_good(exc: BaseException, *commands: str) -> bool:
    """Whether ``exc`` is a permanent refusal (5xx) of the transfer itself (one of ``commands``: its STOR or ALLO, a
    third-party's RETR): the server will not take this file there as asked (550 a path it does not allow, 552 no
    room in a quota or a bound on files, 553 a name), running it again as it is cannot mend, and a vmgrid server keeps
    nothing of it. Its restart log then goes, so nothing is left in the state directory for ever (trial14 M1: a
    552-refused upload left its marker in ~/.cache/vmgrid/gridftp). A transient refusal (4xx), a cut connection or a
    login refused keeps it: the same command run again resumes from what the server confirmed."""
    return (isinstance(exc, ReplyError) and exc.code >= 500 and not exc.transient
            and exc.command.split(" ", 1)[0].upper() in commands)


def _verify_remote(session: GridFTPClient, path: str, expected: str, scks_accepted: bool) -> None:
    try:
        actual = _source_sha256(session, path)
    except ChecksumUnavailable:
        if scks_accepted:
            return          # the server verified against SCKS before the file took its name
        raise
    if actual != expected:
        raise ChecksumMismatch(path, expected, actual)


# -- upload -----------------------------------------------------------------------------------------------------
def upload(src_path: str | os.PathLike, url: str, parallel: int = DEFAULT_PARALLEL, *,
           credential: Credential | None = None, trust=None, server_dn: str | None = None,
           sha256: str | None = None, progress: Progress | None = None, retries: int = 2,
           retry_delay: float = 1.0, timeout: float = 60.0, state_dir: str | os.PathLike | None = None,
           max_rate: float = 0, identify=None, gsi: bool | str = False, prot: str = "P",
           delegate: bool | str = True) -> TransferResult:
    """Send a local file to ``url`` over ``parallel`` MODE E streams; verified, restartable.

    The local sha256 (given, remembered for this unchanged file, or computed) is announced with
    ``SCKS`` before ``STOR``, so a vmgrid server verifies before the file takes its name; the
    server's ``CKSM SHA256`` is compared afterwards. A re-run after an interruption sends only
    the ranges the server has not confirmed. ``max_rate`` limits bytes/s (0: unlimited). ``delegate``: as
    :func:`download`'s.
    """
    _check_parallel(parallel)
    src = Path(src_path)
    dst = GridFTPURL.parse(url)
    opts = _Options(credential, trust, timeout, identify, gsi, prot, delegate=delegate)
    st = src.stat()
    size = st.st_size
    log = _RestartLog(Path(state_dir) if state_dir else default_state_dir(),
                      {"op": "upload", "source": str(src.resolve()), "size": size, "mtime_ns": st.st_mtime_ns,
                       "destination": str(dst)})
    started = time.monotonic()
    digest = (sha256 or log.sha256 or hash_file(src, "SHA256")).lower()
    if log.sha256 != digest:
        log.sha256 = digest
        log.save()
    reused = log.ranges.total()
    transferred = 0
    fetched = RangeSet()
    attempts = 0
    fd = os.open(src, os.O_RDONLY)
    try:
        while True:
            attempts += 1
            try:
                held = log.ranges.copy()
                setup = _store_setup(size, digest, held) + ["EPSV" if ":" in dst.host else "PASV"]
                with opts.client(dst, server_dn, PREPARE + setup) as session:
                    if not _prepare(session):
                        raise GridFTPError(f"{dst.host} does not offer MODE E")
                    replies = session.prelude_replies[len(PREPARE):]
                    _check_tolerant(setup, replies, {"SCKS", "ALLO", "REST"})
                    scks_ok = replies[1].ok
                    if held and not replies[2].ok:
                        log.reset()
                        raise TransferError("server refused the restart marker")
                    addresses = session.passive_addresses(replies[-1])
                    todo = held.missing(0, size)
                    fetched.update(todo)
                    counter = Counter()
                    # Globus answers STOR only once data connections arrive: connect right away
                    session.send(f"STOR {dst.path}")
                    sender = ModeESender(fd, todo, counter=counter,
                                         throttle=Throttle(max_rate) if max_rate else None)
                    ticker = _Ticker(POLL, lambda: progress(min(size, size - sum(b - a for a, b in todo) +
                                                                counter.total), size) if progress else None)
                    protection = session.data_protection()
                    opening = Opening()
                    worker = Worker(lambda: sender.run(connect_streams(addresses, parallel, protection=protection,
                                                                       timeout=timeout, opening=opening)),
                                    "gridftp-stor")
                    final: Reply | None = None
                    try:
                        final = _await_final(session, on_marker=log.add_marker, alive=_activity(counter),
                                             idle_timeout=2 * timeout)
                    finally:
                        if final is None or not final.ok:
                            # refused (550, 552...): the data connections it will never accept end now,
                            # not at their timeout
                            opening.abort()
                            sender.cancel()
                        worker.join()
                        ticker.stop()
                        transferred += counter.total
                    if final.code == 554 and held and "restart" in final.text.lower():
                        log.reset()         # the server no longer holds what we recorded: start afresh
                        raise TransferError(f"server cannot restart: {final.text}")
                    if not final.ok:
                        raise reply_error(f"STOR {dst.path}", final.code, final.text)
                    if worker.error is not None:
                        error = worker.error
                        raise error if isinstance(error, GridFTPError) else TransferError(str(error))
                    _verify_remote(session, dst.path, digest, scks_ok)
                log.remove()
                if progress is not None:
                    progress(size, size)
                return TransferResult(str(src), str(dst), size, digest, time.monotonic() - started, transferred,
                                      reused, fetched.format(), attempts, parallel)
            except ChecksumMismatch:
                log.remove()        # see below
                raise
            except (TransferError, ReplyError) as exc:
                refusal = _checksum_refusal(exc, dst.path, digest)
                if refusal is not None:
                    # the digest (given, remembered or computed) or the server's bytes are wrong: neither is kept,
                    # so that the command run again (with the right --sha256, or none) starts afresh
                    log.remove()
                    raise refusal from exc
                if _refused_for_good(exc, "STOR", "ALLO"):
                    log.remove()
                    raise
                if not _retryable(exc) or attempts > retries:
                    raise
                time.sleep(retry_delay)
    finally:
        os.close(fd)


# -- third party ------------------------------------------------------------------------------------------------
def _third_party_sessions(opts: _Options, stack: contextlib.ExitStack, src: GridFTPURL, src_dn: str | None,
                          dst: GridFTPURL, dst_dn: str | None) -> tuple[GridFTPClient, GridFTPClient]:
    """The source's and the destination's sessions, both under AUTH TLS or both under AUTH GSSAPI: with
    ``gsi=GSI_FALLBACK``, once one server took GSI (it refused AUTH TLS with 504), the other is logged in with GSI
    too (every vmgrid server offers both), since DCAU A needs a delegated proxy on each side."""
    source = stack.enter_context(opts.client(src, src_dn, PREPARE + [f"SIZE {src.path}", f"MDTM {src.path}"]))
    target = stack.enter_context(opts.client(dst, dst_dn, PREPARE, gsi=True if source.gsi else None))
    if target.gsi and not source.gsi:
        source.quit()
        source = stack.enter_context(opts.client(src, src_dn, PREPARE + [f"SIZE {src.path}", f"MDTM {src.path}"],
                                                 gsi=True))
    return source, target


def third_party(src_url: str, dst_url: str, parallel: int = DEFAULT_PARALLEL, *,
                credential: Credential | None = None, trust=None, src_dn: str | None = None,
                dst_dn: str | None = None, sha256: str | None = None, progress: Progress | None = None,
                retries: int = 2, retry_delay: float = 1.0, timeout: float = 60.0,
                state_dir: str | os.PathLike | None = None, identify=None, gsi: bool | str = False,
                prot: str = "P", delegate: bool | str = True) -> TransferResult:
    """Have the source server send ``src_url`` straight to the destination server.

    This process only drives both control connections: the destination listens (``PASV``),
    the source connects ``parallel`` streams to it (``PORT``, ``OPTS RETR Parallelism``).
    With ``gsiftp://`` on both sides each server must prove the other's host DN on the data
    connections (``DCAU S``); with ``gsi=True`` each holds a proxy delegated by this client and
    proves the user's DN (``DCAU A``), which is what a Globus server does. With ``gsi=GSI_FALLBACK`` a server
    that refuses AUTH TLS with 504 is reached with AUTH GSSAPI, and then so is the other (a server under AUTH TLS
    holds no proxy of the user, so it could not prove her DN): both hold a delegated proxy, as with ``gsi=True``.
    ``delegate``: what each server gets under GSI, a limited proxy by default (enough for DCAU A).
    Restart markers from the destination are kept in ``state_dir``.
    """
    _check_parallel(parallel)
    src = GridFTPURL.parse(src_url)
    dst = GridFTPURL.parse(dst_url)
    if src.secure != dst.secure:
        raise GridFTPError("third-party transfers need both URLs ftp:// or both gsiftp://")
    opts = _Options(credential, trust, timeout, identify, gsi, prot, delegate=delegate)
    started = time.monotonic()
    transferred = 0
    fetched = RangeSet()
    attempts = 0
    reused: int | None = None
    log: _RestartLog | None = None
    digest = ""
    while True:
        attempts += 1
        try:
            with contextlib.ExitStack() as sessions:
                source, target = _third_party_sessions(opts, sessions, src, src_dn, dst, dst_dn)
                if not _prepare(source) or not _prepare(target):
                    raise GridFTPError("third-party transfers need MODE E on both servers")
                replies = source.prelude_replies[2:]
                size = _size_of(replies[0], src.path)
                modify = replies[1].text.strip() if replies[1].ok else None
                log = _RestartLog(Path(state_dir) if state_dir else default_state_dir(),
                                  {"op": "third-party", "source": str(src), "size": size, "modify": modify,
                                   "destination": str(dst)})
                digest = (sha256 or log.sha256 or _source_sha256(source, src.path)).lower()
                if log.sha256 != digest:
                    log.sha256 = digest
                    log.save()
                if reused is None:
                    reused = log.ranges.total()
                held = log.ranges.copy()
                todo = held.missing(0, size)
                fetched.update(todo)
                if src.secure and not source.gsi:       # both under AUTH TLS (_third_party_sessions)
                    source.ok(f"DCAU S {target.server_dn}")
                    target.ok(f"DCAU S {source.server_dn}")
                # with GSI both servers hold a proxy we delegated: DCAU A (set at login) makes each prove
                # the user's DN to the other, as globus-url-copy does
                replies = _pipeline_tolerant(target, _store_setup(size, digest, held) + [target.passive_command()],
                                             {"SCKS", "ALLO", "REST"})
                scks_ok = replies[1].ok
                if held and not replies[2].ok:
                    log.reset()
                    raise TransferError("destination refused the restart marker")
                addresses = target.passive_addresses(replies[-1])
                target.send(f"STOR {dst.path}")
                setup = [f"OPTS RETR Parallelism={parallel},{parallel},{parallel};",
                         source.port_command(*addresses[0])]
                if held:
                    setup.append(f"REST {held.format()}")
                to_send = sum(b - a for a, b in todo)
                moved = [0]

                def on_dst_marker(reply: Reply) -> None:
                    log.add_marker(reply)
                    n = parse_perf_marker(reply) if reply.code == 112 else None
                    if n is not None:
                        moved[0] = n
                        if progress is not None:
                            progress(min(size, size - to_send + n), size)

                watcher = Worker(lambda: _await_final(target, on_marker=on_dst_marker, idle_timeout=timeout * 10),
                                 "gridftp-3pt")
                src_refused: ReplyError | None = None
                try:
                    try:
                        _start_transfer(source, setup, f"RETR {src.path}")
                        src_final = _await_final(source, idle_timeout=timeout * 10)
                    except ReplyError as exc:          # the source refused at once (e.g. 425: no data connection)
                        src_refused, src_final = exc, Reply(exc.code, (exc.text,))
                    watcher.join(timeout)
                finally:
                    if watcher.alive:
                        target.close()      # unblocks the watcher; the destination aborts the STOR
                        watcher.join()
                dst_final: Reply | None = watcher.value if watcher.error is None else None
                if dst_final is not None and not dst_final.ok and not (dst_final.code < 500 and not src_final.ok):
                    # the destination refused the STOR (550: a path it does not allow, 552: no room): that is the
                    # cause, whatever the source then said about the data connection it could not open (425)
                    raise reply_error(f"STOR {dst.path}", dst_final.code, dst_final.text) from src_refused
                if src_refused is not None:
                    raise src_refused
                if watcher.error is not None:
                    raise watcher.error
                transferred += moved[0] or (to_send if src_final.ok and dst_final.ok else 0)
                if not src_final.ok:
                    raise reply_error(f"RETR {src.path}", src_final.code, src_final.text)
                if not dst_final.ok:
                    raise reply_error(f"STOR {dst.path}", dst_final.code, dst_final.text)
                _verify_remote(target, dst.path, digest, scks_ok)
            log.remove()
            if progress is not None:
                progress(size, size)
            return TransferResult(str(src), str(dst), size, digest, time.monotonic() - started, transferred,
                                  reused or 0, fetched.format(), attempts, parallel)
        except ChecksumMismatch:
            if log is not None:
                log.remove()        # as an upload's: nothing wrong is resumed from
            raise
        except (TransferError, ReplyError) as exc:
            refusal = _checksum_refusal(exc, dst.path, digest) if log is not None else None
            if refusal is not None:
                log.remove()
                raise refusal from exc
            if log is not None and _refused_for_good(exc, "STOR", "ALLO", "RETR"):
                log.remove()
                raise
            if not _retryable(exc) or attempts > retries:
                raise
            time.sleep(retry_delay)


def checksum(url: str, algorithm: str = "SHA256", *, offset: int = 0, length: int = -1,
             credential: Credential | None = None, trust=None, server_dn: str | None = None,
             timeout: float = 60.0, gsi: bool | str = False) -> str:
    """The server's checksum (``CKSM``) of a file or a byte range of it, lowercase hex."""
    target = GridFTPURL.parse(url)
    with GridFTPClient(target, credential=credential, trust=trust, server_dn=server_dn, timeout=timeout,
                       gsi=gsi, delegate=False) as s:       # a control session alone: nothing to delegate
        return s.checksum(target.path, algorithm, offset, length)


__all__ = ["TransferResult", "download", "upload", "third_party", "checksum", "default_state_dir", "Progress"]
