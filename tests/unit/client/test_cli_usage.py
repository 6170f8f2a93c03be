"""A mistyped option gets the usage of the command it was given to, not the top-level one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("args, prog", [
    (["vm", "deploy", "bio/x", "run1", "--lifetme", "2h"], "vmgrid vm deploy"),
    (["job", "wait", "https://h/", "job-1", "--timeot", "3"], "vmgrid job wait"),
    (["transfer", "ftp://h/a", "b", "--paralel", "4"], "vmgrid transfer"),
    (["--bogus"], "vmgrid"),
])
def test_a_mistyped_option_names_its_command(args, prog):
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith(f"usage: {prog} ")
    bad = args[-2] if args[-1].isdigit() or args[-1] == "2h" else args[-1]
    assert f"{prog}: error: unrecognized arguments: {bad}" in r.stderr
    assert f"(`{prog} --help` lists the options)" in r.stderr


def test_job_submits_usage_names_one_program_and_its_arguments():
    """`job submit` runs one program: its usage must not suggest several (`-- PROGRAM ARGS [-- PROGRAM ARGS ...]`)
    (trial12 T5)."""
    r = subprocess.run([sys.executable, "-m", "client.cli", "job", "submit", "--help"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    usage = " ".join(r.stdout.split("\n\n")[0].split())
    assert usage.endswith(" endpoint -- PROGRAM [ARG ...]"), usage
    assert "[-- PROGRAM" not in r.stdout


def test_a_missing_argument_is_named_without_the_optional_ones_after_it():
    """argparse names an optional trailing NAME=VALUE list (nargs="*") among the missing arguments unless it has a
    default: `vmgrid authz check me` said "required: action, NAME=VALUE" (as `job get` did: trial13 U7)."""
    r = subprocess.run([sys.executable, "-m", "client.cli", "authz", "check", "me"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "vmgrid authz check: error: the following arguments are required: action"
