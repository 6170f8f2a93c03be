"""The GridFTP server's grid-mapfile: the DNs that may log in, read as Globus reads them, and read again when
the file changes (an operator's edit takes effect at the next login, as with globus-gridftp-server)."""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("gridftp.gridmap")

_HEXDIGITS = "0123456789abcdefABCDEF"
# Globus's DN comparison (gsi/cert_utils globus_gsi_cert_utils.c, ``globus_l_gsi_cert_utils_normalize_dn``): right
# after a '/', the attribute names UID=, E= and Email= (any case) stand for USERID= and emailAddress=
_GLOBUS_ALIASES = re.compile(r"(?<=/)(?:(UID=)|(E=)|(Email=))", re.IGNORECASE)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def dn_key(dn: str) -> str:
    """What a DN is compared by, as Globus compares a login's DN with a grid-mapfile's
    (gsi/gss_assist gridmap.c, ``globus_i_gss_assist_gridmap_find_dn``: ``globus_i_gsi_cert_utils_dn_cmp(dn,
    gline_tmp->dn) == 0``, which is ``strcasecmp`` of the two DNs, then of both normalised): ASCII letters in any
    case, and ``/UID=`` the same as ``/USERID=``, ``/E=`` and ``/Email=`` the same as ``/emailAddress=``. Two DNs
    Globus takes as one have the same key. Other letters (``ö``, ``Ö``) compare exactly, as ``strcasecmp`` on
    UTF-8 bytes does."""
    normal = _GLOBUS_ALIASES.sub(lambda m: "USERID=" if m.group(1) else "emailAddress=", dn)
    return normal.translate(_ASCII_LOWER)


def _unescape(raw: str) -> str:
    """A DN as written in a grid-mapfile, its escapes taken as Globus's parser takes them
    (gsi/gss_assist/source/gridmap.c, ``globus_i_gss_assist_gridmap_parse_globusid``): a backslash makes the next
    character itself (``\\"`` a quote, ``\\\\`` a backslash), and ``\\xHH`` is the byte HH (a UTF-8 name may be
    written byte by byte: ``\\xC3\\xB6`` is ö)."""
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt == "x" and len(raw) >= i + 4 and raw[i + 2] in _HEXDIGITS and raw[i + 3] in _HEXDIGITS:
                out.append(int(raw[i + 2:i + 4], 16))
                i += 4
                continue
            out += nxt.encode("utf-8")
            i += 2
            continue
        out += c.encode("utf-8")
        i += 1
    return out.decode("utf-8")


def _split_dn(line: str) -> tuple[str, str]:
    """The DN at the start of ``line`` as written (quotes removed, escapes kept) and the rest: a quoted DN ends at
    the first quote not escaped by a backslash, a bare one at the first blank."""
    if not line.startswith('"'):
        end = len(line)
        for blank in (" ", "\t"):
            at = line.find(blank)
            if 0 <= at < end:
                end = at
        return line[:end], line[end:]
    i = 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == '"':
            return line[1:i], line[i + 1:]
        i += 1
    raise ValueError("unterminated quoted DN")


def parse_gridmap(text: str, path: str = "grid-mapfile") -> set[str]:
    """The DNs a Globus grid-mapfile names (``"/O=Grid/OU=site/CN=Jane Doe" account[,account]``; ``#`` comments and
    blank lines skipped); the accounts are not used: vmgrid authorizes by DN. A line that cannot be read raises
    ValueError naming the file and line (Globus skips such a line; vmgrid refuses the file: a typo must not
    silently drop a user, or admit one)."""
    dns = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            dn = _unescape(_split_dn(line)[0])
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: the DN's \\xHH escapes are not UTF-8") from None
        except ValueError as exc:      # an unterminated quote
            raise ValueError(f"{path}:{number}: {exc}") from None
        if not dn.startswith("/"):
            raise ValueError(f"{path}:{number}: not a DN: {dn[:60]!r}")
        dns.add(dn)
    return dns


def read_gridmap(path: Path | str) -> set[str]:
    """:func:`parse_gridmap` of a file (OSError if it cannot be read, ValueError if a line cannot)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return parse_gridmap(text, str(path))


class DNSet:
    """DNs looked up as Globus compares them (:func:`dn_key`): ``dn in DNSet(dns)``."""

    def __init__(self, dns: Iterable[str]):
        self._keys = frozenset(dn_key(dn) for dn in dns)

    def __contains__(self, dn: object) -> bool:
        return isinstance(dn, str) and dn_key(dn) in self._keys

    def __len__(self) -> int:
        return len(self._keys)


class GridMap:
    """The DNs of a grid-mapfile, read again at a lookup when the file changed (its inode, size or modification
    time: one ``stat`` per login). A new version that cannot be read (a line in error, the file gone or unreadable)
    is logged and the last good one kept, so a half-written edit neither locks everyone out nor lets anyone in.
    The first read at start raises instead. A DN is looked up as Globus looks it up (:func:`dn_key`)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        st = os.stat(self.path)
        self._dns = read_gridmap(self.path)
        self._keys = DNSet(self._dns)
        self._stamp: tuple | None = self._stamp_of(st)
        self._lock = threading.Lock()

    @staticmethod
    def _stamp_of(st: os.stat_result) -> tuple:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> None:
        """Read the file again if it changed since the last read (see the class)."""
        with self._lock:
            try:
                stamp = self._stamp_of(os.stat(self.path))
            except OSError as exc:
                if self._stamp is not None:
                    log.warning("grid-mapfile %s cannot be read (%s): keeping the %d DNs read before", self.path,
                                exc.strerror, len(self._dns))
                self._stamp = None
                return
            if stamp == self._stamp:
                return
            self._stamp = stamp         # a version in error is reported once, not at every login
            try:
                dns = read_gridmap(self.path)
            except (OSError, ValueError) as exc:
                log.warning("grid-mapfile %s changed but cannot be read: %s; keeping the %d DNs read before",
                            self.path, exc, len(self._dns))
                return
            added, removed = len(dns - self._dns), len(self._dns - dns)
            self._dns, self._keys = dns, DNSet(dns)
            log.info("grid-mapfile %s read again: %d DNs (%d added, %d removed)", self.path, len(dns), added, removed)

    def __contains__(self, dn: object) -> bool:
        self.refresh()
        return dn in self._keys

    def __len__(self) -> int:
        return len(self._dns)
