"""Fault injection for the crash tests: the process SIGKILLs itself at a named point, or holds there.

Both are off unless a test sets the environment. ``VMGRID_CRASHPOINT=name`` kills the process at that point.
``VMGRID_FAULTDIR=dir`` reads, at each point, which point the test wants now (so one process serves several
cases): ``dir/kill`` names a point at which the process SIGKILLs itself; ``dir/stall`` names a point at which the
thread that reaches it writes ``dir/reached`` and holds until the test removes ``dir/stall`` (meanwhile the test
kills what it likes: a client, a peer)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STALL_LIMIT = 120.0      # seconds: a stalled point goes on by itself after this, so a failed test never wedges a node


def crashpoint(name: str) -> None:
    """SIGKILL this process at the point the environment names; hold it where the fault directory says so."""
    if os.environ.get("VMGRID_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    faults = os.environ.get("VMGRID_FAULTDIR")
    if faults:
        _injected(Path(faults), name)


def _wanted(path: Path, name: str) -> bool:
    try:
        return path.read_text().strip() == name
    except OSError:
        return False


def _injected(directory: Path, name: str) -> None:
    if _wanted(directory / "kill", name):
        (directory / "kill").unlink(missing_ok=True)        # once: the restarted process goes on
        os.kill(os.getpid(), signal.SIGKILL)
    stall = directory / "stall"
    if not _wanted(stall, name):
        return
    (directory / "reached").write_text(name)
    deadline = time.monotonic() + STALL_LIMIT
    while stall.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
