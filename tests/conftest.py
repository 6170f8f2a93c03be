"""Shared pytest configuration: fixtures every tier uses."""
