"""A job's directory as the job service (root) touches it once the job's own uid may write there: every path
is walked without following a symbolic link, so a job that puts a link in a file's place (to the service's host
key, to another job's files) makes the service read or write only its own files."""
from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("vmgrid.JobService")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 256       # directory levels a job's directory may have under it (and the fds a walk holds, about)


def open_beneath(root: Path, relative: str, flags: int = os.O_RDONLY | os.O_NONBLOCK, mode: int = 0o600) -> int:
    """An fd of ``relative`` under ``root``, no component of it a symbolic link (ELOOP, ENOTDIR otherwise)."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EINVAL, f"{relative!r} is not a path inside the job's directory")
    fd = os.open(root, DIR_FLAGS)
    try:
        for part in parts[:-1]:
            inner = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def pin_beneath(root: Path | int, parts: list[str]) -> int:
    """An O_PATH fd of ``root`` (a path, or a directory's fd)/``parts``, each component opened from its parent's fd
    without following a symbolic link (the directories with O_DIRECTORY): the very file or directory found by this
    walk, whatever a job puts in its place afterwards. OSError otherwise: ENOENT, ELOOP or ENOTDIR (a link on the
    way), EINVAL (``..``); a symbolic link as the last component is refused too (ELOOP), never handed out."""
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"{'/'.join(parts)!r} is not a path inside the job's directory")
    if isinstance(root, int):
        fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    else:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            inner = os.open(part, PATH_FLAGS | (os.O_DIRECTORY if i < len(parts) - 1 else 0), dir_fd=fd)
            os.close(fd)
            fd = inner
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, "a symbolic link")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_output(root: Path, relative: str, uid: int | None) -> int:
    """An fd of the plain file ``relative`` the job left under ``root`` (owned by the job's ``uid``, when it has
    one of its own: a hard link to someone else's file is not the job's output); OSError otherwise (a FIFO, a
    device, a symbolic link, a file of another owner)."""
    fd = open_beneath(root, relative)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
        os.close(fd)
        raise OSError(errno.EPERM if stat.S_ISREG(st.st_mode) else errno.EINVAL,
                      "not a plain file of the job's own" if stat.S_ISREG(st.st_mode) else "not a plain file")
    return fd


def chown_tree(root: Path, uid: int) -> None:
    """Give ``root`` and everything under it (written by the service alone so far) to ``uid`` (its group too),
    links not followed; ``root`` itself 0700."""
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(top, name), uid, uid)
    os.chown(root, uid, uid)
    os.chmod(root, 0o700)


def lock(root: Path) -> None:
    """The job has ended: its directory and every directory under it become the service's (root, 0700), so nothing
    running as the job's uid or another job's (another job of the same submitter) reaches into it while its
    outputs are hashed and served, not even through a directory fd it opened earlier (the kernel checks a lookup
    through an fd against that directory's own mode: attack14 H1). Files keep their owner (the job's outputs are
    its uid's) and mode. What could not be locked is logged: it is counted again at the sweeps (tree.Counts)."""
    try:                         # root is jobs/<key>, made by the service in a directory no job may write
        fd = os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        seal_walk(fd)
    except OSError as exc:
        log.warning("could not lock all of %s (%s): a directory under it may stay writable through an fd a job "
                    "holds; what it holds is counted again at the sweeps", root, exc.strerror or exc)
    finally:
        os.close(fd)


def _seal(fd: int) -> None:
    os.fchown(fd, 0, 0)
    os.fchmod(fd, 0o700)


def _ids(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _one_pass(fd: int, remove: bool) -> list[str]:
    """The sub-directories of the (sealed) directory ``fd``, listed once; with ``remove``, everything else in it is
    unlinked on the way (a link as a link)."""
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            elif remove:
                _unlink(entry.name, fd)
    return subdirs


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class _Level:
    __slots__ = ("fd", "name", "ids", "subdirs")

    def __init__(self, fd: int, name: str, ids: tuple[int, int]):
        self.fd, self.name, self.ids, self.subdirs = fd, name, ids, []


def seal_walk(top: int, remove: bool = False, max_depth: int = MAX_DEPTH) -> None:
    """Make the directory ``top`` (an fd, the caller's) and every directory under it root's, 0700, each before it
    is listed: from then on no job's uid changes it (a lookup, a create, a rename or an unlink in it is EACCES,
    through an fd held since too), so its one listing is whole. With ``remove``, empty it too, bottom up (``top``
    itself stays). Each directory is opened from its parent's fd with O_NOFOLLOW (a link is never followed; with
    ``remove`` it is unlinked as a link), listed once (its sub-directories' names kept, nothing listed again), and
    removed from its parent's fd once its entry there is still it (device and inode). Without recursion; the fds of
    the first ``max_depth`` levels are kept, deeper ones let go, the way back up from there is ``..`` checked
    against the directory come down from. OSError when something stops the walk (ESTALE: a directory was moved
    meanwhile, by someone not a job)."""
    _seal(top)
    levels = [_Level(top, "", _ids(top))]
    try:
        levels[0].subdirs = _one_pass(top, remove)
        while True:
            level = levels[-1]
            if level.subdirs:
                name = level.subdirs.pop()
                try:
                    inner = os.open(name, DIR_FLAGS, dir_fd=level.fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):       # not a directory (any more): a file, a link
                        if remove:
                            _unlink(name, level.fd)
                    elif exc.errno != errno.ENOENT:
                        raise
                    continue
                child = _Level(inner, name, _ids(inner))
                levels.append(child)
                if len(levels) > max(max_depth, 1) + 1:       # deeper than the fds go: the parent's way back is ".."
                    os.close(level.fd)
                    level.fd = -1
                _seal(inner)
                child.subdirs = _one_pass(inner, remove)
                continue
            if len(levels) == 1:
                return
            parent = levels[-2]
            if parent.fd < 0:
                parent.fd = os.open("..", DIR_FLAGS, dir_fd=level.fd)
                if _ids(parent.fd) != parent.ids:
                    raise OSError(errno.ESTALE, "a directory was moved while it was walked")
            os.close(level.fd)
            level.fd = -1
            levels.pop()
            if remove:
                try:
                    st = os.stat(level.name, dir_fd=parent.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) != level.ids:
                    raise OSError(errno.ESTALE, "a directory was moved while it was removed")
                os.rmdir(level.name, dir_fd=parent.fd)
    finally:
        for level in levels[1:]:
            if level.fd >= 0:
                os.close(level.fd)
