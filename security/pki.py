"""Grid PKI: a small grid CA, host and user certificates, RFC 3820 proxy certificates, and Globus file conventions.

Stable API (used by the container, the services and the tests):

    ca = GridCA.create(directory, dn="/O=Grid/OU=vmgrid/CN=vmgrid CA")     # or GridCA.load(directory)
    host = ca.issue_host("localhost", ou="vmgrid", out_dir=...)          # Credential, /O=Grid/OU=vmgrid/CN=host/localhost
    alice = ca.issue_user("alice", ou="vmgrid", out_dir=...)             # Credential, /O=Grid/OU=vmgrid/CN=alice
    ca.revoke(alice.certificate); ca.cert_dir                            # X509_CERT_DIR: <hash>.0, .r0, .signing_policy
    proxy = make_proxy(alice, hours=12, limited=False)                    # RFC 3820 proxy (proxies of proxies too)
    save_proxy(proxy, path=None)                                          # X509_USER_PROXY or /tmp/x509up_u<uid>, 0600
    load_user_credential() / load_host_credential() / load_credential(cert, key, proxy=...)
    dn_string(name) -> "/O=Grid/OU=vmgrid/CN=alice";  parse_dn(text) -> x509.Name
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import ip_address
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

PrivateKey = CertificateIssuerPrivateKeyTypes

# RFC 3820 ProxyCertInfo and the policy languages Globus uses.
OID_PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
OID_INHERIT_ALL = ObjectIdentifier("1.3.6.1.5.5.7.21.1")
OID_INDEPENDENT = ObjectIdentifier("1.3.6.1.5.5.7.21.2")
OID_LIMITED = ObjectIdentifier("1.3.6.1.4.1.3536.1.1.1.9")

DEFAULT_CA_DN = "/O=Grid/OU=vmgrid/CN=vmgrid CA"
DEFAULT_OU = "vmgrid"
DEFAULT_PROXY_HOURS = 12.0
KEY_BITS = 2048
CLOCK_SKEW = _dt.timedelta(minutes=5)   # proxies and certificates start this far in the past, as Globus does


class PKIError(Exception):
    """Base class of grid PKI errors."""


class CredentialError(PKIError):
    """A credential cannot be found, read, or does not fit together (certificate, key, chain)."""


class CAError(PKIError):
    """The grid CA directory is missing, damaged, or an operation on it is not possible."""


# ---------------------------------------------------------------------------------------------
# Distinguished names in the Globus "/O=Grid/OU=.../CN=..." form

_SHORT_NAMES = {
    NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.COMMON_NAME: "CN",
    NameOID.DOMAIN_COMPONENT: "DC", NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.USER_ID: "UID",
    NameOID.SERIAL_NUMBER: "serialNumber",
}
_OIDS = {v.lower(): k for k, v in _SHORT_NAMES.items()} | {"email": NameOID.EMAIL_ADDRESS}
_DN_SPLIT = re.compile(r"(?<!\\)/(?=[A-Za-z][A-Za-z0-9.]*=)")
_RDN_SPLIT = re.compile(r"(?<!\\)\+(?=[A-Za-z][A-Za-z0-9.]*=)")
_AMBIGUOUS_SLASH = re.compile(r"/(?=[A-Za-z][A-Za-z0-9.]*=)")
_AMBIGUOUS_PLUS = re.compile(r"\+(?=[A-Za-z][A-Za-z0-9.]*=)")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")


def _escape_value(value: str) -> str:
    """A value in the one-line form, so that the form reads back as the same name: a backslash, and a '/' or '+'
    that would start a new `KEY=` (a new RDN, another attribute of this one), are escaped (\\x5c, \\/, \\+);
    control and non-printable characters become \\xHH."""
    value = value.replace("\\", "\\x5c")
    value = _AMBIGUOUS_SLASH.sub(r"\\/", value)
    value = _AMBIGUOUS_PLUS.sub(r"\\+", value)
    return "".join(c if c.isprintable() else "".join(f"\\x{b:02x}" for b in c.encode()) for c in value)


def _unescape_value(value: str) -> str:
    if "\\" not in value:
        return value
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(value):
        out += value[pos:m.start()].encode()
        e = m.group(1)
        out += bytes([int(e[1:], 16)]) if len(e) == 3 else e.encode()
        pos = m.end()
    out += value[pos:].encode()
    return out.decode("utf-8", "replace")


def dn_string(name: x509.Name) -> str:
    """The Globus (OpenSSL one-line) form of a name: `/O=Grid/OU=vmgrid/CN=alice`. A value that would make
    the form ambiguous (`CN=x/CN=host/y` in one value) or carries control characters is escaped, and the
    attributes of a multi-valued RDN are joined by '+' as OpenSSL's one-line and `-nameopt compat` forms do
    (`/O=Grid/OU=site+CN=host/x`, never the string of `/O=Grid/OU=site/CN=host/x`), so two different names never
    share a string and ``parse_dn(dn_string(n)) == n``."""
    parts = []
    for rdn in name.rdns:
        parts.append("/" + "+".join(f"{_SHORT_NAMES.get(attr.oid, attr.oid.dotted_string)}="
                                    f"{_escape_value(str(attr.value))}" for attr in rdn))
    return "".join(parts)


def _rdns(text: str) -> list[list[tuple[str, str]]]:
    """`/O=Grid/OU=a+CN=b` as [[(key, value)], [(key, value), (key, value)]] with canonical short keys and unescaped
    values; ValueError when it is not a DN in the one-line form."""
    if not text.startswith("/"):
        raise ValueError(f"a grid DN starts with '/': {text!r}")
    rdns = []
    for part in _DN_SPLIT.split(text[1:]):
        rdn = []
        for item in _RDN_SPLIT.split(part):
            key, sep, value = item.partition("=")
            oid = _OIDS.get(key.lower())
            if not sep or not value or oid is None:
                raise ValueError(f"cannot read {item!r} in DN {text!r}")
            rdn.append((_SHORT_NAMES[oid], _unescape_value(value)))
        rdns.append(rdn)
    return rdns


def dn_parts(text: str) -> list[tuple[str, str]]:
    """`/O=Grid/OU=vmgrid/CN=host/localhost` as [(key, value), ...] with canonical short keys and unescaped
    values (a '/' not followed by `KEY=` belongs to the value); ValueError when it is not a grid DN, a name with
    a multi-valued RDN (`OU=a+CN=host/x`) included: it is no grid DN part, matches no policy pattern and names
    no host."""
    parts = []
    for rdn in _rdns(text):
        if len(rdn) != 1:
            raise ValueError(f"a multi-valued RDN ({'+'.join(k + '=' + v for k, v in rdn)}) in DN {text!r}")
        parts.append(rdn[0])
    return parts


def parse_dn(text: str) -> x509.Name:
    """Parse `/O=Grid/OU=vmgrid/CN=host/localhost` (a '/' not followed by `KEY=` belongs to the value; a '+'
    followed by `KEY=` joins attributes into one multi-valued RDN)."""
    oids = {v: k for k, v in _SHORT_NAMES.items()}
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oids[key], value) for key, value in rdn])
                      for rdn in _rdns(text)])


def check_name_value(value: str, what: str) -> str:
    """A value the CA puts into a name it issues: no '/', '=', backslash, control or non-printable
    character (any of them could make one name read as another, e.g. a user `x/CN=host/localhost`)."""
    if not value or value != value.strip():
        raise CAError(f"{what} {value!r}: empty, or starts or ends with a space")
    bad = sorted({c for c in value if c in "/=\\" or not c.isprintable()})
    if bad:
        raise CAError(f"{what} {value!r} contains {', '.join(repr(c) for c in bad)}: names may not contain "
                      f"'/', '=', '\\\\', control or non-printable characters")
    return value


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _check_hostname(hostname: str) -> None:
    """A host certificate names a DNS name or an IP address, nothing else."""
    try:
        ip_address(hostname)
        return
    except ValueError:
        pass
    if not _HOSTNAME.match(hostname):
        check_name_value(hostname, "host name")
        raise CAError(f"host name {hostname!r} is not a DNS name (letters, digits, '-' and '.') or an IP address")


def host_of(dn: str) -> str | None:
    """The host named by a grid host DN (`/O=Grid/OU=vmgrid/CN=host/node1` -> `node1`), read from the parsed name:
    exactly one CN, `host/<name>`. None for any other DN (a user, or `.../CN=x/CN=host/node1`)."""
    try:
        cns = [value for key, value in dn_parts(dn) if key == "CN"]
    except ValueError:
        return None
    if len(cns) != 1 or not cns[0].startswith("host/") or len(cns[0]) == 5:
        return None
    return cns[0][5:]


SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def service_host_of(dn: str) -> str | None:
    """The host named by a service DN (`/O=Grid/OU=site/CN=jobs/node1` -> `node1`: :meth:`GridCA.issue_host` with a
    service other than host): exactly one CN, `<service>/<name>`. None for any other DN, host DNs included."""
    try:
        cns = [value for key, value in dn_parts(dn) if key == "CN"]
    except ValueError:
        return None
    if len(cns) != 1:
        return None
    service, slash, name = cns[0].partition("/")
    if not slash or not name or service == "host" or not SERVICE_NAME.match(service):
        return None
    return name


def host_dn(hostname: str, ou: str = DEFAULT_OU, service: str = "host") -> str:
    """The DN of a grid host certificate: `/O=Grid/OU=<ou>/CN=host/<hostname>`; of a service certificate
    (Globus' `grid-cert-request -service NAME`), `/O=Grid/OU=<ou>/CN=<service>/<hostname>`."""
    return f"/O=Grid/OU={ou}/CN={service}/{hostname}"


# ---------------------------------------------------------------------------------------------
# ProxyCertInfo (RFC 3820) as DER, by hand: cryptography has no type for it.

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_oid(oid: ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def der_items(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Split concatenated DER TLVs into (tag, value) pairs; raises ValueError on malformed input."""
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise ValueError("truncated DER")
        tag, first = data[i], data[i + 1]
        i += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or i + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[i:i + n], "big")
            i += n
        if i + length > len(data):
            raise ValueError("truncated DER")
        yield tag, data[i:i + length]
        i += length


def _decode_oid(body: bytes) -> str:
    if not body:
        raise ValueError("empty OID")
    arcs = [body[0] // 40, body[0] % 40] if body[0] < 80 else [2, body[0] - 80]
    value = 0
    for b in body[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(str(a) for a in arcs)


@dataclass(frozen=True)
class ProxyCertInfo:
    """The content of an RFC 3820 ProxyCertInfo extension."""
    policy_language: str
    path_length: int | None = None
    policy: bytes | None = None

    @property
    def limited(self) -> bool:
        return self.policy_language == OID_LIMITED.dotted_string

    @property
    def independent(self) -> bool:
        return self.policy_language == OID_INDEPENDENT.dotted_string

    def to_der(self) -> bytes:
        policy = _der_oid(ObjectIdentifier(self.policy_language))
        if self.policy is not None:
            policy += _der(0x04, self.policy)
        body = b""
        if self.path_length is not None:
            n = self.path_length
            body += _der(0x02, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big"))
        body += _der(0x30, policy)
        return _der(0x30, body)

    @classmethod
    def from_der(cls, data: bytes) -> "ProxyCertInfo":
        (tag, body), = list(der_items(data))
        if tag != 0x30:
            raise ValueError("ProxyCertInfo is not a SEQUENCE")
        items = list(der_items(body))
        path_length = None
        if items and items[0][0] == 0x02:
            path_length = int.from_bytes(items.pop(0)[1], "big", signed=True)
        if len(items) != 1 or items[0][0] != 0x30:
            raise ValueError("ProxyCertInfo has no ProxyPolicy")
        policy_items = list(der_items(items[0][1]))
        if not policy_items or policy_items[0][0] != 0x06:
            raise ValueError("ProxyPolicy has no policy language")
        language = _decode_oid(policy_items[0][1])
        policy = policy_items[1][1] if len(policy_items) > 1 and policy_items[1][0] == 0x04 else None
        return cls(language, path_length, policy)


def proxy_cert_info(cert: x509.Certificate) -> tuple[ProxyCertInfo, bool] | None:
    """(ProxyCertInfo, critical) of a certificate, or None for a certificate that is not an RFC 3820 proxy."""
    try:
        ext = cert.extensions.get_extension_for_oid(OID_PROXY_CERT_INFO)
    except x509.ExtensionNotFound:
        return None
    return ProxyCertInfo.from_der(ext.value.value), ext.critical


# The proxy forms before RFC 3820 that Globus' grid-proxy-init still makes: "-draft" (GT3, a
# ProxyCertInfo under a Globus OID) and "-old" (GT2, no extension: the subject ends in CN=proxy or
# CN=limited proxy). Both are accepted and walked with the same rules as RFC 3820 proxies.
OID_DRAFT_PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.4.1.3536.1.222")
LEGACY_PROXY_NAMES = {"proxy": OID_INHERIT_ALL, "limited proxy": OID_LIMITED}


def _draft_proxy_info(data: bytes) -> ProxyCertInfo:
    """GT3 ProxyCertInfo: a SEQUENCE holding the ProxyPolicy SEQUENCE and an optional path length
    (an INTEGER, or one tagged [1])."""
    (tag, body), = list(der_items(data))
    if tag != 0x30:
        raise ValueError("draft ProxyCertInfo is not a SEQUENCE")
    policy = None
    path_length = None
    for item_tag, item in der_items(body):
        if item_tag == 0x30 and policy is None:
            policy = item
        elif item_tag == 0x02:
            path_length = int.from_bytes(item, "big", signed=True)
        elif item_tag == 0xA1:
            (inner_tag, inner), = list(der_items(item))
            if inner_tag != 0x02:
                raise ValueError("draft ProxyCertInfo path length is not an INTEGER")
            path_length = int.from_bytes(inner, "big", signed=True)
    if policy is None:
        raise ValueError("draft ProxyCertInfo has no ProxyPolicy")
    # the ProxyPolicy is the same as RFC 3820's: let the RFC parser read it
    info = ProxyCertInfo.from_der(_der(0x30, _der(0x30, policy)))
    return ProxyCertInfo(info.policy_language, path_length, info.policy)


def any_proxy_info(cert: x509.Certificate) -> tuple[ProxyCertInfo, bool, str] | None:
    """(ProxyCertInfo, critical, form) of an RFC 3820, GT3 draft or GT2 legacy proxy; None for a
    certificate that is none of them. Raises ValueError for an unreadable extension."""
    found = proxy_cert_info(cert)
    if found is not None:
        return found[0], found[1], "rfc3820"
    try:
        ext = cert.extensions.get_extension_for_oid(OID_DRAFT_PROXY_CERT_INFO)
        return _draft_proxy_info(ext.value.value), ext.critical, "draft"
    except x509.ExtensionNotFound:
        pass
    rdns = list(cert.subject.rdns)
    if len(rdns) >= 2 and len(rdns[-1]) == 1 and rdns[:-1] == list(cert.issuer.rdns):
        attr = next(iter(rdns[-1]))
        if attr.oid == NameOID.COMMON_NAME and attr.value in LEGACY_PROXY_NAMES and not _is_ca(cert):
            return ProxyCertInfo(LEGACY_PROXY_NAMES[attr.value].dotted_string), True, "legacy"
    return None


def _proxy_form(cert: x509.Certificate) -> tuple[ProxyCertInfo, bool, str] | None:
    """:func:`any_proxy_info` of a credential's own certificate; an unreadable extension is a CredentialError."""
    try:
        return any_proxy_info(cert)
    except ValueError as exc:
        raise CredentialError(f"unreadable proxy certificate {dn_string(cert.subject)}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Credentials

KEY_KINDS = ("rsa", "ec")     # RSA (2048 bits by default) or ECDSA on P-256


def new_key(bits: int = KEY_BITS, kind: str = "rsa") -> PrivateKey:
    """A fresh private key: RSA of `bits`, or (kind "ec") an ECDSA P-256 key, which signs some 20x faster."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind != "rsa":
        raise CredentialError(f"unknown key type {kind!r}: one of {', '.join(KEY_KINDS)}")
    if not 2048 <= bits <= 16384:
        raise CredentialError(f"an RSA key of {bits} bits: give 2048 to 16384 (weaker keys are refused)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_kind(key) -> str:
    """"ec" for an elliptic-curve key (private or public), else "rsa"."""
    return "ec" if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) else "rsa"


@dataclass
class Credential:
    """A certificate with its private key and the chain of certificates that issued it (leaf's issuer first,
    trust anchor excluded). For a proxy the chain holds the earlier proxies and the end-entity certificate."""
    certificate: x509.Certificate
    private_key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    cert_path: Path | None = None
    key_path: Path | None = None

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, then its issuers."""
        return (self.certificate, *self.chain)

    @cached_property
    def subject(self) -> str:
        return dn_string(self.certificate.subject)

    @cached_property
    def end_entity(self) -> x509.Certificate:
        for cert in self.certificates:
            if _proxy_form(cert) is None:
                return cert
        raise CredentialError(f"the chain of {self.subject} has no end-entity certificate")

    @property
    def identity(self) -> str:
        """The grid identity: the end-entity DN, the same for a certificate and all its proxies (RFC 3820, GT3
        draft and GT2 legacy ``CN=proxy`` ones alike: the rule TrustStore applies to a presented chain)."""
        return dn_string(self.end_entity.subject)

    @property
    def is_proxy(self) -> bool:
        return _proxy_form(self.certificate) is not None

    @property
    def proxy_form(self) -> tuple[ProxyCertInfo, bool, str] | None:
        """What kind of proxy the leaf is (:func:`any_proxy_info`), None for an end-entity certificate."""
        return _proxy_form(self.certificate)

    @property
    def limited(self) -> bool:
        return any((info := _proxy_form(c)) is not None and info[0].limited for c in self.certificates)

    @property
    def not_after(self) -> _dt.datetime:
        return min(c.not_valid_after_utc for c in self.certificates)

    def time_left(self, now: _dt.datetime | None = None) -> _dt.timedelta:
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return max(self.not_after - now, _dt.timedelta(0))

    def cert_pem(self, with_chain: bool = True) -> bytes:
        certs = self.certificates if with_chain else (self.certificate,)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
               else serialization.NoEncryption())
        # RSA as "RSA PRIVATE KEY" (what Globus tools and every grid stack read); anything else, and every encrypted
        # key, as PKCS#8 "PRIVATE KEY": Globus' GSI reads no "EC PRIVATE KEY" (grid-proxy-info and globus-url-copy
        # said "Unhandled PEM sequence: EC PRIVATE KEY" for an ECDSA proxy)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
        if passphrase or not isinstance(self.private_key, rsa.RSAPrivateKey):
            fmt = serialization.PrivateFormat.PKCS8
        return self.private_key.private_bytes(serialization.Encoding.PEM, fmt, enc)

    def proxy_file_bytes(self) -> bytes:
        """The Globus proxy file: the proxy certificate, its unencrypted key, then the chain."""
        return (self.certificate.public_bytes(serialization.Encoding.PEM) + self.key_pem()
                + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain))


def _write_atomically(path: Path | str, data: bytes, mode: int) -> Path:
    """Write ``data`` to ``path`` with permissions ``mode``, atomically (a temporary file beside it, then a rename):
    a reader sees the old file or the new one, never a part, and the mode is set before any byte is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_private(path: Path | str, data: bytes) -> Path:
    """Write a file readable by its owner only (0600), atomically."""
    return _write_atomically(path, data, 0o600)


def write_public(path: Path | str, data: bytes) -> Path:
    """Write a file anyone may read (0644), atomically."""
    return _write_atomically(path, data, 0o644)


def save_credential(cred: Credential, cert_path: Path | str, key_path: Path | str,
                    passphrase: bytes | None = None) -> Credential:
    """Write a certificate (with chain) and its key (0600); returns the credential with its paths set."""
    write_public(cert_path, cred.cert_pem())
    write_private(key_path, cred.key_pem(passphrase))
    cred.cert_path, cred.key_path = Path(cert_path), Path(key_path)
    return cred


def default_proxy_path(env: Mapping[str, str] | None = None) -> Path:
    """`X509_USER_PROXY`, else `/tmp/x509up_u<uid>` (the Globus convention)."""
    env = os.environ if env is None else env
    return Path(env.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}")


def default_cert_dir(env: Mapping[str, str] | None = None) -> Path:
    """The trusted CA directory: `X509_CERT_DIR`, else `~/.globus/certificates`, else `/etc/grid-security/certificates`."""
    env = os.environ if env is None else env
    if env.get("X509_CERT_DIR"):
        return Path(env["X509_CERT_DIR"])
    home = Path(env.get("HOME") or Path.home()) / ".globus" / "certificates"
    return home if home.is_dir() else Path("/etc/grid-security/certificates")


def save_proxy(cred: Credential, path: Path | str | None = None) -> Path:
    """Write a proxy credential in the Globus proxy file format, 0600; default path as :func:`default_proxy_path`."""
    target = Path(path) if path is not None else default_proxy_path()
    write_private(target, cred.proxy_file_bytes())
    cred.cert_path = cred.key_path = target
    return target


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"cannot read {what} {path}: {exc.strerror}") from None


def _check_key_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CredentialError(f"private key {path} is readable by others (mode {mode:04o}); chmod 600 it")


def _split_pem(data: bytes, source: Path) -> tuple[list[x509.Certificate], list[bytes]]:
    certs, keys = [], []
    for m in _PEM_BLOCK.finditer(data):
        kind = m.group(1)
        if kind == b"CERTIFICATE":
            try:
                certs.append(x509.load_pem_x509_certificate(m.group(0)))
            except ValueError as exc:
                raise CredentialError(f"{source}: unreadable certificate: {exc}") from None
        elif kind.endswith(b"PRIVATE KEY"):
            keys.append(m.group(0))
    return certs, keys


def _load_key(pem: bytes, source: Path, passphrase: bytes | None) -> PrivateKey:
    """The private key of a PEM block. OpenSSL's check of an RSA key's every part (primality of p and q, ...) costs
    88 ms of CPU here, a large part of a short command's own work (every `vmgrid` command loads a credential); it is
    skipped. OpenSSL checks each CRT signature against the public key itself (and computes it again without CRT
    when they disagree), so parts that disagree cannot give the factors away; a key that cannot make a valid
    signature at all is refused here by signing once and verifying that with its public key (2 ms)."""
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise CredentialError(f"private key {source} is encrypted: a passphrase is needed") from None
    except ValueError as exc:
        raise CredentialError(f"cannot read private key {source}: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import padding

        probe = b"vmgrid: the parts of this RSA key agree"
        try:
            key.public_key().verify(key.sign(probe, padding.PKCS1v15(), hashes.SHA256()), probe, padding.PKCS1v15(),
                                    hashes.SHA256())
        except (InvalidSignature, ValueError):
            raise CredentialError(f"private key {source} is not a valid RSA key: its parts do not agree") from None
    return key


def _assemble(certs: list[x509.Certificate], key: PrivateKey, cert_path: Path, key_path: Path) -> Credential:
    if not certs:
        raise CredentialError(f"no certificate in {cert_path}")
    if certs[0].public_key().public_numbers() != key.public_key().public_numbers():
        raise CredentialError(f"private key {key_path} does not belong to the certificate in {cert_path}")
    return Credential(certs[0], key, tuple(certs[1:]), cert_path, key_path)


def load_credential(cert: Path | str | None = None, key: Path | str | None = None, *,
                    proxy: Path | str | None = None, passphrase: bytes | None = None,
                    env: Mapping[str, str] | None = None) -> Credential:
    """Load a credential from explicit files (a proxy file, or a certificate and key), else by the user conventions
    of :func:`load_user_credential`. A certificate file may carry its chain; a key file must be 0600 or stricter."""
    if proxy is not None:
        path = Path(proxy)
        if not path.exists():      # an expired one removed, a typo: say how to make one (as with none at all)
            raise CredentialError(f"proxy file {path} does not exist: make one with `vmgrid proxy-init` (or "
                                  f"grid-proxy-init), or name another")
        data = _read(path, "proxy file")
        certs, keys = _split_pem(data, path)
        if not keys:        # before the mode: a certificate named as the proxy is this, not "chmod 600 it"
            raise CredentialError(f"proxy file {path} holds no private key (a certificate alone is not a proxy: "
                                  f"make one with `vmgrid proxy-init`)")
        _check_key_mode(path)
        return _assemble(certs, _load_key(keys[0], path, passphrase), path, path)
    if cert is not None:
        cert_path = Path(cert)
        key_path = Path(key) if key is not None else cert_path
        certs, keys = _split_pem(_read(cert_path, "certificate"), cert_path)
        if key_path != cert_path:
            _, keys = _split_pem(_read(key_path, "private key"), key_path)
        if not keys:
            raise CredentialError(f"no private key in {key_path}")
        _check_key_mode(key_path)
        return _assemble(certs, _load_key(keys[0], key_path, passphrase), cert_path, key_path)
    return load_user_credential(env=env, passphrase=passphrase)


def load_user_credential(*, env: Mapping[str, str] | None = None, passphrase: bytes | None = None,
                         allow_proxy: bool = True) -> Credential:
    """The user's credential, as Globus finds it: `X509_USER_PROXY`, `/tmp/x509up_u<uid>`, then
    `X509_USER_CERT`/`X509_USER_KEY`, then `~/.globus/usercert.pem`/`userkey.pem`."""
    env = os.environ if env is None else env
    if allow_proxy:
        if env.get("X509_USER_PROXY"):
            return load_credential(proxy=env["X509_USER_PROXY"], passphrase=passphrase)
        tmp = Path(f"/tmp/x509up_u{os.getuid()}")
        if tmp.exists():
            return load_credential(proxy=tmp, passphrase=passphrase)
    if env.get("X509_USER_CERT"):
        return load_credential(env["X509_USER_CERT"], env.get("X509_USER_KEY") or env["X509_USER_CERT"],
                               passphrase=passphrase)
    globus = Path(env.get("HOME") or Path.home()) / ".globus"
    if (globus / "usercert.pem").exists():
        return load_credential(globus / "usercert.pem", globus / "userkey.pem", passphrase=passphrase)
    raise CredentialError("no grid credential: run `vmgrid proxy-init`, or set X509_USER_PROXY, "
                          "or X509_USER_CERT/X509_USER_KEY, or create ~/.globus/usercert.pem")


def load_host_credential(cert: Path | str | None = None, key: Path | str | None = None, *,
                         env: Mapping[str, str] | None = None) -> Credential:
    """A service's credential: explicit paths, else `X509_USER_CERT`/`X509_USER_KEY`, else
    `/etc/grid-security/hostcert.pem` and `hostkey.pem`."""
    env = os.environ if env is None else env
    if cert is None:
        if env.get("X509_USER_CERT"):
            cert, key = env["X509_USER_CERT"], env.get("X509_USER_KEY")
        else:
            cert, key = "/etc/grid-security/hostcert.pem", "/etc/grid-security/hostkey.pem"
    return load_credential(cert, key)


# ---------------------------------------------------------------------------------------------
# Certificate building

MAX_REQUEST = 8192


def check_request(pem: bytes | str, max_bytes: int = MAX_REQUEST) -> x509.CertificateSigningRequest:
    """A PEM certificate request from an untrusted party, checked: bounded, well formed, signed by the
    key it carries (proof of possession), an RSA key of at least KEY_BITS bits. CAError says what is wrong."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > max_bytes:
        raise CAError(f"certificate request of {len(data)} bytes exceeds {max_bytes}")
    try:
        request = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CAError(f"not a PEM certificate request: {exc}") from None
    if not request.is_signature_valid:
        raise CAError("the certificate request is not signed by its own key")
    key = request.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < KEY_BITS:
        raise CAError(f"the certificate request's key must be RSA of at least {KEY_BITS} bits")
    return request


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _ski(key) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _check_days(days: float, what: str) -> None:
    """A validity period in days is more than 0 (0 would be void at once; a negative one cannot be built)."""
    if not days > 0:
        raise CAError(f"{what} must be more than 0 days, not {days:g}")


def _end_entity(ca_cert: x509.Certificate, ca_key: PrivateKey, subject: x509.Name, key, *,
                days: float, eku: list[ObjectIdentifier], sans: list[x509.GeneralName]) -> x509.Certificate:
    """An end-entity certificate for ``key`` (a private key, or only its public key)."""
    _check_days(days, "a certificate's validity")
    public = key.public_key() if hasattr(key, "private_bytes") else key
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject).public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                            data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
               .add_extension(_ski(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def proxy_certificate(issuer: Credential, public_key, *, lifetime: _dt.timedelta,
                      policy_language: ObjectIdentifier = OID_INHERIT_ALL, path_length: int | None = None,
                      critical: bool = True, cn: str | None = None,
                      not_before: _dt.datetime | None = None) -> x509.Certificate:
    """Build an RFC 3820 proxy certificate for `public_key`, signed by `issuer`. The knobs beyond lifetime, policy
    and path length exist so tests can build the malformed proxies a verifier must refuse."""
    now = _now()
    serial = x509.random_serial_number() >> 96 or 1        # short, as Globus' proxies have
    subject = x509.Name(list(issuer.certificate.subject.rdns) + [
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn or str(serial))])])
    start = not_before or (now - CLOCK_SKEW)
    info = ProxyCertInfo(policy_language.dotted_string, path_length)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer.certificate.subject).public_key(public_key)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(min(now + lifetime, issuer.not_after))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.UnrecognizedExtension(OID_PROXY_CERT_INFO, info.to_der()), critical=critical)
            .sign(issuer.private_key, hashes.SHA256()))


def make_proxy(issuer: Credential, *, hours: float = DEFAULT_PROXY_HOURS, limited: bool = False,
               path_length: int | None = None, key: PrivateKey | None = None, bits: int = KEY_BITS,
               kind: str | None = None) -> Credential:
    """An RFC 3820 impersonation proxy of `issuer` (a certificate or itself a proxy). A proxy of a limited proxy is
    limited. Its lifetime ends no later than its issuer's. Its key is of `kind` ("rsa" or "ec"; by default the
    kind of the issuer's key)."""
    if hours <= 0:
        raise CredentialError("a proxy lifetime must be positive")
    if path_length is not None and path_length < 0:
        raise CredentialError(f"a proxy path length is 0 or more (how many proxies it may sign), not {path_length}")
    if issuer.certificate.extensions and _is_ca(issuer.certificate):
        raise CredentialError("a CA certificate cannot issue proxies")
    key = key or new_key(bits, kind or key_kind(issuer.private_key))
    language = OID_LIMITED if (limited or issuer.limited) else OID_INHERIT_ALL
    cert = proxy_certificate(issuer, key.public_key(), lifetime=_dt.timedelta(hours=hours),
                             policy_language=language, path_length=path_length)
    return Credential(cert, key, issuer.certificates)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def subject_hash(cert_or_name: x509.Certificate) -> str:
    """OpenSSL's subject hash (`openssl x509 -hash`), the file name stem in `X509_CERT_DIR`."""
    from OpenSSL import crypto
    return f"{crypto.X509.from_cryptography(cert_or_name).subject_name_hash():08x}"


def signing_policy(ca_dn: str, subjects: str = "/O=Grid/*") -> str:
    """The Globus `<hash>.signing_policy` text that lets grid-proxy-init and GSI trust the CA for `subjects`."""
    return (f"# Signing policy of {ca_dn} (written by vmgrid)\n"
            f"access_id_CA X509 '{ca_dn}'\n"
            f"pos_rights globus CA:sign\n"
            f"cond_subjects globus '\"{subjects}\"'\n")


# ---------------------------------------------------------------------------------------------
# The grid CA

@dataclass
class IssuedRecord:
    """One certificate the CA issued, as kept in `issued.json`."""
    serial: int
    subject: str
    not_after: str
    revoked_at: str | None = None


@dataclass
class GridCA:
    """A grid certificate authority kept in one directory:

    ca.pem, ca.key (0600), issued.json (serials, subjects, revocations), issued/<serial>.pem, crl.pem, and
    certificates/ (the `X509_CERT_DIR` to give to grid tools and services: `<hash>.0`, `<hash>.r0`,
    `<hash>.signing_policy`)."""
    directory: Path
    certificate: x509.Certificate
    private_key: PrivateKey
    crl_days: int = 30
    _records: dict[int, IssuedRecord] = field(default_factory=dict, repr=False)

    @property
    def dn(self) -> str:
        return dn_string(self.certificate.subject)

    @property
    def cert_dir(self) -> Path:
        return self.directory / "certificates"

    @property
    def ca_cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path | str, dn: str = DEFAULT_CA_DN, *, days: int = 3650,
               key: PrivateKey | None = None, publish_to: Path | str | None = None,
               subjects: str = "/O=Grid/*") -> "GridCA":
        """Create a new CA in `directory` (refuses to overwrite one) and publish it to its `certificates/`
        (and to `publish_to` if given, e.g. an existing X509_CERT_DIR)."""
        directory = Path(directory)
        if (directory / "ca.pem").exists():
            raise CAError(f"a CA already exists in {directory}")
        _check_days(days, "the CA's validity")
        name = parse_dn(dn)                       # a name refused leaves no directory behind
        for attr in name:
            if any(c in "=\\" or not c.isprintable() for c in str(attr.value)):
                raise CAError(f"CA name {dn!r}: a value may not contain '=', '\\\\' or control characters")
        directory.mkdir(parents=True, exist_ok=True)
        key = key or new_key(KEY_BITS)
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + _dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(_ski(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(directory / "ca.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
        write_public(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        write_public(directory / "ca.json", json.dumps({"subjects": subjects, "publish": []}).encode())
        ca = cls(directory, cert, key)
        ca._save_records()
        ca.publish()
        if publish_to is not None:
            ca.publish(publish_to)
        return ca

    @classmethod
    def load(cls, directory: Path | str) -> "GridCA":
        directory = Path(directory)
        try:
            cert_data = (directory / "ca.pem").read_bytes()
            key_data = (directory / "ca.key").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise CAError(f"no grid CA in {directory} (run `vmgrid ca init --dir {directory}`)") from None
        except OSError as exc:
            raise CAError(f"cannot read the grid CA in {directory}: {exc.strerror}") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError) as exc:
            raise CAError(f"the grid CA in {directory} is damaged (ca.pem or ca.key: {exc})") from None
        ca = cls(directory, cert, key)
        ca._load_records()
        return ca

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load_records()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load_records(self) -> None:
        path = self.directory / "issued.json"
        raw = json.loads(path.read_text()) if path.exists() else []
        self._records = {int(r["serial"]): IssuedRecord(int(r["serial"]), r["subject"], r["not_after"],
                                                         r.get("revoked_at")) for r in raw}

    def _save_records(self) -> None:
        data = [{"serial": str(r.serial), "subject": r.subject, "not_after": r.not_after,
                 "revoked_at": r.revoked_at} for r in self._records.values()]
        write_public(self.directory / "issued.json", json.dumps(data, indent=1).encode())

    @property
    def issued(self) -> list[IssuedRecord]:
        return list(self._records.values())

    def _config(self) -> dict:
        try:
            return json.loads((self.directory / "ca.json").read_text())
        except (OSError, ValueError):
            return {}

    def _subjects_policy(self) -> str:
        return self._config().get("subjects", "/O=Grid/*")

    def _issue(self, subject: x509.Name, key: PrivateKey | None, days: float, eku: list[ObjectIdentifier],
               sans: list[x509.GeneralName]) -> Credential:
        key = key or new_key(KEY_BITS)
        return Credential(self._sign(subject, key, days, eku, sans), key, ())

    def _sign(self, subject: x509.Name, key, days: float, eku: list[ObjectIdentifier],
              sans: list[x509.GeneralName]) -> x509.Certificate:
        cert = _end_entity(self.certificate, self.private_key, subject, key, days=days, eku=eku, sans=sans)
        with self._locked():
            self._records[cert.serial_number] = IssuedRecord(cert.serial_number, dn_string(subject),
                                                             cert.not_valid_after_utc.isoformat())
            self._save_records()
            write_public(self.directory / "issued" / f"{cert.serial_number:x}.pem",
                         cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def issue_host(self, hostname: str, *, ou: str = DEFAULT_OU, days: float = 365, key: PrivateKey | None = None,
                   alt_names: Sequence[str] = (), out_dir: Path | str | None = None,
                   service: str = "host") -> Credential:
        """A host certificate `/O=Grid/OU=<ou>/CN=host/<hostname>` with subjectAltName DNS (and IP) names for TLS.
        `localhost` also gets 127.0.0.1 and ::1. With `out_dir`, writes hostcert.pem and hostkey.pem (0600).
        With ``service``, a service certificate `CN=<service>/<hostname>` (the same names): it serves TLS for the
        host, but a site policy's `CN=host/*` patterns (nodes, enforcement points) do not take it for the host."""
        if not SERVICE_NAME.match(service):
            raise CAError(f"service name {service!r}: a lower-case letter, then up to 31 letters, digits or '-'")
        subject, sans = self._host_names(hostname, ou, alt_names)
        if service != "host":
            subject = parse_dn(host_dn(hostname, ou, service))
        cred = self._issue(subject, key, days, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                           sans)
        if out_dir is not None:
            save_credential(cred, Path(out_dir) / "hostcert.pem", Path(out_dir) / "hostkey.pem")
        return cred

    @staticmethod
    def _host_names(hostname: str, ou: str, alt_names: Sequence[str]) -> tuple[x509.Name, list[x509.GeneralName]]:
        for n in (hostname, *alt_names):
            _check_hostname(n)
        check_name_value(ou, "organisational unit")
        names = [hostname, *alt_names]
        if hostname == "localhost":
            names += ["127.0.0.1", "::1"]
        sans: list[x509.GeneralName] = []
        for n in dict.fromkeys(names):
            try:
                sans.append(x509.IPAddress(ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        return parse_dn(host_dn(hostname, ou)), sans

    def issue_host_request(self, request: x509.CertificateSigningRequest, hostname: str, *, ou: str = DEFAULT_OU,
                           days: float = 30, alt_names: Sequence[str] = ()) -> x509.Certificate:
        """A host certificate like :meth:`issue_host` for the key of a checked certificate request
        (:func:`check_request`); the subject and names are this CA's choice, not the request's."""
        subject, sans = self._host_names(hostname, ou, alt_names)
        return self._sign(subject, request.public_key(), days,
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans)

    def issue_user(self, name: str, *, ou: str = DEFAULT_OU, days: float = 365, key: PrivateKey | None = None,
                   out_dir: Path | str | None = None, passphrase: bytes | None = None) -> Credential:
        """A user certificate `/O=Grid/OU=<ou>/CN=<name>`. With `out_dir` (e.g. ~/.globus), writes usercert.pem and
        userkey.pem (0600, encrypted when a passphrase is given)."""
        check_name_value(name, "user name")
        check_name_value(ou, "organisational unit")
        subject = parse_dn(f"/O=Grid/OU={ou}/CN={name}")
        cred = self._issue(subject, key, days, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
        if out_dir is not None:
            save_credential(cred, Path(out_dir) / "usercert.pem", Path(out_dir) / "userkey.pem", passphrase)
        return cred

    def revoke(self, cert_or_serial: x509.Certificate | int) -> IssuedRecord:
        """Revoke a certificate this CA issued; the CRL is re-issued and published at once."""
        serial = cert_or_serial if isinstance(cert_or_serial, int) else cert_or_serial.serial_number
        with self._locked():
            record = self._records.get(serial)
            if record is None:
                raise CAError(f"serial {serial:x} was not issued by {self.dn}")
            if record.revoked_at is None:
                record.revoked_at = _now().isoformat()
                self._save_records()
        self.republish()
        return record

    def crl(self, days: int | None = None) -> x509.CertificateRevocationList:
        """Issue a fresh CRL (valid `days`, default 30) listing every revoked certificate, and write crl.pem."""
        days = self.crl_days if days is None else days
        _check_days(days, "a CRL's validity")
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(now - CLOCK_SKEW)
                   .next_update(now + _dt.timedelta(days=days))
                   .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key()),
                                  critical=False))
        for record in self._records.values():
            if record.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(record.serial)
                    .revocation_date(_dt.datetime.fromisoformat(record.revoked_at)).build())
        crl = builder.sign(self.private_key, hashes.SHA256())
        write_public(self.directory / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        return crl

    def publish(self, cert_dir: Path | str | None = None, crl_days: int | None = None) -> Path:
        """Write the CA certificate, a fresh CRL and the signing policy into a trusted CA directory in the Globus
        layout (`<hash>.0`, `<hash>.r0`, `<hash>.signing_policy`); default: this CA's `certificates/`."""
        target = Path(cert_dir) if cert_dir is not None else self.cert_dir
        target.mkdir(parents=True, exist_ok=True)
        crl = self.crl(crl_days)
        stem = subject_hash(self.certificate)
        write_public(target / f"{stem}.0", self.certificate.public_bytes(serialization.Encoding.PEM))
        write_public(target / f"{stem}.r0", crl.public_bytes(serialization.Encoding.PEM))
        write_public(target / f"{stem}.signing_policy", signing_policy(self.dn, self._subjects_policy()).encode())
        os.utime(target)   # TrustStores watch the directory's mtime
        config = self._config()
        if target.resolve() != self.cert_dir.resolve() and str(target.resolve()) not in config.get("publish", []):
            config.setdefault("publish", []).append(str(target.resolve()))
            write_public(self.directory / "ca.json", json.dumps(config).encode())
        return target

    def republish(self, crl_days: int | None = None) -> list[Path]:
        """Publish a fresh CRL to this CA's `certificates/` and to every directory it was published to before."""
        targets = [self.cert_dir, *(Path(p) for p in self._config().get("publish", []))]
        return [self.publish(t, crl_days) for t in targets]
