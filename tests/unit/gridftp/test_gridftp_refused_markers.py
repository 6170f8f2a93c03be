"""`vmgrid transfer` of an upload the server refuses for good (552: no room for it in its quota, or larger than its
bound on files) leaves no restart marker in ~/.cache/vmgrid/gridftp; one that fails for a passing reason keeps it,
and the same command run again then finishes and leaves nothing (trial14 M1: a 552-refused upload's marker stayed
there for ever). Real servers, the real command as a child process with its default state directory
(XDG_CACHE_HOME)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gridftp import GridFTPServer, third_party
from gridftp.errors import ReplyError
from gridftp.filespace import LocalFileSpace

from tests.unit.gridftp.gridftp_helpers import REPO, MiB, make_file, sha256_of


class _Quota(LocalFileSpace):
    """/up/ holds at most 1 MiB (as a job service's staging area holds its [jobs] staging_quota)."""

    def quota(self, vpath):
        return (self.root / "up", MiB) if vpath.startswith("/up/") else None


def vmgrid(cache, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "XDG_CACHE_HOME": str(cache)})


def markers(cache) -> list[dict]:
    state = cache / "vmgrid" / "gridftp"
    return [json.loads(p.read_text()) for p in sorted(state.glob("*"))] if state.exists() else []


def test_an_upload_refused_for_its_quota_leaves_no_marker_and_a_passing_failure_keeps_it(start_server, tree,
                                                                                         tmp_path):
    big = make_file(tmp_path / "big.bin", 2 * MiB)
    cache = tmp_path / "cache"
    server = start_server(_Quota(tree), upload_area="/up", insecure_anonymous_writes=True)

    refused = vmgrid(cache, "transfer", str(big), server.url("/up/big.bin"), "-q")
    assert refused.returncode == 1 and "552 Upload quota exceeded" in refused.stderr, refused.stderr
    assert markers(cache) == []                      # nothing to resume: the server keeps nothing of it
    assert not (tree / "up" / "big.bin").exists()

    # a passing failure (nobody listens on the port: a server restarting) keeps the marker ...
    port = server.port
    server.stop()
    gone = vmgrid(cache, "transfer", str(big), f"ftp://127.0.0.1:{port}/up/big.bin", "-q")
    assert gone.returncode == 1, gone.stderr
    kept = markers(cache)
    assert len(kept) == 1 and kept[0]["key"]["destination"].endswith("/up/big.bin"), kept
    assert kept[0]["sha256"] == sha256_of(big)
    # ... and the same command, the server back with room for the file, finishes and leaves nothing
    again = GridFTPServer(tree, "127.0.0.1", port, anonymous=True, upload_area="/up",
                          insecure_anonymous_writes=True).start()
    try:
        done = vmgrid(cache, "transfer", str(big), again.url("/up/big.bin"), "-q")
    finally:
        again.stop()
    assert done.returncode == 0, done.stderr
    assert (tree / "up" / "big.bin").read_bytes() == big.read_bytes()
    assert markers(cache) == []


def test_an_upload_over_the_servers_bound_on_files_is_its_552_at_once_and_leaves_no_marker(start_server, tree,
                                                                                            tmp_path):
    """The ALLO refused with 552 was taken for a server without ALLO: the STOR then ran into the bound, 426
    "beyond the announced size", retried twice as transient, and the command said to run it again."""
    big = make_file(tmp_path / "big.bin", 2 * MiB)
    cache = tmp_path / "cache"
    server = start_server(upload_area="/up", insecure_anonymous_writes=True, max_file_size=MiB)
    refused = vmgrid(cache, "transfer", str(big), server.url("/up/big.bin"), "-q")
    assert refused.returncode == 1, refused.stderr
    assert "552 Files may not exceed 1048576 bytes here" in refused.stderr and "426" not in refused.stderr
    assert markers(cache) == []
    assert not (tree / "up" / "big.bin").exists()


def test_a_third_party_transfer_refused_for_good_leaves_no_marker(start_server, tree, tmp_path):
    make_file(tree / "data" / "big", 2 * MiB)
    target = tmp_path / "target"
    (target / "up").mkdir(parents=True)
    src = start_server()
    dst = start_server(_Quota(target), upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    with pytest.raises(ReplyError) as info:
        third_party(src.url("/data/big"), dst.url("/up/big"), state_dir=state)
    assert info.value.code == 552
    assert not state.exists() or not list(state.glob("*"))
    assert not (target / "up" / "big").exists()
