"""Fault injection for the crash tests: the process SIGKILLs itself at a named point."""
from __future__ import annotations

import os
import signal


def crashpoint(name: str) -> None:
    """SIGKILL this process when the environment variable VMGRID_CRASHPOINT names this point."""
    if os.environ.get("VMGRID_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
