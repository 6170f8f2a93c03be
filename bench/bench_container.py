"""Signed against unsigned calls through the real grid container hosting the VMRepository (issue 3 at
container level): round-trip p50/p90 and calls/s, 1 client and 4 concurrent clients, in one run.

    .venv/bin/python bench/bench_container.py [--calls 300] [--repeat 3] [--workers 2] [--no-tls] [--key rsa|ec|both]

The server: `services.container` (uvloop + httptools front end, TLS from the host certificate) with the real VMRepositoryService
(built-in VO policy, SQLite catalogue holding 6 images, no GridFTP), in its own process.
  signed    the container as `vmgrid serve repository` builds it: WSMiddleware verifies every request
            (X.509 proxy chain, signature, timestamp, replay cache in SQLite) and signs every response.
  unsigned  THE PEER: the same container, service and TLS, with the WS-Security middleware replaced by one
            that parses the request with security.safexml and hands the service a fixed caller (alice's
            identity, validated once at start); responses are not signed.
The difference is what WS-Security costs in the container, end to end.

Clients are processes on the same 2 cores (lean clients, no zeep: lxml envelopes with WS-Addressing headers,
one keep-alive HTTPS connection each through http.client):
  round trip  the client signs each request and verifies each response inside the timed call (what a
              caller pays; the client's signing and verifying run on the same cores as the server).
  capacity    the requests are signed before the timed loop and the responses verified after it, so the
              timed loop measures the container (its calls/s with 4 clients is the one for the >= 300 calls/s goal).
Where the CPU goes, per row: the container process's CPU per call in the timed window, by thread (event loop,
request threads, other; /proc), the clients' own CPU per call, the cores the container and the machine were busy;
from these the ceiling the machine's cores allow and, for one process, the ceiling its GIL allows (the container's
CPU less one signature and one verification, which `cryptography` computes without the GIL: checked in the run).
--key ec|both: the signed rows with ECDSA P-256 credentials (host, and a user's proxy), ecdsa-sha256.
Also: a row through the zeep client (client.soap.GridServiceClient), and signed capacity with --workers
container processes sharing the port (SO_REUSEPORT, set by this benchmark on the container: the
container has no worker setting yet).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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
    threading.Thread(target=_name_threads, daemon=True).start()
    print(f"ready {container.base_url}", flush=True)
    container.serve_forever()
    return 0


def _name_threads() -> None:
    """For each line on stdin, print one JSON line: this process's threads, {native id: Python name}, so that
    the benchmark can split the container's CPU (from /proc) by thread kind."""
    for _ in sys.stdin:
        print(json.dumps({t.native_id: t.name for t in threading.enumerate()}), flush=True)


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
                p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out, cwd=REPO,
                                     text=True,
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

    def thread_names(self) -> dict[tuple[int, int], str]:
        """{(pid, native thread id): Python thread name} of every container process."""
        names = {}
        for p in self.procs:
            p.stdin.write("threads\n")
            p.stdin.flush()
            names.update({(p.pid, int(tid)): name for tid, name in json.loads(p.stdout.readline()).items()})
        return names

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
    import http.client
    from urllib.parse import urlsplit

    from security.pki import load_credential
    from security.tls import client_ssl_context
    from security.trust import TrustStore
    from security.wssec import sign_envelope, verify_envelope

    try:
        proxy = load_credential(proxy=pki["proxy"])
        trust = TrustStore(pki["cert_dir"])
        where = urlsplit(url)
        if where.scheme == "https":
            conn = http.client.HTTPSConnection(where.hostname, where.port, timeout=300,
                                               context=client_ssl_context(pki["cert_dir"]))
        else:
            conn = http.client.HTTPConnection(where.hostname, where.port, timeout=300)
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{REPO_NS}/{wire_op(op)}"'}

        last_use = [time.monotonic()]

        def post(data: bytes) -> tuple[int, bytes]:
            """One call on the client's keep-alive connection (http.client: lean, so that the clients' own CPU,
            on the same cores, disturbs the container's figures little). A connection idle for longer than the
            container keeps one (15 s; a loaded machine presigning or waiting at the barrier) is opened afresh
            first: a request is never sent twice (its signature would be refused as a replay)."""
            if time.monotonic() - last_use[0] > 10:
                conn.close()                    # http.client connects again on the next request
            conn.request("POST", where.path, body=data, headers=headers)
            response = conn.getresponse()
            body = response.read()
            last_use[0] = time.monotonic()
            return response.status, body
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
            check(*post(encode()))
        messages = [encode() for _ in range(calls)] if presign else None
        barrier.wait(300)
        latencies, responses = [], []
        cpu0 = time.process_time()
        start = time.monotonic()
        for i in range(calls):
            t = time.perf_counter()
            reply = post(messages[i] if presign else encode())
            if presign:
                responses.append(reply)
            else:
                check(*reply)
            latencies.append(time.perf_counter() - t)
        end = time.monotonic()
        cpu = time.process_time() - cpu0
        for status, content in responses:      # capacity runs: every response still verified, after the clock
            check(status, content)
        out.put({"lat": latencies, "start": start, "end": end, "cpu": cpu})
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """{(pid, thread id): CPU seconds (user + system) it has used so far}, from /proc."""
    out = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue                                      # the thread ended meanwhile
            out[(pid, int(task.name))] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]                              # idle, iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK"), sum(values[:8]) / os.sysconf("SC_CLK_TCK")


THREAD_KINDS = (("vmgrid-container", "event loop"), ("vmgrid-request", "request threads"), ("vmgrid-tls", "TLS threads"))


def thread_kind(name: str) -> str:
    return next((kind for prefix, kind in THREAD_KINDS if name.startswith(prefix)), "other")


def perf_counts_instructions() -> bool:
    """Whether `perf stat` can count user-space instructions here (some VMs give "<not supported>")."""
    try:
        out = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    line = next((ln for ln in out.stderr.splitlines() if "instructions" in ln), "")
    return line.split(",")[0].isdigit()


class InstructionCount:
    """`perf stat -e instructions:u` attached to running processes (all their threads) until :meth:`stop`:
    user-space instructions, a cost the load of the machine does not move (CPU time does)."""

    def __init__(self, pids: list[int]):
        self.proc = subprocess.Popen(["perf", "stat", "-x,", "-e", "instructions:u", "-p", ",".join(map(str, pids))],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)                     # perf attached (it counts nothing before; the clients are still warm)

    def stop(self) -> int | None:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        line = next((ln for ln in err.splitlines() if "instructions" in ln), "")
        return int(line.split(",")[0]) if line.split(",")[0].isdigit() else None


def run_clients(url: str, op: str, signed: bool, presign: bool, pki: dict, clients: int, calls: int,
                servers: "Servers | None" = None, perf: bool = False) -> dict:
    """``clients`` client processes; with ``servers``, also the container's CPU in the timed window, by thread
    kind, the clients' own CPU in their timed loops and the machine's busy CPU."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(url, op, signed, presign, pki, calls, barrier, out), daemon=True)
             for _ in range(clients)]
    for p in procs:
        p.start()
    pids = [p.pid for p in servers.procs] if servers else []
    try:
        counter = InstructionCount(pids) if perf and pids else None
        barrier.wait(600)                  # the clients are warm: the timed window opens for everyone
        cpu0, busy0 = thread_cpu(pids), machine_busy()
        results = [out.get(timeout=900) for _ in procs]
        cpu1, busy1 = thread_cpu(pids), machine_busy()
        instructions = counter.stop() if counter else None
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
    r = {"lat": lat, "rate": len(lat) / window, "client_cpu": sum(r["cpu"] for r in results) / len(lat)}
    if servers:
        names = servers.thread_names()
        kinds: dict[str, float] = {}
        for key, t in cpu1.items():
            kind = thread_kind(names.get(key, ""))
            kinds[kind] = kinds.get(kind, 0.0) + (t - cpu0.get(key, 0.0)) / len(lat)
        r["kinds"] = kinds
        if instructions:
            r["instructions"] = instructions / len(lat)
        r["cpu"] = sum(kinds.values())
        wall = busy1[1] - busy0[1]
        r["machine"] = (busy1[0] - busy0[0]) / wall * (os.cpu_count() or 1) if wall > 0 else 0.0
        r["server_cores"] = r["cpu"] * len(lat) / wall * (os.cpu_count() or 1) if wall > 0 else 0.0
    return r


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
    """Repeats of one configuration: percentiles over all calls, the median of the runs' calls/s and CPU."""
    lat = [x for r in results for x in r["lat"]]
    loads = [r["load"] for r in results]
    out = {"p50": p50(lat), "p90": percentile(lat, 90), "rate": statistics.median(r["rate"] for r in results),
           "n": len(lat), "runs": len(results), "load": f"{min(loads):.1f}-{max(loads):.1f}"}
    for name in ("cpu", "client_cpu", "server_cores", "machine", "instructions"):
        values = [r[name] for r in results if name in r]
        if values:
            out[name] = statistics.median(values)
    if any("kinds" in r for r in results):
        kinds = {k for r in results for k in r.get("kinds", {})}
        out["kinds"] = {k: statistics.median(r.get("kinds", {}).get(k, 0.0) for r in results if "kinds" in r)
                        for k in kinds}
    return out


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


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


KEY_NAMES = {"signed": "RSA-2048", "signed-ec": "ECDSA P-256"}


def cpu_floor(private_keys, n: int = 100) -> tuple[float, float]:
    """(sign, verify): CPU seconds (this thread's) of one signature and one verification with each key, p50 of
    ``n``; the figure to set against the container's CPU per call, which wall time on a busy machine is not."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    data, signs, verifies = b"\0" * 700, [], []
    for _ in range(n):
        t = time.thread_time()
        sigs = [k.sign(data, ec.ECDSA(hashes.SHA256())) if isinstance(k, ec.EllipticCurvePrivateKey)
                else k.sign(data, padding.PKCS1v15(), hashes.SHA256()) for k in private_keys]
        signs.append(time.thread_time() - t)
        t = time.thread_time()
        for k, sig in zip(private_keys, sigs):
            if isinstance(k, ec.EllipticCurvePrivateKey):
                k.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))
            else:
                k.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        verifies.append(time.thread_time() - t)
    return statistics.median(signs), statistics.median(verifies)


def ec_credentials(root: Path, pki, config: Path):
    """A container configuration with an ECDSA P-256 host credential and an ECDSA P-256 user in alice's VO
    (the same catalogue and state directory): (config, the user's proxy file, the two keys of the floor,
    the host DN)."""
    from security.pki import make_proxy, new_key, save_proxy

    host = pki.ca.issue_host("localhost", key=new_key(kind="ec"), out_dir=root / "ec-host")
    user = pki.ca.issue_user("alice-ec", key=new_key(kind="ec"))
    proxy = make_proxy(user, hours=12)
    proxy_path = save_proxy(proxy, root / "x509up_alice-ec")
    text = config.read_text().replace(f'"{pki.alice.dn}"', f'"{pki.alice.dn}", "{user.subject}"')   # her VO
    text = text.replace(str(pki.host_cert_path), str(root / "ec-host" / "hostcert.pem"))
    ec_config = root / "container-ec.toml"
    ec_config.write_text(text.replace(str(pki.host_key_path), str(root / "ec-host" / "hostkey.pem")))
    return ec_config, proxy_path, [proxy.private_key, host.private_key], host.subject


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
    ap.add_argument("--perf", action="store_true",
                    help="also count the container's user-space instructions per call (perf stat attached to it)")
    ap.add_argument("--key", choices=("rsa", "ec", "both"), default="rsa",
                    help="the signed rows' keys: RSA-2048 (rsa-sha256), ECDSA P-256 (ecdsa-sha256; the host and "
                         "the caller's proxy), or both in the same run")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vmgrid-bench-container-", dir="/tmp"))
    print(f"vmgrid container benchmark: {machine_facts()}, {args.calls} calls per client, "
          f"{args.repeat} interleaved runs per configuration, {'HTTPS' if args.tls else 'HTTP'} on loopback")
    print("measures: one container process (VMRepositoryService) signed as `vmgrid serve repository` builds it against "
          "the same container unsigned; round trip = the client signs and verifies inside the timed call, capacity = "
          "requests signed before and responses verified after the timed loop; the container's CPU per call (/proc, "
          "by thread) and the clients' own, in the timed window")
    if args.perf and not perf_counts_instructions():
        print("--perf: `perf stat -e instructions:u` is not supported on this machine (a VM without the counter): "
              "the instruction column stays empty")
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

        plans = {"rsa": ["signed"], "ec": ["signed-ec"], "both": ["signed", "signed-ec"]}[args.key]
        pkids = {"unsigned": pkid, "signed": pkid}
        configs = {"unsigned": config, "signed": config}
        floor_keys = {"signed": [pki.alice.proxy.private_key, pki.host.private_key]}
        if "signed-ec" in plans:
            ec_config, ec_proxy_path, ec_keys, ec_host_dn = ec_credentials(root, pki, config)
            configs["signed-ec"] = ec_config
            pkids["signed-ec"] = {**pkid, "proxy": str(ec_proxy_path), "host_dn": ec_host_dn}
            floor_keys["signed-ec"] = ec_keys

        plan = []                    # (op, mode, kind, clients, workers); mode: unsigned, signed (RSA), signed-ec
        for op in OPERATIONS:
            for clients in (1, 4):
                for mode in ("unsigned", "signed"):
                    plan.append((op, mode, "round trip", clients, 1))
        for clients in (1, 4):
            for mode in ("unsigned", "signed"):
                plan.append(("ListVOs", mode, "capacity", clients, 1))
        if "signed" not in plans:
            plan = [key for key in plan if key[1] != "signed"]
        if "signed-ec" in plans:
            plan += [(op, "signed-ec", "round trip", 1, 1) for op in OPERATIONS]
            plan += [("ListVOs", "signed-ec", "capacity", clients, 1) for clients in (1, 4)]
        if args.workers > 1:
            for mode in plans:
                plan.append(("ListVOs", mode, "round trip", 4, args.workers))
                plan.append(("ListVOs", mode, "capacity", 4, args.workers))
        if "signed" in plans:
            plan.append(("ListVOs", "signed", "zeep", 1, 1))
        results: dict[tuple, list[dict]] = {key: [] for key in plan}
        floors: dict[str, list[dict]] = {mode: [] for mode in floor_keys}
        for rep in range(args.repeat):           # interleaved, so a change of load hits every configuration
            for mode, keys in floor_keys.items():
                floors[mode].append(signature_floor(keys))
                floors[mode][-1]["cpu"] = cpu_floor(keys)
                log(f"  [{rep + 1}/{args.repeat}] floor: two {KEY_NAMES[mode]} signatures "
                    f"{fmt_s(floors[mode][-1]['sign'])} (CPU {fmt_s(floors[mode][-1]['cpu'][0])})")
            for key in plan:
                op, mode, kind, clients, workers = key
                server_mode = "unsigned" if mode == "unsigned" else "signed"
                servers = Servers(configs[mode], server_mode, pki.alice.proxy_path, workers, logfile)
                try:
                    u = f"{servers.base_url.replace('127.0.0.1', 'localhost')}/wsrf/services/{SERVICE}"
                    if kind == "zeep":
                        r = zeep_round_trips(u, pki, op, args.calls)
                    else:
                        r = run_clients(u, op, mode != "unsigned", kind == "capacity", pkids[mode], clients,
                                        args.calls, servers, perf=args.perf)
                finally:
                    servers.stop()
                r["load"] = os.getloadavg()[0]
                results[key].append(r)
                log(f"  [{rep + 1}/{args.repeat}] {op:<11} {mode:<9} {kind:<10} {clients} client(s) {workers} "
                    f"worker(s): p50 {fmt_s(p50(r['lat']))}, {r['rate']:.0f} calls/s, load {r['load']:.1f}"
                    + (f", container CPU {r['cpu'] * 1000:.2f} ms/call" if "cpu" in r else ""))
        rows = [(*key, pooled(rs)) for key, rs in results.items()]
        floor = {mode: statistics.median(f["sign"] for f in fs) for mode, fs in floors.items()}
        floor_verify = {mode: statistics.median(f["verify"] for f in fs) for mode, fs in floors.items()}
        floor_cpu = {mode: tuple(statistics.median(f["cpu"][i] for f in fs) for i in (0, 1))
                     for mode, fs in floors.items()}
        openssl = openssl_speed_rsa2048()
        from profile_signing import gil_released_by_signing
        released, alone, beside = gil_released_by_signing(pki.host.private_key)
        gil_note = (f"cryptography {'releases' if released else 'HOLDS'} the GIL while signing: {alone:.0f} "
                    f"signatures/s alone, {beside:.0f}/s beside a spinning Python thread at a 0.5 s switch interval")
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

    print(f"\n{gil_note}")
    print(f"\nfinished with {loadavg()}; p50/p90 over all calls of the runs, calls/s the median run\n")
    print(table(("operation", "mode", "client", "clients", "workers", "p50", "p90", "calls/s", "load (1 min)"),
                [(op, mode, kind, c, w, fmt_s(r["p50"]), fmt_s(r["p90"]), f"{r['rate']:.0f}", r["load"])
                 for op, mode, kind, c, w, r in rows]))
    cores = os.cpu_count() or 1
    print(f"\nwhere the CPU goes (ms per call, median run; the timed window only): the container process by thread "
          f"(event loop: TLS records, HTTP; request threads: WS-Security, the service; other: the main thread, "
          f"sqlite), the clients' own CPU in their timed loops, the cores the container and the whole machine were "
          f"busy, and the ceiling these CPU costs allow on {cores} cores: {cores} / (container + clients)\n")
    cpu_rows = []
    for op, mode, kind, c, w, r in rows:
        if "kinds" not in r:
            continue
        k = r["kinds"]
        ceiling = cores / (r["cpu"] + r["client_cpu"]) if r["cpu"] + r["client_cpu"] > 0 else 0
        cpu_rows.append((op, mode, kind, c, w, ms(r["cpu"]), ms(k.get("event loop", 0.0)),
                         ms(k.get("request threads", 0.0)), ms(k.get("TLS threads", 0.0) + k.get("other", 0.0)),
                         ms(r["client_cpu"]), f"{r['server_cores']:.2f}", f"{r['machine']:.2f}", f"{ceiling:.0f}",
                         f"{r['instructions'] / 1e6:.2f} M" if "instructions" in r else "-"))
    print(table(("operation", "mode", "client", "clients", "workers", "container", "event loop", "request thr.",
                 "other", "clients", "container cores", "machine cores", "ceiling calls/s",
                 "container instr./call"), cpu_rows))
    find = {(op, mode, kind, c, w): r for op, mode, kind, c, w, r in rows}
    print("signed vs unsigned (same operation, clients, kind; 1 container process):")
    verdicts = []
    signed_modes = plans                      # the signed kinds measured (the RSA floor is measured always)
    for mode in signed_modes:
        for op in OPERATIONS:
            for clients in (1, 4):
                u, s = find.get((op, "unsigned", "round trip", clients, 1)), find.get((op, mode, "round trip", clients, 1))
                if u and s:
                    print(f"  {op:<11} {mode:<9} round trip, {clients} client(s): p50 +{(s['p50'] - u['p50']) * 1000:.2f} "
                          f"ms ({s['p50'] / u['p50']:.2f}x), calls/s {s['rate']:.0f} vs {u['rate']:.0f} "
                          f"({s['rate'] / u['rate']:.2f}x)")
        for clients in (1, 4):
            u, s = find[("ListVOs", "unsigned", "capacity", clients, 1)], find[("ListVOs", mode, "capacity", clients, 1)]
            print(f"  ListVOs     {mode:<9} capacity,   {clients} client(s): p50 +{(s['p50'] - u['p50']) * 1000:.2f} ms "
                  f"({s['p50'] / u['p50']:.2f}x), calls/s {s['rate']:.0f} vs {u['rate']:.0f} "
                  f"({s['rate'] / u['rate']:.2f}x); container CPU {ms(s['cpu'])} vs {ms(u['cpu'])} ms per call")
    rsa_floor = floor.get("signed")
    for mode in signed_modes:
        print(f"the floor, same run: two {KEY_NAMES[mode]} signatures (alice's proxy key, the host key; cryptography) "
              f"{floor[mode] * 1000:.2f} ms p50 (+ the two verifications {floor_verify[mode] * 1000:.2f} ms); in CPU "
              f"time {floor_cpu[mode][0] * 1000:.2f} ms (+ {floor_cpu[mode][1] * 1000:.2f} ms)")
    if openssl:
        print(f"openssl speed rsa2048: {openssl * 1000:.2f} ms per signature")
    for mode in signed_modes:
        for op in OPERATIONS:
            added = find[(op, mode, "round trip", 1, 1)]["p50"] - find[(op, "unsigned", "round trip", 1, 1)]["p50"]
            against = [(rsa_floor, "the two-RSA-signature floor")] if rsa_floor else []
            if mode == "signed-ec":
                against.append((floor[mode], "the two-ECDSA-signature floor"))
            busy = rsa_floor and rsa_floor > 1.5 * floor_cpu["signed"][0]   # wall time far above CPU time
            for f, name in against:
                verdicts.append(f"added p50, {op}, {KEY_NAMES[mode]}, 1 client, whole round trip (client signs + "
                                f"verifies too): {added * 1000:.2f} ms = {added / f:.2f}x {name}"
                                + ((" (wall clock: the floor took {:.1f}x its CPU time, the machine is busy and this "
                                    "ratio means nothing; see the CPU line)".format(rsa_floor / floor_cpu["signed"][0])
                                    if busy else f" (goal <= 2x): {'MET' if added <= 2 * f else 'NOT MET'}")
                                   if f is rsa_floor else ""))
        for op in OPERATIONS:
            u, sg = find[(op, "unsigned", "round trip", 1, 1)], find[(op, mode, "round trip", 1, 1)]
            added = sg["cpu"] + sg["client_cpu"] - u["cpu"] - u["client_cpu"]
            f = floor_cpu["signed"][0] if "signed" in floor_cpu else None
            verdicts.append(f"added CPU, {op}, {KEY_NAMES[mode]}, 1 client, round trip (container + client, signed "
                            f"less unsigned; load-proof): {ms(added)} ms"
                            + (f" = {added / f:.2f}x the two-RSA-signature floor in CPU time ({ms(f)} ms; goal <= 2x): "
                               f"{'MET' if added <= 2 * f else 'NOT MET'}" if f else "")
                            + (f"; {added / floor_cpu[mode][0]:.1f}x the two-ECDSA-signature floor"
                               if mode == "signed-ec" else ""))
        server = (find[("ListVOs", mode, "capacity", 1, 1)]["p50"]
                  - find[("ListVOs", "unsigned", "capacity", 1, 1)]["p50"])
        verdicts.append(f"added p50, ListVOs, {KEY_NAMES[mode]}, 1 client, in the container only (capacity rows): "
                        f"{server * 1000:.2f} ms")
        one = find[("ListVOs", mode, "capacity", 4, 1)]
        unsigned = find[("ListVOs", "unsigned", "capacity", 4, 1)]
        verdicts.append(f"signed calls/s, {KEY_NAMES[mode]}, one container process (capacity, 4 clients): "
                        f"{one['rate']:.0f} (goal >= 300): {'MET' if one['rate'] >= 300 else 'NOT MET'}; "
                        f"container CPU {ms(one['cpu'])} ms per call (unsigned peer {ms(unsigned['cpu'])}), "
                        f"the clients {ms(one['client_cpu'])}: this machine's {cores} cores allow "
                        f"{cores / (one['cpu'] + one['client_cpu']):.0f} calls/s at these costs, one process "
                        f"busy {one['server_cores']:.2f} cores, the machine {one['machine']:.2f}"
                        + (f"; container instructions per call {one['instructions'] / 1e6:.2f} M (unsigned "
                           f"{unsigned['instructions'] / 1e6:.2f} M)"
                           if "instructions" in one and "instructions" in unsigned else ""))
        outside = (floor_cpu[mode][0] + floor_cpu[mode][1]) / 2   # the host's signature, the caller's verification
        held = one["cpu"] - outside
        verdicts.append(f"  the GIL: the container's CPU per call less what runs without the GIL (one {KEY_NAMES[mode]} "
                        f"signature and one verification, {ms(outside)} ms; {gil_note}) leaves about {ms(held)} ms "
                        f"per call under the GIL: one process can serve at most about {1 / held:.0f} calls/s"
                        if held > 0 else "  the GIL: -")
        best = max((r["rate"], w, kind) for (op, m, kind, c, w), r in find.items()
                   if m == mode and op == "ListVOs" and kind in ("capacity", "round trip"))
        verdicts.append(f"best signed calls/s, {KEY_NAMES[mode]}: {best[0]:.0f} ({best[1]} worker process(es), "
                        f"{best[2]})")
    print("\n== goals ==")
    for v in verdicts:
        print(f"  {v}")
    print("\nClients and container processes share the machine's cores; see docs/benchmarks.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
