"""vmgrid's TOML configuration: one file, a section per part, every key with a documented default
(docs/configuration.md). Unknown keys and wrong types are refused with the key's name."""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.authz.config import AuthzConfig, EnforcementConfig
from services.container.limits import ConnectionLimits
from services.jobs.config import JobsConfig
from services.vmmanager.config import VMManagerConfig
from services.vmrepository.config import RepositoryConfig


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the file and key."""


@dataclass
class ContainerConfig:
    host: str = "127.0.0.1"          # address to listen on
    port: int = 8443                 # 0 picks a free port
    tls: bool = True                 # HTTPS with the host certificate; may be off, signing never is
    # mutual TLS: "optional" or "required" asks for a grid certificate or proxy
    tls_client_certs: Literal["none", "optional", "required"] = "none"
    public_url: str = ""             # this container's public URL (WSDL, EPRs, the wsa:To it accepts);
                                     # "" = https://<host certificate's name>:<port>
    state_dir: str = "var/vmgrid"    # each service keeps its state in <state_dir>/<service>
    threads: int = 16                # request threads per worker
    log_level: str = "info"
    log_file: str = ""               # "" = standard error
    validate_responses: bool = False # check every response against the published schema (tests)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)  # [container.limits] (docs/security.md)


@dataclass
class SecurityConfig:
    cert_dir: str = ""        # trusted CAs; "" = $X509_CERT_DIR or /etc/grid-security/certificates
    host_cert: str = ""       # "" = $X509_HOST_CERT or /etc/grid-security/hostcert.pem
    host_key: str = ""        # "" = $X509_HOST_KEY or /etc/grid-security/hostkey.pem
    clock_skew: int = 60      # seconds a request's Created may lie ahead of this clock (and its Expires behind it)
    message_lifetime: int = 300  # seconds a signed request is accepted after its Created (the freshness window:
                                 # the replay cache remembers each request this long plus clock_skew)


@dataclass
class VOConfig:
    members: list[str] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)


@dataclass
class PolicyConfig:
    """The built-in policy used while no Authorization service is configured."""

    admins: list[str] = field(default_factory=list)   # repository admins (local-path ingest)
    vos: dict[str, VOConfig] = field(default_factory=dict)


@dataclass
class GridFTPConfig:
    """[gridftp]: the bounds on sessions of the services' GridFTP servers (the repository's face, a node's migration
    export, a job service's face), as `vmgrid gridftp-server`'s options of the same names (docs/gridftp.md,
    "Security"; the passive data ports' bounds: "Firewalls"); checked at start (gridftp.server.check_session_limits).
    A key not given: its default there.
    ``data_ports``: the ports every GridFTP data listener of the `vmgrid serve` process takes (its servers'
    PASV/EPSV/SPAS, its own downloads' PORT: a node pulling a migration's files or staging an image), as
    `vmgrid gridftp-server --data-ports`; given, it takes the place of GLOBUS_TCP_PORT_RANGE in the process's
    environment; "" leaves that variable as the environment gives it (unset: any free port)."""

    max_sessions: int = 64                        # control connections at once
    max_sessions_per_identity: int | None = None  # logged in at once per DN (not given: max_sessions // 8)
    max_sessions_per_address: int | None = None   # ... per address (an IPv6 /64, all of loopback: one; max_sessions // 4)
    host_sessions: int | None = None              # kept for host DNs (nodes, services; max_sessions // 4)
    transfer_idle_timeout: float = 60.0           # seconds a logged-in session may go without a transfer (0: no bound)
    # passive data ports (PASV/EPSV/SPAS) no data connection has reached yet: at most this many per identity across
    # its sessions (hosts not counted), and one no data command takes up within passive_wait seconds is closed (0: never)
    passive_per_identity: int = 2
    passive_wait: float = 10.0
    data_ports: str = ""                          # "LOW,HIGH": the data ports ("" = $GLOBUS_TCP_PORT_RANGE, else any)


@dataclass
class Config:
    container: ContainerConfig = field(default_factory=ContainerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    authz: AuthzConfig = field(default_factory=AuthzConfig)                  # vmgrid serve authz (docs/authz.md)
    enforcement: EnforcementConfig = field(default_factory=EnforcementConfig)  # where services ask for decisions
    vmmanager: VMManagerConfig = field(default_factory=VMManagerConfig)      # vmgrid serve vmmanager
    jobs: JobsConfig = field(default_factory=JobsConfig)                     # vmgrid serve jobs (docs/jobs.md)
    gridftp: GridFTPConfig = field(default_factory=GridFTPConfig)            # the services' GridFTP servers
    source: str = "(defaults)"

    def state_dir(self, service: str) -> Path:
        # absolute: a relative state_dir is the working directory's at start, and the paths made from it
        # end up where another directory is the base (qcow2 backing files, libvirt's domain XML)
        return Path(self.container.state_dir).absolute() / service


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is typing.Literal:        # a key of a few words (vmm = "test" or "qemu"): a typo is named here
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        cfg = from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.source = str(path)
    return cfg
