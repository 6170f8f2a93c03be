"""A whole QEMU scene run once as a helper script inside a network namespace the test makes (the machines
reach no other network): the job service's and the migration's (jobs_grid.py, the session fixture jobs_scene in
tests/vm/conftest.py, read by test_guest_jobs_qemu.py and test_migrate_qemu.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from test_node_bridge_qemu import qemu_pids

REPO = Path(__file__).resolve().parents[2]


def run_scene(helper: Path, image_dir: Path, vm_dir: Path, prefix: str, what: str, detail: int = 6000) -> dict:
    """Run ``helper IMAGE_DIR WORKDIR`` in a new namespace ``<prefix>-<hex>``; the JSON line it printed last,
    with ``links_after`` (the namespace's links before it is deleted). Any QEMU the helper left is killed."""
    netns = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "dev", "lo", "up"], check=True)
    work = vm_dir / f"{prefix[-2:]}{uuid.uuid4().hex[:4]}"
    work.mkdir()
    try:
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(helper), str(image_dir), str(work)],
                              cwd=REPO, capture_output=True, text=True, timeout=1800)
    finally:
        for pid in qemu_pids(str(work)):          # left only if the helper died midway
            os.kill(pid, signal.SIGKILL)
        links = subprocess.run(["ip", "-n", netns, "-br", "link", "show"], capture_output=True, text=True).stdout
        subprocess.run(["ip", "netns", "del", netns], check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"{what} failed: {proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    print(f"{what}: total {result.get('total_seconds')} s", file=sys.stderr)
    assert "error" not in result, f"{result['error']}\n{json.dumps(result, indent=1)[:detail]}"
    result["links_after"] = links
    return result


def scene_part(result: dict, part: str, detail: int = 6000) -> dict:
    """One test module's part of the jobs scene, with the scene's cleanup findings; fails with its error."""
    seen = dict(result[part])
    assert "error" not in seen, f"{seen['error']}\n{json.dumps(result, indent=1)[:detail]}"
    for key in ("cleanup", "bridge_after"):
        if key in result:
            seen[key] = result[key]
    return seen
