"""qemu-img, the one place the node runs it (as Nova's virt/images.py): empty qcow2 disks and
copy-on-write overlays on a cached base image."""
from __future__ import annotations

import subprocess
from pathlib import Path


def _run(args: list[str]) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"qemu-img {args[0]} failed: {r.stderr.strip()}")


def create_empty(path: Path, size: int) -> Path:
    """An empty qcow2 disk of ``size`` bytes (data and scratch disks)."""
    _run(["create", "-q", "-f", "qcow2", str(path), str(size)])
    return path


def create_overlay(base: Path, base_format: str, dest: Path) -> Path:
    """A qcow2 overlay at ``dest`` whose backing file is ``base`` (in ``base_format``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # absolute: qemu-img reads a relative backing file name relative to the overlay's own directory
    _run(["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(Path(base).absolute()), str(dest)])
    return dest


def rebase_unsafe(overlay: Path, base: Path, base_format: str) -> Path:
    """Point an overlay at another copy of the same base image (a migrated overlay on this node's cache)."""
    _run(["rebase", "-u", "-F", base_format, "-b", str(base), str(overlay)])
    return overlay
