"""[vmmanager] of the TOML configuration: a light module, so loading a configuration imports no libvirt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class VMManagerConfig:
    """[vmmanager] in the TOML configuration (docs/configuration.md). What each number may be beyond its type (a
    new numeric key gets its rule there too): NUMBER_RULES in services/container/assemble.py, checked at start."""

    node: str = ""                       # this node's name ("" = the host name)
    vmm: Literal["test", "qemu"] = "test"  # test: libvirt's test driver; qemu: real guests (qemu:///embed)
    vmm_root: str = ""                   # qemu:///embed root ("" = <state_dir>/qemu)
    repository: str = ""                 # the VMRepository's URL (images are verified and staged from it)
    network: str = "10.99.0.0/24"        # the subnet the instances live on
    lease_range: str = "10.99.0.10-10.99.0.250"   # this node's addresses; nodes of one subnet: disjoint ranges
    gateway: str = "10.99.0.1"
    dns: list[str] = field(default_factory=list)
    mac_prefix: str = "52:54:00"
    nic_kind: Literal["user", "network", "bridge"] = "user"  # user (QEMU user-mode network), network or bridge
    nic_source: str = ""                 # the libvirt network or bridge for nic_kind network/bridge
    manage_bridge: bool = True           # nic_kind bridge: the node makes nic_source holding the gateway
    # nic_kind bridge: each guest's tap may send only as its own lease (MAC, IPv4 address, ARP), nothing else,
    # through nftables (services/vmmanager/guard.py); false lets any guest take another's address
    guard_guests: bool = True
    # and may send at most this many broadcast and multicast frames a second (a burst of twice that; 0: no bound)
    guard_broadcast_rate: int = 100
    kernel: str = ""                     # boot method "kernel": the node's kernel, initrd and command line
    initrd: str = ""
    cmdline: str = "console=ttyS0 root=/dev/vda rw"
    staging_parallel: int = 4            # GridFTP streams when staging an image
    staging_gsi: bool = False            # stage over AUTH GSSAPI (GSI) instead of AUTH TLS (docs/gridftp.md)
    deploy_workers: int = 8              # deployments staged and started at once
    sweep_interval: float = 1.0          # seconds between lifetime checks
    guest_ready_timeout: float = 180.0   # seconds to wait for guestd's ready report (real guests)
    warm_snapshots: bool = True          # deploy images whose descriptor allows it from a warm snapshot
    warm_restore_timeout: float = 30.0   # seconds guestd gets to take a warm clone's identity
    warm_spares: int = 2                 # copies of a warm snapshot's memory state made ahead of deploys (0: none)
    shutdown_timeout: int = 60           # default ACPI shutdown grace before forcing off
    hold_grace: int = 3600               # an image hold outlives the instance's lifetime by this much
    # seconds the node keeps its hold on an image after the image's last instance here ended, so the next
    # deployment of it asks the repository nothing; 0 gives it back with the last instance (docs/vmmanager.md)
    hold_linger: float = 10.0
    # seconds the repository's verdict on a descriptor (identity and image are the repository's) is reused
    # for the next deployments of that image; 0 asks at every deployment (docs/vmmanager.md)
    verdict_seconds: float = 30.0
    # Subscribe: consumer networks allowed besides the default (any http(s) address that is not this node's
    # loopback or link-local); e.g. ["127.0.0.0/8"] where clients listen on the nodes' own machine
    consumers_allow: list[str] = field(default_factory=list)
    notify_deadline: float = 10.0        # seconds for one notification delivery, connect to answer
    migration_timeout: float = 60.0      # seconds a node waits for the other node's answer during a migration
    # the port of the node's migration GridFTP face (the other nodes pull a migrating instance's files from it;
    # a site firewall opens it between its nodes): 0 = any free port (checked at start, docs/vmmanager.md)
    migration_port: int = 0
    migration_incoming_timeout: float = 900.0   # an Incoming instance whose source never commits is dropped then
    migration_prepare_timeout: float = 120.0    # a prepared Incoming instance whose files never come is dropped then
    migration_fixup_timeout: float = 30.0       # seconds guestd has to take the new address after a migration
    # hosts of the VMManager nodes whose instances this node takes in by migration (their saved memory
    # state is restored here: only nodes of the site); [] takes none, ["*"] any host with a grid host cert
    migration_sources: list[str] = field(default_factory=list)
    # the grid container in the guest (docs/jobs.md): the site CA (a `vmgrid ca` directory) that issues
    # its certificate over the guest channel; "" = no job service in guests
    guest_ca: str = ""
    guest_cert_dir: str = ""             # trusted CA files given to guests ("" = guest_ca's certificates/)
    guest_ou: str = "vmgrid-guests"      # their certificates: /O=Grid/OU=<guest_ou>/CN=host/<address>
    # DN patterns of guest containers' certificates, as the policy's [policy] guests (docs/authz.md): no migration
    # is taken in from a source presenting one, whatever migration_sources says (this node's guest_ou is always one)
    guest_dns: list[str] = field(default_factory=lambda: ["/O=Grid/OU=vmgrid-guests/*"])
    guest_cert_days: float = 30
    job_admins: list[str] = field(default_factory=list)   # DNs that may use every guest's job service
    list_page: int = 10                  # ListInstances: instances per page when the caller asks no maxResults

    def guest_patterns(self) -> list[str]:
        """The DN patterns of guest containers' certificates: ``guest_dns`` and this node's own ``guest_ou``
        (guestcred.is_guest; the services' GridFTP servers count them as users, and where guests have no rights,
        refuse them)."""
        return [*self.guest_dns, f"/O=Grid/OU={self.guest_ou}/*"]
