"""`vmgrid demo`: the main job. Starts a local grid on loopback with a fresh PKI and walks the
poster's flows on an embedded default scenario, printing what happens."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from client.cli import CLIError
from client.output import emit_descriptors, table
from services.common.paths import WSDL_DIR

EXAMPLES = WSDL_DIR / "examples"
SAMPLE_IMAGES = [  # descriptor, image format, virtual size
    ("debian12-emboss.xml", "qcow2", "2G"),
    ("debian12-emboss-bigmem.xml", "qcow2", "2G"),
    ("sl4-blast.xml", "raw", "8M"),
    ("debian12-hep.xml", "qcow2", "4G"),
]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main job: a local grid doing the poster's flows",
                              description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("demo-out"),
                   help="where the grid's PKI, state, logs and outputs go (emptied first; default ./demo-out)")
    p.add_argument("--keep-running", action="store_true", help="leave the services running at the end")
    p.add_argument("--real", action="store_true",
                   help="the poster's scene on real QEMU guests: the EMBOSS image built (or cached), deployed on "
                        "3 nodes, EMBOSS jobs through each guest's job service (root; client/demo_real.py)")
    p.set_defaults(func=run)


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def make_image(path: Path, fmt: str, size: str) -> None:
    """A small sample image: qemu-img's own qcow2 (a few hundred KiB allocated) or a raw file."""
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    else:
        with open(path, "wb") as f:
            f.write(b"\xeb\x3c\x90vmgrid-sample-raw-image\x00" * 1024)
            f.truncate(8 * 1024 * 1024)


# what a demo writes in its --workdir (the marker, and what demos wrote before there was one)
DEMO_MARKER = ".vmgrid-demo"
_DEMO_NAMES = {DEMO_MARKER, "images", "grid", "inputs", "results", "phases.png", "report.md", "report.json"}
_DEMO_PATTERNS = ("tmap-*.png", "node*.log")


def prepare_workdir(path: Path) -> Path:
    """--workdir, emptied: an earlier demo's output is replaced, but a directory holding anything a demo does not
    write (--workdir ~, a checkout, a file) is refused, untouched."""
    work = path.resolve()
    if work.exists() or work.is_symlink():
        if not work.is_dir():
            raise CLIError(f"--workdir {path} is not a directory: name a new directory for the demo's output")
        strangers = [p.name for p in work.iterdir()
                     if p.name not in _DEMO_NAMES and not any(p.match(pattern) for pattern in _DEMO_PATTERNS)]
        if strangers and not (work / DEMO_MARKER).is_file():
            shown = ", ".join(sorted(strangers)[:3]) + (", ..." if len(strangers) > 3 else "")
            raise CLIError(f"--workdir {path} holds files no demo wrote ({shown}): the demo replaces its "
                           f"directory, so name a new one (or an earlier demo's)")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / DEMO_MARKER).write_text("vmgrid demo output: `vmgrid demo` replaces this directory\n")
    return work


def run(args) -> int:
    if args.real:
        from client import demo_real

        return demo_real.run(args)
    from client.localgrid import LocalGrid
    from client.repository import RepositoryClient
    from client.report import Deployment, draw, print_report
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from security.trust import TrustStore
    from services.authz.edit import site_policy
    from services.authz.policy import Group
    from services.faults import AccessDenied, InstanceMoved

    if shutil.which("qemu-img") is None:
        raise CLIError("qemu-img is missing (Debian package qemu-utils; ./run.sh setup installs it)")
    work = prepare_workdir(args.workdir)
    images = work / "images"
    images.mkdir(parents=True)
    started = time.monotonic()

    say("a fresh grid PKI: a CA, a host certificate for localhost, users with RFC 3820 proxies")
    grid = LocalGrid(work / "grid")
    admin, alice, bob = grid.user("repo-admin"), grid.user("alice"), grid.user("bob")
    table(["user", "dn", "proxy"], [(u.name, u.dn, u.proxy_path) for u in (admin, alice, bob)])

    try:
        say("starting the grid: the Authorization service and the VMRepository (one process), "
            "two VMManager nodes on libvirt's test driver (one process each); HTTPS, signed messages")
        grid.start_central(site_policy(admins=[admin.dn], groups=[
            Group("bio", members=(alice.dn,), admins=(admin.dn,), description="bioinformatics VO"),
            Group("hep", members=(bob.dn,), admins=(admin.dn,), description="high-energy physics VO")]),
            images, permit_ttl=2.0)
        base = grid.services_url
        nodes = []
        for n, lease_range in ((1, "10.99.0.10-10.99.0.99"), (2, "10.99.0.100-10.99.0.189")):
            proc = grid.start_node(f"node{n}", {"network": "10.99.0.0/24", "lease_range": lease_range,
                                                "sweep_interval": 0.5})
            nodes.append(proc.base_url + "/wsrf/services/VMManagerService")
        url = f"{base}/VMRepositoryService"
        table(["service", "url"], [("AuthorizationService", f"{base}/AuthorizationService"),
                                   ("VMRepositoryService", url), ("VMManagerService (node1)", nodes[0]),
                                   ("VMManagerService (node2)", nodes[1])])
        trust = TrustStore(grid.cert_dir)

        def client(user):
            return RepositoryClient(GridServiceClient(url, user.credential, trust))

        as_admin, as_alice, as_bob = client(admin), client(alice), client(bob)

        say("the site admin registers sample images: realistic descriptors over empty disks made with qemu-img "
            "(placeholders: libvirt's test driver boots nothing; the EMBOSS image built from its recipe: "
            "vmgrid demo --real)")
        registered = []
        for name, fmt, size in SAMPLE_IMAGES:
            path = images / (name.removesuffix(".xml") + (".qcow2" if fmt == "qcow2" else ".img"))
            make_image(path, fmt, size)
            registered.append(as_admin.register((EXAMPLES / name).read_bytes(), local_path=str(path)))
        emit_descriptors(registered, "table")

        queries = [
            ("alice (VO bio): images with at least 512 MiB RAM", as_alice, ["ram >= 512"]),
            ("alice: EMBOSS 6.6 or newer (6.10 is newer: versions compare by segment)", as_alice,
             ["library emboss >= 6.6"]),
            ("alice: Debian with EMBOSS, or anything on a 2.6 kernel", as_alice,
             ["distribution = debian", "library emboss >= 6.6", "or", "kernel < 2.7"]),
            ("bob (VO hep) asks the same: he sees only his VO's images", as_bob, ["ram >= 512"]),
        ]
        for title, who, criteria in queries:
            say(f"query, {title}:  vmgrid repo query {' '.join(repr(c) if c != 'or' else c for c in criteria)}")
            result = who.query(criteria)
            emit_descriptors(result.descriptors, "table", total=result.total, offset=result.offset)

        xpath = "/ws:workspace/ws:hardware/ws:disk[ws:role='scratch']"
        say(f"query by the WS-ResourceProperties XPath dialect, alice: {xpath}")
        result = as_alice.query(xpath=xpath)
        emit_descriptors(result.descriptors, "table", total=result.total, offset=result.offset)

        say("alice duplicates debian12-emboss with 2 GiB of RAM and another container command")
        dup = as_alice.duplicate("bio/debian12-emboss", "debian12-emboss-2g", memory=2048,
                                 container_command="/usr/local/bin/grid-container --port 9443")
        emit_descriptors([dup], "table")
        original = as_alice.show("bio/debian12-emboss")
        same = original.findtext("{*}image/{*}sha256") == dup.findtext("{*}image/{*}sha256")
        print(f"the duplicate shares the original's image bytes: {same}")

        say("alice deploys five copies of debian12-emboss: three on node1, two on node2 "
            "(staged over GridFTP into each node's cache once, a qcow2 overlay and a context CD-ROM each)")
        vms = [VMManagerClient(GridServiceClient(u, alice.credential, trust)) for u in nodes]
        deployed = []
        for i, (node, lifetime) in enumerate([(0, 600), (0, 600), (0, 4), (1, 600), (1, 600)]):
            info = vms[node].deploy(original, f"emboss-{i + 1}", lifetime, wait=True)
            deployed.append((node, info))
        table(["identifier", "node", "state", "address", "mac", "lifetime", "phases (s)"],
              [(i.identifier, i.node, i.state, i.address, i.mac,
                f"{(i.termination - i.created).total_seconds():.0f} s",
                " ".join(f"{n}={s:.3f}" for n, s in i.phases)) for _, i in deployed])
        addresses = {i.address for _, i in deployed}
        macs = {i.mac for _, i in deployed}
        print(f"distinct addresses: {len(addresses)} of {len(deployed)}; distinct MACs: {len(macs)} of {len(deployed)}")

        say("authorization: bob tries to pause alice's instance")
        bob_vm = VMManagerClient(GridServiceClient(nodes[0], bob.credential, trust))
        try:
            bob_vm.pause(deployed[0][1].ref)
            print("unexpected: permitted")
        except AccessDenied as exc:
            print(f"refused: {exc.description}")

        node, first = deployed[0]
        say(f"alice pauses and resumes {first.identifier}")
        print(f"pause  -> {vms[node].pause(first.ref)}")
        print(f"resume -> {vms[node].resume(first.ref)}")

        say(f"alice migrates {first.identifier} from node1 to node2: vmgrid vm migrate {first.identifier} --to "
            f"{nodes[1]}  (cold: she delegates a 30-minute proxy to node1, which registers the VM at node2 as "
            f"her; node2 pulls the overlay and saved state over GridFTP, restores and resumes it)")
        moved = vms[node].migrate(first.ref, nodes[1])
        print(f"{first.identifier}: {moved.state} on {moved.node}; address {first.address} -> {moved.address}, "
              f"mac {first.mac} -> {moved.mac}; the same key {moved.ref.key == first.ref.key}")
        table(["migration phase", "seconds"], [(n, f"{s:.4f}") for n, s in moved.phases]
              + [("total", f"{sum(s for _, s in moved.phases):.4f}")])
        try:
            vms[node].status(first.ref)
        except InstanceMoved as exc:
            print(f"the old EPR answers InstanceMovedFault: {exc.description}")
        deployed[0] = (1, moved)

        node, short = deployed[2]
        say(f"{short.identifier} was deployed for 4 s: waiting for its termination time")
        final = None
        for _ in range(100):
            final = [i for i in vms[node].list(include_ended=True) if i.ref.key == short.ref.key][0]
            if final.state == "Destroyed":
                break
            time.sleep(0.2)
        print(f"{short.identifier}: {final.state} (its lease {short.address} and overlay released)")

        say("alice destroys the others")
        for node, info in deployed:
            if info.ref.key != short.ref.key:
                vms[node].destroy(info.ref)
                print(f"{info.identifier}: destroyed")

        say("the deployment and migration phases (the poster's figure: deployments)")
        history = []
        for vm in vms:
            for i in vm.list(include_ended=True):
                if i.phases:
                    history.append(Deployment(f"{i.identifier}@{i.node}", tuple(i.phases)))
        print_report(history, sys.stdout)
        figure = draw(history, work / "phases.png", "vmgrid demo: share of each deployment phase")
        print(f"figure written to {figure}")

        say("alice's VOs")
        table(["vo", "images"], as_alice.vos())
        elapsed = time.monotonic() - started
        say(f"done in {elapsed:.1f} s; logs and state in {work}")
        if args.keep_running:
            print(f"services still running (PIDs {[p.process.pid for p in grid.processes.values()]}); "
                  f"X509_CERT_DIR={grid.cert_dir} X509_USER_PROXY={alice.proxy_path}")
            grid.processes.clear()
    finally:
        grid.stop_all()
    return 0
