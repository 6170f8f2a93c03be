"""A client with a whole IPv6 /64 (what one host is routinely given) against the per-address connection cap:
its connections are counted together, as its TLS handshakes take one turn (turns.py). Before, each of its 2^64
addresses had its own max_connections_per_address. Runs in a private network namespace (``unshare -n``, root
only: loopback takes any address of 2001:db8:1:2::/64 there, nothing changes on the host); skipped elsewhere."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                                 reason="needs root, unshare and ip for a private network namespace")]

SCRIPT = textwrap.dedent("""
    import socket, subprocess, time
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-6", "route", "add", "local", "2001:db8:1:2::/64", "dev", "lo"], check=True)
    from services.container.server import ConnectionLimits, Container

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    c = Container([], host="::1", middleware=lambda _: app, threads=2,
                  limits=ConnectionLimits(max_connections_per_address=3, header_timeout=60)).start()
    held = []
    for i in range(1, 7):                      # six addresses of one /64, one connection each, holding a head open
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.SOL_IP, 15, 1)     # IP_FREEBIND: the namespace's loopback routes the whole /64 locally
        s.bind((f"2001:db8:1:2::{i}", 0))
        s.settimeout(30)
        s.connect(("::1", c.port))
        held.append(s)
        try:                                   # a connection over the cap is closed at once: its write may fail
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")
        except OSError:
            pass
    while c.open_connections + c.refused["per-address"] < 6:   # all six accepted (a slot freed before would
        time.sleep(0.01)                                       # let a later one in)
    answered = 0
    for s in held:
        try:
            s.sendall(b"Connection: close\\r\\n\\r\\n")
            answered += s.recv(100).startswith(b"HTTP/1.1 200 ")
        except OSError:
            pass
    print("answered", answered, "refused", c.refused["per-address"])
    c.stop()
""")


def test_one_ipv6_64_is_one_client_for_the_connection_cap():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True,
                         timeout=90, env={**os.environ, "PYTHONPATH": str(root)})
    if out.returncode != 0 and "unshare" in out.stderr and "Operation not permitted" in out.stderr:
        pytest.skip("no network namespace here")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["answered", "3", "refused", "3"], out.stdout
