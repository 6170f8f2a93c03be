"""A local grid on loopback: a fresh grid PKI, a configuration, and vmgrid services started as their
own processes (`vmgrid serve …`), as a site would run them. The main job and the subprocess
tests use it."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from security.pki import Credential, GridCA, make_proxy, save_proxy
from security.tls import grid_session

OU = "vmgrid"


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server to be started on next. Chosen at random below the kernel's
    ephemeral range when there is room: an ephemeral port (what binding port 0 gives) is also what every outgoing
    connection takes, so on a busy machine one could take it between this check and the server's bind."""
    low = _ephemeral_low()
    if low > 4096:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randrange(max(1024, low - 16384), low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict) -> None:
    """Write nested dicts as TOML tables (enough for vmgrid's configuration)."""
    lines: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in tables.items():
            key = k if all(c.isalnum() or c in "-_" for c in k) else toml_value(k)
            table(f"{prefix}.{key}" if prefix else key, v)

    table("", data)
    path.write_text("\n".join(lines) + "\n")


@dataclass
class User:
    name: str
    dn: str
    credential: Credential   # a proxy
    proxy_path: Path


@dataclass
class ServiceProcess:
    name: str
    port: int
    config: Path
    process: subprocess.Popen
    log: Path
    services: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"


PORT_TRIES = 3         # ports a service process is started on before its start fails (another took each)


@dataclass
class LocalGrid:
    """A grid in ``root``: ``ca/`` (the CA and its certificates/ dir), ``host/``, ``users/<name>/``,
    one state directory and configuration per service process."""

    root: Path
    ca: GridCA = field(init=False)
    users: dict[str, User] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    services_url: str = ""       # https://localhost:PORT/wsrf/services of the central process, once started
    permit_ttl: float = 0.0      # how long the services cache an Authorization service permit

    def __post_init__(self):
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        ca_dir = self.root / "ca"
        self.ca = GridCA.load(ca_dir) if (ca_dir / "ca.pem").exists() else GridCA.create(ca_dir)
        self.host_dir = self.root / "host"
        if not (self.host_dir / "hostcert.pem").exists():
            self.ca.issue_host("localhost", ou=OU, out_dir=self.host_dir)

    @property
    def cert_dir(self) -> Path:
        return self.ca.cert_dir

    def user(self, name: str) -> User:
        if name not in self.users:
            d = self.root / "users" / name
            cred = self.ca.issue_user(name, ou=OU, out_dir=d)
            proxy = make_proxy(cred, hours=12)
            path = save_proxy(proxy, d / "proxy.pem")
            self.users[name] = User(name, f"/O=Grid/OU={OU}/CN={name}", proxy, path)
        return self.users[name]

    def env(self, user: str | None = None) -> dict[str, str]:
        """Environment for a `vmgrid` command run as ``user`` against this grid."""
        env = {**os.environ, "X509_CERT_DIR": str(self.cert_dir)}
        if user:
            env["X509_USER_PROXY"] = str(self.user(user).proxy_path)
        return env

    def start(self, name: str, services: list[str], config: dict, *, extra_env: dict | None = None,
              timeout: float = 30, port: int | None = None) -> ServiceProcess:
        """Start `vmgrid serve SERVICES` with ``config`` (merged over the grid's defaults), on ``port``
        (a free one by default; give it when the configuration must name the service's own URL)."""
        given = port
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_TRIES):
            port = given or free_port()
            base = {
                "container": {"host": "127.0.0.1", "port": port, "state_dir": str(state), "tls": True},
                "security": {"cert_dir": str(self.cert_dir), "host_cert": str(self.host_dir / "hostcert.pem"),
                             "host_key": str(self.host_dir / "hostkey.pem")},
            }
            merged = _merge(base, config)
            cfg = self.root / f"{name}.toml"
            write_toml(cfg, merged)
            try:
                return self._spawn(name, services, cfg, port, extra_env, timeout)
            except RuntimeError as exc:
                # a free port found is free only until someone else binds it (another grid, a test run beside
                # this one): one this grid picked and lost is picked again; a port the caller named is not
                if given or attempt == PORT_TRIES - 1 or f"cannot listen on 127.0.0.1:{port}: " not in str(exc):
                    raise
        raise AssertionError("unreachable")

    def restart(self, sp: ServiceProcess, *, extra_env: dict | None = None, timeout: float = 30) -> ServiceProcess:
        """Start a stopped (or killed) service process again, on its configuration and port."""
        return self._spawn(sp.name, sp.services, sp.config, sp.port, extra_env, timeout)

    def _spawn(self, name: str, services: list[str], cfg: Path, port: int, extra_env: dict | None,
               timeout: float) -> ServiceProcess:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", *services, "-c", str(cfg)],
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                env={**os.environ, **(extra_env or {})}, start_new_session=True)
        sp = ServiceProcess(name, port, cfg, proc, log, list(services))
        self.processes[name] = sp
        self.wait_ready(sp, timeout)
        return sp

    def start_central(self, policy_text: str, ingest_dir: Path, *, permit_ttl: float = 0.0,
                      name: str = "central") -> ServiceProcess:
        """The Authorization service (with ``policy_text`` as its policy file) and the VMRepository
        (ingesting from ``ingest_dir``, with its GridFTP server) in one process; the repository asks the
        Authorization service over SOAP like any enforcement point."""
        policy = self.root / "policy.toml"
        policy.write_text(policy_text)
        port = free_port()
        self.services_url = f"https://localhost:{port}/wsrf/services"
        self.permit_ttl = permit_ttl
        return self.start(name, ["authz", "repository"], {
            "authz": {"policy": str(policy)}, "enforcement": self.enforcement(),
            "repository": {"ingest_dirs": [str(ingest_dir)], "gridftp_port": 0},
        }, port=port)

    def enforcement(self) -> dict:
        """The [enforcement] section that points a service at the central Authorization service."""
        return {"authz_url": f"{self.services_url}/AuthorizationService", "permit_ttl": self.permit_ttl}

    def start_node(self, name: str, vmmanager: dict, *, extra_env: dict | None = None) -> ServiceProcess:
        """A VMManager node (libvirt's test driver unless ``vmmanager`` says otherwise) that authorizes
        through the central Authorization service and stages from the central repository."""
        return self.start(name, ["vmmanager"], {
            "enforcement": self.enforcement(),
            "vmmanager": {"node": name, "repository": f"{self.services_url}/VMRepositoryService",
                          # the local grid's clients listen on this machine: their consumers are on loopback
                          "consumers_allow": ["127.0.0.0/8"],
                          # the local grid's nodes all run here: they take in each other's instances
                          "migration_sources": ["localhost", "127.0.0.1"], **vmmanager},
        }, extra_env=extra_env)

    def wait_ready(self, sp: ServiceProcess, timeout: float = 30) -> None:
        session = grid_session(self.cert_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sp.process.poll() is not None:
                raise RuntimeError(f"{sp.name} exited with {sp.process.returncode}:\n{sp.log.read_text()[-3000:]}")
            try:
                if session.get(sp.base_url + "/", timeout=2).status_code == 200:
                    return
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{sp.name} did not start within {timeout} s:\n{sp.log.read_text()[-3000:]}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        sp = self.processes.pop(name, None)
        if sp is None:
            return None
        if sp.process.poll() is None:
            sp.process.send_signal(sig)
            try:
                sp.process.wait(10)
            except subprocess.TimeoutExpired:
                sp.process.kill()
                sp.process.wait()
        return sp.process.returncode

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def __enter__(self) -> "LocalGrid":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
