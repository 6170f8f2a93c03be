"""A RETR that follows a file while its writer still appends to it (gridftp/growing.py): the reader holds
bytes before the writer is done, the head the writer rewrites at the end (libvirt's save header) arrives as
rewritten, a writer that fails leaves nothing at the reader, and a completed file is an ordinary one."""
from __future__ import annotations

import os
import time

import pytest

from gridftp import TransferError, download
from gridftp.filespace import LocalFileSpace
from gridftp.growing import HEAD, Following, Growth

from tests.unit.gridftp.gridftp_helpers import MiB


class GrowingSpace(LocalFileSpace):
    def __init__(self, root, growths):
        super().__init__(root)
        self.growths = growths

    def growing(self, vpath):
        return self.growths.get(vpath)


def until(condition, what: str, limit: float = 60.0) -> None:
    """Wait for an event the test cannot be told of (bytes arriving at the reader); fails only after a minute."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def growing(tree, start_server):
    path = tree / "data" / "state.save"
    growth = Growth(path)
    server = start_server(root=GrowingSpace(tree, {"/data/state.save": growth}))
    return server, growth, path


def test_the_reader_holds_part_of_the_file_before_the_writer_is_done_and_gets_the_rewritten_head(growing, tmp_path):
    server, growth, path = growing
    follower = Following(server.url("/data/state.save"), tmp_path / "got", 2)   # RETR sent before the file exists
    growth.begin()
    body = os.urandom(3 * MiB)
    with open(path, "wb") as f:
        f.write(b"LibvirtQemudPart" + bytes(76))
        f.write(body)
        f.flush()
        until(lambda: follower.received >= MiB, "the first MiB at the reader")
        assert growth.state == "growing" and not follower.done()
        assert (tmp_path / "got").stat().st_size > HEAD    # beyond the held-back head, before the end
        f.write(body[:12345])
        f.seek(0)
        f.write(b"LibvirtQemudSave")                        # the header rewritten once the save completed
    growth.complete()
    size = follower.result(60)
    got = (tmp_path / "got").read_bytes()
    assert size == len(got) == path.stat().st_size
    assert got == path.read_bytes() and got.startswith(b"LibvirtQemudSave")


def test_a_writer_that_fails_midway_leaves_nothing_at_the_reader(growing, tmp_path):
    server, growth, path = growing
    follower = Following(server.url("/data/state.save"), tmp_path / "got", 1)
    growth.begin()
    path.write_bytes(os.urandom(2 * MiB))
    until(lambda: follower.received > 0, "bytes at the reader")
    growth.fail("the save failed")
    with pytest.raises(TransferError, match="not completed: the save failed"):
        follower.result(60)
    assert not (tmp_path / "got").exists()


def test_a_cancelled_follower_stops_and_removes_what_it_held(growing, tmp_path):
    server, growth, path = growing
    follower = Following(server.url("/data/state.save"), tmp_path / "got", 1)
    growth.begin()
    path.write_bytes(os.urandom(MiB))
    until(lambda: follower.received > 0, "bytes at the reader")
    follower.cancel()
    with pytest.raises(TransferError):
        follower.result(60)
    assert not (tmp_path / "got").exists()


def test_a_completed_file_is_an_ordinary_one(growing, tmp_path):
    server, growth, path = growing
    path.write_bytes(os.urandom(MiB + 3))
    growth.begin()
    growth.complete()
    result = download(server.url("/data/state.save"), tmp_path / "plain", 2, checksum="auto")
    assert (tmp_path / "plain").read_bytes() == path.read_bytes() and result.size == MiB + 3


def test_a_follower_refuses_bytes_past_its_bound_and_keeps_nothing(growing, tmp_path):
    """The source is untrusted: a file longer than the follower's bound ends the follow with nothing kept."""
    from gridftp.errors import ProtocolError
    server, growth, path = growing
    follower = Following(server.url("/data/state.save"), tmp_path / "got", 1, limit=MiB)
    growth.begin()
    path.write_bytes(os.urandom(3 * MiB))
    growth.complete()
    # the refusal or the server's answer to the cut connections, whichever the follower reads first
    with pytest.raises((TransferError, ProtocolError)):
        follower.result(60)
    assert follower.received <= MiB and not (tmp_path / "got").exists()
