"""`vmgrid demo`: the main job. Starts a local grid on loopback with a fresh PKI and walks the
poster's flows on an embedded default scenario, printing what happens."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from client.cli import CLIError
from client.output import emit_descriptors, table
from services.container.contract import WSDL_DIR

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


def run(args) -> int:
    from client.localgrid import LocalGrid
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from security.trust import TrustStore

    if shutil.which("qemu-img") is None:
        raise CLIError("qemu-img is missing (Debian package qemu-utils; ./run.sh setup installs it)")
    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    images = work / "images"
    images.mkdir(parents=True)
    started = time.monotonic()

    say("a fresh grid PKI: a CA, a host certificate for localhost, users with RFC 3820 proxies")
    grid = LocalGrid(work / "grid")
    admin, alice, bob = grid.user("repo-admin"), grid.user("alice"), grid.user("bob")
    table(["user", "dn", "proxy"], [(u.name, u.dn, u.proxy_path) for u in (admin, alice, bob)])

    try:
        say("starting the VMRepository (its own process; HTTPS, WS-Security signed messages)")
        repo_proc = grid.start("repository", ["repository"], {
            "repository": {"ingest_dirs": [str(images)]},
            "policy": {"admins": [admin.dn], "vos": {
                "bio": {"members": [alice.dn], "admins": [admin.dn]},
                "hep": {"members": [bob.dn], "admins": [admin.dn]},
            }},
        })
        url = repo_proc.base_url + "/wsrf/services/VMRepositoryService"
        print(f"VMRepositoryService at {url}  (WSDL: {url}?wsdl)")
        trust = TrustStore(grid.cert_dir)

        def client(user):
            return RepositoryClient(GridServiceClient(url, user.credential, trust))

        as_admin, as_alice, as_bob = client(admin), client(alice), client(bob)

        say("the site admin registers sample images (qcow2 made with qemu-img, realistic descriptors)")
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
