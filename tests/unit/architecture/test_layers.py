"""The package boundaries of DESIGN.md hold: imports point down the layers (the import-linter contract in
pyproject.toml), and a container that hosts only the Authorization service loads no libvirt or numpy."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_imports_point_down_the_layers():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency (pyproject.toml [test])"
    r = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout


def test_the_contract_catches_a_wrong_way_import(tmp_path):
    """The same contract over a copy of the tree with one import pointing up (security -> client) is broken."""
    for name in ("services", "security", "gridftp", "client", "guestd"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "security" / "upward.py").write_text("from client.cli import main\n")
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    r = subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0, r.stdout[-3000:]
    assert "security.upward -> client.cli" in r.stdout, r.stdout[-3000:]


def test_serving_authz_loads_no_libvirt_and_no_numpy(tmp_path):
    code = (
        "import sys\n"
        "from services.container.config import load_config\n"
        "from services.container.assemble import build_service\n"
        f"cfg = load_config(None); cfg.container.state_dir = {str(tmp_path)!r}\n"
        "build_service('authz', cfg).close()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('libvirt', 'libvirtmod', 'numpy'))\n"
        "print(' '.join(heavy))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "", f"vmgrid serve authz imported: {r.stdout.strip()}"
