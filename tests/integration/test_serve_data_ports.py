"""[gridftp] data_ports: the GridFTP data ports of the services `vmgrid serve` runs, as `vmgrid gridftp-server
--data-ports` bounds its own (a site firewall opens just that range). A real `vmgrid serve repository` process, its
GridFTP face logged in to with a user's proxy over AUTH TLS, its passive ports read from its PASV replies."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gridftp
from client.localgrid import free_port
from gridftp.protocol import find_host_ports
from tests.integration.test_serve_config_errors import node_toml
from tests.unit.gridftp.test_gridftp_cli import _free_range

pytestmark = pytest.mark.timeout(300)

VMGRID = os.path.join(os.path.dirname(sys.executable), "vmgrid")


def _serve(tmp_path, text: str, env_range: str | None, service: str = "repository") -> subprocess.Popen:
    (tmp_path / "site.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_") and k != "GLOBUS_TCP_PORT_RANGE"}
    if env_range is not None:
        env["GLOBUS_TCP_PORT_RANGE"] = env_range
    return subprocess.Popen([VMGRID, "serve", service, "-c", "site.toml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _passive_ports(grid_pki, port: int, n: int = 6) -> list[int]:
    with gridftp.GridFTPClient(f"gsiftp://localhost:{port}/uploads/", credential=grid_pki.alice.proxy,
                               trust=grid_pki.cert_dir) as session:
        replies = [session.command("PASV") for _ in range(n)]
    assert all(r.code == 227 for r in replies), replies
    return [find_host_ports(r.text)[0][1] for r in replies]


def test_the_configured_data_ports_bound_a_served_faces_passive_ports_over_the_environments(grid_pki, tmp_path):
    """`[gridftp] data_ports = "LOW,HIGH"`: every passive port of the repository's GridFTP face is in LOW..HIGH,
    although the process's environment names another range in GLOBUS_TCP_PORT_RANGE (the key wins, as
    `--data-ports` does); without the key the environment's range is taken. Before: no such key (`vmgrid serve`
    refused the file: "unknown key(s) data_ports"), only the environment could bound them."""
    low, high = _free_range()
    other_low, other_high = _free_range()
    gridftp_port = free_port()
    for key, expect in ((f'"{low},{high}"', (low, high)), (None, (other_low, other_high))):
        changes = {("repository", "gridftp_port"): str(gridftp_port)}
        if key is not None:
            changes[("gridftp", "data_ports")] = key
        proc = _serve(tmp_path, node_toml(grid_pki, tmp_path / "state", changes), f"{other_low}-{other_high}")
        try:
            line = proc.stdout.readline()
            assert line.startswith("vmgrid: serving"), proc.stderr.read() if proc.poll() is not None else line
            ports = _passive_ports(grid_pki, gridftp_port)
            assert all(expect[0] <= p <= expect[1] for p in ports), (ports, expect)
        finally:
            proc.terminate()
            proc.communicate(timeout=60)


def test_a_bad_environment_range_with_no_key_is_refused_at_start(grid_pki, tmp_path):
    """No [gridftp] data_ports, and a GLOBUS_TCP_PORT_RANGE that is no range: one line naming the variable and the
    key that would take its place, before any state (before: the service started, and every transfer failed)."""
    proc = _serve(tmp_path, node_toml(grid_pki, tmp_path / "state"), "50000", service="vmmanager")
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:         # it started (the variable went unchecked): stopped, the test fails below
            proc.kill()
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == "", err
    assert err == ("vmgrid: site.toml: GLOBUS_TCP_PORT_RANGE='50000' in the environment: expected LOW,HIGH, two ports "
                   "1 to 65535 in order (e.g. 50000,51000) (or set [gridftp] data_ports, which takes its place)\n")
    assert not (tmp_path / "state").exists()
    # the key takes the variable's place: the same environment with the key given starts
    proc = _serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("gridftp", "data_ports"): '"50000,50010"'}),
                  "50000", service="vmmanager")
    try:
        line = proc.stdout.readline()
        assert line.startswith("vmgrid: serving"), proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
