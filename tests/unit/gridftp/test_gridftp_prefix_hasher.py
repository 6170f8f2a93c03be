"""The prefix hasher (issue 13 §5): while the data arrives it hashes at the lowest CPU priority, its BLAKE3
workers too, so that on a machine with fewer CPUs than busy threads it takes only the time the receiving and
sending threads leave idle; what is left when the last byte has landed is hashed by the caller of finish(), at
the caller's priority. Linux keeps a nice value per thread: read from /proc/self/task/<tid>/stat."""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import blake3
import pytest

from gridftp.checksum import BACKGROUND_NICE, MAX_HASH_THREADS, PrefixHasher
from gridftp.partial import PartialFile

from tests.unit.gridftp.gridftp_helpers import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def nice_of(tid: int) -> int:
    """A thread's nice value (field 19 of its stat line)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def threads_at(nice: int) -> set[int]:
    found = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            if nice_of(int(task.name)) == nice:
                found.add(int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def test_the_hash_runs_at_the_lowest_priority_while_the_data_arrives_with_its_blake3_workers(tmp_path):
    own = nice_of(threading.get_native_id())
    if own >= BACKGROUND_NICE:
        pytest.skip("the test process itself already runs at the lowest priority")
    data = os.urandom(9 << 20)
    path = tmp_path / "f"
    path.write_bytes(data[: 5 << 20])
    before = threads_at(BACKGROUND_NICE)
    fd = os.open(path, os.O_RDONLY)
    hasher = PrefixHasher(fd, len(data), "BLAKE3")
    try:
        hasher.advance(5 << 20)
        wait_for(lambda: hasher._hashed == 5 << 20, what="the background hash of the first 5 MiB")
        low = threads_at(BACKGROUND_NICE) - before
        assert hasher._thread.native_id in low
        workers = min(MAX_HASH_THREADS, len(os.sched_getaffinity(0)))
        assert len(low) == 1 + (workers if workers > 1 else 0), low     # the hasher and its own pool
        assert nice_of(threading.get_native_id()) == own                  # the caller's priority is untouched
    finally:
        hasher.abandon()
        os.close(fd)


def test_finish_hashes_what_is_left_itself_at_its_own_priority(tmp_path):
    data = os.urandom(6 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    for algorithm, expected in (("BLAKE3", blake3.blake3(data).hexdigest()),
                                ("SHA256", hashlib.sha256(data).hexdigest())):
        fd = os.open(path, os.O_RDONLY)
        try:
            hasher = PrefixHasher(fd, len(data), algorithm)
            hasher.advance(2 << 20)         # the background thread may hash up to here, no further
            wait_for(lambda: hasher._hashed == 2 << 20, what="the background hash of the first 2 MiB")
            assert hasher.finish() == expected
            assert hasher.tail_bytes == len(data) - (2 << 20)
            assert not hasher._thread.is_alive()
        finally:
            os.close(fd)


def test_a_download_sized_partial_file_verifies_with_the_background_hash(tmp_path):
    """A PartialFile fed in order, as a one-stream download is, commits with the right digest."""
    data = os.urandom(13 << 20)
    p = PartialFile(tmp_path / "f", {"source": "x"}, size=len(data), algorithm="BLAKE3")
    for a in range(0, len(data), 1 << 20):
        p.write(a, data[a:a + (1 << 20)])
    assert p.commit(len(data), blake3.blake3(data).hexdigest()) == blake3.blake3(data).hexdigest()
    assert (tmp_path / "f").read_bytes() == data


def test_the_background_thread_can_be_stopped_every_mebibyte(tmp_path):
    """update_from_file stops at the chunk boundary where stop() first says so: the low-priority thread updates
    in BACKGROUND_CHUNK pieces, so finish() waits for one of them at most."""
    from gridftp.checksum import BACKGROUND_CHUNK, update_from_file

    assert BACKGROUND_CHUNK == 1 << 20
    data = os.urandom((5 << 20) + 1000)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        h = blake3.blake3()
        asked = []
        reached = update_from_file(h, fd, 0, len(data), lambda: asked.append(1) or len(asked) > 3, BACKGROUND_CHUNK)
        assert reached == 3 << 20 and h.hexdigest() == blake3.blake3(data[: 3 << 20]).hexdigest()
        assert update_from_file(h, fd, reached, len(data), None, BACKGROUND_CHUNK) == len(data)
        assert h.hexdigest() == blake3.blake3(data).hexdigest()
    finally:
        os.close(fd)
