"""ListInstances in pages through the real SOAP face (signed, authorized), and `vmgrid vm list` following
the cursor, as docs/vmmanager.md ("Listing instances") shows it. One grid for the module: the central
container and one test-driver node whose page size is 2, so three instances make two pages."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from client.cli import main as vmgrid
from services.faults import InvalidArgument
from tests.fixtures.grid import start_grid
from tests.integration.test_site_recipe import vmgrid_on_path

pytestmark = pytest.mark.timeout(300)
DOC = Path(__file__).resolve().parents[2] / "docs" / "vmmanager.md"
MARK = "<!-- run as written by tests/integration/test_vmmanager_listing.py (as alice, VMGRID_NODE set) -->"


@pytest.fixture(scope="module")
def grid(grid_pki, tmp_path_factory):
    g = start_grid(grid_pki, tmp_path_factory.mktemp("listing"), list_page=2)
    try:
        image = g.register(size="16M")
        vm = g.vmm(grid_pki.alice)
        g.listed = [vm.deploy(image, f"page-{i}", 600, wait=True).ref.key for i in range(3)]
        yield g
    finally:
        g.close()


def test_pages_follow_the_cursor_and_a_foreign_cursor_is_refused(grid, grid_pki):
    vm = grid.vmm(grid_pki.alice)
    first, cursor = vm.list_page()                         # no maxResults: the node's page size
    assert [i.ref.key for i in first] == grid.listed[:2] and cursor
    assert [i.ref.key for i in vm.list()] == grid.listed   # every page, in creation order
    everything, last = vm.list_page(max_results=10)
    assert [i.ref.key for i in everything] == grid.listed and last is None
    assert [i.identifier for i in vm.list(page_size=1)] == [f"page-{i}" for i in range(3)]
    with pytest.raises(InvalidArgument) as refused:        # alice's cursor shows bob nothing
        grid.vmm(grid_pki.bob).list_page(cursor=cursor)
    assert refused.value.argument == "cursor"
    with pytest.raises(InvalidArgument) as refused:
        vm.list_page(cursor=cursor[:-3] + "xyz")
    assert refused.value.argument == "cursor"
    assert grid.vmm(grid_pki.bob).list() == []             # bob's own: none


def test_a_guests_control_characters_in_its_status_stop_no_listing(grid, grid_pki):
    """A GuestStatus holding characters XML cannot carry (a guest's words recorded before they were escaped, or any
    other way in) is answered escaped: the owner's ListInstances and the instance's status still come back."""
    key = grid.listed[1]
    grid.node(0).store.update(key, guest_status="not ready: \x01\x00 and \x1b[2J")
    vm = grid.vmm(grid_pki.alice)
    try:
        shown = {i.ref.key: i.guest_status for i in vm.list()}
        assert shown[key] == "not ready: \\x01\\x00 and \\x1b[2J"
        assert vm.status(next(i.ref for i in vm.list() if i.ref.key == key)).guest_status == shown[key]
    finally:
        grid.node(0).store.update(key, guest_status="")


def test_the_commands_of_docs_vmmanager_md_run_as_written(grid, grid_pki, tmp_path):
    m = re.search(re.escape(MARK) + r"\n```sh\n(.*?)```", DOC.read_text(), re.S)
    assert m, "docs/vmmanager.md lost its tested vm list commands"
    env = {**grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": grid.node_url(), "HOME": str(tmp_path),
           "PATH": f"{vmgrid_on_path(tmp_path)}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    r = subprocess.run(["bash", "-e", "-c", m.group(1)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    table, _, js = r.stdout.partition("\n[")
    assert all(f"page-{i}" in table for i in range(3))     # all three, though a page holds two
    assert [i["identifier"] for i in json.loads("[" + js)] == [f"page-{i}" for i in range(3)]


def test_a_page_size_out_of_range_is_one_line(capsys):
    assert vmgrid(["vm", "list", "--page-size", "0", "--url", "https://localhost:1/x"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("vmgrid: ") and "--page-size" in err and len(err.strip().splitlines()) == 1
