"""The bridge guard (services/vmmanager/guard.py) on a real Linux bridge and real nftables, in network
namespaces each test makes (vggd-*, removed at the end): a "host" namespace holds the bridge and the
gateway, each "guest" namespace the far end of a veth pair whose near end is a port of the bridge, as a
QEMU tap is. The guests are untrusted code: they set addresses, MACs and write raw frames as they please.
The node core binding its instances' taps: the last tests."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from services.vmmanager.guard import Binding, PortGuard, table_name, tables_of
from services.vmmanager.network import NetworkSetupError, NodeBridge

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
              pytest.mark.skipif(shutil.which("nft") is None, reason="nftables (`nft`) is not installed")]
GATEWAY, A_IP, B_IP, FREE_IP = "10.79.0.1", "10.79.0.10", "10.79.0.11", "10.79.0.12"
A_MAC, B_MAC = "52:54:00:79:00:0a", "52:54:00:79:00:0b"
LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 7979)); s.listen(16); print("listening", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
""")
# tried again until argv[2] seconds have passed: a neighbour entry that failed while a guest was blocked answers
# "no route to host" at once for a while after
CONNECT = textwrap.dedent("""
    import socket, sys, time
    deadline = time.monotonic() + float(sys.argv[2])
    while True:
        s = socket.socket(); s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            s.connect((sys.argv[1], 7979)); print(s.recv(5).decode()); break
        except OSError as exc:
            if time.monotonic() >= deadline:
                print("refused:", type(exc).__name__); break
            time.sleep(0.2)
        finally:
            s.close()
""")
# a gratuitous ARP reply from this guest's MAC (ether and ARP sender) claiming the address argv[1]
ARP_CLAIM = textwrap.dedent("""
    import socket, sys
    mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
    ip = socket.inet_aton(sys.argv[1])
    frame = b"\\xff" * 6 + mac + b"\\x08\\x06" + b"\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x02" + mac + ip + b"\\xff" * 6 + ip
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(("eth0", 0))
    for _ in range(3):
        s.send(frame)
""")


# argv[2] gratuitous ARP announcements of this guest's own lease (argv[1]), broadcast, as fast as it can send them;
# prints how long that took
ARP_FLOOD = textwrap.dedent("""
    import socket, sys, time
    mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
    ip = socket.inet_aton(sys.argv[1])
    frame = b"\\xff" * 6 + mac + b"\\x08\\x06" + b"\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x01" + mac + ip + b"\\x00" * 6 + ip
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(("eth0", 0))
    start = time.monotonic()
    for _ in range(int(sys.argv[2])):
        s.send(frame)
    print(time.monotonic() - start)
""")
# counts the ARP frames from MAC argv[1] this namespace's eth0 receives, until argv[2] seconds without one
ARP_COUNT = textwrap.dedent("""
    import socket, sys
    mac = bytes.fromhex(sys.argv[1].replace(":", ""))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)); s.bind(("eth0", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    print("ready", flush=True)
    n = 0
    s.settimeout(float(sys.argv[2]))
    try:
        while True:
            if s.recv(2048)[6:12] == mac:
                n += 1
    except socket.timeout:
        print(n, flush=True)
""")
# a UDP datagram from this guest's address argv[1], port argv[2], to argv[3]:argv[4] (68: a DHCP server's answer to a
# client)
UDP_SEND = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
    for _ in range(3):
        s.sendto(b"offer", (sys.argv[3], int(sys.argv[4])))
""")
# what reaches UDP port argv[2] of this namespace within argv[1] seconds
UDP_RECEIVE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[2])))
    s.settimeout(float(sys.argv[1]))
    print("ready", flush=True)
    try:
        print(s.recvfrom(64)[0].decode(), flush=True)
    except socket.timeout:
        print("nothing", flush=True)
""")


def run(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60).stdout


class Site:
    """A bridge holding the gateway in namespace ``host``; ``guest(name, mac, ip)`` plugs a guest namespace
    into it through a veth pair whose bridge end (its "tap") is named ``vg<hex><name>0``."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.host = f"vggd-{self.tag}"
        self.namespaces = [self.host]
        self.listener = None
        run("ip", "netns", "add", self.host)
        run("ip", "-n", self.host, "link", "set", "lo", "up")
        run("ip", "-n", self.host, "link", "add", "vmgridbr0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        run("ip", "-n", self.host, "link", "set", "vmgridbr0", "up")
        run("ip", "-n", self.host, "addr", "add", f"{GATEWAY}/24", "dev", "vmgridbr0")
        # the host takes any ARP news at once (no 1 s lock after an update), so only the guard stops a claim
        run("ip", "netns", "exec", self.host, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/neigh/vmgridbr0/locktime")
        self.guard = PortGuard("vmgridbr0", owner="node-a", netns=self.host)

    def in_guest(self, name: str, script: str, *args: str) -> subprocess.Popen:
        """Run a Python ``script`` in guest ``name``'s namespace; its first line ("ready") read."""
        proc = subprocess.Popen(["ip", "netns", "exec", f"{self.host}-{name}", sys.executable, "-c", script, *args],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def guest(self, name: str, mac: str, ip: str) -> str:
        ns, tap = f"{self.host}-{name}", f"vg{self.tag}{name}0"
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "-n", self.host, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", self.host, "link", "set", tap, "master", "vmgridbr0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        self.set(name, mac, ip)
        return tap

    def set(self, name: str, mac: str, ip: str) -> None:
        """The guest sets its own NIC's MAC and address, as root in a guest can."""
        ns = f"{self.host}-{name}"
        run("ip", "-n", ns, "link", "set", "eth0", "down")
        run("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        run("ip", "-n", ns, "addr", "flush", "dev", "eth0")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")

    def listen(self) -> None:
        self.listener = subprocess.Popen(["ip", "netns", "exec", self.host, sys.executable, "-c", LISTENER, GATEWAY],
                                         stdout=subprocess.PIPE, text=True)
        assert self.listener.stdout.readline().strip() == "listening"

    def connect(self, name: str, timeout: float) -> str:
        return run("ip", "netns", "exec", f"{self.host}-{name}", sys.executable, "-c", CONNECT, GATEWAY,
                   str(timeout)).strip()

    def neighbour(self, ip: str) -> str:
        return run("ip", "-n", self.host, "neigh", "show", ip, "dev", "vmgridbr0")

    def drops(self) -> int:
        listing = self.guard.listing()
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))

    def close(self) -> None:
        if self.listener is not None:
            self.listener.kill()
            self.listener.wait()
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


# connecting where the guard lets a guest through: generous (a loaded machine); where it does not, the connect
# waits this long and must not have been answered (a drop answers nothing; the counters say it was the guard)
PASS, BLOCKED = 60.0, 3.0


def test_a_guest_sends_only_as_its_own_lease(site):
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    site.guard.sync([Binding(a, A_MAC, A_IP), Binding(b, B_MAC, B_IP)])
    site.listen()
    assert site.connect("a", PASS) == "hello" and site.connect("b", PASS) == "hello"
    before = site.drops()

    site.set("b", B_MAC, FREE_IP)                 # B takes the address of B's neighbour to come: no
    assert site.connect("b", BLOCKED).startswith("refused")
    site.set("b", A_MAC, B_IP)                    # B takes A's MAC with its own address: no
    assert site.connect("b", BLOCKED).startswith("refused")
    site.set("a", A_MAC, B_IP)                    # A takes B's address (B is elsewhere now): no
    site.set("b", B_MAC, FREE_IP)
    assert site.connect("a", BLOCKED).startswith("refused")
    assert site.drops() > before
    site.set("a", A_MAC, A_IP)                    # back to its own lease: through again
    assert site.connect("a", PASS) == "hello"


def test_a_guests_arp_cannot_claim_another_guests_address(site):
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    site.guard.sync([Binding(a, A_MAC, A_IP), Binding(b, B_MAC, B_IP)])
    site.listen()
    assert site.connect("b", PASS) == "hello"          # the host has learnt B's address at B's MAC
    assert B_MAC in site.neighbour(B_IP)
    before = site.drops()
    run("ip", "netns", "exec", f"{site.host}-a", sys.executable, "-c", ARP_CLAIM, B_IP)
    assert B_MAC in site.neighbour(B_IP) and A_MAC not in site.neighbour(B_IP)
    assert site.drops() >= before + 3
    assert site.connect("b", PASS) == "hello"

    # the same claim through a port the guard does not hold (what it would do without the guard): taken
    site.guard.sync([Binding(b, B_MAC, B_IP)])
    run("ip", "netns", "exec", f"{site.host}-a", sys.executable, "-c", ARP_CLAIM, B_IP)
    assert A_MAC in site.neighbour(B_IP), "the raw ARP claim reaches the host when unguarded"


def test_a_port_the_node_did_not_bind_passes_and_a_closed_tap_sends_nothing(site):
    site.guest("u", "52:54:00:79:00:99", FREE_IP)              # the site's own port (an uplink): not a guest's
    tpl = site.guest("t", A_MAC, A_IP)                         # a warm snapshot's template: no lease
    site.guard.closed.add(tpl)
    site.guard.sync([])
    site.listen()
    assert site.connect("u", PASS) == "hello"
    assert site.connect("t", BLOCKED).startswith("refused")
    site.guard.closed.clear()
    site.guard.sync([])
    assert site.connect("t", PASS) == "hello"


def test_a_sync_replaces_the_whole_table_and_mends_a_hand_deleted_one(site):
    a = site.guest("a", A_MAC, A_IP)
    site.guard.sync([Binding(a, A_MAC, A_IP)])
    listing = site.guard.listing()
    assert f'"{a}" . {A_MAC} . {A_IP}' in listing and table_name("vmgridbr0", "node-a") in listing
    # docs/configuration.md's command to find it, as written (in the site's namespace)
    shown = re.search(r"```sh\n(nft list tables bridge)\n```", (REPO / "docs/configuration.md").read_text())
    assert shown, "docs/configuration.md shows how to find the guard's table"
    assert f"table bridge {site.guard.table}" in run("ip", "netns", "exec", site.host, *shown.group(1).split())
    run("ip", "netns", "exec", site.host, "nft", "delete", "table", "bridge", site.guard.table)
    assert site.guard.listing() == ""
    site.guard.sync([Binding(a, A_MAC, A_IP)])
    site.guard.sync([Binding(a, A_MAC, A_IP)])       # twice: the same table, not two
    assert site.guard.listing().count("chain guard") == 1
    site.guard.sync([])
    assert A_IP not in site.guard.listing()
    site.guard.remove()
    assert site.guard.listing() == ""


@pytest.mark.parametrize("tap, mac, ip, why", [
    ('vg"; flush ruleset', A_MAC, A_IP, "tap name"),
    ("a-name-far-too-long", A_MAC, A_IP, "tap name"),
    ("vg1", "52:54:00:79:00", A_IP, "MAC"),
    ("vg1", "52:54:00:79:00:0a } ; flush", A_IP, "MAC"),
    ("vg1", A_MAC, "10.79.0.300", "10.79.0.300"),
    ("vg1", A_MAC, "10.79.0.1 } ; flush ruleset", "flush"),
])
def test_a_binding_that_is_not_a_tap_a_mac_and_an_address_is_refused(tap, mac, ip, why):
    """What reaches nft is only names, MACs and addresses of their exact forms: nothing can add a rule."""
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        Binding(tap, mac, ip)


def test_table_names_are_nftables_identifiers_distinct_per_bridge_and_node():
    assert re.fullmatch(r"vmgrid_vmgridbr0_[0-9a-f]{8}", table_name("vmgridbr0", "/var/lib/vmgrid/node1"))
    assert table_name("vmgridbr0", "/srv/n1") != table_name("vmgridbr0", "/srv/n2")
    assert table_name("br-0") != table_name("br_0") and table_name("br-0").startswith("vmgrid_br_0_")
    with pytest.raises(NetworkSetupError):
        table_name("bad name")


def test_two_nodes_on_one_bridge_each_keep_their_own_bindings(site):
    """Two nodes of one host sharing the bridge (tests/vm/bridge_grid.py runs two): the second's sync leaves
    the first's bindings in force, and each table lets the other's guests through to be judged by their own."""
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    other = PortGuard("vmgridbr0", owner="node-b", netns=site.host)
    site.guard.sync([Binding(a, A_MAC, A_IP)])
    other.sync([Binding(b, B_MAC, B_IP)])
    site.listen()
    assert site.connect("a", PASS) == "hello" and site.connect("b", PASS) == "hello"
    site.set("a", A_MAC, FREE_IP)
    site.set("b", B_MAC, FREE_IP)
    assert site.connect("a", BLOCKED).startswith("refused") and site.connect("b", BLOCKED).startswith("refused")
    assert sorted(tables_of("vmgridbr0", site.host)) == sorted([site.guard.table, other.table])


def test_the_bridges_teardown_takes_its_nodes_guard_and_no_other(site, tmp_path):
    """A node's teardown removes its own guard table (named for the bridge and its state directory), never
    another node's: not that of a node on the same bridge, whose guests stay guarded, nor that of a bridge whose
    name reads the same in nftables (vmgrid.br0 and vmgrid_br0). Before, every table of the bridge's name went."""
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    own = PortGuard("vmgridbr0", owner=str(tmp_path.resolve()), netns=site.host)
    own.sync([Binding(a, A_MAC, A_IP)])
    neighbour = PortGuard("vmgridbr0", owner="node-b", netns=site.host)       # another node on the same bridge
    neighbour.sync([Binding(b, B_MAC, B_IP)])
    elsewhere = PortGuard("vmgridbr1", owner=str(tmp_path.resolve()), netns=site.host)    # another bridge's
    elsewhere.sync([])
    lookalike = PortGuard("vmgrid.br0", owner="node-c", netns=site.host)      # vmgrid_br0 in nftables, too
    lookalike.sync([])
    status = NodeBridge("vmgridbr0", GATEWAY, "10.79.0.0/24", tmp_path, netns=site.host).teardown()
    assert status.removed_tables == (own.table,)
    assert tables_of("vmgridbr0", site.host) == [neighbour.table]
    assert tables_of("vmgridbr1", site.host) == [elsewhere.table]
    assert lookalike.table in tables_of("vmgrid.br0", site.host)
    site.listen()                                    # the neighbour's guest is still held to its lease
    site.set("b", B_MAC, FREE_IP)
    assert site.connect("b", BLOCKED).startswith("refused")
    # again: nothing of this node's is left
    assert NodeBridge("vmgridbr0", GATEWAY, "10.79.0.0/24", tmp_path, netns=site.host).teardown().removed_tables == ()


def test_a_host_without_nft_is_told_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NetworkSetupError, match="Debian package nftables.*guard_guests = false"):
        PortGuard("vmgridbr0").check()


NODE_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from pathlib import Path
    from services.vmmanager.config import VMManagerConfig
    from tests.unit.vmmanager.test_node_core import ALICE, deploy, make_node

    def listing():
        return node.parts.guard.listing()

    root = Path(sys.argv[1])
    config = VMManagerConfig(node="node1", nic_kind="bridge", nic_source="vmgridbr0", network="10.79.0.0/24",
                             gateway="10.79.0.1", lease_range="10.79.0.10-10.79.0.20")
    out = {}
    node = make_node(root, config)
    views = [deploy(node, "first"), deploy(node, "second")]
    out["leases"] = [[node.store.get(v.inst.key).address, node.store.get(v.inst.key).mac] for v in views]
    out["ports"] = [node.store.ports().get(v.inst.key) for v in views]
    out["after_deploy"] = listing()
    node.destroy(ALICE, views[1].inst.key)
    out["after_destroy"] = listing()
    # the table deleted by hand, and the records of a node state older than the guard (no taps): what a start
    # does (reconcile; the test driver's domains live in this process) binds each running guest's tap again
    subprocess.run(["nft", "delete", "table", "bridge", node.parts.guard.table], check=True)
    with node.store.write() as db:
        db.execute("DELETE FROM ports")
    out["report"] = node.reconcile()
    out["after_restart"] = listing()
    out["ports_after"] = node.store.ports()
    guard = node.parts.guard
    node.close()
    # the site turns the guard off: the node's next start takes its table away rather than leave it half-kept
    config.guard_guests = False
    node = make_node(root, config)
    out["guard_off"] = {"parts_guard": node.parts.guard is None, "listing": guard.listing()}
    node.close()
    print(json.dumps(out))
""")


def test_the_node_binds_each_instances_tap_to_its_lease_and_mends_the_guard_at_start(site, tmp_path):
    """The node core (test driver, bridge mode) in the site's host namespace: each deployment's tap is bound to
    its lease, a destroyed instance's binding goes, and a node starting after the table was deleted by hand
    puts it back from its records (the tap its domain's UUID names, where the records have none)."""
    proc = subprocess.run(["ip", "netns", "exec", site.host, sys.executable, "-c", NODE_SCRIPT, str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = (f'"{tap}" . {mac} . {address}' for tap, (address, mac) in zip(out["ports"], out["leases"]))
    assert all(tap.startswith("vg") and len(tap) <= 15 for tap in out["ports"])
    assert first in out["after_deploy"] and second in out["after_deploy"]
    assert first in out["after_destroy"] and second not in out["after_destroy"]
    assert first in out["after_restart"] and second not in out["after_restart"]
    assert out["report"]["taps_guarded"] == 1 and list(out["ports_after"].values()) == out["ports"][:1]
    assert out["guard_off"] == {"parts_guard": True, "listing": ""}


def test_syncs_at_once_from_many_deployments_lose_no_binding(site):
    """Deployments bind their taps on their own threads: each sync reads the bindings under the guard's lock, so
    the last one written holds every binding made before it (a list read before the lock could be older than
    the table it replaces, and leave a running guest's tap unbound: unguarded)."""
    import threading
    bound: list[Binding] = []
    lock = threading.Lock()

    def deploy(n: int) -> None:
        with lock:
            bound.append(Binding(f"vgt{n:02d}0", f"52:54:00:79:01:{n:02x}", f"10.79.1.{n + 10}"))
        site.guard.sync(lambda: list(bound))

    threads = [threading.Thread(target=deploy, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    listing = site.guard.listing()
    assert all(f'"{b.tap}" . {b.mac} . {b.address}' in listing for b in bound), listing


def flood_heard(site, frames: int) -> tuple[int, float]:
    """Guest A floods ``frames`` broadcast ARP announcements of its own lease; how many guest B heard, and the
    seconds the flood took."""
    heard = site.in_guest("b", ARP_COUNT, A_MAC, "3")
    took = float(run("ip", "netns", "exec", f"{site.host}-a", sys.executable, "-c", ARP_FLOOD, A_IP, str(frames)))
    out, _ = heard.communicate(timeout=120)
    return int(out.strip()), took


def test_a_guests_broadcast_flood_is_bounded_per_second(site):
    """Every port of a bridge receives a broadcast: one guest's flood of valid frames (announcing its own
    lease) reaches its neighbour only at guard_broadcast_rate a second after a burst of twice that."""
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    site.guard = PortGuard("vmgridbr0", owner="node-a", netns=site.host, broadcast_rate=5)
    site.guard.sync([Binding(a, A_MAC, A_IP), Binding(b, B_MAC, B_IP)])
    frames = 300
    heard, took = flood_heard(site, frames)
    assert 1 <= heard <= 2 * 5 + 5 * (took + 4), (heard, took)      # the burst, then 5 a second (+ the count's wait)
    assert heard < frames

    # the same flood through ports the guard does not hold: every frame reaches the neighbour
    site.guard.sync([])
    heard, _ = flood_heard(site, frames)
    assert heard == frames


def test_a_guest_cannot_answer_as_a_dhcp_server(site):
    """A guest sending from its own lease, but from port 67 (a DHCP server offering addresses) or to port 68 (where
    DHCP clients listen: busybox udhcpc takes an answer from any source port), is dropped; ordinary UDP between the
    same addresses reaches the neighbour."""
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    site.guard.sync([Binding(a, A_MAC, A_IP), Binding(b, B_MAC, B_IP)])
    for sport, dport, expected in (("67", "68", "nothing"), ("1067", "68", "nothing"), ("1067", "1068", "offer")):
        receiver = site.in_guest("b", UDP_RECEIVE, "3" if expected == "nothing" else "60", dport)
        run("ip", "netns", "exec", f"{site.host}-a", sys.executable, "-c", UDP_SEND, A_IP, sport, B_IP, dport)
        out, _ = receiver.communicate(timeout=120)
        assert out.strip() == expected, (sport, dport, out)


def test_a_broadcast_rate_that_is_not_a_whole_number_of_frames_is_refused():
    for bad in (-1, 2.5, True, "100"):
        with pytest.raises(NetworkSetupError, match="guard_broadcast_rate"):
            PortGuard("vmgridbr0", broadcast_rate=bad)
    assert "limit rate" not in PortGuard("vmgridbr0", broadcast_rate=0).script(())


# unicast frames of EtherType 0x88b5 (local experimental) to MAC argv[1], sent by the host through the bridge itself
HOST_SEND = textwrap.dedent("""
    import socket, sys
    dst = bytes.fromhex(sys.argv[1].replace(":", ""))
    src = bytes.fromhex(open("/sys/class/net/vmgridbr0/address").read().strip().replace(":", ""))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(("vmgridbr0", 0))
    for _ in range(3):
        s.send(dst + src + b"\\x88\\xb5" + b"meant for " + sys.argv[1].encode() + b"\\x00" * 32)
""")
# the destination MACs of the 0x88b5 frames this namespace's eth0 (promiscuous, as a guest's NIC can be) receives
# within argv[1] seconds, or until it has seen each of argv[2:]
SNIFF = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5)); s.bind(("eth0", 0))
    deadline, expected = time.monotonic() + float(sys.argv[1]), set(sys.argv[2:])
    print("ready", flush=True)
    seen = set()
    while not (expected and expected <= seen) and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            seen.add(s.recv(2048)[:6].hex(":"))
        except socket.timeout:
            break
    print(" ".join(sorted(seen)) or "nothing", flush=True)
""")


def sniffed(site, receivers: dict[str, tuple[str, ...]], *destinations: str) -> dict[str, str]:
    """The host sends frames to each of ``destinations``; what each guest of ``receivers`` saw (each waits for
    the MACs it is given, 60 s at most, or listens 3 s when given none)."""
    procs = {name: site.in_guest(name, SNIFF, "60" if want else "3", *want) for name, want in receivers.items()}
    for dst in destinations:
        run("ip", "netns", "exec", site.host, sys.executable, "-c", HOST_SEND, dst)
    return {name: proc.communicate(timeout=120)[0].strip() for name, proc in procs.items()}


def test_a_guest_receives_no_unicast_frame_meant_for_another_mac(site):
    """A bridge floods a frame for a MAC it has not learned to every port. A frame for guest B, whose entry the
    bridge does not hold (here: B's port learns nothing), or for a MAC nobody holds, must not reach guest A,
    even with A's NIC promiscuous; B still gets its own."""
    a = site.guest("a", A_MAC, A_IP)
    b = site.guest("b", B_MAC, B_IP)
    c = site.guest("c", "52:54:00:79:00:0c", FREE_IP)
    for tap in (a, b, c):
        run("ip", "-n", site.host, "link", "set", tap, "type", "bridge_slave", "learning", "off", "fdb_flush")
    run("ip", "-n", f"{site.host}-a", "link", "set", "eth0", "promisc", "on")
    run("ip", "-n", site.host, "link", "set", c, "nomaster")          # C's MAC is now held by no port
    site.guard.sync([Binding(a, A_MAC, A_IP), Binding(b, B_MAC, B_IP)])
    assert B_MAC not in run("bridge", "-n", site.host, "fdb", "show", "br", "vmgridbr0")
    seen = sniffed(site, {"a": (), "b": (B_MAC,)}, B_MAC, "52:54:00:79:00:0c")
    assert seen == {"a": "nothing", "b": B_MAC}, seen

    # the same frames through ports the guard does not hold: flooded to A as well, so the test can fail
    site.guard.sync([])
    seen = sniffed(site, {"a": (B_MAC, "52:54:00:79:00:0c"), "b": (B_MAC,)}, B_MAC, "52:54:00:79:00:0c")
    assert seen["a"] == f"{B_MAC} 52:54:00:79:00:0c", seen
