"""Hashing files another party may change meanwhile (CKSM of a served file, a job's outputs): a file truncated
while it is hashed is an error for that one request, never the end of the process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# the hasher's first update truncates the file: what a job's process (or any writer) can do while the
# server answers a CKSM of it
CUT_WHILE_HASHING = textwrap.dedent("""
    import importlib, os, sys

    checksum = importlib.import_module("gridftp.checksum")     # (gridftp.checksum is also a function's name)

    path = sys.argv[1]
    plain = checksum.ALGORITHMS["SHA256"]

    class Cutting:
        def __init__(self):
            self.h, self.cut = plain(), False

        def update(self, data):
            if not self.cut:
                os.truncate(path, 0)
                self.cut = True
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    checksum.ALGORITHMS["SHA256"] = Cutting
    try:
        print("digest", checksum.hash_file(path, "SHA256"))
    except OSError as exc:
        print("refused:", exc.strerror)
""")


def test_a_file_truncated_while_it_is_hashed_is_an_error_not_a_dead_process(tmp_path):
    """hash_file mapped the file (mmap): reading a mapped page past a new end of file is SIGBUS, and the
    server (a job service whose job truncates its output during a CKSM) died with it."""
    f = tmp_path / "output"
    f.write_bytes(os.urandom(1 << 20) * 12)
    run = subprocess.run([sys.executable, "-c", CUT_WHILE_HASHING, str(f)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"the hashing process ended with {run.returncode}: {run.stderr[-500:]}"
    assert run.stdout.startswith("refused: the file shrank to")
