"""What a node's operator got wrong is found when `vmgrid serve` starts, not by the first scientist it fails (trial14
U4, U5): a real `vmgrid serve vmmanager` process with the test driver, each refusal one line naming the file and the
key, exit status 1."""
from __future__ import annotations

import socket
import subprocess

import pytest

from client.localgrid import free_port
from tests.integration.test_serve_config_errors import VMGRID, node_toml, serve

pytestmark = pytest.mark.timeout(300)


def _started(tmp_path, text: str) -> subprocess.Popen:
    """`vmgrid serve vmmanager -c n3.toml`, once it said it serves (or ended: the test then fails naming why)."""
    import os

    (tmp_path / "n3.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    proc = subprocess.Popen([VMGRID, "serve", "vmmanager", "-c", "n3.toml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("vmgrid: serving"):
        proc.kill()
        pytest.fail(f"vmgrid serve did not start: {line}{proc.communicate(timeout=60)[1]}")
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    return proc.communicate(timeout=60)[1]


def test_a_migration_port_another_process_holds_is_refused_at_start(grid_pki, tmp_path):
    """[vmmanager] migration_port held by another process: the start is refused in one line naming the key and the
    port. Before: the node started ("serving"), its migration face opened only at the first migration out, and
    that migration failed "[Errno 98] Address already in use", naming no key, nothing in the node's log."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("vmmanager", "migration_port"): str(port),
                                                                      ("container", "log_file"): '"n3.log"'}))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"vmgrid: n3.toml: [vmmanager] migration_port = {port}: the migration face "
                                         f"cannot listen on it: Address already in use (another process listens on "
                                         f"it: give a free port, or 0 for any)\n")
    assert "Traceback" not in r.stderr


def test_a_free_migration_port_is_listened_on_from_the_start(grid_pki, tmp_path):
    """The port the site's firewall opens answers as a GridFTP server as soon as the node serves (before: nothing
    listened on it until the node was the source of a migration)."""
    port = free_port()
    proc = _started(tmp_path, node_toml(grid_pki, tmp_path / "state", {("vmmanager", "migration_port"): str(port)}))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            assert conn.makefile("rb").readline().startswith(b"220 ")
    finally:
        _stop(proc)


@pytest.mark.parametrize("key, value, message", [
    # a typo: every deployment was then Failed "InternalFault: deployment failed unexpectedly: [Errno 2] No such
    # file or directory: 'nope/certificates'"
    (("vmmanager", "guest_ca"), '"nope"',
     "n3.toml: [vmmanager] guest_ca = 'nope': no `vmgrid ca` directory there (its ca.pem, ca.key and certificates/): "
     "the CA that issues guest containers their certificates, which clients trust"),
    # the trusted directory given for the CA's own directory (it has the CA's certificate, not its key)
    (("vmmanager", "guest_ca"), '"{cert_dir}"',
     "n3.toml: [vmmanager] guest_ca = '{cert_dir}': no `vmgrid ca` directory there (its ca.pem, ca.key and "
     "certificates/): the CA that issues guest containers their certificates, which clients trust"),
    (("vmmanager", "guest_cert_dir"), '"nocerts"',
     "n3.toml: [vmmanager] guest_cert_dir = 'nocerts': no such directory (the trusted CA files given to guests; \"\" "
     "= guest_ca's certificates/)"),
    (("vmmanager", "guest_cert_dir"), '"empty"',
     "n3.toml: [vmmanager] guest_cert_dir = 'empty': no trusted CA certificate (<hash>.0) in it to give to guests"),
])
def test_a_guest_ca_that_deployments_cannot_use_is_refused_at_start(grid_pki, tmp_path, key, value, message):
    """[vmmanager] guest_ca (with guest_cert_dir) as every deployment reads it: one line naming the key, before any
    state. Before: the node started and each deployment failed with an InternalFault."""
    (tmp_path / "empty").mkdir()
    changes = {("vmmanager", "guest_ca"): f'"{grid_pki.ca.directory}"', ("container", "log_file"): '"n3.log"',
               key: value.format(cert_dir=grid_pki.cert_dir)}
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", changes))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: {message.format(cert_dir=grid_pki.cert_dir)}\n"
    assert not (tmp_path / "state").exists()


def test_a_vmgrid_ca_directory_as_guest_ca_starts(grid_pki, tmp_path):
    """The check refuses only what a deployment cannot use: the site's `vmgrid ca` directory, with or without a
    guest_cert_dir of trusted CA files, starts."""
    for extra in ({}, {("vmmanager", "guest_cert_dir"): f'"{grid_pki.cert_dir}"'}):
        changes = {("vmmanager", "guest_ca"): f'"{grid_pki.ca.directory}"', ("container", "log_file"): '"n3.log"',
                   **extra}
        _stop(_started(tmp_path, node_toml(grid_pki, tmp_path / "state", changes)))
