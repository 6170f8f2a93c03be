"""[gridftp] passive_per_identity and passive_wait: the bounds on passive data ports no data connection has reached
(attack15 H4) are a site's to set for the services' GridFTP servers, as `vmgrid gridftp-server --passive-per-identity
/ --passive-wait` set them for its own (proxy15 left them GridFTPServer keywords only: `vmgrid serve` refused the
keys as unknown). A real `vmgrid serve repository` process, its GridFTP face logged in to with alice's proxy."""
from __future__ import annotations

import pytest

import gridftp
from client.localgrid import free_port
from gridftp.protocol import find_host_ports
from tests.integration.test_serve_config_errors import node_toml, serve
from tests.integration.test_serve_data_ports import _serve
from tests.unit.gridftp.gridftp_helpers import wait_for
from tests.unit.gridftp.test_gridftp_cli import _free_range
from tests.unit.gridftp.test_gridftp_passive_bounds import refused_connection

pytestmark = pytest.mark.timeout(300)


def test_a_served_face_takes_the_passive_bounds_from_the_gridftp_section(grid_pki, tmp_path):
    """passive_per_identity = 1: alice's second session's PASV, while her first one's port is unreached, is 425
    naming the bound of 1 (the default is 2; the 425 comes after the bound's grace of 2 s, well before passive_wait);
    passive_wait = 6: that first port, taken up by no data command, is then closed (the default is 10), and her PASV
    gets a port."""
    low, high = _free_range()
    port = free_port()
    changes = {("repository", "gridftp_port"): str(port), ("gridftp", "data_ports"): f'"{low},{high}"',
               ("gridftp", "passive_per_identity"): "1", ("gridftp", "passive_wait"): "6"}
    proc = _serve(tmp_path, node_toml(grid_pki, tmp_path / "state", changes), None)
    sessions = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("vmgrid: serving"), proc.stderr.read() if proc.poll() is not None else line
        url = f"gsiftp://localhost:{port}/uploads/"
        sessions = [gridftp.GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir).connect()
                    for _ in range(2)]
        first = sessions[0].command("PASV")
        assert first.code == 227, first
        second = sessions[1].command("PASV")
        assert (second.code, second.text) == (425, (
            f"Cannot open a passive data port: {grid_pki.alice.dn} holds 1 already that no data connection has "
            f"reached, at most 1 per identity across its sessions: use them (send the data command) or end those "
            f"sessions first."))
        held = find_host_ports(first.text)[0][1]
        wait_for(lambda: refused_connection(held), interval=0.2, what="the untaken passive port closed")
        assert sessions[1].command("PASV").code == 227
    finally:
        for s in sessions:
            s.close()
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.mark.parametrize("key, value, message", [
    ("passive_per_identity", "0", "[gridftp] passive_per_identity is 1 or more (passive data ports one identity may "
                                  "hold that no data connection has reached), not 0"),
    ("passive_per_identity", "1.5", "gridftp.passive_per_identity: expected an integer, got 1.5"),
    ("passive_wait", "-1", "[gridftp] passive_wait is seconds, 0 (an untaken passive data port is never closed) or "
                           "more, not -1.0"),
    ("passive_wait", "inf", "[gridftp] passive_wait is seconds, 0 (an untaken passive data port is never closed) or "
                            "more, not inf"),
])
def test_a_passive_bound_out_of_its_range_is_refused_at_start(grid_pki, tmp_path, key, value, message):
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("gridftp", key): value}))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: n3.toml: {message}\n"
    assert not (tmp_path / "state").exists()
