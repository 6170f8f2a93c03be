"""What a guest flooding its channel costs the node: a fake guestd on the channel's Unix socket (host
side, standing where QEMU listens) sends valid-looking report lines as fast as it can for a few
seconds; the node's GuestChannelClient reads them with its rate limit, and again, in the same run,
with the limit lifted (the peer: the unbounded reader the channel had before). Prints the bytes and
lines the node took in, its CPU seconds, and the ratios.

    .venv/bin/python bench/bench_channel_flood.py [--seconds 5]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guestd import protocol  # noqa: E402
from services.vmmanager.vmm import GuestChannelClient, channel  # noqa: E402

TOKEN = "tok-" + "b" * 24


GUEST = """
import socket, sys
path, chunk = sys.argv[1], open(sys.argv[2], 'rb').read()
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
print('listening', flush=True)
conn, _ = server.accept()
try:
    while True:
        conn.sendall(chunk)
except OSError:
    pass
"""


def flood_once(seconds: float, bounded: bool) -> dict:
    """One flood by a fake guestd in a process of its own; the node's side measured in this process."""
    d = Path(tempfile.mkdtemp(prefix="vg-bench-", dir="/tmp"))
    path = d / "g.sock"
    chunk = b"".join(protocol.encode({"op": "report", "step": f"s{i % 8}", "ok": True, "token": TOKEN,
                                      "detail": {"n": i}}) for i in range(200))
    (d / "chunk").write_bytes(chunk)
    guest = subprocess.Popen([sys.executable, "-c", GUEST, str(path), str(d / "chunk")], stdout=subprocess.PIPE,
                             text=True)
    assert guest.stdout.readline().strip() == "listening"
    client = GuestChannelClient("bench", path, TOKEN)
    if not bounded:
        client.read_rate = client.read_burst = float("inf")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    client.connect()
    time.sleep(seconds)        # the flood runs for a fixed wall-clock time: this is the measurement
    elapsed = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    read, reports, rejected = client.bytes_read, len(client.reports), client.rejected_total
    client.close()
    guest.kill()
    guest.wait()
    for f in (path, d / "chunk"):
        f.unlink(missing_ok=True)
    os.rmdir(d)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"seconds": elapsed, "bytes": read, "lines": read // (len(chunk) // 200), "cpu": cpu,
            "reports": reports, "rejected": rejected}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    bounded = flood_once(args.seconds, True)
    unbounded = flood_once(args.seconds, False)
    print(f"a fake guestd floods the channel for {args.seconds:g} s; the node's side:")
    print(f"{'reader':<34}{'KiB read':>12}{'lines':>10}{'KiB/s':>10}{'node CPU s':>12}{'CPU/wall':>10}")
    for name, r in (("vmgrid channel (rate-limited)", bounded), ("same reader, no limit (peer)", unbounded)):
        print(f"{name:<34}{r['bytes'] / 1024:>12.0f}{r['lines']:>10}{r['bytes'] / 1024 / r['seconds']:>10.0f}"
              f"{r['cpu']:>12.2f}{r['cpu'] / r['seconds']:>10.2f}")
    print(f"ratio limited/unlimited: bytes {bounded['bytes'] / max(1, unbounded['bytes']):.4f}, "
          f"node CPU {bounded['cpu'] / max(1e-9, unbounded['cpu']):.3f}; reports kept "
          f"{bounded['reports']} (cap {channel.MAX_STEPS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
