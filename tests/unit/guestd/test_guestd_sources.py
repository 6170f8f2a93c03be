"""guestd's context sources, each against fake /sys, /proc and /dev roots (no real CD-ROM drive or
kernel command line of the test machine is touched): the CD-ROM source reads a real ISO made by the
host-side builder."""
from __future__ import annotations

import socket

import pytest

from guestd.context import ContextError
from guestd.port import GuestPort
from guestd.sources.cdrom import CdromSource
from guestd.sources.channel import ChannelSource
from guestd.sources.cmdline import CmdlineSource, encode
from guestd.sources.directory import DirectorySource
from services.vmmanager.context import build_context, write_context_iso

from guestd_fakes import fake_roots


def ctx(name="i-7"):
    return build_context(instance=name, hostname=name, mac="52:54:00:01:02:03", address="10.0.0.7",
                         netmask="255.255.255.0", token="T" * 20)


def test_directory_source_reads_context_json(tmp_path):
    assert DirectorySource(tmp_path).read() is None
    (tmp_path / "context.json").write_bytes(ctx().to_json())
    assert DirectorySource(tmp_path).read().instance == "i-7"


def test_directory_source_refuses_a_broken_context(tmp_path):
    (tmp_path / "context.json").write_text('{"version": 1}')
    with pytest.raises(ContextError):
        DirectorySource(tmp_path).read()


def _drive(roots, name, iso_path=None):
    (roots.sys / "block" / name).mkdir(parents=True, exist_ok=True)
    dev = roots.dev / name
    if iso_path is None:
        dev.write_bytes(b"")          # a drive with an empty, unreadable medium
    else:
        dev.write_bytes(iso_path.read_bytes())


def test_cdrom_source_finds_the_labelled_disc_among_drives(tmp_path):
    roots = fake_roots(tmp_path / "root")
    other = tmp_path / "other.iso"
    import subprocess
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "readme").write_text("an unrelated disc")
    subprocess.run(["genisoimage", "-quiet", "-V", "SOMETHING", "-o", str(other), str(tmp_path / "stage")], check=True)
    _drive(roots, "sr0", other)
    _drive(roots, "sr1", write_context_iso(ctx("from-cd"), tmp_path / "ctx.iso"))
    assert CdromSource(roots).read().instance == "from-cd"


def test_cdrom_source_without_a_context_disc_has_nothing(tmp_path):
    roots = fake_roots(tmp_path / "root")
    assert CdromSource(roots).read() is None
    (roots.sys / "block" / "sr0").mkdir(parents=True)      # a drive whose device node is missing
    assert CdromSource(roots).read() is None


def test_cdrom_source_reports_a_labelled_disc_without_context(tmp_path):
    import subprocess
    roots = fake_roots(tmp_path / "root")
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "other.txt").write_text("x")
    iso = tmp_path / "empty.iso"
    subprocess.run(["genisoimage", "-quiet", "-V", "VMGRID-CTX", "-J", "-o", str(iso), str(tmp_path / "stage")], check=True)
    _drive(roots, "sr0", iso)
    with pytest.raises(ContextError, match="context.json"):
        CdromSource(roots).read()


def test_cmdline_source_decodes_the_parameter(tmp_path):
    roots = fake_roots(tmp_path / "root")
    (roots.proc / "cmdline").write_text(f"console=ttyS0 root=/dev/vda {encode(ctx('from-cmdline').to_json())} quiet\n")
    assert CmdlineSource(roots).read().instance == "from-cmdline"


def test_cmdline_source_without_the_parameter_or_with_junk(tmp_path):
    roots = fake_roots(tmp_path / "root")
    (roots.proc / "cmdline").write_text("console=ttyS0 quiet\n")
    assert CmdlineSource(roots).read() is None
    (roots.proc / "cmdline").write_text("vmgrid.context=%%%%\n")
    with pytest.raises(ContextError):
        CmdlineSource(roots).read()


def test_channel_source_takes_the_context_the_host_pushes():
    host, guest = socket.socketpair()
    port = GuestPort(fd=guest.detach()).start()
    try:
        import json
        from guestd import protocol
        host.sendall(protocol.encode({"op": "context", "id": 1, "context": json.loads(ctx("pushed").to_json())}))
        got = ChannelSource(port, timeout=5).read()
        assert got.instance == "pushed"
        host.settimeout(5)
        reply = protocol.decode(host.recv(65536).splitlines()[0], protocol.GUEST_OPS)
        assert reply["ok"] and reply["token"] == "T" * 20   # the reply already carries the new token
    finally:
        port.stop()
        host.close()


def test_channel_source_times_out_with_nothing():
    host, guest = socket.socketpair()
    port = GuestPort(fd=guest.detach()).start()
    try:
        assert ChannelSource(port, timeout=0.2).read() is None
    finally:
        port.stop()
        host.close()
