"""Byte-range sets: what a receiver holds, in the `111 Range Marker` / `REST` syntax of GFD.20.

A range ``a-b`` is half-open, ``[a, b)``, as the Globus tools write it
(``111 Range Marker 0-200000000`` for a 200000000-byte file).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from .errors import ProtocolError

MAX_RANGES = 100_000        # a marker or REST with more ranges than this is refused
MAX_OFFSET = 1 << 62        # offsets are 64-bit in MODE E headers; keep clear of overflow


class RangeSet:
    """A set of byte offsets kept as sorted, disjoint, non-adjacent half-open ranges."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    # -- building -----------------------------------------------------------------
    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging with overlapping or touching ranges."""
        if start < 0 or end < start:
            raise ValueError(f"bad range {start}-{end}")
        if start == end:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(ends, start)          # first range that ends at or after start
        j = bisect.bisect_right(starts, end)         # ranges [i, j) touch [start, end)
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

    def update(self, other: Iterable[tuple[int, int]]) -> None:
        for start, end in other:
            self.add(start, end)

    def remove(self, start: int, end: int) -> None:
        """Take ``[start, end)`` out of the set."""
        if end <= start:
            return
        kept = RangeSet()
        for a, b in self:
            if b <= start or a >= end:
                kept.add(a, b)
                continue
            if a < start:
                kept.add(a, start)
            if b > end:
                kept.add(end, b)
        self._starts, self._ends = kept._starts, kept._ends

    def copy(self) -> "RangeSet":
        new = RangeSet()
        new._starts, new._ends = list(self._starts), list(self._ends)
        return new

    # -- queries ------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends))

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({self.format() or 'empty'})"

    def total(self) -> int:
        """Number of bytes in the set."""
        return sum(b - a for a, b in self)

    def covers(self, start: int, end: int) -> bool:
        """True when every byte of ``[start, end)`` is in the set."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def contiguous_end(self, start: int = 0) -> int:
        """The end of the run of held bytes beginning at ``start`` (``start`` if none)."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return self._ends[i]
        return start

    def issubset(self, other: "RangeSet") -> bool:
        return all(other.covers(a, b) for a, b in self)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of ``[start, end)`` not in the set, in order."""
        gaps: list[tuple[int, int]] = []
        pos = start
        for a, b in self:
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                gaps.append((pos, min(a, end)))
            pos = max(pos, b)
            if pos >= end:
                break
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def clipped(self, start: int, end: int) -> "RangeSet":
        """The part of the set inside ``[start, end)``."""
        return RangeSet((max(a, start), min(b, end)) for a, b in self if a < end and b > start)

    def shifted(self, delta: int) -> "RangeSet":
        return RangeSet((a + delta, b + delta) for a, b in self)

    # -- wire syntax ------------------------------------------------------------------
    def format(self) -> str:
        """``"0-100,200-300"``: the syntax of `111 Range Marker` replies and `REST` in MODE E."""
        return ",".join(f"{a}-{b}" for a, b in self)

    @classmethod
    def parse(cls, text: str) -> "RangeSet":
        """Parse a range list; raises :class:`ProtocolError` on anything but ``a-b[,c-d...]``."""
        text = text.strip()
        if not text:
            raise ProtocolError("empty range list")
        parts = text.split(",")
        if len(parts) > MAX_RANGES:
            raise ProtocolError(f"more than {MAX_RANGES} ranges")
        result = cls()
        for part in parts:
            start_s, sep, end_s = part.strip().partition("-")
            if not sep or not _offset_text(start_s) or not _offset_text(end_s):
                raise ProtocolError(f"malformed range {part!r}")
            start, end = int(start_s), int(end_s)
            if end < start or end > MAX_OFFSET:
                raise ProtocolError(f"bad range {part!r}")
            result.add(start, end)
        return result


def _offset_text(text: str) -> bool:
    """ASCII digits of a 64-bit number at most: int() of thousands of digits raises ValueError (and costs)."""
    return text.isascii() and text.isdigit() and len(text) <= 20


def split_blocks(ranges: Iterable[tuple[int, int]], block_size: int) -> Iterator[tuple[int, int]]:
    """Cut ranges into ``(offset, length)`` blocks of at most ``block_size`` bytes, in order."""
    for start, end in ranges:
        pos = start
        while pos < end:
            length = min(block_size, end - pos)
            yield pos, length
            pos += length
