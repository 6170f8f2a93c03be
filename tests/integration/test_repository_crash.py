"""A VMRepository process killed (SIGKILL) in the middle of an ingest, then restarted: the catalogue
and the image store are consistent, nothing partial is visible, and the ingest can be redone."""
from __future__ import annotations

import hashlib
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from client.localgrid import LocalGrid
from client.repository import RepositoryClient
from client.soap import ClientError, GridServiceClient
from security.trust import TrustStore
from services.descriptor import Descriptor
from tests.fixtures.repository import EXAMPLES, make_image


def check_consistent(state: Path) -> dict:
    """Every image row has its blob row and a complete file; every file has a row; no tmp files."""
    db = sqlite3.connect(state / "catalogue.sqlite")
    try:
        images = db.execute("SELECT image_id, sha256, size FROM images").fetchall()
        blobs = dict(db.execute("SELECT sha256, size FROM blobs").fetchall())
    finally:
        db.close()
    files = {p.name: p for p in (state / "images" / "blobs").glob("??/*")}
    for image_id, sha, size in images:
        assert sha in blobs, f"{image_id} refers to bytes without a blob row"
        assert sha in files, f"{image_id} refers to a missing file"
        data = files[sha].read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    assert set(files) == set(blobs), "blob files and blob rows differ"
    assert list((state / "images" / "tmp").iterdir()) == []
    return {"images": len(images), "blobs": len(blobs)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with LocalGrid(tmp_path_factory.mktemp("crashgrid")) as g:
        g.user("admin")
        yield g


def start_repository(grid: LocalGrid, ingest: Path, crashpoint: str | None = None):
    admin = grid.user("admin")
    env = {"VMGRID_CRASHPOINT": crashpoint} if crashpoint else {}
    return grid.start("repository", ["repository"], {
        "repository": {"ingest_dirs": [str(ingest)], "gridftp_port": 0},
        "policy": {"admins": [admin.dn], "vos": {"bio": {"members": [admin.dn], "admins": [admin.dn]}}},
    }, extra_env=env)


def client(grid: LocalGrid, proc) -> RepositoryClient:
    url = proc.base_url + "/wsrf/services/VMRepositoryService"
    return RepositoryClient(GridServiceClient(url, grid.user("admin").credential, TrustStore(grid.cert_dir)))


@pytest.mark.parametrize("point, committed", [
    ("ingest.copied", False),            # bytes copied to tmp/, nothing renamed
    ("ingest.renamed", False),           # blob renamed into place inside the write transaction
    ("catalogue.add.before-commit", False),  # rows written, COMMIT not reached
    ("register.committed", True),        # committed, the answer not yet sent
])
def test_sigkill_during_ingest_leaves_a_consistent_repository(grid, tmp_path, point, committed):
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    image = make_image(ingest / "img.qcow2", fill=point.encode())
    proc = start_repository(grid, ingest, crashpoint=point)
    state = grid.root / "repository" / "repository"
    with pytest.raises(ClientError):
        client(grid, proc).register((EXAMPLES / "debian12-emboss.xml").read_bytes(), local_path=str(image))
    proc.process.wait(10)
    assert proc.process.returncode == -signal.SIGKILL
    grid.processes.pop("repository")

    proc = start_repository(grid, ingest)
    try:
        counts = check_consistent(state)
        repo = client(grid, proc)
        names = [Descriptor(d).name for d in repo.query().descriptors]
        assert names == (["debian12-emboss"] if committed else [])
        assert counts == ({"images": 1, "blobs": 1} if committed else {"images": 0, "blobs": 0})
        if not committed:   # the ingest can simply be redone
            repo.register((EXAMPLES / "debian12-emboss.xml").read_bytes(), local_path=str(image))
            assert check_consistent(state) == {"images": 1, "blobs": 1}
        for d in repo.query().descriptors:
            repo.remove(Descriptor(d).image_id)
    finally:
        grid.stop("repository")


def test_external_sigkill_in_the_middle_of_a_large_copy(grid, tmp_path):
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    image = ingest / "big.raw"
    with open(image, "wb") as f:          # 1.5 GiB raw image: the copy takes a while
        f.write(b"raw!" * 1024)
        f.truncate(1536 * 1024**2)
    proc = start_repository(grid, ingest)
    state = grid.root / "repository" / "repository"
    tmp_dir = state / "images" / "tmp"
    failures = []

    def register():
        try:
            client(grid, proc).register((EXAMPLES / "sl4-blast.xml").read_bytes(), local_path=str(image))
        except ClientError as exc:
            failures.append(exc)

    t = threading.Thread(target=register)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(p.stat().st_size > 0 for p in tmp_dir.iterdir()):
        time.sleep(0.01)
    assert any(tmp_dir.iterdir()), "the copy never started"
    proc.process.send_signal(signal.SIGKILL)
    t.join(30)
    assert failures
    grid.processes.pop("repository")
    proc.process.wait(10)
    assert any(tmp_dir.iterdir())           # a partial copy was left behind by the killed process
    proc = start_repository(grid, ingest)
    try:
        assert check_consistent(state) == {"images": 0, "blobs": 0}
        assert client(grid, proc).query().total == 0
    finally:
        grid.stop("repository")
