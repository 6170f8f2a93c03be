"""xs:dateTime and xs:duration as vmgrid writes and reads them: one copy for every service, the
resource framework and the clients.

Times are UNIX seconds (float) inside vmgrid and UTC ``2026-11-27T06:00:00.123456Z`` on the wire.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

_DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")


def format_datetime(ts: float, *, fraction: bool = True) -> str:
    """UNIX seconds as an xs:dateTime in UTC (``Z``), with microseconds unless ``fraction`` is False."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.fromtimestamp(ts, timezone.utc).strftime(fmt)


def now_datetime(*, fraction: bool = True) -> str:
    """The current time as an xs:dateTime in UTC."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: str) -> float:
    """An xs:dateTime as UNIX seconds; without a zone it is UTC. ValueError when it is not one."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def to_datetime(text: str | None) -> datetime | None:
    """An xs:dateTime as an aware ``datetime`` (None for None or empty text)."""
    if not text or not text.strip():
        return None
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def parse_duration(text: str) -> float:
    """An xs:duration of days, hours, minutes and seconds (P1DT2H, PT30M, PT90S) in seconds;
    ValueError for anything else (years and months have no fixed length)."""
    m = _DURATION.fullmatch(text.strip())
    if not m or text.strip() in ("P", "PT"):
        raise ValueError(f"{text!r} is not a duration of days, hours, minutes and seconds")
    d, h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


def format_duration(seconds: float) -> str:
    """Seconds as an xs:duration (``PT90S``; whole seconds unless there is a fraction)."""
    if seconds < 0:
        raise ValueError("a duration is not negative")
    whole = int(seconds)
    return f"PT{whole}S" if whole == seconds else f"PT{seconds!r}S"
