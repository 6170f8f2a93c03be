"""The repository's image store over GridFTP: bytes for those who may read an image made of them
(and the VMManager nodes), each user's upload area for that user only, nothing anonymous."""
from __future__ import annotations

import hashlib

import pytest

import gridftp
from services.descriptor import Descriptor
from tests.fixtures.repository import EXAMPLES


@pytest.fixture
def stored(repo_server):
    admin = repo_server.client(repo_server.pki.admin)
    ws = Descriptor(admin.register((EXAMPLES / "debian12-emboss.xml").read_bytes(),
                                   local_path=str(repo_server.image("bytes.qcow2", fill=b"gridftp" * 999))))
    return repo_server, ws


def test_a_vo_member_downloads_the_bytes_verified(stored, tmp_path):
    server, ws = stored
    alice = server.pki.alice
    url = server.client(alice).location(ws.image_id)
    result = gridftp.download(url, tmp_path / "img", 2, credential=alice.proxy, trust=server.pki.trust())
    assert result.sha256 == ws.sha256 == hashlib.sha256((tmp_path / "img").read_bytes()).hexdigest()


def test_blake3_is_computed_at_ingest_and_verifies_staging(stored, tmp_path):
    """Issue 13 §5: the repository computes the image's BLAKE3 with its sha256 at ingest and puts it in
    the descriptor; its GridFTP face answers CKSM BLAKE3 from it, so a node verifies staged bytes with
    BLAKE3 (given, as from the descriptor, or asked for), and wrong bytes are refused either way."""
    import blake3

    server, ws = stored
    alice = server.pki.alice
    url = server.client(alice).location(ws.image_id)
    data = server.service.store.path(ws.sha256).read_bytes()
    assert ws.blake3 == blake3.blake3(data).hexdigest()
    given = gridftp.download(url, tmp_path / "given", 2, credential=alice.proxy, trust=server.pki.trust(),
                             sha256=ws.sha256, blake3=ws.blake3)
    asked = gridftp.download(url, tmp_path / "asked", 2, credential=alice.proxy, trust=server.pki.trust(),
                             checksum="auto")
    assert given.blake3 == asked.blake3 == ws.blake3 and given.sha256 == asked.sha256 == ""
    assert (tmp_path / "given").read_bytes() == (tmp_path / "asked").read_bytes() == data
    with pytest.raises(gridftp.ChecksumMismatch):
        gridftp.download(url, tmp_path / "bad", 2, credential=alice.proxy, trust=server.pki.trust(),
                         blake3="0" * 64)
    # the descriptor's BLAKE3 travels with duplicates and cannot be changed by an update
    client = server.client(alice)
    dup = Descriptor(client.duplicate(ws.image_id, "with-blake3"))
    assert dup.blake3 == ws.blake3
    from services.descriptor import set_field
    from services.faults import InvalidDescriptor

    edited = dup.element
    set_field(edited, "image", "blake3", "ab" * 32)
    with pytest.raises(InvalidDescriptor):
        client.update(dup.image_id, edited)


def denied(exc: Exception) -> bool:
    """A refusal for lack of permission: 550 permission denied (or the client's typed error for it)."""
    return isinstance(exc, gridftp.AuthorizationDenied) or (
        isinstance(exc, gridftp.ReplyError) and exc.code == 550 and "permission denied" in exc.text)


def test_another_vo_is_denied_the_bytes(stored, tmp_path):
    server, ws = stored
    url = server.client(server.pki.alice).location(ws.image_id)
    with pytest.raises(gridftp.GridFTPError) as exc:
        gridftp.download(url, tmp_path / "img", 2, credential=server.pki.bob.proxy, trust=server.pki.trust(),
                         retries=0)
    assert denied(exc.value)
    assert not (tmp_path / "img").exists()


def test_uploads_go_only_into_ones_own_area(stored, tmp_path):
    server, _ = stored
    pki = server.pki
    src = tmp_path / "mine.raw"
    src.write_bytes(b"raw!" * 5000)
    alice_area = server.client(pki.alice).upload_location()
    bob_area = server.client(pki.bob).upload_location()
    assert alice_area != bob_area
    gridftp.upload(src, alice_area + "mine.raw", 2, credential=pki.alice.proxy, trust=pki.trust(),
                   state_dir=tmp_path / "state")
    with pytest.raises(gridftp.GridFTPError) as exc:
        gridftp.upload(src, bob_area + "intruder.raw", 2, credential=pki.alice.proxy, trust=pki.trust(),
                       retries=0, state_dir=tmp_path / "state2")
    assert denied(exc.value)
    with pytest.raises(gridftp.GridFTPError) as exc:
        gridftp.download(alice_area + "mine.raw", tmp_path / "x", 1, credential=pki.bob.proxy,
                         trust=pki.trust(), retries=0)
    assert denied(exc.value)
    uploaded = [p for p in server.service.upload_dir.rglob("*") if p.is_file()]
    assert [p.name for p in uploaded] == ["mine.raw"]


def test_no_anonymous_access_and_no_untrusted_credentials(stored, tmp_path):
    server, ws = stored
    url = server.client(server.pki.alice).location(ws.image_id)
    with pytest.raises(gridftp.GridFTPError):
        gridftp.download(url.replace("gsiftp://", "ftp://"), tmp_path / "a", 1, retries=0)
    with pytest.raises(gridftp.AuthenticationError):
        gridftp.download(url, tmp_path / "b", 1, credential=server.pki.stranger.proxy, trust=server.pki.trust(),
                         retries=0)


def test_an_upload_area_holds_at_most_its_quota(stored, tmp_path):
    """[repository] upload_quota_bytes bounds what one user's upload area holds (partial uploads included):
    an upload that does not fit is refused with 552 naming the quota and the usage before a byte is written,
    nothing of it stays, another user's area is not affected, and registering an upload frees its room.
    Without the quota any VO member could fill the repository's disk (only a 1 TiB per-file cap)."""
    server, _ = stored
    pki = server.pki
    files = server.service.transfers.server.files
    alice = server.client(pki.alice)
    area = alice.upload_location()
    first = server.image("first.qcow2", fill=b"first" * 100)
    quota = first.stat().st_size + 50_000
    files.upload_quota = quota            # this test's quota (the configuration's value is read at start)
    second = tmp_path / "second.raw"
    second.write_bytes(b"s" * 50_001)
    gridftp.upload(first, area + "first.qcow2", 2, credential=pki.alice.proxy, trust=pki.trust(),
                   state_dir=tmp_path / "state")
    with pytest.raises(gridftp.GridFTPError) as exc:
        gridftp.upload(second, area + "second.raw", 2, credential=pki.alice.proxy, trust=pki.trust(),
                       retries=0, state_dir=tmp_path / "state2")
    assert isinstance(exc.value, gridftp.ReplyError) and exc.value.code == 552
    assert f"{first.stat().st_size} of your {quota} bytes" in exc.value.text
    mine = server.service.upload_dir / (area.rstrip("/").rsplit("/", 1)[1])
    assert sorted(p.name for p in mine.iterdir()) == ["first.qcow2"]
    # bob's area is his own quota
    gridftp.upload(second, server.client(pki.bob).upload_location() + "second.raw", 2, credential=pki.bob.proxy,
                   trust=pki.trust(), state_dir=tmp_path / "state3")
    # registering the first upload moves it into the store: the room is free again
    from lxml import etree

    from services.descriptor import set_field
    ws = etree.fromstring((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", "from-upload")
    alice.register(ws, upload="first.qcow2")
    gridftp.upload(second, area + "second.raw", 2, credential=pki.alice.proxy, trust=pki.trust(),
                   state_dir=tmp_path / "state4")
    assert sorted(p.name for p in mine.iterdir()) == ["second.raw"]
    assert server.service.registry.config.upload_quota_bytes == 128 * 1024**3    # the default (docs/configuration.md)


def test_unregistered_uploads_are_swept_after_upload_max_age(stored, tmp_path):
    """An upload whose register was refused (its sha256 does not match) and what a cut upload left stayed in the
    upload area for ever, counting against the owner's quota; now they are removed once unregistered for
    [repository] upload_max_age, except while a session is storing that name. Fresh uploads stay."""
    import time

    from lxml import etree

    from services.descriptor import set_field
    from services.faults import ChecksumMismatch

    server, _ = stored
    pki = server.pki
    registry = server.service.registry
    alice = server.client(pki.alice)
    area = alice.upload_location()
    mine = server.service.upload_dir / area.rstrip("/").rsplit("/", 1)[1]
    src = server.image("refused.qcow2", fill=b"refused" * 100)
    gridftp.upload(src, area + "refused.qcow2", 2, credential=pki.alice.proxy, trust=pki.trust(),
                   state_dir=tmp_path / "state")
    ws = etree.fromstring((EXAMPLES / "debian12-emboss.xml").read_bytes())
    set_field(ws, "identity", "name", "refused")
    set_field(ws, "image", "sha256", "0" * 64)
    with pytest.raises(ChecksumMismatch):
        alice.register(ws, upload="refused.qcow2")
    # what a cut upload leaves for a restart, and an upload a session is storing right now
    (mine / "cut.raw.vmgrid-part").write_bytes(b"c" * 1000)
    (mine / "cut.raw.vmgrid-part.ranges").write_text("{}")
    (mine / "busy.raw.vmgrid-part").write_bytes(b"b" * 1000)
    busy = "/uploads/" + mine.name + "/busy.raw"
    assert server.service.transfers.claim(busy)
    everything = ["busy.raw.vmgrid-part", "cut.raw.vmgrid-part", "cut.raw.vmgrid-part.ranges", "refused.qcow2"]
    assert sorted(p.name for p in mine.iterdir()) == everything
    max_age = registry.config.upload_max_age
    assert max_age == 7 * 24 * 3600                                  # the default (docs/configuration.md)
    assert registry.sweep_uploads(time.time() + max_age - 60) == []     # not old enough yet
    removed = registry.sweep_uploads(time.time() + max_age + 1)
    assert sorted(removed) == ["/uploads/" + mine.name + "/cut.raw", "/uploads/" + mine.name + "/refused.qcow2"]
    assert sorted(p.name for p in mine.iterdir()) == ["busy.raw.vmgrid-part"]
    server.service.transfers.release(busy)
    assert registry.sweep_uploads(time.time() + max_age + 1) == [busy]
    assert list(mine.iterdir()) == []


def test_a_guest_certificate_is_refused_at_login_and_the_users_are_not_crowded_out(stored, tmp_path):
    """Attack G10: each guest certificate of a VM owner (issued as a node issues them) was a GridFTP identity of its
    own at the repository, where the policy gives guests nothing: seven took 47 of the 48 user sessions and bob got
    421. A guest's login now gets one 530 line; alice still downloads."""
    server, ws = stored
    url = server.client(server.pki.alice).location(ws.image_id)
    guests = [server.pki.issue_guest(f"10.99.0.{20 + i}") for i in range(3)]
    for guest in guests:
        with pytest.raises(gridftp.GridFTPError) as refused:
            gridftp.download(url, tmp_path / "guest", 1, credential=guest, trust=server.pki.trust())
        assert (f"530 /O=Grid/OU=vmgrid-guests/CN=host/{guest.identity.rsplit('/', 1)[1]} is a guest container's "
                "certificate: guests have no rights on this server.") in str(refused.value)
    assert not (tmp_path / "guest").exists()
    result = gridftp.download(url, tmp_path / "img", 1, credential=server.pki.alice.proxy, trust=server.pki.trust())
    assert result.sha256 == ws.sha256


def test_the_gridftp_section_and_the_sites_guest_ou_reach_the_repositorys_face(grid_pki, tmp_path):
    """vmgrid serve's repository (build_service): [gridftp]'s bounds and [vmmanager] guest_ou/guest_dns are its
    face's (it was built with the defaults: a site's own guest_ou counted as hosts there)."""
    from services.container.assemble import build_service
    from services.container.config import GridFTPConfig
    from tests.fixtures.repository import repository_config

    (tmp_path / "ingest").mkdir()
    cfg = repository_config(grid_pki, tmp_path / "state", tmp_path / "ingest")
    cfg.gridftp = GridFTPConfig(max_sessions=8, max_sessions_per_identity=1, host_sessions=2)
    cfg.vmmanager.guest_ou = "site-guests"
    service = build_service("repository", cfg)
    face = service.transfers
    face.start()
    try:
        url = f"{face.base_url}/uploads/"
        alice = gridftp.GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir).connect()
        with pytest.raises(gridftp.GridFTPError, match=f"421 Too many sessions for {grid_pki.alice.dn}: at most 1"):
            gridftp.GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.cert_dir).connect()
        for guest in (grid_pki.issue_guest("10.99.0.30", guest_ou="site-guests"), grid_pki.issue_guest("10.99.0.31")):
            with pytest.raises(gridftp.GridFTPError, match="530 .* is a guest container's certificate"):
                gridftp.GridFTPClient(url, credential=guest, trust=grid_pki.cert_dir).connect()
        alice.close()
    finally:
        face.stop()
        service.close()
