"""Slow and idle connections against the grid container (issue 9.3): a legitimate signed call's latency
with and without an attack, and the container's memory, in one run on loopback.

    .venv/bin/python bench/bench_container_exhaustion.py [--calls 200] [--duration 40] [--slow-headers 500]
                                                        [--idle 300] [--slow-bodies 50] [--addresses 40]

The server: the real container (`vmgrid serve repository` as bench_container.py starts it: TLS from the
host certificate, WS-Security, the VMRepository with 6 images) in its own process, default limits.
The attack, in another process (asyncio, bounded loops, source addresses 127.0.0.10 and up so that
each stays under the per-address cap; whatever the server cuts off is reopened at once):
  slow headers   TLS connection, a request line, then one header line every 2 s, never the blank line
  idle           TLS handshake completed, then nothing
  slow bodies    a request head announcing 16 MB, then one byte every 2 s
The legitimate client: signed ListVOs calls (alice's proxy, one keep-alive HTTPS session), each
response verified, unloaded first, then with the attack at its full count for at least --duration
seconds (so that the container's 10 s deadlines cut the attack off and it reconnects meanwhile).
Printed: p50/p95 of both, their ratio (goal: loaded p95 <= 2x unloaded p95), the container's RSS before, during and after, and
how many attack connections were open, cut off and reopened. Also: one address opening 200 connections
(how many the per-address cap lets in).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import ssl
import sys
import shutil
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_container import SERVICE, REPO_NS, Servers, envelope, make_config, populate  # noqa: E402
from benchgrid import BenchError, fmt_s, loadavg, log, p50, percentile  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the attack (its own process) ---------------------------------------------------------------------------
async def _attacker(kind: str, n: int, port: int, cafile_dir: str, sources: list[str], stats: dict, stop) -> None:
    ctx = ssl.create_default_context(capath=cafile_dir)
    ctx.check_hostname = False
    source = sources[n % len(sources)]
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost", local_addr=(source, 0)), 30)
            stats[kind]["open"] += 1
            try:
                if kind == "slow-headers":
                    writer.write(b"POST /wsrf/services/VMRepositoryService HTTP/1.1\r\nHost: localhost\r\n")
                elif kind == "slow-bodies":
                    writer.write(b"POST /wsrf/services/VMRepositoryService HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Type: text/xml\r\nContent-Length: 16777216\r\n\r\n<")
                while not stop.is_set():
                    if kind == "slow-headers":
                        writer.write(b"X-Slow: a\r\n")
                    elif kind == "slow-bodies":
                        writer.write(b"a")
                    try:
                        if await asyncio.wait_for(reader.read(4096), 2.0) == b"":
                            break                                 # the server cut it off
                    except asyncio.TimeoutError:
                        continue
                    else:
                        break
            finally:
                stats[kind]["open"] -= 1
                stats[kind]["cut off"] += 0 if stop.is_set() else 1
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            stats[kind]["failed"] += 1
            await asyncio.sleep(0.2)
        finally:
            if writer is not None:
                writer.transport.abort()


def attack_main(port: int, cert_dir: str, counts: dict, addresses: int, report, stop_event) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    sources = [f"127.0.0.{10 + i}" for i in range(addresses)]
    stats = {k: {"open": 0, "cut off": 0, "failed": 0} for k in counts}

    async def run():
        stop = asyncio.Event()
        tasks = []
        for kind, count in counts.items():
            for n in range(count):
                tasks.append(asyncio.create_task(_attacker(kind, n, port, cert_dir, sources, stats, stop)))
        while not stop_event.is_set():
            report.put({k: dict(v) for k, v in stats.items()})
            await asyncio.sleep(1.0)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        report.put({"final": {k: dict(v) for k, v in stats.items()}})

    asyncio.run(run())


# -- the legitimate client -------------------------------------------------------------------------------
def legit_calls(url: str, pki, calls: int, duration: float = 0.0) -> list[float]:
    """``calls`` signed calls, and more until ``duration`` seconds have passed (at most 20 x calls)."""
    from security.pki import load_credential
    from security.tls import grid_session
    from security.trust import TrustStore
    from security.wssec import sign_envelope, verify_envelope

    proxy = load_credential(proxy=pki.alice.proxy_path)
    trust = TrustStore(pki.cert_dir)
    session = grid_session(pki.cert_dir)
    headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{REPO_NS}/ListVOs"'}
    lat = []
    end = time.monotonic() + duration
    for i in range(20 * calls + 5):
        if i >= calls + 5 and time.monotonic() >= end:
            break
        t = time.perf_counter()
        r = session.post(url, data=sign_envelope(envelope(url, "ListVOs"), proxy), headers=headers, timeout=120)
        _, root = verify_envelope(r.content, trust, expected_signer=pki.host.subject)
        if r.status_code != 200:
            raise BenchError(f"bad answer {r.status_code}: {r.content[:300]!r}")
        if i >= 5:                                       # the first few warm the session up
            lat.append(time.perf_counter() - t)
    session.close()
    return lat


def one_address(port: int, cert_dir: Path, n: int) -> int:
    """How many of n TLS connections opened at once from one address the container keeps open."""
    ctx = ssl.create_default_context(capath=str(cert_dir))
    ctx.check_hostname = False

    async def one():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost", local_addr=("127.0.0.9", 0)), 30)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            return None
        return reader, writer

    async def run():
        conns = [c for c in await asyncio.gather(*(one() for _ in range(n))) if c is not None]
        kept = 0
        for reader, writer in conns:
            try:
                if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                    continue
            except asyncio.TimeoutError:
                kept += 1                                # still open
            except (OSError, ssl.SSLError):
                continue
        for _, writer in conns:
            writer.transport.abort()
        return kept

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="legitimate calls, unloaded and loaded")
    ap.add_argument("--slow-headers", type=int, default=500)
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--slow-bodies", type=int, default=50)
    ap.add_argument("--addresses", type=int, default=40, help="attack source addresses (127.0.0.10 and up)")
    ap.add_argument("--duration", type=float, default=40.0,
                    help="seconds the loaded run lasts at least (several of the container's 10 s deadlines, so "
                         "the attack's cut-offs and reconnections fall inside it)")
    ap.add_argument("--settle", type=float, default=120.0, help="seconds at most to wait for the attack to be open")
    args = ap.parse_args()
    from tests.fixtures.pki import build_grid_pki

    root = Path(tempfile.mkdtemp(prefix="vmgrid-bench-exhaustion-", dir="/tmp"))
    print(f"vmgrid container exhaustion benchmark: {os.cpu_count()} cores, {loadavg()}, HTTPS on loopback")
    servers = attack = None
    ctx = mp.get_context("spawn")
    stop_event, report = ctx.Event(), ctx.Queue()
    try:
        pki = build_grid_pki(root / "pki")
        config = make_config(root, pki, True)
        servers = Servers(config, "signed", pki.alice.proxy_path, 1, root / "container.log")
        pid = servers.procs[0].pid
        port = int(servers.base_url.rsplit(":", 1)[1])
        url = f"{servers.base_url.replace('127.0.0.1', 'localhost')}/wsrf/services/{SERVICE}"
        populate(url, pki, root / "ingest")
        unloaded = legit_calls(url, pki, args.calls)
        rss_before = rss_kib(pid)
        log(f"unloaded: p50 {fmt_s(p50(unloaded))} p95 {fmt_s(percentile(unloaded, 95))}; starting the attack")
        counts = {"slow-headers": args.slow_headers, "idle": args.idle, "slow-bodies": args.slow_bodies}
        attack = ctx.Process(target=attack_main, args=(port, str(pki.cert_dir), counts, args.addresses, report,
                                                       stop_event), daemon=True)
        attack.start()
        want = sum(counts.values())
        deadline = time.monotonic() + args.settle
        stats = {}
        while time.monotonic() < deadline:
            stats = report.get(timeout=30)
            if sum(v["open"] for v in stats.values()) >= 0.95 * want:
                break
        opened_at_start = {k: v["open"] for k, v in stats.items()}
        log(f"attack open: {opened_at_start}; measuring the legitimate call")
        rss_samples = [rss_kib(pid)]
        loaded = legit_calls(url, pki, args.calls, args.duration)
        rss_samples.append(rss_kib(pid))
        while not report.empty():
            stats = report.get()
        opened_at_end = {k: v["open"] for k, v in stats.items()}
        stop_event.set()
        final = {}
        while "final" not in final:
            final = report.get(timeout=60)
        attack.join(30)
        time.sleep(1.0)
        rss_after = rss_kib(pid)
        capped = one_address(port, pki.cert_dir, 200)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        stop_event.set()
        if attack is not None and attack.is_alive():
            attack.kill()
        if servers is not None:
            servers.stop()
        shutil.rmtree(root, ignore_errors=True)
    u95, l95 = percentile(unloaded, 95), percentile(loaded, 95)
    print()
    print(f"attack (target open at once): {counts}; from {args.addresses} source addresses")
    print(f"attack open when the loaded run began: {opened_at_start}")
    print(f"attack open when it ended:            {opened_at_end}")
    print("attack totals while measured: " + "; ".join(f"{k}: {v['cut off']} cut off by the container and reopened, "
                                                       f"{v['failed']} refused at connect" for k, v in stats.items()))
    print()
    print(f"{'signed ListVOs':<16} {'calls':>6} {'p50':>10} {'p95':>10}")
    print(f"{'unloaded':<16} {len(unloaded):>6} {fmt_s(p50(unloaded)):>10} {fmt_s(u95):>10}")
    print(f"{'under attack':<16} {len(loaded):>6} {fmt_s(p50(loaded)):>10} {fmt_s(l95):>10}")
    print(f"loaded p95 / unloaded p95 = {l95 / u95:.2f}x   (goal: <= 2x)")
    print(f"container RSS: {rss_before / 1024:.1f} MiB before, {max(rss_samples) / 1024:.1f} MiB under attack, "
          f"{rss_after / 1024:.1f} MiB after")
    print(f"one address opening 200 TLS connections: {capped} kept open (the per-address cap)")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
