"""Restart after each kind of interruption: a killed client (SIGKILL), a killed server (SIGKILL, restarted on the
same port), cut data connections (`ss -K` destroys the TCP connections in the kernel). Every resume must send
only the missing ranges and end with the source's sha256."""
from __future__ import annotations

import json
import threading

import pytest

from gridftp import TransferError, download, third_party, upload
from gridftp.errors import ChecksumMismatch, GridFTPError, ReplyError
from gridftp.filespace import LocalFileSpace
from gridftp.partial import part_path, read_sidecar, sidecar_path
from gridftp.ranges import RangeSet

from tests.unit.gridftp.gridftp_helpers import (MiB, ServerProcess, client_process, cut_connections_to,
                                                 make_file, sha256_of, wait_for)

SIZE = 8 * MiB + 4321
RATE = 4 * MiB            # bytes/s: a transfer of SIZE takes about two seconds


@pytest.fixture
def source(tree):
    return make_file(tree / "data" / "image", SIZE)


def held_in_sidecar(dest) -> RangeSet:
    found = read_sidecar(dest)
    return found[1] if found else RangeSet()


def upload_log(state_dir) -> RangeSet:
    files = list(state_dir.glob("*.json")) if state_dir.exists() else []
    if not files:
        return RangeSet()
    try:
        doc = json.loads(files[0].read_text())
    except ValueError:          # caught mid-replace
        return RangeSet()
    return RangeSet.parse(doc["ranges"]) if doc.get("ranges") else RangeSet()


def in_thread(fn, *args, **kwargs):
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def assert_resumed(result, held: RangeSet, size: int, digest: str) -> None:
    """The resume fetched exactly the complement of what was held, and the file verifies."""
    assert 0 < held.total() < size
    assert result.bytes_reused == held.total()
    assert result.bytes_transferred == size - held.total()
    assert RangeSet.parse(result.fetched_ranges) == RangeSet(held.missing(0, size))
    assert result.sha256 == digest


# -- downloads -------------------------------------------------------------------------------------------------
def test_download_resumes_after_the_client_is_killed(start_server, source, tmp_path):
    server = start_server(max_rate=RATE)
    dest = tmp_path / "image"
    child = client_process("download", server.url("/data/image"), dest)
    wait_for(lambda: held_in_sidecar(dest).total() >= 2 * MiB, what="2 MiB received")
    child.kill()
    child.wait(10)
    child.stdout.close(), child.stderr.close()
    held = held_in_sidecar(dest)
    assert not dest.exists() and part_path(dest).exists()
    result = download(server.url("/data/image"), dest)
    assert_resumed(result, held, SIZE, sha256_of(source))
    assert dest.read_bytes() == source.read_bytes()
    assert not part_path(dest).exists() and not sidecar_path(dest).exists()


def test_download_resumes_after_the_server_is_killed(tree, source, tmp_path):
    args = ("--anonymous", "--no-tls", "--max-rate", str(RATE), "--marker-interval", "0.2")
    server = ServerProcess(tree, *args)
    url = f"ftp://127.0.0.1:{server.port}/data/image"
    dest = tmp_path / "image"
    try:
        thread, box = in_thread(download, url, dest, retries=0)
        wait_for(lambda: held_in_sidecar(dest).total() >= 2 * MiB, what="2 MiB received")
        server.kill()
        thread.join(30)
        assert isinstance(box.get("error"), TransferError | ReplyError)
        held = held_in_sidecar(dest)
        server.stop()
        server = ServerProcess(tree, *args, port=server.port)      # the site restarts its server
        result = download(url, dest)
        assert_resumed(result, held, SIZE, sha256_of(source))
    finally:
        server.kill()
        server.stop()


def test_download_resumes_by_itself_after_the_data_connections_are_cut(start_server, source, tmp_path):
    server = start_server(max_rate=RATE)
    dest = tmp_path / "image"
    moved = [0]
    thread, box = in_thread(download, server.url("/data/image"), dest, parallel=3, retry_delay=0.1,
                            progress=lambda d, t: moved.__setitem__(0, d))
    wait_for(lambda: moved[0] >= 2 * MiB, what="2 MiB received")
    session = next(iter(server._sessions), None)
    ports = {p for s in list(server._sessions) for _, p in s.data.active}
    assert session is not None and ports
    for port in ports:
        cut_connections_to(port)                       # the client's data listener
    thread.join(30)
    result = box["result"]
    assert result.attempts == 2
    assert result.bytes_transferred == SIZE            # not one byte sent twice
    assert result.sha256 == sha256_of(source)
    assert dest.read_bytes() == source.read_bytes()


def test_corrupted_partial_file_is_repaired_on_resume(start_server, source, tmp_path):
    server = start_server(max_rate=RATE)
    dest = tmp_path / "image"
    child = client_process("download", server.url("/data/image"), dest)
    wait_for(lambda: held_in_sidecar(dest).contiguous_end(0) >= 3 * MiB, what="3 MiB received")
    child.kill()
    child.wait(10)
    child.stdout.close(), child.stderr.close()
    held = held_in_sidecar(dest)
    with open(part_path(dest), "r+b") as fh:            # disk corruption inside a held range
        fh.seek(MiB + 10)
        byte = fh.read(1)
        fh.seek(MiB + 10)
        fh.write(bytes([byte[0] ^ 0x55]))
    result = download(server.url("/data/image"), dest)
    assert result.sha256 == sha256_of(source)
    assert dest.read_bytes() == source.read_bytes()
    assert 0 < result.repaired_bytes < SIZE // 4
    assert result.bytes_transferred == SIZE - held.total() + result.repaired_bytes


# -- uploads ---------------------------------------------------------------------------------------------------
def test_upload_resumes_after_the_client_is_killed(start_server, tree, source, tmp_path):
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    child = client_process("upload", str(source), server.url("/up/image"), state_dir=state, max_rate=RATE)
    wait_for(lambda: upload_log(state).total() >= 2 * MiB, what="2 MiB confirmed by the server")
    child.kill()
    child.wait(10)
    child.stdout.close(), child.stderr.close()
    held = upload_log(state)
    assert not (tree / "up" / "image").exists()
    result = upload(source, server.url("/up/image"), state_dir=state)
    assert_resumed(result, held, SIZE, sha256_of(source))
    assert (tree / "up" / "image").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["image"]


def test_upload_resumes_after_the_server_is_killed(tree, source, tmp_path):
    args = ("--anonymous", "--no-tls", "--upload-area", "/up", "--insecure-anonymous-writes",
            "--marker-interval", "0.2")
    server = ServerProcess(tree, *args)
    url = f"ftp://127.0.0.1:{server.port}/up/image"
    state = tmp_path / "state"
    try:
        thread, box = in_thread(upload, source, url, state_dir=state, max_rate=RATE, retries=0)
        wait_for(lambda: upload_log(state).total() >= 2 * MiB, what="2 MiB confirmed by the server")
        server.kill()
        thread.join(30)
        assert isinstance(box.get("error"), GridFTPError)
        held = upload_log(state)
        server.stop()
        server = ServerProcess(tree, *args, port=server.port)
        result = upload(source, url, state_dir=state)
        assert_resumed(result, held, SIZE, sha256_of(source))
        assert (tree / "up" / "image").read_bytes() == source.read_bytes()
    finally:
        server.kill()
        server.stop()


def test_upload_resumes_by_itself_after_the_data_connections_are_cut(start_server, tree, source, tmp_path):
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    thread, box = in_thread(upload, source, server.url("/up/image"), state_dir=state, max_rate=RATE,
                            retry_delay=0.1)
    wait_for(lambda: upload_log(state).total() >= 2 * MiB, what="2 MiB confirmed")
    ports = {l.getsockname()[1] for s in list(server._sessions) for l in s.data.passive}
    assert ports
    for port in ports:
        cut_connections_to(port)                       # the server's data listener
    thread.join(30)
    result = box["result"]
    assert result.attempts == 2
    assert result.bytes_reused == 0
    # only what the server had not yet confirmed in a 111 marker goes again
    assert SIZE <= result.bytes_transferred < SIZE + SIZE // 2
    assert (tree / "up" / "image").read_bytes() == source.read_bytes()


def test_third_party_resumes_after_the_data_connections_are_cut(start_server, source, tmp_path):
    src = start_server(max_rate=RATE)
    target_root = tmp_path / "target"
    (target_root / "up").mkdir(parents=True)
    dst = start_server(root=target_root, upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    thread, box = in_thread(third_party, src.url("/data/image"), dst.url("/up/image"), state_dir=state,
                            retry_delay=0.1)
    wait_for(lambda: upload_log(state).total() >= 2 * MiB, what="2 MiB confirmed by the destination")
    ports = {l.getsockname()[1] for s in list(dst._sessions) for l in s.data.passive}
    for port in ports:
        cut_connections_to(port)
    thread.join(30)
    result = box["result"]
    assert result.attempts == 2
    assert (target_root / "up" / "image").read_bytes() == source.read_bytes()
    assert RangeSet.parse(result.fetched_ranges) == RangeSet([(0, SIZE)])


# -- a failed verification: nothing wrong is resumed from -------------------------------------------------------
def test_an_upload_refused_for_a_wrong_sha256_leaves_no_restart_log_and_runs_again_without_it(start_server, tree,
                                                                                            source, tmp_path):
    """The wrong --sha256 stayed in the restart log: run again without it, the upload announced the wrong digest
    again and failed for ever. Now the refusal removes the log: without a digest the file's own is computed, with
    the right one it is used, and the server's refusal says what it received."""
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    with pytest.raises(ChecksumMismatch) as info:
        upload(source, server.url("/up/image"), sha256="0" * 64, state_dir=state)
    assert info.value.actual == sha256_of(source) and info.value.expected == "0" * 64
    assert not list(state.glob("*")), "nothing kept to resume from"
    result = upload(source, server.url("/up/image"), state_dir=state)
    assert result.sha256 == sha256_of(source) and (tree / "up" / "image").read_bytes() == source.read_bytes()
    with pytest.raises(ChecksumMismatch):
        upload(source, server.url("/up/again"), sha256="1" * 64, state_dir=state)
    result = upload(source, server.url("/up/again"), sha256=sha256_of(source), state_dir=state)
    assert result.attempts == 1 and (tree / "up" / "again").read_bytes() == source.read_bytes()
    with pytest.raises(ChecksumMismatch):                       # a third-party transfer alike
        third_party(server.url("/data/image"), server.url("/up/third"), sha256="2" * 64, state_dir=state)
    assert not list(state.glob("*"))
    result = third_party(server.url("/data/image"), server.url("/up/third"), state_dir=state)
    assert (tree / "up" / "third").read_bytes() == source.read_bytes()


class _CorruptingOnce(LocalFileSpace):
    """Flips a byte of the first file stored, once it took its name: a server whose disk spoilt what it verified
    (as a server without SCKS would hold a corrupt upload), found only by the client's CKSM afterwards."""

    def __init__(self, root):
        super().__init__(root)
        self.spoilt: list[str] = []

    def committed(self, vpath, real, sha256):
        if not self.spoilt:
            self.spoilt.append(vpath)
            with open(real, "r+b") as fh:
                first = fh.read(1)
                fh.seek(0)
                fh.write(bytes([first[0] ^ 0xFF]))


def test_an_upload_the_server_holds_wrong_restarts_afresh_not_from_its_markers(start_server, tree, source, tmp_path):
    """The server confirmed every range (111 markers) but its file does not hash to the digest: the restart log kept
    those ranges, so the next run resumed from them (REST of the whole file: nothing sent; a server that honours it,
    as Globus's does, keeps the wrong file and the upload fails again). Now nothing is kept and the next run sends
    the whole file in its first attempt."""
    space = _CorruptingOnce(tree)
    server = start_server(root=space, upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    with pytest.raises(ChecksumMismatch) as info:
        upload(source, server.url("/up/image"), state_dir=state, retries=0)
    assert space.spoilt == ["/up/image"] and info.value.expected == sha256_of(source)
    assert not list(state.glob("*"))
    result = upload(source, server.url("/up/image"), state_dir=state, retries=0)
    assert result.attempts == 1 and result.bytes_reused == 0
    assert RangeSet.parse(result.fetched_ranges) == RangeSet([(0, SIZE)])
    assert (tree / "up" / "image").read_bytes() == source.read_bytes()
