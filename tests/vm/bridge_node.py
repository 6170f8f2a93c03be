"""A QEMU node in bridge mode, run by tests/vm/test_node_bridge_qemu.py inside a network namespace the
test made (`ip netns exec vgnet-... python bridge_node.py ...`): the node makes its bridge holding the
gateway (services/vmmanager/network.py), boots two real guests with taps on it and leased addresses,
and looks from the node whether they are reachable, and whether each reached the other. Prints what it
saw as one JSON line; always destroys its guests and takes its bridge down.

    python bridge_node.py IMAGE_DIR ROOT WORKDIR [--boot-timeout S]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from guestd.image.build import GuestImage  # noqa: E402
from services.vmmanager.network import NodeBridge  # noqa: E402
from services.vmmanager.vmm import LibvirtQemuDriver, VMMError  # noqa: E402

from conftest import console_tail, new_guest_spec  # noqa: E402

BRIDGE, NETWORK, GATEWAY = "vgnetbr0", "10.77.0.0/24", "10.77.0.1"
GUESTS = {"vgnet-a": "10.77.0.11", "vgnet-b": "10.77.0.12"}
PORT = 8000
# The guest's container: serve /tmp/www over HTTP (its own name in /tmp/www/id), and fetch the peer's
# id over the bridge until it answers, keeping it in /tmp/www/reached for the node to read.
GUEST_SCRIPT = """
import http.server, os, sys, threading, time, urllib.request
me, peer, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs('/tmp/www', exist_ok=True)
os.chdir('/tmp/www')
open('id', 'w').write(me)
srv = http.server.ThreadingHTTPServer(('0.0.0.0', port), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=srv.serve_forever, daemon=True).start()
while True:
    try:
        body = urllib.request.urlopen('http://%s:%d/id' % (peer, port), timeout=3).read().decode()
        open('reached.tmp', 'w').write(body)
        os.replace('reached.tmp', 'reached')
    except Exception as exc:
        open('error', 'w').write(repr(exc))
    time.sleep(1)
"""


def fetch(url: str, deadline: float, want=None) -> tuple[str | None, str]:
    """GET ``url`` until it answers (and, with ``want``, answers that) or ``deadline``."""
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(url, timeout=3).read().decode()
            if want is None or body == want:
                return body, ""
            last = f"answered {body!r}"
        except Exception as exc:  # noqa: BLE001 - recorded for the test's message
            last = repr(exc)
        time.sleep(0.5)
    return None, last


def neighbours() -> dict[str, str]:
    out = subprocess.run(["ip", "-j", "neigh", "show", "dev", BRIDGE], capture_output=True, text=True).stdout
    return {n["dst"]: n.get("lladdr", "") for n in json.loads(out or "[]")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    args = ap.parse_args()
    image = GuestImage.load(args.image)
    bridge = NodeBridge(BRIDGE, GATEWAY, NETWORK, args.work / "state")
    out: dict = {"bridge": {}, "guests": {}}
    node = None
    specs = {}
    try:
        status = bridge.ensure()
        again = bridge.ensure()
        out["bridge"] = {"addresses": list(status.addresses), "up": status.up, "made": status.made,
                         "idempotent": again.addresses == status.addresses}
        node = LibvirtQemuDriver(root=args.root)
        names = list(GUESTS)
        for name in names:
            peer = GUESTS[names[1 - names.index(name)]]
            spec, ctx = new_guest_spec(image, args.work, name, memory_mib=192, address=GUESTS[name],
                                       gateway=GATEWAY, bridge=BRIDGE,
                                       container=["/usr/bin/python3", "-c", GUEST_SCRIPT, name, peer, str(PORT)])
            specs[name] = spec
            node.define(spec)
            node.start(name)
        out["ports"] = list(bridge.check().ports)
        for name, spec in specs.items():
            try:
                ready = node.guest_channel(name).wait_ready(timeout=args.boot_timeout, poll=0.5)
            except VMMError as exc:
                out["guests"][name] = {"error": f"{exc}; console: {console_tail(spec)}"}
                continue
            out["guests"][name] = {"mac": spec.nics[0].mac, "nic": [spec.nics[0].kind, spec.nics[0].source],
                                   "network": ready["steps"]["network"]["detail"],
                                   "container": ready.get("container")}
        deadline = time.monotonic() + 120
        for name, address in GUESTS.items():
            peer = names[1 - names.index(name)]
            g = out["guests"].setdefault(name, {})
            g["id_from_node"], g["id_error"] = fetch(f"http://{address}:{PORT}/id", deadline)
            g["reached"], g["reached_error"] = fetch(f"http://{address}:{PORT}/reached", deadline, want=peer)
        out["neighbours"] = neighbours()
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if node is not None:
            for name in specs:
                try:
                    node.destroy(name)
                    node.undefine(name)
                except VMMError:
                    pass
            node.close()
        try:
            out["after_teardown"] = {"exists": bridge.teardown().exists}
        except Exception as exc:  # noqa: BLE001
            out["after_teardown"] = {"error": str(exc)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
