"""Clones of one warm snapshot on a node's bridge, run inside a network namespace the caller made
(`ip netns exec vgwarm-... python warm_bridge_node.py ...`; tests/vm/test_warm_qemu.py and
bench/bench_vmmanager.py): the node makes its bridge, boots one template guest (context marked warm),
saves it, restores --clones clones of it on overlays of its frozen disk, each with its own MAC and
leased address, and gives each its identity by guestd's recontext; then looks from the node whether
every clone answers at its address from its own MAC. Prints what it saw as one JSON line; always
destroys its guests and takes its bridge down.

    python warm_bridge_node.py IMAGE_DIR ROOT WORKDIR [--clones N] [--boot-timeout S]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from guestd.context import validate  # noqa: E402
from guestd.image.build import GuestImage  # noqa: E402
from services.vmmanager import qemuimg  # noqa: E402
from services.vmmanager.context import build_context, write_context_iso  # noqa: E402
from services.vmmanager.network import NodeBridge  # noqa: E402
from services.vmmanager.vmm import (Disk, GuestChannel, InstanceSpec, KernelBoot, LibvirtQemuDriver, Nic,  # noqa: E402
                                    Port, VMMError)

from bridge_node import fetch  # noqa: E402

BRIDGE, NETWORK, GATEWAY = "vgwarmbr0", "10.78.0.0/24", "10.78.0.1"
PORT = 8000
SERVE = ("import http.server, os, sys; os.makedirs('/tmp/www', exist_ok=True); os.chdir('/tmp/www'); "
         "open('id', 'w').write(sys.argv[1]); "
         "http.server.ThreadingHTTPServer(('0.0.0.0', %d), http.server.SimpleHTTPRequestHandler).serve_forever()"
         % PORT)


def spec_for(image: GuestImage, d: Path, name: str, disk: Path, ctx, memory: int) -> InstanceSpec:
    write_context_iso(ctx, d / "context.iso")
    return InstanceSpec(name=name, memory_mib=memory, disks=(Disk(disk),), cdroms=(d / "context.iso",),
                        nics=(Nic(ctx.network.mac, "bridge", BRIDGE),), serial_ports=(Port("file", d / "console.log"),),
                        boot=KernelBoot(image.kernel, image.initrd, image.cmdline),
                        channel=GuestChannel(d / "g.sock", ctx.token))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--clones", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    args = ap.parse_args()
    image = GuestImage.load(args.image)
    bridge = NodeBridge(BRIDGE, GATEWAY, NETWORK, args.work / "state")
    out: dict = {"clones": {}}
    node = None
    names: list[str] = []
    try:
        bridge.ensure()
        node = LibvirtQemuDriver(root=args.root)
        t = args.work / "tpl"
        t.mkdir()
        ctx = build_context(instance="warm-t", hostname="vmgrid-warm", mac="02:00:00:77:00:01",
                            address="169.254.0.2", netmask="255.255.0.0")
        ctx = validate({**json.loads(ctx.to_json()), "warm": True})
        disk = qemuimg.create_overlay(image.rootfs, "qcow2", t / "disk.qcow2")
        names.append("warm-t")
        node.define(spec_for(image, t, "warm-t", disk, ctx, args.memory))
        started = time.monotonic()
        node.start("warm-t")
        channel = node.guest_channel("warm-t")
        channel.wait_ready(timeout=args.boot_timeout, poll=0.25)
        channel.request("ping")
        out["template_boot"] = time.monotonic() - started
        node.save("warm-t", t / "memory.save")
        node.undefine("warm-t")
        os.chmod(disk, 0o444)
        for i in range(args.clones):
            name, address = f"clone-{i}", f"10.78.0.{10 + i}"
            d = args.work / name
            d.mkdir()
            cctx = build_context(instance=name, hostname=name, mac="52:54:00:78:00:%02x" % (10 + i), address=address,
                                 netmask="255.255.255.0", gateway=GATEWAY,
                                 container_command=["/usr/bin/python3", "-c", SERVE, name])
            spec = spec_for(image, d, name, qemuimg.create_overlay(disk, "qcow2", d / "root.qcow2"), cctx, args.memory)
            names.append(name)
            t0 = time.monotonic()
            node.restore_clone(t / "memory.save", spec, d / "warm.save")
            restored = time.monotonic() - t0
            status = node.guest_channel(name).request("recontext", timeout=60, context=json.loads(cctx.to_json()),
                                                      seed=secrets.token_hex(64), time=time.time())
            out["clones"][name] = {"address": address, "mac": cctx.network.mac, "ready": status["ready"],
                                   "restore": restored, "to_ready": time.monotonic() - t0,
                                   "identity": status["steps"]["identity"]["detail"],
                                   "network": status["steps"]["network"]["detail"],
                                   "rejected": node.guest_channel(name).rejected}
        deadline = time.monotonic() + 120
        for name, c in out["clones"].items():
            c["id_from_node"], c["id_error"] = fetch(f"http://{c['address']}:{PORT}/id", deadline)
        out["neighbours"] = neighbours_of()
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if node is not None:
            for name in names:
                for verb in (node.destroy, node.undefine):
                    try:
                        verb(name)
                    except VMMError:
                        pass
            node.close()
        try:
            out["after_teardown"] = {"exists": bridge.teardown().exists}
        except Exception as exc:  # noqa: BLE001
            out["after_teardown"] = {"error": str(exc)}
    print(json.dumps(out))
    return 0


def neighbours_of() -> dict[str, str]:
    out = subprocess.run(["ip", "-j", "neigh", "show", "dev", BRIDGE], capture_output=True, text=True).stdout
    return {n["dst"]: n.get("lladdr", "") for n in json.loads(out or "[]")}


if __name__ == "__main__":
    sys.exit(main())
