"""The VMRepository enforcing through the Authorization service: each in its own real container on
loopback; the repository asks over signed SOAP with its host credential before every operation, and
scopes queries by the VO groups the service gives. Another user's image: every operation denied; the
VO admin: allowed; permits cached briefly, denials never."""
from __future__ import annotations

import pytest

from services.faults import AccessDenied
from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.unit.authz.authz_support import AuthzSite, descriptor, grid_user, policy_text

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def site(grid_pki, tmp_path):
    carol = grid_user(grid_pki, "carol")
    s = AuthzSite(grid_pki, tmp_path, policy_text(admins=[grid_pki.admin.dn], groups={
        "bio": {"members": [grid_pki.alice.dn], "admins": [carol.dn]},
        "hep": {"members": [grid_pki.bob.dn]},
    }), repository=True, permit_ttl=30)
    s.carol = carol
    yield s
    s.close()


def decisions(site, subject: str, action: str) -> list[dict]:
    return [r for r in site.authority.audit.read(event="decision", limit=10000)
            if r["subject"] == subject and r["action"] == action]


def test_another_users_image_every_operation_denied_and_the_vo_admin_allowed(site, grid_pki):
    alice = site.repository(grid_pki.alice.proxy)
    ws = alice.register(descriptor("blast-alice", "bio"), upload=site.upload("blast.img", grid_pki.alice.dn))
    image_id = ws.findtext("{*}identity/{*}imageId")
    ref = "bio/blast-alice"

    bob = site.repository(grid_pki.bob.proxy)
    denied = [  # (operation, the action refused: a duplicate is refused at reading the original)
        (lambda: bob.show(ref), "image.read"),
        (lambda: bob.duplicate(ref, "bob-copy"), "image.read"),
        (lambda: bob.update(ref, descriptor("blast-alice", "bio")), "image.update"),
        (lambda: bob.remove(ref), "image.remove"),
        (lambda: bob.hold(ref, "bob-instance", 60), "image.hold"),
    ]
    for call, action in denied:
        before = len(decisions(site, grid_pki.bob.dn, action))
        with pytest.raises(AccessDenied) as info:
            call()
        assert (info.value.subject, info.value.action, info.value.rule) == (grid_pki.bob.dn, action, "default-deny")
        audited = decisions(site, grid_pki.bob.dn, action)
        assert len(audited) == before + 1 and audited[-1]["decision"] == "deny"
        assert audited[-1]["resource"]["owner"] == grid_pki.alice.dn
    assert bob.query().total == 0 and bob.vos() == [("hep", 0)]

    carol = site.repository(site.carol.proxy)
    assert carol.show(ref).findtext("{*}identity/{*}imageId") == image_id
    changed = descriptor("blast-alice", "bio")
    changed.find("{*}identity/{*}description").text = "curated by the VO admin"
    assert carol.update(ref, changed).findtext("{*}identity/{*}description") == "curated by the VO admin"
    copy = carol.duplicate(ref, "blast-carol")
    assert copy.findtext("{*}identity/{*}owner") == site.carol.dn
    hold_id, _ = carol.hold(ref, "carol-instance", 60)
    assert carol.release(hold_id)
    carol.remove(ref)
    assert [d.findtext("{*}identity/{*}name") for d in alice.query().descriptors] == ["blast-carol"]
    rules = {"image.read": "vo-members-use-images", "image.duplicate": "vo-members-use-images",
             "image.update": "vo-admins", "image.remove": "vo-admins", "image.hold": "vo-admins"}
    for action, rule in rules.items():
        assert decisions(site, site.carol.dn, action)[-1]["rule"] == rule


def test_owner_but_not_other_members_edit_and_remove(site, grid_pki):
    dave = grid_user(grid_pki, "dave")
    admin = site.client(grid_pki.admin.proxy)
    admin.add_member("bio", dave.dn)
    alice = site.repository(grid_pki.alice.proxy)
    alice.register(descriptor("emboss", "bio"), upload=site.upload("e.img", grid_pki.alice.dn))
    other = site.repository(dave.proxy)
    assert other.show("bio/emboss") is not None                 # a VO's members see its images
    with pytest.raises(AccessDenied):
        other.remove("bio/emboss")
    on_host = site.ingest_dir / "x.img"
    on_host.write_bytes(b"raw image on the repository host" * 64)
    with pytest.raises(AccessDenied, match="local-ingest-admins-only"):
        other.register(descriptor("x", "bio"), local_path=str(on_host))
    site.repository(grid_pki.admin.proxy).register(descriptor("x", "bio"), local_path=str(on_host))
    alice.remove("bio/emboss")
    assert decisions(site, grid_pki.admin.dn, "image.register")[-1]["rule"] == "site-admins"


def test_queries_are_scoped_by_the_groups_the_service_gives(site, grid_pki):
    site.repository(grid_pki.alice.proxy).register(descriptor("bio-1", "bio"), upload=site.upload("a.img", grid_pki.alice.dn))
    site.repository(grid_pki.bob.proxy).register(descriptor("hep-1", "hep"), upload=site.upload("b.img", grid_pki.bob.dn))
    names = lambda repo: sorted(d.findtext("{*}identity/{*}name") for d in repo.query().descriptors)  # noqa: E731
    alice, bob = site.repository(grid_pki.alice.proxy), site.repository(grid_pki.bob.proxy)
    assert names(alice) == ["bio-1"] and names(bob) == ["hep-1"]
    assert alice.vos() == [("bio", 1)]
    # a membership change through the admin operations: a new policy version empties the permit caches
    site.client(grid_pki.admin.proxy).add_member("bio", grid_pki.bob.dn)
    bob.show("hep/hep-1")                                       # one call that carries the new version
    assert names(bob) == ["bio-1", "hep-1"] and dict(bob.vos()) == {"bio": 1, "hep": 1}


def test_permits_are_cached_and_denials_are_not(site, grid_pki):
    alice = site.repository(grid_pki.alice.proxy)
    alice.register(descriptor("cached", "bio"), upload=site.upload("c.img", grid_pki.alice.dn))
    for _ in range(5):
        alice.show("bio/cached")
    assert len(decisions(site, grid_pki.alice.dn, "image.read")) == 1
    bob = site.repository(grid_pki.bob.proxy)
    for _ in range(5):
        with pytest.raises(AccessDenied):
            bob.show("bio/cached")
    assert len(decisions(site, grid_pki.bob.dn, "image.read")) == 5
    assert {r["by"] for r in decisions(site, grid_pki.bob.dn, "image.read")} == {grid_pki.host.subject}


def test_a_bulk_import_is_decided_descriptor_by_descriptor_in_one_batch(site, grid_pki):
    """ImportImages through the Authorization service: the repository asks AuthorizeMany, and the service
    decides and audits every descriptor as Authorize would (one refused descriptor refuses the import and
    names it; nothing of it is registered)."""
    from services.descriptor import set_field

    alice = site.repository(grid_pki.alice.proxy)
    ws = alice.register(descriptor("seed", "bio"), upload=site.upload("seed.img", grid_pki.alice.dn))
    sha256 = ws.findtext("{*}image/{*}sha256")

    def variant(name: str, vo: str = "bio", memory: int = 256):
        d = descriptor(name, vo, memory=memory)
        set_field(d, "image", "sha256", sha256)
        return d

    before = len(decisions(site, grid_pki.alice.dn, "image.register"))
    ids = alice.import_images([variant(f"bulk-{i:02d}", memory=256 * (1 + i % 3)) for i in range(12)])
    assert len(set(ids)) == 12
    audited = decisions(site, grid_pki.alice.dn, "image.register")[before:]
    assert sorted(r["resource"]["name"] for r in audited) == [f"bulk-{i:02d}" for i in range(12)]
    assert all(r["decision"] == "permit" and r["context"]["source"] == "import" for r in audited)

    with pytest.raises(AccessDenied) as info:          # hep is not alice's VO: the fifth descriptor is refused
        alice.import_images([variant(f"more-{i}", "hep" if i == 4 else "bio") for i in range(8)])
    assert "descriptor 5 (hep/more-4)" in info.value.description and info.value.rule == "default-deny"
    assert [r["decision"] for r in decisions(site, grid_pki.alice.dn, "image.register")[-8:]].count("deny") == 1
    assert alice.query(["name contains more-"]).total == 0
