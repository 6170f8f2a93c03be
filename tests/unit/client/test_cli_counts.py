"""Counts printed by the command line agree with their noun ("1 group", not "1 groups")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def vmgrid(*args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_authz_validate_counts_one_group_as_one_group(tmp_path):
    vmgrid("authz", "init", "p.toml", "--admin", "/O=Grid/OU=site/CN=admin", cwd=tmp_path)
    assert " rules, 0 groups" in vmgrid("authz", "validate", "p.toml", cwd=tmp_path)
    policy = tmp_path / "p.toml"
    policy.write_text(policy.read_text().replace(
        '# [groups.bio]\n# description = "bioinformatics VO"\n# members = ["/O=Grid/OU=vmgrid/CN=alice"]\n',
        '[groups.bio]\ndescription = "bioinformatics VO"\nmembers = ["/O=Grid/OU=vmgrid/CN=alice"]\n'))
    assert vmgrid("authz", "validate", "p.toml", cwd=tmp_path).endswith(" rules, 1 group\n")
