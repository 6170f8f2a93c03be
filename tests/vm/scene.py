"""A whole QEMU scene run once as a helper script inside a network namespace the test makes (the machines
reach no other network): the job service's and the migration's (jobs_grid.py, the session fixture jobs_scene in
tests/vm/conftest.py, read by test_guest_jobs_qemu.py and test_migrate_qemu.py), and the two bridge scenes of
test_node_bridge_qemu.py (bridge_node.py and bridge_grid.py, run at the same time, each in its own namespace)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
# seconds between two status calls of a scene waiting for its guests: each is a signed call the node answers,
# CPU the guests booting under TCG need more (the client's default is 0.2 s)
POLL = 1.0


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link to ``source`` at ``target`` (a copy across file systems): an image for a repository's ingest
    directory, which the repository only reads (it copies the bytes into its store)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def qemu_pids(needle: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and needle in cmd:
                pids.append(int(d.name))
    return pids


class Scene:
    """``helper ARGS...`` started in a new namespace ``<prefix>-<hex>`` with a work directory of its own under
    ``vm_dir``; ``args(work)`` gives its arguments. ``finish`` waits for it and removes the namespace."""

    def __init__(self, helper: Path, vm_dir: Path, prefix: str, args: Callable[[Path], list[str]]) -> None:
        self.netns = f"{prefix}-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.proc = None
        try:
            subprocess.run(["ip", "-n", self.netns, "link", "set", "dev", "lo", "up"], check=True)
            self.work = vm_dir / f"{prefix[-2:]}{uuid.uuid4().hex[:4]}"
            self.work.mkdir()
            # its output into files, not pipes: a scene nobody reads yet never blocks on a full pipe
            with open(self.work / "scene.out", "w") as out, open(self.work / "scene.err", "w") as err:
                self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, sys.executable, str(helper),
                                              *map(str, args(self.work))], cwd=REPO, stdout=out, stderr=err,
                                             stdin=subprocess.DEVNULL)
        except BaseException:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
            raise

    def finish(self, timeout: float = 1800) -> tuple[int | None, str, str, str]:
        """(exit status, stdout, stderr, the namespace's links before it was deleted); any QEMU the helper
        left (only if it died midway) is killed."""
        note = ""
        try:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                note = f"\nscene: killed after {timeout} s"
        finally:
            for pid in qemu_pids(str(self.work)):
                os.kill(pid, signal.SIGKILL)
            links = subprocess.run(["ip", "-n", self.netns, "-br", "link", "show"], capture_output=True,
                                   text=True).stdout
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
        out = (self.work / "scene.out").read_text(errors="replace")
        err = (self.work / "scene.err").read_text(errors="replace") + note
        return self.proc.returncode, out, err, links


def scene_result(finished: tuple[int | None, str, str, str], what: str, detail: int = 6000) -> dict:
    """The JSON line a finished scene printed last, with ``links_after``; fails with its error."""
    code, out, err, links = finished
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and lines, f"{what} failed: {err[-3000:]}"
    result = json.loads(lines[-1])
    if "total_seconds" in result:
        print(f"{what}: total {result['total_seconds']} s", file=sys.stderr)
    assert "error" not in result, f"{result['error']}\n{json.dumps(result, indent=1)[:detail]}"
    result["links_after"] = links
    return result


def run_scene(helper: Path, image_dir: Path, vm_dir: Path, prefix: str, what: str, detail: int = 6000) -> dict:
    """Run ``helper IMAGE_DIR WORKDIR`` in a new namespace ``<prefix>-<hex>``; the JSON line it printed last,
    with ``links_after`` (the namespace's links before it is deleted). Any QEMU the helper left is killed."""
    scene = Scene(helper, vm_dir, prefix, lambda work: [image_dir, work])
    return scene_result(scene.finish(), what, detail)


def scene_part(result: dict, part: str, detail: int = 6000) -> dict:
    """One test module's part of the jobs scene, with the scene's cleanup findings; fails with its error."""
    seen = dict(result[part])
    assert "error" not in seen, f"{seen['error']}\n{json.dumps(result, indent=1)[:detail]}"
    for key in ("cleanup", "bridge_after"):
        if key in result:
            seen[key] = result[key]
    return seen
