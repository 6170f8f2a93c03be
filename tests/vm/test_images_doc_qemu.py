"""docs/images.md as written: its command block run line by line by a shell, as a VO member, against a
local grid whose node runs QEMU: the base recipe built, registered, found, deployed (the disk boots by
itself; the node has no kernel configured), its status read, destroyed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from client.localgrid import LocalGrid
from services.authz.edit import site_policy
from services.authz.policy import Group

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "images.md"
pytestmark = pytest.mark.timeout(1800)


def doc_commands() -> list[str]:
    section = DOC.read_text().split("## Build, register, deploy", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def grid(qemu_prerequisites, guest_image):
    root = Path(tempfile.mkdtemp(prefix="vgimg-", dir="/tmp"))    # short: guest channel socket paths
    try:
        with LocalGrid(root) as g:
            alice = g.user("alice")
            ingest = root / "ingest"
            ingest.mkdir()
            g.start_central(site_policy(groups=[Group("bio", members=(alice.dn,))]), ingest)
            node = g.start_node("node1", {"vmm": "qemu", "vmm_root": str(root / "q"), "network": "10.99.0.0/24",
                                          "gateway": "10.99.0.1", "lease_range": "10.99.0.30-10.99.0.39",
                                          "guest_ready_timeout": 240.0, "sweep_interval": 0.5})
            g.env_extra = {"VMGRID_REPOSITORY": f"{g.services_url}/VMRepositoryService",
                           "VMGRID_NODE": node.base_url + "/wsrf/services/VMManagerService",
                           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            yield g
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_commands_of_docs_images_md_run_as_written(grid, tmp_path):
    commands = doc_commands()
    assert [c.split()[:3] for c in commands][:3] == [["vmgrid", "image", "check"], ["vmgrid", "image", "build"],
                                                       ["vmgrid", "repo", "register"]]
    env = {**grid.env("alice"), **grid.env_extra}
    out = {}
    for command in commands:
        r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=1500)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr[-3000:]}"
        out[command] = r.stdout
    by = lambda prefix: next(v for k, v in out.items() if k.startswith(prefix))  # noqa: E731
    assert "vmgrid_runtime" in by("vmgrid image check emboss")
    assert (tmp_path / "images" / "debian12-base.qcow2").is_file()
    assert "bio/debian12-base" in by("vmgrid repo query") and "1 matching" in by("vmgrid repo query")
    assert "Running" in by("vmgrid vm deploy")
    status = by("vmgrid vm status")
    assert re.search(r"guest\s+ready; address 10\.99\.0\.3\d/", status), status   # guestd in the disk-booted guest
    assert "my-guest: destroyed" in by("vmgrid vm destroy")
    # the node booted the image by itself: no kernel in its configuration
    assert "kernel" not in (grid.root / "node1.toml").read_text()
