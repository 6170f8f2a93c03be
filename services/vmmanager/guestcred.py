"""The grid container in a guest, on the node's side: what its context carries ([vmmanager] guest_ca,
job_admins) and the certificate the node issues to it.

guestd's grid step (guestd/steps/grid.py) makes the container's key in the guest and puts a certificate
request in its report. Once guestd is ready, the node checks the request (bounded, signed by its own
key, RSA >= 2048), issues a host certificate ``/O=Grid/OU=<guest_ou>/CN=host/<leased address>`` with
the site's issuing CA ([vmmanager] guest_ca, a `vmgrid ca` directory clients trust), and sends it back
over the guest channel. Clients then check the job service's signatures like any host's: the signer
must be host/<the address they called>, an address the VMManager leased to that instance only.
The certificate names that address only (subjectAltName IP): never the instance's identifier or host name,
which its owner chooses (an instance called ``localhost`` or ``central`` got a site-CA certificate for that
DNS name, and GridFTP clients checking a host by name took the guest for it). Where a site host is expected
(a node staging an image or pulling a migration's files) a guest's certificate is refused whatever it names
(:func:`is_guest`).

Everything here reads untrusted guest output: a bad request, or a guest that does not answer within
CERT_TIMEOUT, leaves the job service unstarted with the reason in GuestStatus; the node never waits longer.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from guestd.context import MAX_TRUST_FILES
from services.common.errors import printable
from services.vmmanager.config import VMManagerConfig

log = logging.getLogger(__name__)

SERVICE_PATH = "/wsrf/services/JobService"
RECORD = "jobservice.json"          # in the instance's directory: what the JobService property shows
CERT_TIMEOUT = 10.0
MAX_TRUST_BYTES = 20 * 1024
_TRUST_FILE = re.compile(r"^[0-9a-f]{8}\.(\d|r\d|signing_policy)$")


class GuestCredentialError(Exception):
    """The guest's certificate request cannot be answered; the message says why."""


def trust_files(config: VMManagerConfig) -> dict[str, str]:
    """The trusted CA files the guest container gets: [vmmanager] guest_cert_dir, else the guest CA's
    own certificates/ directory; bounded in number and size (the context is at most 32 KiB)."""
    directory = Path(config.guest_cert_dir) if config.guest_cert_dir else Path(config.guest_ca) / "certificates"
    files: dict[str, str] = {}
    total = 0
    for path in sorted(directory.iterdir()):
        if not _TRUST_FILE.match(path.name):
            continue
        text = path.read_text("ascii")
        total += len(text)
        if len(files) >= MAX_TRUST_FILES or total > MAX_TRUST_BYTES:
            raise ValueError(f"{directory}: more trusted CA files than a context carries "
                             f"({MAX_TRUST_FILES} files, {MAX_TRUST_BYTES} bytes); set [vmmanager] guest_cert_dir")
        files[path.name] = text
    return files


def check_guest_ca(config: VMManagerConfig) -> None:
    """[vmmanager] guest_ca and guest_cert_dir as every deployment reads them, checked at the node's start (a
    ValueError naming the key): a guest_ca that is no `vmgrid ca` directory, or trusted CA files that cannot be
    given to a guest, made each deployment InternalFault "No such file or directory: 'nope/certificates'"."""
    from security.pki import CAError, GridCA

    if config.guest_cert_dir and not Path(config.guest_cert_dir).is_dir():
        raise ValueError(f"[vmmanager] guest_cert_dir = {config.guest_cert_dir!r}: no such directory (the trusted CA "
                         f"files given to guests; \"\" = guest_ca's certificates/)")
    if not config.guest_ca:
        return
    where = f"[vmmanager] guest_ca = {config.guest_ca!r}"
    if not (Path(config.guest_ca) / "ca.pem").is_file():
        raise ValueError(f"{where}: no `vmgrid ca` directory there (its ca.pem, ca.key and certificates/): the CA "
                         f"that issues guest containers their certificates, which clients trust")
    try:
        GridCA.load(config.guest_ca)
    except CAError as exc:
        raise ValueError(f"{where}: {exc}") from None
    key = f"[vmmanager] guest_cert_dir = {config.guest_cert_dir!r}" if config.guest_cert_dir else where
    try:
        files = trust_files(config)
    except OSError as exc:
        raise ValueError(f"{key}: {exc.strerror}: {exc.filename}") from None
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if not any(name.endswith(".0") for name in files):
        raise ValueError(f"{key}: no trusted CA certificate (<hash>.0) in it to give to guests")


def grid_context(config: VMManagerConfig, owner: str) -> dict[str, Any] | None:
    """The context's ``grid`` object for an instance of ``owner`` (None when the node has no guest CA)."""
    if not config.guest_ca:
        return None
    return {"owner": owner, "admins": list(config.job_admins), "trust": trust_files(config)}


def requested(status: dict[str, Any]) -> dict[str, Any] | None:
    """The grid step's detail in guestd's status when it asks for a certificate."""
    steps = status.get("steps")
    step = steps.get("grid") if isinstance(steps, dict) else None     # a guest's status may have any shape
    detail = step.get("detail") if isinstance(step, dict) and step.get("ok") else None
    if isinstance(detail, dict) and detail.get("configured") and isinstance(detail.get("csr"), str):
        return detail
    return None


def _port(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise GuestCredentialError(f"guestd reported {what} {printable(repr(value), 80)}, not a TCP port")
    return value


def is_guest(config: VMManagerConfig, dn: str) -> bool:
    """A guest container's certificate by its DN ([vmmanager] guest_dns, and this node's own guest_ou): a host DN
    whose key a VM's owner holds, never a site host (a repository, a migration source)."""
    from services.authz.policy import dn_matches
    return any(dn_matches(p, dn) for p in config.guest_patterns())


def issue(config: VMManagerConfig, detail: dict[str, Any], address: str, hostname: str = "") -> tuple[str, dict]:
    """The certificate (PEM) for the guest's request and the record of the job service it serves. The certificate
    names the leased ``address`` only; ``hostname`` (the instance's, its owner's choice) is not put in it."""
    from security.pki import CAError, GridCA, check_request, dn_string

    port = _port(detail.get("port"), "the container port")
    gridftp = detail.get("gridftp_port")
    try:
        request = check_request(detail["csr"])
        ca = GridCA.load(config.guest_ca)
        cert = ca.issue_host_request(request, address, ou=config.guest_ou, days=config.guest_cert_days)
    except CAError as exc:
        raise GuestCredentialError(str(exc)) from None
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    record = {"url": f"https://{address}:{port}{SERVICE_PATH}", "dn": dn_string(cert.subject),
              "issuer": dn_string(cert.issuer), "serial": f"{cert.serial_number:x}",
              "notAfter": cert.not_valid_after_utc.isoformat(),
              "gridftp": f"gsiftp://{address}:{gridftp}" if isinstance(gridftp, int) and 0 < gridftp < 65536 else None}
    return pem, record


def deliver(config: VMManagerConfig, channel, status: dict[str, Any], address: str, hostname: str,
            home: Path) -> str | None:
    """Answer the guest's certificate request (if it made one): issue, send over the channel (bounded),
    record the job service in ``home``. Returns a GuestStatus note, or None when nothing was asked."""
    from services.vmmanager.vmm.errors import GuestWaitCancelled, VMMError

    detail = requested(status)
    if detail is None:
        return None
    if not config.guest_ca:       # asked, and this node cannot answer: say so (the guest's container stays down)
        log.warning("job service of the guest at %s not started: this node has no [vmmanager] guest_ca", address)
        return ("job service not started: this node has no [vmmanager] guest_ca to issue the guest container's "
                "certificate (docs/jobs.md)")
    try:
        pem, record = issue(config, detail, address, hostname)
        answer = channel.request("certificate", timeout=CERT_TIMEOUT, certificate=pem)
    except GuestWaitCancelled:
        raise
    except (GuestCredentialError, VMMError, OSError, ValueError) as exc:
        why = printable(exc, 600)    # it may quote the guest (a refusal, a port): one escaped line
        log.warning("job service of the guest at %s not started: %s", address, why)
        return f"job service not started: {why}"
    (home / RECORD).write_text(json.dumps(record, indent=1))
    return f"job service {record['url']} ({printable(answer.get('container', '?'), 200)})"   # the guest's word


def job_service(home: Path | None) -> dict[str, Any] | None:
    """The recorded job service of an instance (its URL and certificate subject), if any."""
    if home is None:
        return None
    try:
        return json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return None
