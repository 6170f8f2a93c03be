"""The VMManager grid service: the SOAP face of the node core (services.vmmanager.node). Each handler
parses the request (wire), calls one core operation, and renders the result (wire); nothing else."""
from __future__ import annotations

import time
from pathlib import Path

from lxml import etree

from services.authz.pep import PolicyDecisionPoint
from services.container.service import CallContext, SoapService, operation
from services.vmmanager import migration_wire, wire
from services.vmmanager.config import VMManagerConfig
from services.vmmanager.migration_peer import SoapPeer
from services.vmmanager.node import Node
from services.vmmanager.vmm import VMM
from services.wsrf.epr import EndpointReference
from services.wsrf.lifetime import requested_termination, set_termination_time_response
from services.wsrf.namespaces import RL
from services.wsrf.notification import Notifier, parse_subscribe, subscribe_response
from services.wsrf.resource import resource_key

__all__ = ["VMManagerService", "VMManagerConfig"]


class VMManagerService(SoapService):
    name = "VMManagerService"
    wsdl = "vmmanager.wsdl"
    extra_understood_headers = frozenset({wire.KEY_HEADER})

    def __init__(self, state_dir: Path, config: VMManagerConfig, pdp: PolicyDecisionPoint, *, vmm: VMM,
                 repository, notifier: Notifier | None = None, credential=None, trust=None,
                 gridftp_options: dict | None = None):
        super().__init__(state_dir)
        self.core = Node(self.state_dir, config, pdp, vmm=vmm, repository=repository, notifier=notifier,
                         state_change=wire.state_change_envelope, credential=credential, trust=trust,
                         peer_factory=SoapPeer, gridftp_options=gridftp_options)
        self.fragments = wire.InstanceFragments()   # listed instances' elements, kept while they do not change

    # the core's parts, for tests and tools that look inside a node
    config = property(lambda self: self.core.config)
    node = property(lambda self: self.core.node)
    store = property(lambda self: self.core.store)
    cache = property(lambda self: self.core.cache)
    vmm = property(lambda self: self.core.vmm)
    reconcile_report = property(lambda self: self.core.reconcile_report)
    authz = property(lambda self: self.core.authz)
    repository = property(lambda self: self.core.repository)
    instances_dir = property(lambda self: self.core.instances_dir)
    warm = property(lambda self: self.core.warm)

    @property
    def pool(self):
        return self.core.pool

    @pool.setter
    def pool(self, pool) -> None:   # tests narrow a node's address range
        self.core.pool = pool

    @property
    def service_url(self) -> str:
        return self.core.address

    def bind(self, address: str) -> None:
        super().bind(address)
        self.core.address = address

    def start(self) -> None:
        self.core.start()

    def close(self) -> None:
        self.core.close()

    def sweep(self, now: float | None = None) -> list[str]:
        return self.core.sweep(now)

    def reconcile(self) -> dict[str, int]:
        return self.core.reconcile()

    def _key(self, ctx: CallContext) -> str:
        return resource_key(ctx.headers, wire.KEY_HEADER, "instance")

    # -- the factory -------------------------------------------------------------------------------------
    @operation("Deploy")
    def deploy(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        view = self.core.deploy(ctx.caller, wire.parse_deploy(req))
        resp = wire.response("DeployResponse")
        resp.append(wire.instance_element(view, self.core.address))
        return resp

    @operation("ListInstances")
    def list_instances(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        include_ended, limit, cursor = wire.parse_list(req)
        page = self.core.list_page(ctx.caller, include_ended, limit=limit, cursor=cursor)
        return wire.list_response(page, self.core.address, self.fragments)

    # -- site administration ------------------------------------------------------------------------------
    @operation("ListDomains")
    def list_domains(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.domains_response(self.core.domains(ctx.caller))

    # -- control -------------------------------------------------------------------------------------------
    @operation("Start")
    def start_instance(self, ctx, req):
        return wire.state_response("StartResponse", self.core.start_instance(ctx.caller, self._key(ctx)))

    @operation("Pause")
    def pause(self, ctx, req):
        return wire.state_response("PauseResponse", self.core.pause(ctx.caller, self._key(ctx)))

    @operation("Resume")
    def resume(self, ctx, req):
        return wire.state_response("ResumeResponse", self.core.resume(ctx.caller, self._key(ctx)))

    @operation("Save")
    def save(self, ctx, req):
        return wire.state_response("SaveResponse", self.core.save(ctx.caller, self._key(ctx)))

    @operation("Restore")
    def restore(self, ctx, req):
        return wire.state_response("RestoreResponse",
                                   self.core.restore(ctx.caller, self._key(ctx), paused=wire.flag(req, "paused")))

    @operation("Shutdown")
    def shutdown(self, ctx, req):
        mode = req.findtext("vmm:mode", namespaces=wire.NS).strip()
        timeout = req.findtext("vmm:timeout", namespaces=wire.NS)
        state = self.core.shutdown(ctx.caller, self._key(ctx), mode, int(timeout) if timeout else None)
        return wire.state_response("ShutdownResponse", state)

    @operation("Destroy")
    def destroy(self, ctx, req):
        pending = self.core.destroy(ctx.caller, self._key(ctx))
        if pending:   # destroyed; the answer says what the central services have not taken yet (retried)
            ctx.reply_headers.append(wire.cleanup_pending_header(pending))
        return etree.Element(f"{{{RL}}}DestroyResponse", nsmap={"wsrf-rl": RL})

    @operation("SetTerminationTime")
    def set_termination_time(self, ctx, req):
        key = self._key(ctx)
        new = self.core.set_termination_time(ctx.caller, key, requested_termination(req, time.time()))
        return set_termination_time_response(new)

    # -- inspection -----------------------------------------------------------------------------------------
    @operation("GetResourceProperty")
    def get_resource_property(self, ctx, req):
        return wire.INSTANCE_PROPERTIES.get(self.core.inspect(ctx.caller, self._key(ctx)), req)

    @operation("GetMultipleResourceProperties")
    def get_multiple_resource_properties(self, ctx, req):
        return wire.INSTANCE_PROPERTIES.get_multiple(self.core.inspect(ctx.caller, self._key(ctx)), req)

    @operation("Subscribe")
    def subscribe(self, ctx, req):
        key = self._key(ctx)
        asked = parse_subscribe(req)
        sub = self.core.subscribe(ctx.caller, key, asked.consumer, asked.initial_termination)
        return subscribe_response(EndpointReference.of(self.core.address, wire.SUBSCRIPTION_KEY, sub.key),
                                  sub.expires, nsmap={"vmm": wire.VMM_NS})

    # -- migration -------------------------------------------------------------------------------------------
    @operation("Migrate")
    def migrate(self, ctx, req):
        target, mode, proxy = migration_wire.parse_migrate(req)
        there, phases_here = self.core.migrate(ctx.caller, self._key(ctx), target, mode, proxy)
        resp = wire.response("MigrateResponse")
        resp.append(migration_wire.add_phases(there, phases_here))
        return resp

    @operation("AcceptMigration")
    def accept_migration(self, ctx, req):
        view = self.core.accept_migration(ctx.caller, migration_wire.parse_accept(req))
        resp = wire.response("AcceptMigrationResponse")
        resp.append(wire.instance_element(view, self.core.address))
        return resp

    @operation("CompleteMigration")
    def complete_migration(self, ctx, req):
        outcome, view = self.core.complete_migration(ctx.caller, self._key(ctx), migration_wire.parse_complete(req))
        return migration_wire.complete_response(
            outcome, wire.instance_element(view, self.core.address) if view is not None else None)
