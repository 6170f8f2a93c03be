"""A guest that never got ready: the end of its serial console outlives its instance directory (which goes with
the failed instance), for the site to read; the newest 32 are kept (services/vmmanager/phases.py)."""
from __future__ import annotations

import os
from pathlib import Path

from services.vmmanager.phases import KEPT_CONSOLE_BYTES, KEPT_CONSOLES, keep_console


class Instances:
    """What keep_console reads of a node's parts: where instances live (the node's real layout: instances/KEY)."""

    node = "node1"

    def __init__(self, root: Path) -> None:
        self.instances_dir = root / "instances"
        self.instances_dir.mkdir()

    def home(self, key: str) -> Path:
        return self.instances_dir / key


def test_the_end_of_a_never_ready_guests_console_is_kept_and_only_the_newest(tmp_path):
    parts = Instances(tmp_path)
    home = parts.home("inst-1")
    home.mkdir()
    (home / "serial0.log").write_bytes(b"x" * KEPT_CONSOLE_BYTES + b"kernel panic: no init found\n")
    kept = keep_console(parts, "inst-1")
    assert kept == tmp_path / "consoles" / "inst-1.log"
    data = kept.read_bytes()
    assert len(data) == KEPT_CONSOLE_BYTES and data.endswith(b"kernel panic: no init found\n")
    os.utime(kept, (1, 1))                     # the oldest of those to come

    no_console = parts.home("inst-2")
    no_console.mkdir()
    assert keep_console(parts, "inst-2") is None

    for n in range(KEPT_CONSOLES + 5):
        key = f"inst-{n + 10}"
        parts.home(key).mkdir()
        (parts.home(key) / "serial0.log").write_text(f"console {n}\n")
        os.utime(keep_console(parts, key), (1_000_000 + n, 1_000_000 + n))
    kept_now = sorted(p.name for p in (tmp_path / "consoles").glob("*.log"))
    assert len(kept_now) == KEPT_CONSOLES and "inst-1.log" not in kept_now and f"inst-{KEPT_CONSOLES + 14}.log" in kept_now
