"""The VMManager on real guests (QEMU tier): vmgrid's own guest image registered in the VMRepository,
deployed through the signed, authorized VMManager service onto QEMU (staged over GridFTP, qcow2
overlay, context CD-ROM, guestd ready), controlled through its life, and a VMManager SIGKILLed after
power-on that reconciles on restart.

One grid (Authorization service + VMRepository, a VMManager node on qemu:///embed in this process)
and one deployed guest are shared by the module; the tests run in file order and take the guest
through pause, save, shutdown and destroy. The node shares this process's one embedded QEMU root with
the other QEMU-tier modules (libvirt allows one per process); the crash test runs its VMManager as a
process of its own (`vmgrid serve vmmanager -c config.toml`) on a root of its own.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from lxml import etree

from client.localgrid import write_toml
from client.soap import GridServiceClient
from client.vmmanager import VMManagerClient
from guestd.context import FILE_NAME
from guestd.context import loads as load_context
from guestd.sources.iso9660 import read_file
from security.tls import grid_session
from services.authz.config import EnforcementConfig
from services.container.assemble import build_container, build_vmmanager
from services.descriptor import parse_descriptor
from services.faults import VMGridFault
from services.vmmanager.channels import MONITOR_TAIL, embed_root
from services.vmmanager.vmm.spec import MAX_UNIX_PATH
from services.vmmanager.service import VMManagerConfig
from services.vmmanager.states import COLD_PHASES as PHASES
from services.vmmanager.vmm import InstanceState
from services.vmmanager.vmm.config import domain_name
from tests.fixtures.grid import base_config, free_port, start_grid

REPO = Path(__file__).resolve().parents[2]
IMAGE_NAME = "vmgrid-guest"
# The grid container the descriptor names: a small HTTP server on the descriptor's container port.
CONTAINER = "/usr/bin/python3 -m http.server 8443 --bind 127.0.0.1 --directory /tmp"
NETWORK, GATEWAY = "10.99.0.0/24", "10.99.0.1"
LEASES = "10.99.0.10-10.99.0.19"
CRASH_LEASE = "10.99.0.200-10.99.0.200"     # one address: a leaked lease would make the next deploy fail
CLOCK_BOUND = 0.5                            # seconds between the guest clock and the host's after a fix
BOOT_TIMEOUT = 300                           # deploy to Running (guest ready) under TCG on a busy 2-core CI

DESCRIPTOR = """\
<workspace xmlns="http://vmgrid.org/ns/workspace/1">
  <identity>
    <name>{name}</name>
    <version>1.0</version>
    <vo>bio</vo>
    <description>vmgrid's own guest: Debian 12 minbase with python3 and guestd, booted by the node's kernel</description>
  </identity>
  <hardware>
    <architecture>x86_64</architecture>
    <vcpus>1</vcpus>
    <memory>256</memory>
    <disk><role>root</role><size>1073741824</size><format>qcow2</format><bus>virtio</bus><target>vda</target></disk>
    <cdrom><bus>ide</bus><purpose>context</purpose></cdrom>
    <serialPort><type>file</type><purpose>console</purpose></serialPort>
    <nic><model>virtio</model><network>grid</network></nic>
  </hardware>
  <software>
    <os>linux</os>
    <distribution><name>debian</name><version>12</version></distribution>
    <kernel><version>{kernel}</version></kernel>
    <boot><method>kernel</method></boot>
    <librarySignature><library><name>python3</name><version>3.11</version></library></librarySignature>
  </software>
  <image><format>qcow2</format></image>
  <container><command>{command}</command><port>8443</port></container>
</workspace>
"""


# -- the grid ---------------------------------------------------------------------------------------
def node_settings(image, *, root: Path, lease_range: str, name: str) -> dict:
    """The [vmmanager] settings of a QEMU node booting vmgrid's guest kernel."""
    return {"node": name, "vmm": "qemu", "vmm_root": str(root), "network": NETWORK, "gateway": GATEWAY,
            "lease_range": lease_range, "kernel": str(image.kernel), "initrd": str(image.initrd),
            "cmdline": image.cmdline, "sweep_interval": 0.5, "guest_ready_timeout": 240.0}


@pytest.fixture(scope="module")
def qemu_grid(grid_pki, guest_image, qemu_node, vm_dir):
    """Authorization + VMRepository in one container, a VMManager node on QEMU in another; the real
    guest image registered (by the admin) with boot method kernel. ``qemu_node`` is an independent
    libvirt connection to the same embedded root, to see what the node left in libvirt."""
    foreign = [i.name for i in qemu_node.list_instances() if not i.name.startswith("inst-")]
    if foreign:
        # the node owns its root: its start-up reconciliation would remove other modules' guests
        pytest.skip(f"other QEMU-tier guests are live in this process's embedded root ({', '.join(foreign)}): "
                    "run tests/vm serially or with pytest-xdist --dist loadfile")
    grid = start_grid(grid_pki, vm_dir / "g", nodes=0)
    try:
        # a state directory too deep for <state_dir>/vmmanager/instances/inst-<32 hex>/guestd.sock (107 bytes):
        # the node puts its guests' channel sockets in its short private directory (services.vmmanager.channels),
        # which every test of this module's guest then goes through (test_destroy_releases_everything checks it)
        q1 = grid.root / ("q1-" + "d" * max(0, 120 - len(str(grid.root)) - 4))
        cfg = base_config(grid_pki, q1, free_port())
        cfg.enforcement = EnforcementConfig(authz_url=grid.authz_url, permit_ttl=0.0)
        cfg.vmmanager = VMManagerConfig(repository=grid.repository_url, **node_settings(
            guest_image, root=qemu_node.root, lease_range=LEASES, name="qemu1"))
        service = build_vmmanager(cfg)
        container = build_container(cfg, [service])
        container.start()
        grid.nodes.append((container, service))
        rootfs = grid.ingest / f"{IMAGE_NAME}.qcow2"
        shutil.copyfile(guest_image.rootfs, rootfs)
        ws = parse_descriptor(DESCRIPTOR.format(name=IMAGE_NAME, kernel=guest_image.kernel_version,
                                                command=CONTAINER).encode())
        grid.repo(grid_pki.admin).register(ws, local_path=str(rootfs))
        rootfs.unlink()
        yield grid
    finally:
        grid.close()
        for _, service in grid.nodes:
            service.vmm.close()
            if service.core.parts.channels is not None:      # the node's short channel directory (empty by now)
                shutil.rmtree(service.core.parts.channels.short_dir, ignore_errors=True)


@dataclass
class Deployed:
    grid: object
    client: VMManagerClient
    ref: object
    registered: object       # the Deploy response (Registered, with the lease)
    running: object          # the status once Running
    descriptor: etree._Element
    seconds: float

    @property
    def node(self):
        return self.grid.node(0)

    @property
    def home(self) -> Path:
        return self.node.instances_dir / self.ref.key

    def channel(self):
        return self.node.vmm.guest_channel(self.ref.key)

    def console(self) -> str:
        try:
            return (self.home / "serial0.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no console log)"


@pytest.fixture(scope="module")
def deployed(qemu_grid, grid_pki):
    """alice finds the image in the repository and deploys it on the QEMU node; waits for Running."""
    found = qemu_grid.repo(grid_pki.alice).query([f"name = {IMAGE_NAME}", "software.boot.method = kernel"])
    assert found.total == 1, "the repository answers the query with the registered guest image"
    descriptor = found.descriptors[0]
    client = qemu_grid.vmm(grid_pki.alice)
    t0 = time.monotonic()
    registered = client.deploy(descriptor, "qemu-tier-1", 1800)
    running = client.wait_for(registered.ref, ("Running",), timeout=BOOT_TIMEOUT)
    d = Deployed(qemu_grid, client, registered.ref, registered, running, descriptor, time.monotonic() - t0)
    print(f"deploy to Running on QEMU: {d.seconds:.1f} s, phases {running.phases}", file=sys.stderr)
    if running.state != "Running" or not running.guest_status.startswith("ready;"):
        pytest.fail(f"deploy ended {running.state} ({running.failure or running.guest_status}); "
                    f"console:\n{d.console()}")
    return d


def clock_offset(channel) -> float:
    """Guest clock minus host clock (against the midpoint of a ping's round trip)."""
    t1 = time.time()
    guest = channel.request("ping")["time"]
    return guest - (t1 + time.time()) / 2


def qemu_processes(needle: str) -> list[int]:
    """The QEMU processes whose command line contains ``needle``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if cmdline.startswith(b"/usr/bin/qemu-system") and needle.encode() in cmdline:
                pids.append(int(proc.name))
    return pids


def qemu_pids(domain: str) -> list[int]:
    """The QEMU processes running the libvirt domain ``domain`` (QEMU's -name guest=DOMAIN,...)."""
    return qemu_processes(f"guest={domain},")


# -- deploy -----------------------------------------------------------------------------------------
def test_deploy_stages_the_guest_image_and_boots_it_on_qemu(deployed, guest_image, qemu_node):
    """Every phase ran and was timed, the image came over GridFTP into the cache, the domain boots the
    node's kernel on a qcow2 overlay of the cached image with the context ISO as its CD-ROM."""
    info, key = deployed.running, deployed.ref.key
    assert [name for name, _ in info.phases] == list(PHASES)
    assert all(seconds >= 0 for _, seconds in info.phases)
    assert info.staged == (info.size, info.size, False), "a cold deploy: staged in full, not from the cache"
    cached = deployed.node.cache.path(info.sha256)
    assert cached.stat().st_size == info.size == guest_image.rootfs.stat().st_size

    overlay = deployed.home / "root.qcow2"
    meta = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], check=True,
                                     capture_output=True, text=True).stdout)
    assert meta["format"] == "qcow2" and Path(meta["backing-filename"]) == cached

    assert qemu_node.state(key) == InstanceState.RUNNING
    spec = qemu_node.spec_of(key)
    assert [d.path for d in spec.disks] == [overlay]
    assert spec.cdroms == (deployed.home / "context.iso",)
    assert spec.boot is not None and spec.boot.kernel == guest_image.kernel
    assert (spec.boot.initrd, spec.boot.cmdline) == (guest_image.initrd, guest_image.cmdline)
    assert [n.mac for n in spec.nics] == [info.mac]
    assert qemu_pids(domain_name(key)), "a QEMU process runs the domain"


def test_guestd_configured_the_address_and_mac_the_node_leased(deployed):
    """The lease (in the Deploy answer and the node's store) is the context's and what guestd set."""
    reg, info, key = deployed.registered, deployed.running, deployed.ref.key
    assert reg.state == "Registered" and reg.address and reg.mac
    assert (info.address, info.mac) == (reg.address, reg.mac)
    assert deployed.node.store.leases()[key] == (reg.address, reg.mac)
    with open(deployed.home / "context.iso", "rb") as f:
        ctx = load_context(read_file(f, FILE_NAME))
    assert (ctx.instance, ctx.network.mac, ctx.network.address) == (key, reg.mac, reg.address)
    assert (ctx.network.netmask, ctx.network.gateway) == ("255.255.255.0", GATEWAY)

    status = deployed.channel().status()
    assert status["ready"] and status["instance"] == key and status["context_source"] == "cdrom"
    steps = status["steps"]
    assert all(step["ok"] for step in steps.values()), steps
    net = steps["network"]["detail"]
    # guestd picks the NIC by the context's MAC (it fails the step if none has it) and reports what the
    # kernel then has on it
    assert net["interface"] == "eth0"
    assert (net["address"], net["netmask"], net["gateway"]) == (reg.address, "255.255.255.0", GATEWAY)
    assert steps["hostname"]["detail"]["hostname"] == "qemu-tier-1"
    assert deployed.channel().rejected == [], "every guestd message carried the instance token"
    # the same, as a client sees it over SOAP: the GuestStatus resource property
    assert info.guest_status.startswith(f"ready; address {reg.address}/255.255.255.0 on eth0; container running")


def test_the_grid_container_from_the_descriptor_runs_in_the_guest(deployed):
    status = deployed.channel().status()["container"]
    assert status["command"] == shlex.split(CONTAINER)
    assert status["running"] and status["restarts"] == 0 and status["last_exit"] is None
    time.sleep(2)
    again = deployed.channel().status()["container"]
    assert again["running"] and again["pid"] == status["pid"] and again["restarts"] == 0, \
        "the container stays up (it would exit if it could not serve its port)"


# -- control ----------------------------------------------------------------------------------------
def test_pause_then_resume_sets_the_guest_clock(deployed, qemu_node):
    """A guest clock an hour behind, frozen for 3 s by Pause, is the host's again after Resume."""
    client, ref, key = deployed.client, deployed.ref, deployed.ref.key
    channel = deployed.channel()
    channel.set_time(time.time() - 3600)
    assert clock_offset(channel) < -3000
    assert client.pause(ref) == "Paused"
    assert qemu_node.state(key) == InstanceState.PAUSED
    assert client.status(ref).state == "Paused"
    time.sleep(3)
    assert client.resume(ref) == "Running"
    assert qemu_node.state(key) == InstanceState.RUNNING
    assert abs(clock_offset(channel)) < CLOCK_BOUND
    assert client.status(ref).guest_status == "ready (clock set after resume)"


def test_save_and_restore_continue_the_same_guest(deployed, qemu_node):
    client, ref, key = deployed.client, deployed.ref, deployed.ref.key
    before = deployed.channel().status()
    assert client.save(ref) == "Saved"
    assert client.status(ref).state == "Saved"
    assert qemu_node.state(key) == InstanceState.SAVED
    assert (deployed.home / "state.save").stat().st_size > 0
    assert not qemu_pids(domain_name(key)), "a saved guest holds no QEMU process"
    time.sleep(2)
    assert client.restore(ref) == "Running"
    assert qemu_node.state(key) == InstanceState.RUNNING
    assert not (deployed.home / "state.save").exists()
    channel = deployed.channel()
    after = channel.status()
    assert after["ready"] and after["container"]["pid"] == before["container"]["pid"], "the same guest, not a reboot"
    assert after["uptime"] > before["uptime"]
    assert abs(clock_offset(channel)) < CLOCK_BOUND
    assert client.status(ref).guest_status == "ready (clock set after restore)"     # this wake-up's, not an older one


def test_normal_shutdown_is_honoured_by_the_guest(deployed, qemu_node):
    """ACPI power button: guestd powers the guest off itself, well before the timeout would force it."""
    client, ref, key = deployed.client, deployed.ref, deployed.ref.key
    assert client.shutdown(ref, "Normal", timeout=120) == "Shutoff"
    info = client.status(ref)
    assert info.state == "Shutoff" and info.guest_status == "shut down"
    assert qemu_node.state(key) == InstanceState.SHUTOFF
    assert not qemu_pids(domain_name(key))


def test_start_after_shutdown_waits_for_guestd_again(deployed, qemu_node):
    """Start goes through the guest-ready phase as Deploy does: it answers Running once guestd reported
    ready again, and GuestStatus says so (not the "shut down" of before)."""
    client, ref, key = deployed.client, deployed.ref, deployed.ref.key
    assert client.status(ref).guest_status == "shut down"
    assert client.start(ref) == "Running"
    info = client.status(ref)
    assert info.state == "Running" and info.guest_status.startswith("ready;"), info.guest_status
    assert f"address {deployed.registered.address}/" in info.guest_status
    assert qemu_pids(domain_name(key)), "a new QEMU process (the shut-off guest had none)"
    assert deployed.channel().status(timeout=30)["ready"]


def test_destroy_releases_everything(deployed, qemu_node):
    client, ref, key = deployed.client, deployed.ref, deployed.ref.key
    node, grid = deployed.node, deployed.grid
    sock = node.core.parts.channel_path(key)
    assert sock.parent == node.core.parts.channels.short_dir and sock.is_socket(), \
        "the deep state directory's guest channel is a socket in the node's short private directory"
    client.destroy(ref)
    assert key not in [i.name for i in qemu_node.list_instances()], "no domain left in libvirt"
    assert not deployed.home.exists(), "overlay, context ISO and channel socket are gone"
    assert not sock.exists(), "the channel socket in the short directory is gone"
    assert key not in node.store.leases()
    ended = {i.ref.key: i.state for i in client.list(include_ended=True)}
    assert ended[key] == "Destroyed" and key not in {i.ref.key for i in client.list()}
    with pytest.raises(VMGridFault):
        client.status(ref)
    db = sqlite3.connect(grid.repo_service.catalogue.path)
    try:
        holders = [h for (h,) in db.execute("SELECT holder FROM holds")]
    finally:
        db.close()
    assert not [h for h in holders if h.endswith(f"#{key}")], "the node released its hold on the image"
    assert node.cache.path(deployed.running.sha256).is_file(), "the base image stays cached for the next deploy"


# -- a VMManager killed after power-on ---------------------------------------------------------------
@dataclass
class NodeProcess:
    """`vmgrid serve vmmanager -c config.toml` on loopback: its own process and embedded QEMU root."""

    config: Path
    state: Path
    log: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/wsrf/services/VMManagerService"

    def start(self, cert_dir: Path, env: dict[str, str] | None = None, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "serve", "vmmanager", "-c", str(self.config)], cwd=REPO,
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True)
        session = grid_session(cert_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the VMManager exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if session.get(f"https://localhost:{self.port}/", timeout=2).status_code == 200:
                    return
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the VMManager did not start within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def store(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.state / 'vmmanager' / 'node.sqlite'}?mode=ro", uri=True)


def libvirt_instances(root: Path) -> list[str]:
    """The vmgrid domains libvirt has in an embedded QEMU root, listed from a process of its own."""
    code = ("import json, sys; from services.vmmanager.vmm import LibvirtQemuDriver; "
            "n = LibvirtQemuDriver(root=sys.argv[1]); print(json.dumps([i.name for i in n.list_instances()]))")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_vmmanager_killed_after_power_on_reconciles_on_restart(qemu_grid, grid_pki, guest_image, vm_dir):
    """SIGKILL between power-on and Running (crash point deploy.powered-on): the QEMU process outlives
    the VMManager; the restarted VMManager (same state dir and root) destroys and undefines the domain,
    removes the overlay, frees the lease and marks the instance Failed, never leaving it Starting. Its state
    directory is too deep for libvirt's QEMU monitor sockets under the default root (<state_dir>/vmmanager/qemu)
    and no vmm_root is set: the node takes a short private root, the same one again after the restart."""
    state = vm_dir / ("c" * max(1, MAX_UNIX_PATH - MONITOR_TAIL - len(str(vm_dir)) - 10))
    root = embed_root("", state / "vmmanager" / "qemu")        # what the node takes: its short private root
    assert not str(root).startswith(str(state)) and stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    node = NodeProcess(vm_dir / "crash.toml", state, vm_dir / "crash.log", free_port())
    settings = node_settings(guest_image, root=root, lease_range=CRASH_LEASE, name="crash1")
    del settings["vmm_root"]                  # the default root, too deep here
    write_toml(node.config, {
        "container": {"host": "127.0.0.1", "port": node.port, "state_dir": str(state), "log_level": "info"},
        "security": {"cert_dir": str(grid_pki.cert_dir), "host_cert": str(grid_pki.host_cert_path),
                     "host_key": str(grid_pki.host_key_path)},
        "enforcement": {"authz_url": qemu_grid.authz_url, "permit_ttl": 0.0},
        "vmmanager": {"repository": qemu_grid.repository_url,
                      **settings},
    })
    descriptor = qemu_grid.repo(grid_pki.alice).query([f"name = {IMAGE_NAME}"]).descriptors[0]
    try:
        node.start(grid_pki.cert_dir, env={"VMGRID_CRASHPOINT": "deploy.powered-on"})
        client = VMManagerClient(GridServiceClient(node.url, grid_pki.alice.proxy, grid_pki.trust()))
        reg = client.deploy(descriptor, "crash-1", 1800)
        key, domain = reg.ref.key, domain_name(reg.ref.key)
        assert node.process.wait(timeout=180) == -signal.SIGKILL, node.log_tail()

        # what the killed VMManager left: a running QEMU, a Starting record holding the lease, an overlay
        assert qemu_pids(domain), f"the QEMU process outlives its VMManager:\n{node.log_tail()}"
        with node.store() as db:
            assert db.execute("SELECT state FROM instances WHERE key = ?", (key,)).fetchone() == ("Starting",)
        assert (state / "vmmanager" / "instances" / key / "root.qcow2").is_file()

        node.start(grid_pki.cert_dir)         # the same state dir and root, no crash point
        info = client.status(reg.ref)
        assert info.state == "Failed" and "Starting" in (info.failure or ""), info.failure
        deadline = time.monotonic() + 20
        while qemu_pids(domain) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not qemu_pids(domain), "reconcile ended the orphan QEMU process"
        assert not (state / "vmmanager" / "instances" / key).exists(), "overlay and context removed"
        with node.store() as db:
            assert db.execute("SELECT COUNT(*) FROM leases").fetchone() == (0,), "the lease was freed"
        assert "'failed_interrupted': 1" in node.log_tail()

        # the node works on: its one address is free again (left paused: no boot to wait for)
        again = client.deploy(descriptor, "crash-2", 600, paused=True)
        assert again.address == reg.address
        assert client.wait_for(again.ref, ("Paused",), timeout=120).state == "Paused"
        client.destroy(again.ref)
        node.stop()
        assert libvirt_instances(root) == [], "no domain left defined in the node's libvirt"
    finally:
        node.stop()
        for pid in qemu_processes(f"{root}/lib/qemu/"):   # left only when the test failed midway
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
