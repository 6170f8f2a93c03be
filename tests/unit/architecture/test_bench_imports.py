"""Every name bench/ imports from vmgrid's own packages, and from the other benches, exists, in function bodies too.

The benches take minutes and most run only on request (tests/integration/test_doc_bench_commands.py,
VMGRID_TEST_BENCH=1), so an import inside a bench's function outlived the function it named: `bench_vmmanager.py
--only wan` failed at once with ImportError (imagecache.file_sha256, gone since 860fb13) and nothing noticed."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
OWN = ("services", "security", "gridftp", "client", "guestd")
BENCHES = {p.stem for p in (ROOT / "bench").glob("*.py")}      # `from benchgrid import ...`: bench/ is on sys.path


def imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in OWN + tuple(BENCHES):
                found += [(f"{path.name}:{node.lineno}", node.module, a.name) for a in node.names]
    return found


IMPORTS = imports()


def test_the_benches_import_vmgrid():
    assert len(IMPORTS) > 20


@pytest.mark.parametrize("where,module,name", IMPORTS, ids=[f"{w} {m}.{n}" for w, m, n in IMPORTS])
def test_each_name_a_bench_imports_exists(where, module, name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    imported = importlib.import_module(module)
    if name != "*" and not hasattr(imported, name):
        importlib.import_module(f"{module}.{name}")        # a submodule: ImportError names it
