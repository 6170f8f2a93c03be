"""Cold migration of a real guest between two VMManager nodes on loopback, beside the bare steps.

    sudo .venv/bin/python bench/bench_migrate.py [--memory 256,512] [--keep]

For each memory size: a real guest (the project's guest image, QEMU software emulation) is deployed on
node A and migrated to node B through the grid (delegated proxy, GridFTP pull of the overlay and the
saved state, restore, resume, guestd fix-up). Downtime is the time the guest does not run: freeze to
resume on the target (the phases freeze .. resume); total is the Migrate call as the client sees it.
The peer, in the same run: the same save -> copy -> restore done by hand through the VMM interface
(one qemu:///embed root per side, in this process, no grid): save, cp of the overlay and the state
file, restore on the other root. Figures are printed with their ratio to the peer; nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_vmmanager import GUEST_DESCRIPTOR, Site, clients, free_port, register  # noqa: E402
from benchgrid import BenchError, loadavg, log, table  # noqa: E402

HELPER = Path(__file__).resolve().parents[1] / "tests" / "vm" / "node_helper.py"
DOWNTIME = ("freeze", "prepare", "transfer", "restore", "resume")   # the guest runs again after resume


def grid_migration(site: Site, image, ws, memory: int, nodes) -> dict:
    _, a = clients(site, nodes[0], site.pki.alice)
    info = a.deploy(ws, f"mig-{memory}", 3600, wait=True)
    t = time.perf_counter()
    moved = a.migrate(info.ref, nodes[1].url("VMManagerService"))
    total = time.perf_counter() - t
    _, b = clients(site, nodes[1], site.pki.alice)
    status = b.status(moved.ref)
    b.destroy(moved.ref)
    phases = dict(moved.phases)
    return {"total": total, "downtime": sum(phases.get(p, 0.0) for p in DOWNTIME), "phases": moved.phases,
            "state": status.state, "guest": status.guest_status}


def bare_migration(image, src, root: Path, memory: int) -> dict:
    """The peer: save on this process's embed root (``src``), cp overlay and state, restore on another root in
    a child process (tests/vm/node_helper.py: libvirt embeds one QEMU root per process; its restore time is
    measured inside it, after the QEMU capability probe). Downtime = save + cp + restore."""
    import dataclasses

    from guestd.image.sample import make_overlay
    from services.vmmanager.context import build_context, write_context_iso
    from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, KernelBoot, Nic, Port
    from services.vmmanager.vmm.config import domain_xml

    a, b = root / "ia", root / "ib"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    name, mac = f"bare-{memory}", "52:54:00:be:02:01"
    ctx = build_context(instance=name, hostname=name, mac=mac, address="10.99.0.9", netmask="255.255.255.0",
                        gateway="10.99.0.1")
    write_context_iso(ctx, a / "context.iso")
    spec = InstanceSpec(name=name, memory_mib=memory, disks=(Disk(make_overlay(image.rootfs, a / "root.qcow2")),),
                        cdroms=(a / "context.iso",), nics=(Nic(mac),), serial_ports=(Port("file", a / "console.log"),),
                        boot=KernelBoot(image.kernel, image.initrd, image.cmdline),
                        channel=GuestChannel(a / "g.sock", ctx.token))
    try:
        src.define(spec)
        src.start(name)
        src.guest_channel(name).wait_ready(timeout=300)
        t = time.perf_counter()
        src.save(name, a / "state.save")
        saved = time.perf_counter() - t
        for f in ("root.qcow2", "state.save", "context.iso"):
            shutil.copyfile(a / f, b / f)
        copied = time.perf_counter() - t - saved
        moved = dataclasses.replace(spec, disks=(Disk(b / "root.qcow2"),), cdroms=(b / "context.iso",),
                                    serial_ports=(Port("file", b / "console.log"),),
                                    channel=GuestChannel(b / "g.sock", ctx.token))
        (b / "spec.xml").write_text(domain_xml(moved, "qemu"))
        out = subprocess.run([sys.executable, str(HELPER), str(root / "qb"), str(b / "state.save"), str(b / "spec.xml")],
                             capture_output=True, text=True, timeout=600)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if "error" in result:
            raise BenchError(f"bare restore failed: {result['error']}")
        restored = result["restore_seconds"]
        return {"save": saved, "copy": copied, "restore": restored, "total": saved + copied + restored,
                "state_bytes": (a / "state.save").stat().st_size}
    finally:
        for verb in (src.destroy, src.undefine):
            try:
                verb(name)
            except Exception:   # noqa: BLE001
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="256,512", help="guest memory sizes in MiB, comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_migrate: needs root (QEMU guests through qemu:///embed)")
    from guestd.image.build import build
    from services.descriptor import parse_descriptor, set_field
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vm-", dir="/tmp"))
    print(f"vmgrid migration benchmark: {os.cpu_count()} cores, {loadavg()}, work directory {root}")
    site = Site(root, build_grid_pki(root / "pki"))
    rows = []
    bare_src = None
    try:
        image = build(log=log)
        ingest = root / "ingest"
        ingest.mkdir()
        pki = site.pki
        site.start_central(host="127.0.0.1", public="localhost", port=free_port(), cert=pki.host_cert_path,
                           key=pki.host_key_path, ingest=ingest)
        path = ingest / "vmgrid-guest.qcow2"
        shutil.copyfile(image.rootfs, path)
        virtual = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                            capture_output=True, text=True).stdout)["virtual-size"]
        nodes = [site.start_node(f"node-{n}", host="127.0.0.1", public="localhost", port=free_port(),
                                 cert=pki.host_cert_path, key=pki.host_key_path, state=root / f"n{n}",
                                 vmmanager={"vmm": "qemu", "vmm_root": str(root / f"q{n}"), "kernel": str(image.kernel),
                                            "initrd": str(image.initrd), "cmdline": image.cmdline,
                                            "guest_ready_timeout": 300.0, "migration_sources": ["localhost"],
                                            "lease_range": ["10.99.0.10-10.99.0.90", "10.99.0.100-10.99.0.180"][n]})
                 for n in (0, 1)]
        base = register(site, parse_descriptor(GUEST_DESCRIPTOR.format(
            memory=256, size=virtual, kernel=image.kernel_version, cmdline=image.cmdline).encode()), path)
        for memory in [int(m) for m in args.memory.split(",")]:
            ws = copy.deepcopy(base)
            set_field(ws, "hardware", "memory", memory)      # hardware may differ from the repository's
            log(f"{memory} MiB: through the grid")
            grid = grid_migration(site, image, ws, memory, nodes)
            print(f"{memory} MiB through the grid: total {grid['total']:.2f} s, downtime {grid['downtime']:.2f} s; "
                  + " ".join(f"{n}={s:.3f}" for n, s in grid["phases"]) + f"; guest: {grid['guest']}", flush=True)
            log(f"{memory} MiB: the bare steps")
            if bare_src is None:
                from services.vmmanager.vmm import LibvirtQemuDriver
                bare_src = LibvirtQemuDriver(root=root / "bare-a")
            bare = bare_migration(image, bare_src, root / f"bare{memory}", memory)
            rows.append([f"{memory} MiB", f"{grid['downtime']:.2f} s", f"{grid['total']:.2f} s",
                         f"{bare['total']:.2f} s (save {bare['save']:.2f}, cp {bare['copy']:.2f}, "
                         f"restore {bare['restore']:.2f})", f"{grid['downtime'] / bare['total']:.2f}x",
                         f"{bare['state_bytes'] / 2**20:.0f} MiB", grid["state"]])
    except BenchError as exc:
        print(f"bench_migrate: {exc}", file=sys.stderr)
        return 1
    finally:
        site.stop()
        if bare_src is not None:
            bare_src.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(["guest", "downtime (grid)", "total (grid)", "bare save+cp+restore", "downtime / bare", "saved state",
           "state after"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
