"""`vmgrid ... | head`: a reader that leaves early ends the command quietly, without a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_a_reader_that_left_gets_no_traceback():
    read, write = os.pipe()
    os.close(read)                                   # `| head` that has already exited
    try:
        r = subprocess.run([sys.executable, "-m", "client.cli", "image", "check", "emboss"], stdout=write,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stderr == "" and r.returncode == 141


def test_the_same_command_to_a_reader_that_stays_prints_the_recipe():
    r = subprocess.run([sys.executable, "-m", "client.cli", "image", "check", "emboss"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "debian12-emboss" in r.stdout, r.stderr
