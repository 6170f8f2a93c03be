"""The guest image builder's pure parts (mirror choice, module order, cache key) and the sample-image
helper (real qemu-img). The whole build runs in tests/vm (it needs root and a Debian mirror)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from guestd.image import build
from guestd.image.sample import make_overlay, make_sample_image


def test_mirror_from_a_deb822_sources_file(tmp_path, monkeypatch):
    monkeypatch.delenv("VMGRID_DEBIAN_MIRROR", raising=False)
    f = tmp_path / "debian.sources"
    f.write_text("Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
                 "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
                 "Components: main\n")
    assert build.debian_mirror([f]) == "http://mirror.example/debian"


def test_mirror_from_a_one_line_sources_list(tmp_path, monkeypatch):
    monkeypatch.delenv("VMGRID_DEBIAN_MIRROR", raising=False)
    f = tmp_path / "sources.list"
    f.write_text("# comment\ndeb [arch=amd64] http://ftp.example/debian bookworm main\n")
    assert build.debian_mirror([f]) == "http://ftp.example/debian"


def test_mirror_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("VMGRID_DEBIAN_MIRROR", raising=False)
    assert build.debian_mirror([tmp_path / "missing"]) == build.DEFAULT_MIRROR
    monkeypatch.setenv("VMGRID_DEBIAN_MIRROR", "http://local/debian")
    assert build.debian_mirror([]) == "http://local/debian"


def _fake_module(moddir: Path, rel: str, depends: str) -> None:
    path = moddir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1\0")


def test_modules_load_after_their_dependencies(tmp_path):
    moddir = tmp_path / "lib" / "modules" / "6.1.0-test"
    _fake_module(moddir, "kernel/drivers/virtio/virtio.ko", "")
    _fake_module(moddir, "kernel/drivers/virtio/virtio_ring.ko", "virtio")
    _fake_module(moddir, "kernel/drivers/virtio/virtio_pci.ko", "virtio,virtio_ring,virtio_pci_legacy_dev")
    _fake_module(moddir, "kernel/drivers/virtio/virtio_pci_legacy_dev.ko", "")
    _fake_module(moddir, "kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring")
    order = build.module_load_order(tmp_path, "6.1.0-test", ("virtio_pci", "virtio_blk"))
    names = [Path(p).name for p in order]
    assert names.index("virtio.ko") < names.index("virtio_ring.ko") < names.index("virtio_pci.ko")
    assert names.index("virtio_pci_legacy_dev.ko") < names.index("virtio_pci.ko")
    assert names[-1] == "virtio_blk.ko" and len(names) == len(set(names)) == 5
    with pytest.raises(build.ImageBuildError, match="no_such"):
        build.module_load_order(tmp_path, "6.1.0-test", ("no_such",))


def test_the_cache_key_is_stable_and_covers_guestd():
    key = build.source_key()
    assert key == build.source_key() and len(key) == 16


def test_sample_images_are_qcow2_with_the_asked_size_and_content(tmp_path):
    a = make_sample_image(tmp_path / "a.qcow2", size_mib=32)
    b = make_sample_image(tmp_path / "b.qcow2", size_mib=16, data=b"vmgrid sample")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(b)], capture_output=True,
                                     check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 * 1024 * 1024
    assert a.read_bytes() != b.read_bytes()
    ov = make_overlay(b, tmp_path / "ov.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(ov)], capture_output=True,
                                     check=True).stdout)
    assert info["backing-filename"] == str(b.resolve())
