"""Where the time of a signed SOAP call goes: one process, no network, the real container application
(VMRepositoryService behind WSSecurityMiddleware, as `vmgrid serve repository` builds it) called as WSGI.

    .venv/bin/python bench/profile_signing.py [--calls 300] [--op ListVOs|QueryImages20] [--profile N]
    .venv/bin/python bench/profile_signing.py --op ListVOs --instructions 200     # perf: instructions per call

Per call, in this order: the client signs a request (alice's proxy, X509PKIPathv1), the container verifies it,
dispatches, signs the response (host key), the client verifies the response (chain, signature, host DN).
The peer, measured in the same run: the same call unsigned (hardened parse in, serialize out), and the
cryptographic floor: two RSA signatures with the same keys (`cryptography`, SHA-256 PKCS#1 v1.5) plus two
verifications. Prints each step's p50 and, with --profile, the cProfile of the signed calls (top N functions
by own time and by cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lxml import etree  # noqa: E402

from bench_container import envelope, make_config, populate  # noqa: E402
from benchgrid import machine_facts  # noqa: E402


def clock() -> float:
    """This thread's CPU time: the steps all run in this thread, and CPU time is less disturbed than wall time
    by the other processes on a shared machine (set VMGRID_BENCH_WALL=1 for wall-clock time)."""
    return time.thread_time()


if os.environ.get("VMGRID_BENCH_WALL"):
    clock = time.perf_counter  # noqa: F811


def p50_ms(xs):
    return statistics.median(xs) * 1000


def raw_sign(key, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def raw_verify(public_key, signature: bytes, data: bytes) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def rsa_floor(proxy, host, n: int) -> dict:
    """Two signatures (client's proxy key, host key) and two verifications, SHA-256 PKCS#1 v1.5."""
    data = os.urandom(600)
    sign, verify = [], []
    for _ in range(n):
        t = clock()
        s1 = raw_sign(proxy.private_key, data)
        s2 = raw_sign(host.private_key, data)
        sign.append(clock() - t)
        t = clock()
        raw_verify(proxy.certificate.public_key(), s1, data)
        raw_verify(host.certificate.public_key(), s2, data)
        verify.append(clock() - t)
    return {"sign2": p50_ms(sign), "verify2": p50_ms(verify)}


def gil_released_by_signing(key) -> tuple[bool, float, float]:
    """Whether `cryptography` lets other threads run during a signature (what lets one container process use the
    second core: its request threads sign and verify in parallel). With a 0.5 s switch interval and a pure-Python
    thread spinning, a signer that releases the GIL waits for it after every signature (a few signatures a second);
    one that holds it keeps about half its speed (the GIL alternates every 0.5 s). The verdict's line is a third of
    the speed alone, so that it holds on a loaded machine too (at load 40 here: 21 signatures/s alone, 5 beside).
    Returns (released, signs/s alone, signs/s beside)."""
    import threading

    def rate(seconds: float) -> float:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            raw_sign(key, b"\0" * 700)
            n += 1
        return n / seconds

    alone = rate(1.0)
    old, stop = sys.getswitchinterval(), threading.Event()
    sys.setswitchinterval(0.5)
    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    try:
        spinner.start()
        beside = rate(2.0)
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(old)
    return beside < alone / 3, alone, beside


FLOOR_DATA = b"\0" * 600


PERF_UNSUPPORTED = "perf cannot count user-space instructions on this machine"


def perf_control(command: str) -> None:
    """Enable or disable the counting of the `perf stat --control` process that started this one."""
    with open(os.environ["VMGRID_PERF_CTL"], "w") as ctl:
        ctl.write(command + "\n")
    with open(os.environ["VMGRID_PERF_ACK"]) as ack:
        ack.readline()


def count_instructions(args) -> int:
    """User-space instructions per call of each kind (unsigned round trip, signed round trip, the two-signature
    floor), each kind in its own process under `perf stat`, counted only around its measured loop."""
    import shutil
    import subprocess

    from benchgrid import machine_facts

    from bench_container import perf_counts_instructions

    if shutil.which("perf") is None:
        print("profile_signing: --instructions needs perf (Debian: linux-perf)", file=sys.stderr)
        return 1
    if not perf_counts_instructions():
        print(f"profile_signing: {PERF_UNSUPPORTED} (`perf stat -e instructions:u` answers <not supported>, as in "
              f"a VM without the counter): run without --instructions for CPU-time figures", file=sys.stderr)
        return 1
    counts = {}
    for mode in ("unsigned", "signed", "floor"):
        with tempfile.TemporaryDirectory(prefix="vmgrid-perf-") as tmp:
            ctl, ack = Path(tmp) / "ctl", Path(tmp) / "ack"
            os.mkfifo(ctl)
            os.mkfifo(ack)
            cmd = ["perf", "stat", "-x,", "-e", "instructions:u", "--control", f"fifo:{ctl},{ack}", "-D", "-1",
                   sys.executable, str(Path(__file__).resolve()), "--op", args.op, "--key", args.key,
                   "--calls", str(args.instructions), "--count-mode", mode]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800,
                                  env={**os.environ, "VMGRID_PERF_CTL": str(ctl), "VMGRID_PERF_ACK": str(ack)})
            line = next((ln for ln in done.stderr.splitlines() if "instructions" in ln), "")
            if done.returncode != 0 or not line.split(",")[0].isdigit():
                print(f"profile_signing: perf stat failed: {done.stderr[-1500:]}", file=sys.stderr)
                return 1
            counts[mode] = int(line.split(",")[0]) / args.instructions
    added = counts["signed"] - counts["unsigned"]
    print(f"{machine_facts()}; {args.op}, {args.key} keys: user-space instructions per call, {args.instructions} "
          f"calls of each kind, in process, no network")
    print(f"  unsigned {counts['unsigned'] / 1e6:.2f} M, signed {counts['signed'] / 1e6:.2f} M, floor (two "
          f"signatures) {counts['floor'] / 1e6:.2f} M")
    print(f"  signed - unsigned: {added / 1e6:.2f} M = {added / counts['floor']:.2f}x the floor; beyond the floor "
          f"(XML, Python, verification): {(added - counts['floor']) / 1e6:.2f} M")
    return 0


class Call:
    """One in-process WSGI call of the container application."""

    def __init__(self, container, url: str, op: str):
        self.app = container.wsgi_app
        self.url = url
        self.op = op
        self.host = url.split("/")[2]

    def environ(self, body: bytes, action: str) -> dict:
        return {"REQUEST_METHOD": "POST", "PATH_INFO": "/wsrf/services/VMRepositoryService",
                "QUERY_STRING": "", "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "text/xml; charset=utf-8",
                "HTTP_SOAPACTION": f'"{action}"', "HTTP_HOST": self.host, "wsgi.url_scheme": "https",
                "wsgi.input": io.BytesIO(body), "SERVER_NAME": "localhost", "SERVER_PORT": "0",
                "REMOTE_ADDR": "127.0.0.1"}

    def __call__(self, body: bytes, action: str) -> tuple[str, bytes]:
        status = {}

        def start_response(s, headers, exc_info=None):
            status["s"] = s
            return lambda chunk: None

        data = b"".join(self.app(self.environ(body, action), start_response))
        return status["s"], data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--op", default="ListVOs", choices=("ListVOs", "QueryImages20"))
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions of a cProfile run")
    ap.add_argument("--key", choices=("rsa", "ec"), default="rsa",
                    help="ec: the caller's proxy and the host credential have ECDSA P-256 keys (ecdsa-sha256); "
                         "the floor is then two ECDSA signatures, and the RSA-2048 floor is printed beside it")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="instead of CPU time, count user-space instructions (perf stat) over N calls of each kind: "
                         "a figure the load on a shared machine does not move")
    ap.add_argument("--count-mode", choices=("unsigned", "signed", "floor"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.instructions:
        return count_instructions(args)

    from benchgrid import BenchError
    from security import safexml
    from security.wssec import sign_envelope, verify_envelope
    from services.container.app import CALLER_KEY, ENVELOPE_KEY
    from services.container.assemble import build_container, build_service
    from services.container.config import load_config
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vmgrid-profile-signing-", dir="/tmp"))
    pki = build_grid_pki(root / "pki")
    config = make_config(root, pki, tls=False)
    proxy, host = pki.alice.proxy, pki.host
    if args.key == "ec":
        from security.pki import make_proxy, new_key

        host = pki.ca.issue_host("localhost", key=new_key(kind="ec"), out_dir=root / "ec-host")
        user = pki.ca.issue_user("alice-ec", key=new_key(kind="ec"))
        proxy = make_proxy(user, hours=2)
        text = config.read_text().replace(f'"{pki.alice.dn}"', f'"{pki.alice.dn}", "{user.subject}"')   # her VO
        text = text.replace(str(pki.host_cert_path), str(root / "ec-host" / "hostcert.pem"))
        config.write_text(text.replace(str(pki.host_key_path), str(root / "ec-host" / "hostkey.pem")))
    cfg = load_config(config)
    container = build_container(cfg, [build_service("repository", cfg)]).start()
    try:
        url = f"{container.base_url.replace('127.0.0.1', 'localhost')}/wsrf/services/VMRepositoryService"
        populate(url, pki, root / "ingest", alice_images=20)
        call = Call(container, url, args.op)
        trust = pki.trust()
        op = "QueryImages" if args.op == "QueryImages20" else args.op
        action = f"http://vmgrid.org/ns/vmrepository/1/{op}"
        answer = f"{{http://vmgrid.org/ns/vmrepository/1}}{op}Response"
        caller = trust.validate(proxy.certificates)

        def unsigned_once(steps):
            t0 = clock()
            body = etree.tostring(envelope(url, args.op), xml_declaration=True, encoding="utf-8")
            t1 = clock()
            # the unsigned peer of the middleware (bench_container.UnsignedPeer)
            env = {}

            def start_response(s, headers, exc_info=None):
                env["s"] = s

            environ = call.environ(body, action)
            environ[ENVELOPE_KEY] = safexml.parse(body)
            environ[CALLER_KEY] = caller
            data = b"".join(container.app(environ, start_response))
            t2 = clock()
            root_ = safexml.parse(data)
            t3 = clock()
            if root_[-1][0].tag != answer:
                raise BenchError(f"bad answer: {data[:300]!r}")
            steps["build"].append(t1 - t0)
            steps["server"].append(t2 - t1)
            steps["client parse"].append(t3 - t2)
            steps["total"].append(t3 - t0)
            return data

        def signed_once(steps):
            t0 = clock()
            body = sign_envelope(envelope(url, args.op), proxy)
            t1 = clock()
            status, data = call(body, action)
            t2 = clock()
            _, root_ = verify_envelope(data, trust, expected_signer=host.subject)
            t3 = clock()
            if root_[-1][0].tag != answer:
                raise BenchError(f"bad answer {status}: {data[:300]!r}")
            steps["client sign"].append(t1 - t0)
            steps["server"].append(t2 - t1)
            steps["client verify"].append(t3 - t2)
            steps["total"].append(t3 - t0)
            return data

        if args.count_mode:        # one kind, counted by the perf process that started us (count_instructions)
            import collections
            steps = collections.defaultdict(list)
            fn = {"unsigned": lambda: unsigned_once(steps), "signed": lambda: signed_once(steps),
                  "floor": lambda: (raw_sign(proxy.private_key, FLOOR_DATA), raw_sign(host.private_key, FLOOR_DATA))
                  }[args.count_mode]
            for _ in range(20):
                fn()
            perf_control("enable")
            for _ in range(args.calls):
                fn()
            perf_control("disable")
            return 0

        def run(fn):
            steps = {k: [] for k in ("build", "client sign", "server", "client parse", "client verify", "total")}
            for _ in range(20):
                fn({k: [] for k in steps})
            for _ in range(args.calls):
                data = fn(steps)
            return {k: p50_ms(v) for k, v in steps.items() if v}, len(data)

        # interleaved thirds, so a change of load on the shared machine hits each
        parts = {"unsigned": [], "signed": [], "floor": []}
        calls = args.calls
        args.calls = max(calls // 3, 1)
        for _ in range(3):
            parts["unsigned"].append(run(unsigned_once))
            parts["signed"].append(run(signed_once))
            parts["floor"].append(rsa_floor(proxy, host, args.calls))
        args.calls = calls

        def med(rows, key):
            return statistics.median(r[key] for r in rows)

        u = {k: med([r for r, _ in parts["unsigned"]], k) for k in parts["unsigned"][0][0]}
        s = {k: med([r for r, _ in parts["signed"]], k) for k in parts["signed"][0][0]}
        f = {k: med(parts["floor"], k) for k in parts["floor"][0]}
        print(f"{machine_facts()}; {args.op}: response {parts['signed'][0][1]} bytes signed, "
              f"{parts['unsigned'][0][1]} unsigned; p50 of {calls} calls, in process, no network, "
              f"{'wall' if clock is time.perf_counter else 'CPU'} time")
        print("  unsigned: " + ", ".join(f"{k} {v:.2f} ms" for k, v in u.items()))
        print("  signed:   " + ", ".join(f"{k} {v:.2f} ms" for k, v in s.items()))
        floor = f["sign2"]
        added = s["total"] - u["total"]
        kind = "ECDSA P-256" if args.key == "ec" else "RSA-2048"
        print(f"  floor: two {kind} signatures {floor:.2f} ms (+ two verifications {f['verify2']:.2f} ms)")
        if args.key == "ec":
            rsa = rsa_floor(pki.alice.proxy, pki.host, calls)["sign2"]
            print(f"  the RSA-2048 floor, same run: {rsa:.2f} ms; signed - unsigned = {added / rsa:.2f}x it")
        print(f"  signed - unsigned: {added:.2f} ms = {added / floor:.2f}x the floor (goal <= 2x)")
        import cryptography
        released, alone, beside = gil_released_by_signing(host.private_key)
        print(f"  cryptography {cryptography.__version__} {'releases' if released else 'HOLDS'} the GIL while signing "
              f"({alone:.0f} signatures/s alone, {beside:.1f}/s beside a spinning thread with a 0.5 s switch interval)")

        if args.profile:
            prof = cProfile.Profile(clock)
            steps = {k: [] for k in ("client sign", "server", "client verify", "total")}
            prof.enable()
            for _ in range(calls):
                signed_once(steps)
            prof.disable()
            for order in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(prof, stream=out).strip_dirs().sort_stats(order).print_stats(args.profile)
                print(out.getvalue())
    finally:
        container.stop()
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
