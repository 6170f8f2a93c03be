"""The node's bridge (services/vmmanager/network.py) on a real Linux bridge, inside a network namespace
each test makes (named vgnet-*, removed at the end): made idempotently, holding the gateway, checked,
and taken down as far as vmgrid made it. Real guests on the bridge: tests/vm/test_node_bridge_qemu.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.vmmanager.network import NetworkSetupError, NodeBridge, prepare

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    name = f"vgnet-u{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "dev", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_ensure_makes_the_bridge_holding_the_gateway_and_is_idempotent(netns, tmp_path):
    bridge = NodeBridge("vgnetbr0", "10.77.0.1", "10.77.0.0/24", tmp_path, netns=netns)
    assert not bridge.check().exists
    status = bridge.ensure()
    assert status.exists and status.is_bridge and status.up and status.addresses == ("10.77.0.1/24",)
    assert status.made == {"bridge": True, "address": True, "address_cidr": "10.77.0.1/24"}
    again = bridge.ensure()                      # nothing left to do: nothing changes, nothing fails
    assert again.addresses == status.addresses and again.made["bridge"]
    assert "10.77.0.1/24" in ip(netns, "-br", "addr", "show", "dev", "vgnetbr0")
    # the node reaches its own gateway address on the bridge
    ping = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c",
                           "import socket; s = socket.create_connection; "
                           "l = socket.socket(); l.bind(('10.77.0.1', 0)); l.listen(); "
                           "c = s(('10.77.0.1', l.getsockname()[1]), timeout=5); print('ok')"],
                          capture_output=True, text=True)
    assert ping.stdout.strip() == "ok", ping.stderr


def test_teardown_removes_what_vmgrid_made_and_only_that(netns, tmp_path):
    made = NodeBridge("vgnetbr0", "10.77.0.1", "10.77.0.0/24", tmp_path / "a", netns=netns)
    made.ensure()
    assert not made.teardown().exists, "the bridge vmgrid created is gone"
    # a bridge the site made: vmgrid adds its gateway address, and takes back only the address
    ip(netns, "link", "add", "name", "vgnetsite", "type", "bridge")
    ip(netns, "addr", "add", "10.88.0.254/24", "dev", "vgnetsite")
    site = NodeBridge("vgnetsite", "10.88.0.1", "10.88.0.0/24", tmp_path / "b", netns=netns)
    assert site.ensure().made == {"bridge": False, "address": True, "address_cidr": "10.88.0.1/24"}
    after = site.teardown()
    assert after.exists and after.addresses == ("10.88.0.254/24",)


def test_what_cannot_be_a_bridge_is_refused_clearly(netns, tmp_path):
    with pytest.raises(NetworkSetupError, match="1-15 characters"):
        NodeBridge("a-name-far-too-long", "10.77.0.1", "10.77.0.0/24", tmp_path, netns=netns)
    with pytest.raises(NetworkSetupError, match="not a host address of 10.77.0.0/24"):
        NodeBridge("vgnetbr0", "10.78.0.1", "10.77.0.0/24", tmp_path, netns=netns)
    ip(netns, "link", "add", "name", "vgnetv0", "type", "veth", "peer", "name", "vgnetv1")
    with pytest.raises(NetworkSetupError, match="is not a bridge"):
        NodeBridge("vgnetv0", "10.77.0.1", "10.77.0.0/24", tmp_path, netns=netns).ensure()
    ip(netns, "addr", "add", "10.77.0.1/24", "dev", "vgnetv0")
    with pytest.raises(NetworkSetupError, match="already held by vgnetv0"):
        NodeBridge("vgnetbr0", "10.77.0.1", "10.77.0.0/24", tmp_path, netns=netns).ensure()
    assert "vgnetbr0" not in ip(netns, "link", "show"), "a refused set-up makes nothing"


def test_prepare_is_nothing_in_user_mode_and_needs_a_bridge_name(tmp_path):
    assert prepare("user", "", "10.99.0.1", "10.99.0.0/24", True, tmp_path) is None
    with pytest.raises(NetworkSetupError, match="needs nic_source"):
        prepare("bridge", "", "10.99.0.1", "10.99.0.0/24", True, tmp_path)


def test_the_site_bridge_commands_of_the_configuration_doc_satisfy_manage_bridge_false(netns, tmp_path):
    """docs/configuration.md's commands for a bridge the site makes itself, run as written inside the
    test's namespace; then the node's check (manage_bridge = false) accepts it, and refuses before."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    block = re.search(r"```sh\n# a bridge the site makes itself.*?\n```", doc, re.S)
    assert block, "docs/configuration.md shows the site's bridge commands"
    commands = block.group(0).split("\n", 1)[1].rsplit("```", 1)[0]
    cfg = dict(re.findall(r'^(nic_source|gateway|network) = "([^"]+)"', doc.split("## [jobs]")[0], re.M))   # [vmmanager]
    # the node's check runs in the namespace too: point iproute2 at it through the bridge object
    bridge = NodeBridge(cfg["nic_source"], cfg["gateway"], cfg["network"], tmp_path, netns=netns)
    assert not bridge.check().exists
    subprocess.run(["ip", "netns", "exec", netns, "sh", "-ec", commands], check=True)
    status = bridge.check()
    assert status.is_bridge and status.up and status.holds(bridge.address) and status.made["bridge"] is False


@pytest.mark.parametrize("source, expect", [("", 'nic_kind = "bridge" needs nic_source'),
                                            ("vgnetv0", "vgnetv0 exists and is not a bridge")])
def test_a_node_whose_bridge_cannot_be_set_up_refuses_to_start_with_one_line(grid_pki, netns, tmp_path,
                                                                              source, expect):
    """`vmgrid serve vmmanager` (test driver) in the test's namespace, configured for bridge mode on
    nothing, or on an interface that is not a bridge: exit status 1, one `vmgrid: ...` line, no bridge."""
    from client.localgrid import write_toml
    ip(netns, "link", "add", "name", "vgnetv0", "type", "veth", "peer", "name", "vgnetv1")
    cfg = tmp_path / "node.toml"
    write_toml(cfg, {
        "container": {"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "state")},
        "security": {"cert_dir": str(grid_pki.cert_dir), "host_cert": str(grid_pki.host_cert_path),
                     "host_key": str(grid_pki.host_key_path)},
        "enforcement": {"authz_url": "https://localhost:9/wsrf/services/AuthorizationService"},
        "vmmanager": {"network": "10.77.0.0/24", "gateway": "10.77.0.1", "lease_range": "10.77.0.10-10.77.0.20",
                      "nic_kind": "bridge", "nic_source": source},
    })
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "client.cli", "serve", "vmmanager",
                           "-c", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vmgrid:")]
    assert proc.returncode == 1 and len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "bridge" not in ip(netns, "-d", "link", "show"), "nothing was made"


def test_the_teardown_command_of_the_configuration_doc_takes_down_what_a_stopped_node_made(netns, tmp_path):
    """docs/configuration.md's `vmgrid node teardown -c node.toml`, as written, in the test's namespace, after a
    node's start made the bridge and its guard table: refused while a guest's tap is on the bridge and while the
    node runs (its state lock), then removes the bridge and the table, saying so."""
    import fcntl
    import shutil

    from services.vmmanager.guard import PortGuard, tables_of
    if shutil.which("nft") is None:
        pytest.skip("nftables (`nft`) is not installed")
    doc = (REPO / "docs" / "configuration.md").read_text()
    shown = re.search(r"\(in a network namespace of its own, as root\) -->\n```sh\n(vmgrid node teardown[^\n]*)\n```",
                      doc)
    assert shown, "docs/configuration.md shows the teardown command"
    cfg = dict(re.findall(r'^(nic_source|gateway|network) = "([^"]+)"', doc.split("## [jobs]")[0], re.M))   # [vmmanager]
    state = tmp_path / "state"
    (tmp_path / "node.toml").write_text(
        f'[container]\nstate_dir = "{state}"\n[vmmanager]\nnic_kind = "bridge"\nnic_source = "{cfg["nic_source"]}"\n'
        f'gateway = "{cfg["gateway"]}"\nnetwork = "{cfg["network"]}"\n')
    # what the node's start makes: the bridge holding the gateway, its guard table
    NodeBridge(cfg["nic_source"], cfg["gateway"], cfg["network"], state / "vmmanager", netns=netns).ensure()
    guard = PortGuard(cfg["nic_source"], owner=str((state / "vmmanager").resolve()), netns=netns)
    guard.sync([])
    # every nft the command runs is logged by a shim before the real one: the node's own table is removed by its
    # name, no listing (a listing took every node's tables of the bridge's name)
    shim = tmp_path / "shim"
    shim.mkdir()
    calls = tmp_path / "nft-calls"
    (shim / "nft").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {shutil.which("nft")} "$@"\n')
    (shim / "nft").chmod(0o755)
    env = {"PATH": f"{shim}:{REPO / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}

    def teardown(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", shown.group(1) + "".join(f" {e}" for e in extra)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    ip(netns, "link", "add", "name", "vgguest00000", "type", "veth", "peer", "name", "vgpeer")
    ip(netns, "link", "set", "vgguest00000", "master", cfg["nic_source"])
    r = teardown()
    assert r.returncode == 1 and "guests are still on bridge" in r.stderr and "vgguest00000" in r.stderr, r.stderr
    ip(netns, "link", "del", "vgguest00000")
    with open(state / "vmmanager.lock", "a+") as held:          # the node still runs
        fcntl.flock(held, fcntl.LOCK_EX)
        r = teardown()
        assert r.returncode == 1 and "in use by another `vmgrid serve`" in r.stderr, r.stderr
    assert cfg["nic_source"] in ip(netns, "link", "show")
    calls.unlink(missing_ok=True)
    r = teardown()
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines() == [f"delete table bridge {guard.table}"]     # its own table, named
    assert f"removed bridge {cfg['nic_source']} (the node made it)" in r.stdout
    assert f"removed nftables table bridge {guard.table}" in r.stdout
    assert cfg["nic_source"] not in ip(netns, "link", "show") and tables_of(cfg["nic_source"], netns) == []
    r = teardown()                                                # again: nothing left, said so
    assert r.returncode == 0 and "nothing the node made is left" in r.stdout, r.stdout + r.stderr
