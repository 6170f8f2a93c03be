"""BLAKE3 between vmgrid peers (issue 13 §5): the server lists it in FEAT's CKSM algorithms and answers
CKSM BLAKE3; a download verifies with it when asked to choose (checksum="auto") or when it is given the
expected BLAKE3 digest, and falls back to SHA256 with a server that does not list it. A wrong digest
is caught either way."""
from __future__ import annotations

import hashlib

import blake3
import pytest

from gridftp import ChecksumMismatch, GridFTPClient, download
from gridftp.client import GridFTPURL
from gridftp.transfer import speaks_blake3

from tests.unit.gridftp.gridftp_helpers import MiB, make_file


def b3(path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_server_advertises_and_answers_blake3(start_server, tree):
    server = start_server()
    with GridFTPClient(GridFTPURL.parse(server.url("/"))) as session:
        assert "BLAKE3:" in session.feat()["CKSM"]
        assert speaks_blake3(session.command("FEAT"))
        assert session.checksum("/data/f3m", "BLAKE3") == b3(tree / "data" / "f3m")
        whole = (tree / "data" / "f3m").read_bytes()
        assert session.checksum("/data/f3m", "BLAKE3", 1000, 5000) == blake3.blake3(whole[1000:6000]).hexdigest()


def test_auto_verifies_with_blake3_between_vmgrid_peers(start_server, tree, tmp_path):
    big = make_file(tree / "data" / "big", 9 * MiB + 5)
    server = start_server()
    result = download(server.url("/data/big"), tmp_path / "big", 3, checksum="auto")
    assert (tmp_path / "big").read_bytes() == big.read_bytes()
    assert result.blake3 == b3(big) and result.sha256 == "" and result.verified_with == f"blake3 {b3(big)}"
    # the default stays SHA256 (callers that use the result's sha256, e.g. job staging)
    result = download(server.url("/data/big"), tmp_path / "again", 2)
    assert result.sha256 == sha(big) and result.blake3 == ""


def test_a_given_blake3_is_verified_without_asking_the_source(start_server, tree, tmp_path):
    f = tree / "data" / "f3m"
    server = start_server()
    result = download(server.url("/data/f3m"), tmp_path / "ok", 2, blake3=b3(f).upper())
    assert result.blake3 == b3(f) and (tmp_path / "ok").read_bytes() == f.read_bytes()
    with pytest.raises(ChecksumMismatch):
        download(server.url("/data/f3m"), tmp_path / "bad", 2, blake3="0" * 64)
    assert not (tmp_path / "bad").exists()


def test_a_server_without_blake3_gets_sha256(start_server, tree, tmp_path, monkeypatch):
    """A peer that does not list BLAKE3 (globus-gridftp-server: tests/interop) is asked for SHA256."""
    import gridftp.server as server_module

    monkeypatch.setattr(server_module, "FEATURES",
                        [f for f in server_module.FEATURES if not f.startswith("CKSM")] + ["CKSM SHA256:10;MD5:10;"])
    server = start_server()
    result = download(server.url("/data/f3m"), tmp_path / "f", 2, checksum="auto")
    assert result.sha256 == sha(tree / "data" / "f3m") and result.blake3 == ""
