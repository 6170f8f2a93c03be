"""The grid container in a real guest, run by tests/vm/test_guest_jobs_qemu.py inside a network namespace
the test made (`ip netns exec vgjob-... python jobs_grid.py IMAGE_DIR WORKDIR`): the Authorization
service and the VMRepository in this process, one VMManager node (`vmgrid serve vmmanager`) in bridge
mode with a guest CA ([vmmanager] guest_ca, job_admins). The admin registers the recipe's image and
descriptor unchanged; alice deploys it; guestd writes the job service's configuration from the
context, the node issues its certificate over the guest channel and guestd starts `vmgrid serve jobs`
in the guest. Then the scientist's commands, as written in docs/jobs.md, by instance name: a job with
stage-in/out and its outputs fetched, a failing job, Cancel, bob refused, the job service killed and
restarted by guestd with its jobs' real states, the guest's logs. Prints what it saw as one JSON line;
always destroys the guest, stops the node and takes the bridge down.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client.localgrid import write_toml  # noqa: E402
from client.soap import GridServiceClient  # noqa: E402
from client.vmmanager import VMManagerClient  # noqa: E402
from guestd.image.build import GuestImage  # noqa: E402
from services.descriptor import parse_descriptor  # noqa: E402
from services.vmmanager.network import NodeBridge  # noqa: E402
from tests.fixtures.grid import free_port, start_grid  # noqa: E402
from tests.fixtures.pki import build_grid_pki  # noqa: E402

from test_vmmanager_qemu import NodeProcess, qemu_processes  # noqa: E402

BRIDGE, NETWORK, GATEWAY = "vgjobbr0", "10.78.0.0/24", "10.78.0.1"
LEASES = "10.78.0.10-10.78.0.12"
NAME = "jobs-guest"
# the killer job: SIGKILL to the guest's job service (the container guestd supervises), as root in the guest
KILL = ("import os\nfor p in os.listdir('/proc'):\n if p.isdigit():\n  try:\n   c=open('/proc/%s/cmdline'%p,'rb').read()\n"
        "  except OSError:\n   continue\n  if b'serve\\x00jobs' in c: os.kill(int(p),9)\n")


class Cli:
    """`vmgrid ...` as a user, in its own process (the commands docs/jobs.md shows)."""

    def __init__(self, work: Path, pki, user, node_url: str) -> None:
        self.work, self.env = work, {**os.environ, **user.env(pki.cert_dir), "VMGRID_NODE": node_url}

    def __call__(self, *args: str, timeout: float = 300) -> dict:
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=self.work, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        return {"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()[-1500:],
                "seconds": round(time.monotonic() - t, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--boot-timeout", type=float, default=480.0)
    args = ap.parse_args()
    image = GuestImage.load(args.image)
    pki = build_grid_pki(args.work / "pki")
    out: dict = {"steps": {}}
    grid, node, ref = None, None, None
    t0 = time.monotonic()
    try:
        grid = start_grid(pki, args.work / "g", nodes=0)
        rootfs = grid.ingest / f"{image.name}.qcow2"
        shutil.copyfile(image.rootfs, rootfs)
        grid.repo(pki.admin).register(parse_descriptor(image.descriptor.read_bytes()), local_path=str(rootfs))
        rootfs.unlink()
        descriptor = grid.repo(pki.alice).query([f"name = {image.name}"]).descriptors[0]
        node = NodeProcess(args.work / "node.toml", args.work / "s", args.work / "node.log", free_port())
        write_toml(node.config, {
            "container": {"host": "127.0.0.1", "port": node.port, "state_dir": str(node.state), "log_level": "info"},
            "security": {"cert_dir": str(pki.cert_dir), "host_cert": str(pki.host_cert_path),
                         "host_key": str(pki.host_key_path)},
            "enforcement": {"authz_url": grid.authz_url, "permit_ttl": 0.0},
            "vmmanager": {"node": "jobs1", "vmm": "qemu", "vmm_root": str(args.work / "r"),
                          "repository": grid.repository_url, "network": NETWORK, "gateway": GATEWAY,
                          "lease_range": LEASES, "guest_ready_timeout": args.boot_timeout, "sweep_interval": 0.5,
                          "nic_kind": "bridge", "nic_source": BRIDGE, "manage_bridge": True,
                          "guest_ca": str(pki.ca.directory), "job_admins": [pki.admin.dn]},
        })
        node.start(pki.cert_dir, timeout=180)
        vm = VMManagerClient(GridServiceClient(node.url, pki.alice.proxy, pki.trust()))
        t = time.monotonic()
        ref = vm.deploy(descriptor, NAME, 3600).ref
        info = vm.wait_for(ref, ("Running", "Failed"), timeout=args.boot_timeout + 120)
        out["deploy_seconds"] = round(time.monotonic() - t, 1)
        out["instance"] = {"state": info.state, "address": info.address, "guest_status": info.guest_status,
                           "failure": info.failure, "job_service": info.job_service}
        alice = Cli(args.work, pki, pki.alice, node.url)
        bob = Cli(args.work, pki, pki.bob, node.url)
        s = out["steps"]
        s["vm_status"] = alice("vm", "status", NAME)
        # Running: guestd started the job service; Python starting under TCG takes a while before it listens
        deadline, up = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            up = alice("job", "list", NAME, timeout=120)
            if up["rc"] == 0 or "Connection refused" not in up["err"]:
                break
            time.sleep(2)
        s["service_up"] = up
        out["service_up_seconds"] = round(time.monotonic() - t, 1)
        # a job staging a file in and its sorted copy out, followed to its end, outputs fetched verified
        (args.work / "seqs.txt").write_text("tata\nacgt\ngattaca\n")
        s["submit"] = alice("job", "submit", NAME, "--stage-in", "seqs.txt", "--stage-out", "sorted.txt", "--",
                            "sort", "-o", "sorted.txt", "seqs.txt")
        job = s["submit"]["out"]
        s["wait"] = alice("job", "wait", NAME, job)
        s["status"] = alice("job", "status", NAME, job, "--json")
        s["get"] = alice("job", "get", NAME, job, "-o", "results")
        got = args.work / "results" / "sorted.txt"
        out["sorted"] = got.read_text() if got.is_file() else None
        # a failing job: the program's exit status
        s["fail"] = alice("job", "submit", NAME, "--wait", "--", "sh", "-c", "echo oops >&2; exit 3")
        s["fail_status"] = alice("job", "status", NAME, (s["fail"]["out"].splitlines() or ["-"])[0], "--json")
        # Cancel of a long job
        s["long"] = alice("job", "submit", NAME, "--", "sleep", "600")
        s["cancel"] = alice("job", "cancel", NAME, s["long"]["out"])
        s["cancelled"] = alice("job", "status", NAME, s["long"]["out"], "--json")
        # bob: every job operation refused (he reaches the instance through alice's endpoint URL: he may
        # not even read alice's instance at the VMManager)
        url = (info.job_service or {}).get("url", "")
        s["bob_vm_status"] = bob("job", "list", NAME)
        s["bob"] = {"submit": bob("job", "submit", url, "--", "true"), "list": bob("job", "list", url),
                    "status": bob("job", "status", url, job), "cancel": bob("job", "cancel", url, job),
                    "get": bob("job", "get", url, job, "-o", "bob"), "log": bob("job", "log", url, "container"),
                    "destroy": bob("job", "destroy", url, job)}
        # the job service killed (SIGKILL, by a job of alice's): guestd restarts it, the jobs answer their state
        s["survivor"] = alice("job", "submit", NAME, "--", "sleep", "600")
        s["killer"] = alice("job", "submit", NAME, "--", "python3", "-c", KILL)
        deadline, after = time.monotonic() + 180, None
        while time.monotonic() < deadline:       # the service is back once it answers again
            after = alice("job", "list", NAME, "--all", "--json", timeout=120)
            if after["rc"] == 0:
                break
        s["after_restart"] = after
        s["survivor_status"] = alice("job", "status", NAME, s["survivor"]["out"], "--json")
        s["killer_status"] = alice("job", "status", NAME, s["killer"]["out"], "--json")
        s["survivor_cancel"] = alice("job", "cancel", NAME, s["survivor"]["out"])
        s["first_after"] = alice("job", "status", NAME, job, "--json")
        # the guest's logs, readable by the owner through the job service
        s["log_help"] = alice("job", "log", NAME, "help")
        s["log_container"] = alice("job", "log", NAME, "container")
        s["log_guestd"] = alice("job", "log", NAME, "guestd")
        out["restarts"] = vm.status(ref).guest_status
        out["sha256_seqs"] = hashlib.sha256((args.work / "seqs.txt").read_bytes()).hexdigest()
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if ref is not None:
            try:
                VMManagerClient(GridServiceClient(node.url, pki.alice.proxy, pki.trust())).destroy(ref)
            except Exception as exc:  # noqa: BLE001
                out.setdefault("cleanup", []).append(f"destroy: {exc}")
        if node is not None:
            node.stop()
            out["node_exit"] = node.process.returncode
            if "error" in out:
                out["node_log"] = node.log_tail()[-4000:]
            for pid in qemu_processes(f"{args.work / 'r'}/lib/qemu/"):
                os.kill(pid, signal.SIGKILL)
                out.setdefault("cleanup", []).append("killed a QEMU")
            try:
                out["bridge_after"] = NodeBridge(BRIDGE, GATEWAY, NETWORK, node.state / "vmmanager").teardown().exists
            except Exception as exc:  # noqa: BLE001
                out.setdefault("cleanup", []).append(f"bridge teardown: {exc}")
        if grid is not None:
            grid.close()
        out["total_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
