"""The Authorization service as a site runs it: `vmgrid serve authz` and `vmgrid serve repository` as
their own processes (client/localgrid.py), the repository configured with [enforcement] authz_url;
`vmgrid authz ...` commands against them; the policy reloaded on SIGHUP (a valid change takes effect,
an invalid one is refused and the old policy stays); the repository refusing everything once the
Authorization service is gone."""
from __future__ import annotations

import signal
import time

import pytest

from client.cli import main
from client.localgrid import LocalGrid
from tests.unit.authz.authz_support import policy_text

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def grid(tmp_path):
    with LocalGrid(tmp_path / "grid") as g:
        yield g


def vmgrid(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def eventually(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.1)


def test_a_site_with_the_authorization_service(grid, tmp_path, capsys):
    admin, alice, bob = grid.user("site-admin"), grid.user("alice"), grid.user("bob")
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(admins=[admin.dn], groups={"bio": {"members": [alice.dn]}}))
    authz = grid.start("authz", ["authz"], {"authz": {"policy": str(policy), "reload_interval": 0}})
    authz_url = authz.base_url + "/wsrf/services/AuthorizationService"
    repo = grid.start("repository", ["repository"], {"enforcement": {"authz_url": authz_url, "permit_ttl": 0}})
    repo_url = repo.base_url + "/wsrf/services/VMRepositoryService"

    def az(user, *argv):
        return vmgrid(capsys, "authz", *argv, "--url", authz_url, "--cert-dir", grid.cert_dir,
                      "--proxy", user.proxy_path)

    image = ["type=image", "vo=bio", f"owner={admin.dn}"]
    code, out, _ = az(alice, "check", "me", "image.read", *image)
    assert code == 0 and out.startswith("Permit  rule vo-members-use-images") and "max_memory=8192" in out
    code, out, _ = az(alice, "check", "me", "vm.deploy", *image, "--context", "memory=16384")
    assert code == 3 and "memory 16384 MiB exceeds the limit of 8192 MiB" in out
    code, _, err = az(alice, "check", bob.dn, "image.read", *image)
    assert code == 1 and "AccessDenied" in err and "enforcement_points" in err
    code, out, _ = az(admin, "check", bob.dn, "image.read", *image)
    assert code == 3 and out.startswith("Deny  rule default-deny")

    code, _, err = az(alice, "rules")
    assert code == 1 and "not a policy admin" in err
    code, out, _ = az(admin, "rules")
    assert code == 0 and "limited-proxy-no-deploy" in out and "(first match wins; no match: deny)" in out

    code, out, _ = az(admin, "add", "member", "bio", bob.dn)
    assert code == 0 and f"added {bob.dn} to bio" in out
    assert az(admin, "check", bob.dn, "image.read", *image)[0] == 0
    code, out, _ = az(admin, "groups")
    assert code == 0 and bob.dn in out and alice.dn in out
    code, out, _ = az(bob, "groups", "me")
    assert code == 0 and "bio" in out

    code, _, err = az(admin, "add", "rule", "bad", "--effect", "permit", "-s", "group:physics", "-a", "vm.*")
    assert code == 1 and "refused:" in err and "unknown group 'physics'" in err and str(policy) in err
    code, out, _ = az(admin, "add", "rule", "no-pause", "--effect", "deny", "-s", "*", "-a", "vm.pause",
                      "-r", "vo=bio", "--before", "site-admins", "--description", "bio instances keep running")
    assert code == 0 and "before site-admins" in out
    assert 'id = "no-pause"' in policy.read_text()
    code, out, _ = az(admin, "audit", "--event", "admin", "--limit", "5")
    assert code == 0 and "AddRule" in out and "AddMember" in out
    assert az(admin, "remove", "rule", "no-pause")[0] == 0

    # the repository asks the service before every operation
    code, out, _ = vmgrid(capsys, "repo", "vos", "--url", repo_url, "--cert-dir", grid.cert_dir,
                          "--proxy", alice.proxy_path)
    assert code == 0 and "bio" in out

    # SIGHUP: a hand edit takes effect; an invalid one is refused and the old policy stays in force
    policy.write_text(policy.read_text().replace(f'  "{bob.dn}",\n', ""))
    assert az(admin, "check", bob.dn, "image.read", *image)[0] == 0      # not reloaded yet (no polling)
    authz.process.send_signal(signal.SIGHUP)
    eventually(lambda: az(admin, "check", bob.dn, "image.read", *image)[0] == 3)
    good = policy.read_text()
    policy.write_text(good.replace('effect = "deny"', 'effect = "refuse"', 1))
    authz.process.send_signal(signal.SIGHUP)
    eventually(lambda: "warning: the file changed into a policy that was refused" in az(admin, "rules")[1])
    code, out, _ = az(admin, "rules")
    assert "effect must be \"permit\" or \"deny\"" in out and "limited-proxy-no-deploy" in out
    assert az(alice, "check", "me", "image.read", *image)[0] == 0
    assert authz.process.poll() is None
    assert "policy refused" in authz.log.read_text()

    code, _, err = vmgrid(capsys, "authz", "validate", policy)
    assert code == 1 and f"{policy}:" in err and "effect must be" in err
    policy.write_text(good)
    assert vmgrid(capsys, "authz", "validate", policy)[0] == 0

    # fail closed: the Authorization service gone, the repository refuses
    grid.stop("authz")
    code, _, err = vmgrid(capsys, "repo", "query", "--url", repo_url, "--cert-dir", grid.cert_dir,
                          "--proxy", alice.proxy_path)
    assert code == 1 and "ServiceUnavailable" in err and authz_url in err
