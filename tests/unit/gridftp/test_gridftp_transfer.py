"""The transfer library against vmgrid's own server on 127.0.0.1: downloads, uploads, third-party transfers,
checksums, verification, corrupted blocks, progress."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

import gridftp.datachannel as datachannel
from gridftp import (ChecksumMismatch, GridFTPClient, ProtocolError, ReplyError, TransferResult, checksum, download,
                     third_party, upload)
from gridftp.partial import part_path, sidecar_path
from gridftp.ranges import RangeSet

from tests.unit.gridftp.gridftp_helpers import MiB, make_file, sha256_of


@pytest.fixture
def big(tree):
    return make_file(tree / "data" / "big", 9 * MiB + 123)


@pytest.mark.parametrize("parallel", [1, 4])
def test_download_parallel_streams(start_server, tree, big, tmp_path, parallel):
    server = start_server()
    dest = tmp_path / "out" / "big"
    result = download(server.url("/data/big"), dest, parallel=parallel)
    assert isinstance(result, TransferResult)
    assert dest.read_bytes() == big.read_bytes()
    assert result.sha256 == sha256_of(big)
    assert result.size == big.stat().st_size
    assert result.bytes_transferred == result.size
    assert result.bytes_reused == 0
    assert result.fetched_ranges == f"0-{result.size}"
    assert result.attempts == 1 and result.parallelism == parallel
    assert not part_path(dest).exists() and not sidecar_path(dest).exists()
    assert result.mbit_per_s > 0


def test_download_empty_and_small_files(start_server, tree, tmp_path):
    server = start_server()
    empty = download(server.url("/data/empty"), tmp_path / "empty")
    assert (tmp_path / "empty").read_bytes() == b"" and empty.sha256 == hashlib.sha256(b"").hexdigest()
    small = download(server.url("/data/small"), tmp_path / "small", parallel=8)
    assert (tmp_path / "small").read_bytes() == (tree / "data" / "small").read_bytes()
    assert small.bytes_transferred == 1000


def test_download_with_known_sha256(start_server, big, tmp_path):
    server = start_server()
    result = download(server.url("/data/big"), tmp_path / "b", sha256=sha256_of(big).upper())
    assert result.sha256 == sha256_of(big)


def test_download_with_a_wrong_expected_sha256_never_takes_the_name(start_server, big, tmp_path):
    server = start_server()
    dest = tmp_path / "b"
    with pytest.raises(ChecksumMismatch) as info:
        download(server.url("/data/big"), dest, sha256="0" * 64)
    assert info.value.actual == sha256_of(big)
    assert not dest.exists() and not part_path(dest).exists() and not sidecar_path(dest).exists()


def test_download_of_a_size_other_than_the_one_told_is_refused_before_any_byte(start_server, big, tmp_path):
    """A migration's target is told each file's size by the source; a GridFTP server announcing another size (a
    larger one would otherwise be reserved and received) is refused before anything is written."""
    server = start_server()
    dest = tmp_path / "out" / "b"
    for told in (big.stat().st_size - 1, big.stat().st_size + (1 << 30)):
        with pytest.raises(ProtocolError, match="announces"):
            download(server.url("/data/big"), dest, size=told, retries=3, retry_delay=0)
        assert not dest.exists() and not part_path(dest).exists() and not sidecar_path(dest).exists()
    assert download(server.url("/data/big"), dest, size=big.stat().st_size).size == big.stat().st_size
    assert dest.read_bytes() == big.read_bytes()


def test_download_missing_file_leaves_nothing(start_server, tmp_path):
    server = start_server()
    with pytest.raises(ReplyError) as info:
        download(server.url("/data/nope"), tmp_path / "x")
    assert info.value.code == 550 and not info.value.transient
    assert list(tmp_path.iterdir()) == [p for p in tmp_path.iterdir() if p.name == "served"]


def test_download_denied_path(start_server, big, tmp_path):
    server = start_server(authorize=lambda dn, op, path: path != "/data/big")
    with pytest.raises(ReplyError) as info:
        download(server.url("/data/big"), tmp_path / "b")
    assert info.value.code == 550 and "denied" in info.value.text


def test_progress_reaches_the_total(start_server, big, tmp_path):
    server = start_server(max_rate=20 * MiB)
    seen: list[tuple[int, int]] = []
    result = download(server.url("/data/big"), tmp_path / "b", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (result.size, result.size)
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and len(seen) >= 3


def test_upload_parallel_streams(start_server, tree, big, tmp_path):
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    state = tmp_path / "state"
    result = upload(big, server.url("/up/big"), parallel=4, state_dir=state)
    assert (tree / "up" / "big").read_bytes() == big.read_bytes()
    assert result.sha256 == sha256_of(big) and result.bytes_transferred == result.size
    assert sorted(p.name for p in (tree / "up").iterdir()) == ["big"]
    assert not state.exists() or list(state.iterdir()) == []        # restart log removed after success


def test_upload_refused_where_writes_are_not_allowed(start_server, big, tmp_path):
    server = start_server(upload_area="/up")            # anonymous stays read-only
    with pytest.raises(ReplyError) as info:
        upload(big, server.url("/up/big"), state_dir=tmp_path / "state")
    assert info.value.code == 550
    writable = start_server(upload_area="/up", insecure_anonymous_writes=True)
    with pytest.raises(ReplyError):
        upload(big, writable.url("/data/big2"), state_dir=tmp_path / "state")


def test_third_party_between_two_servers(start_server, tree, big, tmp_path):
    source = start_server()
    target_root = tmp_path / "target"
    (target_root / "up").mkdir(parents=True)
    target = start_server(root=target_root, upload_area="/up", insecure_anonymous_writes=True)
    result = third_party(source.url("/data/big"), target.url("/up/copy"), parallel=3, state_dir=tmp_path / "s")
    assert (target_root / "up" / "copy").read_bytes() == big.read_bytes()
    assert result.sha256 == sha256_of(big) and result.size == big.stat().st_size


def test_a_third_party_transfer_the_destination_refuses_names_the_destinations_reason(start_server, tree, big,
                                                                                         tmp_path):
    """The destination refuses the STOR (550: a path outside its upload area); the source, finding no data
    connection, then says 425. The error was the source's 425 ("Cannot open data connection"), which hid the cause
    globus-url-copy reports: the destination's 550."""
    source = start_server()
    target_root = tmp_path / "target"
    (target_root / "up").mkdir(parents=True)
    target = start_server(root=target_root, upload_area="/up", insecure_anonymous_writes=True)
    with pytest.raises(ReplyError) as info:
        third_party(source.url("/data/big"), target.url("/elsewhere/copy"), parallel=2, state_dir=tmp_path / "s",
                    retries=0, timeout=10)
    assert info.value.command.startswith("STOR ") and info.value.code == 550, info.value


def test_checksum_api(start_server, tree):
    server = start_server()
    data = (tree / "data" / "f3m").read_bytes()
    assert checksum(server.url("/data/f3m")) == hashlib.sha256(data).hexdigest()
    assert checksum(server.url("/data/f3m"), "MD5", offset=10, length=100) == hashlib.md5(data[10:110]).hexdigest()


def test_corrupted_block_in_flight_is_detected_and_only_its_chunk_refetched(start_server, big, tmp_path,
                                                                               monkeypatch):
    """Fault injection: the server's sendfile path is wrapped so that the first time the block holding
    offset 4 MiB goes out, that byte is flipped (a corruption TCP's checksum missed). The receiver finds the
    sha256 mismatch, compares per-chunk CKSMs with the source and fetches only the bad chunk again."""
    real_send = datachannel.send_file_range
    corrupted = []

    def flaky(sock, fd, offset, length, add, throttle=None):
        if offset <= 4 * MiB < offset + length and not corrupted:
            corrupted.append(offset)
            data = bytearray(os.pread(fd, length, offset))
            data[4 * MiB - offset] ^= 0xFF
            sock.sendall(data)
            add(length)
            return
        real_send(sock, fd, offset, length, add, throttle)

    monkeypatch.setattr(datachannel, "send_file_range", flaky)
    server = start_server()
    dest = tmp_path / "b"
    result = download(server.url("/data/big"), dest, parallel=2)
    assert corrupted
    assert dest.read_bytes() == big.read_bytes()
    assert 0 < result.repaired_bytes <= MiB + 1024 * 1024      # one chunk (1 MiB for this size)
    assert result.bytes_transferred == result.size + result.repaired_bytes
    assert RangeSet.parse(result.fetched_ranges) == RangeSet([(0, result.size)])


def test_stream_mode_fallback(start_server, big, tmp_path, monkeypatch):
    """A server without MODE E (vmgrid's server with MODE E refused, standing in for a plain FTP server):
    the client falls back to one stream-mode connection, still verified."""
    from gridftp import server as server_module

    original = server_module._Session.cmd_MODE

    def no_mode_e(self, arg):
        if arg.upper() == "E":
            raise server_module._Reply(504, "MODE E not supported.")
        return original(self, arg)

    monkeypatch.setattr(server_module._Session, "cmd_MODE", no_mode_e)
    server = start_server()
    result = download(server.url("/data/big"), tmp_path / "b", parallel=4)
    assert (tmp_path / "b").read_bytes() == big.read_bytes() and result.sha256 == sha256_of(big)


def test_client_session_api(start_server, tree):
    server = start_server()
    with GridFTPClient(server.url("/")) as session:
        features = session.feat()
        assert "PARALLEL" in features and "CKSM" in features
        assert session.size("/data/f3m") == 3 * MiB + 17
        assert session.checksum("/data/small", "ADLER32") == checksum(server.url("/data/small"), "adler32")
        with pytest.raises(ReplyError) as info:
            session.ok("SIZE /data/nope")
        assert info.value.code == 550


def test_sidecar_is_json_with_the_origin(start_server, big, tmp_path, monkeypatch):
    """While a download runs, its sidecar names the source and the ranges held (read mid-transfer)."""
    server = start_server(max_rate=8 * MiB)
    dest = tmp_path / "b"
    snapshots = []

    def progress(done, total):
        if sidecar_path(dest).exists() and not snapshots:
            snapshots.append(json.loads(sidecar_path(dest).read_text()))

    download(server.url("/data/big"), dest, progress=progress)
    doc = snapshots[0]
    assert doc["origin"]["source"] == server.url("/data/big")
    assert doc["origin"]["size"] == big.stat().st_size
    RangeSet.parse(doc["ranges"]) if doc["ranges"] else None


def test_denied_paths_raise_authorization_denied(start_server, big, tmp_path):
    from gridftp import AuthorizationDenied

    server = start_server(authorize=lambda dn, op, path: path != "/data/big")
    with pytest.raises(AuthorizationDenied) as info:
        download(server.url("/data/big"), tmp_path / "b")
    assert isinstance(info.value, ReplyError) and info.value.code == 550
    with pytest.raises(ReplyError) as missing:
        download(server.url("/data/none"), tmp_path / "c")
    assert not isinstance(missing.value, AuthorizationDenied)


@pytest.mark.parametrize("parallel", [0, -1, 65])
def test_a_parallelism_outside_1_to_64_is_refused_before_any_connection(tmp_path, parallel):
    """0 streams opened none and waited for ever (`vmgrid repo register -p 0` hung); no server is needed to say so:
    the URLs name a port nothing listens on."""
    import gridftp

    src = make_file(tmp_path / "src", 1024)
    for run in (lambda: gridftp.upload(src, "gsiftp://127.0.0.1:1/x", parallel),
                lambda: gridftp.download("gsiftp://127.0.0.1:1/x", tmp_path / "dst", parallel),
                lambda: gridftp.third_party("gsiftp://127.0.0.1:1/x", "gsiftp://127.0.0.1:1/y", parallel)):
        with pytest.raises(gridftp.GridFTPError, match=f"parallelism must be 1 to 64 streams, not {parallel}"):
            run()
    assert not (tmp_path / "dst").exists()


def test_a_failed_receivers_queued_connections_are_reset_not_left_to_the_senders_timeout():
    """A download this side gives up (its disk full): the server's data connections still in the client's listener
    queue, never accepted, stayed open; the server's threads sending into them waited, and the client waited on the
    server's reply (`vmgrid transfer` into a full disk hung past its 60 s in a loaded run). Now the receiver's failure
    closes its listener: a connection queued there is reset, and its sender's write fails at once."""
    import socket
    import threading

    from gridftp.errors import TransferError

    listener = datachannel.open_listener("127.0.0.1")
    receiver = datachannel.ModeEReceiver(bytearray())
    sender = socket.create_connection(listener.getsockname())     # in the listener's queue, never accepted
    receiver.fail(TransferError("cannot store the data here: No space left on device"))
    acceptor = datachannel.accept_connections(listener, receiver, timeout=5)
    acceptor.join(timeout=30)
    assert not acceptor.is_alive()
    sender.settimeout(10)       # a bound for the test only: before, the write below waited that long, then timed out
    failed: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(64):
                sender.sendall(b"x" * MiB)
        except OSError as exc:
            failed.append(exc)
    t = threading.Thread(target=send)
    t.start()
    t.join(timeout=60)
    sender.close()
    assert failed and isinstance(failed[0], (ConnectionResetError, BrokenPipeError)), failed
