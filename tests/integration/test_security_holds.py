"""Image holds follow the policy (issue 9.6): HoldImage is authorized with the duration asked for in the
context, a hold lasts at most the permit's max_lifetime, and the default policy gives holds to an image's
owner, its VO's admins and nodes (host credentials) only. Real containers on loopback, the repository
asking the Authorization service over signed SOAP."""
from __future__ import annotations

import time
from datetime import datetime

import pytest

from services.faults import AccessDenied, ImageInUse
from tests.fixtures.pki import grid_pki  # noqa: F401
from tests.unit.authz.authz_support import AuthzSite, descriptor, grid_user, policy_text

pytestmark = pytest.mark.timeout(120)

WEEK = 7 * 24 * 3600
HOUR = 3600


@pytest.fixture
def site(grid_pki, tmp_path):
    carol, dave = grid_user(grid_pki, "carol"), grid_user(grid_pki, "dave")
    s = AuthzSite(grid_pki, tmp_path, policy_text(admins=[grid_pki.admin.dn], limits={"max_lifetime": "1h"}, groups={
        "bio": {"members": [grid_pki.alice.dn, dave.dn], "admins": [carol.dn]},
    }), repository=True)
    s.carol, s.dave = carol, dave
    yield s
    s.close()


def seconds_left(expires: str) -> float:
    return datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() - time.time()


def test_a_vo_member_cannot_pin_anothers_image_and_the_owner_can_still_remove_it(site, grid_pki):
    alice = site.repository(grid_pki.alice.proxy)
    alice.register(descriptor("blast", "bio"), upload=site.upload("blast.img", grid_pki.alice.dn))
    dave = site.repository(site.dave.proxy)
    with pytest.raises(AccessDenied) as info:
        dave.hold("bio/blast", "dave-pins-it", WEEK)
    assert (info.value.action, info.value.rule) == ("image.hold", "default-deny")
    alice.remove("bio/blast")          # nothing holds it


def test_holds_last_at_most_max_lifetime_for_owner_admin_and_node(site, grid_pki):
    alice = site.repository(grid_pki.alice.proxy)
    alice.register(descriptor("blast", "bio"), upload=site.upload("blast.img", grid_pki.alice.dn))
    holds = []
    for credential in (grid_pki.alice.proxy, site.carol.proxy, grid_pki.host):
        hold_id, expires = site.repository(credential).hold("bio/blast", "instance-1", WEEK)
        assert 0 < seconds_left(expires) <= HOUR
        holds.append((credential, hold_id))
    record = [r for r in site.authority.audit.read(event="decision", limit=10000) if r["action"] == "image.hold"][-1]
    assert record["context"] == {"seconds": str(WEEK)}
    with pytest.raises(ImageInUse):
        alice.remove("bio/blast")
    for credential, hold_id in holds:
        assert site.repository(credential).release(hold_id)
    alice.remove("bio/blast")
