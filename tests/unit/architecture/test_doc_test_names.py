"""Every test README.md and docs/*.md name exists under tests/, where they say it is.

A name is a word `test_…` of the text (prose, code spans and blocks alike): a test function or class (`def test_…`,
`class Test…`) or a test module (`test_….py`, or its stem) somewhere under tests/; written as `PATH::test_…`, the
function must be defined in that file. A name ending in `*` is a pattern (`test_gridftp_*`), not checked. A doc that
keeps the record of a change left out names its tests in words, not by a name a reader would look for in vain.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAME = re.compile(r"(?<![\w/.-])(?:(?P<path>tests/[\w/.-]+\.py)::)?(?P<name>test_\w+)(?P<py>\.py)?(?P<star>\*)?")
DEFINED = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)|^\s*class\s+(Test\w+)", re.M)


@lru_cache(maxsize=None)
def defined_in(path: Path) -> frozenset[str]:
    return frozenset(a or b for a, b in DEFINED.findall(path.read_text(errors="replace")))


@lru_cache(maxsize=None)
def all_tests() -> tuple[frozenset[str], frozenset[str]]:
    """(the names defined by any file under tests/, the stems of its test modules)."""
    files = sorted((ROOT / "tests").rglob("*.py"))
    return frozenset().union(*(defined_in(f) for f in files)), frozenset(f.stem for f in files)


def missing_names(doc: Path) -> list[str]:
    """"doc:line: name" for each test the doc names that is not where it says."""
    defined, modules = all_tests()
    problems = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for m in NAME.finditer(line):
            name = m["name"]
            if m["star"]:
                continue
            if m["py"]:
                ok = name in modules
            elif m["path"]:
                ok = (ROOT / m["path"]).is_file() and name in defined_in(ROOT / m["path"])
            else:
                ok = name in defined or name in modules
            if not ok:
                where = f"{m['path']}::{name}" if m["path"] else name + (m["py"] or "")
                problems.append(f"{doc.name}:{number}: {where}")
    return problems


def test_every_test_the_docs_name_exists():
    problems = [p for doc in DOCS for p in missing_names(doc)]
    assert not problems, "tests named in the docs that do not exist:\n" + "\n".join(problems)


def test_the_docs_name_tests():
    """The check reads something: the docs name many tests (so a changed pattern cannot pass by finding none)."""
    named = {m["name"] for doc in DOCS for line in doc.read_text().splitlines() for m in NAME.finditer(line)}
    assert len(named) >= 50, len(named)


def test_the_check_reports_a_missing_test_a_wrong_file_and_a_missing_module(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("\n".join([
        "Shown by `tests/unit/architecture/test_doc_test_names.py::test_every_test_the_docs_name_exists` and",
        "test_the_docs_name_tests, in test_doc_test_names.py; the `test_gridftp_*` tests.",
        "Not: `tests/unit/architecture/test_layers.py::test_every_test_the_docs_name_exists`,",
        "test_a_name_no_one_wrote, test_nowhere.py.",
    ]))
    assert missing_names(doc) == [
        "x.md:3: tests/unit/architecture/test_layers.py::test_every_test_the_docs_name_exists",
        "x.md:4: test_a_name_no_one_wrote",
        "x.md:4: test_nowhere.py",
    ]
