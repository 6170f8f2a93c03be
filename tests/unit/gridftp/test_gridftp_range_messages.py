"""What a user and an operator read when the data port range is the trouble (trial14 U6, U8): a real `vmgrid
gridftp-server` and `vmgrid transfer`, child processes over loopback.

- A server whose range is full answers 425 naming the range and where it came from (`--data-ports` or
  GLOBUS_TCP_PORT_RANGE), says the operator can widen it, and logs a WARNING; the client does not tell the user to
  run the same command again (no retry of theirs frees the server's ports).
- A bad GLOBUS_TCP_PORT_RANGE in the client's environment is one line without a stray "vmgrid: : "."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.unit.gridftp.gridftp_helpers import REPO, ServerProcess

FORM = "expected LOW,HIGH, two ports 1 to 65535 in order (e.g. 50000,51000)"


def vmgrid(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "GLOBUS_TCP_PORT_RANGE"}
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**environ, **(env or {})})


@pytest.fixture
def held_port():
    """A port another process (here: this test) listens on: the whole of a one-port range, full."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.parametrize("given", ["option", "environment"])
def test_a_full_range_is_named_with_where_it_came_from_logged_and_not_blamed_on_the_transfer(tree, tmp_path, held_port,
                                                                                            given):
    """Before: "425 Cannot open a passive data port: no free data port in GLOBUS_TCP_PORT_RANGE P,P.; run the same
    command again: ..." though --data-ports set the range, and nothing in the server's log."""
    ports = f"{held_port},{held_port}"
    args, env, origin = ((["--data-ports", ports], {}, "--data-ports") if given == "option" else
                         ([], {"GLOBUS_TCP_PORT_RANGE": ports}, "GLOBUS_TCP_PORT_RANGE"))
    env = {k: v for k, v in os.environ.items() if k != "GLOBUS_TCP_PORT_RANGE"} | env
    server = ServerProcess(tree, "--anonymous", "--no-tls", "--upload-area", "/up", "--insecure-anonymous-writes",
                           *args, env=env)
    try:
        (tmp_path / "up.bin").write_bytes(b"x" * 5000)
        sent = vmgrid("transfer", str(tmp_path / "up.bin"), f"ftp://127.0.0.1:{server.port}/up/up.bin", "--retries",
                      "0", "-q", "--state-dir", str(tmp_path / "s"))
    finally:
        server.proc.terminate()
        _, log = server.proc.communicate(timeout=30)
    assert sent.returncode == 1
    assert sent.stderr.endswith(f"425 Cannot open a passive data port: no free data port in {origin} {ports}, all in "
                                f"use: the server's operator can widen the range.\n"), sent.stderr
    assert sent.stderr.startswith("vmgrid: '") and sent.stderr.count("\n") == 1
    assert "run the same command again" not in sent.stderr and ".;" not in sent.stderr
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"no free data port in {origin} {ports}: 1 passive data connection(s) refused (425) since the last such "
        f"warning; widen the range if this recurs"), log
    assert not (tree / "up" / "up.bin").exists()


def test_a_bad_range_in_the_clients_environment_is_one_line_without_a_stray_prefix(tree, tmp_path):
    """`GLOBUS_TCP_PORT_RANGE=abc vmgrid transfer gsiftp://... x`: the download listens (PORT) and reads the range.
    Before: "vmgrid: : GLOBUS_TCP_PORT_RANGE='abc': ..."."""
    server = ServerProcess(tree, "--anonymous", "--no-tls")
    try:
        got = vmgrid("transfer", f"ftp://127.0.0.1:{server.port}/data/f3m", str(tmp_path / "x"), "--retries", "0",
                     "-q", env={"GLOBUS_TCP_PORT_RANGE": "abc"})
    finally:
        server.stop()
    assert got.returncode == 1
    assert got.stderr == f"vmgrid: GLOBUS_TCP_PORT_RANGE='abc': {FORM}\n"
    assert not (tmp_path / "x").exists()


def test_a_full_range_given_by_the_configuration_names_its_key(held_port, monkeypatch):
    """`vmgrid serve` with [gridftp] data_ports (services/container/assemble.py apply_data_ports): a full range is
    named by the key the operator widens, not by the environment variable the key was put in."""
    from gridftp import datachannel
    from services.container.assemble import apply_data_ports
    from services.container.config import Config

    config = Config()
    config.gridftp.data_ports = f"{held_port},{held_port}"
    monkeypatch.delenv("GLOBUS_TCP_PORT_RANGE", raising=False)
    monkeypatch.setattr(datachannel, "_NAMED_RANGES", {})
    apply_data_ports(config, ["repository"])
    try:
        with pytest.raises(datachannel.NoFreeDataPort) as exc:
            datachannel.open_listener("127.0.0.1")
        assert f"no free data port in [gridftp] data_ports {held_port},{held_port}" in str(exc.value)
    finally:
        os.environ.pop("GLOBUS_TCP_PORT_RANGE", None)
