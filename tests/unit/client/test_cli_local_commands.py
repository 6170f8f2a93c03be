"""Commands that need no service, run as the `vmgrid` command: counts agree with their noun ("1 group", not
"1 groups"); a file that cannot be written is one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def vmgrid(*args: str, cwd: Path, status: int = 0) -> str:
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == status, r.stderr
    return r.stdout if status == 0 else r.stderr


def test_authz_validate_counts_one_group_as_one_group(tmp_path):
    vmgrid("authz", "init", "p.toml", "--admin", "/O=Grid/OU=site/CN=admin", cwd=tmp_path)
    assert " rules, 0 groups" in vmgrid("authz", "validate", "p.toml", cwd=tmp_path)
    policy = tmp_path / "p.toml"
    policy.write_text(policy.read_text().replace(
        '# [groups.bio]\n# description = "bioinformatics VO"\n# members = ["/O=Grid/OU=vmgrid/CN=alice"]\n',
        '[groups.bio]\ndescription = "bioinformatics VO"\nmembers = ["/O=Grid/OU=vmgrid/CN=alice"]\n'))
    assert vmgrid("authz", "validate", "p.toml", cwd=tmp_path).endswith(" rules, 1 group\n")


def test_authz_init_of_a_file_that_cannot_be_written_is_one_line(tmp_path):
    err = vmgrid("authz", "init", "/proc/policy.toml", "--admin", "/O=Grid/OU=site/CN=admin", cwd=tmp_path, status=1)
    assert err == "vmgrid: cannot write /proc/policy.toml: No such file or directory\n"
