"""Bridge mode on real guests: two QEMU guests with taps on one node's bridge reach each other, and the
node reaches both at their leased addresses (docs/configuration.md, "The guests' network").

Each scene runs inside a network namespace of its own, made and removed by the module's fixture
(vgnet-<hex>), so bridges, taps and guests never touch the machine's own network nor each other: the two
scenes run at the same time (tests/vm/scene.py). The VMM-level scene runs its node as a process of its
own (tests/vm/bridge_node.py: libvirt embeds one QEMU root per process); the grid-level scene runs a
whole grid there (tests/vm/bridge_grid.py): two VMManager nodes configured with nic_kind = "bridge", a
guest deployed on each through the signed, authorized VMManager service.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from scene import Scene, scene_result

HELPER = Path(__file__).with_name("bridge_node.py")
GRID_HELPER = Path(__file__).with_name("bridge_grid.py")


@pytest.fixture(scope="module")
def scenes(guest_image, qemu_prerequisites, vm_dir):
    """Both scenes started at once, each in its own namespace; what each finished with (read by its test)."""
    node = Scene(HELPER, vm_dir, "vgnet", lambda work: [guest_image.directory, work / "root", work])
    try:
        grid = Scene(GRID_HELPER, vm_dir, "vgnet", lambda work: [guest_image.directory, work])
    finally:
        node_finished = node.finish(timeout=900)
    return {"node": node_finished, "grid": grid.finish(timeout=1500)}


def test_guests_on_the_node_bridge_reach_each_other_and_the_node_reaches_them(scenes):
    seen = scene_result(scenes["node"], "bridge node", detail=3000)

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
    links = seen["links_after"]
    assert "vgnetbr0" not in links and not any(port in links for port in seen["ports"]), links


def test_guests_deployed_on_two_bridge_mode_nodes_reach_each_other_and_the_node_reaches_them(scenes):
    seen = scene_result(scenes["grid"], "bridge grid", detail=4000)

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
    # each node bound its guest's tap to the lease in a table of its own; the bridge's teardown took both away
    guards = seen["guards"]
    assert len(guards) == 2, guards
    for inst in (a, b):
        holding = [t for t, text in guards.items() if f"{inst['mac']} . {inst['address']}" in text]
        assert len(holding) == 1, (inst, guards)
    assert seen["guards_after"] == []
    assert "cleanup" not in seen, seen["cleanup"]
    assert seen["bridge_after"] is False, "the bridge the node made was taken down"
