"""The vmgrid runtime in a guest (recipe option [vmgrid] runtime): this checkout's packages services,
security, gridftp and client, and the exact distributions of their Python dependencies that the
builder's own environment runs (pyproject.toml pins them), copied into /usr/lib/vmgrid/python with a
.pth file so the guest's python3.11 finds them. Same interpreter version and platform as the guest
(Debian 12, CPython 3.11, x86_64), so the binary wheels (lxml, cryptography) run unchanged; numpy is
Debian's python3-numpy."""
from __future__ import annotations

import hashlib
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "security", "gridftp", "client")
GUEST_DIR = "usr/lib/vmgrid/python"
# pyproject dependencies the guest does not get from the builder: no plotting inside a guest, and
# numpy comes from Debian (the numpy 2 wheel needs x86-64-v2: "Illegal instruction" on QEMU's
# default TCG CPU, qemu64)
LEFT_OUT = {"matplotlib", "numpy"}
# Debian packages the runtime needs: libvirt-python links libvirt.so.0 (the container's configuration
# module imports the VMManager's, which imports libvirt, even where no VMM runs); numpy (above)
DEBIAN_PACKAGES = ("libvirt0", "python3-numpy")


class RuntimeCopyError(RuntimeError):
    """vmgrid's runtime cannot be copied from this Python into a guest; the message says why."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[metadata.Distribution]:
    """vmgrid's runtime dependencies and theirs, as installed in the builder's environment."""
    if sys.version_info[:2] != (3, 11):
        raise RuntimeCopyError(f"the vmgrid runtime is copied from the builder's Python, which must be 3.11 like "
                            f"the guest's (this is {sys.version.split()[0]})")
    try:
        top = [r for r in metadata.requires("vmgrid") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        raise RuntimeCopyError("vmgrid is not installed in this Python (run ./run.sh setup)") from None
    seen: dict[str, metadata.Distribution] = {}
    todo = [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in top]
    todo = [n for n in todo if _norm(n) not in LEFT_OUT]
    while todo:
        name = todo.pop()
        if _norm(name) in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise RuntimeCopyError(f"dependency {name} is not installed in the builder's Python") from None
        seen[_norm(name)] = dist
        for req in dist.requires or []:
            if ";" in req and "extra ==" in req.split(";", 1)[1]:
                continue
            if ";" in req and not _marker_holds(req.split(";", 1)[1]):
                continue
            todo.append(re.split(r"[<>=!~;\[ (]", req, maxsplit=1)[0])
    return sorted(seen.values(), key=lambda d: _norm(d.metadata["Name"]))


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:       # pip vendors packaging; without it keep the requirement
        return True
    return Marker(marker).evaluate({"extra": ""})


def key() -> str:
    h = hashlib.sha256()
    for d in requirements():
        h.update(f"{d.metadata['Name']}=={d.version}\n".encode())
    return h.hexdigest()[:16]


def install(rootfs: Path) -> list[str]:
    """Copy vmgrid and its dependencies into ``rootfs``; return the name==version list installed."""
    target = rootfs / GUEST_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    pins = []
    for dist in requirements():
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            if "__pycache__" in f.parts or f.parts[0].startswith("..") or not src.is_file():
                continue
            dest = target / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        pins.append(f"{dist.metadata['Name']}=={dist.version}")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, target / pkg, ignore=ignore)
    shutil.copytree(REPO / "wsdl", target / "wsdl", ignore=ignore)      # the contract the services serve
    (target / "vmgrid-requirements.txt").write_text("".join(p + "\n" for p in pins))
    pth = rootfs / "usr" / "lib" / "python3" / "dist-packages" / "vmgrid.pth"
    pth.parent.mkdir(parents=True, exist_ok=True)
    pth.write_text(f"/{GUEST_DIR}\n")
    return pins
