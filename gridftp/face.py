"""A service's GridFTP face: a GridFTP server over the service's own file space, answering under a public
host name, with the service's own authorization of every path (the repository's image store, a job
service's working directories)."""
from __future__ import annotations

import logging
from typing import Callable

from gridftp.filespace import FileSpace
from gridftp.server import SESSION_LIMITS, GridFTPServer

Authorize = Callable[[str | None, str, str], bool]


class GridFTPFace:
    """``authorize(dn, op, vpath)`` decides every access; ``upload_area`` is the path uploads go under.
    ``server_options``: the site's bounds on sessions and its guests' DN patterns, as :class:`GridFTPServer` takes
    them (``max_sessions``, ``max_sessions_per_identity``, ``max_sessions_per_address``, ``host_sessions``,
    ``transfer_idle_timeout``, ``passive_per_identity``, ``passive_wait``, ``guests``: a site whose guest_ou is not ``vmgrid-guests`` passes
    ``guests=["/O=Grid/OU=<guest_ou>/*"]``, or its guests' hosts' certificates take the hosts' share of sessions;
    ``refuse_guests``: a face where guests have no rights refuses their logins)."""

    def __init__(self, filespace: FileSpace, host: str, port: int, credential, trust, *, authorize: Authorize,
                 upload_area: str, public_host: str = "", what: str = "files", log: logging.Logger | None = None,
                 **server_options):
        unknown = set(server_options) - {*SESSION_LIMITS, "guests", "refuse_guests"}
        if unknown:
            raise TypeError(f"GridFTPFace: unknown server options {sorted(unknown)}")
        self.server = GridFTPServer(filespace, host, port, credential=credential, trust=trust, authorize=authorize,
                                    upload_area=upload_area, **server_options)
        self.public_host = public_host or ("localhost" if host in ("127.0.0.1", "::1", "0.0.0.0") else host)
        self.what = what
        self.log = log or logging.getLogger("vmgrid.gridftp")

    def start(self) -> None:
        self.server.start()
        self.log.info("GridFTP face for the %s at %s", self.what, self.base_url)

    def stop(self) -> None:
        self.server.stop()

    def claim(self, vpath: str) -> bool:
        """Hold ``vpath`` as a storing session does (False: a session is storing it); :meth:`release` it."""
        return self.server.claim(vpath)

    def release(self, vpath: str) -> None:
        self.server.release(vpath)

    @property
    def base_url(self) -> str:
        return f"gsiftp://{self.public_host}:{self.server.port}"
