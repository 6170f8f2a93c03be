"""Signed against unsigned calls through the real grid container hosting the VMRepository (issue 3 at
container level): round-trip p50/p90 and calls/s, 1 client and 4 concurrent clients, in one run.

    .venv/bin/python bench/bench_container.py [--calls 300] [--repeat 3] [--workers 2] [--no-tls]

The server: `services.container` (asyncio + h11 front end, TLS from the host certificate) with the real VMRepositoryService
(built-in VO policy, SQLite catalogue holding 6 images, no GridFTP), in its own process.
  signed    the container as `vmgrid serve repository` builds it: WSMiddleware verifies every request
            (X.509 proxy chain, signature, timestamp, replay cache in SQLite) and signs every response.
  unsigned  THE PEER: the same container, service and TLS, with the WS-Security middleware replaced by one
            that parses the request with security.safexml and hands the service a fixed caller (alice's
            identity, validated once at start); responses are not signed.
The difference is what WS-Security costs in the container, end to end.

Clients are processes on the same 2 cores (lean clients, no zeep: lxml envelopes with WS-Addressing headers,
one keep-alive HTTPS session each):
  round trip  the client signs each request and verifies each response inside the timed call (what a
              caller pays; the client's signing and verifying run on the same cores as the server).
  capacity    the requests are signed before the timed loop and the responses verified after it, so the
              timed loop measures the container (its calls/s with 4 clients is the one for the >= 300 calls/s goal).
Also: a row through the zeep client (client.soap.GridServiceClient), and signed capacity with --workers
container processes sharing the port (SO_REUSEPORT, set by this benchmark on the container: the
container has no worker setting yet).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchgrid import (REPO, BenchError, fmt_s, loadavg, log, machine_facts, openssl_speed_rsa2048, p50,  # noqa: E402
                       percentile, signature_floor, stop_process, table)
from lxml import etree  # noqa: E402

from client.localgrid import write_toml  # noqa: E402

REPO_NS = "http://vmgrid.org/ns/vmrepository/1"
WSA = "http://www.w3.org/2005/08/addressing"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
SERVICE = "VMRepositoryService"
WARMUP = 20
OPERATIONS = ("ListVOs", "QueryImages20")   # QueryImages20: a QueryImages answering 20 descriptors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server process ---------------------------------------------------------------------------------
class UnsignedPeer:
    """The peer of WSSecurityMiddleware: the request parsed by the hardened parser and a fixed, already
    validated caller handed to the application; nothing verified, nothing signed."""

    def __init__(self, app, caller):
        self.app = app
        self.caller = caller

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "POST":
            from security import safexml
            from services.container.app import CALLER_KEY, ENVELOPE_KEY

            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ[ENVELOPE_KEY] = safexml.parse(body)
            environ[CALLER_KEY] = self.caller
            environ["wsgi.input"] = io.BytesIO(body)
        return self.app(environ, start_response)


def serve_main(argv: list[str]) -> int:
    """`bench_container.py _serve CONFIG signed|unsigned CALLER_PROXY [--reuse-port]`: one container process."""
    from security.pki import load_credential
    from security.tls import server_ssl_adapter
    from services.container.assemble import (build_container, build_service, certificate_host, host_credential,
                                             trust_store)
    from services.container.config import load_config
    from services.container.server import Container

    config_path, mode, caller_proxy = argv[:3]
    reuse = "--reuse-port" in argv
    cfg = load_config(config_path)
    logging_setup(cfg)
    service = build_service("repository", cfg)
    if mode == "signed":
        container = build_container(cfg, [service])
    else:
        caller = trust_store(cfg).validate(load_credential(proxy=caller_proxy).certificates)
        adapter = server_ssl_adapter(host_credential(cfg)) if cfg.container.tls else None
        container = Container([service], host=cfg.container.host, port=cfg.container.port,
                              middleware=lambda app: UnsignedPeer(app, caller), ssl_adapter=adapter,
                              threads=cfg.container.threads, public_host=certificate_host(host_credential(cfg)))
    container.reuse_port = reuse
    signal.signal(signal.SIGTERM, _interrupt)
    container.start()
    print(f"ready {container.base_url}", flush=True)
    container.serve_forever()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def logging_setup(cfg) -> None:
    from services.container.cli import setup_logging

    setup_logging(cfg.container.log_level, cfg.container.log_file)


class Servers:
    """``workers`` container processes (SO_REUSEPORT when more than one) on one port."""

    def __init__(self, config: Path, mode: str, caller_proxy: Path, workers: int, logfile: Path):
        self.procs: list[subprocess.Popen] = []
        args = [sys.executable, str(Path(__file__).resolve()), "_serve", str(config), mode, str(caller_proxy)]
        if workers > 1:
            args.append("--reuse-port")
        try:
            for _ in range(workers):
                out = open(logfile, "ab")
                p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=out, cwd=REPO, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
                out.close()
                self.procs.append(p)
                line = p.stdout.readline()
                if not line.startswith("ready "):
                    raise BenchError(f"container did not start: {line!r}; see {logfile}")
                self.base_url = line.split()[1]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)
        self.procs.clear()


# -- the clients ----------------------------------------------------------------------------------------------
def wire_op(op: str) -> str:
    """The WSDL operation of a benchmark operation (QueryImages20: QueryImages answering 20 descriptors)."""
    return "QueryImages" if op.startswith("QueryImages") else op


def payload(op: str) -> etree._Element:
    if op == "ListVOs":
        return etree.Element(f"{{{REPO_NS}}}ListVOs", nsmap={"repo": REPO_NS})
    q = etree.Element(f"{{{REPO_NS}}}QueryImages", nsmap={"repo": REPO_NS})
    c = etree.SubElement(etree.SubElement(etree.SubElement(q, f"{{{REPO_NS}}}criteria"), f"{{{REPO_NS}}}group"),
                         f"{{{REPO_NS}}}criterion")
    threshold, limit = ("1", "20") if op == "QueryImages20" else ("256", "3")
    for name, text in (("field", "memory"), ("operator", ">="), ("value", threshold)):
        etree.SubElement(c, f"{{{REPO_NS}}}{name}").text = text
    etree.SubElement(q, f"{{{REPO_NS}}}limit").text = limit
    return q


def envelope(url: str, op: str) -> etree._Element:
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"soapenv": SOAP})
    header = etree.SubElement(env, f"{{{SOAP}}}Header")
    op = wire_op(op)
    for name, text in (("Action", f"{REPO_NS}/{op}"), ("MessageID", f"urn:uuid:{uuid.uuid4()}"), ("To", url)):
        el = etree.SubElement(header, f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        el.text = text
    etree.SubElement(env, f"{{{SOAP}}}Body").append(payload(op))
    return env


def client_main(url: str, op: str, signed: bool, presign: bool, pki: dict, calls: int, barrier, out) -> None:
    """One client process: WARMUP calls, the barrier, then ``calls`` timed calls."""
    from security import safexml
    from security.pki import load_credential
    from security.tls import grid_session
    from security.trust import TrustStore
    from security.wssec import sign_envelope, verify_envelope

    try:
        proxy = load_credential(proxy=pki["proxy"])
        trust = TrustStore(pki["cert_dir"])
        session = grid_session(pki["cert_dir"])
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{REPO_NS}/{wire_op(op)}"'}
        answer = f"{{{REPO_NS}}}{wire_op(op)}Response"

        def encode() -> bytes:
            env = envelope(url, op)
            return sign_envelope(env, proxy) if signed else etree.tostring(env, xml_declaration=True,
                                                                           encoding="utf-8")

        def check(status: int, content: bytes) -> None:
            if signed:
                _, root = verify_envelope(content, trust, expected_signer=pki["host_dn"])
            else:
                root = safexml.parse(content)
            body = root.find(f"{{{SOAP}}}Body")
            if status != 200 or body is None or body[0].tag != answer:
                raise BenchError(f"bad answer {status}: {content[:400]!r}")

        for _ in range(WARMUP):
            r = session.post(url, data=encode(), headers=headers)
            check(r.status_code, r.content)
        messages = [encode() for _ in range(calls)] if presign else None
        barrier.wait(300)
        latencies, responses = [], []
        start = time.monotonic()
        for i in range(calls):
            t = time.perf_counter()
            r = session.post(url, data=messages[i] if presign else encode(), headers=headers)
            if presign:
                responses.append((r.status_code, r.content))
            else:
                check(r.status_code, r.content)
            latencies.append(time.perf_counter() - t)
        end = time.monotonic()
        for status, content in responses:      # capacity runs: every response still verified, after the clock
            check(status, content)
        out.put({"lat": latencies, "start": start, "end": end})
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) the processes have used so far, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])          # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def run_clients(url: str, op: str, signed: bool, presign: bool, pki: dict, clients: int, calls: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(url, op, signed, presign, pki, calls, barrier, out), daemon=True)
             for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=900) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise BenchError("; ".join(errors))
    lat = [x for r in results for x in r["lat"]]
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"lat": lat, "rate": len(lat) / window}


def zeep_round_trips(url: str, pki_obj, op: str, calls: int) -> dict:
    """The same call through vmgrid's zeep client (what `vmgrid repo` uses), one client, in this process."""
    from client.soap import GridServiceClient

    client = GridServiceClient(url, pki_obj.alice.proxy, pki_obj.trust())
    kwargs = {} if op == "ListVOs" else {"criteria": {"group": [{"criterion": [
        {"field": "memory", "operator": ">=", "value": "256"}]}]}, "limit": 3}
    for _ in range(WARMUP):
        client.call(op, **kwargs)
    lat = []
    start = time.monotonic()
    for _ in range(calls):
        t = time.perf_counter()
        client.call(op, **kwargs)
        lat.append(time.perf_counter() - t)
    return {"lat": lat, "rate": len(lat) / (time.monotonic() - start)}


def pooled(results: list[dict]) -> dict:
    """Repeats of one configuration: percentiles over all calls, the median of the runs' calls/s."""
    lat = [x for r in results for x in r["lat"]]
    loads = [r["load"] for r in results]
    cpu = [r["cpu"] for r in results if "cpu" in r]
    return {"p50": p50(lat), "p90": percentile(lat, 90), "rate": statistics.median(r["rate"] for r in results),
            "n": len(lat), "runs": len(results), "load": f"{min(loads):.1f}-{max(loads):.1f}",
            "cpu": f"{statistics.median(cpu) * 1000:.2f} ms" if cpu else "-"}


# -- main ----------------------------------------------------------------------------------------------------
def make_config(root: Path, pki, tls: bool) -> Path:
    ingest = root / "ingest"
    ingest.mkdir(exist_ok=True)
    config = {
        "container": {"host": "127.0.0.1", "port": free_port(), "state_dir": str(root / "state"), "tls": tls,
                      "log_level": "warning"},
        "security": {"cert_dir": str(pki.cert_dir), "host_cert": str(pki.host_cert_path),
                     "host_key": str(pki.host_key_path)},
        "repository": {"ingest_dirs": [str(ingest)], "gridftp_port": -1},
        "policy": {"admins": [pki.admin.dn],
                   "vos": {"bio": {"members": [pki.alice.dn], "admins": [pki.admin.dn]},
                           "hep": {"members": [pki.bob.dn], "admins": [pki.admin.dn]}}},
    }
    path = root / "container.toml"
    write_toml(path, config)
    return path


def populate(url: str, pki, ingest: Path, alice_images: int = 4) -> int:
    """Six images in two VOs (four of them alice's VO), registered by the admin; with ``alice_images`` > 4,
    more copies of debian12-emboss (alice's VO) until she can see that many."""
    from client.repository import RepositoryClient
    from client.soap import GridServiceClient
    from guestd.image.sample import make_sample_image
    from services.descriptor import parse_descriptor, set_field
    from tests.fixtures.repository import EXAMPLES

    admin = RepositoryClient(GridServiceClient(url, pki.admin.proxy, pki.trust()))
    n = 0
    for example in ("debian12-emboss", "debian12-emboss-bigmem", "sl4-blast", "debian12-hep"):
        copies = 2 if example.startswith("debian12-emboss") else 1
        if example == "debian12-emboss":
            copies += max(alice_images - 4, 0)
        for copy in range(copies):
            ws = parse_descriptor((EXAMPLES / f"{example}.xml").read_bytes())
            name = f"{example}-{copy}"
            set_field(ws, "identity", "name", name)
            fmt = ws.findtext("{*}image/{*}format")
            image = ingest / f"{name}.{fmt}"
            if fmt == "qcow2":
                make_sample_image(image, 16, data=name.encode())
            else:
                image.write_bytes(name.encode() * 4096)
            admin.register(ws, local_path=str(image))
            n += 1
    return n


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        return serve_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300, help="timed calls per client and run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration, interleaved")
    ap.add_argument("--workers", type=int, default=2, help="container processes for the SO_REUSEPORT rows (1: none)")
    ap.add_argument("--no-tls", dest="tls", action="store_false", help="plain HTTP (messages still signed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vmgrid-bench-container-", dir="/tmp"))
    print(f"vmgrid container benchmark: {machine_facts()}, {args.calls} calls per client, "
          f"{args.repeat} interleaved runs per configuration, {'HTTPS' if args.tls else 'HTTP'} on loopback")
    servers = None
    try:
        pki = build_grid_pki(root / "pki")
        config = make_config(root, pki, args.tls)
        logfile = root / "container.log"
        pkid = {"cert_dir": str(pki.cert_dir), "proxy": str(pki.alice.proxy_path), "host_dn": pki.host.subject}
        servers = Servers(config, "signed", pki.alice.proxy_path, 1, logfile)
        url = f"{servers.base_url.replace('127.0.0.1', 'localhost')}/wsrf/services/{SERVICE}"
        images = populate(url, pki, root / "ingest", alice_images=20)
        servers.stop()
        log(f"registered {images} images; measuring")

        plan = []                    # (op, mode, kind, clients, workers)
        for op in OPERATIONS:
            for clients in (1, 4):
                for mode in ("unsigned", "signed"):
                    plan.append((op, mode, "round trip", clients, 1))
        for clients in (1, 4):
            for mode in ("unsigned", "signed"):
                plan.append(("ListVOs", mode, "capacity", clients, 1))
        if args.workers > 1:
            plan.append(("ListVOs", "signed", "round trip", 4, args.workers))
            plan.append(("ListVOs", "signed", "capacity", 4, args.workers))
        plan.append(("ListVOs", "signed", "zeep", 1, 1))
        results: dict[tuple, list[dict]] = {key: [] for key in plan}
        floors: list[dict] = []
        floor_keys = [pki.alice.proxy.private_key, pki.host.private_key]
        for rep in range(args.repeat):           # interleaved, so a change of load hits every configuration
            floors.append(signature_floor(floor_keys))
            log(f"  [{rep + 1}/{args.repeat}] floor: two RSA-2048 signatures {fmt_s(floors[-1]['sign'])}")
            for key in plan:
                op, mode, kind, clients, workers = key
                servers = Servers(config, mode, pki.alice.proxy_path, workers, logfile)
                try:
                    u = f"{servers.base_url.replace('127.0.0.1', 'localhost')}/wsrf/services/{SERVICE}"
                    if kind == "zeep":
                        r = zeep_round_trips(u, pki, op, args.calls)
                    else:
                        cpu0 = process_cpu([p.pid for p in servers.procs])
                        r = run_clients(u, op, mode == "signed", kind == "capacity", pkid, clients, args.calls)
                        # the container's CPU per call, warm-up calls included (they are in the same window)
                        r["cpu"] = (process_cpu([p.pid for p in servers.procs]) - cpu0) / (clients * (WARMUP + args.calls))
                finally:
                    servers.stop()
                r["load"] = os.getloadavg()[0]
                results[key].append(r)
                log(f"  [{rep + 1}/{args.repeat}] {op:<11} {mode:<8} {kind:<10} {clients} client(s) {workers} "
                    f"worker(s): p50 {fmt_s(p50(r['lat']))}, {r['rate']:.0f} calls/s, load {r['load']:.1f}"
                    + (f", container CPU {r['cpu'] * 1000:.2f} ms/call" if "cpu" in r else ""))
        rows = [(*key, pooled(rs)) for key, rs in results.items()]
        floor = statistics.median(f["sign"] for f in floors)
        floor_verify = statistics.median(f["verify"] for f in floors)
        openssl = openssl_speed_rsa2048()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        if servers is not None:
            servers.stop()
        if not args.keep:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"kept {root}")

    print(f"\nfinished with {loadavg()}; p50/p90 over all calls of the runs, calls/s the median run\n")
    print(table(("operation", "mode", "client", "clients", "workers", "p50", "p90", "calls/s", "container CPU/call",
                 "load (1 min)"),
                [(op, mode, kind, c, w, fmt_s(r["p50"]), fmt_s(r["p90"]), f"{r['rate']:.0f}", r["cpu"], r["load"])
                 for op, mode, kind, c, w, r in rows]))
    find = {(op, mode, kind, c, w): r for op, mode, kind, c, w, r in rows}
    print("signed vs unsigned (same operation, clients, kind; 1 container process):")
    verdicts = []
    for op in OPERATIONS:
        for clients in (1, 4):
            u, s = find[(op, "unsigned", "round trip", clients, 1)], find[(op, "signed", "round trip", clients, 1)]
            print(f"  {op:<11} round trip, {clients} client(s): p50 +{(s['p50'] - u['p50']) * 1000:.2f} ms "
                  f"({s['p50'] / u['p50']:.2f}x), calls/s {s['rate']:.0f} vs {u['rate']:.0f} "
                  f"({s['rate'] / u['rate']:.2f}x)")
    for clients in (1, 4):
        u, s = find[("ListVOs", "unsigned", "capacity", clients, 1)], find[("ListVOs", "signed", "capacity", clients, 1)]
        print(f"  ListVOs     capacity,   {clients} client(s): p50 +{(s['p50'] - u['p50']) * 1000:.2f} ms "
              f"({s['p50'] / u['p50']:.2f}x), calls/s {s['rate']:.0f} vs {u['rate']:.0f} ({s['rate'] / u['rate']:.2f}x)")
    print(f"the floor, same run: two RSA-2048 signatures (alice's proxy key, the host key; cryptography) "
          f"{floor * 1000:.2f} ms p50 (+ the two verifications {floor_verify * 1000:.2f} ms)"
          + (f"; openssl speed rsa2048: {openssl * 1000:.2f} ms per signature" if openssl else ""))
    for op in OPERATIONS:
        added = find[(op, "signed", "round trip", 1, 1)]["p50"] - find[(op, "unsigned", "round trip", 1, 1)]["p50"]
        verdicts.append(f"added p50, {op}, 1 client, whole round trip (client signs + verifies too): "
                        f"{added * 1000:.2f} ms = {added / floor:.2f}x the two-signature floor (goal <= 2x): "
                        f"{'MET' if added <= 2 * floor else 'NOT MET'}")
    server = (find[("ListVOs", "signed", "capacity", 1, 1)]["p50"] - find[("ListVOs", "unsigned", "capacity", 1, 1)]["p50"])
    verdicts.append(f"added p50, ListVOs, 1 client, in the container only (capacity rows): {server * 1000:.2f} ms")
    best = max((r["rate"], w, kind) for (op, mode, kind, c, w), r in find.items()
               if mode == "signed" and op == "ListVOs" and kind in ("capacity", "round trip"))
    one = find[("ListVOs", "signed", "capacity", 4, 1)]["rate"]
    verdicts.append(f"signed calls/s, one container process (capacity, 4 clients): {one:.0f} (goal >= 300): "
                    f"{'MET' if one >= 300 else 'NOT MET'}")
    verdicts.append(f"best signed calls/s: {best[0]:.0f} ({best[1]} worker process(es), {best[2]})")
    cap = find[("ListVOs", "signed", "capacity", 4, 1)]["cpu"]
    verdicts.append(f"container CPU per signed ListVOs (capacity, 4 clients, 1 process): {cap}; the unsigned peer: "
                    f"{find[('ListVOs', 'unsigned', 'capacity', 4, 1)]['cpu']}")
    print("\n== goals ==")
    for v in verdicts:
        print(f"  {v}")
    print("\nClients and container processes share the machine's cores; see docs/benchmarks.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
