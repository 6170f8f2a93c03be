"""`vmgrid demo --real`: the poster's scene on real QEMU guests. The EMBOSS image is built from its recipe
(or taken from the builder's cache), registered, found by its library version, deployed on three
VMManager nodes in bridge mode (distinct reachable addresses); in each guest the grid container's job
service runs EMBOSS's tmap (with its PNG plot) and needle on files staged in, the outputs come back
verified; the guests' clocks are checked after a pause and resume; everything is destroyed and a report
(Markdown, the PNGs, the phase figure) is written under --workdir.

Needs root (debootstrap, QEMU, a bridge). The grid runs inside a network namespace made for it
(vgdemo-<hex>, removed at the end): its bridge and taps never touch the machine's own network.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from client.cli import CLIError
from client.output import emit_descriptors, table

BRIDGE, NETWORK, GATEWAY = "vgdemobr0", "10.79.0.0/24", "10.79.0.1"
NODES = 3
# seconds between two status calls while waiting: each is a signed call, and a job's status is answered by
# the guest's job service on the guest's one emulated CPU, which the job itself needs (a tenth of a second
# would keep that CPU busy answering instead of running EMBOSS)
POLL = 1.0
# bacteriorhodopsin (Halobacterium salinarum), seven transmembrane helices
TM_PROTEIN = ("MLELLPTAVEGVSQAQITGRPEWIWLALGTALMGLGTLYFLVKGMGVSDPDAKKFYAITTLVPAIAFTMYLSMLLGYGLTMVPFGGEQNPIYWARYADWLFTTPLL"
              "LLDLALLVDADQGTILALVGADGIMIGTGLVGALTKVYSYRFVWWAISTAAMLYILYVLFFGFTSKAESMRPEVASTFKVLRNVTVVLWSAYPVVWLIGSEGAG"
              "IVPLNIETLLFMVLDVSAKVGFGLILLRSRAIFGEAEAPEPSAGDGAAATSD")
# human and mouse ubiquitin-like fragments for needle
SEQ_A = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
SEQ_B = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"[:-10] + "KESTLHLVLR"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def job_client(info, credential, trust, timeout: float = 900.0):
    """The job service of a Running instance, once it listens (guestd starts it when the node's certificate
    arrives; Python starting under QEMU's TCG takes a while)."""
    from client.soap import GridServiceClient, Unreachable
    from services.jobs.client import JobClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            return JobClient(GridServiceClient(info.job_service["url"], credential, trust,
                                               expected_host_dn=info.job_service["dn"]))
        except Unreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def fasta(name: str, seq: str) -> str:
    return f">{name}\n" + "\n".join(seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n"


def run(args) -> int:
    """The outer process: build or reuse the image (needs the network), then the scene in a namespace."""
    if os.geteuid() != 0:
        raise CLIError("vmgrid demo --real needs root (debootstrap, QEMU, a bridge in a network namespace)")
    for tool in ("qemu-system-x86_64", "ip", "qemu-img"):
        if shutil.which(tool) is None:
            raise CLIError(f"{tool} is missing (./run.sh setup installs what vmgrid needs)")
    from guestd.image.build import DEFAULT_CACHE, ImageBuildError, build, image_key
    from guestd.image.recipe import load_recipe
    from guestd.image.runtime import RuntimeCopyError

    from client.demo import prepare_workdir

    work = prepare_workdir(args.workdir)
    say("the EMBOSS image: built from its recipe (guestd/image/recipes/emboss.toml) or taken from the cache")
    t = time.monotonic()
    recipe = load_recipe("emboss")
    try:
        key = image_key(recipe)
        cached = (DEFAULT_CACHE / f"{recipe.name}-{key}" / "manifest.json").exists()
        image = build(recipe="emboss", log=lambda m: print(f"  {m}", flush=True))
    except (ImageBuildError, RuntimeCopyError) as exc:
        raise CLIError(f"building the EMBOSS image: {exc}") from None
    build_seconds = time.monotonic() - t
    print(f"image {image.name} ({key}): {image.rootfs} "
          f"({'from the cache' if cached else 'built'} in {build_seconds:.1f} s)")
    namespace = f"vgdemo-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "dev", "lo", "up"], check=True)
        print(f"network namespace {namespace}: the grid, its bridge {BRIDGE} ({NETWORK}) and the guests live there")
        # The scene in a session of its own: Ctrl-C reaches this process only, which hands it on once and waits
        # while the scene destroys its guests and stops its grid (subprocess.run would SIGKILL it at once,
        # leaving the grid's processes and QEMU guests running)
        proc = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-m", "client.demo_real",
                                 str(image.directory), str(work), f"{build_seconds:.3f}",
                                 "cached" if cached else "built", f"{t:.3f}"], start_new_session=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            print("vmgrid: interrupted: destroying the demo's guests and stopping its grid (Ctrl-C again: "
                  "at once, leaving them)", file=sys.stderr, flush=True)
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
            raise
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def scene(image_dir: Path, work: Path, build_seconds: float, how: str, run_started: float | None = None) -> int:
    """The scene itself, inside the namespace; ``run_started``: when the run began, before the image (the monotonic
    clock, the same in the parent process)."""
    from client.localgrid import LocalGrid
    from client.report import Deployment, draw, print_report
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from client.vmmanager import VMManagerClient
    from guestd.image.build import GuestImage
    from security.trust import TrustStore
    from services.authz.edit import site_policy
    from services.authz.policy import Group
    from services.descriptor import parse_descriptor
    from services.jobs.store import JobSpec, StageOut
    from services.vmmanager.network import NodeBridge

    started = time.monotonic()
    image = GuestImage.load(image_dir)
    timings: dict[str, float] = {"image build" if how == "built" else "image (cached)": build_seconds}
    report: dict = {"image": {"name": image.name, "how": how, "seconds": build_seconds}, "instances": {}}
    # short paths: a guest channel socket's path must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="vgd-", dir="/tmp"))
    grid = LocalGrid(root / "g")
    admin, alice, bob = grid.user("repo-admin"), grid.user("alice"), grid.user("bob")
    trust = TrustStore(grid.cert_dir)
    deployed: list = []
    vms: list = []
    try:
        say("the grid: a fresh PKI; the Authorization service and the VMRepository; three VMManager nodes on "
            f"QEMU in bridge mode ({BRIDGE}, {NETWORK}), each issuing its guests' container certificates")
        images = root / "images"
        images.mkdir()
        grid.start_central(site_policy(admins=[admin.dn], groups=[
            Group("bio", members=(alice.dn,), admins=(admin.dn,), description="bioinformatics VO"),
            Group("hep", members=(bob.dn,), admins=(admin.dn,), description="high-energy physics VO")]), images)
        nodes = []
        for n in range(1, NODES + 1):
            proc = grid.start_node(f"node{n}", {
                "vmm": "qemu", "vmm_root": str(root / f"q{n}"), "network": NETWORK, "gateway": GATEWAY,
                "lease_range": f"10.79.0.{10 * n}-10.79.0.{10 * n + 4}", "nic_kind": "bridge", "nic_source": BRIDGE,
                "manage_bridge": True, "guest_ready_timeout": 900.0, "sweep_interval": 0.5,
                "guest_ca": str(grid.ca.directory), "job_admins": [admin.dn]}, )
            nodes.append(proc.base_url + "/wsrf/services/VMManagerService")
        table(["service", "url"], [("Authorization + VMRepository", grid.services_url)]
              + [(f"VMManagerService (node{n + 1})", u) for n, u in enumerate(nodes)])
        repo = RepositoryClient(GridServiceClient(f"{grid.services_url}/VMRepositoryService", admin.credential, trust))
        as_alice = RepositoryClient(GridServiceClient(f"{grid.services_url}/VMRepositoryService",
                                                      alice.credential, trust))

        say("the site admin registers the image and the descriptor the builder derived from it, unchanged")
        t = time.monotonic()
        try:        # the repository only reads its ingest directory (it copies into its store): a link will do
            os.link(image.rootfs, images / image.rootfs.name)
        except OSError:         # another file system
            shutil.copyfile(image.rootfs, images / image.rootfs.name)
        registered = repo.register(parse_descriptor(image.descriptor.read_bytes()),
                                   local_path=str(images / image.rootfs.name))
        timings["register"] = time.monotonic() - t
        emit_descriptors([registered], "table")

        say("alice looks for EMBOSS 6.6 or newer:  vmgrid repo query 'library emboss >= 6.6'")
        found = as_alice.query(["library emboss >= 6.6"])
        emit_descriptors(found.descriptors, "table", total=found.total, offset=found.offset)
        descriptor = found.descriptors[0]

        say(f"alice deploys it on the {NODES} nodes; each guest's guestd sets its leased address on the bridge "
            "and starts the job service with a certificate its node issued")
        vms = [VMManagerClient(GridServiceClient(u, alice.credential, trust)) for u in nodes]
        t = time.monotonic()
        refs = [vm.deploy(descriptor, f"emboss-{n + 1}", 3600).ref for n, vm in enumerate(vms)]
        infos = []
        for n, (vm, ref) in enumerate(zip(vms, refs)):
            info = vm.wait_for(ref, ("Running", "Failed"), timeout=1200, interval=POLL)
            deployed.append((vm, info))
            infos.append(info)
            report["instances"][info.identifier] = {"node": info.node, "address": info.address,
                                                    "ready_seconds": time.monotonic() - t,
                                                    "phases": info.phases, "state": info.state}
            if info.state != "Running" or not info.job_service:
                raise RuntimeError(f"{info.identifier} on {info.node}: {info.state}: "
                                   f"{info.failure or info.guest_status}")
        timings["deploy to ready (all 3)"] = time.monotonic() - t
        table(["instance", "node", "state", "address", "job service", "ready after"],
              [(i.identifier, i.node, i.state, i.address, i.job_service["url"],
                f"{report['instances'][i.identifier]['ready_seconds']:.1f} s") for i in infos])

        say("in each guest, through its job service (signed, as alice): tmap with its PNG plot on "
            "bacteriorhodopsin, needle on two sequences; the inputs staged in over GridFTP")
        inputs = work / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        (inputs / "bacteriorhodopsin.fasta").write_text(fasta("bacteriorhodopsin", TM_PROTEIN))
        (inputs / "a.fasta").write_text(fasta("seqA", SEQ_A))
        (inputs / "b.fasta").write_text(fasta("seqB", SEQ_B))
        jobs = []
        t = time.monotonic()
        for info in infos:
            jc = job_client(info, alice.credential, trust)
            tm = jc.stage_local(inputs / "bacteriorhodopsin.fasta")
            a, b = jc.stage_local(inputs / "a.fasta"), jc.stage_local(inputs / "b.fasta")
            tmap = jc.submit(JobSpec("tmap", ("-sequence", "bacteriorhodopsin.fasta", "-graph", "png", "-goutfile",
                                              "tmap", "-outfile", "tmap.txt", "-auto"), stage_in=(tm,),
                                     stage_out=(StageOut("tmap.1.png"), StageOut("tmap.txt"))))
            needle = jc.submit(JobSpec("needle", ("-asequence", "a.fasta", "-bsequence", "b.fasta", "-gapopen", "10",
                                                  "-gapextend", "0.5", "-outfile", "needle.txt", "-auto"),
                                       stage_in=(a, b), stage_out=(StageOut("needle.txt"),)))
            jobs += [(info, jc, "tmap", tmap, time.monotonic()), (info, jc, "needle", needle, time.monotonic())]
        rows = []
        results = work / "results"
        for info, jc, what, key, submitted in jobs:
            done = jc.wait(key, timeout=900, interval=POLL)
            turnaround = time.monotonic() - submitted
            t_fetch = time.monotonic()
            files = jc.fetch_outputs(done, results / info.identifier / what) if done.state == "Done" else []
            fetch = time.monotonic() - t_fetch
            rows.append((info.identifier, what, done.state, done.exit_code, f"{turnaround:.1f} s", f"{fetch:.1f} s",
                         ", ".join(f"{p.name} ({p.stat().st_size} B)" for p in files)))
            report["instances"][info.identifier].setdefault("jobs", []).append(
                {"program": what, "state": done.state, "exit": done.exit_code, "turnaround": turnaround,
                 "fetch": fetch, "failure": done.failure,
                 "outputs": [{"name": p.name, "size": p.stat().st_size,
                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]})
        timings["jobs (6, submit to fetched)"] = time.monotonic() - t
        table(["instance", "program", "state", "exit", "turnaround", "fetch", "outputs (sha256-verified)"], rows)
        failed = [r for r in rows if r[2] != "Done"]
        for info in infos:
            png = results / info.identifier / "tmap" / "tmap.1.png"
            if png.is_file():
                shutil.copyfile(png, work / f"tmap-{info.identifier}.png")
            needle = results / info.identifier / "needle" / "needle.txt"
            if needle.is_file():
                line = next((l for l in needle.read_text().splitlines() if l.startswith("# Identity")), "")
                report["instances"][info.identifier]["needle_identity"] = line.removeprefix("# Identity:").strip()
                print(f"{info.identifier}: needle {line.strip()}")

        say("clocks: alice pauses the three guests for 10 s and resumes them; the node sets each guest's clock "
            "on resume; a job in each prints the guest's time")
        for vm, info in deployed:
            vm.pause(info.ref)
        time.sleep(10)
        for vm, info in deployed:
            vm.resume(info.ref)
        clock_rows = []
        for info in infos:
            jc = job_client(info, alice.credential, trust)
            before = time.time()
            key = jc.submit(JobSpec("python3", ("-c", "import time; print(repr(time.time()))")))
            done = jc.wait(key, timeout=300, interval=POLL)
            after = time.time()
            guest = float(done.stdout_tail.strip() or "nan")
            inside = before <= guest <= after
            clock_rows.append((info.identifier, f"{before:.2f}", f"{guest:.2f}", f"{after:.2f}",
                               "yes" if inside else f"no ({guest - after:+.1f} s)"))
            report["instances"][info.identifier]["clock"] = {"host_before": before, "guest": guest,
                                                             "host_after": after, "in_window": inside}
        table(["instance", "host before", "guest time", "host after", "guest clock within"], clock_rows)

        say("alice destroys the three instances")
        for vm, info in deployed:
            vm.destroy(info.ref)
            print(f"{info.identifier}: destroyed")
        deployed = []

        say("the deployment phases (the poster's figure) and the report")
        history = [Deployment(f"{i.identifier}@{i.node}", tuple(i.phases)) for i in infos if i.phases]
        print_report(history, sys.stdout)
        figure = draw(history, work / "phases.png", "vmgrid demo --real: share of each deployment phase")
        now = time.monotonic()
        line = finish_timings(timings, how, build_seconds, grid_seconds=now - started,
                              total_seconds=now - (run_started if run_started is not None else started - build_seconds))
        report["timings"] = timings
        write_report(work, report, infos)
        (work / "report.json").write_text(json.dumps(report, indent=1, default=str))
        say(f"{line}; report {work / 'report.md'}, figure {figure}")
        if failed or not all(i.get("clock", {}).get("in_window") for i in report["instances"].values()):
            print("vmgrid: some jobs failed or a guest clock was off (see the report)", file=sys.stderr)
            return 1
        return 0
    finally:
        # every instance alice still has (one interrupted mid-deploy too): a node that stops leaves its QEMU
        # guests running, and the namespace whose bridge they use goes away
        for vm in vms:
            try:
                live = [i for i in vm.list() if i.state not in ("Destroyed", "Failed")]
            except Exception:  # noqa: BLE001 - cleaning up: the known ones below
                live = [info for v, info in deployed if v is vm]
            for info in live:
                try:
                    vm.destroy(info.ref)
                except Exception:  # noqa: BLE001 - cleaning up after a failure
                    pass
        state = grid.root / "node1" / "vmmanager"
        grid.stop_all()
        try:
            NodeBridge(BRIDGE, GATEWAY, NETWORK, state).teardown()
        except Exception:  # noqa: BLE001 - the namespace goes away anyway
            pass
        for n in range(1, NODES + 1):
            log = grid.root / f"node{n}.log"
            if log.is_file():
                shutil.copyfile(log, work / f"node{n}.log")
        shutil.rmtree(root, ignore_errors=True)


def finish_timings(timings: dict[str, float], how: str, build_seconds: float, *, grid_seconds: float,
                   total_seconds: float) -> str:
    """The last rows of the report's Timings, and the run's last line: the total is the whole run, the image's build
    (or its lookup in the cache) included, and the grid's part (register to destroyed) is named as such. The line
    said `done in 203.0 s (image built)` after a 356 s build, and report.md showed a `total` below the build's row
    smaller than it (trial14b V11)."""
    timings["the grid (register to destroyed)"] = grid_seconds
    timings["total (the image included)"] = total_seconds
    image = f"image built in {build_seconds:.1f} s" if how == "built" else f"image from the cache in {build_seconds:.1f} s"
    return f"done in {total_seconds:.1f} s ({image}, the grid's part {grid_seconds:.1f} s)"


def write_report(work: Path, report: dict, infos) -> Path:
    lines = ["# vmgrid demo --real", "",
             "The poster's scene on real QEMU guests: the EMBOSS image registered, found by library version, "
             "deployed on three nodes (bridge mode), EMBOSS jobs through each guest's job service.", "",
             "## Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    lines += ["", "## Instances", "", "| instance | node | address | ready after (s) | needle identity | "
              "guest clock after pause/resume |", "|---|---|---|---|---|---|"]
    for name, inst in report["instances"].items():
        clock = inst.get("clock", {})
        lines.append(f"| {name} | {inst['node']} | {inst['address']} | {inst['ready_seconds']:.1f} | "
                     f"{inst.get('needle_identity', '-')} | "
                     f"{'within the host window' if clock.get('in_window') else clock} |")
    lines += ["", "## Jobs", "", "| instance | program | state | exit | turnaround (s) | outputs |", "|---|---|---|---|---|---|"]
    for name, inst in report["instances"].items():
        for j in inst.get("jobs", []):
            outs = ", ".join(f"{o['name']} ({o['size']} B, sha256 {o['sha256'][:12]}…)" for o in j["outputs"])
            lines.append(f"| {name} | {j['program']} | {j['state']} | {j['exit']} | {j['turnaround']:.1f} | {outs} |")
    lines += ["", "## tmap plots", ""]
    lines += [f"![tmap on {i.identifier}](tmap-{i.identifier}.png)" for i in infos
              if (work / f"tmap-{i.identifier}.png").is_file()]
    lines += ["", "## Deployment phases", "", "![phases](phases.png)", ""]
    path = work / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    try:
        sys.exit(scene(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4],
                       float(sys.argv[5]) if len(sys.argv) > 5 else None))
    except KeyboardInterrupt:           # handed on by `vmgrid demo --real`; the scene cleaned up after itself
        sys.exit(130)
