"""A tiny non-bootable qcow2 'sample image' for the test driver and staging tests (qemu-img only)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def make_sample_image(path: Path, size_mib: int = 64, data: bytes = b"") -> Path:
    """Create a qcow2 image of ``size_mib`` virtual MiB at ``path``; ``data`` is written at offset 0
    (so two sample images can differ in content and checksum). Returns the path."""
    path = Path(path)
    if data:
        raw = path.with_suffix(".raw")
        with open(raw, "wb") as f:
            f.write(data)
            f.truncate(size_mib * 1024 * 1024)
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(path)], check=True)
        raw.unlink()
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"], check=True)
    return path


def make_overlay(base: Path, overlay: Path) -> Path:
    """A copy-on-write qcow2 overlay on ``base`` (each instance gets one)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(Path(base).resolve()),
                    str(overlay)], check=True)
    return Path(overlay)
