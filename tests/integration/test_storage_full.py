"""A full disk under the central process (Authorization service + VMRepository) and under a node: every
write that finds no space is a typed StorageFull fault saying what is full, nothing is half-written, and
reads, queries, authorization and RemoveImage keep working, also after the central process is killed and
restarted on the full disk (the WS-Security replay cache degrades instead of answering HTTP 500).

Each state directory is a small tmpfs this test mounts (root is needed; it is unmounted at the end)."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from client.localgrid import LocalGrid
from client.repository import RepositoryClient
from client.soap import GridServiceClient
from client.vmmanager import VMManagerClient
from security.trust import TrustStore
from services.authz.audit import verify_chain
from services.faults import StorageFull
from tests.fixtures.repository import EXAMPLES, bio_site, make_image

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a tmpfs (root)")]


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "vgrel-tmpfs", str(path)], check=True)


def fill(path: Path) -> Path:
    """Fill the file system holding ``path`` to the last byte; returns the filler file."""
    filler = path / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "ab", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    if f.write(chunk[:size]) != size:
                        break
                except OSError:
                    break
    return filler


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("storagefull")
    mounts = [root / "central", root / "node1"]
    mount_tmpfs(mounts[0], "40m")
    mount_tmpfs(mounts[1], "24m")
    try:
        with bio_site(root) as grid:
            yield grid
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], check=False)


def repo(grid: LocalGrid, user: str) -> RepositoryClient:
    return RepositoryClient(GridServiceClient(f"{grid.services_url}/VMRepositoryService",
                                              grid.user(user).credential, TrustStore(grid.cert_dir)))


def node(grid: LocalGrid, proc, user: str = "alice") -> VMManagerClient:
    return VMManagerClient(GridServiceClient(proc.base_url + "/wsrf/services/VMManagerService",
                                             grid.user(user).credential, TrustStore(grid.cert_dir)))


def register(grid: LocalGrid, name: str, size: str = "1M", repeat: int = 200_000):
    from services.descriptor import parse_descriptor, set_field
    ws = parse_descriptor((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    image = make_image(grid.ingest / f"{name}.qcow2", "qcow2", size, fill=name.encode() * repeat)
    return repo(grid, "admin").register(ws, local_path=str(image))


def stored(grid: LocalGrid) -> tuple[set[str], list[str], int]:
    """The repository's blob files, its tmp files, and its catalogue rows."""
    store = grid.root / "central" / "repository" / "images"
    db = sqlite3.connect(f"file:{grid.root / 'central' / 'repository' / 'catalogue.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        db.close()
    return ({p.name for p in (store / "blobs").glob("??/*")}, [p.name for p in (store / "tmp").iterdir()], rows)


def slots(grid: LocalGrid) -> int:
    db = sqlite3.connect(f"file:{next((grid.root / 'central' / 'authz').glob('*.sqlite'))}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM slots").fetchone()[0]
    finally:
        db.close()


def test_a_full_central_disk_gives_typed_faults_and_keeps_reads_and_removal_working(full):
    grid = full
    kept = register(grid, "kept")
    register(grid, "removable")
    proc = grid.start_node("node1", {"lease_range": "10.99.0.10-10.99.0.40"})
    vm = node(grid, proc)
    running = vm.deploy(kept, "before-full", 600, wait=True)
    assert running.state == "Running"

    filler = fill(grid.root / "central")
    blobs, tmp, rows = stored(grid)

    # an ingest into the full store: StorageFull naming the image store, and nothing of it left behind
    with pytest.raises(StorageFull) as err:
        register(grid, "too-much", size="4M")
    assert "image store" in err.value.store
    assert stored(grid) == (blobs, tmp, rows)

    # reads, queries and the node's authorization through the central process keep working
    alice = repo(grid, "alice")
    found = alice.query([])
    names = {d.findtext("{*}identity/{*}name") for d in found.descriptors}
    assert found.total == rows and names >= {"kept", "removable"}
    assert alice.show("bio/kept") is not None
    assert alice.vos() == [("bio", rows)]
    assert [i.identifier for i in vm.list()] == ["before-full"]
    assert vm.status(running.ref).state == "Running"

    # RemoveImage frees space on the full disk
    assert repo(grid, "admin").remove("bio/removable") is True
    assert len(stored(grid)[0]) == len(blobs) - 1

    # killed and restarted on the full disk, the central process still serves
    fill(grid.root / "central")
    central = grid.processes["central"]
    grid.stop("central", signal.SIGKILL)
    grid.restart(central)
    assert alice.show("bio/kept") is not None
    assert [i.identifier for i in vm.list()] == ["before-full"]
    with pytest.raises(StorageFull):
        register(grid, "still-too-much", size="4M")

    # stopped cleanly and started on the full disk (its databases must open again): it serves
    fill(grid.root / "central")
    grid.stop("central")
    grid.restart(central)
    assert alice.show("bio/kept") is not None
    assert [i.identifier for i in vm.list()] == ["before-full"]

    # space again: writes work, the audit chain is whole
    filler.unlink()
    vm.destroy(running.ref)
    register(grid, "after")
    assert verify_chain(next((grid.root / "central" / "authz").glob("*.log"))) > 0
    grid.stop("node1")


def test_a_full_node_disk_gives_typed_faults_and_keeps_the_node_answering(full):
    grid = full
    image = register(grid, "for-node")
    proc = grid.start_node("node1", {"lease_range": "10.99.0.10-10.99.0.40"})
    vm = node(grid, proc)
    running = vm.deploy(image, "node-before-full", 600, wait=True)
    filler = fill(grid.root / "node1")
    try:
        with pytest.raises(StorageFull) as err:
            vm.deploy(image, "node-full", 600, wait=True)
        assert "VMManager" in err.value.store or "node" in err.value.store
        assert {i.identifier for i in vm.list()} == {"node-before-full"}
        assert slots(grid) == 1          # the failed deployment's slot was given back
        assert vm.status(running.ref).state == "Running"
        vm.destroy(running.ref)       # frees what the instance held, on the full disk
        assert vm.list() == []
        assert slots(grid) == 0
    finally:
        filler.unlink()
        grid.stop("node1")


def test_a_start_on_a_full_disk_gives_up_the_space_reserve_so_the_databases_open(tmp_path):
    """A database closed cleanly has no shared-memory file left: SQLite cannot even read it on a full disk
    until something frees a little space. The container's start gives up the services' reserves."""
    from services.common.reserve import SpaceReserve, release_if_full

    state = tmp_path / "state"
    mount_tmpfs(state, "4m")
    try:
        (state / "repository").mkdir()
        reserve = SpaceReserve(state / "repository" / "reserve", 1024 * 1024)
        assert reserve.held
        db = sqlite3.connect(state / "repository" / "catalogue.sqlite")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE images (name TEXT)")
        db.execute("INSERT INTO images VALUES ('kept')")
        db.commit()
        db.close()
        fill(state)

        def read() -> list:
            conn = sqlite3.connect(state / "repository" / "catalogue.sqlite")
            try:
                return conn.execute("SELECT name FROM images").fetchall()
            finally:
                conn.close()

        with pytest.raises(sqlite3.OperationalError):
            read()
        assert release_if_full(state) == [state / "repository" / "reserve"]
        assert read() == [("kept",)]
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_staging_an_image_into_a_full_node_cache_is_a_typed_storage_full_fault(full):
    """The node's disk full while an image is staged into its cache: the receiver's own write fails (ENOSPC), which
    is the node's storage, not the transfer or the repository: a StorageFull naming the image cache, the failed
    deployment's slot given back, nothing of the image left in the cache."""
    grid = full
    image = register(grid, "staged-into-full", "16M", repeat=750_000)
    proc = grid.start_node("node1", {"lease_range": "10.99.0.10-10.99.0.40"})
    vm = node(grid, proc)
    filler = fill(grid.root / "node1")
    # room for the node's own records (its SQLite WAL grows past 2 MiB under load: CI runs' deploys found no room
    # for their state), not for the image's bytes (about 12 MiB)
    os.truncate(filler, max(0, filler.stat().st_size - 6 * 1024 * 1024))
    try:
        with pytest.raises(StorageFull) as err:
            vm.deploy(image, "stage-full", 600, wait=True)
        assert "image cache" in err.value.store
        assert "No space left on device" in err.value.description
        assert vm.list() == []
        assert slots(grid) == 0
        sha256 = image.findtext("{*}image/{*}sha256")
        assert sha256
        assert [p for p in (grid.root / "node1").rglob(f"{sha256}*")] == []
    finally:
        filler.unlink()
        grid.stop("node1")
