"""ListInstances in pages (docs/vmmanager.md, "Listing instances"): a page is at most ``limit`` of the caller's
instances in creation order; when more remain, an opaque cursor names where the next page starts.

A cursor is the last listed instance's (created, key), whether ended instances are listed, and a MAC over
them and the caller's DN with a secret the node draws at start: a cursor is good only on the node that gave it,
for the caller it was given to, in the same listing, until the node restarts. Anything else (altered, foreign,
another user's, too long, not base64) is refused with InvalidArgument (argument ``cursor``); the caller
starts again without one. The listing itself is always the caller's own instances, cursor or not.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from services.faults import InvalidArgument
from services.vmmanager.values import InstanceView

MAX_PAGE = 1000          # the largest page a caller may ask for (wsdl/vmmanager.xsd, maxResults)
MAX_CURSOR = 256         # characters (wsdl/vmmanager.xsd, CursorType)
_MAC = 16                # bytes of HMAC-SHA256 kept


@dataclass(frozen=True)
class Page:
    """One page of ListInstances: the instances, and the cursor of the next page (None: this was the last)."""

    views: list[InstanceView]
    cursor: str | None

    @property
    def more(self) -> bool:
        return self.cursor is not None


class Cursors:
    """Makes and checks the node's ListInstances cursors (one secret per node process)."""

    def __init__(self, secret: bytes | None = None):
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, dn: str, payload: bytes) -> bytes:
        return hmac.new(self._secret, dn.encode() + b"\0" + payload, hashlib.sha256).digest()[:_MAC]

    def make(self, dn: str, include_ended: bool, created: float, key: str) -> str:
        payload = f"{int(include_ended)}|{created!r}|{key}".encode()
        return base64.urlsafe_b64encode(payload + self._mac(dn, payload)).decode().rstrip("=")

    def position(self, dn: str, include_ended: bool, cursor: str) -> tuple[float, str]:
        """The (created, key) after which the page of ``cursor`` starts; InvalidArgument unless the node gave
        ``cursor`` to ``dn`` for a listing with the same ``include_ended``."""
        bad = InvalidArgument("the cursor is not one this node gave you for this listing (altered, another "
                              "user's, another node's, or given before the node restarted): list again without "
                              "a cursor", argument="cursor")
        if not cursor or len(cursor) > MAX_CURSOR:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise bad from None
        payload, mac = raw[:-_MAC], raw[-_MAC:]
        if len(raw) <= _MAC or not hmac.compare_digest(mac, self._mac(dn, payload)):
            raise bad
        ended, created, key = payload.decode().split("|", 2)   # the node's own making: well formed
        if ended != str(int(include_ended)):
            raise InvalidArgument("the cursor belongs to a listing with includeEnded "
                                  f"{'true' if ended == '1' else 'false'}: ask with the same", argument="cursor")
        return float(created), key


def check_limit(limit: int | None, default: int) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"maxResults must be 1 to {MAX_PAGE}, not {limit}", argument="maxResults")
    return limit
