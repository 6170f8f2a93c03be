"""Build the QEMU tier's guest images in the background while the other tiers run (started by
tests/conftest.py when the session selects tests in tests/vm and runs as root). The tests' own build
calls wait on the builder's lock for an image being made here and then take it from the cache; if this
process fails or is stopped, they build what is missing themselves. Usage: python tests/vm/prebuild.py"""
from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.vm.images import build_all  # noqa: E402


def _stop(signum, frame):
    raise SystemExit(143)          # the session's end (SIGTERM): the builder's clean-up runs, no work folder is left


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmgrid-prebuild-") as d:
        try:
            build_all(Path(d), log=lambda m: print(f"{time.monotonic() - t0:7.1f}s {m}", flush=True))
        except Exception as exc:  # noqa: BLE001 - reported; the tests build what is missing themselves
            print(f"prebuild failed: {exc}", flush=True)
            return 1
    print(f"prebuild done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
