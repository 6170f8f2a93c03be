"""What the two grid scenes in bridge mode share (bridge_grid.py for test_node_bridge_qemu.py, jobs_grid.py for
the job service and the migration): the image registered by the admin from a hard link, VMManager nodes started
as `vmgrid serve vmmanager` processes on one bridge, and their teardown (nodes stopped, stray QEMUs killed, the
bridge the first node made taken down). Run inside the scene's network namespace, like the scenes themselves."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

from client.localgrid import write_toml
from services.descriptor import parse_descriptor
from services.vmmanager.guard import tables_of
from services.vmmanager.network import NodeBridge
from tests.fixtures.grid import free_port

from scene import link_or_copy
from test_vmmanager_qemu import NodeProcess, qemu_processes


def register_image(grid, pki, rootfs: Path, descriptor: bytes, name: str):
    """The admin registers ``rootfs`` under ``descriptor`` (the repository copies it from its ingest directory,
    handed a hard link); alice's view of the registered descriptor is returned, ready to deploy."""
    ingest = grid.ingest / f"{name}.qcow2"
    link_or_copy(rootfs, ingest)
    grid.repo(pki.admin).register(parse_descriptor(descriptor), local_path=str(ingest))
    ingest.unlink()
    return grid.repo(pki.alice).query([f"name = {name}"]).descriptors[0]


class BridgeNodes:
    """VMManager node processes in bridge mode on ``bridge`` (the first one makes it), each with its own lease
    range, state directory ``WORK/sN`` and QEMU root ``WORK/rN`` (short paths: the guest channel socket's path
    must stay under 108 bytes)."""

    def __init__(self, work: Path, pki, grid, bridge: str, network: str, gateway: str) -> None:
        self.work, self.pki, self.grid = work, pki, grid
        self.bridge, self.network, self.gateway = bridge, network, gateway
        self.nodes: dict[str, NodeProcess] = {}

    def root(self, n: int) -> Path:
        return self.work / f"r{n}"

    def start(self, leases: dict[str, str], settings: Callable[[int, str, str], dict]) -> dict[str, NodeProcess]:
        """One node per ``leases`` entry (name -> lease range), its [vmmanager] section ``settings(n, name,
        range)`` plus the repository, the network and the bridge; each started before the next."""
        for n, (name, lease_range) in enumerate(leases.items()):
            node = NodeProcess(self.work / f"{name}.toml", self.work / f"s{n}", self.work / f"{name}.log", free_port())
            write_toml(node.config, {
                "container": {"host": "127.0.0.1", "port": node.port, "state_dir": str(node.state),
                              "log_level": "info"},
                "security": {"cert_dir": str(self.pki.cert_dir), "host_cert": str(self.pki.host_cert_path),
                             "host_key": str(self.pki.host_key_path)},
                "enforcement": {"authz_url": self.grid.authz_url, "permit_ttl": 0.0},
                "vmmanager": {**settings(n, name, lease_range), "repository": self.grid.repository_url,
                              "network": self.network, "gateway": self.gateway, "nic_kind": "bridge",
                              "nic_source": self.bridge, "manage_bridge": True},
            })
            self.nodes[name] = node        # before its start: a node that fails to start is stopped too
            node.start(self.pki.cert_dir, timeout=180)
        return self.nodes

    def teardown(self, out: dict, logs: bool = False) -> None:
        """Stop every node (exit codes in ``out["node_exit"]``, the logs' tails in ``out["node_logs"]`` when
        ``logs``), kill any QEMU a node left behind and take the bridge down (``out["bridge_after"]``: whether it
        still exists); what went wrong goes to ``out["cleanup"]``."""
        for n, (name, node) in enumerate(self.nodes.items()):
            node.stop()
            out.setdefault("node_exit", {})[name] = node.process and node.process.returncode
            if logs:
                out.setdefault("node_logs", {})[name] = node.log_tail()[-3000:]
            for pid in qemu_processes(f"{self.root(n)}/lib/qemu/"):
                os.kill(pid, signal.SIGKILL)
                out.setdefault("cleanup", []).append(f"killed a QEMU of {name}")
        try:
            if self.nodes:   # the first node made the bridge: its record says so, and teardown removes it
                first = next(iter(self.nodes.values()))
                out["bridge_after"] = NodeBridge(self.bridge, self.gateway, self.network,
                                                 first.state / "vmmanager").teardown().exists
                for node in list(self.nodes.values())[1:]:      # each node's teardown takes its own guard
                    NodeBridge(self.bridge, self.gateway, self.network, node.state / "vmmanager").teardown()
                out["guards_after"] = tables_of(self.bridge)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            out.setdefault("cleanup", []).append(f"bridge teardown: {exc}")
