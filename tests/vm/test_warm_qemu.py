"""Warm-snapshot deploys on real guests (QEMU tier): an image whose descriptor allows it
(``<boot warmStart="true">``) is booted once per node as a template and saved; later deploys restore a
clone of it (the ``restore`` phase) and guestd gives each clone its own identity: address, MAC, host
name, token, a reseeded kernel RNG, its own container. A broken snapshot makes the deploy boot cold.

One grid and one snapshot are shared by the module (one cold boot after a failed restore, one template
boot, three clones); it runs on this process's embedded QEMU root like the other QEMU-tier modules.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from guestd.context import FILE_NAME
from guestd.sources.iso9660 import read_file
from services.descriptor import parse_descriptor
from services.vmmanager import phases, qemuimg, warm
from services.vmmanager.states import WARM_PHASES
from services.vmmanager.vmm import InstanceState
from services.vmmanager.vmm.config import domain_name
from services.vmmanager.vmm.errors import GuestChannelError
from tests.vm.test_vmmanager_qemu import (BOOT_TIMEOUT, CONTAINER, DESCRIPTOR, GATEWAY, IMAGE_NAME, node_settings,
                                          qemu_pids)
from services.authz.config import EnforcementConfig
from services.container.assemble import build_container, build_vmmanager
from services.vmmanager.service import VMManagerConfig
from tests.fixtures.grid import base_config, free_port, start_grid

from scene import qemu_pids

WARM_IMAGE = f"{IMAGE_NAME}-warm"
LEASES = "10.99.0.30-10.99.0.39"
CLONES = 3


@pytest.fixture(scope="module")
def warm_grid(grid_pki, guest_image, qemu_node, vm_dir):
    """A grid with one QEMU node and the guest image registered with warmStart="true"."""
    foreign = [i.name for i in qemu_node.list_instances() if not i.name.startswith("inst-")]
    if foreign:
        pytest.skip(f"other QEMU-tier guests are live in this process's embedded root ({', '.join(foreign)})")
    grid = start_grid(grid_pki, vm_dir / "gw", nodes=0)
    try:
        cfg = base_config(grid_pki, grid.root / "w1", free_port())
        cfg.enforcement = EnforcementConfig(authz_url=grid.authz_url, permit_ttl=0.0)
        cfg.vmmanager = VMManagerConfig(repository=grid.repository_url, **node_settings(
            guest_image, root=qemu_node.root, lease_range=LEASES, name="warm1"))
        service = build_vmmanager(cfg)
        container = build_container(cfg, [service])
        container.start()
        grid.nodes.append((container, service))
        rootfs = grid.ingest / f"{WARM_IMAGE}.qcow2"
        shutil.copyfile(guest_image.rootfs, rootfs)
        text = DESCRIPTOR.format(name=WARM_IMAGE, kernel=guest_image.kernel_version, command=CONTAINER)
        text = text.replace("<boot><method>", '<boot warmStart="true"><method>')
        grid.repo(grid_pki.admin).register(parse_descriptor(text.encode()), local_path=str(rootfs))
        rootfs.unlink()
        yield grid
    finally:
        grid.close()
        for _, service in grid.nodes:
            service.vmm.close()


def deploy(grid, grid_pki, name: str):
    found = grid.repo(grid_pki.alice).query([f"name = {WARM_IMAGE}"])
    client = grid.vmm(grid_pki.alice)
    registered = client.deploy(found.descriptors[0], name, 1800)
    running = client.wait_for(registered.ref, ("Running", "Failed"), timeout=BOOT_TIMEOUT)
    assert running.state == "Running", running.failure or running.guest_status
    print(f"{name}: phases {running.phases}", file=sys.stderr)
    return registered.ref.key, running


@pytest.fixture(scope="module")
def first(warm_grid, grid_pki):
    """The first deploy finds a damaged snapshot (planted here: a save file libvirt cannot read), fails to
    restore it, drops it and boots cold; the node then makes the image's real snapshot in the background."""
    node = warm_grid.node(0)
    real_find = node.warm.find

    def planted(inst, d):
        snap = warm.Snapshot(node.warm._dir(node.warm.fingerprint(inst, d)), node.warm.fingerprint(inst, d))
        snap.directory.mkdir(parents=True)
        qemuimg.create_empty(snap.disk, d.disks[0].size)
        snap.memory.write_bytes(b"NotALibvirtSave!" + bytes(4096))
        (snap.directory / "meta.json").write_text(json.dumps(snap.fingerprint))
        node.warm.find = real_find
        return real_find(inst, d)

    node.warm.find = planted
    try:
        key, running = deploy(warm_grid, grid_pki, "warm-first")
    finally:
        node.warm.find = real_find
    return key, running


@pytest.fixture(scope="module")
def snapshot(warm_grid, first):
    node = warm_grid.node(0)
    inst = node.store.get(first[0])
    d = phases.descriptor_of(inst)
    deadline = time.monotonic() + BOOT_TIMEOUT
    snap = None
    while snap is None and time.monotonic() < deadline:     # waits for a condition, not for a time
        snap = node.warm.find(inst, d) if not node.warm._making else None
        if snap is None:
            time.sleep(0.5)
    assert snap is not None, "the node made the warm snapshot after the first cold boot"
    return snap


def test_a_snapshot_that_fails_to_restore_falls_back_to_a_cold_boot(first):
    """The restore failed (the planted save file is damaged): the overlay is made again on the cached
    image and the guest boots; the instance runs all the same."""
    key, running = first
    assert [n for n, _ in running.phases] == ["authorize", "register", "lease", "stage", "overlay", "context",
                                              "overlay", "power-on", "guest-ready"]
    assert running.guest_status.startswith("ready;")


@pytest.fixture(scope="module")
def clones(warm_grid, grid_pki, snapshot):
    out = []
    for n in range(CLONES):
        out.append(deploy(warm_grid, grid_pki, f"warm-clone-{n}"))
    return out


def test_the_snapshot_is_a_frozen_disk_and_a_saved_memory_state(snapshot, warm_grid):
    assert snapshot.memory.stat().st_size > 1 << 20, "a real memory state, not the damaged one planted first"
    assert snapshot.disk.stat().st_mode & 0o222 == 0, "the frozen layer is read-only"
    assert json.loads((snapshot.directory / "meta.json").read_text()) == snapshot.fingerprint
    assert snapshot.fingerprint["vmm"]["backend"] == "libvirt-qemu"
    node = warm_grid.node(0)
    assert not [i.name for i in node.vmm.list_instances() if i.name.startswith("warm-")], \
        "the template domain is gone once saved"


def test_a_deploy_restores_the_snapshot_instead_of_booting(clones, warm_grid, snapshot):
    node = warm_grid.node(0)
    for key, running in clones:
        assert [n for n, _ in running.phases] == list(WARM_PHASES)
        assert running.guest_status.startswith(f"ready; address {running.address}/255.255.255.0 on eth0; "
                                                "container running"), running.guest_status
        assert node.vmm.state(key) == InstanceState.RUNNING and qemu_pids(domain_name(key))
        overlay = node.instances_dir / key / "root.qcow2"
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(overlay)], check=True, capture_output=True,
            text=True).stdout)
        assert info["backing-filename"] == str(snapshot.disk), "the instance overlay sits on the frozen layer"


def test_every_clone_has_its_own_identity_secrets_and_entropy(clones, warm_grid):
    """No two clones share address, MAC, host name, token, the kernel RNG's output or their container."""
    node = warm_grid.node(0)
    seen = {"address": set(), "mac": set(), "hostname": set(), "token": set(), "probe": set()}
    for key, running in clones:
        channel = node.vmm.guest_channel(key)
        status = channel.status()
        assert status["ready"] and status["instance"] == key and status["context_source"] == "recontext"
        steps = status["steps"]
        assert all(step["ok"] for step in steps.values()), steps
        ident = steps["identity"]["detail"]
        net = steps["network"]["detail"]
        assert (net["address"], net["gateway"]) == (running.address, GATEWAY)
        assert ident["mac"] == running.mac and ident["rng"] == "reseeded"
        assert status["container"]["running"]
        assert status["container"]["nice"] == 0 and status["nice"] == 0, \
            "guestd's raised priority ended with its recontext's answer and its container never had it"
        assert abs(status["time"] - time.time()) < 60, "the clock was set from the host, not the template's"
        assert channel.rejected == [], "every message after the restore carried the clone's own token"
        assert status["recontext_seconds"]["wake.hups"] == 0, \
            "the template was saved with its channel connected: the clone read its recontext from its first wait"
        seen["address"].add(running.address)
        seen["mac"].add(running.mac)
        seen["hostname"].add(steps["hostname"]["detail"]["hostname"])
        seen["token"].add(node.store.get(key).token)
        seen["probe"].add(ident["random_probe"])
    assert all(len(values) == CLONES for values in seen.values()), seen


def test_a_second_recontext_is_refused(clones, warm_grid):
    """Only a warm template takes a new identity; an instance never changes its own again."""
    key, _ = clones[0]
    node = warm_grid.node(0)
    channel = node.vmm.guest_channel(key)
    with open(node.instances_dir / key / "context.iso", "rb") as f:
        ctx = json.loads(read_file(f, FILE_NAME))
    with pytest.raises(GuestChannelError, match="warm-snapshot template only"):
        channel.request("recontext", context=ctx, seed="00" * 64, time=time.time())
    assert channel.status()["instance"] == key


def test_a_snapshot_of_another_hypervisor_version_is_stale(warm_grid, clones, snapshot, monkeypatch):
    """After a QEMU or libvirt upgrade (here: the node's VMM reports another hypervisor version) the saved
    state may not load: find() drops the snapshot and deploys boot cold until a new one is made."""
    node = warm_grid.node(0)
    key, _ = clones[0]
    inst = node.store.get(key)
    d = phases.descriptor_of(inst)
    assert warm.allowed(d) and node.warm.find(inst, d) == snapshot
    real = node.vmm.hypervisor_identity()
    monkeypatch.setattr(node.vmm, "hypervisor_identity", lambda: {**real, "hypervisor": real["hypervisor"] + "1"})
    assert node.warm.find(inst, d) is None
    assert not snapshot.directory.exists(), "the stale snapshot was removed"


# -- clones on a bridge: every one reachable at its own address from its own MAC ---------------------
BRIDGE_HELPER = Path(__file__).with_name("warm_bridge_node.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns():
    name = f"vgwarm-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "dev", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_clones_of_one_snapshot_on_a_bridge_are_each_reachable_at_their_own_address(
        guest_image, qemu_prerequisites, vm_dir, netns):
    """A node of its own (tests/vm/warm_bridge_node.py, in a namespace): one template on its bridge,
    saved, three clones restored from it; each answers over the bridge at its leased address, from its
    own MAC (the ARP entry), with its own random state."""
    work = vm_dir / f"wb{uuid.uuid4().hex[:4]}"
    work.mkdir()
    try:
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(BRIDGE_HELPER),
                               str(guest_image.directory), str(work / "root"), str(work), "--clones", "3"],
                              cwd=REPO, capture_output=True, text=True, timeout=1500)
    finally:
        for pid in qemu_pids(str(work)):                # left only if the helper died midway
            os.kill(pid, signal.SIGKILL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"warm bridge node failed: {proc.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    assert "error" not in seen, f"{seen['error']}\n{json.dumps(seen, indent=1)[:3000]}"
    clones = seen["clones"]
    assert len(clones) == 3
    for name, c in clones.items():
        assert c["ready"] and c["rejected"] == [], c
        assert (c["network"]["address"], c["identity"]["mac"]) == (c["address"], c["mac"])
        assert c["id_from_node"] == name, c["id_error"]
        assert seen["neighbours"].get(c["address"]) == c["mac"], seen["neighbours"]
    assert len({c["identity"]["random_probe"] for c in clones.values()}) == 3
    assert seen["after_teardown"] == {"exists": False}
