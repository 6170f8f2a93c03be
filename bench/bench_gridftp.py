"""GridFTP benchmark: vmgrid against globus-url-copy and curl, in one run, on the same machine.

1. WAN: a 1 GiB file over an emulated 1 Gbit/s link with 50 ms RTT (../shared/tools/wan.sh: server and client in
   their own network namespaces, delay line and tbf in a router namespace) with Debian's default TCP buffers
   (tcp_rmem 4096 131072 6291456, tcp_wmem 4096 16384 4194304). vmgrid -p 1/4/8, globus-url-copy -p 1/4/8 from
   globus-gridftp-server, curl from a plain HTTP server (python3 -m http.server), plus the raw TCP ceiling of the
   emulated link (8 plain TCP streams, no protocol). Wall clock of each client command, set-up included (process
   start, connection, login, transfer, and for vmgrid the sha256 verification against the source's CKSM).
2. Loopback disk to disk: the same file from a server on 127.0.0.1 to a file, vmgrid -p 1/4 against
   globus-url-copy -p 1/4 (which verifies nothing), like with like: both ftp:// with anonymous login and clear
   data channels (no TLS, no DCAU; vmgrid's server runs with --no-tls, Globus' with -aa): vmgrid verified with
   BLAKE3 (what two vmgrid peers agree on) and with SHA-256 (--checksum sha256, what any other peer gets), and at
   -p 1 with the digest known in advance (as the VMManager stages images from their descriptors). The table also
   prints the machine (CPUs, whether it has SHA extensions) and each hash's speed on it (the file's digest from
   the page cache, no transfer; BLAKE3 over every CPU and over one): SHA-256 without the CPU's SHA extensions
   is what kept a verified transfer below globus-url-copy. The cases run in rounds (``--repeat``), each round in
   the reverse order of the one before (ABBA), so that a machine whose speed drifts within minutes moves both
   tools alike; the table gives each case's median, fastest and slowest run and the client's CPU, and against
   globus-url-copy both the ratio of the medians and the ratios round by round (their median and range), with
   the window's time, load average and CPU steal. ``--goal-pair`` runs only issue 13 §5's pair (globus-url-copy
   -p 1 and vmgrid -p 1 with the BLAKE3 digest known), for many rounds in a short window.
3. gsiftp:// on loopback (GSI): both clients download the file from one globus-gridftp-server running with a host
   certificate and a grid-mapfile (a PKI made for the run with security/), with a proxy, DCAU A, PROT C (clear
   data after the per-connection GSI handshake) and PROT P (TLS records): vmgrid transfer --gsi against
   globus-url-copy -dcpriv or not, -p 1/4; the table also prints what PROT P costs against PROT C for each.
4. gsiftp:// over the emulated WAN (the link of part 1): the same file with GSI (a proxy, DCAU A) from a
   globus-gridftp-server (host certificate and grid-mapfile) in the server namespace, PROT C and PROT P, and from
   vmgrid's GridFTP server with the same host credential (PROT P: vmgrid's server requires private data), to
   globus-url-copy and to vmgrid transfer --gsi in the client namespace, -p 1/4; Mbit/s, ratios against
   globus-url-copy from the same server with the same protection, and what PROT P costs against PROT C.

Every vmgrid run gets a freshly started server (no cached checksum). Needs root (namespaces). Prints a table of
Mbit/s (WAN) and MiB/s (loopback) with ratios against globus-url-copy at the same parallelism.

    sudo .venv/bin/python bench/bench_gridftp.py [--size-mib 1024] [--repeat 1] [--skip-wan] [--skip-loopback]
                                                 [--skip-gsi] [--skip-gsi-wan] [--goal-pair]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchgrid import WIRE_SCRIPT, compile_bytecode  # noqa: E402  (plain TCP, the link's ceiling)

REPO = Path(__file__).resolve().parents[1]
# ../shared/tools/wan.sh from the main checkout (/work/main), ../../shared from a helper's worktree (/work/wt/x)
WAN = next((p / "shared" / "tools" / "wan.sh" for p in REPO.parents if (p / "shared" / "tools" / "wan.sh").exists()),
           REPO.parent / "shared" / "tools" / "wan.sh")
VMGRID = Path(sys.executable).parent / "vmgrid"
PREFIX = "vgb"                     # our own namespaces: vgbsrv, vgbrtr, vgbcli
SRV_IP = "10.99.1.1"
LINK_MBIT = 1000.0
DEBIAN_RMEM = "4096 131072 6291456"
DEBIAN_WMEM = "4096 16384 4194304"

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kw)


def wan(*args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "P": PREFIX, **(env_extra or {})}
    return run(["bash", str(WAN), *args], env=env, **kw)


def wan_popen(ns: str, argv: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "P": PREFIX}
    return subprocess.Popen(["bash", str(WAN), "exec", ns, *argv], env=env, start_new_session=True, **kw)


def stop(proc: subprocess.Popen) -> None:
    """End a process this benchmark started, with the process group it leads (forked Globus children)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def blake3_of(path: Path, threads: int = 0) -> str:
    """BLAKE3 of a file over every CPU (``threads`` 0), or over ``threads`` of them."""
    import blake3

    h = blake3.blake3(max_threads=threads or blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_workdir(size: int) -> Path:
    work = Path(tempfile.mkdtemp(prefix="vmgrid-bench-", dir="/tmp"))
    os.chmod(work, 0o755)
    (work / "src").mkdir(mode=0o755)
    (work / "dst").mkdir()
    os.chmod(work / "dst", 0o777)
    src = work / "src" / "image"
    log(f"writing a {size >> 20} MiB test file")
    with open(src, "wb") as fh:
        left = size
        while left:
            n = min(left, 4 << 20)
            fh.write(os.urandom(n))
            left -= n
    os.chmod(src, 0o644)
    return work


def clean(dst: Path) -> None:
    for p in dst.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    run(["sync"])


def timed(argv: list[str], *, popen=None) -> float:
    started = time.monotonic()
    if popen is None:
        run(argv, stdout=subprocess.DEVNULL)
    else:
        proc = popen(argv)
        if proc.wait() != 0:
            raise RuntimeError(f"{argv} failed")
    return time.monotonic() - started


def start_vmgrid_server(popen_ns, root: Path, host: str) -> tuple[subprocess.Popen, int]:
    proc = popen_ns([str(VMGRID), "gridftp-server", "--root", str(root), "--host", host, "--port", "0",
                     "--anonymous", "--no-tls"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop(proc)
        raise RuntimeError(f"vmgrid gridftp-server did not start: {line!r}")
    return proc, int(line)


def wait_until(ready, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class Results:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], list[float]] = {}     # seconds of each run, in the order run
        self.cpu: dict[tuple[str, str, int], list[float]] = {}      # the client's CPU (user + system) of each run
        self.loads: list[float] = []     # the 1-minute load average before each loopback round and after the last
        self.loopback_started = 0.0
        self.loopback_window: tuple[float, float] | None = None     # wall clock (UTC) of the loopback part
        self.steal: float | None = None  # the hypervisor's share of the CPUs' time during the loopback part

    def add(self, part: str, tool: str, streams: int, seconds: float, cpu: float | None = None) -> None:
        self.rows.setdefault((part, tool, streams), []).append(seconds)
        if cpu is not None:
            self.cpu.setdefault((part, tool, streams), []).append(cpu)
        log(f"  {part:9s} {tool:28s} -p {streams}: {seconds:6.2f} s"
            + ("" if cpu is None else f" (client CPU {cpu:.2f} s)"))

    def seconds(self, key) -> float:
        return statistics.median(self.rows[key])


def paired_ratios(reference: list[float], other: list[float]) -> list[float]:
    """Round by round, the reference's time over the other's (both lists in the order of the rounds)."""
    return [r / o for r, o in zip(reference, other)]


def bench_wan(work: Path, size: int, repeat: int, results: Results) -> None:
    src, dst = work / "src" / "image", work / "dst"
    log(f"WAN: {WAN} up (1 Gbit/s, 50 ms RTT), Debian default TCP buffers")
    wan("up", env_extra={"DELAY_MS": "25", "RATE": "1gbit"}, stdout=subprocess.DEVNULL)
    servers: list[subprocess.Popen] = []
    try:
        wan("tcpbuf", DEBIAN_RMEM, DEBIAN_WMEM, stdout=subprocess.DEVNULL)
        cc = subprocess.run(["ip", "netns", "exec", f"{PREFIX}cli", "sysctl", "-n",
                             "net.ipv4.tcp_congestion_control"], capture_output=True, text=True).stdout.strip()
        log(f"congestion control in the namespaces: {cc}")
        globus = ["globus-gridftp-server", "-aa", "-p", "2811", "-daemon", "-control-interface", SRV_IP,
                  "-data-interface", SRV_IP]
        if os.geteuid() == 0:
            globus += ["-anonymous-user", "nobody"]
        servers.append(wan_popen("srv", globus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers.append(wan_popen("srv", [sys.executable, "-m", "http.server", "8080", "--bind", SRV_IP,
                                         "--directory", str(work / "src")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def listening(port):
            out = subprocess.run(["ip", "netns", "exec", f"{PREFIX}srv", "ss", "-ltn", f"sport = :{port}"],
                                 capture_output=True, text=True).stdout
            return f":{port}" in out

        for port in (2811, 8080):
            wait_until(lambda p=port: listening(p), f"a server on {SRV_IP}:{port}")

        def cli(argv):
            return wan_popen("cli", argv, stdout=subprocess.DEVNULL)

        # the raw ceiling of the emulated link: 8 plain TCP streams, sendfile to recv_into, no protocol
        for _ in range(repeat):
            blast = wan_popen("srv", [sys.executable, "-c", WIRE_SCRIPT, "send", "8", SRV_IP, "5001", str(src)],
                              stdout=subprocess.PIPE, text=True)
            blast.stdout.readline()
            results.add("wan", "raw TCP (link ceiling)", 8,
                        timed([sys.executable, "-c", WIRE_SCRIPT, "recv", "8", SRV_IP, "5001"], popen=cli))
            stop(blast)

        for _ in range(repeat):
            for p in (1, 4, 8):
                clean(dst)
                results.add("wan", "globus-url-copy", p, timed(
                    ["globus-url-copy", "-p", str(p), f"ftp://{SRV_IP}:2811{src}", f"file://{dst}/g"], popen=cli))
                assert (dst / "g").stat().st_size == size
                clean(dst)
                server, port = start_vmgrid_server(lambda a, **k: wan_popen("srv", a, **k), work / "src", SRV_IP)
                try:
                    results.add("wan", "vmgrid (blake3 verified)", p, timed(
                        [str(VMGRID), "transfer", f"ftp://{SRV_IP}:{port}/image", str(dst / "v"), "-p", str(p),
                         "-q"], popen=cli))
                finally:
                    stop(server)
                assert (dst / "v").stat().st_size == size
            clean(dst)
            results.add("wan", "curl (HTTP)", 1, timed(
                ["curl", "-sS", "-o", str(dst / "c"), f"http://{SRV_IP}:8080/image"], popen=cli))
            assert (dst / "c").stat().st_size == size
        log(f"checking the last outputs: sha256 {sha256_of(src)[:16]}...")
    finally:
        for s in servers:
            stop(s)
        wan("down", stdout=subprocess.DEVNULL)


def _hostname_resolves() -> bool:
    try:
        socket.gethostbyname(socket.gethostname())
        return True
    except OSError:
        return False


def cpu_times() -> tuple[int, int]:
    """(steal, total) clock ticks of every CPU so far (/proc/stat): the hypervisor's share of a window."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def timed_rusage(argv: list[str]) -> tuple[float, float]:
    """Wall clock of one client command and the CPU (user + system) the client used."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode})")
    return seconds, usage.ru_utime + usage.ru_stime


def loopback_cases(digest: str, digest3: str, goal_pair: bool) -> list[tuple[str, int, list[str] | None]]:
    """(label, streams, vmgrid's extra options or None for globus-url-copy) of the loopback part, in the order
    of a round. The goal's pair (globus-url-copy -p 1, vmgrid -p 1 with the BLAKE3 digest known) comes first."""
    cases = [("globus-url-copy", 1, None), ("vmgrid (blake3 known)", 1, ["--blake3", digest3])]
    if goal_pair:
        return cases
    return cases + [("vmgrid (blake3 verified)", 1, []), ("vmgrid (sha256 known)", 1, ["--sha256", digest]),
                    ("vmgrid (sha256 verified)", 1, ["--checksum", "sha256"]),
                    ("globus-url-copy", 4, None), ("vmgrid (blake3 verified)", 4, []),
                    ("vmgrid (sha256 verified)", 4, ["--checksum", "sha256"])]


def round_order(cases: list, index: int) -> list:
    """The cases of round ``index``: forwards in even rounds, backwards in odd ones (ABBA), so that each case
    runs as often before as after each other one, and neighbours in the list run next to each other."""
    return list(cases) if index % 2 == 0 else list(reversed(cases))


def bench_loopback(work: Path, size: int, repeat: int, results: Results, goal_pair: bool = False) -> None:
    src, dst = work / "src" / "image", work / "dst"
    digest = sha256_of(src)
    digest3 = blake3_of(src)
    if not goal_pair:
        for _ in range(repeat):   # what verification alone costs: each digest of the file from the page cache
            t = time.perf_counter()
            sha256_of(src)
            results.add("loopback", "sha256 of the file, no transfer", 1, time.perf_counter() - t)
            t = time.perf_counter()
            blake3_of(src)
            results.add("loopback", "blake3 of the file, no transfer", 1, time.perf_counter() - t)
            t = time.perf_counter()
            blake3_of(src, threads=1)
            results.add("loopback", "blake3 1 thread, no transfer", 1, time.perf_counter() - t)
    wrap: list[str] = []
    if not _hostname_resolves():       # Globus needs the host name to resolve: a private /etc/hosts
        hosts = work / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {socket.gethostname()}\n")
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gport = s.getsockname()[1]
    globus = [*wrap, "globus-gridftp-server", "-aa", "-p", str(gport), "-daemon", "-control-interface", "127.0.0.1"]
    if os.geteuid() == 0:
        globus += ["-anonymous-user", "nobody"]
    gsrv = subprocess.Popen(globus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def local(argv, **kw):
        return subprocess.Popen(argv, start_new_session=True, **kw)

    cases = loopback_cases(digest, digest3, goal_pair)
    try:
        def up():
            try:
                with socket.create_connection(("127.0.0.1", gport), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(up, f"globus-gridftp-server on 127.0.0.1:{gport}")
        log(f"loopback: disk to disk on 127.0.0.1, {repeat} rounds of {len(cases)} cases, each round in the reverse "
            "order of the one before")
        steal0, total0 = cpu_times()
        results.loopback_started = time.time()
        for index in range(repeat):
            results.loads.append(os.getloadavg()[0])
            for label, p, extra in round_order(cases, index):
                if extra is None:
                    clean(dst)
                    seconds, cpu = timed_rusage(
                        [*wrap, "globus-url-copy", "-p", str(p), f"ftp://127.0.0.1:{gport}{src}", f"file://{dst}/g"])
                    out = dst / "g"
                else:       # a fresh server (no cached digest), started before the clean: both clients start right
                    server, port = start_vmgrid_server(local, work / "src", "127.0.0.1")    # after the sync
                    try:
                        clean(dst)
                        seconds, cpu = timed_rusage(
                            [str(VMGRID), "transfer", f"ftp://127.0.0.1:{port}/image", str(dst / "v"), "-p", str(p),
                             "-q", *extra])
                    finally:
                        stop(server)
                    out = dst / "v"
                if out.stat().st_size != size:
                    raise RuntimeError(f"{label} -p {p}: {out.stat().st_size} bytes, not {size}")
                results.add("loopback", label, p, seconds, cpu)
        results.loads.append(os.getloadavg()[0])
        steal1, total1 = cpu_times()
        results.loopback_window = (results.loopback_started, time.time())
        results.steal = (steal1 - steal0) / (total1 - total0) if total1 > total0 else None
    finally:
        stop(gsrv)


def bench_gsi(work: Path, size: int, repeat: int, results: Results) -> None:
    """Part 3: gsiftp:// from a globus-gridftp-server with GSI, both clients, PROT C and P."""
    sys.path.insert(0, str(REPO))
    from security.pki import GridCA, make_proxy, save_proxy

    src, dst = work / "src" / "image", work / "dst"
    pki = work / "pki"
    ca = GridCA.create(pki / "ca", "/O=Grid/OU=bench/CN=bench CA")
    host = ca.issue_host("localhost", ou="bench", out_dir=pki / "host")
    user = ca.issue_user("alice", ou="bench", out_dir=pki / "alice")
    proxy_path = save_proxy(make_proxy(user, hours=2), pki / "x509up_alice")
    certs = work / "certificates"           # the server runs sessions as nobody: world-readable copies
    shutil.copytree(ca.cert_dir, certs)
    os.chmod(certs, 0o755)
    for f in certs.iterdir():
        os.chmod(f, 0o644)
    gridmap = work / "grid-mapfile"
    gridmap.write_text(f'"{user.subject}" nobody\n')
    os.chmod(gridmap, 0o644)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gport = s.getsockname()[1]
    wrap: list[str] = []
    if not _hostname_resolves():
        hosts = work / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {socket.gethostname()}\n")
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    server_env.update({"X509_USER_CERT": str(host.cert_path), "X509_USER_KEY": str(host.key_path),
                       "X509_CERT_DIR": str(certs), "GRIDMAP": str(gridmap)})
    gsrv = subprocess.Popen([*wrap, "globus-gridftp-server", "-p", str(gport), "-daemon", "-control-interface",
                             "127.0.0.1"], env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    client_env.update({"X509_CERT_DIR": str(ca.cert_dir), "X509_USER_PROXY": str(proxy_path),
                       "HOME": str(pki)})
    url = f"gsiftp://localhost:{gport}{src}"

    def timed_env(argv: list[str]) -> float:
        started = time.monotonic()
        subprocess.run(argv, check=True, env=client_env, stdout=subprocess.DEVNULL)
        return time.monotonic() - started

    try:
        def up():
            try:
                with socket.create_connection(("127.0.0.1", gport), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(up, f"globus-gridftp-server with GSI on 127.0.0.1:{gport}")
        log("gsiftp: GSI, DCAU A, from globus-gridftp-server on 127.0.0.1")
        for _ in range(repeat):
            for p in (1, 4):
                for prot, flags in (("C", []), ("P", ["-dcpriv"])):
                    clean(dst)
                    results.add("gsi", f"globus-url-copy PROT {prot}", p, timed_env(
                        [*wrap, "globus-url-copy", *flags, "-p", str(p), url, f"file://{dst}/g"]))
                    assert (dst / "g").stat().st_size == size
                    clean(dst)
                    results.add("gsi", f"vmgrid --gsi PROT {prot}", p, timed_env(
                        [str(VMGRID), "transfer", "--gsi", "--prot", prot, url, str(dst / "v"), "-p", str(p),
                         "-q", "--proxy", str(proxy_path), "--cert-dir", str(ca.cert_dir)]))
                    assert (dst / "v").stat().st_size == size
    finally:
        stop(gsrv)


def bench_gsi_wan(work: Path, size: int, repeat: int, results: Results) -> None:
    """Part 4: gsiftp:// over the emulated WAN, from globus-gridftp-server (PROT C, P) and from vmgrid's
    server (PROT P), to both clients, with GSI and DCAU A."""
    sys.path.insert(0, str(REPO))
    from security.pki import GridCA, make_proxy, save_proxy

    src, dst = work / "src" / "image", work / "dst"
    host_name = f"{PREFIX}srv"             # wan.sh's hosts files name SRV_IP so in every namespace
    pki = work / "pki-wan"
    ca = GridCA.create(pki / "ca", "/O=Grid/OU=bench/CN=bench WAN CA")
    host = ca.issue_host(host_name, ou="bench", out_dir=pki / "host")
    user = ca.issue_user("alice", ou="bench", out_dir=pki / "alice")
    proxy_path = save_proxy(make_proxy(user, hours=2), pki / "x509up_alice")
    certs = work / "certificates-wan"       # the Globus server runs sessions as nobody: world-readable copies
    shutil.copytree(ca.cert_dir, certs)
    os.chmod(certs, 0o755)
    for f in certs.iterdir():
        os.chmod(f, 0o644)
    gridmap = work / "grid-mapfile-wan"
    gridmap.write_text(f'"{user.subject}" nobody\n')
    os.chmod(gridmap, 0o644)
    client_env = ["env", f"X509_CERT_DIR={ca.cert_dir}", f"X509_USER_PROXY={proxy_path}", f"HOME={pki}"]
    log(f"gsiftp over the WAN: {WAN} up (1 Gbit/s, 50 ms RTT), Debian default TCP buffers")
    wan("up", env_extra={"DELAY_MS": "25", "RATE": "1gbit"}, stdout=subprocess.DEVNULL)
    servers: list[subprocess.Popen] = []
    try:
        wan("tcpbuf", DEBIAN_RMEM, DEBIAN_WMEM, stdout=subprocess.DEVNULL)
        globus = ["env", f"X509_USER_CERT={host.cert_path}", f"X509_USER_KEY={host.key_path}",
                  f"X509_CERT_DIR={certs}", f"GRIDMAP={gridmap}",
                  "globus-gridftp-server", "-p", "2812", "-daemon", "-control-interface", SRV_IP,
                  "-data-interface", SRV_IP]
        servers.append(wan_popen("srv", globus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def listening(port):
            out = subprocess.run(["ip", "netns", "exec", f"{PREFIX}srv", "ss", "-ltn", f"sport = :{port}"],
                                 capture_output=True, text=True).stdout
            return f":{port}" in out

        wait_until(lambda: listening(2812), f"globus-gridftp-server with GSI on {SRV_IP}:2812")
        vmgrid_server = wan_popen("srv", [str(VMGRID), "gridftp-server", "--root", str(work / "src"), "--host",
                                          SRV_IP, "--port", "0", "--cert", str(host.cert_path), "--key",
                                          str(host.key_path), "--cert-dir", str(ca.cert_dir)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        servers.append(vmgrid_server)
        line = vmgrid_server.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"vmgrid gridftp-server did not start: {line!r}")
        vport = int(line)

        def cli(argv):
            return wan_popen("cli", [*client_env, *argv], stdout=subprocess.DEVNULL)

        # (server, port, path of the file there, protections): vmgrid's server serves work/src as /
        cases = [("globus-gridftp-server", 2812, str(src), ("C", "P")), ("vmgrid server", vport, "/image", ("P",))]
        for _ in range(repeat):
            for server_name, port, path, prots in cases:
                url = f"gsiftp://{host_name}:{port}{path}"
                for p in (1, 4):
                    for prot in prots:
                        clean(dst)
                        flags = ["-dcpriv"] if prot == "P" else []
                        results.add("gsiwan", f"globus-url-copy PROT {prot}|{server_name}", p, timed(
                            ["globus-url-copy", *flags, "-p", str(p), url, f"file://{dst}/g"], popen=cli))
                        assert (dst / "g").stat().st_size == size
                        clean(dst)
                        results.add("gsiwan", f"vmgrid --gsi PROT {prot}|{server_name}", p, timed(
                            [str(VMGRID), "transfer", "--gsi", "--prot", prot, url, str(dst / "v"), "-p", str(p),
                             "-q", "--proxy", str(proxy_path), "--cert-dir", str(ca.cert_dir)], popen=cli))
                        assert (dst / "v").stat().st_size == size
    finally:
        for s in servers:
            stop(s)
        wan("down", stdout=subprocess.DEVNULL)


def machine_facts(where: Path | None = None) -> str:
    """The machine the figures were taken on: the CPU (model, CPUs, the instruction sets the two hashes use),
    memory, kernel, Python, the file system of ``where`` and globus-url-copy's version."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import blake3

    sha = "with SHA extensions (sha_ni)" if "sha_ni" in flags else "without SHA extensions"
    simd = "/".join(f for f in ("avx512f", "avx2", "sse4_1") if f in flags) or "no AVX"
    facts = (f"Machine: {model}, {os.cpu_count()} CPUs, {sha}, {simd}; blake3 {blake3.__version__}, "
             f"sha256 from hashlib (OpenSSL)")
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
        facts += f"; {mem / (1 << 20):.1f} GiB of memory"
    except (OSError, StopIteration, ValueError):
        pass
    facts += f"; Linux {os.uname().release}; Python {sys.version.split()[0]}"
    if where is not None:
        facts += f"; files on {filesystem_of(where)}"
    try:
        version = subprocess.run(["globus-url-copy", "-version"], capture_output=True, text=True, timeout=10)
        facts += f"; {(version.stdout or version.stderr).strip().splitlines()[0]}"
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return facts


def filesystem_of(path: Path) -> str:
    """The file system a path is on and its mount options (from /proc/mounts): ``ext4 (rw,relatime,...)``."""
    best, found = "", "an unknown file system"
    try:
        target = str(Path(path).resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mnt, fstype, opts = line.split()[:4]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, found = mnt, f"{fstype} ({opts})"
    except (OSError, ValueError):
        pass
    return found


def loopback_table(results: Results, mib: float) -> list[str]:
    """The loopback part: per case the median, fastest and slowest run, the client's CPU, and against
    globus-url-copy at the same parallelism both the ratio of the medians and the median (and range) of the
    ratios round by round."""
    rounds = max(len(v) for k, v in results.rows.items() if k[0] == "loopback" and "no transfer" not in k[1])
    when = ""
    if results.loopback_window:
        a, b = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) for t in results.loopback_window)
        when = f"{a}-{b[11:]} UTC; "
    load = (f"1-minute load average {min(results.loads):.1f}-{max(results.loads):.1f} on {os.cpu_count()} CPUs"
            if results.loads else "")
    steal = f"; CPU steal {results.steal * 100:.1f}%" if results.steal is not None else ""
    lines = [f"Loopback, disk to disk: {mib:.0f} MiB on 127.0.0.1, {rounds} rounds, each in the reverse order of the "
             f"one before (ABBA)",
             f"{when}{load}{steal}",
             f"{'client':30s} {'-p':>3s} {'median':>7s} {'fastest':>8s} {'slowest':>8s} {'MiB/s':>7s} "
             f"{'client CPU':>10s} {'vs globus':>10s} {'round by round':>22s}"]
    keys = [k for k in results.rows if k[0] == "loopback"]
    for key in sorted(keys, key=lambda k: (k[2], "no transfer" not in k[1], k[1] != "globus-url-copy", k[1])):
        runs = results.rows[key]
        sec = statistics.median(runs)
        cpu = f"{statistics.median(results.cpu[key]):9.2f}s" if key in results.cpu else ""
        ratio, paired = "", ""
        ref = ("loopback", "globus-url-copy", key[2])
        if key[1].startswith("vmgrid") and ref in results.rows:
            ratio = f"{results.seconds(ref) / sec:9.2f}x"
            rs = paired_ratios(results.rows[ref], runs)
            paired = f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"
        lines.append(f"{key[1]:30s} {key[2]:>3d} {sec:6.2f}s {min(runs):7.2f}s {max(runs):7.2f}s {mib / sec:7.1f} "
                     f"{cpu:>10s} {ratio:>10s} {paired:>22s}")
    lines.append("vs globus: globus-url-copy's median over vmgrid's; round by round: the median of the rounds' "
                 "ratios (fastest-slowest round)")
    return lines


def report(results: Results, size: int, where: Path | None = None) -> str:
    lines = [machine_facts(where), ""]
    mbit = size * 8 / 1e6
    mib = size / (1 << 20)
    wan_rows = [k for k in results.rows if k[0] == "wan"]
    if wan_rows:
        lines += [f"WAN: {mib:.0f} MiB over an emulated 1 Gbit/s link, 50 ms RTT, Debian default TCP buffers",
                  f"{'client':30s} {'-p':>3s} {'seconds':>8s} {'Mbit/s':>8s} {'% link':>7s} {'vs globus':>10s}"]
        for key in sorted(wan_rows, key=lambda k: (k[1] != "raw TCP (link ceiling)", k[2], k[1])):
            sec = results.seconds(key)
            rate = mbit / sec
            ref = ("wan", "globus-url-copy", key[2])
            ratio = results.seconds(ref) / sec if ref in results.rows and key[1].startswith("vmgrid") else None
            lines.append(f"{key[1]:30s} {key[2]:>3d} {sec:8.2f} {rate:8.1f} {rate / LINK_MBIT * 100:6.1f}% "
                         f"{'' if ratio is None else f'{ratio:9.2f}x':>10s}")
        lines.append("")
    loop_rows = [k for k in results.rows if k[0] == "loopback"]
    if loop_rows:
        lines += loopback_table(results, mib)
    gsi_rows = [k for k in results.rows if k[0] == "gsi"]
    if gsi_rows:
        lines += ["", f"gsiftp:// (GSI, DCAU A) from globus-gridftp-server: {mib:.0f} MiB on 127.0.0.1",
                  f"{'client':30s} {'-p':>3s} {'seconds':>8s} {'MiB/s':>8s} {'vs globus':>10s} {'P/C time':>9s}"]
        for key in sorted(gsi_rows, key=lambda k: (k[2], k[1])):
            sec = results.seconds(key)
            prot = key[1][-1]
            ref = ("gsi", f"globus-url-copy PROT {prot}", key[2])
            ratio = results.seconds(ref) / sec if ref in results.rows and key[1].startswith("vmgrid") else None
            clear = ("gsi", key[1][:-1] + "C", key[2])
            cost = sec / results.seconds(clear) if prot == "P" and clear in results.rows else None
            lines.append(f"{key[1]:30s} {key[2]:>3d} {sec:8.2f} {mib / sec:8.1f} "
                         f"{'' if ratio is None else f'{ratio:9.2f}x':>10s} "
                         f"{'' if cost is None else f'{cost:8.2f}x':>9s}")
    gsiwan_rows = [k for k in results.rows if k[0] == "gsiwan"]
    if gsiwan_rows:
        lines += ["", f"gsiftp:// (GSI, DCAU A) over the emulated WAN: {mib:.0f} MiB, 1 Gbit/s, 50 ms RTT, "
                      "Debian default TCP buffers",
                  f"{'server':22s} {'client':22s} {'-p':>3s} {'seconds':>8s} {'Mbit/s':>8s} {'vs globus':>10s} "
                  f"{'P/C time':>9s}"]
        for key in sorted(gsiwan_rows, key=lambda k: (k[1].split("|")[1], k[2], k[1])):
            sec = results.seconds(key)
            tool, server = key[1].split("|")
            prot = tool[-1]
            ref = ("gsiwan", f"globus-url-copy PROT {prot}|{server}", key[2])
            ratio = results.seconds(ref) / sec if ref in results.rows and tool.startswith("vmgrid") else None
            clear = ("gsiwan", f"{tool[:-1]}C|{server}", key[2])
            cost = sec / results.seconds(clear) if prot == "P" and clear in results.rows else None
            lines.append(f"{server:22s} {tool:22s} {key[2]:>3d} {sec:8.2f} {mbit / sec:8.1f} "
                         f"{'' if ratio is None else f'{ratio:9.2f}x':>10s} "
                         f"{'' if cost is None else f'{cost:8.2f}x':>9s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each case (the tables show the median; on loopback: rounds, in ABBA order)")
    parser.add_argument("--goal-pair", action="store_true",
                        help="loopback: only globus-url-copy -p 1 and vmgrid -p 1 with the BLAKE3 digest known (issue "
                             "13 §5's goal), alternating, with no hash rows (use with --repeat 15 or so)")
    parser.add_argument("--skip-wan", action="store_true")
    parser.add_argument("--skip-loopback", action="store_true")
    parser.add_argument("--skip-gsi", action="store_true")
    parser.add_argument("--skip-gsi-wan", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_gridftp: needs root (network namespaces, the Globus server's anonymous user)", file=sys.stderr)
        return 2
    for tool in ("globus-url-copy", "globus-gridftp-server", "curl", "ip", "ss"):
        if not shutil.which(tool):
            print(f"bench_gridftp: {tool} is missing (./run.sh setup installs it)", file=sys.stderr)
            return 2
    if args.repeat < 1:
        print("bench_gridftp: --repeat must be at least 1", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    compile_bytecode()      # `vmgrid transfer` starts as an installed vmgrid does (see benchgrid)
    work = make_workdir(size)
    results = Results()
    try:
        if not args.skip_wan:
            bench_wan(work, size, args.repeat, results)
        if not args.skip_loopback:
            bench_loopback(work, size, args.repeat, results, goal_pair=args.goal_pair)
        if not args.skip_gsi:
            bench_gsi(work, size, args.repeat, results)
        if not args.skip_gsi_wan:
            bench_gsi_wan(work, size, args.repeat, results)
        text = report(results, size, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gridftp.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
