"""Grid security: PKI with proxy certificates, WS-Security signing and verification, hardened XML."""
