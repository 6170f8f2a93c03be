"""The README's main job, `vmgrid demo`, run as a user runs it: it walks the poster's flows on a
fresh local grid and says what it did."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


ROOT = Path(__file__).resolve().parents[2]


def test_the_main_job_walks_the_poster_flows():
    """README's first line, `./run.sh demo`, as written from the checkout's root (its set-up is done, so it
    costs a second): its output goes to demo-out/ there (git ignores it), as for a reader; an earlier
    demo-out/ is removed first, so the figure checked is this run's."""
    first = re.search(r"```sh\n(.*?)\n", (ROOT / "README.md").read_text(), re.S).group(1)
    command = first.split("#")[0].strip()
    assert command == "./run.sh demo", first
    work = ROOT / "demo-out"
    shutil.rmtree(work, ignore_errors=True)
    r = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "distinct addresses: 5 of 5; distinct MACs: 5 of 5" in out
    assert "over empty disks made with qemu-img (placeholders" in out      # not the EMBOSS image of `demo --real`
    assert "refused:" in out and "vm.pause" in out               # bob may not touch alice's VM
    assert "pause  -> Paused" in out and "resume -> Running" in out
    assert "emboss-3: Destroyed" in out
    assert "emboss-1: Running on node2; address 10.99.0.10 -> 10.99.0.1" in out       # the target's pool
    assert "the same key True" in out and "the old EPR answers InstanceMovedFault" in out
    for phase in ("freeze", "prepare", "transfer", "restore", "fixup", "resume", "release"):
        assert f"\n{phase} " in out                                # the migration phase table                           # its termination time passed
    assert "the duplicate shares the original's image bytes: True" in out
    for phase in ("authorize", "register", "lease", "stage", "overlay", "context", "power-on"):
        assert f"\n{phase} " in out
    png = (work / "phases.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_workdir_holding_other_files_is_refused_untouched(tmp_path):
    """The demo replaces its --workdir: a directory holding files no demo wrote (--workdir ~, a checkout) is
    refused in one line and left as it was (it used to be removed whole), as is a file; an earlier demo's output
    is replaced (that is the test above, with the checkout's demo-out/)."""
    import sys

    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)            # a name a demo writes too: still not a demo's directory
    (mine / "thesis.tex").write_text("years of work")
    afile = tmp_path / "afile"
    afile.write_text("kept")
    for where, message in ((mine, f"--workdir {mine} holds files no demo wrote (thesis.tex): the demo replaces its "
                                  f"directory, so name a new one (or an earlier demo's)"),
                           (afile, f"--workdir {afile} is not a directory: name a new directory for the demo's "
                                   f"output")):
        r = subprocess.run([sys.executable, "-m", "client.cli", "demo", "--workdir", str(where)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stdout == "" and r.stderr == f"vmgrid: {message}\n", r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "images").is_dir()
    assert afile.read_text() == "kept"
