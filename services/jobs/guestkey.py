"""``python3 -m services.jobs.guestkey KEYFILE``: the grid container's own key, made in the guest.

guestd (standard library only) runs this from the vmgrid runtime in the image: it makes an RSA key in
KEYFILE (0600) unless one is there, and prints a certificate request for it (PEM) on standard output.
The node that deployed the instance issues the certificate (services/vmmanager/guestcred.py) and sends
it back over the guest channel; the private key never leaves the guest.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from security.pki import new_key, write_private


def request(key_path: Path) -> bytes:
    """The certificate request (PEM) for the key in ``key_path``, made there first if missing."""
    if key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        key = new_key()
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                                  serialization.NoEncryption()))
    # the subject is the node's to choose; this one only says what asked
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmgrid guest container")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m services.jobs.guestkey KEYFILE", file=sys.stderr)
        return 2
    sys.stdout.write(request(Path(args[0])).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
