"""GSI host authorization: is an authenticated peer the host a URL names?

Judged on the chain's end-entity certificate only (the identity :class:`security.trust.TrustStore` derives), as
Globus does on the EEC's ``host/`` name: never on a proxy's subject or a CN a proxy added (an RFC 3820 proxy's last
CN is whatever its issuer, any user, writes: ``.../CN=alice/CN=localhost``), and a proxy chain is no host's
credential at all. A host identity is a host certificate: its one CN is ``host/NAME`` (or Globus' GridFTP service
name ``ftp/NAME``), or NAME is in its subjectAltName (DNS, one-label wildcard, or IP address).

    why = host_refusal(caller, "node1.example.org")      # None: the peer is that host; else why it is not
    names_host(certificate, "node1.example.org")          # does a host certificate name the host
"""
from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import NameOID

from .pki import dn_string
from .trust import Caller

SERVICE_PREFIXES = ("host/", "ftp/")


def _subject_names(cert: x509.Certificate) -> list[str]:
    """The host a certificate's subject names: its only CN, ``host/NAME`` or ``ftp/NAME``; nothing for a subject
    with a multi-valued RDN (``OU=x + CN=host/y`` is not ``OU=x/CN=host/y``) or with more than one CN
    (``CN=bob/CN=host/y`` is bob's)."""
    rdns = list(cert.subject.rdns)
    if any(len(rdn) != 1 for rdn in rdns):
        return []
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1:
        return []
    for prefix in SERVICE_PREFIXES:
        if cns[0].startswith(prefix) and len(cns[0]) > len(prefix):
            return [cns[0][len(prefix):]]
    return []


def names_host(cert: x509.Certificate, host: str) -> bool:
    """Does the host certificate ``cert`` name ``host`` (its one CN ``host/NAME``/``ftp/NAME``, or a
    subjectAltName DNS name, one-label wildcard or IP address)?"""
    host = host.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        if ip is not None and ip in san.get_values_for_type(x509.IPAddress):
            return True
        if ip is None:
            for name in san.get_values_for_type(x509.DNSName):
                name = name.lower().rstrip(".")
                if name == host or (name.startswith("*.") and host.endswith(name[1:])
                                    and host.count(".") == name.count(".")):
                    return True
    for name in _subject_names(cert):
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if ip is not None:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                pass
    return False


def host_refusal(caller: Caller, host: str) -> str | None:
    """None when the authenticated ``caller`` is ``host`` by a host certificate; else the reason it is not (one
    line): a proxy chain, or an end-entity certificate that does not name the host."""
    if caller.is_proxy:
        return (f"the server presented a proxy ({caller.subject}), not a host certificate: a host is authorized by "
                f"its own certificate, never by a proxy's name")
    eec = caller.end_entity
    if not names_host(eec, host):
        return f"server certificate {dn_string(eec.subject)!r} does not name {host}"
    return None
