"""guestd's boot steps. Clock and power-off use FakeSystem (changing the test machine's clock or powering
it off is not possible here); the network and hostname steps also run for real, as root, inside network
and UTS namespaces made for the test, so the real ioctls and sethostname are exercised."""
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

from guestd.steps import Environment, clock, container, hostname, network, power, report, run_all
from services.vmmanager.context import build_context

from guestd_fakes import FakeSystem, fake_roots

MAC = "52:54:00:0a:0b:0c"
REPO = Path(__file__).resolve().parents[3]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="namespaces need root and unshare(1)")


def ctx(**kw):
    args = dict(instance="i-9", hostname="worker9.grid.example", mac=MAC, address="10.9.0.9",
                netmask="255.255.0.0", gateway="10.9.0.1", dns=["10.9.0.2", "10.9.0.3"], token="K" * 24)
    args.update(kw)
    return build_context(**args)


@pytest.fixture
def env(tmp_path):
    roots = fake_roots(tmp_path, nics={"eth0": "52:54:00:ff:ff:ff", "eth1": MAC})
    return Environment(FakeSystem(roots), roots)


def test_clock_is_moved_forward_to_the_context_time(env):
    env.system.offset = -86400.0                     # a guest clock a day behind (a stale RTC)
    result = clock.handle(ctx(), env)
    assert result.ok and result.detail["set"] is True and result.detail["offset_before"] < -80000
    assert abs(env.system.now() - time.time()) < 5


def test_clock_ahead_of_the_context_is_left_alone(env):
    c = ctx(now=time.time() - 60)                    # the context was built a minute before boot
    result = clock.handle(c, env)
    assert result.ok and result.detail["set"] is False and env.system.calls == []


def test_set_time_request_reports_the_offset_it_corrected(env):
    env.system.offset = -5.0
    host_now = time.time()
    result = clock.set_time(env, host_now)
    assert -5.5 < result["offset_before"] < -4.5
    assert abs(result["time"] - time.time()) < 0.5


def test_hostname_step_sets_the_name_and_files(env):
    result = hostname.handle(ctx(), env)
    assert result.ok and env.system.hostname == "worker9.grid.example"
    assert (env.roots.etc / "hostname").read_text() == "worker9.grid.example\n"
    hosts = (env.roots.etc / "hosts").read_text()
    assert "127.0.0.1\tlocalhost" in hosts and "10.9.0.9\tworker9.grid.example worker9" in hosts
    hostname.handle(ctx(address="10.9.0.10"), env)   # a second run replaces its line, never piles up
    assert (env.roots.etc / "hosts").read_text().count("worker9") == 2


def test_network_step_configures_the_nic_with_the_context_mac(env):
    result = network.handle(ctx(), env)
    assert result.ok, result.error
    assert result.detail["interface"] == "eth1"
    assert env.system.addresses == {"eth1": ("10.9.0.9", "255.255.0.0")}
    assert env.system.gateway == "10.9.0.1" and "lo" in env.system.up
    assert (env.roots.etc / "resolv.conf").read_text() == "nameserver 10.9.0.2\nnameserver 10.9.0.3\n"


def test_network_step_fails_cleanly_without_that_mac(env):
    result = network.handle(ctx(mac="52:54:00:00:00:01"), env)
    assert not result.ok and "52:54:00:00:00:01" in result.error
    assert env.system.addresses == {}


@needs_root
def test_network_step_for_real_in_a_network_namespace(tmp_path):
    """The real System: SIOCSIFADDR/SIOCSIFNETMASK/SIOCSIFFLAGS/SIOCADDRT on a veth in a fresh namespace."""
    (tmp_path / "context.json").write_bytes(ctx().to_json())
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from guestd.context import loads
        from guestd.steps import Environment, network
        from guestd.system import Roots, System
        roots = Roots(etc=Path({str(tmp_path)!r}))
        c = loads(Path({str(tmp_path)!r}, "context.json").read_bytes())
        r = network.handle(c, Environment(System(roots), roots))
        print(json.dumps({{"ok": r.ok, "detail": r.detail, "error": r.error}}))
    """)
    shell = (f"mount -t sysfs sysfs /sys && ip link add v0 address {MAC} type veth peer name v1 && "
             f"ip link set v1 up && {sys.executable} -c \"$SCRIPT\" && ip -4 addr show v0 && ip route")
    proc = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", shell], capture_output=True, text=True,
                          env={**os.environ, "SCRIPT": script}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, _, rest = proc.stdout.partition("\n")
    result = json.loads(first)
    assert result["ok"], result["error"]
    assert result["detail"]["interface"] == "v0" and result["detail"]["gateway"] == "10.9.0.1"
    assert "inet 10.9.0.9/16" in rest and "default via 10.9.0.1 dev v0" in rest


@needs_root
def test_hostname_step_for_real_in_a_uts_namespace(tmp_path):
    (tmp_path / "context.json").write_bytes(ctx().to_json())
    (tmp_path / "hosts").write_text("127.0.0.1\tlocalhost\n")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from guestd.context import loads
        from guestd.steps import Environment, hostname
        from guestd.system import Roots, System
        roots = Roots(etc=Path({str(tmp_path)!r}))
        c = loads(Path({str(tmp_path)!r}, "context.json").read_bytes())
        assert hostname.handle(c, Environment(System(roots), roots)).ok
    """)
    proc = subprocess.run(["unshare", "--uts", "sh", "-c", f"{sys.executable} -c \"$SCRIPT\" && hostname"],
                          capture_output=True, text=True, env={**os.environ, "SCRIPT": script}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "worker9.grid.example"
    assert os.uname().nodename != "worker9.grid.example"      # the test machine's name is untouched


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()


def test_container_step_starts_the_command_and_keeps_it_running(env, tmp_path):
    marker = tmp_path / "runs"
    changes = []
    env.state["on_container_change"] = changes.append
    c = ctx(container_command=["/bin/sh", "-c", f"echo run >> {marker}; exit 3"], container_restart="always")
    result = container.handle(c, env)
    sup = env.state["container"]
    try:
        assert result.ok and result.detail["configured"] and result.detail["pid"]
        # the third run's line comes after its restart is counted: wait for both (a loaded run read 'run' twice)
        assert _wait(lambda: sup.restarts >= 2 and marker.exists() and marker.read_text().count("run") >= 3,
                     timeout=30), ("the container was not restarted", sup.restarts)
        assert sup.last_exit == 3
        assert {"exited", "restarted"} <= {c.get("event") for c in changes}
    finally:
        sup.stop()


def test_container_restart_policies(env, tmp_path):
    for policy, code, restarts in (("never", 1, False), ("on-failure", 0, False), ("on-failure", 2, True)):
        env.state.pop("container", None)
        c = ctx(container_command=["/bin/sh", "-c", f"exit {code}"], container_restart=policy)
        container.handle(c, env)
        sup = env.state["container"]
        try:
            if restarts:
                assert _wait(lambda: sup.restarts >= 1)
            else:
                assert _wait(lambda: sup.last_exit == code)
                time.sleep(1.0)
                assert sup.restarts == 0
        finally:
            sup.stop()


def test_container_stop_ends_a_long_running_command(env):
    container.handle(ctx(container_command=["sleep", "300"]), env)
    sup = env.state["container"]
    assert sup.status()["running"]
    sup.stop()
    assert not sup.status()["running"] and sup.restarts == 0


def test_no_container_configured_is_not_an_error(env):
    result = container.handle(ctx(), env)
    assert result.ok and result.detail == {"configured": False}


def test_a_missing_container_binary_is_a_failed_step(env):
    result = container.handle(ctx(container_command=["/nonexistent/container"]), env)
    assert not result.ok and "nonexistent" in result.error


def test_power_button_press_is_recognised(env, tmp_path):
    """A fake evdev device: input_event records as the kernel writes them (no real /dev/input here)."""
    (env.roots.sys / "class" / "input" / "event3" / "device").mkdir(parents=True)
    (env.roots.sys / "class" / "input" / "event3" / "device" / "name").write_text("Power Button\n")
    (env.roots.sys / "class" / "input" / "event1" / "device").mkdir(parents=True)
    (env.roots.sys / "class" / "input" / "event1" / "device" / "name").write_text("AT Translated Keyboard\n")
    assert power.power_buttons(env) == [env.roots.dev / "input" / "event3"]
    device = tmp_path / "event3"
    syn = power.EVENT.pack(0, 0, 0, 0, 0)
    device.write_bytes(syn + power.EVENT.pack(1, 2, power.EV_KEY, 30, 1) + power.EVENT.pack(1, 2, power.EV_KEY, power.KEY_POWER, 1))
    assert power.wait_for_press(device) is True
    device.write_bytes(power.EVENT.pack(1, 2, power.EV_KEY, power.KEY_POWER, 0))   # a release only
    assert power.wait_for_press(device) is False


def test_run_all_runs_every_step_and_never_raises(env):
    results = run_all(ctx(mac="52:54:00:00:00:02"), env)
    assert list(results) == ["clock", "hostname", "network", "grid", "container"]
    assert results["network"].ok is False and results["hostname"].ok is True


def test_report_sends_each_step_then_ready_with_the_token(env):
    class Port:
        def __init__(self):
            self.sent, self.token = [], None

        def set_token(self, token):
            self.token = token

        def send(self, message):
            self.sent.append(message)

    port, c = Port(), ctx()
    results = run_all(c, env)
    ready = report.handle(c, results, port)
    assert port.token == c.token
    assert [m["op"] for m in port.sent] == ["report"] * 5 + ["ready"]
    assert ready["ok"] is True and set(ready["steps"]) == set(results)
