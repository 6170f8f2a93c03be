"""Globus grid-mapfiles (``/etc/grid-security/grid-mapfile``): one quoted DN and its local account(s)
per line. A VO group can import its members from one."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEX = re.compile(r"[0-9A-Fa-f]{2}")


class GridmapError(ValueError):
    """A line of a grid-mapfile cannot be read."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclass(frozen=True)
class GridmapEntry:
    dn: str
    accounts: tuple[str, ...]
    line: int


def _read_dn(text: str, path: str, lineno: int) -> tuple[str, str]:
    """The DN at the start of ``text`` (quoted, with \\" \\\\ and \\xHH escapes, or bare) and the rest."""
    if not text.startswith('"'):
        dn, _, rest = text.partition(" ")
        if "\t" in dn:
            dn, _, more = dn.partition("\t")
            rest = more + " " + rest
        return dn, rest
    out = bytearray()              # \xHH is a byte, as Globus reads it: \xC3\xB6 is the UTF-8 of ö
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x" and _HEX.fullmatch(text[i + 2:i + 4]):
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += nxt.encode("utf-8")
            i += 2
            continue
        if c == '"':
            try:
                return out.decode("utf-8"), text[i + 1:]
            except UnicodeDecodeError:
                raise GridmapError(path, lineno, "the DN's \\xHH escapes are not UTF-8") from None
        out += c.encode("utf-8")
        i += 1
    raise GridmapError(path, lineno, "the DN's closing quote is missing")


def parse_gridmap(text: str, path: str = "grid-mapfile") -> list[GridmapEntry]:
    """Every mapping of a grid-mapfile, in order; comments (#) and blank lines skipped."""
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        dn, rest = _read_dn(line, path, lineno)
        if not dn.startswith("/") or "=" not in dn:
            raise GridmapError(path, lineno, f"{dn!r} is not a DN in /O=.../CN=... form")
        accounts = tuple(a.strip() for a in rest.strip().split(",") if a.strip())
        if not accounts:
            raise GridmapError(path, lineno, f"no local account after the DN {dn}")
        for a in accounts:
            if any(ch.isspace() for ch in a):
                raise GridmapError(path, lineno, f"bad account name {a!r}")
        entries.append(GridmapEntry(dn, accounts, lineno))
    return entries


def read_gridmap(path: Path) -> list[GridmapEntry]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GridmapError(str(path), 0, "not UTF-8 text") from None
    return parse_gridmap(text, str(path))


def gridmap_line(dn: str, accounts: list[str] | tuple[str, ...]) -> str:
    """One grid-mapfile line for ``dn`` (quoted, escaped)."""
    escaped = dn.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" {",".join(accounts)}'
