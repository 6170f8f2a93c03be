"""Signed vs unsigned SOAP round trips through the WS-Security middleware on cheroot (loopback, HTTP): p50 latency
and calls/s for 1 client and 4 concurrent client processes, in one run, as a table with ratios.

    .venv/bin/python bench/bench_signing.py [--calls 400] [--workers 2]

The server is the signed echo service of the security tests (tests/fixtures/pki.py) in its own process(es); the
baseline is the same service without WS-Security. Clients sign with a proxy certificate (X509PKIPathv1) and verify
every response (chain, signature, host DN), using security.wssec directly (no zeep, so the figures are the security
cost, not zeep's). The machine's 2 cores are shared by clients and server. Also prints the in-process cost of each
step (server verify, server sign, client sign, client verify).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from lxml import etree  # noqa: E402

from security import safexml  # noqa: E402
from security.pki import GridCA, load_credential, make_proxy, save_proxy  # noqa: E402
from security.trust import TrustStore  # noqa: E402
from security.wssec import sign_envelope, sign_in_place, verify_envelope  # noqa: E402
from tests.fixtures.pki import ECHO_NS, echo_envelope  # noqa: E402

WSA = "http://www.w3.org/2005/08/addressing"


def make_pki(root: Path) -> dict:
    ca = GridCA.create(root / "ca")
    host = ca.issue_host("localhost", out_dir=root / "host")
    alice = ca.issue_user("alice", out_dir=root / "alice")
    save_proxy(make_proxy(alice, hours=2), root / "proxy")
    return {"cert_dir": str(ca.cert_dir), "host_cert": str(host.cert_path), "host_key": str(host.key_path),
            "proxy": str(root / "proxy"), "host_dn": host.subject}


def request_envelope(url: str) -> etree._Element:
    headers = []
    for name, text in (("Action", f"{ECHO_NS}/Echo"), ("MessageID", f"urn:uuid:{uuid.uuid4()}"), ("To", url)):
        el = etree.Element(f"{{{WSA}}}{name}", nsmap={"wsa": WSA})
        el.text = text
        headers.append(el)
    return echo_envelope("benchmark payload " * 8, headers)


def client_loop(url: str, signed: bool, pki: dict, calls: int, out) -> None:
    proxy = load_credential(proxy=pki["proxy"])
    trust = TrustStore(pki["cert_dir"])
    latencies = []
    with requests.Session() as s:
        for i in range(calls + 20):
            t0 = time.perf_counter()
            env = request_envelope(url)
            data = sign_envelope(env, proxy) if signed else etree.tostring(env, xml_declaration=True,
                                                                           encoding="utf-8")
            resp = s.post(url, data=data, headers={"Content-Type": "text/xml; charset=utf-8"})
            if signed:
                _, root = verify_envelope(resp.content, trust, expected_signer=pki["host_dn"])
            else:
                root = safexml.parse(resp.content)
            if resp.status_code != 200 or root.find(f".//{{{ECHO_NS}}}caller") is None:
                raise SystemExit(f"bad response {resp.status_code}: {resp.content[:300]!r}")
            if i >= 20:                       # warm-up calls are not counted
                latencies.append(time.perf_counter() - t0)
    out.put(latencies)


def start_servers(pki: dict, signed: bool, workers: int, state: Path) -> tuple[list[subprocess.Popen], int]:
    procs, port = [], 0
    if workers > 1:            # SO_REUSEPORT needs a fixed port: take a free one
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    for _ in range(workers):
        args = [sys.executable, "-m", "tests.fixtures.pki", "--cert", pki["host_cert"], "--key", pki["host_key"],
                "--cert-dir", pki["cert_dir"], "--state", str(state), "--port", str(port), "--threads", "8"]
        if workers > 1:
            args.append("--reuse-port")
        if not signed:
            args.append("--plain")
        p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        port = int(p.stdout.readline())
        procs.append(p)
    return procs, port


def run(pki: dict, signed: bool, clients: int, workers: int, calls: int, state: Path) -> dict:
    procs, port = start_servers(pki, signed, workers, state)
    try:
        url = f"http://127.0.0.1:{port}/echo"
        q = mp.Queue()
        ps = [mp.Process(target=client_loop, args=(url, signed, pki, calls, q)) for _ in range(clients)]
        t0 = time.perf_counter()
        for p in ps:
            p.start()
        lat = [x for _ in ps for x in q.get()]
        wall = time.perf_counter() - t0
        for p in ps:
            p.join()
        # throughput over the measured calls: each client's own span, summed rates
        return {"p50_ms": statistics.median(lat) * 1e3, "p90_ms": statistics.quantiles(lat, n=10)[-1] * 1e3,
                "calls_s": len(lat) / sum(lat) * clients, "wall_s": wall}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def step_costs(pki: dict, n: int = 300) -> dict:
    proxy = load_credential(proxy=pki["proxy"])
    host = load_credential(pki["host_cert"], pki["host_key"])
    trust = TrustStore(pki["cert_dir"])
    url = "http://127.0.0.1/echo"
    out = {}
    t = time.perf_counter()
    msgs = [sign_envelope(request_envelope(url), proxy) for _ in range(n)]
    out["client sign (proxy, 5 refs)"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for m in msgs:
        verify_envelope(m, trust)
    out["server verify (parse + checks + chain cache + RSA)"] = (time.perf_counter() - t) / n
    resp = etree.fromstring(b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
                            b'<e:EchoResponse xmlns:e="urn:vmgrid:test:echo"><e:text>x</e:text></e:EchoResponse>'
                            b'</s:Body></s:Envelope>')
    t = time.perf_counter()
    signed = []
    for _ in range(n):
        r = etree.fromstring(etree.tostring(resp))
        signed.append(etree.tostring(sign_in_place(r, host)))
    out["server sign response (host cert)"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for m in signed:
        verify_envelope(m, trust, expected_signer=host.subject)
    out["client verify response"] = (time.perf_counter() - t) / n
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="measured calls per client")
    parser.add_argument("--workers", type=int, default=2, help="server processes for the extra signed row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmgrid-bench-") as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        print(f"vmgrid WS-Security benchmark: {os.cpu_count()} cores, {args.calls} calls per client, HTTP loopback")
        print("\nin-process cost of each step (mean):")
        for name, secs in step_costs(pki).items():
            print(f"  {name:<52} {secs * 1e3:6.2f} ms")
        rows = []
        for clients in (1, 4):
            for signed in (False, True):
                r = run(pki, signed, clients, 1, args.calls, root / f"state-{signed}-{clients}")
                rows.append(("signed" if signed else "unsigned", clients, 1, r))
        if args.workers > 1:
            r = run(pki, True, 4, args.workers, args.calls, root / "state-workers")
            rows.append(("signed", 4, args.workers, r))
        print(f"\n{'mode':<9} {'clients':>7} {'workers':>7} {'p50 ms':>8} {'p90 ms':>8} {'calls/s':>9}")
        for mode, c, w, r in rows:
            print(f"{mode:<9} {c:>7} {w:>7} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['calls_s']:>9.0f}")
        print("\nsigned vs unsigned (same clients, 1 worker):")
        base = {(m, c): r for m, c, w, r in rows if w == 1}
        for c in (1, 4):
            u, s = base[("unsigned", c)], base[("signed", c)]
            print(f"  {c} client(s): p50 +{s['p50_ms'] - u['p50_ms']:.2f} ms ({s['p50_ms'] / u['p50_ms']:.2f}x), "
                  f"calls/s {s['calls_s']:.0f} vs {u['calls_s']:.0f} ({s['calls_s'] / u['calls_s']:.2f}x)")
        print("\nNote: clients (which sign and verify too) and servers share the same cores; the container-level "
              "figure with the real services is measured by the container's own benchmark.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
