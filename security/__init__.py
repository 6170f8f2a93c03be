"""Grid security: PKI with proxy certificates, WS-Security signing and verification, hardened XML.

Modules: pki (CA, certificates, RFC 3820 proxies, Globus file conventions), trust (TrustStore, Caller), wssec
(sign_envelope / verify_envelope, WSS fault types), middleware (WSSecurityMiddleware), client (zeep GridWSSE,
GridTransport, grid_client), tls (cheroot SSL adapter, requests session), replay (replay caches), safexml.
"""
