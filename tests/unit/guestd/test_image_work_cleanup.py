"""The image builder removes the work folders of builders that died (SIGTERM, SIGKILL) before their clean-up."""
from __future__ import annotations

import os
import subprocess
import sys

from guestd.image.build import prune_abandoned_work


def test_the_work_folder_of_a_dead_builder_goes_and_a_live_ones_stays(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()            # a pid that has ended
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead, str(live.pid), str(os.getpid())):
            (tmp_path / f"work-0123456789abcdef-{pid}" / "rootfs").mkdir(parents=True)
        (tmp_path / "debian12-base-0123456789abcdef").mkdir()           # an image: not a work folder
        gone = prune_abandoned_work(tmp_path)
        assert gone == [tmp_path / f"work-0123456789abcdef-{dead}"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
            "debian12-base-0123456789abcdef", f"work-0123456789abcdef-{live.pid}",
            f"work-0123456789abcdef-{os.getpid()}"])
    finally:
        live.kill()
        live.wait()
