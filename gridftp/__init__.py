"""GridFTP-compatible transfer: parallel MODE E streams, restart markers, checksums, secured channels.

Library API (see docs/gridftp.md)::

    from gridftp import GridFTPServer, download, upload, third_party, checksum
"""
from .client import GridFTPClient, GridFTPURL
from .errors import (AuthenticationError, AuthorizationDenied, ChecksumMismatch, ChecksumUnavailable,
                     GridFTPError, PathError, ProtocolError, ReplyError, TransferError)
from .filespace import FileSpace, LocalFileSpace
from .server import GridFTPServer
from .tls import Credential, TLSConfig
from .transfer import TransferResult, checksum, download, third_party, upload

__all__ = [
    "GridFTPServer", "FileSpace", "LocalFileSpace", "GridFTPClient", "GridFTPURL", "Credential", "TLSConfig",
    "download", "upload", "third_party", "checksum", "TransferResult",
    "GridFTPError", "ProtocolError", "ReplyError", "AuthenticationError", "AuthorizationDenied",
    "TransferError", "ChecksumMismatch", "ChecksumUnavailable", "PathError",
]
