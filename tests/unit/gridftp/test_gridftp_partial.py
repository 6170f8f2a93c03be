"""PartialFile: the receiver's part file and sidecar, resume rules, verification before the final name."""
from __future__ import annotations

import hashlib
import os

import pytest

from gridftp import ChecksumMismatch, TransferError
from gridftp.partial import PartialFile, part_path, read_sidecar, reserve_blocks, sidecar_path
from gridftp.ranges import RangeSet

from tests.unit.gridftp.gridftp_helpers import wait_for


def test_out_of_order_writes_commit_verified(tmp_path):
    data = os.urandom(300_000)
    final = tmp_path / "f"
    p = PartialFile(final, {"source": "x"}, size=len(data))
    for a, b in [(200_000, 300_000), (0, 50_000), (50_000, 200_000)]:
        p.write(a, data[a:b])
    assert p.checkpoint() == RangeSet([(0, len(data))])
    assert p.commit(len(data), hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest()
    assert final.read_bytes() == data
    assert not part_path(final).exists() and not sidecar_path(final).exists()


def test_blocks_are_reserved_up_front_and_the_size_follows_the_writes(tmp_path):
    probe = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT)
    try:
        if not reserve_blocks(probe, 1 << 20):
            pytest.skip("this file system cannot fallocate")
    finally:
        os.close(probe)
    size = 3 << 20
    final = tmp_path / "f"
    p = PartialFile(final, {"source": "x"}, size=size, reserve=True)
    st = os.stat(part_path(final))
    assert st.st_size == 0 and st.st_blocks * 512 >= size       # reserved, not written
    p.write(1 << 20, b"x" * 10)
    p.checkpoint()
    p.close()
    assert os.path.getsize(part_path(final)) == (1 << 20) + 10  # the size is what was written
    again = PartialFile(final, {"source": "x"}, size=size, reserve=True)  # a resume holds what was written
    assert again.snapshot() == RangeSet([(1 << 20, (1 << 20) + 10)])
    again.discard()
    upload = PartialFile(tmp_path / "u", {"path": "/u"}, size=size)     # a server's STOR: ALLO is only a claim
    assert os.stat(part_path(tmp_path / "u")).st_blocks == 0
    upload.discard()


@pytest.mark.parametrize("algorithm", ["SHA256", "BLAKE3"])
def test_a_wrong_hash_is_named_with_its_algorithm_and_kept_the_old_file(tmp_path, algorithm):
    """`vmgrid transfer --blake3 HEX` that does not match said "sha256 <a BLAKE3 digest> does not match the source's
    <the user's digest>": the message names the algorithm verified with and the digest expected, whoever gave it;
    a file already at the destination stays as it was."""
    import blake3

    final = tmp_path / "f"
    final.write_bytes(b"the scientist's file")
    p = PartialFile(final, {"source": "x"}, size=10, algorithm=algorithm)
    p.write(0, b"0123456789")
    actual = (blake3.blake3 if algorithm == "BLAKE3" else hashlib.sha256)(b"0123456789").hexdigest()
    with pytest.raises(ChecksumMismatch) as err:
        p.commit(10, "0" * 64)
    assert str(err.value) == f"{final}: {algorithm.lower()} {actual} does not match the expected {'0' * 64}"
    assert final.read_bytes() == b"the scientist's file"
    p.close()


def test_missing_ranges_or_wrong_hash_keep_the_partial(tmp_path):
    final = tmp_path / "f"
    p = PartialFile(final, {"source": "x"}, size=10)
    p.write(0, b"01234")
    with pytest.raises(TransferError, match="5 bytes missing"):
        p.commit(10)
    p.write(5, b"56789")
    with pytest.raises(ChecksumMismatch):
        p.commit(10, "0" * 64)
    assert not final.exists() and part_path(final).exists()
    p.close()


def test_resume_only_for_the_same_origin(tmp_path):
    final = tmp_path / "f"
    p = PartialFile(final, {"source": "a", "size": 10}, size=10)
    p.write(0, b"01234")
    p.checkpoint()
    p.close()
    assert read_sidecar(final)[1] == RangeSet([(0, 5)])
    same = PartialFile(final, {"source": "a", "size": 10}, size=10)
    assert same.resumed_bytes == 5 and same.missing(10) == [(5, 10)]
    same.close()
    other = PartialFile(final, {"source": "b", "size": 10}, size=10)
    assert other.resumed_bytes == 0 and os.path.getsize(part_path(final)) == 0
    other.close()


def test_restart_ranges_must_be_held(tmp_path):
    final = tmp_path / "f"
    p = PartialFile(final, {"path": "/f"})
    p.write(0, b"x" * 100)
    p.checkpoint()
    p.close()
    with pytest.raises(TransferError):
        PartialFile(final, {"path": "/f"}, resume=False, restart=RangeSet([(0, 200)]))
    q = PartialFile(final, {"path": "/f"}, resume=False, restart=RangeSet([(0, 50)]))
    assert q.held == RangeSet([(0, 50)])
    q.close()


def test_a_rewritten_prefix_is_hashed_again(tmp_path):
    """Bytes rewritten below what the background hasher may have read must not keep a stale digest."""
    data = os.urandom(100_000)
    final = tmp_path / "f"
    p = PartialFile(final, {"source": "x"}, size=len(data))
    p.write(0, b"\0" * len(data))           # wrong bytes first, hashed along the way
    wait_for(lambda: p._hasher._hashed == len(data), what="the background hash of the first bytes")
    p.write(0, data)                        # then the right ones over them
    assert p.commit(len(data)) == hashlib.sha256(data).hexdigest()
