"""Typed errors of the GridFTP server, client and transfer library."""
from __future__ import annotations


class GridFTPError(Exception):
    """Base class of every error raised by :mod:`gridftp`."""


class ProtocolError(GridFTPError):
    """The peer broke the protocol: a malformed reply, block header or marker."""


class SizeLimitExceeded(ProtocolError):
    """Data past the bound a receiver was given: the size a client announced (ALLO, or the file's size a download
    expects), else the room the receiving server granted the store (its quota, its max_file_size). Raised by the
    data channel's receivers (gridftp.datachannel) and matched by type, not by its words, where the server answers
    a store's overrun (552 naming the bound)."""


class ReplyError(GridFTPError):
    """The server answered a command with a transient (4xx) or permanent (5xx) negative reply."""

    def __init__(self, command: str, code: int, text: str):
        shown = command.split(" ", 1)[0] if command.upper().startswith(("PASS", "ADAT")) else command
        super().__init__(f"{shown!r} refused: {code} {text}")
        self.command = command
        self.code = code
        self.text = text

    @property
    def transient(self) -> bool:
        """4xx replies: the same command may succeed later."""
        return 400 <= self.code < 500


class AuthenticationError(GridFTPError):
    """The control or a data channel could not be authenticated (TLS handshake, certificate, login)."""


class GSIOnlyServer(AuthenticationError):
    """The server refused AUTH TLS with 504 (unknown mechanism): most likely a GSI-only server (globus-gridftp-server),
    which AUTH GSSAPI reaches (``gsi=True``, or ``gsi=GSI_FALLBACK``, which tries it on the same connection). Raised
    only where no fallback was asked; the caller that knows what its user sets for GSI says so (`vmgrid transfer`
    falls back by itself; a node names [vmmanager] staging_gsi)."""

    def __init__(self, code: int, text: str):
        super().__init__(f"server refused AUTH TLS: {code} {text} (a GSI-only server, e.g. globus-gridftp-server: "
                         f"it takes AUTH GSSAPI)")
        self.code = code
        self.text = text


class AuthorizationDenied(ReplyError):
    """The server refused the path for this identity (550 ... permission denied); a ReplyError too."""


def reply_error(command: str, code: int, text: str) -> ReplyError:
    """The typed error for a negative reply: :class:`AuthorizationDenied` for a denied path."""
    if code == 550 and "permission denied" in text.lower():
        return AuthorizationDenied(command, code, text)
    return ReplyError(command, code, text)


class TransferError(GridFTPError):
    """A data transfer broke (connection cut, peer gone, timeout); a restart can resume it."""


class ReplyTimeout(TransferError, ProtocolError):
    """A reply that did not end within its deadline, however the peer trickled it: a stall, retried as a broken
    transfer is (a reply that never ends is also the peer breaking the protocol)."""


class ChecksumMismatch(GridFTPError):
    """The received bytes do not hash to the expected digest (the caller's, or the source's when it was asked);
    ``actual`` is "" when a receiving server refused them without saying their digest."""

    def __init__(self, path: str, expected: str, actual: str, algorithm: str = "sha256"):
        if actual:
            super().__init__(f"{path}: {algorithm.lower()} {actual} does not match the expected {expected}")
        else:           # a receiving server refused the file without saying what it received
            super().__init__(f"{path}: what the server received does not match the expected {algorithm.lower()} "
                             f"{expected}")
        self.algorithm = algorithm.lower()
        self.path = path
        self.expected = expected
        self.actual = actual


class ChecksumUnavailable(GridFTPError):
    """The source cannot give the checksum the verification needs (no CKSM SHA256)."""


class PathError(GridFTPError):
    """A path is malformed, escapes the served root, or names something of the wrong kind."""
