"""What a self-contained image costs at boot: the `base` recipe's disk booted to guestd ready under QEMU
(TCG) by itself (firmware, MBR, syslinux: descriptor boot method disk) and by direct kernel boot of
the same kernel and initrd, alternating, in one run after one uncounted warm-up boot (the first QEMU
start of a process pays for loading QEMU and its firmware); prints each time, the medians and the ratio.

    sudo .venv/bin/python bench/bench_image_boot.py [--runs 3] [--memory 256]
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "vm"), str(REPO / "tests" / "unit" / "vmm")]

from guestd.image.build import build  # noqa: E402
from services.vmmanager.vmm import LibvirtQemuDriver  # noqa: E402

from conftest import new_guest_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="boots of each kind (default 3)")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    args = ap.parse_args()
    image = build(log=lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="vgimg-bench-", dir="/tmp"))
    node = LibvirtQemuDriver(root=work / "root")
    times: dict[str, list[float]] = {"disk": [], "kernel": []}
    try:
        for n in range(-1, args.runs):
            for kind in ("disk", "kernel") if n >= 0 else ("warm-up",):
                spec, _ = new_guest_spec(image, work, f"{kind}{n}", memory_mib=args.memory)
                if kind != "kernel":
                    spec = dataclasses.replace(spec, boot=None)
                node.define(spec)
                t = time.monotonic()
                node.start(spec.name)
                node.guest_channel(spec.name).wait_ready(timeout=300)
                took = time.monotonic() - t
                node.destroy(spec.name)
                node.undefine(spec.name)
                if n >= 0:
                    times[kind].append(took)
                print(f"{kind:7} boot {n + 1}: guestd ready in {took:.1f} s", flush=True)
    finally:
        node.close()
        shutil.rmtree(work, ignore_errors=True)
    disk, kernel = statistics.median(times["disk"]), statistics.median(times["kernel"])
    print(f"median to guestd ready: disk boot {disk:.1f} s, direct kernel boot {kernel:.1f} s "
          f"(disk/kernel {disk / kernel:.2f}x, {args.runs} runs each, image {image.rootfs.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
