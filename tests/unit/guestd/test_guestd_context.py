"""The instance context format: built on the host, validated on both sides, carried on an ISO 9660
CD-ROM (pycdlib writes it in the node, guestd reads it without mounting; isoinfo is an independent reader)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from guestd.context import VOLUME_LABEL, ContextError, loads, validate
from guestd.sources import iso9660
from services.vmmanager.context import build_context, new_token, write_context_iso


def good() -> dict:
    return json.loads(build_context(instance="i-1", hostname="node1.grid.example", mac="52:54:00:aa:bb:cc",
                                    address="10.1.0.5", netmask="255.255.255.0", gateway="10.1.0.1",
                                    dns=["10.1.0.2"], container_command=["/opt/gt4/bin/container"],
                                    token="A" * 22, now=1_700_000_000.5).to_json())


def test_the_built_context_round_trips_through_its_json():
    ctx = validate(good())
    assert loads(ctx.to_json()) == ctx
    assert ctx.network.prefixlen == 24 and ctx.container.command == ("/opt/gt4/bin/container",)
    assert ctx.time == 1_700_000_000.5 and ctx.channel == "org.vmgrid.guestd.0"


def test_tokens_are_fresh_and_long_enough():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for t in tokens:
        validate({**good(), "token": t})


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(version=2), "version"),
    (lambda c: c.update(surprise=1), "unknown context fields"),
    (lambda c: c.update(instance="../etc"), "instance"),
    (lambda c: c.update(token="short"), "token"),
    (lambda c: c.update(hostname="-bad-"), "hostname"),
    (lambda c: c.update(time="yesterday"), "time"),
    (lambda c: c.update(time=True), "time"),
    (lambda c: c.update(channel="no spaces"), "channel"),
    (lambda c: c["network"].update(mac="52:54:00:zz:00:00"), "mac"),
    (lambda c: c["network"].update(address="10.1.0.300"), "address"),
    (lambda c: c["network"].update(netmask="255.0.255.0"), "netmask"),
    (lambda c: c["network"].update(gateway="192.168.9.1"), "outside"),
    (lambda c: c["network"].update(dns=["1.1.1.1"] * 4), "dns"),
    (lambda c: c["network"].update(vlan=3), "unknown network fields"),
    (lambda c: c.update(container={"command": []}), "container.command"),
    (lambda c: c.update(container={"command": ["x"], "restart": "sometimes"}), "restart"),
    (lambda c: c.update(container={"command": ["x"], "environment": {"A": 1}}), "environment"),
    (lambda c: c.pop("network"), "network"),
])
def test_a_bad_field_is_named_in_the_error(change, words):
    body = good()
    change(body)
    with pytest.raises(ContextError, match=words):
        validate(body)


@pytest.mark.parametrize("data", [b"", b"not json", b"[1,2]", b"\xff\xfe", b"{" * 40000])
def test_unreadable_context_files_are_refused(data):
    with pytest.raises(ContextError):
        loads(data)


def test_build_context_refuses_bad_input_before_writing_anything():
    with pytest.raises(ContextError, match="address"):
        build_context(instance="i-1", hostname="h", mac="52:54:00:aa:bb:cc", address="nowhere",
                      netmask="255.255.255.0")


def test_the_context_iso_carries_the_label_and_the_file(tmp_path):
    ctx = validate(good())
    iso = write_context_iso(ctx, tmp_path / "ctx.iso", refresh_time=False)
    with open(iso, "rb") as f:
        assert iso9660.volume_label(f) == VOLUME_LABEL
        assert loads(iso9660.read_file(f, "context.json")) == ctx
        with pytest.raises(iso9660.ISOError):
            iso9660.read_file(f, "other.json")


def test_write_context_iso_puts_the_hosts_time_now(tmp_path):
    ctx = validate(good())
    import time
    t0 = time.time()
    iso = write_context_iso(ctx, tmp_path / "ctx.iso")
    with open(iso, "rb") as f:
        assert loads(iso9660.read_file(f, "context.json")).time >= t0


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("isoinfo") is None, reason="isoinfo (genisoimage) missing")
def test_isoinfo_reads_what_vmgrid_wrote(tmp_path):
    """An independent ISO 9660 reader (isoinfo) sees the volume label and the Joliet file."""
    iso = write_context_iso(validate(good()), tmp_path / "ctx.iso")
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert f"Volume id: {VOLUME_LABEL}" in info and "Joliet" in info
    body = subprocess.run(["isoinfo", "-J", "-x", "/context.json", "-i", str(iso)], capture_output=True,
                          check=True).stdout
    assert json.loads(body)["instance"] == "i-1"


def test_iso9660_reader_falls_back_to_plain_iso_names(tmp_path):
    """Without Joliet (a plain genisoimage call) the level-1 name CONTEXT.JSO;1 is still found."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "context.json").write_bytes(validate(good()).to_json())
    subprocess.run(["genisoimage", "-quiet", "-V", VOLUME_LABEL, "-o", str(tmp_path / "plain.iso"), str(stage)],
                   check=True)
    with open(tmp_path / "plain.iso", "rb") as f:
        assert loads(iso9660.read_file(f, "context.json")).instance == "i-1"


def test_a_file_that_is_not_an_iso_is_refused(tmp_path):
    (tmp_path / "junk").write_bytes(b"\0" * 100_000)
    with open(tmp_path / "junk", "rb") as f, pytest.raises(iso9660.ISOError):
        iso9660.volume_label(f)
