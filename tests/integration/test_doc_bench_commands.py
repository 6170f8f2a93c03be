"""Every benchmark command that README.md and docs/ show, as written.

Each command's script exists and knows every option the docs give it (its --help names them). The
quick ones (seconds: QUICK) run here as written, from the repository root, and must print a ratio against
their peer and leave nothing in their TMPDIR; `--instructions` where perf cannot count instructions (a VM without
the counter) runs and is skipped on its message. The rest take minutes each and some need root (network namespaces, the emulated WAN): they run as
written when VMGRID_TEST_BENCH=1 is in the environment of the test run.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK = {"bench/bench_channel_flood.py", "bench/bench_jobs.py",     # seconds, not minutes
         "bench/bench_authz.py", "bench/profile_signing.py"}
COMMAND = re.compile(r"(?:sudo )?\.venv/bin/python bench/[\w./-]+\.py[^`\n#|]*")
PLACEHOLDER = re.compile(r"\s[A-Z]{2,}(?=\s|$)")          # `--existing DIR`: the reader puts a path there


def documented() -> list[tuple[str, str]]:
    """(where, command) for every bench command in README.md and docs/*.md, once each."""
    seen: dict[str, str] = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in COMMAND.finditer(line):
                seen.setdefault(m.group(0).strip(), f"{doc.relative_to(ROOT)}:{n}")
    return sorted((where, cmd) for cmd, where in seen.items())


COMMANDS = documented()


@lru_cache(maxsize=None)
def usage_of(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv/bin/python"), script, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_docs_show_benchmark_commands():
    assert len(COMMANDS) >= 5, COMMANDS


@pytest.mark.parametrize("where,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_a_documented_bench_command_names_a_script_and_options_that_exist(where, command):
    words = shlex.split(command.replace("[", " ").replace("]", " "))     # a synopsis: [--option value]
    assert words[0] != "sudo", f"{where}: `{command}`: sudo is not on every machine (say 'as root' instead)"
    script = next(w for w in words if w.startswith("bench/"))
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    usage = usage_of(script)
    assert usage.returncode == 0, f"{where}: {script} --help: {usage.stderr[-2000:]}"
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert option in usage.stdout, f"{where}: {script} has no option {option}"


@pytest.mark.slow
@pytest.mark.timeout(3600)          # as the command's own: the whole GridFTP bench (WAN included) takes longer than 300 s
@pytest.mark.parametrize("where,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_a_documented_bench_command_runs_as_written(where, command):
    if "[" in command or PLACEHOLDER.search(command):
        pytest.skip("a synopsis (optional parts in brackets, or a placeholder such as DIR), not a command: its "
                    "options are checked above")
    script = next(w for w in shlex.split(command) if w.startswith("bench/"))
    if script not in QUICK and os.environ.get("VMGRID_TEST_BENCH") != "1":
        pytest.skip("opt-in: VMGRID_TEST_BENCH=1 (minutes; root and the emulated WAN)")
    scratch = Path(tempfile.mkdtemp(prefix="vgb-", dir="/tmp"))      # the command's TMPDIR: short (sockets)
    try:
        r = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                           env={**os.environ, "TMPDIR": str(scratch)})
        left = sorted(p.name for p in scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if r.returncode != 0 and "perf cannot count user-space instructions on this machine" in r.stderr:
        pytest.skip("perf cannot count instructions on this machine (the command ran and said so)")
    assert r.returncode == 0, f"{where}: `{command}`\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert re.search(r"\d\s*x|x peer|ratio", r.stdout), f"{where}: `{command}` printed no ratio:\n{r.stdout[-2000:]}"
    # A bench run on a site's machine, or in CI, leaves no scratch behind (one left 240 MB in /tmp per run).
    assert not left, f"{where}: `{command}` left {left} in its TMPDIR"
