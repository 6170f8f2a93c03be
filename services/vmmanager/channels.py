"""Where each guest's channel socket lives on the host.

The channel (the virtio-serial port guestd talks on) is a Unix socket QEMU binds, and a Unix socket path holds
at most 107 bytes. It stays in the instance's directory, ``<state_dir>/vmmanager/instances/<key>/guestd.sock``,
when that fits. A state directory too deep for it (a checkout under a long home directory) gets a short private
directory of the node's own instead: ``/run/vmgrid/<12 hex>/<key>.sock`` when /run is writable, else
``<tempdir>/vmgrid-<uid>/<12 hex>/<key>.sock``, where the 12 hex are those of SHA-256 of the absolute instances
directory. The choice is a function of the instances directory and the key alone, so the same spec is rebuilt
after a restart (crash recovery reconnects to the channel), on a migration target and for a warm restore.

The short directories are made 0700 and owned by the node's user; one that exists as a symlink, with another
owner, or open to group or others is refused (a local user must not pre-create it and reach a guest's channel).
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from services.vmmanager.vmm.spec import MAX_UNIX_PATH

SOCKET = "guestd.sock"
KEY_BYTES = 64          # the longest key a channel is made for (instance keys are inst-<32 hex>, templates warm-<12>)


class ChannelDirError(ValueError):
    """The short channel directory cannot be made or is not safe to use."""


def fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= MAX_UNIX_PATH


def short_base() -> Path:
    """The directory the short channel directories of this user's nodes go in."""
    if os.access("/run", os.W_OK | os.X_OK):
        return Path("/run/vmgrid")
    return Path(tempfile.gettempdir()) / f"vmgrid-{os.getuid()}"


class ChannelPaths:
    """The channel socket path of each instance of one node (``instances_dir``: its instances' directories)."""

    def __init__(self, instances_dir: Path, base: Path | None = None):
        self.instances_dir = Path(os.path.abspath(instances_dir))
        digest = hashlib.sha256(os.fsencode(str(self.instances_dir))).hexdigest()[:12]
        self.short_dir = (base if base is not None else short_base()) / digest

    def long_form(self, key: str) -> Path:
        return self.instances_dir / key / SOCKET

    def path(self, key: str) -> Path:
        """The socket path of instance ``key``; its short directory is made (and checked) when it is used."""
        home = self.long_form(key)
        if fits(home):
            return home
        sock = self.short_dir / f"{key}.sock"
        if not fits(sock):
            raise ChannelDirError(f"the channel socket {sock} is longer than {MAX_UNIX_PATH} bytes")
        self.ensure()
        return sock

    def check(self) -> None:
        """Refuse, at start, a node whose channels fit neither form (checked with the longest key)."""
        key = "k" * KEY_BYTES
        if not fits(self.long_form(key)) and not fits(self.short_dir / f"{key}.sock"):
            raise ChannelDirError(
                f"the guests' channel sockets fit neither in {self.instances_dir} nor in {self.short_dir} (a Unix "
                f"socket path holds {MAX_UNIX_PATH} bytes): give [container] state_dir or TMPDIR a shorter path")

    def ensure(self) -> Path:
        """Make the short directory (and its parent) 0700, or check the ones there are this user's, 0700, not
        symlinks."""
        for d in (self.short_dir.parent, self.short_dir):
            try:
                os.mkdir(d, 0o700)
                os.chmod(d, 0o700)      # whatever the umask
            except FileExistsError:
                pass
            except OSError as exc:
                raise ChannelDirError(f"cannot make the guests' channel directory {d}: {exc.strerror}") from None
            _check_private(d)
        return self.short_dir

    def remove(self, key: str) -> None:
        """Remove instance ``key``'s socket in the short directory (its instance directory takes the long form
        with it). QEMU unlinks the socket it bound when it closes cleanly, not when it is killed."""
        if not fits(self.long_form(key)):
            try:
                (self.short_dir / f"{key}.sock").unlink()
            except OSError:     # not there (QEMU removed it), or the directory is gone
                pass

    def let_go(self) -> bool:
        """At the node's stop: remove its short directory when nothing is left in it (no guest runs on); whether
        it was removed. The next start makes it again. Without this every node ever run under a deep state
        directory left an empty directory in /run/vmgrid."""
        try:
            _check_private(self.short_dir)
            os.rmdir(self.short_dir)
            return True
        except (OSError, ChannelDirError):      # not there, not ours, or a guest's socket still in it
            return False

    def sweep(self, live: set[str]) -> int:
        """Remove the short directory's sockets of instances not in ``live``; the number removed."""
        removed = 0
        try:
            _check_private(self.short_dir)
            names = os.listdir(self.short_dir)
        except (OSError, ChannelDirError):
            return 0
        for name in names:
            if name.endswith(".sock") and name[:-len(".sock")] not in live:
                try:
                    os.unlink(self.short_dir / name)
                    removed += 1
                except OSError:
                    pass
        return removed


def _check_private(d: Path) -> None:
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ChannelDirError(f"the guests' channel directory {d} is not a directory (a symlink or a file): "
                              f"refusing it; remove it")
    if st.st_uid != os.getuid():
        raise ChannelDirError(f"the guests' channel directory {d} is owned by uid {st.st_uid}, not this node's "
                              f"user ({os.getuid()}): refusing it; remove it")
    if st.st_mode & 0o077:
        raise ChannelDirError(f"the guests' channel directory {d} has mode {stat.S_IMODE(st.st_mode):04o}, open to "
                              f"other users: refusing it (it must be 0700); remove it")


# libvirt's QEMU monitor socket of each guest: <root>/lib/qemu/domain-<id>-<name, 20 characters at most>/monitor.sock
MONITOR_TAIL = len("/lib/qemu/domain-99999-") + 20 + len("/monitor.sock")


def embed_root(configured: str, default: Path, base: Path | None = None) -> Path:
    """The qemu:///embed root of a node: ``[vmmanager] vmm_root`` when set, else ``default`` (under the state
    directory). libvirt puts each guest's QEMU monitor socket in the root (:data:`MONITOR_TAIL` more bytes), and a
    Unix socket path holds 107: a configured root too long for it is refused here, at start, naming the setting;
    a default one too long (a checkout under a deep home directory) is replaced by a short private directory of the
    node's own, as the channel sockets' (``/run/vmgrid/<12 hex>``, 0700; the same one at every start)."""
    root = Path(os.path.abspath(configured or default))
    if len(os.fsencode(str(root))) + MONITOR_TAIL <= MAX_UNIX_PATH:
        return root
    if configured:
        raise ValueError(f"[vmmanager] vmm_root {root} is too long for libvirt's QEMU monitor sockets (its "
                         f"{len(os.fsencode(str(root)))} bytes + {MONITOR_TAIL} of <root>{'/lib/qemu/domain-N-NAME'}"
                         f"/monitor.sock; a Unix socket path holds {MAX_UNIX_PATH}): give it a shorter path, e.g. "
                         f"/var/lib/vmgrid/qemu, or leave it unset")
    short = ChannelPaths(root, base=base)
    if len(os.fsencode(str(short.short_dir))) + MONITOR_TAIL > MAX_UNIX_PATH:
        raise ValueError(f"the node's QEMU root fits neither in {root} nor in {short.short_dir} (libvirt's monitor "
                         f"sockets): set [vmmanager] vmm_root to a short path, e.g. /var/lib/vmgrid/qemu")
    try:
        return short.ensure()
    except ChannelDirError as exc:
        raise ValueError(str(exc).replace("guests' channel directory", "node's QEMU root")) from None
