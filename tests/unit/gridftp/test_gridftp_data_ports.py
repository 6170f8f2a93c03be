"""GLOBUS_TCP_PORT_RANGE: the ports data connections are accepted on, by a server's PASV/EPSV/SPAS and by a client's
PORT/EPRT/SPOR listeners alike (gridftp.datachannel.open_listener), so a site firewall can open just that range.
Real sockets and a real server and client on loopback."""
from __future__ import annotations

import errno
import socket

import pytest

from gridftp.datachannel import open_listener, parse_port_range
from gridftp.transfer import download

from tests.unit.gridftp.test_gridftp_cli import _free_range


def test_listeners_take_ports_of_the_range_and_say_when_none_is_left(monkeypatch):
    low, high = _free_range(4)
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", f"{low},{high}")
    held = [open_listener("127.0.0.1") for _ in range(4)]
    try:
        assert sorted(s.getsockname()[1] for s in held) == list(range(low, high + 1))
        with pytest.raises(OSError) as exc:
            open_listener("127.0.0.1")
        assert exc.value.errno == errno.EADDRINUSE and f"GLOBUS_TCP_PORT_RANGE {low},{high}" in str(exc.value)
    finally:
        for s in held:
            s.close()
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", "nonsense")
    with pytest.raises(OSError, match="expected LOW,HIGH"):
        open_listener("127.0.0.1")
    monkeypatch.delenv("GLOBUS_TCP_PORT_RANGE")
    with open_listener("127.0.0.1") as any_port:
        assert any_port.getsockname()[1] > 0
    assert parse_port_range("50000-50010") == parse_port_range("50000,50010") == (50000, 50010)
    assert parse_port_range(" ") is None


@pytest.mark.parametrize("text", ["5_0,60", "+5,6", "5,+6", "\u0665,\u0666", "5,\u00b2", "\uff15,6", " 5 -\u30006"])
def test_a_port_is_ascii_digits_only(text, monkeypatch):
    """What Python's int() takes besides ASCII digits (an underscore, a sign, other scripts' digits, blanks of other
    scripts) is no port: the Globus tools reading the same GLOBUS_TCP_PORT_RANGE would not take the range either
    (attack15: "5_0,60" was ports 50 to 60, "\u0665,\u0666" 5 to 6). Refused in the form's words, as the variable,
    `--data-ports` and `[gridftp] data_ports` name it; ASCII blanks around the ports are still taken."""
    with pytest.raises(ValueError) as exc:
        parse_port_range(text)
    assert str(exc.value) == (f"GLOBUS_TCP_PORT_RANGE={text.strip()!r}: expected LOW,HIGH, two ports 1 to 65535 in "
                              f"order (e.g. 50000,51000)")
    with pytest.raises(ValueError, match=r"^--data-ports="):
        parse_port_range(text, "--data-ports")
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", text)
    with pytest.raises(OSError, match="expected LOW,HIGH"):       # a listener refuses it too
        open_listener("127.0.0.1")
    assert parse_port_range(" 50000 , 50010 ") == parse_port_range("50000 - 50010") == (50000, 50010)


def test_a_port_the_server_closed_first_is_taken_again_at_once(start_server, tree, monkeypatch):
    """A listing (MODE S: the server sends, then closes first) leaves the server's side of its data connection in
    TIME_WAIT for a minute; the listener was bound without SO_REUSEADDR, so no PASV could take that port meanwhile:
    four listings of one user emptied a four-port [gridftp] data_ports for everyone, renewed at will (attack16 G3).
    With a one-port range: a listing, then the next PASV takes the same port (425 "no free data port" before); a
    second listener on a port that has one is still refused."""
    from tests.unit.gridftp.gridftp_helpers import RawFTP, read_stream
    low, _ = _free_range(1)
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", f"{low},{low}")
    server = start_server()
    s = RawFTP("127.0.0.1", server.port)
    s.login_anonymous()
    for _ in range(3):
        addr = s.pasv()
        assert addr[1] == low
        assert s.cmd("NLST /data").code == 150
        conn = socket.create_connection(addr)
        assert read_stream(conn)            # the server closes first: its side of the port is in TIME_WAIT
        conn.close()
        final = s.reply()
        while final.preliminary:
            final = s.reply()
        assert final.code == 226, final
    assert s.pasv()[1] == low             # the server's listener holds the port again: nobody else may listen there
    with pytest.raises(OSError) as exc:
        open_listener("127.0.0.1")
    assert exc.value.errno == errno.EADDRINUSE
    s.close()


def test_a_mode_e_download_listens_on_the_range(start_server, tree, tmp_path, monkeypatch):
    """A MODE E download (the client listens, PORT; as a node pulling a migration's files): with the range set, the
    client's data listener is in it (the server's session saw PORT for such a port) and the file arrives whole.
    Before: the range was not read anywhere, every listener took an ephemeral port."""
    low, high = _free_range()
    monkeypatch.setenv("GLOBUS_TCP_PORT_RANGE", f"{low},{high}")
    server = start_server()
    seen: list[int] = []
    real = socket.socket.connect

    def connect(sock, address):        # the server's data connections to the client's PORT address
        if isinstance(address, tuple) and address[0] == "127.0.0.1" and address[1] != server.port:
            seen.append(address[1])
        return real(sock, address)
    monkeypatch.setattr(socket.socket, "connect", connect)
    download(f"ftp://127.0.0.1:{server.port}/data/f3m", tmp_path / "f", parallel=2)
    assert (tmp_path / "f").read_bytes() == (tree / "data" / "f3m").read_bytes()
    assert seen and all(low <= p <= high for p in seen), (seen, low, high)
