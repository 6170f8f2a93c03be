"""guestd's ``migrated`` (guestd/migrated.py): a migrated instance takes the target node's lease, clock and
token, keeps its processes and its grid container's key, and asks for a certificate for the new address.

FakeSystem where the real operation would change the test machine (clock, addresses); the MAC change is
the kernel's (a fake /sys shows the new MAC); the grid step runs the runtime's real key module.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from guestd import migrated, protocol
from guestd.context import ContextError, validate
from guestd.daemon import Guestd
from guestd.steps import Environment, grid, run_all
from security.pki import GridCA
from services.vmmanager import guestcred
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.context import build_context

from guestd_fakes import FakeSystem, fake_roots
from test_guestd_rewake import FakePort

OLD_MAC, NEW_MAC = "52:54:00:0a:0b:0c", "52:54:00:0a:0b:99"
OLD, NEW = "T" * 24, "N" * 24
OWNER = "/O=Grid/OU=vmgrid/CN=alice"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    ca = GridCA.create(tmp_path_factory.mktemp("site") / "ca", "/O=Grid/OU=vmgrid/CN=Site CA")
    return VMManagerConfig(guest_ca=str(ca.directory))


def context(config, mac=OLD_MAC, address="10.77.0.10", gateway="10.77.0.1", token=OLD, instance="inst-1", dns=(),
            container=None):
    return build_context(instance=instance, hostname="guest-1", mac=mac, address=address, netmask="255.255.255.0",
                         gateway=gateway, token=token, dns=list(dns), grid=guestcred.grid_context(config, OWNER),
                         container_command=container)


@pytest.fixture
def daemon(tmp_path, monkeypatch, site):
    """A guestd that booted as inst-1 at the source node's lease, its grid container configured."""
    roots = fake_roots(tmp_path, nics={"eth0": OLD_MAC})
    (roots.etc / "vmgrid").mkdir(parents=True, exist_ok=True)
    (roots.etc / "vmgrid" / "jobs.toml").write_text((REPO / "guestd/image/recipes/emboss/jobs.toml").read_text())
    (roots.proc / "sys" / "kernel" / "random").mkdir(parents=True)
    (roots.proc / "sys" / "kernel" / "random" / "boot_id").write_text("b00t-1\n")
    env = Environment(FakeSystem(roots), roots)
    env.state["grid_keygen"] = (sys.executable, "-m", "services.jobs.guestkey")
    g = Guestd(env, None, [])
    g.port = FakePort()
    g.context, g.context_source = context(site, container=["sleep", "600"]), "cdrom"
    g.port.set_token(OLD)
    g.results, g.ready = run_all(g.context, env), True
    pem, _ = guestcred.issue(site, g.results["grid"].detail, "10.77.0.10", "guest-1")
    grid.install_certificate(env, {"certificate": pem})

    def fake_set_mac(system, ifname, mac):     # what the kernel does: the interface shows the new address
        (roots.sys / "class" / "net" / ifname / "address").write_text(mac + "\n")

    monkeypatch.setattr(migrated, "set_mac", fake_set_mac)
    yield g
    if env.state.get("container") is not None:
        env.state["container"].stop()


def message(ctx, token=OLD, when=None):
    return {"op": "migrated", "token": token, "context": json.loads(ctx.to_json()),
            "time": time.time() if when is None else when}


def test_migrated_sets_the_new_mac_address_gateway_dns_clock_and_token(daemon, site):
    key = grid.paths(daemon.env)["key"].read_bytes()
    host_time = time.time() + 3600
    new = context(site, mac=NEW_MAC, address="10.77.0.20", gateway="10.77.0.2", token=NEW, dns=["10.77.0.2"])
    status = migrated.migrated(daemon, message(new, when=host_time))
    steps = status["steps"]
    assert status["ready"] and status["context_source"] == "migrated" and status["instance"] == "inst-1"
    assert steps["migrated"]["ok"] and steps["migrated"]["detail"] == {
        "interface": "eth0", "mac_before": OLD_MAC, "mac": NEW_MAC}
    assert (daemon.env.roots.sys / "class/net/eth0/address").read_text().strip() == NEW_MAC
    assert steps["network"]["detail"]["address"] == "10.77.0.20" and daemon.env.system.gateway == "10.77.0.2"
    assert (daemon.env.roots.etc / "resolv.conf").read_text() == "nameserver 10.77.0.2\n"
    assert ("set_clock", host_time) in daemon.env.system.calls, "the clock is stepped to the host's"
    assert status["boot_id"] == "b00t-1"
    assert daemon.port.token == NEW and daemon.port.sent and all(m["token"] == NEW for m in daemon.port.sent)
    # the grid container: same key, its configuration and a new request for the new address
    assert grid.paths(daemon.env)["key"].read_bytes() == key
    conf = (grid.paths(daemon.env)["config"]).read_text()
    assert '"https://10.77.0.20:8443"' in conf and "10.77.0.10" not in conf
    detail = guestcred.requested(status)
    _, record = guestcred.issue(site, detail, "10.77.0.20", "guest-1")
    assert record["dn"] == "/O=Grid/OU=vmgrid-guests/CN=host/10.77.0.20"


def test_migrated_keeps_the_running_container_and_runs_no_first_boot_step(daemon, site):
    sup = daemon.env.state["container"]
    pid = sup.proc.pid
    hostname_before = daemon.env.system.hostname
    daemon.env.system.hostname = "left-alone"
    migrated.migrated(daemon, message(context(site, mac=NEW_MAC, address="10.77.0.20", token=NEW)))
    assert daemon.env.state["container"] is sup and sup.proc.pid == pid and sup.proc.poll() is None
    assert daemon.env.system.hostname == "left-alone", f"the host name step ran again (was {hostname_before})"


def test_a_wrong_token_is_refused_and_changes_nothing(daemon, site):
    with pytest.raises(ContextError, match="current token"):
        migrated.migrated(daemon, message(context(site, mac=NEW_MAC, address="10.77.0.20", token=NEW), token=NEW))
    assert daemon.context.network.address == "10.77.0.10" and daemon.port.token == OLD
    assert (daemon.env.roots.sys / "class/net/eth0/address").read_text().strip() == OLD_MAC


def test_a_context_for_another_instance_or_a_warm_template_is_refused(daemon, site):
    with pytest.raises(ContextError, match="moves instance inst-1"):
        migrated.migrated(daemon, message(context(site, instance="inst-2", token=NEW)))
    warm = {**json.loads(context(site, token=NEW).to_json()), "warm": True}
    with pytest.raises(ContextError, match="moves instance"):
        migrated.migrated(daemon, {"op": "migrated", "token": OLD, "context": warm, "time": time.time()})
    assert daemon.port.token == OLD


def test_a_guest_still_booting_or_a_warm_template_takes_no_migrated(daemon, site):
    daemon.ready = False
    with pytest.raises(ContextError, match="ready instance"):
        migrated.migrated(daemon, message(context(site, token=NEW)))
    daemon.ready, daemon.context = True, validate({**json.loads(daemon.context.to_json()), "warm": True})
    with pytest.raises(ContextError, match="ready instance"):
        migrated.migrated(daemon, message(context(site, token=NEW)))


def test_a_second_migration_authenticates_with_the_token_of_the_first(daemon, site):
    migrated.migrated(daemon, message(context(site, mac=NEW_MAC, address="10.77.0.20", token=NEW)))
    back = context(site, mac=OLD_MAC, address="10.77.0.11", token="M" * 24)
    with pytest.raises(ContextError):
        migrated.migrated(daemon, message(back, token=OLD))
    assert migrated.migrated(daemon, message(back, token=NEW))["steps"]["network"]["detail"]["address"] == "10.77.0.11"


@pytest.mark.parametrize("body, why", [
    ({"context": {}, "time": 1.0}, "current 'token'"),
    ({"token": OLD, "time": 1.0}, "'context' object"),
    ({"token": OLD, "context": {}}, "host 'time'"),
])
def test_the_protocol_refuses_a_migrated_message_without_its_parts(body, why):
    line = protocol.encode({"op": "migrated", **body})
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.decode(line, protocol.HOST_OPS)
    assert "migrated" not in protocol.GUEST_OPS, "a guest cannot send it"


# -- the node's half (services/vmmanager/migration.py _fixup) against this guestd -----------------------------------
class GuestdChannel:
    """The guest channel as the node uses it, answered by the guestd above (what the virtio-serial port carries:
    the request's fields in, the handler's result or its refusal out)."""

    def __init__(self, daemon) -> None:
        self.daemon, self.asked = daemon, []

    def request(self, op, timeout=5.0, cancel=None, **fields):
        from services.vmmanager.vmm.errors import GuestChannelError
        self.asked.append((op, fields))
        protocol.decode(protocol.encode({"op": op, "id": 1, **fields}), protocol.HOST_OPS)
        try:
            if op == "migrated":
                return migrated.migrated(self.daemon, {"op": op, **fields})
            if op == "certificate":
                return grid.install_certificate(self.daemon.env, fields)
        except Exception as exc:
            raise GuestChannelError(f"guestd refused {op}: {exc}") from None
        raise AssertionError(op)


@pytest.fixture
def target(daemon, site, tmp_path):
    """A target node as _fixup sees it: its lease for inst-1, the token the source sent in its home."""
    import ipaddress
    from types import SimpleNamespace

    from services.vmmanager import migration
    home = tmp_path / "home"
    home.mkdir()
    (home / migration.GUEST_TOKEN).write_text(OLD)
    channel = GuestdChannel(daemon)
    config = VMManagerConfig(guest_ca=site.guest_ca, dns=["10.77.0.2"], migration_fixup_timeout=5.0)
    inst = SimpleNamespace(key="inst-1", identifier="guest_1", mac=NEW_MAC, address="10.77.0.20", token=NEW,
                           owner=OWNER)
    node = SimpleNamespace(
        parts=SimpleNamespace(home=lambda key: home), config=config,
        pool=SimpleNamespace(network=ipaddress.ip_network("10.77.0.0/24"), gateway="10.77.0.1"),
        vmm=SimpleNamespace(capabilities=SimpleNamespace(guest_channel=True), guest_channel=lambda key: channel),
        store=SimpleNamespace(get=lambda key: inst if key == "inst-1" else None))
    return SimpleNamespace(node=node, inst=inst, home=home, channel=channel, migration=migration)


def test_the_fixup_readdresses_guestd_and_certifies_the_job_service_at_the_new_address(target):
    before = time.time()
    note = target.migration._fixup(target.node, target.inst, running=True)
    assert note.startswith(f"migrated here; guestd set address 10.77.0.20, MAC {NEW_MAC} and the clock"), note
    assert "address 10.77.0.20/255.255.255.0 on eth0" in note
    op, fields = target.channel.asked[0]
    assert op == "migrated" and fields["token"] == OLD and fields["context"]["token"] == NEW
    assert before <= fields["time"] <= time.time(), "the host's clock as the request left"
    record = guestcred.job_service(target.home)
    assert record["url"] == "https://10.77.0.20:8443/wsrf/services/JobService"
    assert record["dn"] == "/O=Grid/OU=vmgrid-guests/CN=host/10.77.0.20"
    assert f"job service {record['url']} (restarting)" in note
    assert not (target.home / target.migration.GUEST_TOKEN).exists(), "the token is used once"


def test_a_guest_that_arrives_paused_is_readdressed_when_it_first_runs(target):
    note = target.migration._fixup(target.node, target.inst, running=False)
    assert "not yet told to guestd" in note and target.channel.asked == []
    assert target.migration.readdress_pending(target.node, "inst-1").startswith("migrated here; guestd set address")
    assert target.migration.readdress_pending(target.node, "inst-1") is None, "nothing pending any more"


def test_a_guest_refusing_or_a_missing_token_is_a_note_and_no_certificate(target, daemon):
    (target.home / target.migration.GUEST_TOKEN).write_text("W" * 24)
    note = target.migration._fixup(target.node, target.inst, running=True)
    assert "guestd did not take the new address 10.77.0.20" in note and "current token" in note, note
    assert guestcred.job_service(target.home) is None and daemon.context.network.address == "10.77.0.10"
    note = target.migration._fixup(target.node, target.inst, running=True)
    assert "the source sent no guest token" in note


def test_a_guest_moved_on_before_it_ran_is_proved_to_with_the_token_it_still_holds(target):
    target.migration._fixup(target.node, target.inst, running=False)     # arrived saved; moves on, never ran here
    assert target.migration._guest_token(target.node, target.inst) == OLD
    (target.home / target.migration.GUEST_TOKEN).unlink()
    assert target.migration._guest_token(target.node, target.inst) == NEW
