"""A whole grid in bridge mode, run by tests/vm/test_node_bridge_qemu.py inside a network namespace the
test made (`ip netns exec vgnet-... python bridge_grid.py IMAGE_DIR WORKDIR`): the Authorization
service and the VMRepository in this process, two VMManager nodes as `vmgrid serve vmmanager`
processes configured with nic_kind = "bridge" on one bridge (docs/configuration.md), everything on
the namespace's own loopback. alice deploys vmgrid's guest image on each node; the image's container
command serves HTTP and fetches the other guests' pages. Prints what it saw as one JSON line; always
destroys the guests, stops the nodes and takes the bridge down.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client.soap import GridServiceClient  # noqa: E402
from client.vmmanager import VMManagerClient  # noqa: E402
from guestd.image.build import GuestImage  # noqa: E402
from services.vmmanager.guard import tables_of  # noqa: E402
from services.vmmanager.network import NodeBridge  # noqa: E402
from tests.fixtures.grid import start_grid  # noqa: E402
from tests.fixtures.pki import build_grid_pki  # noqa: E402

from bridge_node import fetch, neighbours  # noqa: E402
from bridge_nodes import BridgeNodes, register_image  # noqa: E402
from scene import POLL  # noqa: E402
from test_vmmanager_qemu import DESCRIPTOR, node_settings  # noqa: E402

BRIDGE, NETWORK, GATEWAY = "vgnetbr0", "10.77.0.0/24", "10.77.0.1"
NODES = {"bridge1": "10.77.0.10-10.77.0.10", "bridge2": "10.77.0.20-10.77.0.20"}
ADDRESSES = ["10.77.0.10", "10.77.0.20"]
# The descriptor's container command (at most 1024 characters): serve /tmp/w over HTTP with the guest's
# hostname in /tmp/w/id, and keep fetching every address's id into /tmp/w/r-<address>.
SCRIPT = """import http.server as h,os,socket,threading,time,urllib.request as u,sys
os.makedirs('/tmp/w',exist_ok=1);os.chdir('/tmp/w');open('id','w').write(socket.gethostname())
s=h.ThreadingHTTPServer(('',8000),h.SimpleHTTPRequestHandler)
threading.Thread(target=s.serve_forever,daemon=1).start()
while 1:
 for a in sys.argv[1:]:
  try:open('r-'+a,'w').write(u.urlopen('http://%s:8000/id'%a,timeout=3).read().decode())
  except Exception:pass
 time.sleep(1)"""
COMMAND = f'/usr/bin/python3 -c "{SCRIPT}" {" ".join(ADDRESSES)}'
IMAGE = "vmgrid-guest-bridge"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--boot-timeout", type=float, default=480.0)
    args = ap.parse_args()
    image = GuestImage.load(args.image)
    pki = build_grid_pki(args.work / "pki")
    out: dict = {"nodes": {}, "instances": {}}
    grid, scene, nodes, deployed = None, None, {}, {}
    try:
        grid = start_grid(pki, args.work / "g", nodes=0)
        descriptor = register_image(grid, pki, image.rootfs, DESCRIPTOR.format(
            name=IMAGE, kernel=image.kernel_version, command=COMMAND).encode(), IMAGE)
        scene = BridgeNodes(args.work, pki, grid, BRIDGE, NETWORK, GATEWAY)
        nodes = scene.start(NODES, lambda n, name, leases: {
            **node_settings(image, root=scene.root(n), lease_range=leases, name=name),
            "guest_ready_timeout": args.boot_timeout})
        for name, node in nodes.items():
            out["nodes"][name] = {"bridge_record": json.loads(
                (node.state / "vmmanager" / "network" / f"{BRIDGE}.json").read_text())}
        out["bridge"] = {k: v for k, v in vars(NodeBridge(BRIDGE, GATEWAY, NETWORK).check()).items() if k != "made"}
        clients = {name: VMManagerClient(GridServiceClient(node.url, pki.alice.proxy, pki.trust()))
                   for name, node in nodes.items()}
        for name, client in clients.items():
            deployed[name] = client.deploy(descriptor, f"guest-{name}", 1800)
        for name, client in clients.items():
            info = client.wait_for(deployed[name].ref, ("Running", "Failed"), timeout=args.boot_timeout + 120,
                                   interval=POLL)
            out["instances"][name] = {"state": info.state, "address": info.address, "mac": info.mac,
                                      "guest_status": info.guest_status, "failure": info.failure,
                                      "host": f"guest-{name}"}
        out["ports"] = list(NodeBridge(BRIDGE, GATEWAY, NETWORK).check().ports)
        deadline = time.monotonic() + 180
        for name, inst in out["instances"].items():
            if inst["state"] != "Running":
                continue
            inst["id_from_node"], inst["id_error"] = fetch(f"http://{inst['address']}:8000/id", deadline)
            inst["reached"] = {}
            for other, peer in out["instances"].items():
                if other != name:
                    got, err = fetch(f"http://{inst['address']}:8000/r-{peer['address']}", deadline, want=peer["host"])
                    inst["reached"][peer["address"]] = got or err
        out["neighbours"] = neighbours()
        # each node's guard: its own nftables table binding its guest's tap to the lease (services/vmmanager/guard.py)
        out["guards"] = {t: subprocess.run(["nft", "list", "table", "bridge", t], capture_output=True,
                                           text=True).stdout for t in tables_of(BRIDGE)}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for name, reg in deployed.items():
            try:
                VMManagerClient(GridServiceClient(nodes[name].url, pki.alice.proxy, pki.trust())).destroy(reg.ref)
            except Exception as exc:  # noqa: BLE001
                out.setdefault("cleanup", []).append(f"destroy on {name}: {exc}")
        try:
            if scene is not None:
                scene.teardown(out)
        finally:
            if grid is not None:
                grid.close()
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
