"""A self-contained bootable disk: an MBR with syslinux' boot code, a small FAT boot partition holding
syslinux, the kernel, the initrd and the command line, and the ext4 root partition. No loop devices
or mounts: mtools and syslinux write into the FAT image file, Python writes the partition table."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

SECTOR = 512
ALIGN = 2048                      # sectors: partitions start on 1 MiB boundaries
BOOT_MIB = 32                     # the FAT boot partition (kernel ~8 MiB + initrd ~2 MiB)
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
ROOT_DEVICE = "/dev/vda2"         # the root partition as the guest's virtio disk names it


class DiskError(RuntimeError):
    pass


def _run(step: str, cmd: list[str], **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise DiskError(f"{step}: {' '.join(cmd[:2])} exited {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout).strip()[-1500:]}")


def check_tools() -> None:
    missing = [t for t in ("mformat", "mcopy", "syslinux", "mkfs.ext4", "qemu-img") if shutil.which(t) is None]
    if not MBR_CODE.exists():
        missing.append(str(MBR_CODE))
    if missing:
        raise DiskError(f"missing {', '.join(missing)} (Debian packages syslinux syslinux-common mtools "
                        "e2fsprogs qemu-utils)")


def syslinux_cfg(cmdline: str) -> str:
    return ("DEFAULT vmgrid\nPROMPT 0\nTIMEOUT 0\nLABEL vmgrid\n  LINUX /vmlinuz\n  INITRD /initrd.img\n"
            f"  APPEND {cmdline}\n")


def boot_partition(out: Path, kernel: Path, initrd: Path, cmdline: str, start_sector: int) -> None:
    """The FAT boot partition image: syslinux' loader, vmlinuz, initrd.img, syslinux.cfg."""
    sectors = BOOT_MIB * 1024 * 1024 // SECTOR
    with open(out, "wb") as f:
        f.truncate(sectors * SECTOR)
    _run("format the boot partition", ["mformat", "-i", str(out), "-T", str(sectors), "-h", "64", "-s", "32",
                                       "-H", str(start_sector), "-v", "VMGRIDBOOT", "::"])
    _run("install syslinux", ["syslinux", "--install", str(out)])
    cfg = out.with_name("syslinux.cfg")
    cfg.write_text(syslinux_cfg(cmdline))
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
        _run(f"copy {name}", ["mcopy", "-o", "-i", str(out), str(src), f"::/{name}"])


def _partition_entry(bootable: bool, kind: int, start: int, count: int) -> bytes:
    chs = b"\xfe\xff\xff"         # beyond CHS: BIOSes and Linux use the LBA fields
    return struct.pack("<B3sB3sII", 0x80 if bootable else 0, chs, kind, chs, start, count)


def assemble(out_raw: Path, boot_img: Path, root_img: Path, total_sectors: int) -> None:
    """Write the raw disk: MBR + partition table, then the two partition images at their offsets
    (all-zero blocks are skipped, so the file stays sparse)."""
    boot_start = ALIGN
    boot_count = boot_img.stat().st_size // SECTOR
    root_start = boot_start + boot_count
    root_count = root_img.stat().st_size // SECTOR
    if root_start + root_count > total_sectors:
        raise DiskError("the root filesystem does not fit the disk")
    mbr = bytearray(SECTOR)
    mbr[:440] = MBR_CODE.read_bytes()[:440].ljust(440, b"\0")
    mbr[440:444] = b"VMGR"                                   # disk signature
    mbr[446:462] = _partition_entry(True, 0x0E, boot_start, boot_count)       # FAT16 (LBA)
    mbr[462:478] = _partition_entry(False, 0x83, root_start, total_sectors - root_start)
    mbr[510:512] = b"\x55\xaa"
    chunk = 4 * 1024 * 1024
    with open(out_raw, "wb") as f:
        f.truncate(total_sectors * SECTOR)
        f.write(mbr)
        for img, start in ((boot_img, boot_start), (root_img, root_start)):
            with open(img, "rb") as src:
                offset = start * SECTOR
                while block := src.read(chunk):
                    if block.count(0) != len(block):
                        f.seek(offset)
                        f.write(block)
                    offset += len(block)


def make_disk(out_qcow2: Path, work: Path, staging: Path, kernel: Path, initrd: Path, cmdline: str,
              disk_mib: int) -> None:
    """The bootable qcow2 of ``disk_mib`` MiB from the root tree ``staging``."""
    check_tools()
    total = disk_mib * 1024 * 1024 // SECTOR
    root_sectors = total - ALIGN - BOOT_MIB * 1024 * 1024 // SECTOR
    used = tree_bytes(staging)
    if used > root_sectors * SECTOR * 0.9:       # ext4's own metadata and a little room to run
        need = (used / 0.9 + (ALIGN * SECTOR + BOOT_MIB * 2**20)) / 2**20
        raise DiskError(f"the image's files take {used / 2**20:.0f} MiB, too much for a {disk_mib} MiB disk: "
                        f"set hardware.disk_size to at least {int(need) + 1}M")
    boot = work / "boot.fat"
    boot_partition(boot, kernel, initrd, cmdline, ALIGN)
    root = work / "root.ext4"
    _run("mkfs.ext4", ["mkfs.ext4", "-q", "-F", "-L", "vmgrid-root", "-d", str(staging), str(root),
                       f"{root_sectors // 2}k"])
    raw = work / "disk.raw"
    assemble(raw, boot, root, total)
    root.unlink()
    _run("qemu-img convert", ["qemu-img", "convert", "-O", "qcow2", str(raw), str(out_qcow2)])
    raw.unlink()


def tree_bytes(root: Path) -> int:
    """The bytes of the files under ``root`` (links not followed), in 4 KiB blocks."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + 4095) // 4096 * 4096
    return total


def kernel_version(bzimage: Path) -> str:
    """The version a Linux bzImage announces in its setup header (what `uname -r` will say)."""
    data = bzimage.read_bytes()[:64 * 1024]
    if data[0x202:0x206] != b"HdrS":
        raise DiskError(f"{bzimage} is not a Linux bzImage")
    pointer = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
    return data[pointer:data.index(b"\0", pointer)].decode("ascii", "replace").split()[0]
