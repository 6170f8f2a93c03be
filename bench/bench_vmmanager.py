"""VMManager deployment figures (issue 6), each against a peer measured in the same run.

    sudo .venv/bin/python bench/bench_vmmanager.py [--only warm,qemu,wan] [--deploys 40] [--clients 10]
        [--cycles 8] [--image-mib 1024] [--delay-ms 25] [--rate 100mbit] [--qemu-boots 3] [--qemu-warm 5]
    [--qemu-clones 10] [--qemu-vcpus 1] [--qemu-warm-poll 0.02] [--no-raw-gridftp]

1. warm: libvirt's test driver, the image already in the node's cache. Deploy(wait=true) -> Running as one
   client sees it (p50/p95, phases), and deploys per second with --clients concurrent client processes, each
   deploying and destroying --cycles times. Peers: one signed, authorized SOAP call to the same node
   (ListInstances) and the test driver's own define + start in-process (no grid at all).
2. qemu: a real guest (the project's guest image, guestd.image.build) registered in the repository as a qcow2
   booted by the node's kernel; Deploy -> domain started -> guestd ready (= Running), first with the image
   staged over GridFTP on loopback, then from the cache. Poster anchor printed beside: 2 GB in 6 min 23 s.
   Then (issue 13) the same image registered with <boot warmStart="true">: one cold deploy, after which the
   node makes the image's warm snapshot, then --qemu-warm deploys restoring it, against the cold deploys
   and the plain QEMU boots of the same run, and --qemu-clones instances from the one snapshot at once.
3. wan: a cold deploy of a --image-mib qcow2 (random data: that many MiB allocated) over wan.sh's emulated
   link (--rate, --delay-ms one way): Authorization + VMRepository (with its GridFTP server) in one
   namespace, the VMManager node and the client in the other. Peer: the wire time of the same bytes, plain
   TCP (sendfile, as many streams as the node stages with) over the same link, just before; and the
   GridFTP download alone (the node's staging without the VMManager).

Services run as `vmgrid serve` processes from TOML configurations, TLS and WS-Security on, authorization
through the Authorization service, host certificates issued for the names the services are reached by.
Every process and the namespaces are removed at the end, also on failure or Ctrl-C. Needs root for the
qemu and wan parts.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchgrid import (REPO, WIRE_SCRIPT, BenchError, DeployRun, ServiceProcess, Wan, bench_policy, fmt_s, loadavg,  # noqa: E402
                       log, machine_cpu, p50, percentile, phase_table, process_cpu, security_section, serve,
                       stop_process, table)
from lxml import etree  # noqa: E402

POSTER_BYTES = 2 * 10**9          # the poster's "2 GB image"
POSTER_SECONDS = 6 * 60 + 23      # "deployed in 6 min 23 s"
LIFETIME = 3600
LEASES = "10.99.0.10-10.99.0.250"
PARALLEL = 4                      # GridFTP streams the node stages with ([vmmanager] staging_parallel default)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the grid -----------------------------------------------------------------------------------------------
@dataclass
class Site:
    """The processes of one benchmark grid: the central container (Authorization + VMRepository with its
    GridFTP server) and VMManager nodes."""

    root: Path
    pki: object
    processes: list[ServiceProcess] = field(default_factory=list)
    central: ServiceProcess | None = None
    authz_url: str = ""
    repo_url: str = ""

    def start_central(self, *, host: str, public: str, port: int, cert: Path, key: Path, ingest: Path,
                      wrap=(), env=None, instances: int = 1000) -> ServiceProcess:
        policy = self.root / "policy.toml"
        policy.write_text(bench_policy(self.pki, instances))
        base = f"https://{public}:{port}/wsrf/services"
        self.authz_url, self.repo_url = f"{base}/AuthorizationService", f"{base}/VMRepositoryService"
        config = {
            # authz + repository in one container: a repository call holds a thread while it asks the
            # Authorization service in the same pool (docs/authz.md), so more threads than concurrent calls
            "container": {"host": host, "port": port, "state_dir": str(self.root / "central"), "tls": True,
                          "threads": 64},
            "security": security_section(self.pki.cert_dir, cert, key),
            "authz": {"policy": str(policy)},
            "enforcement": {"authz_url": self.authz_url},
            "repository": {"ingest_dirs": [str(ingest)], "gridftp_port": 0, "gridftp_public_host": public},
        }
        self.central = serve("central", ["authz", "repository"], config, self.root, wrap=wrap, env=env,
                             public_host=public)
        self.processes.append(self.central)
        return self.central

    def start_node(self, name: str, *, host: str, public: str, port: int, cert: Path, key: Path, state: Path,
                   vmmanager: dict, wrap=(), env=None) -> ServiceProcess:
        config = {
            "container": {"host": host, "port": port, "state_dir": str(state), "tls": True},
            "security": security_section(self.pki.cert_dir, cert, key),
            "enforcement": {"authz_url": self.authz_url},
            "vmmanager": {"node": name, "repository": self.repo_url, "lease_range": LEASES, **vmmanager},
        }
        node = serve(name, ["vmmanager"], config, self.root, wrap=wrap, env=env, public_host=public)
        self.processes.append(node)
        return node

    def stop(self) -> None:
        for sp in reversed(self.processes):
            stop_process(sp.process)
        self.processes.clear()


def clients(site: Site, node: ServiceProcess, user):
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient

    trust = site.pki.trust()
    return (RepositoryClient(GridServiceClient(site.repo_url, user.proxy, trust)),
            VMManagerClient(GridServiceClient(node.url("VMManagerService"), user.proxy, trust)))


def register(site: Site, descriptor: etree._Element, path: Path) -> etree._Element:
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient

    admin = RepositoryClient(GridServiceClient(site.repo_url, site.pki.admin.proxy, site.pki.trust()))
    return admin.register(descriptor, local_path=str(path))


def example_descriptor(name: str) -> etree._Element:
    from services.descriptor import parse_descriptor, set_field
    from tests.fixtures.repository import EXAMPLES

    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    return ws


def make_random_qcow2(path: Path, mib: int, virtual_mib: int | None = None) -> Path:
    """A qcow2 image with ``mib`` MiB of random data allocated (so it is not small on the wire), of virtual
    size ``virtual_mib`` (default twice that)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.truncate((virtual_mib or 2 * mib) << 20)
    try:
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(path)], check=True)
    finally:
        raw.unlink(missing_ok=True)
    return path


def deploy_wait(vmm, ws, identifier: str) -> tuple[DeployRun, object]:
    t = time.perf_counter()
    info = vmm.deploy(ws, identifier, LIFETIME, wait=True)
    wall = time.perf_counter() - t
    if info.state != "Running":
        raise BenchError(f"deploy {identifier} ended {info.state}: {info.failure}")
    return DeployRun(wall, info.phases), info


def deploy_watch(vmm, ws, identifier: str, interval: float = 0.25, timeout: float = 3600) -> tuple[DeployRun, object]:
    """Deploy without waiting and poll the instance until it runs (for deployments longer than a SOAP
    call's timeout); the wall time is accurate to the poll interval plus one round trip."""
    t = time.perf_counter()
    info = vmm.deploy(ws, identifier, LIFETIME)
    info = vmm.wait_for(info.ref, ("Running",), timeout=timeout, interval=interval)
    wall = time.perf_counter() - t
    if info.state != "Running":
        raise BenchError(f"deploy {identifier} ended {info.state}: {info.failure}")
    return DeployRun(wall, info.phases), info


# -- 1. warm deploys on the test driver ----------------------------------------------------------------
def _deploy_worker(url: str, cert_dir: str, proxy: str, ws_xml: bytes, index: int, cycles: int, barrier, out) -> None:
    """One concurrent client (its own process): deploy and destroy ``cycles`` times after the barrier."""
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from security.pki import load_credential
    from security.trust import TrustStore

    try:
        vmm = VMManagerClient(GridServiceClient(url, load_credential(proxy=proxy), TrustStore(cert_dir)))
        ws = etree.fromstring(ws_xml)
        vmm.list()                               # WSDL loaded, TLS session up
        barrier.wait(120)
        start = time.monotonic()
        runs = []
        for i in range(cycles):
            run, info = deploy_wait(vmm, ws, f"c{index}-{i}")
            vmm.destroy(info.ref)
            runs.append(run.to_json())
        out.put({"start": start, "end": time.monotonic(), "runs": runs})
    except BaseException as exc:  # reported by the parent
        out.put({"error": f"client {index}: {type(exc).__name__}: {exc}"})


def concurrent_deploys(url: str, pki, ws: etree._Element, clients_n: int, cycles: int, pids: dict[str, int]) -> dict:
    """``clients_n`` client processes deploying and destroying at once; also the CPU seconds the service
    processes (``pids``) and the whole machine used from the start barrier to the last client's end."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients_n + 1)         # this process too: it starts the CPU clock
    out = ctx.Queue()
    procs = [ctx.Process(target=_deploy_worker, args=(url, str(pki.cert_dir), str(pki.alice.proxy_path),
                                                      etree.tostring(ws), i, cycles, barrier, out), daemon=True)
             for i in range(clients_n)]
    for p in procs:
        p.start()
    try:
        barrier.wait(300)
        cpu = {name: -process_cpu(pid) for name, pid in pids.items()}
        cpu["machine"] = -machine_cpu()
        results = [out.get(timeout=600) for _ in procs]
        for name, pid in pids.items():
            cpu[name] += process_cpu(pid)
        cpu["machine"] += machine_cpu()
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise BenchError("; ".join(errors))
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    runs = [DeployRun.from_json(x) for r in results for x in r["runs"]]
    return {"window": window, "runs": runs, "rate": len(runs) / window, "cpu": cpu}


def bare_test_driver(n: int) -> list[float]:
    """The peer without any grid: libvirt's test driver define + start of an equivalent spec, in-process."""
    from services.vmmanager.vmm import Disk, InstanceSpec, LibvirtTestDriver, Nic

    node = LibvirtTestDriver.private_node()
    samples = []
    try:
        for i in range(n):
            spec = InstanceSpec(name=f"bare-{i}", memory_mib=512, disks=(Disk(Path(f"/tmp/bare-{i}.qcow2")),),
                                cdroms=(Path(f"/tmp/bare-{i}.iso"),), nics=(Nic("52:54:00:00:10:%02x" % (i % 256)),))
            t = time.perf_counter()
            node.define(spec)
            node.start(spec.name)
            samples.append(time.perf_counter() - t)
            node.destroy(spec.name)
            node.undefine(spec.name)
    finally:
        node.close()
    return samples


def warm_section(site: Site, args) -> dict:
    log("warm: starting the central container and a test-driver node on loopback")
    pki = site.pki
    ingest = site.root / "ingest"
    ingest.mkdir(exist_ok=True)
    port = free_port()
    site.start_central(host="127.0.0.1", public="localhost", port=port, cert=pki.host_cert_path,
                       key=pki.host_key_path, ingest=ingest)
    node = site.start_node("node-test", host="127.0.0.1", public="localhost", port=free_port(),
                           cert=pki.host_cert_path, key=pki.host_key_path, state=site.root / "node-test",
                           vmmanager={"vmm": "test"})
    from guestd.image.sample import make_sample_image

    image = make_sample_image(ingest / "warm.qcow2", 64, data=os.urandom(4 << 20))
    ws = register(site, example_descriptor("bench-warm"), image)
    _, vmm = clients(site, node, pki.alice)
    first, info = deploy_wait(vmm, ws, "first")        # stages the image (64 MiB virtual, 4 MiB data) on loopback
    vmm.destroy(info.ref)
    log(f"warm: {args.deploys} sequential deploys")
    runs, destroys = [], []
    for i in range(args.deploys):
        run, info = deploy_wait(vmm, ws, f"warm-{i}")
        runs.append(run)
        t = time.perf_counter()
        vmm.destroy(info.ref)
        destroys.append(time.perf_counter() - t)
    lists = []
    for _ in range(args.deploys):
        t = time.perf_counter()
        vmm.list()
        lists.append(time.perf_counter() - t)
    bare = bare_test_driver(args.deploys)
    log(f"warm: {args.clients} concurrent clients x {args.cycles} deploy+destroy cycles")
    conc = concurrent_deploys(node.url("VMManagerService"), pki, ws, args.clients, args.cycles,
                              {"node": node.process.pid, "central": site.central.process.pid})
    walls = [r.wall for r in runs]
    seq_rate = len(runs) / (sum(walls) + sum(destroys))
    return {"first": first, "runs": runs, "walls": walls, "destroys": destroys, "lists": lists, "bare": bare,
            "concurrent": conc, "seq_rate": seq_rate, "ws": ws}


def print_warm(w: dict, args) -> list[str]:
    walls, conc = w["walls"], w["concurrent"]
    cw = [r.wall for r in conc["runs"]]
    rows = [
        ("Deploy(wait) -> Running, 1 client", fmt_s(p50(walls)), fmt_s(percentile(walls, 95)), len(walls)),
        ("Destroy, 1 client", fmt_s(p50(w["destroys"])), fmt_s(percentile(w["destroys"], 95)), len(w["destroys"])),
        (f"Deploy(wait) -> Running, {args.clients} clients", fmt_s(p50(cw)), fmt_s(percentile(cw, 95)), len(cw)),
        ("peer: ListInstances (signed + authorized)", fmt_s(p50(w["lists"])), fmt_s(percentile(w["lists"], 95)),
         len(w["lists"])),
        ("peer: test driver define+start, in-process", fmt_s(p50(w["bare"])), fmt_s(percentile(w["bare"], 95)),
         len(w["bare"])),
        ("first deploy (image staged, 64 MiB qcow2)", fmt_s(w["first"].wall), "", 1),
    ]
    print("\n== 1. warm deploy, libvirt test driver, image cached on the node ==")
    print(table(("", "p50", "p95", "n"), rows))
    print(f"deploys/s, 1 client (deploy + destroy in turn):         {w['seq_rate']:6.1f}")
    print(f"deploys/s, {args.clients} concurrent clients x {args.cycles} (deploy + destroy): "
          f"{conc['rate']:6.1f}  ({len(cw)} deploys in {conc['window']:.2f} s)  "
          f"{conc['rate'] / w['seq_rate']:.2f}x one client")
    cpu = conc["cpu"]
    rest = cpu["machine"] - cpu["node"] - cpu["central"]
    print(f"CPU seconds in the concurrent run ({conc['window']:.2f} s x {os.cpu_count()} cores = "
          f"{conc['window'] * (os.cpu_count() or 1):.1f} available): node {cpu['node']:.1f}, central "
          f"(authz + repository) {cpu['central']:.1f}, clients and the rest {rest:.1f}; machine busy "
          f"{cpu['machine']:.1f}")
    print(f"warm p50 / ListInstances p50: {p50(walls) / p50(w['lists']):.1f}x;  "
          f"warm p50 / bare define+start p50: {p50(walls) / p50(w['bare']):.0f}x")
    print()
    print(phase_table("phases, warm, 1 client", w["runs"]))
    print(phase_table(f"phases, warm, {args.clients} concurrent clients", conc["runs"]))
    ok = p50(walls) <= 1.0
    return [f"warm deploy p50 {fmt_s(p50(walls))} (goal <= 1 s): {'MET' if ok else 'NOT MET'}"]


# -- 2. a real guest on QEMU -------------------------------------------------------------------------------
GUEST_DESCRIPTOR = """<?xml version="1.0" encoding="UTF-8"?>
<workspace xmlns="http://vmgrid.org/ns/workspace/1">
  <identity><name>vmgrid-guest</name><version>1.0</version><vo>bio</vo>
    <description>vmgrid's real guest: Debian 12 minbase with python3 and guestd</description></identity>
  <hardware>
    <architecture>x86_64</architecture><vcpus>{vcpus}</vcpus><memory>{memory}</memory>
    <disk><role>root</role><size>{size}</size><format>qcow2</format><bus>virtio</bus><target>vda</target></disk>
    <cdrom><bus>ide</bus><purpose>context</purpose></cdrom>
    <serialPort><type>file</type><purpose>console</purpose></serialPort>
    <nic><model>virtio</model></nic>
  </hardware>
  <software>
    <os>linux</os>
    <distribution><name>debian</name><version>12</version></distribution>
    <kernel><version>{kernel}</version></kernel>
    <boot><method>kernel</method><cmdline>{cmdline}</cmdline></boot>
  </software>
  <image><format>qcow2</format></image>
  <container><command>python3 -m http.server 8443</command><port>8443</port></container>
</workspace>
"""


def fmt_n(key: str, value: float) -> str:
    """A figure of guestd's recontext_seconds: seconds, but for the counts among them (``wake.hups``)."""
    return f"{value:g}" if key.endswith("hups") else fmt_s(value)


def qemu_section(site: Site, args) -> dict:
    from guestd.image.build import build
    from services.descriptor import parse_descriptor
    from services.vmmanager.vmm import qemu_user_missing

    if os.geteuid() != 0:
        raise BenchError("the QEMU part needs root")
    if qemu_user_missing():
        raise BenchError("create the libvirt-qemu user first (docs/vmm.md), e.g. ./run.sh setup")
    if site.central is None:
        raise BenchError("the QEMU part runs on the warm part's central container")
    log("qemu: guest image (built on first use, about a minute)")
    image = build(log=log)
    ingest = site.root / "ingest"
    path = ingest / "vmgrid-guest.qcow2"
    shutil.copyfile(image.rootfs, path)
    virtual = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                        capture_output=True, text=True).stdout)["virtual-size"]
    ws = parse_descriptor(GUEST_DESCRIPTOR.format(memory=args.qemu_memory, vcpus=args.qemu_vcpus, size=virtual, kernel=image.kernel_version,
                                                  cmdline=image.cmdline).encode())
    ws = register(site, ws, path)
    pki = site.pki
    node = site.start_node("node-qemu", host="127.0.0.1", public="localhost", port=free_port(),
                           cert=pki.host_cert_path, key=pki.host_key_path, state=site.root / "qn",
                           vmmanager={"vmm": "qemu", "vmm_root": str(site.root / "q"), "kernel": str(image.kernel),
                                      "initrd": str(image.initrd), "cmdline": image.cmdline,
                                      "guest_ready_timeout": 300.0})
    _, vmm = clients(site, node, pki.alice)
    boots = []
    try:
        for i in range(args.qemu_boots):
            log(f"qemu: deploy {i + 1}/{args.qemu_boots} ({'image staged over GridFTP' if i == 0 else 'cached'})")
            run, info = deploy_watch(vmm, ws, f"guest-{i}", interval=0.1)
            boots.append({"run": run, "guest": info.guest_status, "cached": info.staged[2]})
            vmm.destroy(info.ref)
    finally:                       # a guest left by a failure: QEMU must not outlive the benchmark
        for inst in vmm.list():
            try:
                vmm.destroy(inst.ref)
            except Exception as exc:  # noqa: BLE001 - best effort; the node stops next
                log(f"qemu: could not destroy {inst.identifier}: {exc}")
    log(f"qemu: the peer, {args.qemu_boots} boots of the same image on the VMM alone (no grid)")
    bare = bare_qemu_boots(image, site.root / "bq", args.qemu_boots, args.qemu_memory, args.qemu_vcpus)
    warm = None
    if args.qemu_warm:
        text = GUEST_DESCRIPTOR.format(memory=args.qemu_memory, vcpus=args.qemu_vcpus, size=virtual, kernel=image.kernel_version,
                                       cmdline=image.cmdline)
        text = text.replace("<boot>", '<boot warmStart="true">', 1).replace(
            "<name>vmgrid-guest</name>", "<name>vmgrid-guest-warm</name>", 1)
        warm = warm_snapshot_deploys(site, node, vmm, register(site, parse_descriptor(text.encode()), path), args)
    return {"boots": boots, "bare": bare, "bytes": path.stat().st_size, "memory": args.qemu_memory, "vcpus": args.qemu_vcpus,
            "warm": warm}


def warm_snapshot_deploys(site: Site, node, vmm, wws, args) -> dict:
    """The same image registered again with <boot warmStart="true">: its first deploy boots (and the node
    then makes its warm snapshot), the next ones restore a clone of the snapshot; then --qemu-clones
    instances from the one snapshot live at once on the node, each with its own identity."""
    log("qemu/warm: first deploy of the warm-startable image (cold; the node then makes its snapshot)")
    run, info = deploy_watch(vmm, wws, "warm-0", interval=0.1)
    vmm.destroy(info.ref)
    t = time.perf_counter()
    meta = list((site.root / "qn" / "vmmanager" / "warm").glob("*/meta.json"))
    while not meta:
        if time.perf_counter() - t > 600:
            raise BenchError("the node made no warm snapshot within 600 s")
        time.sleep(0.2)
        meta = list((site.root / "qn" / "vmmanager" / "warm").glob("*/meta.json"))
    made = time.perf_counter() - t
    runs, polled = [], []
    for i in range(args.qemu_warm):
        # Deploy(wait=true): the call returns when the instance is Running. Polling its state meanwhile (as
        # the cold deploys do) is a signed SOAP call every few ms in the node and this process, CPU and the
        # node's GIL taken from the restore being measured; --qemu-warm-poll adds polled deploys beside them
        log(f"qemu/warm: deploy {i + 1}/{args.qemu_warm} from the warm snapshot")
        r, inf = deploy_wait(vmm, wws, f"warm-{i + 1}")
        runs.append({"run": r, "guest": inf.guest_status})
        vmm.destroy(inf.ref)
        if args.qemu_warm_poll:
            r, inf = deploy_watch(vmm, wws, f"warm-p{i + 1}", interval=args.qemu_warm_poll)
            polled.append({"run": r, "guest": inf.guest_status})
            vmm.destroy(inf.ref)
    clones = []
    try:
        log(f"qemu/warm: {args.qemu_clones} instances from the one snapshot, alive together")
        for i in range(args.qemu_clones):
            r, inf = deploy_watch(vmm, wws, f"clone-{i}", interval=0.02)
            clones.append({"run": r, "ref": inf.ref, "address": inf.address, "mac": inf.mac,
                           "guest": inf.guest_status})
        running = {i.identifier: i for i in vmm.list() if i.state == "Running"}
    finally:
        for c in clones:
            try:
                vmm.destroy(c["ref"])
            except Exception as exc:  # noqa: BLE001 - best effort; the node stops next
                log(f"qemu/warm: could not destroy {c['ref']}: {exc}")
    text = node.log.read_text()
    split = [tuple(float(x) for x in m) for m in re.findall(r"warm clone restored in ([0-9.]+) s(?: \([^)]*\))?, "
                                                            r"guestd took its identity in ([0-9.]+) s", text)]
    guest = []          # guestd's own seconds per recontext step, as the node logged them
    for m in re.findall(r"guestd took its identity in [0-9.]+ s \(([^;]*); in the guest: (\{[^}]*\})\)", text):
        try:
            guest.append((m[0], ast.literal_eval(m[1])))
        except (ValueError, SyntaxError):
            pass
    state = sorted((site.root / "qn" / "vmmanager" / "warm").glob("*/memory.save"))
    return {"first": run, "snapshot_made": made, "runs": runs, "polled": polled, "poll": args.qemu_warm_poll,
            "clones": clones, "split": split, "guest": guest,
            "state_bytes": state[0].stat().st_size if state else None,
            "clones_running": sum(1 for i in range(len(clones)) if f"clone-{i}" in running)}


def bare_qemu_boots(image, root: Path, n: int, memory: int, vcpus: int = 1) -> list[dict]:
    """The peer: the same guest booted through the VMM interface in this process (its own qemu:///embed
    root), with an overlay, a context CD-ROM and the guest channel, to guestd ready; no grid services."""
    from guestd.image.sample import make_overlay
    from services.vmmanager.context import build_context, write_context_iso
    from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, KernelBoot, LibvirtQemuDriver, Nic, Port

    node = LibvirtQemuDriver(root=root / "root")
    out = []
    try:
        for i in range(n):
            d = root / f"b{i}"
            d.mkdir(parents=True)
            name, mac = f"bare-{i}", "52:54:00:be:01:%02x" % i
            t = time.perf_counter()
            ctx = build_context(instance=name, hostname=name, mac=mac, address="10.99.0.9", netmask="255.255.255.0",
                                gateway="10.99.0.1", container_command=["python3", "-m", "http.server", "8443"])
            write_context_iso(ctx, d / "context.iso")
            spec = InstanceSpec(name=name, memory_mib=memory, vcpus=vcpus, disks=(Disk(make_overlay(image.rootfs, d / "root.qcow2")),),
                                cdroms=(d / "context.iso",), nics=(Nic(mac),),
                                serial_ports=(Port("file", d / "console.log"),),
                                boot=KernelBoot(image.kernel, image.initrd, image.cmdline),
                                channel=GuestChannel(d / "g.sock", ctx.token))
            node.define(spec)
            node.start(name)
            started = time.perf_counter() - t
            node.guest_channel(name).wait_ready(timeout=300)
            out.append({"started": started, "ready": time.perf_counter() - t})
            node.destroy(name)
            node.undefine(name)
    finally:
        for info in node.list_instances():
            for verb in (node.destroy, node.undefine):
                try:
                    verb(info.name)
                except Exception:
                    pass
        node.close()
    return out


def print_qemu(q: dict) -> list[str]:
    print("\n== 2. a real guest on QEMU (software emulation), deploy -> domain started -> guestd ready ==")
    rows = []
    for i, b in enumerate(q["boots"]):
        r = b["run"]
        upto_power = sum(s for n, s in r.phases if n != "guest-ready")
        ready = sum(s for n, s in r.phases if n == "guest-ready")
        stage = sum(s for n, s in r.phases if n == "stage")
        rows.append((f"deploy {i + 1}" + (" (cold: staged)" if i == 0 else " (cached)"), fmt_s(stage),
                     fmt_s(upto_power), fmt_s(ready), fmt_s(r.wall), b["guest"]))
    for i, b in enumerate(q["bare"]):
        rows.append((f"peer: VMM alone, boot {i + 1}" + (" (fresh root)" if i == 0 else ""), "",
                     fmt_s(b["started"]), fmt_s(b["ready"] - b["started"]), fmt_s(b["ready"]), "ready"))
    print(table(("", "stage", "to powered on", "guest-ready", "to Running", "guest status"), rows))
    mib = q["bytes"] / 2**20
    cold = q["boots"][0]["run"].wall
    warm = [b["run"].wall for b in q["boots"][1:]]
    print(f"image: {mib:.0f} MiB qcow2, guest memory {q['memory']} MiB, {q.get('vcpus', 1)} vCPU(s)")
    later = [b["ready"] for b in q["bare"][1:]]
    if warm and later:
        diff = p50(warm) - p50(later)
        print(f"cached deploy / VMM-alone boot (p50, fresh roots excluded): {p50(warm) / p50(later):.2f}x "
              f"({'+' if diff >= 0 else '-'}{fmt_s(abs(diff))}; guest-ready is seen in steps of the guest "
              f"channel's 2 s status poll)")
    print(f"poster (2004): a 2 GB image deployed in 6 min 23 s ({POSTER_SECONDS} s)  |  vmgrid: a {mib:.0f} MiB image "
          f"deployed to guestd-ready in {fmt_s(cold)} cold" + (f", {fmt_s(p50(warm))} cached (p50)" if warm else ""))
    print()
    print(phase_table("phases, QEMU, cold", [q["boots"][0]["run"]]))
    if warm:
        print(phase_table("phases, QEMU, cached", [b["run"] for b in q["boots"][1:]]))
    verdicts = [f"real guest: deploy -> Running (guestd ready) {fmt_s(cold)} cold, "
                + (f"{fmt_s(p50(warm))} cached" if warm else "no cached run")
                + f"; poster anchor 2 GB in {POSTER_SECONDS} s"]
    if q.get("warm"):
        verdicts += print_warm_snapshot(q, warm or [cold], [b["ready"] for b in q["bare"][1:]] or
                                        [b["ready"] for b in q["bare"]])
    return verdicts


def print_warm_snapshot(q: dict, cold: list[float], bare: list[float]) -> list[str]:
    w = q["warm"]
    print(f"\n== 2b. deploy from a warm snapshot ({q['memory']} MiB guest): restore a clone instead of booting ==")
    walls = [r["run"].wall for r in w["runs"]]
    rows = [("cold boot deploy (cached image), p50", fmt_s(p50(cold)), "1.00x", ""),
            ("plain QEMU boot (VMM alone), p50", fmt_s(p50(bare)), f"{p50(bare) / p50(cold):.2f}x", ""),
            (f"warm-snapshot deploy, p50 of {len(walls)}", fmt_s(p50(walls)), f"{p50(walls) / p50(cold):.2f}x",
             w["runs"][0]["guest"] if w["runs"] else "")]
    if w.get("polled"):
        pw = [r["run"].wall for r in w["polled"]]
        rows.append((f"warm-snapshot deploy polled every {w['poll'] * 1000:g} ms, p50 of {len(pw)}", fmt_s(p50(pw)),
                     f"{p50(pw) / p50(cold):.2f}x", ""))
    print(table(("deploy -> Running (guestd ready)", "seconds", "/ cold", "guest status"), rows))
    print(f"first deploy of the warm-startable image (cold) {fmt_s(w['first'].wall)}; snapshot made "
          f"{fmt_s(w['snapshot_made'])} after it")
    print(phase_table("phases, QEMU, warm snapshot", [r["run"] for r in w["runs"]]))
    if w["split"]:
        print(f"restore phase, p50 over {len(w['split'])} clones: libvirt restore of the clone "
              f"{fmt_s(p50([a for a, _ in w['split']]))}, guestd's recontext {fmt_s(p50([b for _, b in w['split']]))}")
    if w.get("guest"):
        steps = sorted({k for _, g in w["guest"] for k in g}, key=lambda k: (k == "total", k))
        early = sum(1 for how, _ in w["guest"] if how.startswith("sent during"))
        print(f"recontext in the guest, p50 over {len(w['guest'])} clones (sent during the restore: {early}): "
              + ", ".join(f"{k} {fmt_n(k, p50([g[k] for _, g in w['guest'] if k in g]))}" for k in steps))
    if w.get("state_bytes"):
        print(f"the snapshot's saved state: {w['state_bytes'] / 2**20:.1f} MiB for the {q['memory']} MiB guest")
    clones = w["clones"]
    addresses = {c["address"] for c in clones}
    macs = {c["mac"] for c in clones}
    print(f"{len(clones)} instances from one snapshot on one node: {w['clones_running']} Running together, "
          f"{len(addresses)} distinct addresses, {len(macs)} distinct MACs, p50 deploy "
          f"{fmt_s(p50([c['run'].wall for c in clones]))} (user-mode NICs: reachability is tested on the bridge "
          f"in tests/vm)")
    ok = p50(walls) <= 1.5 and p50(walls) <= 0.2 * p50(cold)
    return [f"warm-snapshot deploy p50 {fmt_s(p50(walls))} = {p50(walls) / p50(cold):.2f}x cold "
            f"(goal <= 1.5 s and <= 0.20x: {'met' if ok else 'NOT met'}); {len(clones)} clones, "
            f"{len(addresses)} distinct addresses"]


# -- 3. a cold deploy over the emulated WAN ---------------------------------------------------------------
def wire_time(wan: Wan, image: Path, streams: int, root: Path) -> dict:
    """Plain TCP (sendfile -> recv into a buffer) of the image's bytes from the server namespace to the
    node's, over the same emulated link."""
    script = root / "wire.py"
    script.write_text(WIRE_SCRIPT)
    env = {**os.environ, "P": wan.prefix}
    sender = subprocess.Popen(wan.command("srv", [sys.executable, str(script), "send", str(streams), wan.srv_ip,
                                                  "5001", str(image)]),
                              stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        if sender.stdout.readline().strip() != "ready":
            raise BenchError("the TCP sender did not start")
        recv = subprocess.run(wan.command("cli", [sys.executable, str(script), "recv", str(streams), wan.srv_ip,
                                                  "5001"]), capture_output=True, text=True, env=env, timeout=3600)
        if recv.returncode != 0:
            raise BenchError(f"TCP receiver failed: {recv.stderr[-1500:]}")
        return json.loads(recv.stdout.strip().splitlines()[-1])
    finally:
        stop_process(sender)


def wan_client(spec_path: str) -> int:
    """Runs inside the node's namespace: registers the image (as the admin), fetches it once with GridFTP
    alone, then deploys it cold and a few times warm (as alice). Writes the figures as JSON."""
    import gridftp
    from client.repository import NS as REPO_NS
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from security.pki import load_credential
    from security.trust import TrustStore
    from services.descriptor import Descriptor

    spec = json.loads(Path(spec_path).read_text())
    trust = TrustStore(spec["cert_dir"])
    admin, alice = load_credential(proxy=spec["admin_proxy"]), load_credential(proxy=spec["alice_proxy"])
    out: dict = {}
    t = time.perf_counter()
    admin_repo = RepositoryClient(GridServiceClient(spec["repo_url"], admin, trust))
    ws = admin_repo.register(etree.fromstring(spec["descriptor"].encode()), local_path=spec["image"])
    out["register_s"] = time.perf_counter() - t
    d = Descriptor(ws)
    out["size"] = d.size
    if spec["raw_gridftp"]:
        repo = RepositoryClient(GridServiceClient(spec["repo_url"], alice, trust))
        url = repo.service.call("GetImageLocation", image=d.image_id).findtext("repo:url", namespaces=REPO_NS)
        dest = Path(spec["scratch"]) / "gridftp-alone.img"
        t = time.perf_counter()
        gridftp.download(url, dest, spec["parallel"], credential=alice, trust=trust, sha256=d.sha256)
        out["gridftp_s"] = time.perf_counter() - t
        out["gridftp_url"] = url
        dest.unlink()
    vmm = VMManagerClient(GridServiceClient(spec["node_url"], alice, trust))
    vmm.list()
    run, info = deploy_watch(vmm, ws, "wan-cold")
    out["cold"] = run.to_json()
    out["cold_cached"] = info.staged[2]
    vmm.destroy(info.ref)
    warm = []
    for i in range(spec["warm"]):
        run, info = deploy_wait(vmm, ws, f"wan-warm-{i}")
        warm.append(run.to_json())
        vmm.destroy(info.ref)
    out["warm"] = warm
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def wan_section(root: Path, pki, args) -> dict:
    wan = Wan(prefix=args.wan_prefix, delay_ms=args.delay_ms, rate=args.rate)
    site = Site(root / "wan", pki)
    site.root.mkdir()
    try:
        log(f"wan: up (prefix {wan.prefix}, one-way delay {wan.delay_ms} ms, rate {wan.rate})")
        wan.up()
        log(f"wan: {wan.shaping}")
        hosts = root / "wan" / "hosts"
        srv = pki.ca.issue_host(wan.srv_name, ou="vmgrid", alt_names=[wan.srv_ip], out_dir=hosts / wan.srv_name)
        cli = pki.ca.issue_host(wan.cli_name, ou="vmgrid", alt_names=[wan.cli_ip], out_dir=hosts / wan.cli_name)
        ingest = site.root / "ingest"
        ingest.mkdir()
        log(f"wan: writing a qcow2 with {args.image_mib} MiB of random data")
        image = make_random_qcow2(ingest / "big.qcow2", args.image_mib)
        size = image.stat().st_size
        allocated = image.stat().st_blocks * 512
        t = time.perf_counter()
        with open(image, "rb") as f:        # what a node staging it verifies
            hashlib.file_digest(f, "sha256")
        sha_s = time.perf_counter() - t
        env = {"P": wan.prefix}
        site.start_central(host=wan.srv_ip, public=wan.srv_name, port=8443, cert=srv.cert_path, key=srv.key_path,
                           ingest=ingest, wrap=wan.command("srv", []), env=env)
        node = site.start_node("node-wan", host=wan.cli_ip, public=wan.cli_name, port=8443, cert=cli.cert_path,
                               key=cli.key_path, state=site.root / "node", vmmanager={"vmm": "test"},
                               wrap=wan.command("cli", []), env=env)
        log(f"wan: plain TCP, {PARALLEL} streams, {size / 2**20:.0f} MiB")
        wire = wire_time(wan, image, PARALLEL, site.root)
        scratch = site.root / "scratch"
        scratch.mkdir()
        spec = {"cert_dir": str(pki.cert_dir), "admin_proxy": str(pki.admin.proxy_path),
                "alice_proxy": str(pki.alice.proxy_path), "repo_url": site.repo_url,
                "node_url": node.url("VMManagerService"), "image": str(image),
                "descriptor": etree.tostring(example_descriptor("bench-wan")).decode(),
                "raw_gridftp": args.raw_gridftp, "parallel": PARALLEL, "scratch": str(scratch), "warm": args.wan_warm,
                "out": str(site.root / "client.json")}
        spec_path = site.root / "client-spec.json"
        spec_path.write_text(json.dumps(spec))
        log("wan: client in the node's namespace: register, "
            + ("GridFTP alone, " if args.raw_gridftp else "") + "cold deploy, warm deploys")
        client = subprocess.Popen(wan.command("cli", [sys.executable, str(Path(__file__).resolve()), "_wan-client",
                                                      str(spec_path)]),
                                  env={**os.environ, **env}, cwd=REPO, start_new_session=True)
        try:
            rc = client.wait(7200)
        finally:
            stop_process(client)
        if rc != 0:
            raise BenchError(f"the WAN client failed ({rc}); logs in {site.root}")
        result = json.loads((site.root / "client.json").read_text())
        result.update({"wire": wire, "size": size, "allocated": allocated, "sha_s": sha_s, "shaping": wan.shaping,
                       "rate_bps": rate_bps(wan.rate)})
        return result
    finally:
        site.stop()
        wan.down()


def rate_bps(rate: str) -> float:
    import re

    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(bit|bps)?", rate.strip().lower())
    if not m:
        return float("nan")
    v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return v * 8 if m.group(3) == "bps" else v


def print_wan(r: dict, args) -> list[str]:
    cold = DeployRun.from_json(r["cold"])
    warm = [DeployRun.from_json(x) for x in r["warm"]]
    wire = r["wire"]["seconds"]
    nominal = r["size"] * 8 / r["rate_bps"]
    print(f"\n== 3. cold deploy over the emulated WAN ({r['shaping']}) ==")
    print(f"image: qcow2, {r['size']} bytes ({r['size'] / 2**20:.0f} MiB) in the file, {r['allocated']} bytes "
          f"allocated; registered in {fmt_s(r['register_s'])} (local ingest, not timed below)")
    stage = sum(s for n, s in cold.phases if n == "stage")
    rows = [("wire: plain TCP, same bytes, same link (peer)", fmt_s(wire), f"{r['size'] * 8 / wire / 1e6:.1f}",
             "1.00x"),
            ("nominal: bytes x 8 / link rate", fmt_s(nominal), f"{r['rate_bps'] / 1e6:.1f}", f"{nominal / wire:.2f}x")]
    if "gridftp_s" in r:
        g = r["gridftp_s"]
        rows.append((f"GridFTP alone (-p {PARALLEL}, TLS, sha256 verified)", fmt_s(g),
                     f"{r['size'] * 8 / g / 1e6:.1f}", f"{g / wire:.2f}x"))
    rows += [("cold deploy: stage phase", fmt_s(stage), f"{r['size'] * 8 / stage / 1e6:.1f}", f"{stage / wire:.2f}x"),
             ("cold deploy: Deploy -> Running (wall)", fmt_s(cold.wall), f"{r['size'] * 8 / cold.wall / 1e6:.1f}",
              f"{cold.wall / wire:.2f}x")]
    print(table(("", "time", "Mbit/s", "vs wire"), rows))
    if warm:
        ww = [x.wall for x in warm]
        print(f"warm deploy across the WAN (node -> repository/authz {2 * args.delay_ms} ms RTT), {len(ww)} runs: "
              f"p50 {fmt_s(p50(ww))}, p95 {fmt_s(percentile(ww, 95))}, min {fmt_s(min(ww))}, max {fmt_s(max(ww))}")
    print(f"sha256 of the image from the page cache, in-process: {fmt_s(r['sha_s'])}")
    print()
    print(phase_table("phases, cold deploy over the WAN", [cold]))
    if warm:
        print(phase_table("phases, warm deploys over the WAN", warm))
    ratio = cold.wall / wire
    return [f"cold deploy {fmt_s(cold.wall)} = {ratio:.3f}x the wire time {fmt_s(wire)} (goal <= 1.1x): "
            f"{'MET' if ratio <= 1.1 else 'NOT MET'}"]


# -- main -----------------------------------------------------------------------------------------------------
def _terminate(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_wan-client":
        return wan_client(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="warm,qemu,wan", help="comma-separated parts: warm, qemu, wan")
    ap.add_argument("--deploys", type=int, default=40, help="sequential warm deploys (1 client)")
    ap.add_argument("--clients", type=int, default=10, help="concurrent client processes")
    ap.add_argument("--cycles", type=int, default=8, help="deploy+destroy cycles per concurrent client")
    ap.add_argument("--qemu-boots", type=int, default=3, help="real guests deployed in turn (the first stages)")
    ap.add_argument("--qemu-memory", type=int, default=256, help="MiB of guest memory")
    ap.add_argument("--qemu-vcpus", type=int, default=1, help="virtual CPUs of the guest (cold, bare and warm)")
    ap.add_argument("--qemu-warm", type=int, default=5, help="deploys from the warm snapshot (0: skip)")
    ap.add_argument("--qemu-warm-poll", type=float, default=0.0,
                    help="also deploy warm --qemu-warm times polling the state every SECONDS (as before: 0.02)")
    ap.add_argument("--qemu-clones", type=int, default=10, help="instances from one snapshot alive at once")
    ap.add_argument("--image-mib", type=int, default=1024, help="MiB of random data allocated in the WAN image")
    ap.add_argument("--delay-ms", type=int, default=25, help="one-way delay of the emulated link")
    ap.add_argument("--rate", default="100mbit", help="rate of the emulated link (tc units)")
    ap.add_argument("--wan-warm", type=int, default=20, help="warm deploys across the WAN after the cold one")
    ap.add_argument("--wan-prefix", default="vmb", help="namespace prefix for wan.sh (ours only)")
    ap.add_argument("--no-raw-gridftp", dest="raw_gridftp", action="store_false",
                    help="skip the GridFTP-alone transfer (saves one image transfer)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configurations)")
    args = ap.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"warm", "qemu", "wan"}
    if unknown:
        ap.error(f"unknown parts {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, _terminate)
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))   # short: guest channel sockets live under it
    print(f"vmgrid VMManager benchmark: {os.cpu_count()} cores, {loadavg()}, work directory {root}")
    verdicts: list[str] = []
    site = None
    try:
        pki = build_grid_pki(root / "pki")
        site = Site(root, pki)
        if "warm" in parts or "qemu" in parts:
            warm = warm_section(site, args) if "warm" in parts else None
            if warm:
                verdicts += print_warm(warm, args)
            if "qemu" in parts:
                if site.central is None:
                    (root / "ingest").mkdir(exist_ok=True)
                    site.start_central(host="127.0.0.1", public="localhost", port=free_port(),
                                       cert=pki.host_cert_path, key=pki.host_key_path, ingest=root / "ingest")
                try:
                    verdicts += print_qemu(qemu_section(site, args))
                except BenchError as exc:
                    print(f"\n== 2. QEMU: not run: {exc}")
                    verdicts.append(f"real guest: not run ({exc})")
            site.stop()
        if "wan" in parts:
            try:
                verdicts += print_wan(wan_section(root, pki, args), args)
            except BenchError as exc:
                print(f"\n== 3. WAN: not run: {exc}")
                verdicts.append(f"cold deploy over the WAN: not run ({exc})")
        print("\n== goals ==")
        for v in verdicts:
            print(f"  {v}")
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        if site is not None:
            site.stop()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
