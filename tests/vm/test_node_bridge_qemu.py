"""Bridge mode on real guests: two QEMU guests with taps on one node's bridge reach each other, and the
node reaches both at their leased addresses (docs/configuration.md, "The guests' network").

Everything runs inside a network namespace each test makes and removes (vgnet-<hex>), so bridges,
taps and guests never touch the machine's own network. The VMM-level test runs its node as a process
of its own (tests/vm/bridge_node.py: libvirt embeds one QEMU root per process); the grid-level test
runs a whole grid there (tests/vm/bridge_grid.py): two VMManager nodes configured with
nic_kind = "bridge", a guest deployed on each through the signed, authorized VMManager service.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("bridge_node.py")
GRID_HELPER = Path(__file__).with_name("bridge_grid.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns():
    name = f"vgnet-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "dev", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def qemu_pids(needle: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and needle in cmd:
                pids.append(int(d.name))
    return pids


def test_guests_on_the_node_bridge_reach_each_other_and_the_node_reaches_them(
        guest_image, qemu_prerequisites, vm_dir, netns):
    work = vm_dir / f"br-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    root = work / "root"
    try:
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(HELPER), str(guest_image.directory),
                               str(root), str(work)], cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        for pid in qemu_pids(str(root)):          # left only if the helper died midway
            os.kill(pid, signal.SIGKILL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"bridge node failed: {proc.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    assert "error" not in seen, f"{seen['error']}\n{json.dumps(seen, indent=1)[:3000]}"

    # the node made its bridge, holding the pool's gateway, once (a second ensure changed nothing)
    assert seen["bridge"]["addresses"] == ["10.77.0.1/24"] and seen["bridge"]["up"]
    assert seen["bridge"]["made"]["bridge"] and seen["bridge"]["idempotent"]
    assert len(seen["ports"]) == 2, f"one tap per instance on the bridge: {seen['ports']}"

    guests = seen["guests"]
    for name, address, peer in (("vgnet-a", "10.77.0.11", "vgnet-b"), ("vgnet-b", "10.77.0.12", "vgnet-a")):
        g = guests[name]
        assert "error" not in g, g.get("error")
        assert g["nic"] == ["bridge", "vgnetbr0"]
        # guestd set the leased address on the NIC with the leased MAC, the bridge as its gateway
        assert (g["network"]["address"], g["network"]["gateway"]) == (address, "10.77.0.1")
        # the node reaches the guest at its leased address ...
        assert g["id_from_node"] == name, g["id_error"]
        # ... the guest reached the other one directly over the bridge ...
        assert g["reached"] == peer, g["reached_error"]
        # ... and the address answered from the guest's leased MAC
        assert seen["neighbours"].get(address) == g["mac"], seen["neighbours"]

    # the node took down the bridge it made; the namespace holds no bridge
    assert seen["after_teardown"] == {"exists": False}
    links = subprocess.run(["ip", "-n", netns, "-br", "link", "show"], capture_output=True, text=True).stdout
    assert "vgnetbr0" not in links and "vnet" not in links, links


def test_guests_deployed_on_two_bridge_mode_nodes_reach_each_other_and_the_node_reaches_them(
        guest_image, qemu_prerequisites, vm_dir, netns):
    work = vm_dir / f"bg{uuid.uuid4().hex[:4]}"
    work.mkdir()
    try:
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(GRID_HELPER),
                               str(guest_image.directory), str(work)], cwd=REPO, capture_output=True, text=True,
                              timeout=1500)
    finally:
        for pid in qemu_pids(str(work)):          # left only if the helper died midway
            os.kill(pid, signal.SIGKILL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"bridge grid failed: {proc.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    assert "error" not in seen, f"{seen['error']}\n{json.dumps(seen, indent=1)[:4000]}"

    # the first node made the bridge holding the gateway; the second found it made and changed nothing
    records = [n["bridge_record"] for n in seen["nodes"].values()]
    assert [r["bridge"] for r in records] == [True, False] and [r["address"] for r in records] == [True, False]
    assert seen["bridge"]["addresses"] == ["10.77.0.1/24"] and seen["bridge"]["up"]
    assert len(seen["ports"]) == 2, f"one tap per instance, both on the one bridge: {seen['ports']}"

    a, b = seen["instances"]["bridge1"], seen["instances"]["bridge2"]
    for inst in (a, b):
        assert inst["state"] == "Running", inst["failure"] or inst["guest_status"]
        assert f"address {inst['address']}/255.255.255.0 on eth0" in inst["guest_status"]
        assert inst["id_from_node"] == inst["host"], inst["id_error"]      # the node reaches the guest
        assert seen["neighbours"].get(inst["address"]) == inst["mac"], seen["neighbours"]
    assert (a["address"], b["address"]) == ("10.77.0.10", "10.77.0.20"), "each node leased from its own range"
    assert a["reached"] == {b["address"]: b["host"]}, "the guest on node 1 reached the guest on node 2"
    assert b["reached"] == {a["address"]: a["host"]}, "the guest on node 2 reached the guest on node 1"
    assert "cleanup" not in seen, seen["cleanup"]
    assert seen["after_teardown"] is False, "the bridge the node made was taken down"
