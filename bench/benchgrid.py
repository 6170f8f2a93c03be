"""Shared parts of the VMManager and container benchmarks: `vmgrid serve` processes started from a TOML
configuration (on loopback or inside the emulated WAN's network namespaces), the emulated WAN link
(../shared/tools/wan.sh), percentiles and the table of deployment phase shares."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.localgrid import write_toml  # noqa: E402

WAN_SH = Path(os.environ.get("VMGRID_WAN_SH") or next(
    (p for p in (REPO.parent / "shared" / "tools" / "wan.sh", REPO.parents[1] / "shared" / "tools" / "wan.sh")
     if p.is_file()), REPO.parent / "shared" / "tools" / "wan.sh"))   # a worktree sits one level deeper
from services.vmmanager.states import PHASES  # noqa: E402,F401  (re-exported for the benches)
OTHER = "(outside the phases)"   # the SOAP round trip, the client, the waits between phases


# Plain TCP, the peer of every transfer figure: sendfile into N streams, the receiver discarding (no protocol,
# no disk). `send N HOST PORT FILE` listens and sends; `recv N HOST PORT` receives and prints bytes and seconds.
WIRE_SCRIPT = r"""
import json, os, socket, sys, threading, time
mode, n, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if mode == "send":
    path = sys.argv[5]
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port)); l.listen(64); print("ready", flush=True)
    fd = os.open(path, os.O_RDONLY); size = os.fstat(fd).st_size
    conns = [l.accept()[0] for _ in range(n)]
    per = -(-size // n)
    def send(c, i):
        off, end = i * per, min(size, (i + 1) * per)
        while off < end:
            off += os.sendfile(c.fileno(), fd, off, end - off)
        c.close()
    ts = [threading.Thread(target=send, args=(c, i)) for i, c in enumerate(conns)]
    [t.start() for t in ts]; [t.join() for t in ts]
else:
    got = [0] * n
    t0 = time.perf_counter()
    conns = [socket.create_connection((host, port)) for _ in range(n)]
    def recv(c, i):
        buf = bytearray(1 << 20)
        while True:
            k = c.recv_into(buf)
            if not k:
                return
            got[i] += k
    ts = [threading.Thread(target=recv, args=(c, i)) for i, c in enumerate(conns)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(json.dumps({"bytes": sum(got), "seconds": time.perf_counter() - t0}), flush=True)
"""


class BenchError(RuntimeError):
    """The benchmark could not run (a service did not start, the WAN could not be set up)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- figures ----------------------------------------------------------------------------------------------
def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; the only sample for one sample."""
    xs = sorted(samples)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def p50(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


@dataclass
class DeployRun:
    """One deployment as the client saw it: wall time from Deploy to Running, and the node's phases."""

    wall: float
    phases: list[tuple[str, float]] = field(default_factory=list)

    @property
    def phase_sum(self) -> float:
        return sum(s for _, s in self.phases)

    def to_json(self) -> dict:
        return {"wall": self.wall, "phases": self.phases}

    @classmethod
    def from_json(cls, d: dict) -> "DeployRun":
        return cls(d["wall"], [(n, s) for n, s in d["phases"]])


def phase_table(title: str, runs: Iterable[DeployRun]) -> str:
    """The poster's figure as a table: mean seconds of each phase over the runs and its share of the mean
    wall time; what the phases do not cover (SOAP, client, waits) is its own row."""
    runs = list(runs)
    if not runs:
        return f"{title}: no runs\n"
    names = [p for p in PHASES if any(n == p for r in runs for n, _ in r.phases)]
    names += sorted({n for r in runs for n, _ in r.phases} - set(names))
    wall = statistics.mean(r.wall for r in runs)
    lines = [f"{title} ({len(runs)} run{'s' if len(runs) > 1 else ''}, mean wall {fmt_s(wall)})",
             f"  {'phase':<22} {'mean':>10} {'share':>7}"]
    for name in names:
        secs = statistics.mean(sum(s for n, s in r.phases if n == name) for r in runs)
        lines.append(f"  {name:<22} {fmt_s(secs):>10} {secs / wall * 100:6.1f}%")
    other = statistics.mean(r.wall - r.phase_sum for r in runs)
    lines.append(f"  {OTHER:<22} {fmt_s(other):>10} {other / wall * 100:6.1f}%")
    return "\n".join(lines) + "\n"


def fmt_s(seconds: float) -> str:
    """Seconds in a readable unit: ms below 1 s, s up to 10 min, then minutes and seconds."""
    if seconds != seconds:  # NaN
        return "n/a"
    if abs(seconds) < 1:
        return f"{seconds * 1000:.1f} ms"
    if abs(seconds) < 600:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table, first column left-aligned, the others right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    out = []
    for r in [list(map(str, header)), *rows]:
        out.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


# -- the emulated WAN -----------------------------------------------------------------------------------
@dataclass
class Wan:
    """wan.sh's two namespaces behind a router, under our own prefix (``<prefix>srv`` 10.99.1.1 and
    ``<prefix>cli`` 10.99.2.1), so other benchmarks' namespaces are not touched. ``down`` kills every
    process inside our namespaces and deletes them."""

    prefix: str = "vmb"
    delay_ms: int = 25
    rate: str = "100mbit"
    shaping: str = ""
    srv_ip: str = "10.99.1.1"
    cli_ip: str = "10.99.2.1"

    @property
    def srv_name(self) -> str:
        return f"{self.prefix}srv"      # resolves in both namespaces through wan.sh's hosts files

    @property
    def cli_name(self) -> str:
        return f"{self.prefix}cli"

    def env(self) -> dict[str, str]:
        return {**os.environ, "P": self.prefix, "DELAY_MS": str(self.delay_ms), "RATE": self.rate}

    def up(self) -> "Wan":
        if not WAN_SH.is_file():
            raise BenchError(f"{WAN_SH} is missing (set VMGRID_WAN_SH to the emulated WAN script)")
        if os.geteuid() != 0:
            raise BenchError("the emulated WAN needs root (network namespaces)")
        proc = subprocess.run(["bash", str(WAN_SH), "up"], env=self.env(), capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            self.down()
            raise BenchError(f"wan.sh up failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
        self.shaping = next((l for l in proc.stdout.splitlines() if l.startswith("shaping:")), proc.stdout.strip())
        return self

    def down(self) -> None:
        subprocess.run(["bash", str(WAN_SH), "down"], env=self.env(), capture_output=True, text=True, timeout=120)

    def command(self, side: str, argv: Sequence[str]) -> list[str]:
        """argv run in namespace ``side`` (srv or cli) with its hosts file."""
        return ["bash", str(WAN_SH), "exec", side, *argv]

    def __enter__(self) -> "Wan":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


# -- service processes ------------------------------------------------------------------------------------
@dataclass
class ServiceProcess:
    """A `vmgrid serve` process (the leader of its own process group) and its log."""

    name: str
    process: subprocess.Popen
    log: Path
    base_url: str = ""

    def url(self, service: str) -> str:
        return f"{self.base_url}/wsrf/services/{service}"

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """End a process this benchmark started, with its process group (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def serve(name: str, services: Sequence[str], config: dict, root: Path, *, wrap: Sequence[str] = (),
          timeout: float = 90, public_host: str | None = None, env: dict | None = None) -> ServiceProcess:
    """Start `vmgrid serve SERVICES -c <root>/<name>.toml` (inside ``wrap``, e.g. a namespace) and wait for
    it to announce its URL. ``public_host`` replaces the bound address in the URL (a name the certificate
    carries)."""
    cfg = root / f"{name}.toml"
    write_toml(cfg, config)
    logfile = root / f"{name}.log"
    out = open(logfile, "ab")
    proc = subprocess.Popen([*wrap, sys.executable, "-m", "client.cli", "serve", *services, "-c", str(cfg)],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}, start_new_session=True)
    out.close()
    sp = ServiceProcess(name, proc, logfile)
    deadline = time.monotonic() + timeout
    marker = "vmgrid: serving "
    while time.monotonic() < deadline:
        text = logfile.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith(marker) and " at " in line:
                url = line.rsplit(" at ", 1)[1].strip()
                if public_host:
                    scheme, _, rest = url.partition("://")
                    url = f"{scheme}://{public_host}:{rest.rsplit(':', 1)[1]}"
                sp.base_url = url
                return sp
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    stop_process(proc)
    raise BenchError(f"{name} did not start within {timeout:.0f} s:\n{logfile.read_text(errors='replace')[-3000:]}")


def compile_bytecode() -> None:
    """Compile vmgrid's modules to bytecode (``__pycache__``, as installing a wheel does), so the processes a
    bench times start as an installed vmgrid does. Python reads cached bytecode even under
    PYTHONDONTWRITEBYTECODE=1 (set in some of this machine's sessions), where otherwise every `vmgrid`
    process compiles every module it imports, about a second of CPU, before it does anything."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                    *(str(REPO / d) for d in ("client", "services", "security", "gridftp", "guestd"))],
                   check=True, stdout=subprocess.DEVNULL)


def security_section(cert_dir: Path, host_cert: Path, host_key: Path) -> dict:
    return {"cert_dir": str(cert_dir), "host_cert": str(host_cert), "host_key": str(host_key)}


def bench_policy(pki, instances: int = 1000) -> str:
    """The test grid's policy (alice in bio, admin administering it) with instance limits high enough that
    they never refuse a benchmark deployment."""
    from tests.fixtures.grid import grid_policy

    return grid_policy(pki, limits={"max_lifetime": "24h", "max_memory": 8192, "max_vcpus": 8,
                                    "max_instances_per_user": instances, "max_instances_per_group": instances})


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process and its waited-for children have used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores, everything but idle and iowait)."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def machine_facts() -> str:
    """Cores, CPU model and whether it has the SHA, AES and AVX2 extensions (they decide hashing, TLS and
    RSA speed)."""
    flags: set[str] = set()
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    ext = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("sha_ni", "aes", "vaes", "avx2"))
    return f"{os.cpu_count()} cores ({model}; {ext}), {loadavg()}"


def signature_floor(private_keys, n: int = 200, message: bytes = b"\x00" * 700) -> dict:
    """The cryptographic floor of one signed round trip: one signature with each of ``private_keys`` (the
    client's and the host's: RSA PKCS#1 v1.5 or ECDSA, SHA-256), p50 over ``n`` rounds in this process, and
    the verifications; seconds. Run in the same run as the figures it is compared with."""
    import time

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    def sign(key):
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def verify(key, signature):
        public = key.public_key()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())

    signs, verifies = [], []
    for _ in range(n):
        t = time.perf_counter()
        sigs = [sign(k) for k in private_keys]
        signs.append(time.perf_counter() - t)
        t = time.perf_counter()
        for k, s in zip(private_keys, sigs):
            verify(k, s)
        verifies.append(time.perf_counter() - t)
    return {"sign": p50(signs), "verify": p50(verifies)}


def openssl_speed_rsa2048(seconds: int = 2) -> float | None:
    """Seconds per RSA-2048 signature by `openssl speed` (one core), or None without openssl."""
    try:
        out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "rsa2048"], capture_output=True,
                             text=True, timeout=60 + 4 * seconds).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        words = line.split()
        if words[:3] == ["rsa", "2048", "bits"]:
            return float(words[3].rstrip("s"))
    return None
