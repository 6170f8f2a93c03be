"""Helpers for the authorization tests: policies written from the default one, extra grid users, and a
site on loopback: the Authorization service and a VMRepository enforcing through it, each in its own
real container (cheroot, TLS, WS-Security), so either can be stopped and started again."""
from __future__ import annotations

import threading
from pathlib import Path

from client.localgrid import free_port
from security.pki import Credential, make_proxy, write_private, write_public
from services.authz.edit import site_policy
from services.authz.policy import Group, Limits
from services.container.assemble import build_container, build_service
from services.container.config import Config

DEFAULT_POLICY = Path(__file__).resolve().parents[3] / "services" / "authz" / "default-policy.toml"
_USERS: dict[str, object] = {}
_LOCK = threading.Lock()


def policy_text(*, admins: list[str] = (), groups: dict[str, dict] | None = None, limits: dict | None = None,
                rules_first: str = "", enforcement_points: list[str] | None = None) -> str:
    """The default policy with admins, groups (name -> members/admins/limits/gridmap), site limits,
    extra rules tried before the default ones, and enforcement points filled in."""
    text = site_policy(admins=admins, limits=limits, groups=[
        Group(name, tuple(g.get("members", ())), tuple(g.get("admins", ())), g.get("gridmap"),
              tuple(g.get("gridmap_accounts", ())), Limits(**g.get("limits", {})))
        for name, g in (groups or {}).items()])
    if enforcement_points is not None:
        eps = ", ".join(f'"{e}"' for e in enforcement_points)
        text = text.replace('enforcement_points = ["/O=Grid/*/CN=host/*"]', f"enforcement_points = [{eps}]", 1)
    if rules_first:
        first = text.index("[[rule]]")
        text = text[:first] + rules_first.strip() + "\n\n" + text[first:]
    return text


def grid_user(pki, name: str):
    """A user of the session's PKI beyond alice, bob and admin (issued once per process)."""
    with _LOCK:
        if name not in _USERS:
            _USERS[name] = pki.issue_user(name)
        return _USERS[name]


def limited_proxy(user) -> Credential:
    return make_proxy(user.credential, limited=True, hours=1)


class AuthzSite:
    """The Authorization service (and, with ``repository=True``, a VMRepository whose every operation it
    authorizes) in real containers bound to port 0 on loopback."""

    def __init__(self, pki, root: Path, policy: str, *, repository: bool = False, permit_ttl: float = 5.0,
                 timeout: float = 5.0, reload_interval: float = 0.2, restartable: bool = False):
        self.pki = pki
        self.root = Path(root)
        self.policy_path = self.root / "policy.toml"
        self.policy_path.parent.mkdir(parents=True, exist_ok=True)
        self.policy_path.write_text(policy)
        self.permit_ttl, self.timeout, self.reload_interval = permit_ttl, timeout, reload_interval
        self.authz = self.authz_service = None
        self.repo = self.repo_service = None
        # cheroot sets SO_REUSEADDR only on a non-zero port; a service that must come back on its address
        # (after connections to it sit in TIME_WAIT) starts on a free port picked here, not on port 0
        self.authz_port = free_port() if restartable else 0
        self.start_authz()
        if repository:
            self.start_repository()

    def config(self, name: str) -> Config:
        cfg = Config()
        cfg.container.port = 0
        cfg.container.state_dir = str(self.root / f"state-{name}")
        cfg.container.validate_responses = True
        cfg.security.cert_dir = str(self.pki.cert_dir)
        cfg.security.host_cert, cfg.security.host_key = self.host_files()
        cfg.authz.policy = str(self.policy_path)
        cfg.authz.reload_interval = self.reload_interval
        cfg.enforcement.permit_ttl = self.permit_ttl
        cfg.enforcement.timeout = self.timeout
        return cfg

    def host_files(self) -> tuple[str, str]:
        """This site's own copy of the session's host credential (other tests may reissue the shared files)."""
        cert, key = self.root / "host" / "hostcert.pem", self.root / "host" / "hostkey.pem"
        if not cert.exists():
            write_public(cert, self.pki.host.cert_pem())
            write_private(key, self.pki.host.key_pem())
        return str(cert), str(key)

    # -- the Authorization service ------------------------------------------------------------------
    def start_authz(self) -> None:
        """Start (or start again, on the same port) the Authorization service."""
        cfg = self.config("authz")
        self.authz_service = build_service("authz", cfg)
        self.authz = build_container(cfg, [self.authz_service], port=self.authz_port).start()
        self.authz_port = self.authz.port

    def stop_authz(self) -> None:
        if self.authz is not None:
            self.authz.stop()
            self.authz = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.authz_port}/wsrf/services/AuthorizationService"

    @property
    def authority(self):
        return self.authz_service.authority

    def client(self, credential: Credential):
        from services.authz.client import AuthorizationClient

        return AuthorizationClient.connect(self.url, credential, self.pki.trust())

    def pep(self, **kwargs):
        """A policy point as an enforcing service holds it (the host credential)."""
        from services.authz.client import ServicePolicyPoint

        kwargs.setdefault("permit_ttl", self.permit_ttl)
        kwargs.setdefault("timeout", self.timeout)
        return ServicePolicyPoint(self.url, self.pki.host, self.pki.trust(), **kwargs)

    # -- the VMRepository ---------------------------------------------------------------------------
    def start_repository(self) -> None:
        cfg = self.config("repository")
        cfg.enforcement.authz_url = self.url
        self.ingest_dir = self.root / "ingest"
        self.ingest_dir.mkdir(exist_ok=True)
        cfg.repository.ingest_dirs = [str(self.ingest_dir)]
        cfg.repository.gridftp_port = -1          # no GridFTP server: files are put in the upload area directly
        self.repo_service = build_service("repository", cfg)
        self.repo = build_container(cfg, [self.repo_service]).start()

    @property
    def repo_url(self) -> str:
        return self.repo.url("VMRepositoryService")

    def repository(self, credential: Credential):
        from client.repository import RepositoryClient
        from client.soap import GridServiceClient

        return RepositoryClient(GridServiceClient(self.repo_url, credential, self.pki.trust()))

    def upload(self, name: str, dn: str, data: bytes = b"\xeb\x3cvmgrid-test-raw-image" * 512) -> str:
        """Put an image file in ``dn``'s part of the repository's upload area (where its GridFTP upload lands)."""
        path = self.uploaded(name, dn)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return name

    def uploaded(self, name: str, dn: str) -> Path:
        try:
            from services.vmrepository.transfer import upload_area
            return self.repo_service.upload_dir / upload_area(dn) / name
        except ImportError:              # a repository without per-user upload areas
            return self.repo_service.upload_dir / name

    def close(self) -> None:
        for container in (self.repo, self.authz):
            if container is not None:
                container.stop()
        self.repo = self.authz = None


def descriptor(name: str, vo: str, *, memory: int = 256, vcpus: int = 1):
    """A valid raw-image descriptor (from wsdl/examples/sl4-blast.xml) with a new name and VO."""
    from services.container.contract import WSDL_DIR
    from services.descriptor import parse_descriptor, set_field

    ws = parse_descriptor((WSDL_DIR / "examples" / "sl4-blast.xml").read_bytes())
    set_field(ws, "identity", "name", name)
    set_field(ws, "identity", "vo", vo)
    set_field(ws, "hardware", "memory", str(memory))
    set_field(ws, "hardware", "vcpus", str(vcpus))
    return ws
