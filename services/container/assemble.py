"""Putting a container together from the configuration: the host credential, the trusted CAs,
WS-Security in front of the services, TLS, and the services themselves."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
from pathlib import Path

from security.middleware import DEFAULT_UNDERSTOOD, WSSecurityMiddleware
from security.pki import PKIError, default_cert_dir, dn_string, load_host_credential
from security.tls import server_ssl_adapter
from security.trust import ChainError, TrustStore
from security.wssec import SecurityPolicy
from services.container.config import Config, ConfigError
from services.container.server import Container
from services.container.service import SoapService

log = logging.getLogger("vmgrid.container")

SERVICE_NAMES = ("repository", "authz", "vmmanager", "jobs")


def trust_store(config: Config) -> TrustStore:
    given = config.security.cert_dir
    try:
        return TrustStore(Path(given) if given else default_cert_dir())
    except ChainError as exc:         # no such directory
        raise ConfigError(f"[security] cert_dir = {given!r}: {exc}" if given else
                          f"[security] cert_dir is not set, and the default cannot be used: {exc}") from None


def host_credential(config: Config):
    """The host credential ([security] host_cert and host_key); one it cannot load is a ConfigError naming the key
    and the file (a missing or unreadable certificate, a key that is not its own or is readable by others)."""
    s = config.security
    cert = s.host_cert or os.environ.get("X509_HOST_CERT") or None
    key = s.host_key or os.environ.get("X509_HOST_KEY") or None
    try:
        credential = load_host_credential(cert, key)
    except PKIError as exc:
        name = "host_key" if "private key" in str(exc) and s.host_key else "host_cert"
        given = getattr(s, name)
        if given:
            raise ConfigError(f"[security] {name} = {given!r}: {exc}") from None
        raise ConfigError(f"[security] {name} is not set, and the one found instead cannot be used: {exc}") from None
    problem = not_a_host_certificate(credential)
    if problem:
        where = f"[security] host_cert = {s.host_cert!r}" if s.host_cert else \
            "[security] host_cert is not set, and the one found instead"
        raise ConfigError(f"{where}: {problem}; give the host's certificate (vmgrid ca host NAME)")
    return credential


def not_a_host_certificate(credential) -> str:
    """Why ``credential`` cannot serve as a host's (a user's certificate given as host_cert: every client's TLS
    handshake then failed with "certificate verify failed", long after a start that said nothing), or ""."""
    from cryptography import x509

    cert = credential.certificate
    subject = dn_string(cert.subject)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if x509.oid.ExtendedKeyUsageOID.SERVER_AUTH not in usage:
            return f"{subject} is not a TLS server's certificate (its extended key usage has no serverAuth)"
    except x509.ExtensionNotFound:
        pass
    if certificate_host(credential) is None:
        return f"{subject} names no host (no CN=host/NAME, no DNS name in its subjectAltName)"
    return ""


def policy_point(config: Config):
    """The policy decision point of this container's enforcing services: the Authorization service named by
    [enforcement] authz_url (over signed SOAP with the host credential), else the policy engine over the
    default site policy with the [policy] section's admins and VO groups."""
    e = config.enforcement
    if e.authz_url:
        from services.authz.client import ServicePolicyPoint

        return ServicePolicyPoint(e.authz_url, host_credential(config), trust_store(config), permit_ttl=e.permit_ttl,
                                  timeout=e.timeout, expected_host_dn=e.expected_host_dn or None)
    from services.authz.engine import site_policy_point

    return site_policy_point(config.policy.admins,
                             {vo: {"members": v.members, "admins": v.admins} for vo, v in config.policy.vos.items()})


JOB_DIR_FLOOR = 4 * 4096      # [jobs] staging_quota, submitter_quota: a job's directory, its stdout, stderr, a file


def _between(least: int, most: int) -> tuple:
    return (lambda v: least <= v <= most), f"{least} to {most}"


def _at_least(least: int) -> tuple:
    return (lambda v: v >= least), f"{least} or more"


def _more_than_zero() -> tuple:
    return (lambda v: v > 0), "more than 0"


# The numbers a key of [vmmanager] or [jobs] may hold beyond its type (the configuration's defaults and meaning:
# services/vmmanager/config.py, services/jobs/config.py, docs/configuration.md): key -> (what it counts, rule).
# A value outside is refused at start in one line, where it would have failed at the first deploy or job (a
# staging_parallel of 0 refused every image's staging), hung a wait forever or turned a bound off unasked.
NUMBER_RULES: dict[str, dict[str, tuple]] = {
    "vmmanager": {
        "guard_broadcast_rate": ("broadcast frames a second (0: no bound)", _at_least(0)),
        "staging_parallel": ("GridFTP streams", _between(1, 64)),       # as `vmgrid transfer -p`
        "deploy_workers": ("deployments at once", _at_least(1)),
        "sweep_interval": ("seconds", _more_than_zero()),
        "guest_ready_timeout": ("seconds", _more_than_zero()),
        "warm_restore_timeout": ("seconds", _more_than_zero()),
        "warm_spares": ("copies (0: none)", _at_least(0)),
        "shutdown_timeout": ("seconds (0: off at once)", _at_least(0)),
        "hold_grace": ("seconds", _at_least(0)),
        "hold_linger": ("seconds (0: given back with the last instance)", _at_least(0)),
        "verdict_seconds": ("seconds (0: asked at every deployment)", _at_least(0)),
        "notify_deadline": ("seconds", _more_than_zero()),
        "migration_timeout": ("seconds", _more_than_zero()),
        "migration_incoming_timeout": ("seconds", _more_than_zero()),
        "migration_prepare_timeout": ("seconds", _more_than_zero()),
        "migration_fixup_timeout": ("seconds", _more_than_zero()),
        "guest_cert_days": ("days", _more_than_zero()),
        "list_page": ("instances a page", _between(1, 1000)),          # services/vmmanager/listing.py MAX_PAGE
        "migration_port": ("a port (0 picks a free one)", _between(0, 65535)),
    },
    "security": {
        "clock_skew": ("seconds", _between(0, 3600)),
        "message_lifetime": ("seconds", _between(1, 3600)),
    },
    "jobs": {
        "default_lifetime": ("seconds", _at_least(1)),
        "max_lifetime": ("seconds", _at_least(1)),
        "max_live_jobs": ("jobs", _at_least(1)),
        "max_output": ("bytes", _at_least(0)),
        "tail_bytes": ("bytes", _at_least(0)),
        "kill_grace": ("seconds (0: SIGKILL at once)", _at_least(0)),
        "sweep_interval": ("seconds", _more_than_zero()),
        "staging_parallel": ("GridFTP streams", _between(1, 64)),       # as `vmgrid transfer -p`
        # every entry of a job's directory counts at least 4096 bytes, and it holds at least the job's standard
        # output and error: under four entries' worth no job could end Done (trial15 X6: 1 started, failed all)
        "staging_quota": ("bytes (each entry of a job's directory counts at least 4096)", _at_least(JOB_DIR_FLOOR)),
        "submitter_quota": ("bytes (each entry of a job's directory counts at least 4096)", _at_least(JOB_DIR_FLOOR)),
        "tmp_size": ("bytes", _at_least(1 << 20)),          # 1 MiB: a page or two made every /tmp write fail
        "max_processes": ("processes (0: no bound)", _at_least(0)),
        "max_files": ("files and directories a job's directory holds", _at_least(1)),
    },
    # every container's: a 0 started a container that said "serving" and answered nothing, or dropped every
    # connection silently (trial14b V1, V6)
    "container": {
        "threads": ("request threads", _at_least(1)),
    },
    "container.limits": {
        "handshake_timeout": ("seconds", _more_than_zero()),
        "handshake_threads": ("threads", _at_least(1)),
        "header_timeout": ("seconds", _more_than_zero()),
        "body_min_rate": ("bytes a second", _at_least(1)),
        "body_grace": ("seconds", _at_least(0)),
        "idle_timeout": ("seconds", _more_than_zero()),
        "send_min_rate": ("bytes a second", _at_least(1)),
        "max_connections": ("connections", _at_least(1)),
        "max_connections_per_address": ("connections", _at_least(1)),
        # a SOAP call's request line and headers take some hundreds of bytes: under 4096 every request was 431,
        # with nothing in the log (trial15 X10)
        "max_header_bytes": ("bytes", _at_least(4096)),
        "max_body_bytes": ("bytes", _at_least(1)),
        "max_body_bytes_held": ("bytes", _at_least(1)),
        "max_markup_held": ("markup items", _at_least(1)),
    },
    "repository": {
        "max_image_bytes": ("bytes", _at_least(1)),
        "upload_quota_bytes": ("bytes", _at_least(1)),
        "upload_max_age": ("seconds (0: kept)", _at_least(0)),
        "default_limit": ("descriptors a page", _between(1, 1000)),     # as a query's limit (vmgrid repo query --limit)
        "max_hold_seconds": ("seconds", _at_least(1)),
        "reserve_bytes": ("bytes (0: none)", _at_least(0)),
    },
    # the repository's and a node's (their calls to the Authorization service)
    "enforcement": {
        "permit_ttl": ("seconds (0: not cached)", _at_least(0)),
        "timeout": ("seconds", _more_than_zero()),
    },
    "authz": {
        "reload_interval": ("seconds (0: only on SIGHUP, ReloadPolicy or an admin change)", _at_least(0)),
        "slot_grace": ("seconds", _at_least(0)),
    },
}


def check_numbers(name: str, section) -> None:
    """Each number of ``section`` ([vmmanager], [jobs] or [security]) within its rule (NUMBER_RULES), or a ValueError naming the
    key, its value and what it may be: ``[vmmanager] staging_parallel = 0: GridFTP streams, 1 to 64``."""
    for key, (what, (holds, rule)) in NUMBER_RULES.get(name, {}).items():
        value = getattr(section, key)
        if not (math.isfinite(value) and holds(value)):
            raise ValueError(f"[{name}] {key} = {value!r}: {what}, {rule}")


def check_lease_range(v) -> None:
    """[vmmanager] network and lease_range as the node's address pool reads them, each named with the form it takes
    (a bad lease_range said "bad lease range '10.99.0.10' / network ...: Address cannot be empty", naming no key)."""
    import ipaddress

    try:
        net = ipaddress.IPv4Network(v.network, strict=False)
    except ValueError as exc:
        raise ValueError(f"[vmmanager] network = {v.network!r}: {exc} (expected an IPv4 network, "
                         f"e.g. \"10.99.0.0/24\")") from None
    first_s, dash, last_s = v.lease_range.partition("-")
    try:
        first, last = ipaddress.IPv4Address(first_s.strip()), ipaddress.IPv4Address(last_s.strip())
        why = ("not in order" if first > last else
               f"not inside [vmmanager] network {net}" if first not in net or last not in net else
               f"holds the network or broadcast address of {net}" if net.network_address in (first, last)
               or net.broadcast_address in (first, last) else "")
    except ValueError:
        why = "not two IPv4 addresses" if dash else "not a range"
    if net.num_addresses < 4:       # a /31 or /32: no host address for the gateway beside one for a guest
        raise ValueError(f"[vmmanager] network = {v.network!r}: too small for a gateway and a lease range (a /30 "
                         f"holds one guest; e.g. \"10.99.0.0/24\")")
    if why:
        # an example outside the gateway (net[1], the default gateway's place): "10.99.0.1-10.99.0.0" was
        # proposed for a /31, one holding the gateway for a /30 (trial15 X11)
        low, high = (10, 20) if net.num_addresses > 21 else (2, net.num_addresses - 2)
        if v.lease_range == type(v)().lease_range:     # not set: the operator changed network alone
            why = f"the default, {why}: set lease_range with network"
        raise ValueError(f"[vmmanager] lease_range = {v.lease_range!r}: {why} (expected \"FIRST-LAST\", "
                         f"host addresses of {net} in order, e.g. \"{net[low]}-{net[high]}\")")


# the services that serve GridFTP: the repository's face, a node's migration export, a job service's face
GRIDFTP_SERVICES = ("repository", "vmmanager", "jobs")


def check_gridftp(config: Config) -> None:
    """[gridftp]'s bounds on sessions (as `vmgrid gridftp-server`'s options) and [vmmanager] guest_dns, which the
    services' GridFTP servers take (ValueError naming the key: ``[gridftp] host_sessions is 0 to 63 ([gridftp]
    max_sessions less one: users need one), not 64``)."""
    from gridftp.server import SESSION_LIMITS, check_session_limits

    check_session_limits({key: getattr(config.gridftp, key) for key in SESSION_LIMITS},
                         {key: f"[gridftp] {key}" for key in SESSION_LIMITS})
    check_data_ports(config)
    for pattern in config.vmmanager.guest_dns:
        if not isinstance(pattern, str) or not pattern.startswith("/") or "=" not in pattern:
            raise ValueError(f"[vmmanager] guest_dns: {pattern!r} is not a DN pattern (e.g. \"/O=Grid/OU=site-guests/*\")")


def check_data_ports(config: Config) -> None:
    """[gridftp] data_ports as `vmgrid gridftp-server --data-ports` takes it ("LOW,HIGH" or "LOW-HIGH", 1 to 65535
    in order; "" = not given), else the environment's GLOBUS_TCP_PORT_RANGE, which the listeners would read: a
    ValueError naming the one that is no range (``[gridftp] data_ports = '51000,50000': expected LOW,HIGH, ...``),
    so that `vmgrid serve` refuses it at start rather than at each transfer."""
    from gridftp.datachannel import PORT_RANGE_ENV, PORT_RANGE_FORM, data_port_range, parse_port_range

    given = config.gridftp.data_ports
    if given.strip():
        try:
            parse_port_range(given)
        except ValueError:
            raise ValueError(f"[gridftp] data_ports = {given!r}: {PORT_RANGE_FORM}") from None
        return
    try:
        data_port_range()
    except ValueError:
        raise ValueError(f"{PORT_RANGE_ENV}={os.environ.get(PORT_RANGE_ENV, '')!r} in the environment: "
                         f"{PORT_RANGE_FORM} (or set [gridftp] data_ports, which takes its place)") from None


def apply_data_ports(config: Config, services: list[str]) -> None:
    """`vmgrid serve`, after :func:`check_data_ports`: [gridftp] data_ports, when given, becomes this process's
    GLOBUS_TCP_PORT_RANGE, which every GridFTP data listener reads (gridftp.datachannel.open_listener: the
    services' servers' PASV/EPSV/SPAS, a node's PORT when it pulls a migration's files or stages an image), as
    `vmgrid gridftp-server --data-ports` does; the key wins over the variable. Not given: the environment's
    variable as it is. Only a process serving a GridFTP service (:data:`GRIDFTP_SERVICES`) is changed."""
    from gridftp.datachannel import PORT_RANGE_ENV, name_port_range

    given = config.gridftp.data_ports.strip()
    if given and any(name in GRIDFTP_SERVICES for name in services):
        os.environ[PORT_RANGE_ENV] = given
        name_port_range(given, "[gridftp] data_ports")     # a full range's 425 and warning name the key


def gridftp_options(config: Config) -> dict:
    """The keywords of the services' GridFTP servers (GridFTPFace's): [gridftp]'s bounds on sessions, and the
    guests' DN patterns ([vmmanager] guest_dns and guest_ou, as guestcred.is_guest judges a guest: users there,
    not hosts; the repository's face and a migration export refuse them)."""
    from gridftp.server import SESSION_LIMITS

    limits = {key: getattr(config.gridftp, key) for key in SESSION_LIMITS}
    return {**{k: v for k, v in limits.items() if v is not None}, "guests": config.vmmanager.guest_patterns()}


def check_service_config(name: str, config: Config) -> None:
    """What service ``name`` needs of the configuration that no key's type says (ValueError naming the key): checked
    for every service of a container before any of them opens its state, and before the host credential is read."""
    if name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {name!r}; one of: {', '.join(SERVICE_NAMES)}")
    check_numbers("security", config.security)
    if name == "vmmanager" and not config.enforcement.authz_url:
        raise ValueError("the VMManager authorizes every operation through the Authorization service: "
                         "set [enforcement] authz_url")
    if name == "jobs" and not config.jobs.owner:
        raise ValueError("the job service needs the instance owner's DN: set [jobs] owner")
    if name == "jobs":
        check_jobs_people(config.jobs)
        from services.jobs.config import check_uid_range

        check_uid_range(config.jobs, config.state_dir("jobs"))    # refused before any state is made (trial15 N2)
    section = {"repository": config.repository, "jobs": config.jobs}.get(name)
    if section is not None and not -1 <= section.gridftp_port <= 65535:
        raise ValueError(f"[{name}] gridftp_port = {section.gridftp_port}: a port is 0 to 65535 (0 picks a free one; "
                         f"-1: no GridFTP face)")
    if name in NUMBER_RULES:
        check_numbers(name, getattr(config, name))
    if name == "vmmanager":
        from services.vmmanager.guestcred import check_guest_ca

        check_lease_range(config.vmmanager)
        check_guest_ca(config.vmmanager)         # guest_ca, guest_cert_dir: as every deployment reads them
    if name == "jobs":
        from services.jobs.runner import memory_limit_bytes, network_mode

        memory_limit_bytes(config.jobs.memory_limit)      # "2G", -1: one line naming the key, before any state
        memory_limit_bytes(config.jobs.memory_total, key="memory_total")
        network_mode(config.jobs.network)
        check_jobs_lifetimes_and_consumers(config.jobs)
    if name in GRIDFTP_SERVICES:
        check_gridftp(config)
    check_sections(name, config)


def check_jobs_people(j) -> None:
    """[jobs] owner and each of admins a DN in the one-line form (trial15 X5: "not a dn" or a bare "alice" started a
    service that refused everyone, the owner included, with nothing in its log)."""
    from security.pki import dn_parts

    for key, dn in [("owner", j.owner)] + [("admins", a) for a in j.admins]:
        try:
            dn_parts(dn)
        except (ValueError, TypeError, AttributeError) as exc:
            what = "the instance owner's DN" if key == "owner" else "each a VO admin's DN"
            raise ValueError(f"[jobs] {key}: {dn!r} is not a DN ({exc}); {what} in /O=.../CN=... form, as "
                             f"`vmgrid proxy-info` shows it (e.g. \"/O=Grid/OU=mysite/CN=alice\")") from None


def check_jobs_lifetimes_and_consumers(j) -> None:
    """[jobs] default_lifetime within max_lifetime (a larger one gave every job max_lifetime silently), and each
    consumer_allow entry a network (a bad one started, then failed every Subscribe) (trial15 X6)."""
    import ipaddress

    if j.default_lifetime > j.max_lifetime:
        raise ValueError(f"[jobs] default_lifetime = {j.default_lifetime}: more than [jobs] max_lifetime = "
                         f"{j.max_lifetime} (the longest lifetime a job may have): lower it, or raise max_lifetime")
    for entry in j.consumer_allow:
        try:
            ipaddress.ip_network(entry, strict=False)
        except (ValueError, TypeError):
            raise ValueError(f"[jobs] consumer_allow: {entry!r} is not a network (e.g. \"127.0.0.0/8\" or "
                             f"\"10.0.0.0/8\")") from None


def config_section(config: Config, name: str):
    """The section of ``config`` a NUMBER_RULES name stands for ("container.limits": config.container.limits)."""
    section = config
    for part in name.split("."):
        section = getattr(section, part)
    return section


def check_url(key: str, value: str, what: str) -> None:
    """``value`` an http(s) URL with a host (ValueError naming ``key``, e.g. ``[enforcement] authz_url``): a URL
    without its scheme or with a space in its host started a service whose every call to it then failed."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port                     # a port that is no number: ValueError
        ok = parts.scheme in ("https", "http") and bool(parts.hostname) and not any(c.isspace() for c in value)
    except ValueError:                 # a port that is no number
        ok = False
    if not ok:
        raise ValueError(f"{key} = {value!r}: {what}, an https:// URL (e.g. \"https://HOST:8443/wsrf/services/...\")")


def check_public_url(value: str) -> None:
    """[container] public_url: an http(s) URL with a host (:func:`check_url`), and nothing after its host and port but
    an optional "/" (ValueError naming the key). The container serves its services at /wsrf/services/NAME and its
    schemas at /wsrf/share/schema/ of its listener, and puts ``public_url`` before those paths in the WSDL's
    soap:address, in EPRs and in the wsa:To it accepts: a path (``https://HOST:8443/grid``) made every EPR name one
    the container does not serve (404), a query or fragment broke every URL made from it, and a user name is no part
    of a service's address."""
    from urllib.parse import urlsplit

    check_url("[container] public_url", value, "this container's public URL")
    parts = urlsplit(value)
    extra = [what for what, there in (("a user name", "@" in parts.netloc), ("a path", parts.path not in ("", "/")),
                                      ("a query", "?" in value), ("a fragment", "#" in value)) if there]
    if extra:
        raise ValueError(f"[container] public_url = {value!r}: it has {' and '.join(extra)}; this container's "
                         f"public URL is scheme, host and port only (e.g. \"https://HOST:8443\"): its services are "
                         f"served below it at /wsrf/services/NAME")


def check_state_dir(path: str, given_as: str) -> None:
    """A state directory that names a file is refused (ValueError starting with ``given_as``: ``[container] state_dir =
    'x'``, or ``--state-dir 'x'`` where the command line gave it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{given_as}: not a directory")


def check_mac_prefix(prefix: str) -> None:
    """[vmmanager] mac_prefix: three hex octets, the first unicast (each MAC is the prefix and an address's last three
    octets: a bad prefix failed every deployment, "network.mac ... is not a MAC address" or "a multicast address")."""
    import re

    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){2}", prefix) or int(prefix[:2], 16) & 1:
        raise ValueError(f"[vmmanager] mac_prefix = {prefix!r}: three hex octets, the first a unicast one (its lowest bit "
                         f"0), e.g. \"52:54:00\"")


def check_node_network(v) -> None:
    """[vmmanager] gateway, dns and repository beside network and lease_range (checked by check_lease_range first):
    the gateway a host address of network outside lease_range (inside it a guest was leased the gateway's
    address), each dns entry an IP address, the repository an https:// URL."""
    import ipaddress

    net = ipaddress.IPv4Network(v.network, strict=False)
    try:
        gateway = ipaddress.IPv4Address(v.gateway)
        first, last = (ipaddress.IPv4Address(a.strip()) for a in v.lease_range.split("-"))
        why = (f"not inside [vmmanager] network {net}" if gateway not in net else
               f"the network or broadcast address of {net}" if gateway in (net.network_address, net.broadcast_address)
               else f"inside [vmmanager] lease_range {v.lease_range} (a guest would be leased it)"
               if first <= gateway <= last else "")
    except ValueError:
        why = "not an IPv4 address"
    if why:
        raise ValueError(f"[vmmanager] gateway = {v.gateway!r}: {why} (expected a host address of {net} outside "
                         f"lease_range, e.g. \"{net[1]}\")")
    for entry in v.dns:
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            raise ValueError(f"[vmmanager] dns: {entry!r} is not an IP address (e.g. dns = [\"{net[1]}\"])") from None
    check_mac_prefix(v.mac_prefix)
    if v.repository:
        check_url("[vmmanager] repository", v.repository, "the VMRepository service's URL")


def check_sections(name: str, config: Config) -> None:
    """The keys of [container], [container.limits], [enforcement], [authz] and the rest of [vmmanager] that service
    ``name`` reads (ValueError naming the key), at start before any state: each of these started a container that
    failed later (trial14b V1-V8, V12)."""
    c = config.container
    check_numbers("container", c)
    check_numbers("container.limits", c.limits)
    check_state_dir(c.state_dir, f"[container] state_dir = {c.state_dir!r}")
    if c.public_url:
        check_public_url(c.public_url)
        if c.tls and c.public_url.lower().startswith("http://"):
            # an http:// address of a container that serves https: every client was sent to it and refused
            # (wsa:DestinationUnreachable, or the connection closed) (trial15 X3); https:// in front of a plain
            # container (a proxy ending TLS) stays possible
            raise ValueError(f"[container] public_url = {c.public_url!r}: an http:// URL, but this container "
                             f"serves https ([container] tls = true): give https://, or set tls = false")
    if name in ("repository", "vmmanager"):            # the services that enforce a policy
        check_numbers("enforcement", config.enforcement)
        if config.enforcement.authz_url:
            check_url("[enforcement] authz_url", config.enforcement.authz_url, "the Authorization service's URL")
    if name == "vmmanager":
        check_node_network(config.vmmanager)
    if name == "authz" and config.authz.audit_log:
        # an explicit audit log's directory must exist: a typo'd path is named, and nothing is made for it (its
        # directories were made even by a start then refused for another reason, trial14b V8)
        parent = os.path.dirname(os.path.abspath(config.authz.audit_log))
        if not os.path.isdir(parent) or os.path.isdir(config.authz.audit_log):
            why = "it is a directory" if os.path.isdir(config.authz.audit_log) else f"no directory {parent}"
            raise ValueError(f"[authz] audit_log = {config.authz.audit_log!r}: {why} (give a file in an existing "
                             f"directory, or \"\" for <state_dir>/authz/audit.log)")


def check_migration_port(config: Config) -> None:
    """[vmmanager] migration_port, when set, checked free before any state is opened (a port another process holds
    is refused in the one line the node's start gives, services/vmmanager/migration.py check_port_free). The face
    listens where the node's URL names: that URL is made when the container binds its own port, but its host is
    known from the configuration already: [container] public_url's, else the host certificate's name, else
    [container] host (as Container.public_base_url makes it)."""
    from urllib.parse import urlsplit

    from services.vmmanager.migration import check_port_free

    c = config.container
    if config.vmmanager.migration_port:
        host = urlsplit(c.public_url).hostname if c.public_url else certificate_host(host_credential(config)) or c.host
        check_port_free(host or "localhost", config.vmmanager.migration_port)


def build_service(name: str, config: Config) -> SoapService:
    if name == "repository":
        from services.vmrepository.service import VMRepositoryService

        service = VMRepositoryService(config.state_dir("repository"), config.repository, policy_point(config))
        if config.repository.gridftp_port >= 0:
            credential = host_credential(config)
            service.attach_transfers(config.container.host, credential, trust_store(config),
                                     public_host=certificate_host(credential), **gridftp_options(config))
        return service
    if name == "authz":
        from services.authz.service import AuthorizationService

        return AuthorizationService(config.state_dir("authz"), config.authz)
    if name == "vmmanager":
        return build_vmmanager(config)
    if name == "jobs":  # jobs helper (issue 12 §3): the job service of the grid container in a VM
        return build_jobs(config)
    raise ValueError(f"unknown service {name!r}; one of: {', '.join(SERVICE_NAMES)}")


def build_vmmanager(config: Config, vmm=None) -> SoapService:
    """A node: its VMM (libvirt's test driver, or QEMU through qemu:///embed), the repository it stages
    from, its notifier, all with the host credential."""
    from services.vmmanager import guestcred
    from services.vmmanager.channels import embed_root
    from services.vmmanager.repository import RepositoryAccess
    from services.vmmanager.service import VMManagerService
    from services.vmmanager.vmm import open_vmm
    from services.wsrf.notification import ConsumerPolicy, DeliveryLimits, Notifier

    v = config.vmmanager
    check_service_config("vmmanager", config)
    state = config.state_dir("vmmanager")
    credential, trust = host_credential(config), trust_store(config)
    if vmm is None:
        if v.vmm == "qemu":
            vmm = open_vmm("qemu", root=embed_root(v.vmm_root, state / "qemu"))   # short enough for its sockets
        else:
            vmm = open_vmm(v.vmm)
    repository = RepositoryAccess(v.repository, credential, trust, parallel=v.staging_parallel, gsi=v.staging_gsi,
                                  verdict_seconds=v.verdict_seconds, refuse_server=lambda dn: guestcred.is_guest(v, dn))
    return VMManagerService(state, v, policy_point(config), vmm=vmm, repository=repository,
                            credential=credential, trust=trust, gridftp_options=gridftp_options(config),
                            notifier=Notifier(credential, trust, policy=ConsumerPolicy(tuple(v.consumers_allow)),
                                              limits=DeliveryLimits(deadline=v.notify_deadline)))


def build_jobs(config: Config) -> SoapService:
    """The job service ([jobs]) with its GridFTP face and signed notifications. Its credential is the
    container's host credential ([security] host_cert/host_key); in a guest, guestd points these at the
    key made in the guest and the certificate the node issued to it over the guest channel
    (guestd/steps/grid.py, services/vmmanager/guestcred.py)."""
    from services.jobs.service import JobService
    from services.wsrf.notification import ConsumerPolicy, Notifier

    check_service_config("jobs", config)
    credential, trust = host_credential(config), trust_store(config)
    # the gsiftp:// URLs name the host its certificate names, as the container's own URL does ("" = derived)
    j = dataclasses.replace(config.jobs, public_host=config.jobs.public_host or certificate_host(credential) or "")
    policy = ConsumerPolicy(tuple(j.consumer_allow))
    service = JobService(config.state_dir("jobs"), j, credential=credential, trust=trust,
                         notifier=Notifier(credential, trust, policy=policy), consumer_policy=policy)
    if j.gridftp_port >= 0:
        service.attach_transfers(config.container.host, credential, trust, **gridftp_options(config))
    return service


def build_container(config: Config, services: list[SoapService], *, port: int | None = None) -> Container:
    """A container for ``services`` with WS-Security (always) and TLS (unless turned off)."""
    c = config.container
    credential = host_credential(config)
    trust = trust_store(config)
    understood = set(DEFAULT_UNDERSTOOD)
    for s in services:
        understood |= set(s.extra_understood_headers)
    security_dir = Path(c.state_dir) / "security"

    s = config.security
    policy = SecurityPolicy(clock_skew=dt.timedelta(seconds=s.clock_skew),
                            max_age=dt.timedelta(seconds=s.message_lifetime))

    def middleware(app):
        return WSSecurityMiddleware(app, credential, trust, state_dir=security_dir, understood_headers=understood,
                                    markup_held=c.limits.max_markup_held, policy=policy)

    adapter = (server_ssl_adapter(credential, cert_dir=trust.cert_dir, client_certs=c.tls_client_certs)
               if c.tls else None)
    if not c.tls:
        log.warning("TLS is off: messages are still signed, but not encrypted")
    return Container(services, host=c.host, port=c.port if port is None else port, middleware=middleware,
                     ssl_adapter=adapter, public_url=c.public_url or None, threads=c.threads,
                     validate_responses=c.validate_responses, public_host=certificate_host(credential), limits=c.limits)


def certificate_host(credential) -> str | None:
    """The host name the host certificate is issued for (its first DNS subjectAltName, else the name in
    ``CN=host/<name>``): clients verify TLS against it, so it is the default public host name."""
    from cryptography import x509

    cert = credential.certificate
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    except x509.ExtensionNotFound:
        pass
    for attr in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        value = str(attr.value)
        if value.startswith("host/"):
            return value[len("host/"):]
    return None
