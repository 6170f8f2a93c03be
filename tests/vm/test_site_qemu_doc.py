"""docs/vmmanager-qemu.md's "A site's node whose guests run jobs", run as written: README's site recipe (its
fenced block, unchanged) up to its last line, the doc's node example saved as q1.toml, the doc's block (a QEMU
node in bridge mode with a guest CA: the EMBOSS image built or reused, registered, deployed, tmap submitted by
instance name through the guest's job service, the result and its plot fetched, destroyed), then the recipe's last line; by
bash -e in a network namespace of its own (`unshare --net`: the recipe's fixed ports and the node's bridge
vmgridbr1 stay off this machine). One guest; the EMBOSS image is the one tests/vm/test_demo_real_qemu.py
boots (built before the namespace, which has no Debian mirror: the block's `image build` finds it cached)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from images import real_demo_enabled
from tests.fixtures.namespaces import run_recipe_in_net_namespace, vmgrid_command

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "vmmanager-qemu.md"
SITE = "<!-- run as written by tests/integration/test_site_recipe.py"     # its first block: the recipe
MARK = "<!-- run as written by tests/vm/test_site_qemu_doc.py"
pytestmark = [pytest.mark.skipif(not real_demo_enabled(), reason="VMGRID_TEST_REAL_DEMO=0: the EMBOSS image is "
                                                                "not built in this run"),
              pytest.mark.timeout(2400)]


def fenced(text: str, marker: str, lang: str = "sh") -> str:
    m = re.search(re.escape(marker) + r"[^>]*-->\n```" + lang + r"\n(.*?)```", text, re.S)
    assert m, f"lost the block after {marker!r}"
    return m.group(1)


@pytest.fixture
def short_tmp():
    """A short working directory: the node's QEMU root and guest channel sockets must stay under 108 bytes."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vq-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_site_node_whose_guests_run_jobs_runs_as_written(qemu_prerequisites, short_tmp):
    from guestd.image.build import build

    tmp_path = short_tmp
    build(recipe="emboss", log=lambda m: print(m, file=sys.stderr))     # cached unless the recipe changed
    doc = DOC.read_text()
    site = fenced((REPO / "README.md").read_text(), SITE).rstrip("\n").split("\n")
    assert site[-1].startswith("kill $NODE1 $CENTRAL"), site[-1]
    block = fenced(doc, MARK)
    q1 = re.search(r"## A site's node whose guests run jobs\n.*?```toml\n(.*?)```", doc, re.S)
    assert q1 and "with the example above saved as `q1.toml`" in doc
    work = tmp_path / "c"      # the recipe runs in a checkout (it reads wsdl/examples/), here a short one
    vmgrid_command(work / ".venv" / "bin")
    (work / "wsdl").symlink_to(REPO / "wsdl")
    (work / "q1.toml").write_text(q1.group(1))
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home), "LANG": "C.UTF-8"}
    r = run_recipe_in_net_namespace(work, "\n".join(site[:-1]) + "\ncp ../q1.toml q1.toml\n" + block + site[-1] + "\n",
                                    env, timeout=1800)
    out, err = r.stdout, r.stderr
    site_dir = work / "site"
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in site_dir.glob("*.log"))
    assert r.returncode == 0, out[-4000:] + err[-6000:] + logs
    assert re.search(r"jobs\s+https://10\.123\.0\.1\d:8443/wsrf/services/JobService\s+\(/O=Grid/OU=vmgrid-guests/"
                     r"CN=host/10\.123\.0\.1\d\)", out), out[-4000:]             # vm status: the guest's job service
    tmap = (site_dir / "tmap-results" / "bR.tmap").read_text()
    assert "Program: tmap" in tmap and re.search(r"^\s*\d+\s+\d+\s", tmap, re.M), tmap   # its segments
    assert (site_dir / "tmap-results" / "bR.1.png").read_bytes()[:4] == b"\x89PNG"     # its plot, a stage-out
    assert "seq1: destroyed" in out
    q1 = (site_dir / "q1.log").read_text()
    assert '"operation":"Destroy"' in q1 and "Traceback" not in q1
