"""guestd's ``recontext`` (guestd/rewake.py): a warm-snapshot clone takes its instance's identity.

FakeSystem where the real operation would change the test machine (clock, host name, addresses); the
MAC change runs for real on a veth in a network namespace made for the test, and the RNG reseed for real
(it only mixes more randomness into this machine's kernel pool).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from guestd import protocol, rewake
from guestd.context import ContextError, validate
from guestd.daemon import Guestd
from guestd.steps import Environment
from guestd.system import Roots, System, reseed_rng
from services.vmmanager.context import build_context

from guestd_fakes import FakeSystem, fake_roots

TEMPLATE_MAC, MAC = "02:aa:bb:cc:dd:ee", "52:54:00:0a:0b:0c"
REPO = Path(__file__).resolve().parents[3]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="namespaces and RNDADDENTROPY need root")


class FakePort:
    def __init__(self) -> None:
        self.token, self.sent = "", []

    def set_token(self, token: str) -> None:
        self.token = token

    def send(self, message) -> None:
        self.sent.append({**message, "token": self.token})

    def handle(self, op, fn) -> None:
        pass


def template_context():
    c = build_context(instance="warm-abc", hostname="vmgrid-warm", mac=TEMPLATE_MAC, address="169.254.0.2",
                      netmask="255.255.0.0", token="T" * 24)
    return validate({**json.loads(c.to_json()), "warm": True})


def instance_context(**kw):
    args = dict(instance="inst-1", hostname="inst-1", mac=MAC, address="10.9.0.9", netmask="255.255.255.0",
                gateway="10.9.0.1", token="N" * 24)
    args.update(kw)
    return json.loads(build_context(**args).to_json())


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    roots = fake_roots(tmp_path, nics={"eth0": TEMPLATE_MAC})
    g = Guestd(Environment(FakeSystem(roots), roots), None, [])
    g.port = FakePort()
    g.context, g.ready = template_context(), True
    reseeds = []

    def fake_set_mac(system, ifname, mac):     # what the kernel does: the interface shows the new address
        (roots.sys / "class" / "net" / ifname / "address").write_text(mac + "\n")

    monkeypatch.setattr(rewake, "set_mac", fake_set_mac)
    monkeypatch.setattr(rewake, "reseed_rng", lambda system, seed: reseeds.append(seed))
    g.reseeds = reseeds
    return g


def message(ctx, seed="ab" * 64, when=None):
    return {"op": "recontext", "context": ctx, "seed": seed, "time": time.time() if when is None else when}


def test_recontext_gives_the_clone_its_identity_and_runs_every_step(daemon):
    host_time = time.time() + 3600
    status = rewake.recontext(daemon, message(instance_context(), when=host_time))
    assert status["ready"] and status["instance"] == "inst-1" and status["context_source"] == "recontext"
    steps = status["steps"]
    assert all(s["ok"] for s in steps.values()), steps
    assert steps["identity"]["detail"]["mac"] == MAC and steps["identity"]["detail"]["interface"] == "eth0"
    assert steps["network"]["detail"]["address"] == "10.9.0.9"
    assert daemon.env.system.hostname == "inst-1"
    assert abs(daemon.env.system.now() - host_time) < 5, "the clock comes from the host's message"
    assert len(daemon.reseeds) == 1 and daemon.reseeds[0].startswith(bytes.fromhex("ab" * 64)), \
        "the host's seed (and the guest's own randomness) went into the kernel RNG"
    assert daemon.port.token == "N" * 24
    ready = [m for m in daemon.port.sent if m["op"] == "ready"]
    assert ready and all(m["token"] == "N" * 24 for m in daemon.port.sent), "reports carry the new token"
    assert [m["op"] for m in daemon.port.sent] == ["ready"], \
        "the host waits for the answer: one ready carrying every step's report, no report per step"
    assert set(ready[0]["steps"]) == set(steps)
    seconds = status["recontext_seconds"]
    assert {"clock-restore", "identity", "clock", "hostname", "network", "grid", "container", "report",
            "total"} <= set(seconds), "guestd says where its time went, step by step"
    assert seconds["total"] >= seconds["identity"] + seconds["network"]


def test_two_clones_report_different_random_probes(daemon, tmp_path, monkeypatch):
    probes = {rewake.recontext(daemon, message(instance_context()))["steps"]["identity"]["detail"]["random_probe"]}
    daemon.context, daemon.ready = template_context(), True
    (daemon.env.roots.sys / "class" / "net" / "eth0" / "address").write_text(TEMPLATE_MAC + "\n")
    probes.add(rewake.recontext(daemon, message(instance_context(instance="inst-2")))["steps"]["identity"]
               ["detail"]["random_probe"])
    assert len(probes) == 2


def test_recontext_is_refused_once_the_guest_is_an_instance(daemon):
    rewake.recontext(daemon, message(instance_context()))
    with pytest.raises(ContextError, match="warm-snapshot template only"):
        rewake.recontext(daemon, message(instance_context(instance="inst-2", mac="52:54:00:0a:0b:0d")))
    assert daemon.context.instance == "inst-1"


def test_a_booted_instance_never_takes_a_recontext(daemon):
    daemon.context = validate(instance_context())
    with pytest.raises(ContextError, match="warm-snapshot template only"):
        rewake.recontext(daemon, message(instance_context(instance="other")))


@pytest.mark.parametrize("bad, why", [
    ({"seed": "zz"}, "hexadecimal"),
    ({"seed": "ab" * 8}, "at least"),
    ({"context": {**instance_context(), "warm": True}}, "cannot be a warm template"),
    ({"context": {**instance_context(), "token": "short"}}, "token"),
])
def test_bad_recontext_messages_are_refused_and_change_nothing(daemon, bad, why):
    with pytest.raises(ContextError, match=why):
        rewake.recontext(daemon, {**message(instance_context()), **bad})
    assert daemon.context.instance == "warm-abc" and daemon.ready and daemon.reseeds == []


def test_the_protocol_requires_context_seed_and_time():
    line = protocol.encode({"op": "recontext", "id": 1, "context": {}, "seed": "00", "time": 1.0})
    assert protocol.decode(line, protocol.HOST_OPS)["op"] == "recontext"
    with pytest.raises(protocol.ProtocolError, match="recontext needs"):
        protocol.decode(protocol.encode({"op": "recontext", "id": 1, "context": {}}), protocol.HOST_OPS)


def test_host_keys_are_replaced_where_the_image_has_them(tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    etc = tmp_path / "etc"
    (etc / "ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "ssh" / "ssh_host_ed25519_key")],
                   check=True)
    before = (etc / "ssh" / "ssh_host_ed25519_key.pub").read_text()
    # ssh-keygen -A writes under /etc; run it with the fake etc as its prefix (-f)
    keys = rewake._new_host_keys(etc, prefix=tmp_path)
    assert "ssh_host_ed25519_key" in keys
    assert (etc / "ssh" / "ssh_host_ed25519_key.pub").read_text() != before
    assert rewake._new_host_keys(tmp_path / "no-etc") == []


@needs_root
def test_the_mac_changes_for_real_in_a_network_namespace(tmp_path):
    """set_mac's SIOCSIFHWADDR on a veth in a fresh namespace; the kernel then shows the new address."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from guestd.system import Roots, System, set_mac
        set_mac(System(Roots()), "v0", {MAC!r})
    """)
    shell = (f"ip link add v0 address {TEMPLATE_MAC} type veth peer name v1 && {sys.executable} -c \"$SCRIPT\" "
             f"&& cat /sys/class/net/v0/address")
    proc = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", "mount -t sysfs sysfs /sys && " + shell],
                          capture_output=True, text=True, env={**os.environ, "SCRIPT": script}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == MAC


@needs_root
def test_reseed_rng_for_real():
    """RNDADDENTROPY + RNDRESEEDCRNG on this machine's /dev/urandom (root): accepted by the kernel."""
    reseed_rng(System(Roots()), os.urandom(64))


def test_a_template_zeroes_free_memory_but_keeps_a_margin(tmp_path):
    """Before its save a warm template has the kernel zero-fill its free pages (mapped, faulted in, given
    back): all free memory but 1/8 and at least 16 MiB; nothing with too little free. Its page cache stays
    (no vm.drop_caches: a clone would read from its disk again what its recontext opens)."""
    proc = tmp_path / "proc"
    (proc / "sys" / "vm").mkdir(parents=True)
    roots = Roots(proc=proc)
    (proc / "meminfo").write_text("MemTotal:  262144 kB\nMemFree:    20480 kB\nCached:  40000 kB\n")
    assert rewake.zero_free_memory(roots) == 4                 # 20 MiB free, 16 MiB kept
    (proc / "meminfo").write_text("MemTotal:  262144 kB\nMemFree:    16384 kB\n")
    assert rewake.zero_free_memory(roots, keep_mib=1) == 14    # 1/8 kept when that is more
    (proc / "meminfo").write_text("MemTotal:  262144 kB\nMemFree:    18432 kB\n")
    assert rewake.zero_free_memory(roots) == 0                 # 18 MiB free: not worth it
    assert not (proc / "sys" / "vm" / "drop_caches").exists()


class FixedSource:
    """A context source that gives the same context every time."""
    name = "test"

    def __init__(self, ctx):
        self.ctx = ctx

    def read(self):
        return self.ctx


def test_only_the_real_guest_zeroes_memory_at_a_warm_boot(tmp_path, monkeypatch):
    """Guestd(zero_free=True) is what guestd's main() makes in a guest; a template booted by a test (or an
    instance that is not warm) does not map the test machine's free memory."""
    calls = []
    monkeypatch.setattr(rewake, "zero_free_memory", lambda roots: calls.append(roots) or 0)
    roots = fake_roots(tmp_path, nics={"eth0": TEMPLATE_MAC})

    for zero_free, ctx, want in ((False, template_context(), 0), (True, validate(instance_context()), 0),
                                 (True, template_context(), 1)):
        g = Guestd(Environment(FakeSystem(roots), roots), None, [FixedSource(ctx)], zero_free=zero_free)
        assert g.boot()
        assert len(calls) == want
        calls.clear()


def test_a_recontext_reads_the_configured_interface_instead_of_walking_sysfs(daemon, monkeypatch):
    """The template's network step recorded its interface and the MAC it found there; the clone's identity
    and network steps take that record (and the MAC guestd itself sets) instead of reading sysfs: no walk
    over /sys/class/net and no read of an address file (the first reads after a restore, cold code under
    software emulation). The MAC it set is really on the interface; a record for another interface falls
    back to reading."""
    net = daemon.env.roots.sys / "class" / "net"
    walks, reads = [], []
    real_iterdir, real_read = Path.iterdir, Path.read_text
    monkeypatch.setattr(Path, "iterdir", lambda self: walks.append(self) or real_iterdir(self))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or real_read(self, *a, **k))
    from guestd.steps.network import interface_for, remember
    remember(daemon.env, "eth0", TEMPLATE_MAC)         # what the template's network step left
    status = rewake.recontext(daemon, message(instance_context()))
    assert status["steps"]["network"]["detail"]["interface"] == "eth0" and status["steps"]["network"]["ok"]
    assert net not in walks, "no walk over the interfaces"
    assert not [p for p in reads if net in p.parents], "no read of an interface's address file"
    assert daemon.env.state["interface"] == "eth0" and daemon.env.state["nic"] == ("eth0", MAC)
    assert real_read(net / "eth0" / "address").strip() == MAC
    daemon.env.state["interface"] = "eth9"            # no such interface (any more): the walk finds the MAC
    assert interface_for(daemon.env, MAC) == "eth0" and net in walks
    assert daemon.env.state["nic"] == ("eth0", MAC)


def test_the_random_probe_needs_no_openssl(daemon, monkeypatch):
    """The clone's random probe is a BLAKE2 digest (built into Python): SHA-256 from OpenSSL would make a
    clone initialise libcrypto inside its recontext, cold code under software emulation."""
    import hashlib

    def no_openssl(*args, **kw):
        raise AssertionError("the recontext used OpenSSL's sha256")

    monkeypatch.setattr(hashlib, "sha256", no_openssl)
    status = rewake.recontext(daemon, message(instance_context()))
    probe = status["steps"]["identity"]["detail"]["random_probe"]
    assert status["steps"]["identity"]["ok"] and len(probe) == 32 and int(probe, 16) >= 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a negative nice value needs CAP_SYS_NICE")
def test_the_recontext_runs_urgent_until_its_answer_is_out_and_its_container_does_not(daemon):
    """The recontext thread runs at nice URGENT_NICE from the message until the port has written its answer
    (the hook after_flush); the container it starts (a real process here) runs at nice 0 from its start
    (SCHED_RESET_ON_FORK), and so does anything the container would start."""
    from guestd.system import URGENT_NICE
    hooks, seen = [], {}
    daemon.port.after_flush = hooks.append
    tid = __import__("threading").get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    real_handle = rewake.run_all

    def run_all(ctx, env, seconds=None):
        seen["during"] = os.getpriority(os.PRIO_PROCESS, tid)
        return real_handle(ctx, env, seconds)

    rewake.run_all = run_all
    probe = "import os, subprocess, sys; print(os.getpriority(os.PRIO_PROCESS, 0)); sys.stdout.flush(); " \
            "subprocess.run([sys.executable, '-c', 'import os; print(os.getpriority(os.PRIO_PROCESS, 0))'])"
    try:
        status = rewake.recontext(daemon, message(instance_context(container_command=[sys.executable, "-c", probe],
                                                                   container_restart="never")))
        assert status["ready"], status
        assert seen["during"] == min(before, URGENT_NICE) == status["nice"]
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(before, URGENT_NICE), "until the answer is written"
        sup = daemon.env.state["container"]
        assert sup.proc.wait(60) == 0
        printed = (daemon.env.roots.log / "vmgrid-container.log").read_text().split()
        assert printed == ["0", "0"], "the container and its own child run at the normal priority"
        assert len(hooks) == 1
        hooks[0]()                                     # the port wrote the answer
        assert os.getpriority(os.PRIO_PROCESS, tid) == before
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
    finally:
        rewake.run_all = real_handle
        os.setpriority(os.PRIO_PROCESS, tid, before)
        daemon.env.state.get("container") and daemon.env.state["container"].stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="a negative nice value needs CAP_SYS_NICE")
def test_a_refused_recontext_puts_the_priority_back_at_once(daemon):
    tid = __import__("threading").get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    with pytest.raises(ContextError):
        rewake.recontext(daemon, message(instance_context(), seed="zz"))
    assert os.getpriority(os.PRIO_PROCESS, tid) == before


def test_the_port_runs_its_after_flush_hooks_once_its_answer_is_written():
    """GuestPort.after_flush: the hook runs when every queued message has been written, once."""
    import socket as socketmod
    from guestd.port import GuestPort
    a, b = socketmod.socketpair()
    a.setblocking(False)
    port = GuestPort(fd=a.fileno())
    ran = []
    port.send({"op": "reply", "id": 1, "ok": True, "result": {}})
    port.after_flush(lambda: ran.append(port.pending()))
    port._flush(a.fileno())
    assert ran == [0]
    port._flush(a.fileno())
    assert ran == [0], "once"
    assert b"reply" in b.recv(65536)
    a.close(), b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a negative nice value needs CAP_SYS_NICE")
def test_a_warm_template_raises_its_port_thread_and_the_recontext_puts_it_back(tmp_path):
    """A warm template's port thread waits at the recontext's priority (the clone reads and decodes its first
    message at it); the recontext puts it back once its answer is written; a booted instance's stays."""
    import socket as socketmod
    import threading
    from guestd.port import GuestPort
    from guestd.system import URGENT_NICE
    roots = fake_roots(tmp_path, nics={"eth0": TEMPLATE_MAC})

    for ctx, raised in ((validate(instance_context()), False), (template_context(), True)):
        a, b = socketmod.socketpair()
        port = GuestPort(fd=a.fileno()).start()
        try:
            before = os.getpriority(os.PRIO_PROCESS, port.native_id)
            g = Guestd(Environment(FakeSystem(roots), roots), port, [FixedSource(ctx)])
            assert g.boot()
            assert os.getpriority(os.PRIO_PROCESS, port.native_id) == (min(before, URGENT_NICE) if raised else before)
            assert (g.wake_calm is not None) == raised
            if raised:
                flushed = threading.Event()
                g.wake_calm, calm = None, g.wake_calm

                def put_back():
                    calm()
                    flushed.set()
                g.wake_calm = put_back
                with pytest.raises(ContextError):       # refused (bad seed): put back at once
                    rewake.recontext(g, message(instance_context(), seed="zz"))
                assert flushed.is_set() and g.wake_calm is None
                assert os.getpriority(os.PRIO_PROCESS, port.native_id) == before
        finally:
            port._stop.set()
            port._thread.join(5)
            a.close(), b.close()
