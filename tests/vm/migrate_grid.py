"""A real guest migrated through the grid, run by tests/vm/test_migrate_qemu.py inside a network namespace the
test made (`ip netns exec vgmf-... python migrate_grid.py IMAGE_DIR WORKDIR`): the Authorization service and
the VMRepository in this process, two VMManager nodes (`vmgrid serve vmmanager`) in bridge mode on one
bridge, with different lease ranges and one guest CA. alice deploys the job-service image on the first node,
starts a long job, notes its process (PID, start time, the kernel's boot id), then `vmgrid vm migrate NAME
--to NODE2`; afterwards, through the job service at the new address: the same process, the same boot, the
guest clock against the host's, the new address in the guest and reachable from the node, the old one dead.
Prints what it saw as one JSON line; always destroys the guest, stops the nodes and takes the bridge down.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client.localgrid import write_toml  # noqa: E402
from client.soap import GridServiceClient  # noqa: E402
from client.vmmanager import InstanceRef, VMManagerClient  # noqa: E402
from guestd.image.build import GuestImage  # noqa: E402
from services.descriptor import parse_descriptor  # noqa: E402
from services.vmmanager.network import NodeBridge  # noqa: E402
from tests.fixtures.grid import free_port, start_grid  # noqa: E402
from tests.fixtures.pki import build_grid_pki  # noqa: E402

from jobs_grid import Cli  # noqa: E402
from test_vmmanager_qemu import NodeProcess, qemu_processes  # noqa: E402

BRIDGE, NETWORK, GATEWAY = "vgmfbr0", "10.79.0.0/24", "10.79.0.1"
NODES = {"mf1": "10.79.0.10-10.79.0.11", "mf2": "10.79.0.20-10.79.0.21"}
NAME = "moving-guest"
# the long job: its shell's PID (kept by exec) in /tmp, then it sleeps; the probe: that process's start time
# (clock ticks since boot, /proc/PID/stat field 22), the kernel's boot id, and the guest's clock
LONG = "echo $$ > /tmp/vgmf.pid.part && mv /tmp/vgmf.pid.part /tmp/vgmf.pid && exec sleep 3000"
PROBE = ("while [ ! -s /tmp/vgmf.pid ]; do sleep 0.2; done; p=$(cat /tmp/vgmf.pid); "
         "echo $p $(cut -d' ' -f22 /proc/$p/stat) $(cat /proc/sys/kernel/random/boot_id) $(date +%s.%N)")


def probe(cli: Cli, work: Path, tag: str) -> dict:
    """Run PROBE as a job through the job service; its stdout parsed, bracketed by the host's clock."""
    before = time.time()
    run = cli("job", "submit", NAME, "--wait", "--", "sh", "-c", PROBE, timeout=600)
    after = time.time()
    got = {"run": run, "host_before": before, "host_after": after}
    job = (run["out"].splitlines() or [""])[0]
    fetched = cli("job", "get", NAME, job, "-o", f"probe-{tag}")
    got["get"] = fetched
    stdout = work / f"probe-{tag}" / "stdout"
    if stdout.is_file():
        pid, start, boot, clock = stdout.read_text().split()
        got.update(pid=int(pid), start=int(start), boot_id=boot, guest_time=float(clock))
    return got


def reachable(address: str, port: int, timeout: float = 3.0) -> str:
    """'open' when a TCP connection to address:port is accepted, else why not."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "open"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def wait_service(cli: Cli, seconds: float) -> dict:
    """`vmgrid job list NAME` until the job service answers (Python starting under TCG takes a while)."""
    deadline, up = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        try:
            up = cli("job", "list", NAME, timeout=120)
        except subprocess.TimeoutExpired as exc:     # a loaded machine: ask again until the deadline
            up = {"rc": None, "out": "", "err": str(exc)}
            continue
        if up["rc"] == 0:
            break
        time.sleep(2)
    return up


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--boot-timeout", type=float, default=480.0)
    args = ap.parse_args()
    image = GuestImage.load(args.image)
    pki = build_grid_pki(args.work / "pki")
    out: dict = {"steps": {}}
    grid, nodes, ref = None, {}, None
    t0 = time.monotonic()
    try:
        grid = start_grid(pki, args.work / "g", nodes=0)
        rootfs = grid.ingest / f"{image.name}.qcow2"
        shutil.copyfile(image.rootfs, rootfs)
        grid.repo(pki.admin).register(parse_descriptor(image.descriptor.read_bytes()), local_path=str(rootfs))
        rootfs.unlink()
        descriptor = grid.repo(pki.alice).query([f"name = {image.name}"]).descriptors[0]
        for n, (name, leases) in enumerate(NODES.items()):
            node = NodeProcess(args.work / f"{name}.toml", args.work / f"s{n}", args.work / f"{name}.log", free_port())
            write_toml(node.config, {
                "container": {"host": "127.0.0.1", "port": node.port, "state_dir": str(node.state),
                              "log_level": "info"},
                "security": {"cert_dir": str(pki.cert_dir), "host_cert": str(pki.host_cert_path),
                             "host_key": str(pki.host_key_path)},
                "enforcement": {"authz_url": grid.authz_url, "permit_ttl": 0.0},
                "vmmanager": {"node": name, "vmm": "qemu", "vmm_root": str(args.work / f"r{n}"),
                              "repository": grid.repository_url, "network": NETWORK, "gateway": GATEWAY,
                              "lease_range": leases, "guest_ready_timeout": args.boot_timeout, "sweep_interval": 0.5,
                              "nic_kind": "bridge", "nic_source": BRIDGE, "manage_bridge": True,
                              "guest_ca": str(pki.ca.directory), "job_admins": [pki.admin.dn],
                              "migration_sources": ["localhost"], "migration_timeout": 300.0,
                              "migration_fixup_timeout": 180.0},
            })
            node.start(pki.cert_dir, timeout=180)
            nodes[name] = node
        first, second = nodes["mf1"], nodes["mf2"]
        vm = VMManagerClient(GridServiceClient(first.url, pki.alice.proxy, pki.trust()))
        ref = vm.deploy(descriptor, NAME, 3600).ref
        info = vm.wait_for(ref, ("Running", "Failed"), timeout=args.boot_timeout + 120)
        out["before"] = {"state": info.state, "address": info.address, "mac": info.mac,
                         "guest_status": info.guest_status, "job_service": info.job_service}
        s = out["steps"]
        alice = Cli(args.work, pki, pki.alice, first.url)
        s["service_up"] = wait_service(alice, 300)
        s["long"] = alice("job", "submit", NAME, "--", "sh", "-c", LONG)
        out["probe_before"] = probe(alice, args.work, "before")
        # the migration, as the user types it (docs/vmmanager.md)
        t = time.monotonic()
        s["migrate"] = alice("vm", "migrate", NAME, "--to", second.url, timeout=900)
        out["migrate_seconds"] = round(time.monotonic() - t, 1)
        ref = InstanceRef(second.url, ref.key)
        vm2 = VMManagerClient(GridServiceClient(second.url, pki.alice.proxy, pki.trust()))
        moved = vm2.status(ref)
        out["after"] = {"state": moved.state, "address": moved.address, "mac": moved.mac, "node": moved.node,
                        "guest_status": moved.guest_status, "job_service": moved.job_service,
                        "phases": moved.phases}
        at2 = Cli(args.work, pki, pki.alice, second.url)
        s["vm_status"] = at2("vm", "status", NAME)
        s["service_up_after"] = wait_service(at2, 300)
        out["probe_after"] = probe(at2, args.work, "after")
        s["long_status"] = at2("job", "status", NAME, s["long"]["out"], "--json")
        out["reach"] = {"new": reachable(moved.address, 8443), "old": reachable(info.address, 8443)}
        s["cancel"] = at2("job", "cancel", NAME, s["long"]["out"])
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if ref is not None:
            try:
                VMManagerClient(GridServiceClient(ref.address, pki.alice.proxy, pki.trust())).destroy(ref)
            except Exception as exc:  # noqa: BLE001
                out.setdefault("cleanup", []).append(f"destroy: {exc}")
        for n, (name, node) in enumerate(nodes.items()):
            node.stop()
            if "error" in out:
                out.setdefault("node_logs", {})[name] = node.log_tail()[-3000:]
            for pid in qemu_processes(f"{args.work / f'r{n}'}/lib/qemu/"):
                os.kill(pid, signal.SIGKILL)
                out.setdefault("cleanup", []).append(f"killed a QEMU of {name}")
        try:
            if nodes:
                first = next(iter(nodes.values()))
                out["bridge_after"] = NodeBridge(BRIDGE, GATEWAY, NETWORK, first.state / "vmmanager").teardown().exists
        except Exception as exc:  # noqa: BLE001
            out.setdefault("cleanup", []).append(f"bridge teardown: {exc}")
        if grid is not None:
            grid.close()
        out["total_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
