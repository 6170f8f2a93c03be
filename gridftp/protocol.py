"""Wire syntax shared by server and client: replies, host-port strings, MODE E headers, markers.

References: RFC 959 (control channel), RFC 2428 (EPSV/EPRT), RFC 3659 (SIZE/MDTM/REST),
GFD.20 (MODE E, SPAS/SPOR, ERET/ESTO, SBUF, `111`/`112` markers, `OPTS RETR`).
"""
from __future__ import annotations

import ipaddress
import re
import struct
import time
from collections import namedtuple

from .errors import ProtocolError

CRLF = b"\r\n"
MAX_LINE = 32768                # longest control line accepted (RFC 959 has no limit; servers pick one;
                                # a GSI ADAT token carries a certificate chain)
DEFAULT_FTP_PORT = 21
DEFAULT_GRIDFTP_PORT = 2811

# MODE E block header (GFD.20): 8-bit descriptor, 64-bit byte count, 64-bit offset.
BLOCK_HEADER = struct.Struct(">BQQ")
DESC_EOR = 128
DESC_EOF = 64
DESC_ERRORS = 32        # "suspected errors in data block"
DESC_RESTART = 16
DESC_EOD = 8
DESC_CLOSE = 4


# The client's records (Reply, RetrOptions, GridFTPURL, TransferResult) are named tuples, not dataclasses: importing
# dataclasses (it loads inspect, ast, dis, tokenize) and generating their methods cost 54M instructions, about 15 ms,
# of every `vmgrid transfer` start, which is measured against a C client. They are immutable records all the same.
class Reply(namedtuple("Reply", "code lines")):
    """One complete control-channel reply (multi-line replies keep all their lines): ``code`` (int) and ``lines``
    (tuple of str)."""

    __slots__ = ()

    @property
    def text(self) -> str:
        """The reply's text without the code, lines joined by newlines."""
        first, *rest = self.lines
        out = [first[4:]]
        if rest:
            out += [line.strip() for line in rest[:-1]] + [rest[-1][4:]]
        return "\n".join(out)

    @property
    def preliminary(self) -> bool:
        return 100 <= self.code < 200

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


def format_reply(code: int, text: str | list[str]) -> bytes:
    """Encode a reply; a list of lines becomes a multi-line reply (``code-first``...``code last``)."""
    lines = [text] if isinstance(text, str) else list(text)
    lines = [ln.replace("\r", " ").replace("\n", " ") for ln in lines]
    if len(lines) == 1:
        return f"{code} {lines[0]}\r\n".encode("utf-8", "replace")
    out = [f"{code}-{lines[0]}"]
    for ln in lines[1:-1]:
        # an inner line must not look like the terminating line
        out.append(" " + ln if not ln.startswith(" ") else ln)
    out.append(f"{code} {lines[-1]}")
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


def parse_reply_first_line(line: str) -> tuple[int, bool]:
    """``(code, continued)`` from a reply's first line; raises :class:`ProtocolError`."""
    if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
        raise ProtocolError(f"malformed reply line {line[:80]!r}")
    return int(line[:3]), len(line) > 3 and line[3] == "-"


# -- host-port strings ---------------------------------------------------------------------
_HOSTPORT = re.compile(r"^\s*(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})\s*$")


def parse_host_port(text: str) -> tuple[str, int]:
    """``h1,h2,h3,h4,p1,p2`` (PORT, PASV, SPAS, SPOR) to ``(host, port)``."""
    m = _HOSTPORT.match(text)
    if not m:
        raise ProtocolError(f"malformed host-port {text[:60]!r}")
    nums = [int(g) for g in m.groups()]
    if any(n > 255 for n in nums):
        raise ProtocolError(f"host-port value out of range: {text[:60]!r}")
    port = nums[4] * 256 + nums[5]
    if port == 0:
        raise ProtocolError("port 0 in host-port")
    return ".".join(map(str, nums[:4])), port


def format_host_port(host: str, port: int) -> str:
    addr = ipaddress.ip_address(host)
    if addr.version != 4:
        mapped = getattr(addr, "ipv4_mapped", None)
        if mapped is None:
            raise ProtocolError(f"{host} is not an IPv4 address: use EPSV/EPRT")
        addr = mapped
    return ",".join(str(b) for b in addr.packed) + f",{port >> 8},{port & 255}"


def parse_eprt(text: str) -> tuple[str, int]:
    """RFC 2428 ``|proto|addr|port|`` to ``(host, port)``."""
    text = text.strip()
    if len(text) < 7:
        raise ProtocolError("malformed EPRT argument")
    d = text[0]
    parts = text.split(d)
    if len(parts) != 5 or parts[4] != "" or parts[1] not in ("1", "2"):
        raise ProtocolError(f"malformed EPRT argument {text[:60]!r}")
    try:
        addr = ipaddress.ip_address(parts[2])
        port = int(parts[3])
    except ValueError as exc:
        raise ProtocolError(f"malformed EPRT argument {text[:60]!r}") from exc
    if addr.version != {"1": 4, "2": 6}[parts[1]] or not 0 < port < 65536:
        raise ProtocolError(f"malformed EPRT argument {text[:60]!r}")
    return str(addr), port


def format_eprt(host: str, port: int) -> str:
    addr = ipaddress.ip_address(host)
    return f"|{1 if addr.version == 4 else 2}|{addr}|{port}|"


def parse_epsv_reply(text: str) -> int:
    """The port of a ``229 Entering Extended Passive Mode (|||port|)`` reply."""
    m = re.search(r"\((.)\1\1(\d+)\1\)", text)
    if not m:
        raise ProtocolError(f"malformed EPSV reply {text[:80]!r}")
    return int(m.group(2))


def find_host_ports(text: str) -> list[tuple[str, int]]:
    """All ``h1,...,p2`` strings in a PASV (227) or SPAS (229) reply, in order."""
    return [parse_host_port(m.group(0)) for m in re.finditer(r"\d{1,3}(?:,\d{1,3}){5}", text)]


# -- OPTS RETR -------------------------------------------------------------------------------
class RetrOptions(namedtuple("RetrOptions", "parallelism min_parallelism max_parallelism", defaults=(1, 1, 1))):
    """``OPTS RETR Parallelism=start,min,max;`` (GFD.20), three ints; layout options are accepted and ignored."""

    __slots__ = ()


MAX_PARALLELISM = 64


def parse_retr_options(text: str) -> RetrOptions:
    opts = RetrOptions()
    for item in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep:
            raise ProtocolError(f"malformed option {item!r}")
        if name == "parallelism":
            nums = value.split(",")
            if not 1 <= len(nums) <= 3 or not all(n.strip().isdigit() for n in nums):
                raise ProtocolError(f"malformed Parallelism={value!r}")
            vals = [int(n) for n in nums] + [int(nums[0])] * (3 - len(nums))
            if not all(1 <= v <= MAX_PARALLELISM for v in vals):
                raise ProtocolError(f"parallelism must be 1..{MAX_PARALLELISM}")
            opts = RetrOptions(*vals)
        elif name in ("stripelayout", "blocksize"):
            continue
        else:
            raise ProtocolError(f"unknown RETR option {name!r}")
    return opts


# -- markers ---------------------------------------------------------------------------------
def format_perf_marker(bytes_transferred: int, stripe_index: int = 0, stripe_count: int = 1,
                       timestamp: float | None = None) -> list[str]:
    """The lines of a ``112-Perf Marker`` reply (pass to :func:`format_reply` with code 112)."""
    ts = time.time() if timestamp is None else timestamp
    return ["Perf Marker", f"Timestamp:  {ts:.1f}", f"Stripe Index: {stripe_index}",
            f"Stripe Bytes Transferred: {bytes_transferred}", f"Total Stripe Count: {stripe_count}", "End."]


def parse_perf_marker(reply: Reply) -> int | None:
    """``Stripe Bytes Transferred`` of a 112 reply, or None if absent."""
    m = re.search(r"Stripe Bytes Transferred:\s*(\d+)", reply.text)
    return int(m.group(1)) if m else None


def parse_range_marker(reply: Reply) -> str | None:
    """The range list of a ``111 Range Marker a-b,...`` reply, or None for other 111 replies."""
    m = re.match(r"\s*Range Marker\s+(\S+)", reply.text)
    return m.group(1) if m else None


# -- time ------------------------------------------------------------------------------------
def format_mdtm(mtime: float) -> str:
    """RFC 3659 time-val ``YYYYMMDDHHMMSS`` (UTC)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(mtime))


def split_command(line: str) -> tuple[str, str]:
    """``("VERB", "argument")`` of a command line; the verb upper-cased."""
    verb, _, arg = line.partition(" ")
    return verb.upper(), arg
