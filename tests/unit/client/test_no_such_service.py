"""A URL that names no service (HTTP 404 for its WSDL) is one line saying which variable or option names that
service, and whether the built-in default was used because neither was given (the README's central container on
8443 has no VMManagerService: with VMGRID_NODE unset, every vm command met a bare 'HTTP 404')."""
from __future__ import annotations

from client.commands_repo import DEFAULT_REPOSITORY, no_such_service
from client.commands_vm import DEFAULT_NODE


def test_the_default_node_url_with_vmgrid_node_unset_says_so(monkeypatch):
    monkeypatch.delenv("VMGRID_NODE", raising=False)
    text = no_such_service(DEFAULT_NODE)
    assert text == (f"no service answers at {DEFAULT_NODE} (HTTP 404 for its WSDL): $VMGRID_NODE is not set, so the "
                    f"default URL was used: give the VMManagerService's URL with --url (--node for job commands) "
                    f"or set $VMGRID_NODE")


def test_a_url_given_is_named_to_check(monkeypatch):
    monkeypatch.setenv("VMGRID_REPOSITORY", "https://repo.example.org:9443/wsrf/services/VMRepositoryService")
    assert no_such_service(DEFAULT_REPOSITORY).endswith(
        "check the VMRepositoryService's URL ($VMGRID_REPOSITORY, --url)")
    monkeypatch.delenv("VMGRID_NODE", raising=False)
    other = "https://localhost:9999/wsrf/services/VMManagerService"
    assert "is not set" not in no_such_service(other) and "check the VMManagerService's URL" in no_such_service(other)
    assert no_such_service("https://localhost:1/wsrf/services/Unknown").endswith("check the service's URL")
