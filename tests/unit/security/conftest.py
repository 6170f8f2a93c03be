"""The security tests' fixtures come from the grid PKI plugin (tests/fixtures/pki.py)."""
from tests.fixtures.pki import grid_pki, secured_echo_server  # noqa: F401
