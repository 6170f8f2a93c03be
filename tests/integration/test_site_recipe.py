"""README's site recipe ("Using vmgrid at a site") run as written: its fenced block, unchanged, by bash -e in a
fresh directory, with `vmgrid` on PATH being this checkout's command line. It makes a CA, the host's and
two users' credentials, a policy with an admin, starts the central container and a node (libvirt's test
driver) as their own processes, has the admin make the VO group and the scientist register and deploy an
image. Then README's "More commands" block, as written too, in the same shell before the recipe's last line
(which stops the containers): the repository, VM, migration (a second node), report, authz, transfer and
job commands against that site. The recipe uses the site's fixed ports (8443, 8444, GridFTP 2811), so it runs in a network
namespace of its own (`unshare --net`, only its loopback up): nothing else on this machine can collide
with it, and it reaches nothing but itself."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.namespaces import can_unshare, run_recipe_in_net_namespace, vmgrid_command

pytestmark = pytest.mark.timeout(700)
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PY = sys.executable
MARK = "<!-- run as written by tests/integration/test_site_recipe.py -->"
MORE = "<!-- run as written by tests/integration/test_site_recipe.py, after the site recipe -->"


def recipe(mark: str = MARK) -> str:
    m = re.search(re.escape(mark) + r"\n```sh\n(.*?)```", README.read_text(), re.S)
    assert m, f"README.md lost its tested block {mark}"
    return m.group(1)


def recipe_and_more_commands() -> str:
    """The site recipe up to its last line (the containers' kill), the More commands, that last line."""
    site = recipe().rstrip("\n").split("\n")
    assert site[-1].startswith("kill $NODE1 $CENTRAL"), site[-1]
    return "\n".join(site[:-1]) + "\n" + recipe(MORE) + site[-1] + "\n"


def vmgrid_on_path(tmp_path: Path) -> Path:
    """`vmgrid` where ./run.sh setup puts it, `.venv/bin` of the checkout: the recipe's first line must put it on
    PATH (the test's own PATH does not have it)."""
    return vmgrid_command(tmp_path / ".venv" / "bin")


@pytest.mark.skipif(not can_unshare("--net"), reason="needs `unshare --net` (root): the recipe's fixed ports "
                                                         "must not meet other services on this machine")
def test_the_site_recipe_and_the_more_commands_of_the_readme_run_as_written(tmp_path):
    work = tmp_path / "checkout"             # the recipe runs in a checkout: it reads wsdl/examples/
    work.mkdir()
    vmgrid_on_path(work)
    (work / "wsdl").symlink_to(REPO / "wsdl")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home),
           "LANG": "C.UTF-8",             # nothing of the test's own grid: no X509_* variables
           # the test process's registry of job services' uid ranges (tests/conftest.py), not the host's
           "VMGRID_JOB_UID_REGISTRY": os.environ["VMGRID_JOB_UID_REGISTRY"]}
    r = run_recipe_in_net_namespace(work, recipe_and_more_commands(), env, timeout=600)
    out, err = r.stdout, r.stderr
    site = work / "site"
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in site.glob("*.log"))
    assert r.returncode == 0, out + err + logs
    assert '"/O=Grid/OU=mysite/CN=admin"' in (site / "policy.toml").read_text()
    assert "bio" in out and "/O=Grid/OU=mysite/CN=alice" in out            # vmgrid authz groups
    assert "bio/emboss-placeholder" in out                                  # registered by --name, found by the query
    assert "bio/debian12-emboss" not in out                 # the recipe's name is the built EMBOSS image's (images.md)
    assert "blast-run" in out and "Running" in out                          # deployed by alice, listed
    assert "destroyed" in out
    assert "vmgrid: serving AuthorizationService, VMRepositoryService" in (site / "central.log").read_text()
    assert "vmgrid: serving VMManagerService" in (site / "node1.log").read_text()
    # the More commands
    assert "Your identity: /O=Grid/OU=mysite/CN=alice" in out                        # grid-proxy-init
    assert (site / "phases.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"           # vmgrid report
    assert (site / "image.qcow2").read_bytes() == (site / "images" / "placeholder.qcow2").read_bytes()  # transfer
    assert (site / "results" / "sorted.txt").read_text() == "acgt\ngattaca\ntata\n"    # job submit/wait/get
    assert "8192" in (site / "descriptors" / "placeholder-8g.xml").read_text()
    node2 = (site / "node2.log").read_text()
    ranges = [re.search(r'^lease_range = "([^"]+)"', (site / f"{n}.toml").read_text(), re.M).group(1)
              for n in ("node1", "node2")]
    assert ranges == ["10.99.0.10-10.99.0.129", "10.99.0.130-10.99.0.250"]     # one network, disjoint addresses
    assert '"operation":"Destroy","caller":"/O=Grid/OU=mysite/CN=alice"' in node2     # migrated, destroyed there


def test_authz_init_writes_the_default_policy_with_its_admins_and_refuses_to_overwrite(tmp_path):
    from services.authz.policy import load_policy

    policy = tmp_path / "policy.toml"
    cmd = [PY, "-m", "client.cli", "authz", "init", str(policy), "--admin", "/O=Grid/OU=mysite/CN=admin"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = load_policy(policy)
    assert loaded.admins == ("/O=Grid/OU=mysite/CN=admin",)
    assert any(rule.id == "vo-members-use-images" for rule in loaded.rules)   # the default rules
    before = policy.read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1 and r.stderr == f"vmgrid: {policy} exists (--force replaces it)\n"
    assert policy.read_text() == before


def test_the_migrate_command_of_docs_vmmanager_md_is_a_more_commands_line_the_recipe_test_runs():
    """docs/vmmanager.md shows `vmgrid vm migrate ...` against the recipe's second node: the same line as README's
    "More commands" (run above as written), so the doc's command is run as written there."""
    doc = (REPO / "docs" / "vmmanager.md").read_text()
    m = re.search(r"<!-- run as written by tests/integration/test_site_recipe\.py[^>]*-->\n```sh\n(.*?)```", doc, re.S)
    assert m, "docs/vmmanager.md lost its migrate block run by this test"
    more = [line.split("#")[0].strip() for line in recipe(MORE).splitlines()]
    for line in m.group(1).strip().splitlines():
        assert line.split("#")[0].strip() in more, f"docs/vmmanager.md's `{line}` is not in README's More commands"
