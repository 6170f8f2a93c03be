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


def test_the_demo_empties_only_a_directory_a_demo_wrote(tmp_path):
    """`--workdir DIR` holding the user's own files is refused and left as it was (the demo empties its directory
    first: `--workdir .` must not delete a home directory); an earlier demo's directory is emptied, a new one made."""
    from client.demo import MARKER, fresh_workdir
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    r = subprocess.run([str(ROOT / ".venv/bin/vmgrid"), "demo", "--workdir", str(mine)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "holds files an earlier `vmgrid demo` did not write" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and (mine / "thesis.txt").read_text() == "three years of work"

    new = fresh_workdir(tmp_path / "a" / "b")                      # made, with its marker
    (new / "old-output").write_text("x")
    again = fresh_workdir(tmp_path / "a" / "b")                    # an earlier demo's: emptied
    assert again == new and sorted(p.name for p in again.iterdir()) == [MARKER]
    older = tmp_path / "older"                                     # a demo's from before the marker
    (older / "grid").mkdir(parents=True)
    (older / "grid" / "central.toml").write_text("")
    assert sorted(p.name for p in fresh_workdir(older).iterdir()) == [MARKER]
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match="not a directory"):
        fresh_workdir(tmp_path / "file")
