"""The server's grid-mapfile (docs trial F2): read as Globus's parser reads it (gsi/gss_assist gridmap.c: backslash
escapes, \\xHH bytes), and read again when it changes, so an operator's edit takes effect at the next login
without a restart; a version that cannot be read keeps the last good one."""
from __future__ import annotations

import logging
import os

import pytest

from gridftp import AuthenticationError, download
from gridftp.gridmap import GridMap, dn_key, parse_gridmap


def test_globus_escapes_in_a_dn():
    text = ('"/O=Grid/OU=mysite/CN=quote\\"d" q\n'                  # \" a quote inside a quoted DN
            '"/O=Grid/OU=mysite/CN=back\\\\slash" b\n'             # \\ a backslash
            '"/O=Grid/OU=Uni K\\xC3\\xB6ln/CN=J\\xc3\\xb6rg" j\n'  # \xHH bytes, UTF-8 written byte by byte
            '/O=Grid/OU=mysite/CN=bare\\x41 a\n'                   # a bare DN takes them too
            '"/O=Grid/OU=mysite/CN=bob,with comma" bob\n'
            '  # a comment\n\n')
    assert parse_gridmap(text) == {'/O=Grid/OU=mysite/CN=quote"d', "/O=Grid/OU=mysite/CN=back\\slash",
                                   "/O=Grid/OU=Uni Köln/CN=Jörg", "/O=Grid/OU=mysite/CN=bareA",
                                   "/O=Grid/OU=mysite/CN=bob,with comma"}


@pytest.mark.parametrize("line, reason", [
    ('"/O=Grid/CN=unterminated jdoe', "unterminated quoted DN"),
    ('"/O=Grid/CN=ends in an escaped quote\\" jdoe', "unterminated quoted DN"),
    ('"/O=Grid/CN=\\xC3" x', "not UTF-8"),
    ('"O=Grid/CN=x" x', "not a DN"),
])
def test_a_line_that_cannot_be_read_names_the_file_and_line(line, reason):
    with pytest.raises(ValueError, match=f"site-map:2: .*{reason}"):
        parse_gridmap("# header\n" + line + "\n", "site-map")


def test_an_edit_takes_effect_at_the_next_login(start_server, grid_pki, tmp_path, caplog):
    """bob, not in the file, is refused; the operator adds him and his next login works, no restart; a broken edit
    is logged and changes nothing; removing alice refuses her next login."""
    mapfile = tmp_path / "grid-mapfile"
    mapfile.write_text(f'"{grid_pki.alice.dn}" alice\n')
    server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False, gridmap=mapfile)
    url = f"gsiftp://localhost:{server.port}/data/small"

    def fetch(who, name: str, gsi: bool = True):
        return download(url, tmp_path / name, credential=who.proxy, trust=grid_pki.cert_dir, gsi=gsi, retries=0)

    assert fetch(grid_pki.alice, "a1").size == 1000
    with pytest.raises(AuthenticationError, match="not in this server's grid-mapfile"):
        fetch(grid_pki.bob, "b1")
    with open(mapfile, "a") as f:                              # the trial's `echo ... >> grid-mapfile`
        f.write(f'"{grid_pki.bob.dn}" bob\n')
    assert fetch(grid_pki.bob, "b2").size == 1000
    assert fetch(grid_pki.bob, "b3", gsi=False).size == 1000    # AUTH TLS reads the same map

    with caplog.at_level(logging.WARNING, logger="gridftp.gridmap"):
        mapfile.write_text(f'"{grid_pki.alice.dn}" alice\n"/O=Grid/CN=half-written\n')
        assert fetch(grid_pki.bob, "b4").size == 1000            # the last good map stays
    assert "cannot be read" in caplog.text and "grid-mapfile:2" in caplog.text

    replacement = tmp_path / "grid-mapfile.new"                 # a new file moved into place (a new inode)
    replacement.write_text(f'"{grid_pki.bob.dn}" bob\n')
    os.replace(replacement, mapfile)
    with pytest.raises(AuthenticationError, match="not in this server's grid-mapfile"):
        fetch(grid_pki.alice, "a2")
    assert fetch(grid_pki.bob, "b5").size == 1000


def test_a_map_that_cannot_be_read_at_start_is_an_error(tmp_path):
    mapfile = tmp_path / "grid-mapfile"
    mapfile.write_text('"/O=Grid/CN=unterminated x\n')
    with pytest.raises(ValueError, match="grid-mapfile:1"):
        GridMap(mapfile)
    with pytest.raises(FileNotFoundError):
        GridMap(tmp_path / "missing")


def test_dns_compare_as_globus_compares_them():
    """gss_assist gridmap.c finds a DN with ``globus_i_gsi_cert_utils_dn_cmp(dn, gline_tmp->dn) == 0``: strcasecmp,
    then strcasecmp of both normalised (/UID= is /USERID=, /E= and /Email= are /emailAddress=). vmgrid compared
    exactly, so a grid-mapfile that a Globus server accepts refused its users here."""
    alice = "/O=Grid/OU=mysite/CN=Alice Smith"
    assert dn_key("/o=grid/ou=MYSITE/cn=alice smith") == dn_key(alice)
    assert dn_key("/O=Grid/OU=mysite/UID=alice") == dn_key("/O=Grid/OU=mysite/userid=alice")
    assert dn_key("/O=Grid/E=a@example.org/CN=A") == dn_key("/O=Grid/emailAddress=a@example.org/CN=A")
    assert dn_key("/O=Grid/Email=a@example.org/CN=A") == dn_key("/O=Grid/EMAILADDRESS=a@example.org/CN=A")
    assert dn_key("/O=Grid/CN=Jörg") != dn_key("/O=Grid/CN=JÖRG")        # strcasecmp folds ASCII only
    assert dn_key("/O=Grid/CN=x UID=y") != dn_key("/O=Grid/CN=x USERID=y")  # an alias only right after a '/'
    assert dn_key(alice + " ") != dn_key(alice) and dn_key("/O=Grid/CN=bob") != dn_key(alice)


def test_a_grid_mapfile_dn_in_another_case_admits_its_user(start_server, grid_pki, tmp_path):
    """The grid-mapfile's line for alice written in other letter cases (as a site's tools or a hand edit may
    write it) lets her in over GSI and AUTH TLS, as at a Globus server; bob stays out. A set of DNs alike."""
    dn = grid_pki.alice.dn
    swapped = "/".join(part.swapcase() for part in dn.split("/"))
    assert swapped != dn
    mapfile = tmp_path / "grid-mapfile"
    mapfile.write_text(f'"{swapped}" alice\n')
    for gridmap in (mapfile, {swapped}):
        server = start_server(credential=grid_pki.host, trust=grid_pki.cert_dir, anonymous=False, gridmap=gridmap)
        url = f"gsiftp://localhost:{server.port}/data/small"
        for gsi in (True, False):
            got = download(url, tmp_path / f"a-{gsi}", credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir,
                           gsi=gsi, retries=0)
            assert got.size == 1000
            (tmp_path / f"a-{gsi}").unlink()
        with pytest.raises(AuthenticationError, match="not in this server's grid-mapfile"):
            download(url, tmp_path / "b", credential=grid_pki.bob.proxy, trust=grid_pki.cert_dir, retries=0)
