"""vmgrid's GridFTP against the real Globus tools (Debian globus-gass-copy-progs, globus-gridftp-server-progs):
globus-url-copy -p 4 against vmgrid's server, vmgrid's client against globus-gridftp-server in MODE E with parallel
streams, third-party transfers between the two servers, restart with REST ranges, and CKSM.

The Globus tools need this machine's host name to resolve; when it does not, each Globus process runs in a private
mount namespace with a hosts file that names it (`unshare --mount`, as root), so no hand edit of /etc/hosts is
needed. Anonymous `ftp://` on both sides (vmgrid's server with its test-only anonymous-writes flag for uploads)."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from client.localgrid import free_port as _free_port
from gridftp import GridFTPClient, GridFTPServer, GridFTPURL, download, third_party, upload
from gridftp.errors import ChecksumMismatch
from gridftp.filespace import LocalFileSpace
from gridftp.partial import PartialFile
from gridftp.ranges import RangeSet

from tests.unit.gridftp.gridftp_helpers import MiB, make_file, sha256_of, wait_for

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("globus-url-copy") or not shutil.which("globus-gridftp-server"),
                       reason="Globus tools not installed (run.sh setup installs them)"),
]

SIZE = 21 * MiB + 777          # several 4 MiB blocks, so that four streams all carry data


def _hostname_resolves() -> bool:
    try:
        socket.gethostbyname(socket.gethostname())
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def globus_argv(tmp_path_factory):
    """A function wrapping a Globus command so that the host name resolves (see module docstring)."""
    if _hostname_resolves():
        return lambda argv: list(argv)
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the host name does not resolve and no private mount namespace can fix that")
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {socket.gethostname()}\n")
    return lambda argv: ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]


@pytest.fixture
def world(tmp_path):
    """A directory the Globus server (running as nobody) can read and write: /tmp/vmgrid-gx-*/{src,dst}."""
    base = Path(tempfile.mkdtemp(prefix="vmgrid-gx-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "src").mkdir(mode=0o755)
    (base / "dst").mkdir()
    os.chmod(base / "dst", 0o777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


class GlobusServer:
    def __init__(self, argv_wrapper, log: Path):
        self.port = _free_port()
        self.log = log
        argv = ["globus-gridftp-server", "-aa", "-p", str(self.port), "-d", "ALL", "-l", str(log), "-daemon",
                "-control-interface", "127.0.0.1"]
        if os.geteuid() == 0:
            argv += ["-anonymous-user", "nobody"]      # as root, -aa needs an unprivileged anonymous user
        self.proc = subprocess.Popen(argv_wrapper(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        wait_for(self._ready, timeout=20, what="globus-gridftp-server to listen")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"globus-gridftp-server exited: {self.proc.stderr.read()!r}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(3) == b"220"
        except OSError:
            return False

    def url(self, path: Path | str) -> str:
        return f"ftp://127.0.0.1:{self.port}{path}"

    def transfer_stats(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if "Transfer stats" in line]

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)   # the daemon and the children it forked per connection
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def globus_server(globus_argv, world):
    server = GlobusServer(globus_argv, world / "globus.log")
    yield server
    server.stop()


@contextmanager
def vmgrid_servers(root: Path, **defaults) -> Iterator:
    """``start(**kwargs)``: vmgrid's GridFTP server over ``root`` on 127.0.0.1, ``/up`` its upload area, with
    ``defaults`` and then ``kwargs``, started; every one started is stopped when the block ends (the interop tests'
    servers: anonymous here, with a host credential in test_gsi_globus.py and test_globus_data_channel_cache.py)."""
    servers = []

    def start(**kwargs) -> GridFTPServer:
        server = GridFTPServer(root, "127.0.0.1", 0, upload_area="/up", **{**defaults, **kwargs}).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def vmgrid_server(tmp_path):
    """vmgrid's server, anonymous, with /up writable through the test-only flag."""
    root = tmp_path / "vmgrid"
    (root / "up").mkdir(parents=True)
    with vmgrid_servers(root, anonymous=True, insecure_anonymous_writes=True) as start:
        yield start()


def url_copy(globus_argv, env: dict[str, str] | None, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """globus-url-copy ARGS, wrapped so that the host name resolves (``globus_argv``), with ``env`` (None: this
    process's environment); its output as text."""
    return subprocess.run(globus_argv(["globus-url-copy", *args]), env=env, capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def copied(globus_argv, env: dict[str, str] | None, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """:func:`url_copy` that must succeed (its output in the assertion when it does not)."""
    proc = url_copy(globus_argv, env, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def streams_logged(caplog, verb: str) -> list[int]:
    return [int(m.group(1)) for r in caplog.records
            if (m := re.search(rf"{verb} \d+ bytes over (\d+) MODE E streams", r.getMessage()))]


# -- globus-url-copy against vmgrid's server --------------------------------------------------------------------
def test_globus_url_copy_downloads_from_vmgrid(globus_argv, vmgrid_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gridftp.server")
    src = make_file(Path(vmgrid_server.files.root) / "image", SIZE)
    dest = tmp_path / "got"
    copied(globus_argv, None, "-p", "4", vmgrid_server.url("/image"), f"file://{dest}")
    assert sha256_of(dest) == sha256_of(src)
    assert streams_logged(caplog, "sent") == [4]


def test_globus_url_copy_uploads_to_vmgrid(globus_argv, vmgrid_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gridftp.server")
    src = make_file(tmp_path / "image", SIZE)
    copied(globus_argv, None, "-p", "4", f"file://{src}", vmgrid_server.url("/up/image"))
    stored = Path(vmgrid_server.files.root) / "up" / "image"
    assert sha256_of(stored) == sha256_of(src)
    assert streams_logged(caplog, "received") == [4]
    assert sorted(p.name for p in stored.parent.iterdir()) == ["image"]


class _QuotaSpace(LocalFileSpace):
    """/up holds at most 5 MiB: the quota mechanism of the repository's upload areas ([repository]
    upload_quota_bytes, services/vmrepository/transfer.py)."""

    def quota(self, vpath):
        return (self.root / "up", 5 * MiB) if vpath.startswith("/up/") else None


@pytest.mark.parametrize("streams", ["1", "4"])
def test_globus_url_copy_announces_its_size_so_an_upload_over_the_quota_is_refused_before_its_data(
        globus_argv, tmp_path, caplog, streams):
    """globus-url-copy sends ALLO <size> before STOR: an upload larger than the room its quota leaves is refused
    with 552 at STOR, before a byte is sent, and leaves nothing; one that fits goes through."""
    caplog.set_level(logging.INFO, logger="gridftp.server")
    root = tmp_path / "vmgrid"
    (root / "up").mkdir(parents=True)
    server = GridFTPServer(_QuotaSpace(root), "127.0.0.1", 0, anonymous=True, upload_area="/up",
                           insecure_anonymous_writes=True).start()
    try:
        big = make_file(tmp_path / "big", 8 * MiB)
        proc = subprocess.run(globus_argv(["globus-url-copy", "-dbg", "-p", streams, f"file://{big}",
                                           server.url("/up/big")]), capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        said = proc.stderr + proc.stdout
        assert f"ALLO {8 * MiB}" in said and "552 Upload quota exceeded" in said
        assert "150 Opening" not in said                               # refused before any data connection
        assert list((root / "up").iterdir()) == []
        small = make_file(tmp_path / "small", 3 * MiB)
        copied(globus_argv, None, "-p", streams, f"file://{small}", server.url("/up/small"))
        assert sha256_of(root / "up" / "small") == sha256_of(small)
    finally:
        server.stop()


@pytest.mark.parametrize("streams", [[], ["-p", "4"]], ids=["mode-S", "mode-E-4"])
def test_globus_url_copy_of_a_pipe_past_the_servers_bound_is_refused_naming_that_bound(globus_argv, tmp_path,
                                                                                       streams):
    """globus-url-copy reading a pipe cannot announce a size (no ALLO): its STOR running past the server's
    max_file_size was answered 426 "beyond the announced size 1048576", a size nobody announced, and left a part
    file. It is 552 naming max_file_size, and nothing stays; under a quota with less room than that, 552 naming the
    quota (what the user can change: delete files, or ask for more); a pipe within both is stored. The store is read
    to its end before the 552: cut at the bound, globus-url-copy answered between two of its writes waited for ever
    (a CI run's 120 s timeout); now it finishes sending and then reads the refusal."""
    root = tmp_path / "vmgrid"
    (root / "up").mkdir(parents=True)

    def pipe(server: GridFTPServer, size: int, name: str) -> subprocess.CompletedProcess:
        # a shell pipe, as a user's: the writer stops when globus-url-copy gives up
        return subprocess.run(globus_argv(["sh", "-c", f"head -c {size} /dev/zero | globus-url-copy -dbg "
                                           f"{' '.join(streams)} file:///dev/stdin {server.url(f'/up/{name}')}"]),
                              capture_output=True, timeout=120)

    with vmgrid_servers(root, anonymous=True, insecure_anonymous_writes=True) as start:
        bounded = start(max_file_size=MiB)
        proc = pipe(bounded, 3 * MiB, "big")
        said = (proc.stderr + proc.stdout).decode(errors="replace")
        assert proc.returncode != 0
        assert not re.search(r"(?m)^ALLO ", said) and re.search(r"(?m)^STOR ", said), said    # no size announced
        assert "552 Files may not exceed 1048576 bytes here (the server's max_file_size)" in said, said
        assert "announced size" not in said and "426" not in said, said
        assert "Connection reset" not in said, said     # it finished sending, then was told (read to its end)
        assert list((root / "up").iterdir()) == []
        fits = pipe(bounded, MiB, "fits")
        assert fits.returncode == 0, fits.stderr
        assert (root / "up" / "fits").stat().st_size == MiB
        (root / "up" / "fits").unlink()

    quota_root = tmp_path / "quota"
    (quota_root / "up").mkdir(parents=True)
    server = GridFTPServer(_QuotaSpace(quota_root), "127.0.0.1", 0, anonymous=True, upload_area="/up",
                           insecure_anonymous_writes=True, max_file_size=64 * MiB).start()
    try:
        proc = pipe(server, 8 * MiB, "big")
        said = (proc.stderr + proc.stdout).decode(errors="replace")
        assert proc.returncode != 0
        assert "552 Upload quota exceeded: this needs more bytes" in said and f"of your {5 * MiB} bytes" in said, said
        assert "max_file_size" not in said and "announced size" not in said, said
        assert "Connection reset" not in said, said
        assert list((quota_root / "up").iterdir()) == []
    finally:
        server.stop()


@pytest.mark.parametrize("alg", ["SHA256", "MD5"])
def test_globus_url_copy_verifies_checksums_with_vmgrid(globus_argv, vmgrid_server, tmp_path, alg):
    src = make_file(Path(vmgrid_server.files.root) / "image", 3 * MiB + 5)
    copied(globus_argv, None, "-p", "2", "-verify-checksum", "-checksum-alg", alg,
                    vmgrid_server.url("/image"), f"file://{tmp_path / 'got'}")
    assert sha256_of(tmp_path / "got") == sha256_of(src)


# -- vmgrid's client against globus-gridftp-server ---------------------------------------------------------------
def test_vmgrid_downloads_from_globus_server(globus_server, world, tmp_path):
    src = make_file(world / "src" / "image", SIZE)
    os.chmod(src, 0o644)
    result = download(globus_server.url(src), tmp_path / "image", parallel=4)
    assert result.sha256 == sha256_of(src) and result.bytes_transferred == SIZE
    stats = globus_server.transfer_stats()
    assert any("TYPE=RETR" in s and "STREAMS=4" in s for s in stats), stats


def test_vmgrid_uploads_to_globus_server(globus_server, world, tmp_path):
    src = make_file(tmp_path / "image", SIZE)
    result = upload(src, globus_server.url(world / "dst" / "image"), parallel=4, state_dir=tmp_path / "state")
    assert sha256_of(world / "dst" / "image") == result.sha256 == sha256_of(src)
    stats = globus_server.transfer_stats()
    assert any("TYPE=STOR" in s and "STREAMS=4" in s for s in stats), stats


def test_an_upload_to_globus_that_fails_its_checksum_keeps_nothing_and_runs_again(globus_server, world, tmp_path):
    """globus-gridftp-server takes the SCKS and, once the file is written (in place), refuses the STOR: `550
    GlobusError: v=1 c=INCORRECT_CHECKSUM` with its `GridFTP-Computed-Checksum`. That refusal was a plain ReplyError:
    the wrong digest and the ranges the server had confirmed stayed in the restart log, so the same upload run again
    without the digest announced it again and failed for ever. Now it is a ChecksumMismatch saying what the server
    computed, nothing is kept, and the upload run again computes the file's digest and sends the whole file."""
    src = make_file(tmp_path / "image", SIZE)
    url = globus_server.url(world / "dst" / "image")
    state = tmp_path / "state"
    with pytest.raises(ChecksumMismatch) as info:
        upload(src, url, parallel=4, sha256="0" * 64, state_dir=state)
    assert info.value.actual == sha256_of(src)                 # the server's CKSM of what it stored
    assert not list(state.glob("*"))
    result = upload(src, url, parallel=4, state_dir=state)
    assert result.bytes_reused == 0 and RangeSet.parse(result.fetched_ranges) == RangeSet([(0, SIZE)])
    assert sha256_of(world / "dst" / "image") == result.sha256 == sha256_of(src)


def test_globus_server_honours_rest_ranges_from_vmgrid(globus_server, world, tmp_path):
    """A download interrupted earlier (its partial file and sidecar made here from the real bytes) resumes from
    globus-gridftp-server: the server sends only the missing ranges (REST a-b,c-d in MODE E)."""
    src = make_file(world / "src" / "image", SIZE)
    os.chmod(src, 0o644)
    data = src.read_bytes()
    url = globus_server.url(src)
    with GridFTPClient(url) as session:
        size = session.size(str(src))
        modify = session.command(f"MDTM {src}").text.strip()
    dest = tmp_path / "image"
    held = RangeSet([(0, 5 * MiB), (9 * MiB, 12 * MiB + 3)])
    partial = PartialFile(dest, {"source": str(GridFTPURL.parse(url)), "size": size, "modify": modify,
                                 "sha256": None}, size=size)
    for a, b in held:
        partial.write(a, data[a:b])
    partial.checkpoint()
    partial.close()
    result = download(url, dest, parallel=4)
    assert result.bytes_reused == held.total()
    assert result.bytes_transferred == size - held.total()
    assert result.sha256 == sha256_of(src)


# -- third-party transfers orchestrated by vmgrid's client ---------------------------------------------------------------
def test_third_party_globus_to_vmgrid(globus_server, vmgrid_server, world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gridftp.server")
    src = make_file(world / "src" / "image", SIZE)
    os.chmod(src, 0o644)
    result = third_party(globus_server.url(src), vmgrid_server.url("/up/image"), parallel=4,
                         state_dir=tmp_path / "state")
    assert sha256_of(Path(vmgrid_server.files.root) / "up" / "image") == result.sha256 == sha256_of(src)
    assert streams_logged(caplog, "received") == [4]


def test_third_party_vmgrid_to_globus(globus_server, vmgrid_server, world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gridftp.server")
    src = make_file(Path(vmgrid_server.files.root) / "image", SIZE)
    result = third_party(vmgrid_server.url("/image"), globus_server.url(world / "dst" / "image"), parallel=4,
                         state_dir=tmp_path / "state")
    assert sha256_of(world / "dst" / "image") == result.sha256 == sha256_of(src)
    assert streams_logged(caplog, "sent") == [4]


@pytest.mark.parametrize("alg", ["SHA256", "ADLER32"])
def test_globus_url_copy_third_party_between_vmgrid_and_globus(globus_argv, globus_server, vmgrid_server, world,
                                                               alg):
    """The other orchestrator: globus-url-copy drives vmgrid's server as the source of a third-party transfer and
    compares the two servers' CKSM answers (vmgrid's and Globus' implementations must agree)."""
    src = make_file(Path(vmgrid_server.files.root) / "image", SIZE)
    copied(globus_argv, None, "-p", "4", "-verify-checksum", "-checksum-alg", alg,
                    vmgrid_server.url("/image"), globus_server.url(world / "dst" / "copy"))
    assert sha256_of(world / "dst" / "copy") == sha256_of(src)
