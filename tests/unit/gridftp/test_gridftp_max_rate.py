"""`max_rate` (`vmgrid gridftp-server --max-rate`, "bytes per second per transfer") holds what the server receives
as well as what it sends (trial12 T6: an upload to a `--max-rate 20000000` server ran at 1.6 Gbit/s). Checked by the
server's own throttle accounting (every byte received taken from the transfer's throttle, and takes that had to
wait), not by timing the transfer."""
from __future__ import annotations

import socket

import pytest

import gridftp.server
from gridftp import upload
from gridftp.datachannel import Throttle

from tests.unit.gridftp.gridftp_helpers import MiB, RawFTP, make_file, sha256_of

RATE = 4 * MiB          # the 3 MiB file: about 0.75 s of waits planned


@pytest.fixture
def throttles(monkeypatch):
    """Every Throttle the server makes, kept to read its accounting."""
    made: list[Throttle] = []

    class Recorded(Throttle):
        def __init__(self, rate):
            super().__init__(rate)
            made.append(self)

    monkeypatch.setattr(gridftp.server, "Throttle", Recorded)
    return made


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_mode_e_upload_is_held_to_the_servers_max_rate(start_server, tree, tmp_path, throttles, parallel):
    server = start_server(max_rate=RATE, upload_area="/up", insecure_anonymous_writes=True)
    source = tree / "data" / "f3m"
    result = upload(source, server.url("/up/f3m"), parallel, retries=0, state_dir=tmp_path / "state")
    assert sha256_of(tree / "up" / "f3m") == sha256_of(source) and result.size == source.stat().st_size
    assert [t.rate for t in throttles] == [RATE]
    assert throttles[0].taken == source.stat().st_size        # every byte received went through it
    assert throttles[0].waits > 0                              # and the receiving streams were held back


def test_a_stream_mode_stor_is_held_to_the_servers_max_rate(start_server, tree, throttles):
    server = start_server(max_rate=RATE, upload_area="/up", insecure_anonymous_writes=True)
    data = make_file(tree.parent / "local", 2 * MiB + 5).read_bytes()
    s = RawFTP("127.0.0.1", server.port)
    try:
        s.login_anonymous()
        s.expect("TYPE I", 200)
        addr = s.pasv()
        with socket.create_connection(addr) as conn:
            s.ctl.send_line("STOR /up/stream")
            assert s.reply().code in (125, 150)
            conn.sendall(data)
        assert s.reply().code == 226
    finally:
        s.close()
    assert (tree / "up" / "stream").read_bytes() == data
    assert len(throttles) == 1 and throttles[0].taken == len(data) and throttles[0].waits > 0


def test_a_download_is_still_held_to_it(start_server, tree, tmp_path, throttles):
    from gridftp import download

    server = start_server(max_rate=RATE)
    download(server.url("/data/f3m"), tmp_path / "f3m", 2, retries=0)
    assert len(throttles) == 1 and throttles[0].taken == (tree / "data" / "f3m").stat().st_size
    assert throttles[0].waits > 0
