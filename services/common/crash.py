"""Fault injection for the crash tests: the process SIGKILLs itself at a named point, or holds there.

Both are off unless a test sets the environment: ``VMGRID_CRASHPOINT=name`` kills the process at that
point; ``VMGRID_STALLDIR=dir`` holds the thread that reaches the point named in ``dir/point`` (read at each
point, so one process serves several cases) until the test removes ``dir/point``: the test learns that the
point was reached from ``dir/reached`` and does what it kills meanwhile (a client, a peer)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STALL_LIMIT = 120.0      # seconds: a stalled point goes on by itself after this, so a failed test never wedges a node


def crashpoint(name: str) -> None:
    """SIGKILL this process when VMGRID_CRASHPOINT names this point; hold it while VMGRID_STALLDIR says so."""
    if os.environ.get("VMGRID_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    stall = os.environ.get("VMGRID_STALLDIR")
    if stall:
        _stall(Path(stall), name)


def _stall(directory: Path, name: str) -> None:
    point = directory / "point"
    try:
        if point.read_text().strip() != name:
            return
    except OSError:
        return
    (directory / "reached").write_text(name)
    deadline = time.monotonic() + STALL_LIMIT
    while point.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
