"""Cold migration of a real guest between two VMManager nodes on loopback, beside the bare steps.

    .venv/bin/python bench/bench_migrate.py [--memory 256,512] [--keep]
    .venv/bin/python bench/bench_migrate.py --wan [--delay-ms 25] [--rate 1gbit] [--wan-prefix vmr]

For each memory size: a real guest (the project's guest image, QEMU software emulation) is deployed on
node A and migrated to node B through the grid (delegated proxy, GridFTP pull of the overlay and the
saved state, restore, resume, guestd fix-up). Downtime is the time the guest does not run: freeze to
resume on the target (the phases freeze, transfer, restore, resume; prepare runs before the freeze), and the
same read from the two nodes' logs (which counts the node-to-node calls between the phases too); total is the
Migrate call as the client sees it.
The peer, in the same run: the same save -> copy -> restore done by hand through the VMM interface
(one qemu:///embed root per side, in this process, no grid): save, cp of the overlay and the state
file, restore on the other root. Figures are printed with their ratio to the peer; nothing is asserted.

``--wan``: the same migration across ../shared/tools/wan.sh's emulated link (default 1 Gbit/s, 25 ms each
way: 50 ms RTT): the central container and node A in the ``<prefix>srv`` namespace, node B in
``<prefix>cli``, the client in ``srv``. Its peer is the issue's bound: saved-state bytes / link rate plus
the bare save and restore measured on loopback in the same run. Needs root (namespaces, qemu:///embed).
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

from bench_vmmanager import GUEST_DESCRIPTOR, Site, clients, free_port, rate_bps, register  # noqa: E402
from benchgrid import BenchError, loadavg, log, stop_process, table  # noqa: E402

HELPER = Path(__file__).resolve().parents[1] / "tests" / "vm" / "node_helper.py"
DOWNTIME = ("freeze", "transfer", "restore", "resume")   # frozen .. runs again (prepare is before the freeze)


def patient(vmm):
    """A deploy that waits for the guest (a boot under TCG) can outlast the client's default 120 s on a loaded machine."""
    vmm.service.zeep.transport.operation_timeout = 900
    return vmm


def grid_migration(site: Site, image, ws, memory: int, nodes) -> dict:
    _, a = clients(site, nodes[0], site.pki.alice)
    _, b = clients(site, nodes[1], site.pki.alice)
    return migrate_once(patient(a), patient(b), ws, memory, nodes[1].url("VMManagerService"))


def cache_on(b, ws) -> None:
    """Stage the image on node B once (a paused deploy, destroyed): the migrations then find the base image in
    B's cache, as on a site whose nodes hold its images; only the overlay and the saved state move."""
    info = b.deploy(ws, "cache-warmup", 600, paused=True, wait=True)
    b.destroy(info.ref)


def migrate_once(a, b, ws, memory: int, target_url: str) -> dict:
    info = a.deploy(ws, f"mig-{memory}", 3600, wait=True)
    t = time.perf_counter()
    moved = a.migrate(info.ref, target_url)
    total = time.perf_counter() - t
    status = b.status(moved.ref)
    b.destroy(moved.ref)
    phases = dict(moved.phases)
    return {"total": total, "downtime": sum(phases.get(p, 0.0) for p in DOWNTIME), "phases": moved.phases,
            "state": status.state, "guest": status.guest_status, "key": moved.ref.key}


_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO vmgrid\.\S+ instance %s: "


def logged_downtime(root: Path, key: str, fixup: float) -> float | None:
    """The downtime from the nodes' logs (both nodes on this host, one clock): from the start of the source's save
    (its freeze line's time less the save and the hash) to the target's resume (its ``Incoming -> Running`` line
    less the fixup phase, which runs between the two). Unlike the sum of the phases it counts the node-to-node
    calls between them (the transfer step reaching the target, the commit: its authorization and slot claim)."""
    import re
    from datetime import datetime
    text = "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("node-*.log")))

    def at(pattern: str):
        m = re.search(_STAMP % re.escape(key) + pattern, text)
        return (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m) if m else (None, None)
    frozen, m = at(r"freeze phase: save ([0-9.]+) s, BLAKE3 of \d+ bytes ([0-9.]+) s")
    resumed, _ = at(r"Incoming -> Running")
    if frozen is None or resumed is None:
        return None
    return (resumed - fixup) - (frozen - float(m.group(2)) - float(m.group(3)))


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


def wan_client(spec_path: str) -> int:
    """Runs in the source's namespace: registers the image (as the admin), then per memory size deploys on
    node A and migrates to node B (as alice). Writes the figures as JSON."""
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from security.pki import load_credential
    from security.trust import TrustStore
    from services.descriptor import set_field

    spec = json.loads(Path(spec_path).read_text())
    trust = TrustStore(spec["cert_dir"])
    admin, alice = load_credential(proxy=spec["admin_proxy"]), load_credential(proxy=spec["alice_proxy"])
    from lxml import etree
    repo = RepositoryClient(GridServiceClient(spec["repo_url"], admin, trust))
    base = repo.register(etree.fromstring(spec["descriptor"].encode()), local_path=spec["image"])
    a = patient(VMManagerClient(GridServiceClient(spec["node_a"], alice, trust)))
    b = patient(VMManagerClient(GridServiceClient(spec["node_b"], alice, trust)))
    out = {}
    cache_on(b, base)
    for memory in spec["memory"]:
        ws = copy.deepcopy(base)
        set_field(ws, "hardware", "memory", memory)
        log(f"wan: {memory} MiB through the grid")
        out[str(memory)] = migrate_once(a, b, ws, memory, spec["node_b"])
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def wan_grid(root: Path, pki, image, virtual: int, memories: list[int], args) -> dict:
    """The grid part across the emulated WAN (see the module's docstring)."""
    from benchgrid import Wan
    from services.descriptor import parse_descriptor
    from lxml import etree

    wan = Wan(prefix=args.wan_prefix, delay_ms=args.delay_ms, rate=args.rate)
    site = Site(root / "wan", pki)
    site.root.mkdir()
    try:
        log(f"wan: up (prefix {wan.prefix}, one-way delay {wan.delay_ms} ms, rate {wan.rate})")
        wan.up()
        log(f"wan: {wan.shaping}")
        hosts = site.root / "hosts"
        srv = pki.ca.issue_host(wan.srv_name, ou="vmgrid", alt_names=[wan.srv_ip], out_dir=hosts / wan.srv_name)
        cli = pki.ca.issue_host(wan.cli_name, ou="vmgrid", alt_names=[wan.cli_ip], out_dir=hosts / wan.cli_name)
        ingest = site.root / "ingest"
        ingest.mkdir()
        path = ingest / "vmgrid-guest.qcow2"
        shutil.copyfile(image.rootfs, path)
        env = {"P": wan.prefix}
        site.start_central(host=wan.srv_ip, public=wan.srv_name, port=8443, cert=srv.cert_path, key=srv.key_path,
                           ingest=ingest, wrap=wan.command("srv", []), env=env)
        nodes = []
        for n, (side, ip, name, cred, port) in enumerate((("srv", wan.srv_ip, wan.srv_name, srv, 8444),
                                                          ("cli", wan.cli_ip, wan.cli_name, cli, 8443))):
            nodes.append(site.start_node(
                f"node-{n}", host=ip, public=name, port=port, cert=cred.cert_path, key=cred.key_path,
                state=site.root / f"n{n}", wrap=wan.command(side, []), env=env,
                vmmanager={"vmm": "qemu", "vmm_root": str(site.root / f"q{n}"), "kernel": str(image.kernel),
                           "initrd": str(image.initrd), "cmdline": image.cmdline, "guest_ready_timeout": 900.0,
                           "migration_sources": [wan.srv_name],
                           "lease_range": ["10.99.0.10-10.99.0.90", "10.99.0.100-10.99.0.180"][n]}))
        descriptor = parse_descriptor(GUEST_DESCRIPTOR.format(memory=256, vcpus=1, size=virtual, kernel=image.kernel_version,
                                                              cmdline=image.cmdline).encode())
        spec = {"cert_dir": str(pki.cert_dir), "admin_proxy": str(pki.admin.proxy_path),
                "alice_proxy": str(pki.alice.proxy_path), "repo_url": site.repo_url,
                "node_a": nodes[0].url("VMManagerService"), "node_b": nodes[1].url("VMManagerService"),
                "image": str(path), "descriptor": etree.tostring(descriptor).decode(), "memory": memories,
                "out": str(site.root / "client.json")}
        spec_path = site.root / "client-spec.json"
        spec_path.write_text(json.dumps(spec))
        client = subprocess.Popen(wan.command("srv", [sys.executable, str(Path(__file__).resolve()), "_wan-client",
                                                      str(spec_path)]),
                                  env={**os.environ, **env}, start_new_session=True)
        try:
            rc = client.wait(3600)
        finally:
            stop_process(client)
        if rc != 0:
            raise BenchError(f"the WAN client failed ({rc}); logs in {site.root}")
        return {"runs": json.loads((site.root / "client.json").read_text()), "shaping": wan.shaping,
                "rate_bps": rate_bps(wan.rate)}
    finally:
        site.stop()
        wan.down()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_wan-client":
        return wan_client(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="256,512", help="guest memory sizes in MiB, comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--wan", action="store_true", help="migrate across the emulated WAN (wan.sh) instead of loopback")
    ap.add_argument("--delay-ms", type=int, default=25, help="--wan: one-way delay (RTT = 2x)")
    ap.add_argument("--rate", default="1gbit", help="--wan: link rate (tc units)")
    ap.add_argument("--wan-prefix", default="vmr", help="--wan: prefix of the namespaces this bench makes")
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
                                            "guest_ready_timeout": 900.0, "migration_sources": ["localhost"],
                                            "consumers_allow": ["127.0.0.0/8"],
                                            "lease_range": ["10.99.0.10-10.99.0.90", "10.99.0.100-10.99.0.180"][n]})
                 for n in (0, 1)]
        base = register(site, parse_descriptor(GUEST_DESCRIPTOR.format(
            memory=256, vcpus=1, size=virtual, kernel=image.kernel_version, cmdline=image.cmdline).encode()), path)
        memories = [int(m) for m in args.memory.split(",")]
        wan = None
        if args.wan:
            site.stop()     # the loopback grid is not used: the WAN grid has its own (its nodes embed QEMU too)
            wan = wan_grid(root, pki, image, virtual, memories, args)
            print(f"emulated WAN: {wan['shaping']}", flush=True)
        else:
            _, b = clients(site, nodes[1], site.pki.alice)
            cache_on(patient(b), base)
        for memory in memories:
            if wan is None:
                ws = copy.deepcopy(base)
                set_field(ws, "hardware", "memory", memory)      # hardware may differ from the repository's
                log(f"{memory} MiB: through the grid")
                grid = grid_migration(site, image, ws, memory, nodes)
            else:
                grid = wan["runs"][str(memory)]
            seen = logged_downtime(root, grid["key"], dict(grid["phases"]).get("fixup", 0.0))
            print(f"{memory} MiB through the grid: total {grid['total']:.2f} s, downtime {grid['downtime']:.2f} s "
                  f"(from the nodes' logs: {'?' if seen is None else f'{seen:.2f} s'}); "
                  + " ".join(f"{n}={s:.3f}" for n, s in grid["phases"]) + f"; guest: {grid['guest']}; {loadavg()}",
                  flush=True)
            log(f"{memory} MiB: the bare steps")
            if bare_src is None:
                from services.vmmanager.vmm import LibvirtQemuDriver
                bare_src = LibvirtQemuDriver(root=root / "bare-a")
            bare = bare_migration(image, bare_src, root / f"bare{memory}", memory)
            print(f"{memory} MiB bare: save {bare['save']:.2f} s, cp {bare['copy']:.2f} s, restore "
                  f"{bare['restore']:.2f} s; {loadavg()}", flush=True)
            if wan is None:
                peer, label = bare["total"], (f"{bare['total']:.2f} s (save {bare['save']:.2f}, cp {bare['copy']:.2f}, "
                                              f"restore {bare['restore']:.2f})")
            else:
                wire = bare["state_bytes"] * 8 / wan["rate_bps"]
                peer = wire + bare["save"] + bare["restore"]
                label = (f"{peer:.2f} s (state/link {wire:.2f}, save {bare['save']:.2f}, "
                         f"restore {bare['restore']:.2f})")
            rows.append([f"{memory} MiB", f"{grid['downtime']:.2f} s", f"{grid['total']:.2f} s", label,
                         f"{grid['downtime'] / peer:.2f}x",
                         "?" if seen is None else f"{seen:.2f} s ({seen / peer:.2f}x)",
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
    peer = "state/link + bare save + restore" if args.wan else "bare save+cp+restore"
    print(table(["guest", "downtime (grid)", "total (grid)", peer, "downtime / peer", "downtime, nodes' logs",
           "saved state", "state after"], rows))
    print(f"load at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
