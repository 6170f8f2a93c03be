"""Every command block that README.md and docs/*.md show names the test that runs it as written.

A command block is a fenced block tagged sh, bash, console or shell; an untagged fenced block whose first line is
a command (`vmgrid ...`, `.venv/bin/...`, `./run.sh ...`, `$ ...`); or an indented block of such lines. The
nearest non-blank line above it must be a marker

    <!-- run as written by tests/PATH.py [and tests/OTHER.py] [(how)] -->

whose test files exist and name the doc (its file name: "images.md"; "README" for README.md), or read every doc
(`.glob("*.md")`: the bench and test-suite command scanners). A synopsis (every command line has an optional
part in brackets or a placeholder in capitals, e.g. `vmgrid ca init [--dn DN]`, or the line above calls it a
synopsis) is not a command and needs no
marker. The only blocks shown and not run are listed in NOT_RUN with the reason the doc gives its reader; a new
one fails here until a test runs it or it is listed (in review). So a block added without a test, a test
renamed or deleted, or a test that stops reading the doc is caught at once.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"sh", "bash", "console", "shell"}
COMMAND = re.compile(r"^(?:\$ )?(?:sudo )?(?:vmgrid |\.venv/bin/|\./run\.sh\b)")
MARKER = re.compile(r"^<!-- run as written by (tests/[\w/.-]+\.py)((?: and tests/[\w/.-]+\.py)*)\b[^>]*-->$")
# (doc, the block's first line): why it is shown and not run; the doc says so where it shows it
NOT_RUN = {
    ("docs/gridftp.md", "$ vmgrid transfer gsiftp://repo.example.org/images/debian.qcow2 /var/cache/vmgrid/ -p 8"):
        "a transcript from a site's repository host (its output shown); README's 'More commands' run "
        "`vmgrid transfer` as written against the recipe's repository",
}


def command_blocks(doc: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, the nearest non-blank line above, the block's lines) for each command block of ``doc``."""
    lines = doc.read_text().splitlines()
    found, i = [], 0

    def above(n: int) -> str:
        k = n - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        return lines[k].strip() if k >= 0 else ""

    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body = lines[i + 1:j]
            first = next((b for b in body if b.strip()), "")
            if fence.group(1) in SHELL_TAGS or (not fence.group(1) and COMMAND.match(first)):
                found.append((i + 1, above(i), body))
            i = j + 1
            continue
        if lines[i].startswith("    ") and COMMAND.match(lines[i][4:]) and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and lines[j].startswith("    "):
                j += 1
            found.append((i + 1, above(i), [b[4:] for b in lines[i:j]]))
            i = j
            continue
        i += 1
    return found


def is_synopsis(above: str, body: list[str]) -> bool:
    """Every command line a synopsis line, or the doc calls the block one just above it."""
    commands = [b for b in body if COMMAND.match(b)]
    return bool(commands) and ("synopsis" in above.lower() or all(
        re.search(r"\[[^\]]+\]|\b[A-Z]{2,}\b", c.split("#")[0]) for c in commands))


def test_the_docs_have_command_blocks_to_check():
    assert sum(len(command_blocks(d)) for d in DOCS) >= 40


def test_every_command_block_names_an_existing_test_that_reads_its_doc():
    problems = []
    for doc in DOCS:
        name = doc.relative_to(ROOT).as_posix()
        for line, marker, body in command_blocks(doc):
            first = next((b for b in body if b.strip()), "")
            if (name, first) in NOT_RUN:
                continue
            m = MARKER.match(marker)
            if not m:
                if not is_synopsis(marker, body):
                    problems.append(f"{name}:{line}: `{first}`: no '<!-- run as written by tests/... -->' above it")
                continue
            for test in [m.group(1), *re.findall(r"tests/[\w/.-]+\.py", m.group(2))]:
                path = ROOT / test
                if not path.is_file():
                    problems.append(f"{name}:{line}: its marker names {test}, which does not exist")
                    continue
                text = path.read_text()
                if doc.name not in text and not (doc.name == "README.md" and "README" in text) \
                        and '.glob("*.md")' not in text:
                    problems.append(f"{name}:{line}: {test} does not read {name}")
    assert not problems, "\n".join(problems)


def test_a_block_listed_as_not_run_is_still_shown():
    shown = {(d.relative_to(ROOT).as_posix(), next((b for b in body if b.strip()), ""))
             for d in DOCS for _, _, body in command_blocks(d)}
    assert set(NOT_RUN) <= shown, set(NOT_RUN) - shown


def test_the_checker_finds_an_unmarked_block_and_a_marker_naming_a_missing_test(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run:\n\n```sh\nvmgrid repo vos\n```\n\n<!-- run as written by tests/nope.py -->\n```sh\n"
                   "vmgrid vm list\n```\n\nText:\n\n    .venv/bin/python -m pytest tests/unit -q\n\n"
                   "```\nvmgrid ca init [--dn DN]\n```\n")
    blocks = command_blocks(doc)
    assert [(n, MARKER.match(m) is not None) for n, m, _ in blocks] == [(3, False), (8, True), (14, False),
                                                                         (16, False)]
    assert [is_synopsis(m, b) for _, m, b in blocks] == [False, False, False, True]
