"""The client's notification consumer (client/notifications.py) hears only the producers it subscribed to: a
Notify about the watched instance signed by any other grid host credential (another node's, a guest container's,
one naming the producer's host name in another OU, a proxy of the producer's own credential) is refused with a
line saying why, and the real node's changes still come; `vmgrid vm watch` likewise."""
from __future__ import annotations

import os
import time

import pytest
import requests

from client.notifications import NotificationConsumer
from client.soap import GridServiceClient
from client.vmmanager import VMManagerClient
from security.pki import Credential, make_proxy
from security.wssec import sign_envelope
from services.vmmanager.wire import state_change_envelope
from tests.fixtures.watch import vm_watch

pytestmark = pytest.mark.timeout(300)


def other_signers(pki) -> dict[str, Credential]:
    """Trusted credentials that are not the node's own host credential yet name its host (localhost): each passed
    the consumer's old check (the host of the producer URL), none is the producer the client subscribed to."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from security.pki import new_key
    from services.vmmanager.guestcred import issue
    from services.vmmanager.service import VMManagerConfig

    key = new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    pem, _ = issue(VMManagerConfig(node="node1", guest_ca=str(pki.ca.directory)),
                   {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "port": 8443}, "localhost")
    return {"another node": pki.issue_host("127.0.0.1"),                       # host/127.0.0.1: a loopback name too
            "another OU": pki.issue_host("localhost", ou="elsewhere"),
            "a guest": Credential(x509.load_pem_x509_certificate(pem.encode()), key, ()),
            "a proxy of the node": make_proxy(pki.host, hours=1)}


def forged(consumer_url: str, node_url: str, key: str, signer: Credential, new: str = "Destroyed") -> bytes:
    return sign_envelope(state_change_envelope(consumer_url, node_url, key, "watched", "Running", new, time.time()),
                         signer)


def test_only_the_node_subscribed_to_is_heard(vm_grid, grid_pki, caplog):
    vm = vm_grid.vmm(grid_pki.alice)
    ref = vm.deploy(vm_grid.register(), "watched", 600, wait=True).ref
    with NotificationConsumer(grid_pki.trust()) as consumer:
        assert consumer.subscribe(vm, ref).startswith("sub-")
        assert consumer.producers == {grid_pki.host_dn}
        for what, signer in other_signers(grid_pki).items():
            response = requests.post(consumer.url, data=forged(consumer.url, vm_grid.node_url(), ref.key, signer))
            assert response.status_code == 500 and "signed by" in response.text, (what, response.text)
            assert f"subscribed to only ({grid_pki.host_dn})" in response.text, (what, response.text)
            shown = f"a proxy {signer.subject}" if "proxy" in what else signer.subject
            assert f"notification refused: a Notify signed by {shown}; this consumer takes" in caplog.text, what
        assert consumer.refused == 4 and consumer.changes.empty()
        vm.pause(ref)                                    # the node itself: heard
        change = consumer.wait(lambda c: c.new == "Paused")
        assert (change.key, change.old, change.signer) == (ref.key, "Running", grid_pki.host_dn)
        vm.destroy(ref)
        assert consumer.wait(lambda c: c.new == "Destroyed").old == "Paused"


def test_a_consumer_subscribed_to_nothing_takes_nothing_and_an_unreadable_request_is_refused(grid_pki):
    with NotificationConsumer(grid_pki.trust()) as consumer:
        data = forged(consumer.url, "https://localhost:8443/wsrf/services/VMManagerService", "inst-" + "0" * 32,
                      grid_pki.host)
        response = requests.post(consumer.url, data=data)
        assert response.status_code == 500 and "it subscribed to no producer" in response.text
        response = requests.post(consumer.url, data=b"<x/>", headers={"Content-Length": "many"})
        assert response.status_code in (400, 500)
        consumer.expect(grid_pki.host_dn)              # the same producer once expected: taken
        data = forged(consumer.url, "https://localhost:8443/wsrf/services/VMManagerService", "inst-" + "0" * 32,
                      grid_pki.host)
        assert requests.post(consumer.url, data=data).status_code == 200
        assert consumer.changes.get(timeout=5).signer == grid_pki.host_dn


def test_vmgrid_vm_watch_refuses_a_change_another_host_signs(vm_grid, grid_pki):
    """`vmgrid vm watch` showed any change whose signer named the node's host: a host certificate of another OU
    naming localhost made the watch print "Running -> Destroyed" and end while the instance ran on. It now says
    the Notify was refused and shows only the node's own changes."""
    vm = vm_grid.vmm(grid_pki.alice)
    ref = vm.deploy(vm_grid.register(), "cli-watched", 600, wait=True).ref
    env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": vm_grid.node_url()}
    with vm_watch("cli-watched", env) as watch:
        other = grid_pki.issue_host("localhost", ou="elsewhere")
        response = requests.post(watch.consumer, data=forged(watch.consumer, vm_grid.node_url(), ref.key, other))
        assert response.status_code == 500
        vm.pause(ref)
        vm.destroy(ref)
        out, err = watch.finish()
    assert watch.returncode == 0, err
    assert "notification refused: a Notify signed by /O=Grid/OU=elsewhere/CN=host/localhost" in err, err
    assert "OU=elsewhere" not in out, out
    assert [line.split(": ", 1)[1].split(" (")[0] for line in out.rstrip().splitlines()] == [
        "Running -> Paused", "Paused -> Destroyed"], out


@pytest.fixture
def two_hosts(grid_pki, tmp_path):
    """Two nodes with host credentials of their own: node1 host/localhost, node2 host/127.0.0.1 (its URL
    https://127.0.0.1:PORT), as two machines of a site have."""
    import dataclasses

    from services.vmmanager.vmm import LibvirtTestDriver
    from tests.fixtures.grid import start_grid

    grid = start_grid(grid_pki, tmp_path / "grid")
    try:
        second = grid_pki.ca.issue_host("127.0.0.1", key=grid_pki.keys.take(), out_dir=tmp_path / "host2")
        grid.pki = dataclasses.replace(grid_pki, host=second)
        grid.add_node("node2", "10.99.0.100-10.99.0.189", vmm=LibvirtTestDriver.private_node())
        grid.pki = grid_pki
        grid.image = grid.register(name="two-hosts")
        yield grid, second
    finally:
        grid.close()


def test_vmgrid_vm_watch_hears_the_new_node_after_a_migration_and_no_longer_the_old(two_hosts, grid_pki):
    """The watch hands the producer on with the instance: after the old node's "-> Migrated" and its answer naming
    the new node, the new node's host credential is the one heard (its changes before that were refused: the line
    "now on URL, Running" says the state it answers), and the old node's credential no longer is."""
    grid, second = two_hosts
    target = grid.nodes[1][0].url("VMManagerService")            # the node's own URL: https://127.0.0.1:PORT
    ref = grid.vmm(grid_pki.alice).deploy(grid.image, "mover", 600, wait=True).ref
    env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": grid.node_url(0)}
    with vm_watch("mover", env) as watch:
        moved = grid.vmm(grid_pki.alice).migrate(ref, target)
        assert moved.ref.address == target
        while "now on" not in (line := watch.line()):
            assert line, watch.finish()
        assert line.rstrip().endswith(f"now on {target}, Running"), line
        # the old node's credential speaking for the instance now: refused
        response = requests.post(watch.consumer, data=forged(watch.consumer, grid.node_url(0), ref.key,
                                                             grid_pki.host))
        assert response.status_code == 500 and f"({second.subject})" in response.text, response.text
        there = VMManagerClient(GridServiceClient(target, grid_pki.alice.proxy, grid_pki.trust()))
        there.destroy(moved.ref)
        out, err = watch.finish()
    assert watch.returncode == 0, err
    assert out.rstrip().splitlines()[-1].split(": ", 1)[1] == f"Running -> Destroyed (signed by {second.subject})", out
    assert f"notification refused: a Notify signed by {grid_pki.host_dn}" in err, err
