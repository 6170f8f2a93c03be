"""Chain validation against a trusted CA directory: the end-entity certificate with `cryptography` (and CRLs), then
the RFC 3820 proxy path walked by hand. The result is a verified :class:`Caller`.

Stable API:

    trust = TrustStore(cert_dir)                       # X509_CERT_DIR: <hash>.0 CA certificates, <hash>.r0 CRLs
    caller = trust.validate([leaf, *issuers])          # leaf first; raises ChainError subclasses
    caller.dn, caller.subject, caller.limited, caller.is_proxy, caller.not_after, caller.chain
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shlex
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from .pki import OID_INHERIT_ALL, OID_LIMITED, any_proxy_info, dn_string

# What a presented chain may hold, checked before any signature in it is verified: the chain is validated before
# the message's signature is (an unauthenticated client chooses it), and a PKIPath of hundreds of proxies cost
# seconds of CPU per message (the proxy walk compares names pairwise), a proxy signed by an RSA-16384 key with a
# 64-bit public exponent 11 ms per certificate.
MAX_CHAIN = 16                  # certificates: proxies, the end entity and its intermediate CAs
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT_BITS = 32      # 65537 and 3 are what CAs and proxy tools use
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class ChainError(Exception):
    """A certificate chain is not acceptable; `reason` says why in words a grid user understands."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UntrustedChain(ChainError):
    """The end-entity certificate does not lead to a CA in the trusted CA directory."""


class RevokedCertificate(ChainError):
    """A certificate of the chain is on its CA's CRL."""


class ExpiredCertificate(ChainError):
    """A certificate of the chain (or the CA's CRL) is outside its validity period."""


class SigningPolicyViolation(ChainError):
    """A CA issued a certificate whose subject its Globus signing policy (``<hash>.signing_policy``) does not allow."""


class InvalidProxy(ChainError):
    """A proxy certificate breaks RFC 3820 or the grid's proxy policy (independent proxies are refused)."""


@dataclass(frozen=True)
class Caller:
    """A verified grid identity.

    dn: the end-entity DN in `/O=Grid/OU=.../CN=...` form (the identity authorization decides on);
    subject: the DN of the certificate that signed (a proxy's DN for a proxy); chain: leaf first, trust anchor
    excluded; limited: a limited proxy is in the chain; not_after: the earliest expiry of the chain."""
    dn: str
    subject: str
    chain: tuple[x509.Certificate, ...]
    limited: bool
    is_proxy: bool
    not_after: _dt.datetime
    issuer: str
    proxies: int = 0            # how many proxies lead the chain

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def end_entity(self) -> x509.Certificate:
        """The end-entity certificate of the chain (the one ``dn`` names): a host's identity is judged on it only
        (security.hostauth), never on a proxy's subject."""
        return self.chain[self.proxies]


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


@dataclass
class _Anchors:
    store: verification.Store
    by_name: dict[bytes, list[x509.Certificate]]
    crls: dict[bytes, list[x509.CertificateRevocationList]]
    generation: int
    policies: dict[str, list[re.Pattern]] = None     # CA DN -> subjects it may sign (signing_policy files)


def read_signing_policy(text: str) -> dict[str, list[re.Pattern]]:
    """The Globus EACL signing policy: ``access_id_CA X509 '<CA DN>'`` then ``cond_subjects globus
    '"<pattern>" ...'`` lines; ``*`` in a pattern matches any characters, ``?`` one."""
    policies: dict[str, list[re.Pattern]] = {}
    current: str | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if len(words) >= 3 and words[0] == "access_id_CA" and words[1].upper() == "X509":
            current = words[2]
            policies.setdefault(current, [])
        elif len(words) >= 3 and words[0] == "cond_subjects" and words[1] == "globus" and current is not None:
            for pattern in shlex.split(words[2]):
                regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
                policies[current].append(re.compile(regex + r"\Z", re.DOTALL))
    return policies


def check_bounds(chain: Sequence[x509.Certificate], max_chain: int = MAX_CHAIN) -> None:
    """Refuse (UntrustedChain) a chain longer than `max_chain`, or a certificate whose key would cost too much to
    verify with: RSA over MAX_RSA_BITS or with a public exponent over MAX_RSA_EXPONENT_BITS, EC off the NIST
    P-curves, or another kind than RSA, EC, Ed25519 and Ed448."""
    if len(chain) > max_chain:
        raise UntrustedChain(f"the chain holds {len(chain)} certificates; at most {max_chain} are accepted")
    for cert in chain:
        try:
            key = cert.public_key()
        except (ValueError, TypeError, NotImplementedError):
            raise UntrustedChain(f"the key of {dn_string(cert.subject)} cannot be read") from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size > MAX_RSA_BITS or key.public_numbers().e.bit_length() > MAX_RSA_EXPONENT_BITS:
                raise UntrustedChain(f"the RSA key of {dn_string(cert.subject)} ({key.key_size} bits, a "
                                     f"{key.public_numbers().e.bit_length()}-bit exponent) is refused: at most "
                                     f"{MAX_RSA_BITS} bits with an exponent of at most {MAX_RSA_EXPONENT_BITS} bits")
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ACCEPTED_CURVES):
                raise UntrustedChain(f"the EC key of {dn_string(cert.subject)} is on {key.curve.name}: P-256, P-384 "
                                     f"and P-521 are accepted")
        elif not isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            raise UntrustedChain(f"the {type(key).__name__} of {dn_string(cert.subject)} is refused: RSA, EC "
                                 f"(P-256/384/521), Ed25519 and Ed448 keys are accepted")


def _check_time(cert: x509.Certificate, at: _dt.datetime, what: str) -> None:
    if at < cert.not_valid_before_utc:
        raise ExpiredCertificate(f"{what} {dn_string(cert.subject)} is not valid before "
                                 f"{cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise ExpiredCertificate(f"{what} {dn_string(cert.subject)} expired at {cert.not_valid_after_utc.isoformat()}")


def _key_usage_allows_signing(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    except x509.ExtensionNotFound:
        return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


class TrustStore:
    """The trusted CA certificates and CRLs of one `X509_CERT_DIR`, re-read when the directory changes.

    Validated chains are cached briefly (`cache_seconds`), keyed by the chain's bytes, so a busy service validates
    each caller's proxy chain once, not once per message. `require_crl`: refuse CAs that publish no CRL.
    """

    def __init__(self, cert_dir: Path | str, *, cache_seconds: float = 60.0, recheck_seconds: float = 2.0,
                 require_crl: bool = False, cache_size: int = 2048):
        self.cert_dir = Path(cert_dir)
        self.cache_seconds = cache_seconds
        self.recheck_seconds = recheck_seconds
        self.require_crl = require_crl
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._anchors: _Anchors | None = None
        self._stamp: tuple | None = None
        self._checked_at = 0.0
        self._generation = 0
        self._cache: OrderedDict[bytes, tuple[Caller, float, int]] = OrderedDict()
        self._load()

    # -- trust anchors ------------------------------------------------------------------------
    def _dir_stamp(self) -> tuple:
        """What the directory holds: its own stamp (files added, renamed, removed) and each file's (a CA
        certificate or CRL rewritten in place, e.g. `cp new.r0 0a1b2c3d.r0`, changes no directory time: a
        revocation must not wait for a restart). Taken before the files are read, so a change made while
        they are read is seen at the next check."""
        try:
            st = os.stat(self.cert_dir)
            names = sorted(os.listdir(self.cert_dir))
        except FileNotFoundError:
            raise UntrustedChain(f"trusted CA directory {self.cert_dir} does not exist") from None
        files = []
        for name in names:
            try:
                f = os.stat(os.path.join(self.cert_dir, name))
            except OSError:
                continue
            files.append((name, f.st_mtime_ns, f.st_size, f.st_ino))
        return (st.st_mtime_ns, st.st_ino, tuple(files))

    def _load(self) -> _Anchors:
        stamp = self._dir_stamp()
        by_name: dict[bytes, list[x509.Certificate]] = {}
        crls: dict[bytes, list[x509.CertificateRevocationList]] = {}
        anchors: list[x509.Certificate] = []
        policies: dict[str, list[re.Pattern]] = {}
        for path in sorted(self.cert_dir.iterdir()):
            stem, dot, ext = path.name.rpartition(".")
            if not dot or len(stem) != 8:
                continue
            try:
                data = path.read_bytes()
                if ext == "signing_policy":
                    for ca, patterns in read_signing_policy(data.decode("utf-8", "replace")).items():
                        policies.setdefault(ca, []).extend(patterns)
                elif ext.isdigit():
                    for cert in x509.load_pem_x509_certificates(data):
                        anchors.append(cert)
                        by_name.setdefault(cert.subject.public_bytes(), []).append(cert)
                elif ext[:1] == "r" and ext[1:].isdigit():
                    crl = x509.load_pem_x509_crl(data)
                    crls.setdefault(crl.issuer.public_bytes(), []).append(crl)
            except (OSError, ValueError):
                continue   # an unreadable file in the directory trusts nothing
        self._generation += 1
        self._anchors = _Anchors(verification.Store(anchors) if anchors else None, by_name, crls, self._generation,
                                 policies)
        self._stamp = stamp
        self._checked_at = time.monotonic()
        self._cache.clear()
        return self._anchors

    def anchors(self) -> _Anchors:
        with self._lock:
            if time.monotonic() - self._checked_at >= self.recheck_seconds:
                self._checked_at = time.monotonic()
                if self._dir_stamp() != self._stamp:
                    return self._load()
            assert self._anchors is not None
            return self._anchors

    def reload(self) -> None:
        with self._lock:
            self._load()

    @property
    def ca_certificates(self) -> list[x509.Certificate]:
        return [c for certs in self.anchors().by_name.values() for c in certs]

    # -- validation ---------------------------------------------------------------------------
    def lookup(self, cache_key: bytes) -> Caller | None:
        """The caller of a chain validated recently under this key, if still valid; else None."""
        anchors = self.anchors()
        with self._lock:
            hit = self._cache.get(cache_key)
            if hit is None:
                return None
            if hit[1] > time.monotonic() and hit[2] == anchors.generation and hit[0].not_after > _utcnow():
                self._cache.move_to_end(cache_key)
                return hit[0]
            del self._cache[cache_key]
            return None

    def validate(self, chain: Sequence[x509.Certificate], at: _dt.datetime | None = None, *,
                 cache_key: bytes | None = None) -> Caller:
        """Validate a chain (leaf first; order of the issuers is repaired by name) and return the caller.
        Raises UntrustedChain, RevokedCertificate, ExpiredCertificate or InvalidProxy."""
        if not chain:
            raise UntrustedChain("no certificate presented")
        anchors = self.anchors()
        if at is None:
            if cache_key is None:
                cache_key = hashlib.sha256(b"".join(c.public_bytes(serialization.Encoding.DER)
                                                    for c in chain)).digest()
            hit = self.lookup(cache_key)
            if hit is not None:
                return hit
            caller = self._validate(list(chain), _utcnow(), anchors)
            now = time.monotonic()
            with self._lock:
                self._cache[cache_key] = (caller, now + self.cache_seconds, anchors.generation)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return caller
        return self._validate(list(chain), at.astimezone(_dt.timezone.utc), anchors)

    def _validate(self, chain: list[x509.Certificate], at: _dt.datetime, anchors: _Anchors) -> Caller:
        check_bounds(chain)
        leaf, rest = chain[0], chain[1:]
        # 1. The proxy path, from the leaf up to the first certificate that is not a proxy.
        proxies: list[x509.Certificate] = []
        current = leaf
        while True:
            try:
                info = any_proxy_info(current)
            except ValueError as exc:
                raise InvalidProxy(f"unreadable ProxyCertInfo in {dn_string(current.subject)}: {exc}") from None
            if info is None:
                break
            proxies.append(current)
            issuer = next((c for c in rest if c.subject == current.issuer), None)
            if issuer is None:
                raise InvalidProxy(f"the issuer of proxy {dn_string(current.subject)} was not presented")
            rest = [c for c in rest if c is not issuer]
            current = issuer
        end_entity = current
        limited = self._check_proxies(proxies, end_entity, at)

        # 2. The end-entity certificate against the trusted CAs (cryptography's verifier), then the CRLs.
        if anchors.store is None:
            raise UntrustedChain(f"no trusted CA in {self.cert_dir}")
        if _is_ca(end_entity):
            raise UntrustedChain(f"{dn_string(end_entity.subject)} is a CA certificate, not a grid identity")
        _check_time(end_entity, at, "certificate")
        if proxies and not _key_usage_allows_signing(end_entity):
            raise InvalidProxy(f"{dn_string(end_entity.subject)} may not sign (key usage): it cannot issue proxies")
        intermediates = [c for c in rest if _is_ca(c)]
        verifier = (verification.PolicyBuilder().store(anchors.store).time(at).max_chain_depth(8)
                    .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=verification.ExtensionPolicy.permit_all())
                    .build_client_verifier())
        try:
            verified = verifier.verify(end_entity, intermediates)
        except verification.VerificationError as exc:
            raise UntrustedChain(f"{dn_string(end_entity.subject)} is not issued by a trusted CA "
                                 f"in {self.cert_dir}: {exc}") from None
        path = list(verified.chain)          # end entity first, trust anchor last
        for cert, issuer in zip(path, path[1:]):
            self._check_crl(cert, issuer, at, anchors)
            self._check_signing_policy(cert, issuer, anchors)
        return Caller(dn=dn_string(end_entity.subject), subject=dn_string(leaf.subject),
                      chain=tuple([*proxies, end_entity, *path[1:-1]]), limited=limited, is_proxy=bool(proxies),
                      not_after=min(c.not_valid_after_utc for c in [*proxies, *path]),
                      issuer=dn_string(path[-1].subject), proxies=len(proxies))

    def _check_proxies(self, proxies: list[x509.Certificate], end_entity: x509.Certificate,
                       at: _dt.datetime) -> bool:
        """Walk the proxies from the end entity down to the leaf; return whether the chain is limited."""
        limited = False
        issuer = end_entity
        for depth, proxy in enumerate(reversed(proxies)):
            name = dn_string(proxy.subject)
            info, critical, _form = any_proxy_info(proxy)  # type: ignore[misc]
            below = len(proxies) - 1 - depth        # proxies this one has signed in the chain
            if not critical:
                raise InvalidProxy(f"proxy {name}: ProxyCertInfo must be critical")
            if info.independent:
                raise InvalidProxy(f"proxy {name} is an independent proxy: refused")
            if info.policy_language not in (OID_INHERIT_ALL.dotted_string, OID_LIMITED.dotted_string):
                raise InvalidProxy(f"proxy {name}: unknown proxy policy language {info.policy_language}")
            if info.limited:
                limited = True
            elif limited:
                raise InvalidProxy(f"proxy {name}: a limited proxy cannot sign a full proxy")
            if info.path_length is not None and (info.path_length < 0 or below > info.path_length):
                raise InvalidProxy(f"proxy {name}: path length {info.path_length} exceeded")
            if proxy.issuer != issuer.subject:
                raise InvalidProxy(f"proxy {name}: issuer name is not the subject of the certificate that signed it")
            rdns = list(proxy.subject.rdns)
            if rdns[:-1] != list(issuer.subject.rdns) or len(rdns[-1]) != 1 \
                    or next(iter(rdns[-1])).oid != NameOID.COMMON_NAME:
                raise InvalidProxy(f"proxy {name}: subject must be its issuer's subject plus one CN")
            if _is_ca(proxy):
                raise InvalidProxy(f"proxy {name} claims to be a CA")
            for ext in proxy.extensions:
                if isinstance(ext.value, (x509.SubjectAlternativeName, x509.IssuerAlternativeName)):
                    raise InvalidProxy(f"proxy {name} carries an alternative name (RFC 3820 forbids it)")
            if not _key_usage_allows_signing(issuer):
                raise InvalidProxy(f"{dn_string(issuer.subject)} may not sign proxies (key usage)")
            try:
                proxy.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, Exception) as exc:   # InvalidSignature, unsupported algorithms
                raise InvalidProxy(f"proxy {name} is not signed by the key of {dn_string(issuer.subject)}: "
                                   f"{type(exc).__name__}") from None
            _check_time(proxy, at, "proxy")
            issuer = proxy
        return limited

    def _check_signing_policy(self, cert: x509.Certificate, issuer: x509.Certificate, anchors: _Anchors) -> None:
        """A CA with a signing policy in the directory may only have signed the subjects it names
        (as Globus enforces); a CA without one is not restricted here."""
        ca = dn_string(issuer.subject)
        patterns = (anchors.policies or {}).get(ca)
        if patterns is None:
            return
        subject = dn_string(cert.subject)
        if not any(p.match(subject) for p in patterns):
            raise SigningPolicyViolation(f"{ca} may not sign {subject}: its signing policy in {self.cert_dir} "
                                         "does not allow that name")

    def _check_crl(self, cert: x509.Certificate, issuer: x509.Certificate, at: _dt.datetime,
                   anchors: _Anchors) -> None:
        crls = [c for c in anchors.crls.get(issuer.subject.public_bytes(), [])
                if c.is_signature_valid(issuer.public_key())]
        if not crls:
            if self.require_crl:
                raise UntrustedChain(f"no valid CRL for {dn_string(issuer.subject)} in {self.cert_dir}")
            return
        crl = max(crls, key=lambda c: c.last_update_utc)
        if crl.next_update_utc is not None and crl.next_update_utc < at:
            raise ExpiredCertificate(f"the CRL of {dn_string(issuer.subject)} expired at "
                                     f"{crl.next_update_utc.isoformat()}; publish a new one (`vmgrid ca crl`)")
        revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if revoked is not None and revoked.revocation_date_utc <= at:
            raise RevokedCertificate(f"certificate {dn_string(cert.subject)} (serial {cert.serial_number:x}) "
                                     f"was revoked at {revoked.revocation_date_utc.isoformat()}")
