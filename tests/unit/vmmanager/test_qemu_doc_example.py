"""docs/vmmanager-qemu.md's node settings for real guests load as a node's configuration, as written."""
from __future__ import annotations

import re
from pathlib import Path

from services.container.config import load_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "vmmanager-qemu.md"


def test_the_real_guest_node_example_loads_with_its_own_values(tmp_path):
    block = re.search(r"```toml\n(\[vmmanager\].*?)```", DOC.read_text(), re.S)      # the first one
    assert block, "docs/vmmanager-qemu.md lost its [vmmanager] example"
    assert "/work/" not in block.group(1)          # no path of the machine the docs were written on
    (tmp_path / "node.toml").write_text(block.group(1))
    vmm = load_config(tmp_path / "node.toml").vmmanager
    assert (vmm.node, vmm.vmm, vmm.vmm_root) == ("qemu1", "qemu", "/var/lib/vmgrid/qemu")
    assert (vmm.network, vmm.gateway, vmm.lease_range) == ("10.99.0.0/24", "10.99.0.1", "10.99.0.10-10.99.0.19")
    assert vmm.kernel.endswith("/vmlinuz") and vmm.initrd.endswith("/initrd.img") and vmm.guest_ready_timeout == 240.0


def test_the_node_whose_guests_run_jobs_loads_with_a_bridge_and_a_guest_ca(tmp_path):
    """docs/vmmanager-qemu.md's "A site's node whose guests run jobs": the whole container file, as written."""
    block = re.search(r"## A site's node whose guests run jobs\n.*?```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/vmmanager-qemu.md lost its node for guests that run jobs"
    (tmp_path / "q1.toml").write_text(block.group(1))
    cfg = load_config(tmp_path / "q1.toml")
    vmm = cfg.vmmanager
    assert (vmm.vmm, vmm.nic_kind, vmm.nic_source, vmm.manage_bridge, vmm.guest_ca) == (
        "qemu", "bridge", "vmgridbr1", True, "ca")
    assert len(vmm.nic_source) <= 15 and cfg.container.port == 8447
    assert cfg.enforcement.authz_url.endswith("/AuthorizationService")
