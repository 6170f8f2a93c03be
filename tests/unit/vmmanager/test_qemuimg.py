"""services/vmmanager/qemuimg.py with the real qemu-img: an overlay made from relative paths (a site whose
[container] state_dir is relative, as README's site recipe has it) still finds its base image."""
from __future__ import annotations

import json
import subprocess

from services.container.config import Config
from services.vmmanager import qemuimg


def test_an_overlay_on_a_relative_base_path_names_the_base_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "cache" / "base.qcow2"
    base.parent.mkdir()
    qemuimg.create_empty(base, 1 << 20)
    rel_base = base.relative_to(tmp_path)
    dest = tmp_path / "instances" / "i1" / "root.qcow2"
    qemuimg.create_overlay(rel_base, "qcow2", dest)
    info = json.loads(subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(dest)],
                                     capture_output=True, text=True, check=True).stdout)
    assert [i["filename"] for i in info] == [str(dest), str(base)]     # the chain opens: the base is found


def test_a_relative_state_dir_is_taken_from_the_working_directory_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.container.state_dir = "state/node1"
    assert config.state_dir("vmmanager") == tmp_path / "state" / "node1" / "vmmanager"


def _check(path) -> dict:
    """``qemu-img check`` finds no error and ``qemu-img info`` reads the file: its facts."""
    subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)


def test_empty_disks_written_in_process_are_valid_qcow2_of_the_asked_size(tmp_path):
    for size in (1000, 1 << 20, 64 << 30, 5 << 40):        # a partial sector, small, 64 GiB, an L1 of 2 clusters
        info = _check(qemuimg.create_empty(tmp_path / f"{size}.qcow2", size))
        assert info["format"] == "qcow2" and "backing-filename" not in info
        assert info["virtual-size"] == -(-size // 512) * 512


def test_an_overlay_written_in_process_reads_its_base_and_keeps_its_own_writes(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\xab" * (3 << 20))
    qcow = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(qcow)], check=True)
    for base, fmt in ((raw, "raw"), (qcow, "qcow2")):
        dest = qemuimg.create_overlay(base, fmt, tmp_path / fmt / "root.qcow2")
        info = _check(dest)
        assert (info["backing-filename"], info["backing-filename-format"]) == (str(base), fmt)
        assert info["virtual-size"] == 3 << 20
        # the base's bytes read through the overlay; a write lands in the overlay, the base is unchanged
        io = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 3M", "-c", "write -P 0x5a 1M 64k",
                             "-c", "read -P 0x5a 1M 64k", str(dest)], capture_output=True, text=True, check=True)
        assert "Pattern verification failed" not in io.stdout + io.stderr
        _check(dest)
    assert raw.read_bytes() == b"\xab" * (3 << 20)


def test_an_overlay_on_a_file_that_is_not_qcow2_is_refused(tmp_path):
    import pytest

    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not a qcow2 image" * 4)
    with pytest.raises(OSError):
        qemuimg.create_overlay(bad, "qcow2", tmp_path / "root.qcow2")
