"""Files in and out of a job's directory over GridFTP, and the job service's own GridFTP face.

Stage-in sources are gsiftp:// or ftp:// URLs (gsiftp:// fetched as the job's submitter, with the proxy they
delegated to this service at submit, never with the service's own credential, over AUTH TLS or, at a GSI-only
server such as globus-gridftp-server (AUTH TLS refused with 504), AUTH GSSAPI, as globus-url-copy would; verified by
sha256: the one the client gave, else the source's own CKSM) or ``staged:NAME``, a file the job's
owner put into their staging area on this service's face. Outputs are hashed once they are final
and sent to their destination URLs verified the same way; the job's submitter and the VO's admins (only they) can
also read them from the face at /jobs/<key>/<name>.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import Callable

from gridftp import download, upload
from gridftp.client import GSI_FALLBACK
from gridftp.transfer import TooLarge
from gridftp.face import GridFTPFace
from gridftp.checksum import hash_file
from gridftp.errors import GridFTPError, PathError
from gridftp.filespace import PART_SUFFIX, SIDECAR_SUFFIX, FileSpace, LocalFileSpace
from security.delegation import DelegationError
from security.delegation import accept as accept_delegation
from services.jobs.files import pin_beneath

log = logging.getLogger("vmgrid.JobService.gridftp")


class StagingError(Exception):
    """A file could not be staged; the message says which and why."""


# a file `vmgrid job submit --stage-in` uploads for its one job: staged as ONCE + 16 hex digits + "." + its name, it
# leaves the staging area when that job has copied it (jobs.xsd: a staged name is at most MAX_STAGED characters)
ONCE = "once."
MAX_STAGED = 128


def staging_area(dn: str) -> str:
    """A user's staging directory name on the face: a stable name derived from the DN."""
    return hashlib.sha256(dn.encode()).hexdigest()[:24]


def inside(root: Path, relative: str) -> Path:
    """``relative`` under ``root``, refusing anything (``..``, a symlink) that leads out of it."""
    try:
        return LocalFileSpace(root).real_path("/" + relative)
    except PathError as exc:
        raise StagingError(f"{relative}: {exc}") from None


def as_submitter(url: str | None) -> bool:
    """Whether moving ``url`` needs the submitter's delegated proxy: a gsiftp:// URL (ftp:// is anonymous,
    staged:NAME the service's own face)."""
    return bool(url) and url.split(":", 1)[0].lower() == "gsiftp"


def over_quota(source: str, room: int) -> StagingError:
    return StagingError(f"{source}: larger than the {room} bytes left of this job's stage-in quota "
                        f"([jobs] staging_quota)")


class Stager:
    """Moves one job's files. ``credential``/``trust`` are the service's (the guest container's) own: the key that
    delegated proxies are issued for (:meth:`delegated`), never the identity a gsiftp:// file is moved with (a host
    credential is a node to the site's policy: a confused deputy). That is the submitter's delegated proxy, given to
    :meth:`fetch` and :meth:`send`."""

    def __init__(self, credential, trust, staging_dir: Path, parallel: int = 2):
        self.credential = credential
        self.trust = trust
        self.staging_dir = staging_dir
        self.parallel = parallel

    def delegated(self, proxy_pem: bytes, dn: str):
        """The credential ``dn`` delegated to this service (their proxy with this service's key): DelegationError
        unless it validates, is issued for this service's key and is ``dn``'s."""
        if self.credential is None:
            raise DelegationError("this job service has no credential to accept a delegated proxy with")
        return accept_delegation(proxy_pem, self.credential, self.trust, expected_dn=dn)

    def fetch(self, source: str, dest: Path, owner: str, sha256: str | None,
              progress: Callable[[int], None], room: int | None = None, *, credential=None,
              release: bool = False) -> str:
        """Put ``source`` at ``dest``; returns its verified sha256. ``room``: the most bytes it may take (the rest
        of the job's stage-in quota); a larger file is refused and nothing of it is left. ``release`` (a staged:
        file uploaded for this job alone, :data:`ONCE`): the staging area's file is removed once copied and
        verified, unless it was uploaded again meanwhile (another inode), so that the area, bounded by
        ``staging_quota``, does not fill with every file `vmgrid job submit --stage-in` ever staged (trial13)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied = None
        if source.startswith("staged:"):
            area = self.staging_dir / staging_area(owner)
            if not area.is_dir():         # nothing uploaded yet: the area is made by the first upload
                raise StagingError(f"{source}: no such file in your staging area (upload it first)")
            src = inside(area, source[len("staged:"):])
            if not src.is_file():
                raise StagingError(f"{source}: no such file in your staging area (upload it first)")
            copied = src.stat()
            if room is not None and copied.st_size > room:
                raise over_quota(source, room)
            shutil.copyfile(src, dest)
            actual = hash_file(dest)
            progress(dest.stat().st_size)
        else:
            if as_submitter(source) and credential is None:
                raise StagingError(f"{source}: no delegated proxy of {owner} to fetch it with")
            try:
                result = download(source, dest, self.parallel, credential=credential, trust=self.trust,
                                  gsi=GSI_FALLBACK, sha256=sha256, progress=lambda done, total: progress(done),
                                  max_size=room)
            except TooLarge:
                raise over_quota(source, room) from None
            except (GridFTPError, OSError) as exc:
                for p in (dest.with_name(dest.name + PART_SUFFIX), dest.with_name(dest.name + SIDECAR_SUFFIX)):
                    p.unlink(missing_ok=True)       # nothing half-fetched stays to count against the disk
                raise StagingError(f"{source}: {exc}") from None
            actual = result.sha256
        if sha256 and actual != sha256:
            dest.unlink(missing_ok=True)
            raise StagingError(f"{source}: sha256 {actual} is not the expected {sha256}")
        if release and copied is not None:
            try:
                now = src.stat()
                if (now.st_dev, now.st_ino, now.st_mtime_ns) == (copied.st_dev, copied.st_ino, copied.st_mtime_ns):
                    src.unlink()
            except FileNotFoundError:
                pass
        return actual

    def send(self, src: Path, destination: str, sha256: str, progress: Callable[[int], None], *,
             credential=None) -> None:
        """Send ``src`` to ``destination``; a gsiftp:// one with ``credential``, the submitter's delegated proxy."""
        if as_submitter(destination) and credential is None:
            raise StagingError(f"{destination}: no delegated proxy of the submitter's to send it with")
        try:
            upload(src, destination, self.parallel, credential=credential, trust=self.trust, gsi=GSI_FALLBACK,
                   sha256=sha256,
                   progress=lambda done, total: progress(done), state_dir=self.staging_dir.parent / "restart")
        except (GridFTPError, OSError) as exc:
            raise StagingError(f"{destination}: {exc}") from None


class JobFileSpace(FileSpace):
    """/jobs/<key>/... are the jobs' directories (read-only), /staging/<area>/<name> the owners' staging areas
    (flat: every byte of an area counts against its quota, ``staging_quota`` bytes; None: no quota)."""

    # a 552 here: the staging area holds a job's files to be (trial13 U3: "delete or register uploads first" was the
    # repository's advice, and nothing is registered at a job service)
    quota_advice = "submit the job once the files staged for your other jobs here are taken in (at their start)"
    # (trial14 U3: "or give the job the file as a gsiftp:// URL" sent the scientist into the same refusal: a job's
    # gsiftp:// stage-ins are bounded by the same quota)
    quota_too_small = ("a job's files, its gsiftp:// stage-ins too, are bounded by this job service's [jobs] "
                       "staging_quota: ask its operator")

    def __init__(self, jobs_dir: Path, staging_dir: Path, staging_quota: int | None = None):
        self.jobs_dir = jobs_dir
        self.staging_dir = staging_dir
        self.staging_quota = staging_quota

    def quota(self, vpath: str) -> tuple[Path, int] | None:
        """A store into a staging area counts against that area's quota (the GridFTP server's upload quota: 552)."""
        parts = [p for p in vpath.split("/") if p]
        if self.staging_quota is not None and parts[:1] == ["staging"] and len(parts) == 3:
            return self.staging_dir / parts[1], self.staging_quota
        return None

    def real_path(self, vpath: str) -> Path | "PinnedPath":
        """A job's file is handed to the server as a :class:`PinnedPath`: the file the walk found, held open, which
        no link the job swaps in afterwards can turn into another (the server names it by path from then on). A
        staging area is the service's alone (no job reaches it): a plain path."""
        parts = [p for p in vpath.split("/") if p]
        if len(parts) >= 2 and parts[0] == "jobs":
            try:
                return PinnedPath(pin_beneath(self.jobs_dir, parts[1:]))
            except FileNotFoundError:
                raise PathError(f"{vpath}: no such file or directory.") from None
            except OSError as exc:        # ELOOP, ENOTDIR: a symbolic link on the way, which is never followed
                raise PathError(f"{vpath}: not served (a symbolic link, or not a directory, on its way: "
                                f"{exc.strerror}).") from None
        if 2 <= len(parts) <= 3 and parts[0] == "staging" and len(parts[1]) == 24:
            area = self.staging_dir / parts[1]
            area.mkdir(parents=True, exist_ok=True)
            return LocalFileSpace(area).real_path("/" + "/".join(parts[2:]))
        raise PathError(f"{vpath}: no such path here (/jobs/<key>/<file>, /staging/<area>/<file>: no directories in a "
                        f"staging area)")


class PinnedPath(os.PathLike):
    """A file or directory of a job's directory as the GridFTP server uses it: held open (O_PATH) from the walk
    that found it, through no symbolic link, and named ``/proc/self/fd/N``, which the kernel resolves to that very
    open file, never by its names again. So a job (under its own uid, writing in its own directory) that swaps a
    directory or a file for a symbolic link between the server's look and its open makes the service (root) read
    nothing but the file the look found: not another user's job, not the host key. The fd is closed when the last
    reference to this object goes (nothing can name ``/proc/self/fd/N`` meanwhile: N stays this file's)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._path = f"/proc/self/fd/{fd}"
        weakref.finalize(self, os.close, fd)

    def __fspath__(self) -> str:
        return self._path

    def __str__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"PinnedPath({self._path})"

    def __truediv__(self, name: str) -> "PinnedPath":
        """An entry of this directory (a listing's), pinned the same way; OSError for a symbolic link or one gone
        (the listing leaves it out)."""
        return PinnedPath(pin_beneath(self.fd, [name]))


class JobTransfers(GridFTPFace):
    """The job service's GridFTP face. ``may_read(dn, key)`` says whether ``dn`` may read (fetch, list) job
    ``key``'s files: its submitter and the VO's admins (the job service's rule job-submitter-or-vo-admin, as for its
    output tails, Cancel and Destroy; False for no such job); nobody writes there. ``may_use(dn)`` says whether a DN
    may use the service at all (the instance's owner, admins). A guest
    container's certificate (``guests``) is refused at login, as the repository's and a node's export refuse it: no
    submitter is a guest (the owner is the person a node deployed the instance for, which the site's policy refuses
    a guest; the admins are people), and a job's gsiftp:// files move with its submitter's proxy, never with a
    service's own (guest) key, so no guest has anything to log in to here; logged in, it only took a user's session."""

    def __init__(self, jobs_dir: Path, staging_dir: Path, host: str, port: int, credential, trust, *,
                 may_read: Callable[[str, str], bool], may_use: Callable[[str], bool], public_host: str = "",
                 staging_quota: int | None = None, **server_options):
        self.may_read = may_read
        self.may_use = may_use
        super().__init__(JobFileSpace(jobs_dir, staging_dir, staging_quota), host, port, credential, trust, authorize=self.authorize,
                         upload_area="/staging", public_host=public_host, what="job directories", log=log,
                         **{**server_options, "refuse_guests": True})

    def authorize(self, dn: str | None, op: str, vpath: str) -> bool:
        if dn is None or not self.may_use(dn):
            return False
        parts = [p for p in vpath.split("/") if p]
        if parts[:1] == ["staging"]:
            return len(parts) >= 2 and parts[1] == staging_area(dn)
        if parts[:1] == ["jobs"] and len(parts) >= 2:
            return op in ("read", "list") and self.may_read(dn, parts[1])
        return False
