"""`vmgrid ca init|host|user|revoke|crl|list`, `vmgrid proxy-init` and `vmgrid proxy-info`: the grid PKI on the
command line, with grid-proxy-init's flags (-valid HH:MM, -hours, -limited, -rfc, -cert, -key, -out)."""
from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import os
import sys
from pathlib import Path

from .pki import (DEFAULT_CA_DN, DEFAULT_OU, DEFAULT_PROXY_HOURS, KEY_KINDS, CAError, CredentialError, GridCA,
                  check_name_value, default_proxy_path, dn_string, load_credential, load_user_credential,
                  make_proxy, new_key, save_proxy)


def _error(message: str):
    from services.common.errors import CLIError
    return CLIError(message)


def _ca_dir(args) -> Path:
    value = args.dir or os.environ.get("VMGRID_CA_DIR")
    if not value:
        raise _error("no CA directory: give --dir DIR or set VMGRID_CA_DIR")
    return Path(value)


def _load_ca(args) -> GridCA:
    try:
        return GridCA.load(_ca_dir(args))
    except CAError as exc:
        raise _error(str(exc)) from None


def _passphrase(args, prompt: str) -> bytes | None:
    if getattr(args, "passphrase_file", None):
        try:
            return Path(args.passphrase_file).read_text().rstrip("\n").encode()
        except (OSError, UnicodeDecodeError) as exc:
            raise _error(f"cannot read the passphrase file {args.passphrase_file}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if getattr(args, "pwstdin", False):
        return sys.stdin.readline().rstrip("\n").encode()
    if getattr(args, "prompt", False):
        return getpass.getpass(prompt).encode()
    return None


# -- vmgrid ca ... ------------------------------------------------------------------------------

def cmd_ca_init(args) -> int:
    try:
        ca = GridCA.create(_ca_dir(args), args.dn, days=args.days, publish_to=args.cert_dir)
    except (CAError, ValueError) as exc:
        raise _error(str(exc)) from None
    except OSError as exc:
        raise _error(_cannot_write(exc)) from None
    print(f"created grid CA {ca.dn} in {ca.directory}")
    print(f"trusted CA directory (X509_CERT_DIR): {ca.cert_dir}")
    if args.cert_dir:
        print(f"also published to {args.cert_dir}")
    return 0


def cmd_ca_host(args) -> int:
    ca = _load_ca(args)
    try:
        GridCA._host_names(args.name, args.ou, args.alt or ())    # a bad name is named before any file
    except CAError as exc:
        raise _error(str(exc)) from None
    out = (Path(args.out) if args.out else
           ca.directory / "hosts" / (args.name if args.service == "host" else f"{args.service}-{args.name}"))
    if (out / "hostcert.pem").exists() and not args.force:
        raise _error(f"{out / 'hostcert.pem'} exists (use --force to replace it)")
    try:
        out.mkdir(parents=True, exist_ok=True)      # a folder that cannot be made is named before anything is issued
    except OSError as exc:
        raise _error(_cannot_write(exc)) from None
    try:
        cred = ca.issue_host(args.name, ou=args.ou, days=args.days, alt_names=args.alt or (), out_dir=out,
                             key=new_key(kind=args.key), service=args.service)
    except CAError as exc:
        raise _error(str(exc)) from None
    except OSError as exc:
        raise _error(_cannot_write(exc)) from None
    print(f"issued {cred.subject} (serial {cred.certificate.serial_number:x})")
    print(f"certificate: {cred.cert_path}\nprivate key: {cred.key_path}")
    return 0


def cmd_ca_user(args) -> int:
    ca = _load_ca(args)
    try:
        check_name_value(args.name, "user name")                # a bad name is named before any file
        check_name_value(args.ou, "organisational unit")
    except CAError as exc:
        raise _error(str(exc)) from None
    out = Path(args.out) if args.out else Path.home() / ".globus"
    if (out / "usercert.pem").exists() and not args.force:
        raise _error(f"{out / 'usercert.pem'} exists (use --force to replace it)")
    try:
        out.mkdir(parents=True, exist_ok=True)      # a folder that cannot be made is named before anything is issued
    except OSError as exc:
        raise _error(_cannot_write(exc)) from None
    try:
        cred = ca.issue_user(args.name, ou=args.ou, days=args.days, out_dir=out, key=new_key(kind=args.key),
                             passphrase=_passphrase(args, "Passphrase for the new key: "))
    except CAError as exc:
        raise _error(str(exc)) from None
    except OSError as exc:
        raise _error(_cannot_write(exc)) from None
    print(f"issued {cred.subject} (serial {cred.certificate.serial_number:x})")
    print(f"certificate: {cred.cert_path}\nprivate key: {cred.key_path}")
    return 0


def _cannot_write(exc: OSError) -> str:
    return f"cannot write {exc.filename}: {exc.strerror}" if exc.filename else f"cannot write: {exc.strerror or exc}"


def _certificate_serial(target: str) -> int:
    """The serial number of the certificate in the file ``target`` (PEM, the first certificate of a chain or of a
    credential file, or DER), else ``target`` read as a hexadecimal serial number."""
    from cryptography import x509

    path = Path(target)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _error(f"cannot read {target}: {exc.strerror}") from None
        for load in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
            try:
                return load(data).serial_number
            except ValueError:
                pass
        raise _error(f"{target} holds no certificate (PEM or DER): name a certificate file (usercert.pem, "
                     f"hostcert.pem) or give its serial number (`vmgrid ca list` shows them)")
    try:
        return int(target, 16)
    except ValueError:
        raise _error(f"{target!r} is neither a certificate file nor a hexadecimal serial number") from None


def cmd_ca_revoke(args) -> int:
    ca = _load_ca(args)
    serial = _certificate_serial(args.certificate)
    before = next((r for r in ca.issued if r.serial == serial), None)
    already = before.revoked_at if before is not None else None
    try:
        record = ca.revoke(serial)
    except CAError as exc:
        raise _error(str(exc)) from None
    if already:
        print(f"{record.subject} (serial {serial:x}) was already revoked at {already}; CRL republished to "
              f"{ca.cert_dir}")
    else:
        print(f"revoked {record.subject} (serial {serial:x}); CRL published to {ca.cert_dir}")
    return 0


def cmd_ca_crl(args) -> int:
    ca = _load_ca(args)
    try:
        targets = ca.republish(args.days)
    except CAError as exc:
        raise _error(str(exc)) from None
    revoked = sum(1 for r in ca.issued if r.revoked_at)
    for t in targets:
        print(f"published a CRL ({revoked} revoked) to {t}")
    return 0


def cmd_ca_list(args) -> int:
    ca = _load_ca(args)
    for r in sorted(ca.issued, key=lambda r: r.subject):
        state = f"revoked {r.revoked_at}" if r.revoked_at else f"valid until {r.not_after}"
        print(f"{r.serial:x}  {r.subject}  {state}")
    return 0


# -- vmgrid proxy-init / proxy-info --------------------------------------------------------------

def _hours(args) -> float:
    if args.valid:
        try:
            h, _, m = args.valid.partition(":")
            hours = int(h) + int(m or 0) / 60
        except ValueError:
            raise _error(f"-valid takes HH:MM, not {args.valid!r}") from None
        return hours
    return args.hours


def _proxy_out(out: str | None) -> Path:
    """Where the proxy goes (-out, else X509_USER_PROXY or /tmp/x509up_u<uid>), checked before any passphrase is
    asked: a folder that is not there is not made (as grid-proxy-init), a folder is not a file name."""
    target = Path(out) if out else default_proxy_path()
    where = "-out" if out else "X509_USER_PROXY" if os.environ.get("X509_USER_PROXY") else "the default proxy path"
    if target.is_dir():
        raise _error(f"{target} ({where}) is a directory: name the proxy file, e.g. {target / 'proxy.pem'}")
    if not target.parent.exists():
        raise _error(f"no directory {target.parent} to write the proxy in ({where} {target}): proxy-init does not "
                     f"make it (nor does grid-proxy-init); mkdir it or name another file")
    if not target.parent.is_dir():
        raise _error(f"{target.parent} is a file, not a directory to write the proxy in ({where} {target})")
    return target


def cmd_proxy_init(args) -> int:
    if args.old:
        raise _error("legacy (pre-RFC) Globus proxies are not supported; vmgrid makes RFC 3820 proxies")
    out = _proxy_out(args.out)
    passphrase = _passphrase(args, "Enter GRID pass phrase for this identity: ")
    try:
        if args.proxy_of:
            issuer = load_credential(proxy=args.proxy_of)
        elif args.cert:
            issuer = load_credential(args.cert, args.key or args.cert, passphrase=passphrase)
        else:
            try:
                issuer = load_user_credential(allow_proxy=False, passphrase=passphrase)
            except CredentialError as exc:
                if "encrypted" in str(exc) and passphrase is None and sys.stdin.isatty():
                    issuer = load_user_credential(allow_proxy=False,
                                                  passphrase=getpass.getpass("Enter GRID pass phrase: ").encode())
                elif str(exc).startswith("no grid credential"):   # its advice, "run `vmgrid proxy-init`", is circular here
                    raise CredentialError("no user certificate to make a proxy from: give -cert FILE -key FILE, or set "
                                          "X509_USER_CERT/X509_USER_KEY, or create ~/.globus/usercert.pem and "
                                          "userkey.pem (`vmgrid ca user NAME` issues them)") from None
                else:
                    raise
        proxy = make_proxy(issuer, hours=_hours(args), limited=args.limited, path_length=args.path_length,
                           bits=args.bits, kind=args.key_type)
    except CredentialError as exc:
        raise _error(str(exc)) from None
    try:
        path = save_proxy(proxy, out)
    except OSError as exc:
        raise _error(f"cannot write the proxy to {out}: {exc.strerror}") from None
    asked = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(hours=_hours(args))
    if proxy.not_after < asked - _dt.timedelta(minutes=1):     # capped by what signed it (as grid-proxy-init warns)
        print(f"vmgrid: warning: your {'proxy' if args.proxy_of else 'certificate'} and this proxy expire "
              f"{proxy.not_after.astimezone().strftime('%a %b %d %H:%M:%S %Y')}, within the requested lifetime of "
              f"the proxy", file=sys.stderr)
    if not args.quiet:
        print(f"Your identity: {proxy.identity}")
        print(f"Proxy {'(limited) ' if proxy.limited else ''}written to {path}")
        print(f"Your proxy is valid until: {proxy.not_after.astimezone().strftime('%a %b %d %H:%M:%S %Y')}")
    return 0


def _proxy_type(cred) -> str:
    """What grid-proxy-info calls the credential's kind (the same proxy forms TrustStore accepts)."""
    found = cred.proxy_form
    if found is None:
        return "end entity credential"
    info, _critical, form = found
    if form == "legacy":
        return f"{'limited' if info.limited else 'full'} legacy globus proxy"
    kind = "limited" if info.limited else "independent" if info.independent else "impersonation"
    return f"{'RFC 3820' if form == 'rfc3820' else 'Proxy draft (pre-RFC)'} compliant {kind} proxy"


def cmd_proxy_info(args) -> int:
    path = Path(args.file) if args.file else default_proxy_path()
    try:
        cred = load_credential(proxy=path)
    except CredentialError as exc:
        if args.exists:
            return 1
        raise _error(str(exc)) from None
    left = cred.time_left()
    if args.exists:
        needed = _dt.timedelta(hours=_hours(args)) if (args.valid or args.hours) else _dt.timedelta(0)
        return 0 if left > needed else 1
    seconds = int(left.total_seconds())
    timeleft = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if args.subject:
        print(cred.subject)
    elif args.identity:
        print(cred.identity)
    elif args.type:
        print(_proxy_type(cred))
    elif args.timeleft:
        print(seconds)
    else:
        print(f"subject  : {cred.subject}")
        print(f"issuer   : {dn_string(cred.certificate.issuer)}")
        print(f"identity : {cred.identity}")
        print(f"type     : {_proxy_type(cred)}")
        print(f"strength : {cred.certificate.public_key().key_size} bits")
        print(f"path     : {path}")
        print(f"timeleft : {timeleft}")
    return 0


def _days(kind):
    """An argparse type: a number of days, more than 0 (0 is not "the default": it is refused)."""
    def days(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of days more than 0"
                                             f"{' (a whole number)' if kind is int else ''}")
        return value
    return days


def register(subparsers) -> None:
    """Add `ca`, `proxy-init` and `proxy-info` to the `vmgrid` parser."""
    ca = subparsers.add_parser("ca", help="a small grid CA: certificates, revocation, CRLs")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    def with_dir(p):
        p.add_argument("--dir", help="the CA directory (default: $VMGRID_CA_DIR)")
        return p

    p = with_dir(ca_sub.add_parser("init", help="create a CA and its trusted CA directory"))
    p.add_argument("--dn", default=DEFAULT_CA_DN, help=f"the CA's DN (default {DEFAULT_CA_DN!r})")
    p.add_argument("--days", type=_days(int), default=3650, help="the CA certificate's validity (default 3650)")
    p.add_argument("--cert-dir", help="also publish into this X509_CERT_DIR")
    p.set_defaults(func=cmd_ca_init)

    p = with_dir(ca_sub.add_parser("host", help="issue a host certificate /O=Grid/OU=<ou>/CN=host/<name>"))
    p.add_argument("name")
    p.add_argument("--ou", default=DEFAULT_OU)
    p.add_argument("--service", default="host",
                   help="a service certificate /O=Grid/OU=<ou>/CN=<service>/<name> (Globus' grid-cert-request "
                        "-service): TLS for the host, but not the host's identity to the site's policy (default: host)")
    p.add_argument("--days", type=_days(float), default=365, help="validity in days (default 365)")
    p.add_argument("--alt", action="append", help="another DNS name or IP address for TLS (repeatable)")
    p.add_argument("--out", help="directory for hostcert.pem/hostkey.pem (default <ca dir>/hosts/<name>)")
    p.add_argument("--key", choices=KEY_KINDS, default="rsa",
                   help="key type: rsa (2048 bits, the default) or ec (P-256)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_ca_host)

    p = with_dir(ca_sub.add_parser("user", help="issue a user certificate /O=Grid/OU=<ou>/CN=<name>"))
    p.add_argument("name")
    p.add_argument("--ou", default=DEFAULT_OU)
    p.add_argument("--days", type=_days(float), default=365, help="validity in days (default 365)")
    p.add_argument("--out", help="directory for usercert.pem/userkey.pem (default ~/.globus)")
    p.add_argument("--key", choices=KEY_KINDS, default="rsa",
                   help="key type: rsa (2048 bits, the default) or ec (P-256)")
    p.add_argument("--passphrase-file", help="encrypt the key with the passphrase in this file")
    p.add_argument("--prompt", action="store_true", help="encrypt the key with a passphrase asked for")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_ca_user)

    p = with_dir(ca_sub.add_parser("revoke", help="revoke a certificate and publish the CRL"))
    p.add_argument("certificate", help="a PEM certificate file or a hexadecimal serial number")
    p.set_defaults(func=cmd_ca_revoke)

    p = with_dir(ca_sub.add_parser("crl", help="issue and publish a fresh CRL"))
    p.add_argument("--days", type=_days(int), default=None, help="CRL validity in days, 1 or more (default 30)")
    p.set_defaults(func=cmd_ca_crl)

    p = with_dir(ca_sub.add_parser("list", help="list the certificates this CA issued"))
    p.set_defaults(func=cmd_ca_list)

    p = subparsers.add_parser("proxy-init", help="make an RFC 3820 proxy certificate (like grid-proxy-init)")
    p.add_argument("-valid", "--valid", metavar="HH:MM", help="lifetime as hours:minutes")
    p.add_argument("-hours", "--hours", type=float, default=DEFAULT_PROXY_HOURS, help="lifetime in hours (12)")
    p.add_argument("-limited", "--limited", action="store_true", help="a limited proxy")
    p.add_argument("-rfc", "--rfc", action="store_true", help="RFC 3820 proxy (the default and only kind)")
    p.add_argument("-old", "--old", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-cert", "--cert", help="user certificate (default: X509_USER_CERT or ~/.globus/usercert.pem)")
    p.add_argument("-key", "--key", help="user key (default: X509_USER_KEY or ~/.globus/userkey.pem)")
    p.add_argument("-proxy-of", "--proxy-of", metavar="FILE", help="make a proxy of this proxy file instead")
    p.add_argument("-out", "--out", help="proxy file (default: X509_USER_PROXY or /tmp/x509up_u<uid>)")
    p.add_argument("-bits", "--bits", type=int, default=2048)
    p.add_argument("--key-type", choices=KEY_KINDS, default=None,
                   help="the proxy's key type: rsa or ec (P-256); default: the type of the certificate's key")
    p.add_argument("-path-length", "--path-length", type=int, default=None,
                   help="how many further proxies this proxy may sign")
    p.add_argument("-pwstdin", "--pwstdin", action="store_true", help="read the key's passphrase from stdin")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_proxy_init)

    p = subparsers.add_parser("proxy-info", help="show a proxy: subject, identity, type, time left")
    p.add_argument("-file", "--file", help="proxy file (default: X509_USER_PROXY or /tmp/x509up_u<uid>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-subject", "--subject", action="store_true")
    group.add_argument("-identity", "--identity", action="store_true")
    group.add_argument("-type", "--type", action="store_true")
    group.add_argument("-timeleft", "--timeleft", action="store_true", help="seconds left")
    group.add_argument("-exists", "-e", "--exists", action="store_true",
                       help="exit 0 if a proxy exists (and is valid for -valid/-hours more), else 1")
    p.add_argument("-valid", "--valid", metavar="HH:MM")
    p.add_argument("-hours", "--hours", type=float, default=None)
    p.set_defaults(func=cmd_proxy_info)
