"""Where a restore's time goes: the VMM-level steps of a save/restore of a real guest, one by one.

    .venv/bin/python bench/profile_restore.py [--memory 256,512] [--repeat 3]

For each memory size a real guest (the project's guest image, QEMU software emulation) is booted in this
process's qemu:///embed root to guestd ready, then timed: the save; QEMU alone started by hand (no libvirt: -S -incoming defer, to its QMP greeting); QEMU
started through libvirt alone (a domain started paused without a saved state: the floor of any restore); a restore (paused) of the save file with its
pages in the page cache, the same with the file evicted from the page cache first (as after a copy that
was not read back), the resume, and guestd's first answer after the resume; a clone's save-file rewrite
(services/vmmanager/vmm/saveimage.py). Needs root (qemu:///embed runs QEMU as root). Prints figures only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchgrid import loadavg, log, table  # noqa: E402


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def qemu_by_hand(memory: int, work: Path) -> float:
    """QEMU alone, no libvirt: started with -S -incoming defer (how libvirt starts a restore) and the
    devices of a guest, to its QMP greeting; seconds."""
    import socket
    import subprocess
    sock = work / "qmp-by-hand.sock"
    sock.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,usb=off", "-accel", "tcg", "-m", str(memory),
                             "-nodefaults", "-display", "none", "-S", "-incoming", "defer",
                             "-device", "virtio-serial-pci", "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(sock))
                break
            except OSError:
                s.close()
                if proc.poll() is not None:
                    raise RuntimeError("qemu-system-x86_64 exited before its QMP socket listened")
                time.sleep(0.002)
        with s:
            s.recv(4096)
            took = time.perf_counter() - t
            s.sendall(b'{"execute":"qmp_capabilities"}\n')
            s.recv(4096)
            s.sendall(b'{"execute":"quit"}\n')
            proc.wait(30)
        return took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="256,512")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval for this process (0: Python's default, 5 ms)")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if os.geteuid() != 0:
        raise SystemExit("profile_restore: needs root (QEMU guests through qemu:///embed)")
    import dataclasses

    from guestd.image.build import build
    from guestd.image.sample import make_overlay
    from services.vmmanager.context import build_context, write_context_iso
    from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, KernelBoot, LibvirtQemuDriver, Nic, Port
    from services.vmmanager.vmm import saveimage

    root = Path(tempfile.mkdtemp(prefix="vm-prof-", dir="/tmp"))
    print(f"vmgrid restore profile: {os.cpu_count()} cores, {loadavg()}, switch interval "
          f"{sys.getswitchinterval() * 1000:.1f} ms, work directory {root}")
    image = build(log=log)
    node = LibvirtQemuDriver(root=root / "q")
    rows = []
    try:
        for memory in [int(m) for m in args.memory.split(",")]:
            d = root / f"m{memory}"
            d.mkdir()
            name, mac = f"prof-{memory}", "52:54:00:be:03:01"
            ctx = build_context(instance=name, hostname=name, mac=mac, address="10.99.0.9",
                                netmask="255.255.255.0", gateway="10.99.0.1")
            write_context_iso(ctx, d / "context.iso")
            spec = InstanceSpec(name=name, memory_mib=memory,
                                disks=(Disk(make_overlay(image.rootfs, d / "root.qcow2")),),
                                cdroms=(d / "context.iso",), nics=(Nic(mac),),
                                serial_ports=(Port("file", d / "console.log"),),
                                boot=KernelBoot(image.kernel, image.initrd, image.cmdline),
                                channel=GuestChannel(d / "g.sock", ctx.token))
            node.define(spec)
            node.start(name)
            log(f"{memory} MiB: booting")
            node.guest_channel(name).wait_ready(timeout=300)
            fig: dict[str, list[float]] = {k: [] for k in ("save", "qemu-by-hand", "qemu-start", "restore-cached",
                                                          "restore-evicted",
                                                          "restore-busy-gil",
                                                          "resume", "guestd-answer", "clone-rewrite")}
            for r in range(args.repeat):
                state = d / f"state{r}.save"
                t = time.perf_counter()
                node.save(name, state)
                fig["save"].append(time.perf_counter() - t)
                size = state.stat().st_size
                fig["qemu-by-hand"].append(qemu_by_hand(memory, d))
                # the floor: QEMU started paused, nothing loaded
                other = dataclasses.replace(spec, name=f"{name}-x", uuid=str(uuid.uuid4()),
                                            nics=(Nic("52:54:00:be:03:02"),),
                                            disks=(Disk(make_overlay(image.rootfs, d / f"x{r}.qcow2")),),
                                            channel=GuestChannel(d / "x.sock", ctx.token),
                                            serial_ports=(Port("file", d / "xconsole.log"),))
                node.define(other)
                try:
                    t = time.perf_counter()
                    node.start(other.name, paused=True)
                    fig["qemu-start"].append(time.perf_counter() - t)
                finally:
                    node.destroy(other.name)
                    node.undefine(other.name)
                for mode in ("restore-cached", "restore-evicted", "restore-busy-gil"):
                    stop = threading.Event()
                    if mode == "restore-busy-gil":      # another Python thread of the process busy (a node's
                        threading.Thread(target=spin, args=(stop,), daemon=True).start()   # SOAP, GridFTP)
                    if mode != "restore-cached":
                        state = d / f"{mode}{r}.save"
                        node.save(name, state)
                    if mode == "restore-evicted":
                        evict(state)
                    t = time.perf_counter()
                    node.restore(state, paused=True)
                    fig[mode].append(time.perf_counter() - t)
                    stop.set()
                    t = time.perf_counter()
                    node._call("resume", node._domain(name).resume)
                    fig["resume"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    node.guest_channel(name).request("ping", timeout=60)
                    fig["guestd-answer"].append(time.perf_counter() - t)
                img = saveimage.read(state)
                t = time.perf_counter()
                saveimage.write_clone(state, img, img.xml, d / f"clone{r}.save")
                fig["clone-rewrite"].append(time.perf_counter() - t)
                for f in d.glob("*.save"):
                    f.unlink()
            node.destroy(name)
            node.undefine(name)
            med = {k: statistics.median(v) for k, v in fig.items() if v}
            print(f"{memory} MiB: restore (cached) / QEMU start alone {med['restore-cached'] / med['qemu-start']:.2f}x; "
                  f"restore beside a busy Python thread / alone {med['restore-busy-gil'] / med['restore-cached']:.2f}x",
                  flush=True)
            for k, v in fig.items():
                if v:
                    rows.append([f"{memory} MiB", k, f"{statistics.median(v):.3f} s",
                                 " ".join(f"{x:.2f}" for x in v), f"{size / 2**20:.0f} MiB" if k == "save" else ""])
            print(f"{memory} MiB done, {loadavg()}", flush=True)
    finally:
        for info in node.list_instances():
            for verb in (node.destroy, node.undefine):
                try:
                    verb(info.name)
                except Exception:   # noqa: BLE001
                    pass
        node.close()
        shutil.rmtree(root, ignore_errors=True)
    print(table(["guest", "step", "median", "runs", "state file"], rows))
    print(f"load after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
