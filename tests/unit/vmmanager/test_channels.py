"""Where a guest's channel socket goes (services.vmmanager.channels): in its instance directory when that path
fits a Unix socket (107 bytes), else in a short private directory of the node's, made 0700; a pre-created one
that another user could have made or can reach is refused. Real directories and sockets, no mocks."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from services.vmmanager.channels import ChannelDirError, ChannelPaths
from services.vmmanager.vmm.spec import MAX_UNIX_PATH

KEY = "inst-" + "0123456789abcdef" * 2


@pytest.fixture
def tmp_path():
    """A short temporary directory (pytest's own is already too deep for the short form's tests)."""
    d = Path(tempfile.mkdtemp(prefix="vgc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def deep(tmp_path: Path) -> Path:
    return tmp_path / ("d" * (120 - len(str(tmp_path)))) / "instances"


def test_a_short_instances_directory_keeps_the_socket_in_the_instance_directory(tmp_path):
    paths = ChannelPaths(tmp_path / "instances", base=tmp_path / "short")
    assert paths.path(KEY) == tmp_path / "instances" / KEY / "guestd.sock"
    assert not (tmp_path / "short").exists()


def test_a_deep_state_directory_gets_a_short_private_directory_the_same_on_every_rebuild(tmp_path):
    base = tmp_path / "short"
    paths = ChannelPaths(deep(tmp_path), base=base)
    sock = paths.path(KEY)
    assert len(str(paths.long_form(KEY)).encode()) > MAX_UNIX_PATH
    assert sock.parent.parent == base and len(sock.parent.name) == 12 and sock.name == KEY + ".sock"
    assert len(str(sock).encode()) <= MAX_UNIX_PATH
    for d in (base, sock.parent):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    # a restart, a warm restore or crash recovery builds the spec again: the same path
    assert ChannelPaths(deep(tmp_path), base=base).path(KEY) == sock
    # a real socket binds there (the long form could not)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock))
    finally:
        s.close()
    # another node (another state directory) has a directory of its own
    assert ChannelPaths(deep(tmp_path / "other"), base=base).path(KEY).parent != sock.parent


@pytest.mark.parametrize("which", ["base", "node"])
def test_a_pre_created_short_directory_open_to_others_is_refused(tmp_path, which):
    base = tmp_path / "short"
    paths = ChannelPaths(deep(tmp_path), base=base)
    base.mkdir(0o700)
    target = base if which == "base" else paths.short_dir
    target.mkdir(0o700, exist_ok=True)
    os.chmod(target, 0o755)
    with pytest.raises(ChannelDirError, match=r"has mode 0755, open to other users"):
        paths.path(KEY)


@pytest.mark.parametrize("which", ["base", "node"])
def test_a_short_directory_that_is_a_symlink_is_refused(tmp_path, which):
    base = tmp_path / "short"
    paths = ChannelPaths(deep(tmp_path), base=base)
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(0o700)
    if which == "node":
        base.mkdir(0o700)
    (base if which == "base" else paths.short_dir).symlink_to(elsewhere)
    with pytest.raises(ChannelDirError, match=r"is not a directory \(a symlink or a file\)"):
        paths.path(KEY)
    assert os.listdir(elsewhere) == []


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_short_directory_owned_by_another_user_is_refused(tmp_path):
    base = tmp_path / "short"
    paths = ChannelPaths(deep(tmp_path), base=base)
    base.mkdir(0o700)
    paths.short_dir.mkdir(0o700)
    os.chown(paths.short_dir, 65534, 65534)
    with pytest.raises(ChannelDirError, match=r"is owned by uid 65534, not this node's user"):
        paths.path(KEY)


def test_sockets_of_ended_instances_are_removed(tmp_path):
    paths = ChannelPaths(deep(tmp_path), base=tmp_path / "short")
    other = "inst-" + "f" * 32
    for key in (KEY, other, "inst-" + "e" * 32):
        paths.path(key).write_bytes(b"")    # a socket QEMU left behind (killed)
    paths.remove(KEY)
    assert not paths.path(KEY).exists()
    assert paths.sweep({other}) == 1
    assert sorted(os.listdir(paths.short_dir)) == [other + ".sock"]


def test_a_stopping_node_removes_its_short_directory_only_when_nothing_is_left_in_it(tmp_path):
    """A node's stop lets go of its short directory (each node run under a deep state directory left an empty one in
    /run/vmgrid); a guest still running keeps its socket there, and then the directory stays."""
    base = tmp_path / "short"
    paths = ChannelPaths(deep(tmp_path), base=base)
    paths.path(KEY).write_bytes(b"")                    # a running guest's socket
    assert paths.let_go() is False and paths.path(KEY).exists()
    paths.remove(KEY)
    assert paths.let_go() is True and not paths.short_dir.exists() and base.is_dir()
    assert paths.let_go() is False                      # already gone: nothing to do
    assert paths.path(KEY).parent == paths.short_dir and paths.short_dir.is_dir()   # the next start makes it again


def test_a_node_whose_sockets_fit_neither_form_is_refused(tmp_path):
    paths = ChannelPaths(deep(tmp_path), base=tmp_path / ("b" * 100))
    with pytest.raises(ChannelDirError, match=r"fit neither in .* nor in .*shorter path"):
        paths.check()
    ChannelPaths(deep(tmp_path), base=tmp_path / "short").check()


def test_a_default_qemu_root_too_deep_for_libvirts_monitor_sockets_gets_a_short_private_directory(tmp_path):
    """libvirt puts each guest's QEMU monitor socket at <root>/lib/qemu/domain-N-NAME/monitor.sock: a default root
    (under the state directory) too deep for it is replaced by a short private one, the same at every start; a
    configured one is refused, naming the setting; a short one is kept."""
    from services.vmmanager.channels import MONITOR_TAIL, embed_root

    base = tmp_path / "short"
    assert embed_root("", tmp_path / "qemu", base=base) == tmp_path / "qemu"
    assert embed_root(str(tmp_path / "q"), tmp_path / "qemu", base=base) == tmp_path / "q"
    long_default = tmp_path / ("d" * (MAX_UNIX_PATH - MONITOR_TAIL - len(str(tmp_path)))) / "qemu"
    root = embed_root("", long_default, base=base)
    assert root.parent == base and len(str(root)) + MONITOR_TAIL <= MAX_UNIX_PATH
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    assert embed_root("", long_default, base=base) == root
    with pytest.raises(ValueError, match=r"\[vmmanager\] vmm_root .* too long for libvirt's QEMU monitor sockets"):
        embed_root(str(long_default), tmp_path / "qemu", base=base)
    os.chmod(root, 0o755)
    with pytest.raises(ValueError, match="QEMU root .* mode 0755"):
        embed_root("", long_default, base=base)
