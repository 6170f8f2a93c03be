"""The poster's scene, timed: `vmgrid demo --real` (the EMBOSS image built or taken from the cache,
registered, deployed on 3 bridge-mode nodes, tmap and needle through each guest's job service, outputs
fetched, pause/resume, destroy) read back from its report.json, beside the poster's anchors (EMBOSS
installed on a grid node by hand: 45 min; a 2 GB image deployed: 6 min 23 s) and beside installing
`emboss` with apt by hand, measured in the same run: `apt-get install emboss` in a chroot copy of the
image builder's cached Debian 12 base (the same mirror and packages a site admin would fetch; a chroot on
this host, not a booted guest: under QEMU's TCG a guest would be slower still).

    python bench/bench_science.py [--no-apt] [--workdir demo-out]

Needs root (like the demo). Prints a table; the ratios compare the figures of this run only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POSTER_INSTALL = 45 * 60.0          # the poster: EMBOSS installed on a node by hand
POSTER_DEPLOY = 6 * 60 + 23.0       # the poster: a 2 GB image deployed


def apt_install_emboss() -> float:
    """Seconds for `apt-get install -y emboss` in a fresh copy of the builder's cached Debian 12 base."""
    from guestd.image.build import DEFAULT_CACHE

    bases = sorted(DEFAULT_CACHE.glob("base-bookworm-*"), key=lambda p: len(p.name))
    base = next((b for b in bases if (b / "usr" / "bin" / "python3").exists()), None)
    if base is None:
        raise SystemExit("no cached Debian base in var/guest-image (build any image first)")
    root = Path(tempfile.mkdtemp(prefix="vgbench-apt-", dir="/tmp"))
    try:
        subprocess.run(["cp", "-a", f"{base}/.", str(root)], check=True)
        shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
        (root / "proc").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        try:
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C"}
            t = time.monotonic()
            for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                                      "emboss"]):
                subprocess.run(["chroot", str(root), *cmd], check=True, env=env, stdout=subprocess.DEVNULL)
            return time.monotonic() - t
        finally:
            subprocess.run(["umount", str(root / "proc")], check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "demo-out")
    ap.add_argument("--no-apt", action="store_true", help="skip the apt-get install comparison")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_science needs root (the --real demo and the apt chroot)")
    t = time.monotonic()
    rc = subprocess.run([sys.executable, "-m", "client.cli", "demo", "--real", "--workdir", str(args.workdir)],
                        cwd=REPO).returncode
    scene = time.monotonic() - t
    report = json.loads((args.workdir / "report.json").read_text())
    apt = None if args.no_apt else apt_install_emboss()
    rows = [(k, v) for k, v in report["timings"].items()]
    for name, inst in report["instances"].items():
        rows.append((f"{name}: deploy to ready", inst["ready_seconds"]))
        for job in inst.get("jobs", []):
            rows.append((f"{name}: {job['program']} turnaround", job["turnaround"]))
            rows.append((f"{name}: {job['program']} output fetch", job["fetch"]))
    rows.append(("whole scene (this run, wall clock)", scene))
    if apt is not None:
        rows.append(("apt-get install emboss by hand (chroot, this run)", apt))
    print(f"\n{'step':58} {'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:58} {seconds:9.1f}")
    ready = max(inst["ready_seconds"] for inst in report["instances"].values())
    print(f"\nposter anchors: EMBOSS installed by hand {POSTER_INSTALL:.0f} s; a 2 GB image deployed {POSTER_DEPLOY:.0f} s")
    print(f"deploy to a ready EMBOSS guest (slowest of 3, this run) / poster's install: {ready / POSTER_INSTALL:.3f}x")
    print(f"deploy to a ready EMBOSS guest (slowest of 3) / poster's 2 GB deployment: {ready / POSTER_DEPLOY:.3f}x")
    if apt is not None:
        print(f"deploy to a ready EMBOSS guest / apt-get install emboss by hand (this run): {ready / apt:.2f}x")
    return rc


if __name__ == "__main__":
    sys.exit(main())
