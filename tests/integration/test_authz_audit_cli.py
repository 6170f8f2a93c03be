"""`vmgrid authz audit` as docs/authz.md ("The audit log") shows it, against a real Authorization service
(`vmgrid serve authz`, client/localgrid.py): the table of refused callers (`--event access`) says why each was
refused, and a count of refusals says how many it stands for, which record they repeat and when the last came
(trial14 U10: 6 refusals were 3 plain `refused` rows, the reason and the count only in --json)."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from client.cli import main
from client.localgrid import LocalGrid
from tests.integration.test_doc_commands import ROOT, marked_block
from tests.unit.authz.authz_support import policy_text

pytestmark = pytest.mark.timeout(180)


def vmgrid(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_audit_table_shows_each_refusals_reason_and_a_counts_size(tmp_path, capsys, monkeypatch):
    block = marked_block(ROOT / "docs" / "authz.md", "vmgrid authz audit", "tests/integration/test_authz_audit_cli.py")
    commands = [ln for ln in block.splitlines() if ln.strip()]
    assert commands == ["vmgrid authz audit --event access"], block
    with LocalGrid(tmp_path / "grid") as grid:
        admin, alice, bob = grid.user("site-admin"), grid.user("alice"), grid.user("bob")
        policy = tmp_path / "policy.toml"
        policy.write_text(policy_text(admins=[admin.dn], groups={"bio": {"members": [alice.dn]}}))
        authz = grid.start("authz", ["authz"], {"authz": {"policy": str(policy), "reload_interval": 0}})
        monkeypatch.setenv("VMGRID_AUTHZ", authz.base_url + "/wsrf/services/AuthorizationService")
        monkeypatch.setenv("X509_CERT_DIR", str(grid.cert_dir))

        def az(user, *argv):
            monkeypatch.setenv("X509_USER_PROXY", str(user.proxy_path))
            return vmgrid(capsys, "authz", *argv)

        # alice asks about another subject 4 times (only enforcement points may: refused, the first written at
        # once, the next 3 counted) and tries to add a rule once (not a policy admin: refused, written)
        for _ in range(4):
            assert az(alice, "check", bob.dn, "image.read", "type=image", "vo=bio")[0] == 1
        code, _, err = az(alice, "add", "rule", "mine", "--effect", "permit", "-s", "*", "-a", "vm.*")
        assert code == 1, err
        # the counts are written when their minute ends or when the service stops: stopped cleanly, started again
        assert grid.stop("authz") == 0
        grid.restart(authz)

        code, out, err = az(admin, *shlex.split(commands[0])[2:])       # "vmgrid authz" is az's
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split() == ["TIME", "EVENT", "BY", "SUBJECT", "WHAT", "ON", "OUTCOME", "RULE", "REASON"], out
        authorize = [r for r in rows if "Authorize" in r]
        add_rule = [r for r in rows if "AddRule" in r]
        assert len(authorize) == 2 and len(add_rule) == 1, out
        first, count = authorize
        why = first.split("  refused  ", 1)[1].strip()                     # the first: refused, and why
        assert "enforcement" in why, out
        seq = re.search(r"  refused x3 \(as #(\d+), last \d\d:\d\d:\d\d\)  ", count)
        assert seq, out                                                     # the count: 3 more, as the first
        assert count.endswith(why), out                                     # for the same reason
        assert "policy admin" in add_rule[0].split("  refused  ", 1)[1], out

        code, out, _ = az(admin, "audit", "--event", "access", "--json")
        assert code == 0
        records = json.loads(out)
        assert int(seq.group(1)) == next(r["seq"] for r in records
                                         if r.get("operation") == "Authorize" and not r.get("repeated"))
