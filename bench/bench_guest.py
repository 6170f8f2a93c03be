"""Real-guest figures on QEMU (software emulation): guest image build, boot to guestd ready, pause,
resume (with the guest clock fix), save, restore, a migration hop, and the guest channel round trip.

    python bench/bench_guest.py [--boots 3] [--cold]

Prints a table, and ratios against a peer measured in the same run: a fresh boot is the peer of a
restore (what the poster's migration saves), the guest's memory size the peer of the save file.
--cold also builds the image from scratch in a temporary cache (debootstrap included, about a minute).
Needs root (debootstrap, QEMU as root through qemu:///embed).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guestd.image.build import build  # noqa: E402
from guestd.image.sample import make_overlay  # noqa: E402
from services.vmmanager.context import build_context, write_context_iso  # noqa: E402
from services.vmmanager.vmm import (Disk, GuestChannel, InstanceSpec, KernelBoot, LibvirtQemuDriver,  # noqa: E402
                                    Nic, Port, qemu_user_missing)

MEMORY_MIB = 256


def new_spec(image, d: Path, name: str) -> InstanceSpec:
    d.mkdir(parents=True)
    mac = "52:54:00:be:00:%02x" % (hash(name) & 0xFF)
    ctx = build_context(instance=name, hostname=name, mac=mac, address="10.0.2.15", netmask="255.255.255.0",
                        gateway="10.0.2.2", container_command=["/bin/sh", "-c", "sleep infinity"])
    write_context_iso(ctx, d / "context.iso")
    return InstanceSpec(name=name, memory_mib=MEMORY_MIB, disks=(Disk(make_overlay(image.rootfs, d / "disk.qcow2")),),
                        cdroms=(d / "context.iso",), nics=(Nic(mac),), serial_ports=(Port("file", d / "console.log"),),
                        boot=KernelBoot(image.kernel, image.initrd, image.cmdline),
                        channel=GuestChannel(d / "g.sock", ctx.token))


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also build the image from scratch (no caches)")
    args = ap.parse_args()
    if qemu_user_missing():
        print("create the libvirt-qemu user first (see docs/vmm.md)", file=sys.stderr)
        return 1
    rows: list[tuple[str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="vmgrid-bench-", dir="/tmp"))
    try:
        if args.cold:
            t, _ = timed(build, work / "cold-cache", force=True, log=lambda m: None)
            rows.append(("image build from scratch (debootstrap, kernel, initramfs, qcow2)", f"{t:.1f} s"))
        t, image = timed(build, log=lambda m: None)
        rows.append(("image ready (built now if the sources changed)", f"{t:.1f} s"))
        t, image = timed(build, log=lambda m: None)
        rows.append(("image lookup when cached", f"{t * 1000:.0f} ms"))
        t, image = timed(build, force=True, log=lambda m: None)
        rows.append(("image rebuild after a guestd change (base rootfs cached)", f"{t:.1f} s"))
        rows.append(("image: rootfs qcow2 size", f"{image.rootfs.stat().st_size / 2**20:.0f} MiB"))

        node = LibvirtQemuDriver(root=work / "root")
        boots, defines = [], []
        for i in range(args.boots):
            spec = new_spec(image, work / f"b{i}", f"bench-{i}")
            t_def, _ = timed(node.define, spec)
            defines.append(t_def)
            t0 = time.perf_counter()
            node.start(spec.name)
            node.guest_channel(spec.name).wait_ready(timeout=180, poll=0.5)
            boots.append(time.perf_counter() - t0)
            if i < args.boots - 1:
                node.destroy(spec.name)
                node.undefine(spec.name)
        boot = statistics.median(boots)
        rows.append(("define (p50)", f"{statistics.median(defines) * 1000:.0f} ms"))
        rows.append((f"boot to guestd ready (p50 of {args.boots}, {MEMORY_MIB} MiB, TCG)",
                     f"{boot:.2f} s  (all: {', '.join(f'{b:.1f}' for b in boots)})"))

        name = spec.name
        ch = node.guest_channel(name)
        rtts = [ch.ping() for _ in range(50)]
        rows.append(("guest channel round trip (p50 of 50 pings)", f"{statistics.median(rtts) * 1000:.1f} ms"))
        pauses, resumes = [], []
        for _ in range(5):
            pauses.append(timed(node.pause, name)[0])
            resumes.append(timed(node.resume, name)[0])
        rows.append(("pause (p50)", f"{statistics.median(pauses) * 1000:.1f} ms"))
        rows.append(("resume + guest clock fix (p50)", f"{statistics.median(resumes) * 1000:.1f} ms"))
        offset = node.sync_guest_time(name)
        rows.append(("guest clock offset after the fix", f"{offset * 1000:+.1f} ms"))

        save_file = work / "s.state"
        t_save, _ = timed(node.save, name, save_file)
        size = save_file.stat().st_size
        t_restore, _ = timed(node.restore, save_file)
        rows.append(("save", f"{t_save:.2f} s to {size / 2**20:.0f} MiB"))
        rows.append(("restore + guest clock fix", f"{t_restore:.2f} s"))

        # a migration hop: save, copy state + overlay, restore on a second QEMU root in another process
        save2 = work / "m.state"
        t_s2, _ = timed(node.save, name, save2)
        target = work / "target"
        target.mkdir()
        t_copy0 = time.perf_counter()
        shutil.copy2(spec.disks[0].path, target / "disk.qcow2")
        shutil.copy2(save2, target / "m.state")
        t_copy = time.perf_counter() - t_copy0
        moved = dataclasses.replace(spec, disks=(Disk(target / "disk.qcow2"),),
                                    serial_ports=(Port("file", target / "console.log"),),
                                    channel=dataclasses.replace(spec.channel, path=target / "g.sock"))
        from services.vmmanager.vmm.config import domain_xml
        (target / "spec.xml").write_text(domain_xml(moved, "qemu"))
        helper = Path(__file__).resolve().parents[1] / "tests" / "vm" / "node_helper.py"
        t_r0 = time.perf_counter()
        out = subprocess.run([sys.executable, str(helper), str(work / "root2"), str(target / "m.state"),
                              str(target / "spec.xml"), "--guest-timeout", "20"], capture_output=True, text=True)
        t_hop = time.perf_counter() - t_r0
        import json
        remote = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
        rows.append(("migration hop: save + copy + restore on another node (restore in a new process)",
                     f"{t_s2 + t_copy + remote.get('restore_seconds', float('nan')):.2f} s "
                     f"(save {t_s2:.2f}, copy {t_copy:.2f}, restore {remote.get('restore_seconds', float('nan')):.2f}; "
                     f"helper process {t_hop:.1f} s incl. QEMU capability probe)"))
        node.undefine(name)
        node.close()

        print("\nvmgrid guest on QEMU (TCG), one run")
        width = max(len(r[0]) for r in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        print("\nratios against peers in this run")
        print(f"  restore / fresh boot to ready     {t_restore / boot:.2f}  (restore is the cheaper way back)")
        print(f"  save file / guest memory          {size / (MEMORY_MIB * 2**20):.2f}")
        print(f"  resume / restore                  {statistics.median(resumes) / t_restore:.3f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
