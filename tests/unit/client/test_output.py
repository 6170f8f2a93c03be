"""client/output.py writes to the sys.stdout of the moment (a CLI run in-process with its output
captured, e.g. contextlib.redirect_stdout, sees every line)."""
from __future__ import annotations

import contextlib
import io

from client.output import table


def test_table_writes_to_the_current_stdout():
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        table(["name", "state"], [["vm1", "Running"], ["vm22", None]])
    assert captured.getvalue().splitlines() == ["NAME  STATE", "vm1   Running", "vm22"]


def test_table_writes_to_the_stream_it_is_given():
    out = io.StringIO()
    table(["a"], [[1]], out=out)
    assert out.getvalue() == "A\n1\n"
