"""A second QEMU node in its own process (libvirt embeds one QEMU root per process): the target of
the migration tests. Restores a save file with a relocated spec and prints what it saw as JSON.

    python node_helper.py ROOT SAVE_FILE SPEC_XML_FILE [--guest-timeout S] [--save-to PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.vmmanager.vmm import LibvirtQemuDriver, VMMError  # noqa: E402
from services.vmmanager.vmm.config import spec_from_xml  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("save_file", type=Path)
    ap.add_argument("spec_xml", type=Path)
    ap.add_argument("--guest-timeout", type=float, default=0.0)
    ap.add_argument("--save-to", type=Path)
    args = ap.parse_args()
    spec = spec_from_xml(args.spec_xml.read_text())
    node = LibvirtQemuDriver(root=args.root)
    out: dict = {}
    name = spec.name
    try:
        node.wait_probed(600)           # the QEMU capability probe done, so restore_seconds is the restore
        node._conn.getCapabilities()
        t0 = time.monotonic()
        name = node.restore(args.save_file, spec)
        out["restore_seconds"] = time.monotonic() - t0
        out["state"] = node.state(name).value
        out["disks"] = [str(d.path) for d in node.spec_of(name).disks]
        out["instances"] = [i.name for i in node.list_instances()]
        if args.guest_timeout:
            channel = node.guest_channel(name)
            status = channel.status(timeout=args.guest_timeout)
            t1 = time.time()
            ping = channel.request("ping", args.guest_timeout)
            out["guest"] = {"status": status, "clock_offset": ping["time"] - (t1 + time.time()) / 2,
                            "rejected": channel.rejected}
        if args.save_to:
            node.save(name, args.save_to)
            out["saved_to"] = str(args.save_to)
    except VMMError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            node.destroy(name)
            node.undefine(name)
        except VMMError:
            pass
        node.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
