"""The memory a container process holds while clients send it large unsigned messages (docs/security.md,
`max_markup_held`): 16 clients send, for --seconds, an unsigned SOAP message of 990,000 markup items (4 MB of
`<b/>`: about 130 MiB of parse tree each) to the real container (`vmgrid serve repository` as bench_container.py
builds it, plain HTTP on loopback), each answered with a fault. Measured twice in the same run, each in a fresh
process: with the default budget (4,000,000 items) and with the budget out of reach (the peer: every request
thread may hold a tree at once). Printed per run: the process's peak RSS (VmHWM), its RSS when the clients are done,
and how many requests were answered "busy" and otherwise.

    .venv/bin/python bench/bench_parse_memory.py [--seconds 8] [--clients 16]
"""
from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def child(held: int, seconds: float, clients: int) -> dict:
    from bench_container import make_config
    from services.container.assemble import build_container, build_service
    from services.container.config import load_config
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vmgrid-bench-parse-"))
    pki = build_grid_pki(root / "pki")
    config = make_config(root, pki, tls=False)
    text = config.read_text()
    setting = f"max_markup_held = {held}\n"
    config.write_text(text.replace("[container.limits]\n", "[container.limits]\n" + setting)
                      if "[container.limits]\n" in text else text + "\n[container.limits]\n" + setting)
    cfg = load_config(config)
    container = build_container(cfg, [build_service("repository", cfg)]).start()
    host, port = container.base_url.split("//")[1].rsplit(":", 1)
    body = (b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><a>'
            + b"<b/>" * 990_000 + b"</a></s:Body></s:Envelope>")

    def status(name: str) -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(name + ":"))

    before = status("VmRSS")
    counts = {"busy": 0, "answered": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def send():
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        while time.monotonic() < stop:
            conn.request("POST", "/wsrf/services/VMRepositoryService", body,
                         {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'})
            data = conn.getresponse().read()
            with lock:
                counts["busy" if b"busy with other large requests" in data else "answered"] += 1

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {"before_kib": before, "peak_kib": status("VmHWM"), "after_kib": status("VmRSS"), **counts}
    container.stop()
    shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.seconds, args.clients)))
        return 0
    from benchgrid import machine_facts

    print(f"{machine_facts()}; {args.clients} clients, {args.seconds:g} s, unsigned messages of 990,000 markup items")
    for label, held in (("budget 4,000,000 items (default)", 4_000_000), ("budget out of reach (peer)", 10**12)):
        out = subprocess.run([sys.executable, __file__, "--child", str(held), "--seconds", str(args.seconds),
                              "--clients", str(args.clients)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {label}: RSS {r['before_kib'] / 1024:.0f} MiB before, peak {r['peak_kib'] / 1024:.0f} MiB, "
              f"{r['after_kib'] / 1024:.0f} MiB after; {r['answered']} answered, {r['busy']} refused as busy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
