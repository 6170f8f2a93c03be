"""The guestd channel protocol: JSON lines over virtio-serial, shared by guestd and the VMManager.

One UTF-8 JSON object per line, at most MAX_LINE bytes. Every message has ``v`` (the protocol
version) and ``op``. Host to guest: ``ping``, ``status``, ``set-time``, ``context``,
``certificate``, ``recontext`` (a warm-snapshot clone's new identity), ``migrated`` (a migrated
instance's new lease, clock and token). Guest to host:
``ready``, ``report``, ``reply``; each carries the instance's ``token``. docs/guestd.md is the reference.
"""
from __future__ import annotations

import json
from typing import Any

VERSION = 1
MAX_LINE = 64 * 1024

HOST_OPS = frozenset({"ping", "status", "set-time", "context", "certificate", "recontext", "migrated"})
GUEST_OPS = frozenset({"ready", "report", "reply"})


class ProtocolError(ValueError):
    """A line on the channel is not a valid guestd protocol message."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line, with the protocol version filled in."""
    body = dict(message)
    body.setdefault("v", VERSION)
    line = json.dumps(body, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the {MAX_LINE}-byte line limit")
    return line


def decode(line: bytes, allowed_ops: frozenset[str]) -> dict[str, Any]:
    """Parse and check one line; raise ProtocolError for anything else than an allowed message."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes exceeds the {MAX_LINE}-byte limit")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    except RecursionError:      # '[' nested some thousands deep (a 64 KiB line holds 65,000): the reader lives on
        raise ProtocolError("not a JSON line: nested too deeply") from None
    except ValueError as exc:   # an integer of more than 4,300 digits (Python's bound on its conversion)
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    if b"\\u" in line and _lone_surrogate(message):
        # JSON's "\ud800" decodes to a str no UTF-8 can hold: kept, it fails later, far from here (an encode in the
        # reader thread, the log's write, SQLite's insert of what the node stores)
        raise ProtocolError("a string holds a lone surrogate (not Unicode text)")
    if message.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r} (want {VERSION})")
    op = message.get("op")
    if op not in allowed_ops:
        raise ProtocolError(f"unknown or misdirected op {op!r}")
    if "id" in message and (not isinstance(message["id"], int) or isinstance(message["id"], bool)):
        raise ProtocolError("id must be an integer")
    if op == "set-time" and not isinstance(message.get("time"), (int, float)):
        raise ProtocolError("set-time needs a numeric 'time' (seconds since the epoch)")
    if op == "certificate" and not isinstance(message.get("certificate"), str):
        raise ProtocolError("certificate needs a 'certificate' (PEM text)")
    if op == "context" and not isinstance(message.get("context"), dict):
        raise ProtocolError("context needs a 'context' object")
    if op == "recontext" and not (isinstance(message.get("context"), dict) and isinstance(message.get("seed"), str)
                                  and isinstance(message.get("time"), (int, float))):
        raise ProtocolError("recontext needs a 'context' object, a 'seed' string and the host 'time'")
    if op == "migrated" and not (isinstance(message.get("context"), dict) and isinstance(message.get("token"), str)
                                 and isinstance(message.get("time"), (int, float))):
        raise ProtocolError("migrated needs a 'context' object, the instance's current 'token' and the host 'time'")
    if op in GUEST_OPS and not isinstance(message.get("token"), str):
        raise ProtocolError(f"{op} needs the instance token")
    if op == "report" and not isinstance(message.get("step"), str):
        raise ProtocolError("report needs a 'step'")
    return message


def _lone_surrogate(value: Any) -> bool:
    """Whether ``value`` (a decoded message) holds a string, key or value, with a lone UTF-16 surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except RecursionError:   # decoded, yet too deep to walk again: refused as loads' own depth refusal is
        raise ProtocolError("not a JSON line: nested too deeply") from None
    return False


class LineBuffer:
    """Splits a byte stream into lines, refusing lines over MAX_LINE (they are dropped whole)."""

    def __init__(self) -> None:
        self._buf = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes]:
        """The whole lines ``data`` completes (blank ones left out). One split per call: cutting the lines off the
        buffer one at a time copied the rest each time, so a read of 65,536 newlines cost 2 GB of copying (0.15 s
        of the host's CPU, under the GIL, for every 64 KiB a guest sent)."""
        if b"\n" not in data:
            self._buf += data
            if len(self._buf) > MAX_LINE:
                self._buf = b""
                self._discarding = True
            return []
        *complete, rest = (self._buf + data).split(b"\n")
        self._buf = rest
        if self._discarding:             # the end of a line over MAX_LINE: dropped with it
            self._discarding = False
            complete = complete[1:]
        if len(rest) > MAX_LINE:
            self._buf = b""
            self._discarding = True
        return [line for line in complete if line.strip()]
