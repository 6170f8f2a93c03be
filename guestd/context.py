"""The instance context: what the VMManager tells guestd at boot (format version 1, validated).

The same module validates on both sides: the VMManager builds the context (services/vmmanager/context.py)
and guestd reads it from one of its sources. docs/guestd.md documents every field.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
FILE_NAME = "context.json"
VOLUME_LABEL = "VMGRID-CTX"
DEFAULT_CHANNEL = "org.vmgrid.guestd.0"
MAX_CONTEXT_BYTES = 32 * 1024

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CHANNEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_TRUST_FILE = re.compile(r"^[0-9a-f]{8}\.(\d|r\d|signing_policy)$")
MAX_ADMINS = 32
MAX_TRUST_FILES = 24
MAX_DN = 512


class ContextError(ValueError):
    """The context is missing, unreadable or does not follow the format."""


@dataclass(frozen=True)
class NetworkContext:
    """The instance's leased address on the NIC whose MAC is ``mac``."""

    mac: str
    address: str
    netmask: str
    gateway: str | None = None
    dns: tuple[str, ...] = ()

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(f"0.0.0.0/{self.netmask}").prefixlen


@dataclass(frozen=True)
class ContainerContext:
    """The grid container command guestd starts and keeps running."""

    command: tuple[str, ...]
    restart: str = "always"          # "always" | "on-failure" | "never"
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GridContext:
    """What the grid container in the guest (the job service) needs from the node: the instance's owner
    (the DN the VMManager deployed it for), the VO's admins, and the trusted CA directory's files
    (``<hash>.0``, ``<hash>.r0``, ``<hash>.signing_policy``) by name."""

    owner: str
    admins: tuple[str, ...] = ()
    trust: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceContext:
    """Everything guestd needs: identity, token, network, hostname, host time, container, channel."""

    instance: str
    token: str
    hostname: str
    network: NetworkContext
    time: float
    container: ContainerContext | None = None
    channel: str = DEFAULT_CHANNEL
    version: int = FORMAT_VERSION
    grid: GridContext | None = None
    warm: bool = False               # a warm-snapshot template: waits for its clones' ``recontext``

    def to_json(self) -> bytes:
        """The canonical JSON document (the file on the context ISO)."""
        body = asdict(self)
        body["network"]["dns"] = list(self.network.dns)
        if self.container is not None:
            body["container"]["command"] = list(self.container.command)
        if self.grid is None:
            del body["grid"]
        else:
            body["grid"]["admins"] = list(self.grid.admins)
        if not self.warm:
            del body["warm"]
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ContextError(message)


def _ipv4(value: Any, what: str) -> str:
    _require(isinstance(value, str), f"{what} must be a dotted IPv4 address string")
    try:
        return str(ipaddress.IPv4Address(value))
    except ipaddress.AddressValueError:
        raise ContextError(f"{what} {value!r} is not an IPv4 address") from None


def validate(body: Any) -> InstanceContext:
    """Check a decoded context document field by field; return it as an InstanceContext."""
    _require(isinstance(body, dict), "the context must be a JSON object")
    _require(body.get("version") == FORMAT_VERSION,
             f"unsupported context version {body.get('version')!r} (want {FORMAT_VERSION})")
    known = {"version", "instance", "token", "hostname", "network", "time", "container", "channel", "grid",
             "warm"}
    unknown = set(body) - known
    _require(not unknown, f"unknown context fields: {sorted(unknown)}")
    instance = body.get("instance")
    _require(isinstance(instance, str) and bool(_INSTANCE.match(instance)),
             f"instance {instance!r} must be 1-64 of [A-Za-z0-9_.-]")
    token = body.get("token")
    _require(isinstance(token, str) and bool(_TOKEN.match(token)),
             "token must be 16-128 characters of [A-Za-z0-9_-]")
    hostname = body.get("hostname")
    _require(isinstance(hostname, str) and len(hostname) <= 253 and bool(_HOSTNAME.match(hostname)),
             f"hostname {hostname!r} is not a valid host name")
    t = body.get("time")
    _require(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 2**33,
             "time must be the host's UNIX time in seconds")
    channel = body.get("channel", DEFAULT_CHANNEL)
    warm = body.get("warm", False)
    _require(isinstance(warm, bool), "warm must be true or false")
    _require(isinstance(channel, str) and bool(_CHANNEL.match(channel)),
             f"channel {channel!r} must be 1-100 of [A-Za-z0-9_.-]")

    net = body.get("network")
    _require(isinstance(net, dict), "network must be an object")
    unknown = set(net) - {"mac", "address", "netmask", "gateway", "dns"}
    _require(not unknown, f"unknown network fields: {sorted(unknown)}")
    mac = net.get("mac")
    _require(isinstance(mac, str) and bool(_MAC.match(mac.lower())), f"network.mac {mac!r} is not a MAC address")
    address = _ipv4(net.get("address"), "network.address")
    netmask = _ipv4(net.get("netmask"), "network.netmask")
    try:
        network = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
    except ValueError:
        raise ContextError(f"network.netmask {netmask!r} is not a contiguous netmask") from None
    gateway = net.get("gateway")
    if gateway is not None:
        gateway = _ipv4(gateway, "network.gateway")
        _require(ipaddress.IPv4Address(gateway) in network,
                 f"network.gateway {gateway} is outside {network}")
    dns = net.get("dns", [])
    _require(isinstance(dns, list) and len(dns) <= 3, "network.dns must be a list of at most 3 addresses")
    dns = tuple(_ipv4(d, "network.dns entry") for d in dns)

    container = body.get("container")
    if container is not None:
        _require(isinstance(container, dict), "container must be an object or null")
        unknown = set(container) - {"command", "restart", "environment"}
        _require(not unknown, f"unknown container fields: {sorted(unknown)}")
        command = container.get("command")
        _require(isinstance(command, list) and len(command) > 0 and all(isinstance(c, str) and c for c in command),
                 "container.command must be a non-empty list of strings (argv)")
        restart = container.get("restart", "always")
        _require(restart in ("always", "on-failure", "never"),
                 "container.restart must be always, on-failure or never")
        env = container.get("environment", {})
        _require(isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()),
                 "container.environment must map strings to strings")
        container = ContainerContext(tuple(command), restart, dict(env))

    return InstanceContext(
        instance=instance, token=token, hostname=hostname,
        network=NetworkContext(mac.lower(), address, netmask, gateway, dns),
        time=float(t), container=container, channel=channel, grid=_grid(body.get("grid")), warm=warm,
    )


def _dn(value: Any, what: str) -> str:
    _require(isinstance(value, str) and value.startswith("/") and 3 <= len(value) <= MAX_DN
             and value.isprintable() and "=" in value, f"{what} {value!r} is not a grid DN (/O=.../CN=...)")
    return value


def _grid(grid: Any) -> GridContext | None:
    """The optional ``grid`` object: owner DN, admin DNs, trusted CA files (bounded in number and names)."""
    if grid is None:
        return None
    _require(isinstance(grid, dict), "grid must be an object or null")
    unknown = set(grid) - {"owner", "admins", "trust"}
    _require(not unknown, f"unknown grid fields: {sorted(unknown)}")
    owner = _dn(grid.get("owner"), "grid.owner")
    admins = grid.get("admins", [])
    _require(isinstance(admins, list) and len(admins) <= MAX_ADMINS,
             f"grid.admins must be a list of at most {MAX_ADMINS} DNs")
    trust = grid.get("trust", {})
    _require(isinstance(trust, dict) and len(trust) <= MAX_TRUST_FILES,
             f"grid.trust must map at most {MAX_TRUST_FILES} file names to their text")
    for name, text in trust.items():
        _require(isinstance(name, str) and bool(_TRUST_FILE.match(name)),
                 f"grid.trust file name {name!r} is not <8 hex digits>.0, .r0 or .signing_policy")
        _require(isinstance(text, str) and text.isascii(), f"grid.trust[{name!r}] must be ASCII text (PEM)")
    return GridContext(owner, tuple(_dn(a, "grid.admins entry") for a in admins), dict(trust))


def loads(data: bytes) -> InstanceContext:
    """Parse the context file's bytes (size-limited JSON) and validate them."""
    _require(len(data) <= MAX_CONTEXT_BYTES, f"context of {len(data)} bytes exceeds {MAX_CONTEXT_BYTES}")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContextError(f"the context is not JSON: {exc}") from None
    return validate(body)
