"""Shared pytest configuration: fixtures every tier uses (a grid PKI, a running VMRepository)."""

pytest_plugins = ["tests.fixtures.pki", "tests.fixtures.repository", "tests.fixtures.grid"]
