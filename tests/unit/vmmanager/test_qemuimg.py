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
