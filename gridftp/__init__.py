"""GridFTP-compatible transfer: parallel MODE E streams, restart markers, checksums, secured channels.

Library API (see docs/gridftp.md)::

    from gridftp import GridFTPServer, download, upload, third_party, checksum

The names load on first use (PEP 562): ``vmgrid transfer ftp://...`` then starts without the server,
TLS and GSI modules (cryptography, pyOpenSSL), which a plain download never touches.
"""
from __future__ import annotations

import importlib

from .errors import (AuthenticationError, AuthorizationDenied, ChecksumMismatch, ChecksumUnavailable,
                     GridFTPError, GSIOnlyServer, PathError, ProtocolError, ReplyError, ReplyTimeout,
                     SizeLimitExceeded, TransferError)

# The submodule gridftp.checksum loads now, so that the package's name `checksum` is then free for the
# function transfer.checksum (served by __getattr__ below) and no later import of the submodule rebinds it.
from . import checksum as _checksum_module  # noqa: F401,E402

del checksum  # noqa: F821  (bound by the import system to the submodule just loaded)

_LAZY = {
    "GridFTPClient": ".client", "GridFTPURL": ".client",
    "FileSpace": ".filespace", "LocalFileSpace": ".filespace",
    "GridFTPServer": ".server",
    "Credential": ".tls", "TLSConfig": ".tls",
    "TransferResult": ".transfer", "checksum": ".transfer", "download": ".transfer",
    "third_party": ".transfer", "upload": ".transfer",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gridftp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GridFTPServer", "FileSpace", "LocalFileSpace", "GridFTPClient", "GridFTPURL", "Credential", "TLSConfig",
    "download", "upload", "third_party", "checksum", "TransferResult",
    "GridFTPError", "ProtocolError", "ReplyError", "AuthenticationError", "AuthorizationDenied", "GSIOnlyServer",
    "TransferError", "ReplyTimeout", "ChecksumMismatch", "ChecksumUnavailable", "PathError", "SizeLimitExceeded",
]
