"""libvirt's QEMU capability cache of an embedded root, made to send libvirt's guest-CPU check the short way.

Every QEMU start and every restore, libvirt 9.0 reads back the guest CPU QEMU made
(``qemuProcessUpdateAndVerifyCPU``). When QEMU's CPU objects have the ``unavailable-features`` property
(capability flag ``cpu-unavailable-features``, QEMU >= 4.1) it takes the generic way: ``qom-list`` of the CPU,
then one ``qom-get`` per boolean property, 398 QMP round trips for x86. Without that flag it takes the x86 way:
two ``qom-get`` (``feature-words`` and ``filtered-features``) read the same CPUID words. No domain XML skips
the check (tried: no <cpu>, check='none', mode='maximum', a 486 model: 398-400 ``qom-get`` each). Measured on a
quiet machine (2 cores, load 2-3): a paused start through libvirt 0.82 s the generic way, 0.18 s the x86 way,
the same live <cpu> in both. The flag is used by nothing else for an x86 guest whose <cpu> has no MSR features
(libvirt refuses those without it, at start; vmgrid's domains have no <cpu> element).

libvirt keeps the capabilities of each QEMU binary in ``ROOT/cache/qemu/capabilities/*.xml`` and in memory,
stamped with the newest ctime of the libvirt modules loaded so far (``selfctime``); a stamp that differs from
the process's makes it probe QEMU again, and a valid file is what it loads when its in-memory copy turns
stale. The storage-file module is loaded only when a domain's disks are first prepared, and on Debian its ctime
is a second newer than the QEMU driver's: so the in-memory copy of a node's first probe turns stale then, and
libvirt loads the file. ``LibvirtQemuDriver._probe`` uses that: probe, rewrite the file here (the flag
removed, the stamp the storage module will bring), load the storage module, and libvirt takes the file.
Where the stamps do not line up (another distribution, a module loaded later), libvirt probes again and keeps
the generic way: slower, never wrong.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

FLAG = "cpu-unavailable-features"
_FLAG_LINE = re.compile(r"^[ \t]*<flag name='" + re.escape(FLAG) + r"'/>[ \t]*\n", re.M)
_SELFCTIME = re.compile(r"<selfctime>(\d+)</selfctime>")


def cache_files(root: Path) -> list[Path]:
    """The capability cache files of an embedded QEMU root (one per QEMU binary probed)."""
    d = Path(root) / "cache" / "qemu" / "capabilities"
    return sorted(d.glob("*.xml")) if d.is_dir() else []


def storage_module_ctime() -> int | None:
    """The newest ctime of libvirt's storage-file modules (the directory beside the loaded QEMU driver
    module, found in this process's memory map); None when libvirt's QEMU driver is not loaded here."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.endswith("/libvirt_driver_qemu.so"):
            modules = Path(path).parent.parent / "storage-file"
            stamps = [int(p.stat().st_ctime) for p in modules.glob("*.so")] if modules.is_dir() else []
            return max(stamps) if stamps else None
    return None


def prefer_x86_cpu_query(text: str, stamp: int | None) -> str | None:
    """The cache file ``text`` without the ``cpu-unavailable-features`` flag and with its ``selfctime``
    raised to ``stamp`` (never lowered); None when there is nothing to change (no flag: done already)."""
    if not _FLAG_LINE.search(text):
        return None
    out = _FLAG_LINE.sub("", text, count=1)
    m = _SELFCTIME.search(out)
    if m is None:
        return None             # not a cache file libvirt 9.0 would read: leave it alone
    if stamp is not None and stamp > int(m.group(1)):
        out = out[:m.start()] + f"<selfctime>{stamp}</selfctime>" + out[m.end():]
    return out


def rewrite(root: Path, stamp: int | None) -> list[Path]:
    """Rewrite every cache file of ``root`` with prefer_x86_cpu_query (whole: a temporary file renamed);
    returns the files changed."""
    changed = []
    for f in cache_files(root):
        new = prefer_x86_cpu_query(f.read_text(), stamp)
        if new is None:
            continue
        part = f.with_name(f.name + ".vmgrid-part")
        part.write_text(new)
        os.replace(part, f)
        changed.append(f)
    return changed
