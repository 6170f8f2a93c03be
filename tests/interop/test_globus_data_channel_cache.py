"""globus-url-copy copying many files in one session against vmgrid's server (docs trial F16): with ``-p N``
(MODE E) Globus keeps the data connections of one transfer for the next (GFD.20 data channel caching: a stream ended
by EOD without the close flag stays open) and sends the next RETR/STOR without a new PORT/PASV. vmgrid's server keeps
them too, so ``-r`` (a directory) and ``-f`` (a list of URLs) copy every file, both ways, over GSI with -dcpriv and
over anonymous ftp://."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from gridftp import GridFTPServer

from tests.interop.test_gridftp_globus import copied, globus_argv, vmgrid_servers  # noqa: F401
from tests.interop.test_gsi_globus import alice_proxy, globus_env, pytestmark as gsi_marks  # noqa: F401
from tests.unit.gridftp.gridftp_helpers import MiB, make_file, sha256_of

pytestmark = gsi_marks

# sizes of the ten files: empty, smaller than a block, several 4 MiB blocks (all four streams carry data)
SIZES = [0, 1, 1000, 256 << 10, MiB + 3, 3 * MiB, 5 * MiB + 17, 9 * MiB + 1, 2 * MiB - 1, 12 * MiB + 5]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _make_dir(root: Path) -> dict[str, str]:
    for i, size in enumerate(SIZES):
        make_file(root / f"f{i:02d}.bin", size)
    return _tree(root)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    (root / "up").mkdir(parents=True)
    return root


@pytest.fixture
def server(grid_pki, served):  # noqa: F811
    """``start(anonymous=True)``: anonymous, /up writable (the test-only flag); ``start()``: the host credential."""
    with vmgrid_servers(served) as start:
        def secured_or_anonymous(**kwargs) -> GridFTPServer:
            if kwargs.get("anonymous"):
                kwargs.setdefault("insecure_anonymous_writes", True)
            else:
                kwargs.update(credential=grid_pki.host, trust=grid_pki.cert_dir)
            return start(**kwargs)

        yield secured_or_anonymous


def _copy(globus_argv, env, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    return copied(globus_argv, env, *args, timeout=300)


def _reuses(caplog) -> int:
    return sum("cached data connections" in r.getMessage() and "reused" in r.getMessage() for r in caplog.records)


SECURITY = {"GSI, -dcpriv": ("gsiftp", ["-dcpriv"]), "anonymous ftp://": ("ftp", [])}


@pytest.fixture(params=list(SECURITY))
def setup(request, server, grid_pki, alice_proxy):  # noqa: F811
    scheme, options = SECURITY[request.param]
    if scheme == "ftp":
        return server(anonymous=True), scheme, options, None
    return server(), scheme, options, globus_env(grid_pki.alice, grid_pki.cert_dir, alice_proxy)


def test_a_directory_downloads_with_parallel_streams(setup, globus_argv, served, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="gridftp.server")
    srv, scheme, options, env = setup
    expected = _make_dir(served / "dir")
    dest = tmp_path / "got"
    _copy(globus_argv, env, *options, "-r", "-cd", "-p", "4", f"{scheme}://localhost:{srv.port}/dir/",
          f"file://{dest}/")
    assert _tree(dest) == expected
    assert _reuses(caplog) >= len(SIZES) - 1       # one data setup, its connections carried every later file


def test_a_directory_uploads_with_parallel_streams(setup, globus_argv, served, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="gridftp.server")
    srv, scheme, options, env = setup
    expected = _make_dir(tmp_path / "local")
    _copy(globus_argv, env, *options, "-r", "-cd", "-p", "4", f"file://{tmp_path / 'local'}/",
          f"{scheme}://localhost:{srv.port}/up/dir/")
    assert _tree(served / "up" / "dir") == expected
    assert _reuses(caplog) >= len(SIZES) - 1
    assert not [p for p in (served / "up" / "dir").iterdir() if p.name.endswith((".vmgrid-part", ".ranges"))]


def test_a_list_of_urls_both_ways(setup, globus_argv, served, tmp_path):  # noqa: F811
    """-f: downloads, then uploads (a new PASV closes the download's connections), then a download again."""
    srv, scheme, options, env = setup
    remote = _make_dir(served / "dir")
    local = _make_dir(tmp_path / "local")
    base = f"{scheme}://localhost:{srv.port}"
    names = sorted(remote)
    lines = [f"{base}/dir/{n} file://{tmp_path}/down/{n}" for n in names[:4]]
    lines += [f"file://{tmp_path}/local/{n} {base}/up/{n}" for n in names[4:8]]
    lines += [f"{base}/dir/{n} file://{tmp_path}/down/{n}" for n in names[8:]]
    (tmp_path / "down").mkdir()
    flist = tmp_path / "flist"
    flist.write_text("\n".join(lines) + "\n")
    _copy(globus_argv, env, *options, "-p", "4", "-f", str(flist))
    assert _tree(tmp_path / "down") == {n: remote[n] for n in names[:4] + names[8:]}
    assert _tree(served / "up") == {n: local[n] for n in names[4:8]}


def test_a_single_file_still_copies(setup, globus_argv, served, tmp_path):  # noqa: F811
    srv, scheme, options, env = setup
    src = make_file(served / "one.bin", 7 * MiB + 5)
    _copy(globus_argv, env, *options, "-p", "4", f"{scheme}://localhost:{srv.port}/one.bin", f"file://{tmp_path}/one")
    _copy(globus_argv, env, *options, "-p", "4", f"file://{tmp_path}/one", f"{scheme}://localhost:{srv.port}/up/one")
    assert sha256_of(tmp_path / "one") == sha256_of(src) == sha256_of(served / "up" / "one")
