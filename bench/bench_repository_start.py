"""The repository starts ready (issue 13 §4): bulk registration of N descriptors, then the start of a
`vmgrid serve repository` process over that catalogue and its first signed query, with the query
index saved beside the catalogue against the same start rebuilding it from SQLite (the peer: what
every start did before), and `vmgrid repo import DIR` end to end.

    .venv/bin/python bench/bench_repository_start.py [--n 100000] [--import-n 20000] [--peer-n 2000]

Prints, in one run:
- registration rates in the registry core (validated, authorized by the built-in policy engine, one
  SQLite transaction per 1000): ImportImages batches against one DuplicateImage per descriptor;
- for the process start: spawn to "serving" and the first signed QueryImages, with the saved index and
  with the saved index removed (rebuilt at start; --no-rebuild skips it), against the interpreter alone and
  the interpreter importing what a repository start imports; and the timeline of each start (when each step
  ended, from the milliseconds of the log lines that end them);
- `vmgrid repo import DIR` of --import-n descriptor files as a scientist runs it (signed SOAP over
  HTTPS on loopback) against one signed DuplicateImage call per descriptor.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxml import etree  # noqa: E402

from bench.bench_repository_query import DISTROS, KERNELS, LIBS  # noqa: E402
from bench.benchgrid import compile_bytecode, loadavg, process_cpu, security_section, serve  # noqa: E402
from services.authz.engine import site_policy_point  # noqa: E402
from services.vmrepository.config import RepositoryConfig  # noqa: E402
from services.vmrepository.registry import Registry, Source  # noqa: E402
from tests.fixtures.pki import build_grid_pki  # noqa: E402
from tests.fixtures.repository import EXAMPLES, make_image  # noqa: E402

VOS = ["bio", "hep", "astro"]


TEMPLATE = """<workspace xmlns="http://vmgrid.org/ns/workspace/1">
  <identity><name>{name}</name><version>1.0</version><vo>{vo}</vo>
    <description>Debian with EMBOSS and NCBI BLAST+ for sequence analysis, variant {name}</description></identity>
  <hardware><architecture>x86_64</architecture><vcpus>{vcpus}</vcpus><memory>{memory}</memory>
    <disk><role>root</role><size>{disk}</size><format>qcow2</format><bus>virtio</bus><target>vda</target></disk>
    <cdrom><bus>ide</bus><purpose>context</purpose></cdrom>
    <serialPort><type>pty</type><purpose>console</purpose></serialPort>
    <nic><model>virtio</model><network>grid</network></nic></hardware>
  <software><os>linux</os><distribution><name>{distro}</name><version>{distro_version}</version></distribution>
    <kernel><version>{kernel}</version></kernel><boot><method>disk</method></boot>
    <librarySignature>{libraries}</librarySignature></software>
  <image><format>qcow2</format><sha256>{sha256}</sha256></image>
  <container><command>/usr/local/bin/grid-container --port 8443</command><port>8443</port></container>
</workspace>"""


def make_descriptors(n: int, sha: str, rng: random.Random, prefix: str = "image"):
    """Descriptor texts as scientists write them (no id, owner, creation time or size: the repository
    sets them), varied like bench_repository_query's, within the site policy's limits (8 GiB, 8 vCPUs)."""
    for i in range(n):
        distro, version = rng.choice(DISTROS)
        libs = "".join(f"<library><name>{lib}</name><version>{rng.randint(1, 9)}.{rng.randint(0, 12)}."
                       f"{rng.randint(0, 3)}</version></library>" for lib in rng.sample(LIBS, rng.randint(2, 5)))
        yield TEMPLATE.format(name=f"{prefix}-{i:07d}", vo=rng.choice(["bio", "bio", "hep", "astro"]),
                              vcpus=rng.choice([1, 1, 2, 2, 4, 8]), memory=rng.choice([256, 512, 1024, 2048, 4096, 8192]),
                              disk=rng.choice([1, 2, 4, 8, 16, 32, 64]) * 1024**3, distro=distro,
                              distro_version=version, kernel=rng.choice(KERNELS), libraries=libs, sha256=sha)


# The steps of a `vmgrid serve repository` start, by the log line that ends each (its time to the millisecond).
START_STEPS = [("interpreter, imports, configuration", "opening the catalogue in "),
               ("SQLite: schema, catalogue id", "catalogue opened"),
               ("reconcile (store against catalogue, expired holds)", "catalogue reconciled: "),
               ("query index: saved one mapped + BLAKE3-checked + caught up, or rebuilt", "query index of "),
               ("host credential, trust store, TLS, WS-Security, bind", " serving ")]


def start_timeline(log_text: str, spawned: float, up: float) -> list[tuple[str, float]]:
    """(step, seconds after the spawn when it ended) from a start's log lines, the last being the bench seeing
    "vmgrid: serving" (it polls the log every 50 ms)."""
    marks = []
    for line in log_text.splitlines():
        try:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        except ValueError:
            continue
        marks.append((stamp, line[24:]))
    out = []
    for step, marker in START_STEPS:
        at = next((stamp for stamp, text in marks if marker in text), None)
        if at is not None:
            out.append((step, at - spawned))
    out.append(("the bench reads \"vmgrid: serving\" in the log", up))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--import-n", type=int, default=20_000)
    ap.add_argument("--peer-n", type=int, default=2_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--stop-after", type=float, default=5.0, help="seconds between the import and the timed stop")
    ap.add_argument("--no-rebuild", action="store_true", help="skip the start without a saved index (minutes on "
                                                              "100,000 descriptors; needs a saved index: --existing)")
    ap.add_argument("--profile-import", type=Path, metavar="FILE",
                    help="run `vmgrid repo import` under cProfile, its statistics written to FILE (then its figures "
                         "are not the command's own)")
    ap.add_argument("--existing", type=Path, help="the directory of an earlier run (--keep): skip the registration "
                                                  "and measure the starts and the import on its catalogue")
    args = ap.parse_args()
    root = args.existing or Path(tempfile.mkdtemp(prefix="vmgrid-bench-start-"))
    if args.existing:
        args.keep = True
    pki = build_grid_pki(root / (f"pki-{time.strftime('%Y%m%d%H%M%S')}" if args.existing else "pki"))
    alice = pki.alice
    pdp = site_policy_point([pki.admin.dn], {vo: {"members": [alice.dn], "admins": [pki.admin.dn]} for vo in VOS})
    ingest = root / "ingest"
    ingest.mkdir(exist_ok=True)
    state = root / "state" / "repository"
    cfg = RepositoryConfig(ingest_dirs=[str(ingest)], gridftp_port=-1)
    rows = []
    compile_bytecode()      # the processes timed start as an installed vmgrid does (see benchgrid)
    try:
        if args.existing:
            import sqlite3

            db = sqlite3.connect(state / "catalogue.sqlite")
            sha, = db.execute("SELECT sha256 FROM images WHERE vo = 'bio' AND name = 'debian12-emboss'").fetchone()
            total, = db.execute("SELECT count(*) FROM images").fetchone()
            db.close()
            seed_name = "debian12-emboss"
        else:
            # -- bulk registration in the core ---------------------------------------------------------------
            registry = Registry(state, cfg, pdp)
            seed = EXAMPLES / "debian12-emboss.xml"
            from services.descriptor import parse_descriptor

            image = make_image(ingest / "seed.qcow2", fill=b"bench-start")
            seed_ws = registry.register(pki.admin, parse_descriptor(seed.read_bytes()), Source("localPath", str(image)))
            sha = seed_ws.findtext("{*}image/{*}sha256")
            rng = random.Random(2004)
            t = time.perf_counter()
            descriptors = [etree.fromstring(text) for text in make_descriptors(args.n + args.peer_n, sha, rng)]
            print(f"# made {len(descriptors)} descriptors in {time.perf_counter() - t:.1f} s", flush=True)

            core = descriptors[:args.n]
            t, c = time.perf_counter(), time.process_time()
            for i in range(0, len(core), 1000):
                registry.import_images(alice, core[i:i + 1000])
            imported_s, imported_cpu = time.perf_counter() - t, time.process_time() - c
            core_load = loadavg()
            print(f"# imported {len(core)} in the core in {imported_s:.1f} s", flush=True)

            peer = descriptors[args.n:]
            t = time.perf_counter()
            for i, ws in enumerate(peer):
                registry.duplicate(alice, "bio/" + seed_ws.findtext("{*}identity/{*}name"), f"dup-{i:06d}")
            dup_s = time.perf_counter() - t
            rows.append(("core: ImportImages, batches of 1000 (validate, authorize, one transaction)",
                         f"{len(core) / imported_s:,.0f} descriptors/s", f"{len(core)} in {imported_s:.1f} s, {imported_cpu:.1f} s of CPU "
                         f"({len(core) / imported_cpu:,.0f}/s per CPU second); {core_load}"))
            rows.append(("core peer: one DuplicateImage per descriptor", f"{len(peer) / dup_s:,.0f} descriptors/s",
                         f"{len(peer)} in {dup_s:.1f} s"))
            t = time.perf_counter()
            registry.close()
            rows.append(("saving the query index at close", f"{time.perf_counter() - t:.2f} s",
                         f"{os.path.getsize(registry.catalogue.index_path) / 2**20:.0f} MiB"))
            total = args.n + args.peer_n + 1

            seed_name = seed_ws.findtext("{*}identity/{*}name")

        # -- the process start, with and without the saved index -------------------------------------------
        config = {
            "container": {"port": 0, "state_dir": str(root / "state"), "threads": 8},
            "security": security_section(pki.cert_dir, pki.host_cert_path, pki.host_key_path),
            "repository": {"ingest_dirs": [str(ingest)], "gridftp_port": -1},
            "policy": {"admins": [pki.admin.dn], "vos": {vo: {"members": [alice.dn]} for vo in VOS}},
        }
        from services.soapclient import GridServiceClient
        from services.vmrepository.client import RepositoryClient

        def start_and_query(label: str, name: str):
            (root / f"{name}.log").unlink(missing_ok=True)     # an --existing run's log names the earlier URL
            t0, spawned = time.perf_counter(), time.time()
            proc = serve(name, ["repository"], config, root, timeout=1800)
            up = time.perf_counter() - t0
            timelines.append((label.split(":")[0], spawned, up, (root / f"{name}.log").read_text(errors="replace")))
            cpu = process_cpu(proc.process.pid)
            label = f"{label}; {cpu:.2f} s of CPU; {loadavg()}"
            client = RepositoryClient(GridServiceClient(proc.url("VMRepositoryService"), alice.proxy, pki.trust()))
            t1 = time.perf_counter()
            result = client.query(["ram >= 4096", "library emboss >= 1.0"], limit=20)
            first = time.perf_counter() - t1
            t2 = time.perf_counter()
            client.query(["ram >= 4096", "library emboss >= 1.0"], limit=20)
            second = time.perf_counter() - t2
            client.service.close()
            return proc, up, first, second, result.total, label

        index = state / "catalogue.sqlite.index"
        runs, timelines = [], []
        if not args.no_rebuild:
            index.unlink(missing_ok=True)
            proc, *rest = start_and_query("no saved index: rebuilt from SQLite (peer: every start before)",
                                          "repository-rebuilt")
            runs.append(rest)
            proc.stop()                                     # the rebuilt index was saved at the start
        for what, code in (("the interpreter alone (`python -c pass`)", "pass"),
                           ("the interpreter and the modules a repository start imports",
                            "import client.cli, services.container.assemble, services.vmrepository.service")):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            rows.append((f"peer: {what}", f"{time.perf_counter() - t:.2f} s", loadavg()))
        proc, *rest = start_and_query("saved index", "repository-saved")
        runs.append(rest)
        url = proc.url("VMRepositoryService")
        for up, first, second, matched, label in runs:
            rows.append((f"start, {total:,} descriptors, {label}: spawn to serving", f"{up:.2f} s", ""))
            rows.append((f"  first signed QueryImages ({matched:,} matching, first 20)", f"{first * 1000:.0f} ms",
                         f"the next one: {second * 1000:.0f} ms"))

        # -- vmgrid repo import DIR end to end --------------------------------------------------------------
        if args.import_n:
            run = time.strftime("%Y%m%d%H%M%S")          # names of their own: an --existing catalogue has earlier runs'
            files = root / f"import-{run}"
            files.mkdir()
            for i, text in enumerate(make_descriptors(args.import_n, sha, random.Random(7), f"imported-{run}")):
                (files / f"d{i:06d}.xml").write_text(text)
            env = {**os.environ, "X509_USER_PROXY": str(alice.proxy_path), "X509_CERT_DIR": str(pki.cert_dir),
                   "VMGRID_REPOSITORY": url, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            t = time.perf_counter()
            server_cpu = process_cpu(proc.process.pid)
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            profile = ["-m", "cProfile", "-o", str(args.profile_import)] if args.profile_import else []
            out = subprocess.run([sys.executable, *profile, "-m", "client.cli", "repo", "import", str(files)], env=env,
                                 capture_output=True, text=True)
            cli_s = time.perf_counter() - t
            server_cpu = process_cpu(proc.process.pid) - server_cpu
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            client_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
            if out.returncode:
                raise SystemExit(f"vmgrid repo import failed: {out.stderr}")
            client = RepositoryClient(GridServiceClient(url, alice.proxy, pki.trust()))
            n_dup = 50
            t = time.perf_counter()
            for i in range(n_dup):
                client.duplicate("bio/" + seed_name, f"soap-dup-{run}-{i:03d}")
            soap_dup_s = time.perf_counter() - t
            client.service.close()
            rows.append((f"`vmgrid repo import DIR`, {args.import_n:,} files (whole command)",
                         f"{args.import_n / cli_s:,.0f} descriptors/s", f"{out.stdout.strip()}; {loadavg()}"))
            rows.append(("  CPU seconds of it: the command / the repository process",
                         f"{client_cpu:.1f} s / {server_cpu:.1f} s",
                         f"{args.import_n / max(client_cpu, server_cpu):,.0f} descriptors per CPU second of the busier"))
            rows.append(("peer: one signed DuplicateImage call per descriptor",
                         f"{n_dup / soap_dup_s:,.0f} descriptors/s", f"{n_dup} in {soap_dup_s:.1f} s"))
            # the stop a site operator makes a while after the import (the query index saved at close; before the
            # background catch-up, close also read every imported descriptor into it first)
            time.sleep(args.stop_after)
            t = time.perf_counter()
            proc.stop()
            rows.append((f"stop (SIGTERM to exit) {args.stop_after:g} s after the import", f"{time.perf_counter() - t:.2f} s",
                         loadavg()))
        proc.stop()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"# kept {root}")
    for label, spawned, up, text in timelines:
        print(f"\nstart timeline, {label} (seconds after the spawn; each step ends at its mark):")
        for step, at in start_timeline(text, spawned, up):
            print(f"  {at:7.3f}  {step}")
    width = max(len(r[0]) for r in rows)
    print()
    for what, figure, note in rows:
        print(f"{what:<{width}}  {figure:>22}  {note}")
    print("\ngoals: first query after a start <= 1 s, start-up to serving <= 2 s, import >= 2,000 descriptors/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
