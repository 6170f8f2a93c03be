"""Configuration of the Authorization service (``[authz]``) and of the enforcement points that call
it (``[enforcement]``), as sections of vmgrid's TOML configuration (docs/authz.md)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AuthzConfig:
    """[authz]: the Authorization service (``vmgrid serve authz``)."""

    policy: str = ""              # the policy file; "" = <state_dir>/authz/policy.toml, made from the default policy
    reload_interval: float = 2.0  # seconds between checks of the policy file (and its grid-mapfiles); 0 = only on
                                  # SIGHUP, ReloadPolicy or an admin change
    audit_log: str = ""           # the append-only decision log; "" = <state_dir>/authz/audit.log
    audit_fsync: bool = False     # fsync every audit record (admin changes and reloads are always fsynced)
    slot_grace: int = 600         # seconds an instance slot outlives the lifetime it was claimed for


@dataclass
class EnforcementConfig:
    """[enforcement]: how this container's services (the VMRepository, the VMManager) reach the
    Authorization service. With no ``authz_url`` they use the built-in ``[policy]`` section."""

    authz_url: str = ""           # e.g. https://authz.example.org:8443/wsrf/services/AuthorizationService
    permit_ttl: float = 5.0       # seconds a permit (and a subject's groups) is cached; denials never are
    timeout: float = 5.0          # seconds for one call; the operation is refused (fail closed) past it
    expected_host_dn: str = ""    # the service's host DN if it is not host/<hostname of authz_url>
