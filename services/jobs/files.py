"""A job's directory as the job service (root) touches it once the job's own uid may write there: every path
is walked without following a symbolic link, so a job that puts a link in a file's place (to the service's host
key, to another job's files) makes the service read or write only its own files."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    """The job has ended: its directory becomes the service's (root, 0700), so nothing running as the job's uid
    (another job of the same submitter) reaches into it while its outputs are hashed and served."""
    try:                         # root is jobs/<key>, made by the service in a directory no job may write
        os.chown(root, 0, 0)
        os.chmod(root, 0o700)
    except FileNotFoundError:
        pass
