"""The authorization tests' grid PKI comes from the shared plugin (tests/fixtures/pki.py)."""
from tests.fixtures.pki import grid_pki  # noqa: F401
