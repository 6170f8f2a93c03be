"""The VMRepository grid service, its SOAP face: each operation parses the request into typed values
(:mod:`services.vmrepository.wire`), calls the registry core (:mod:`services.vmrepository.registry`,
which authorizes first and decides) and renders the result. Nothing is decided here."""
from __future__ import annotations

from pathlib import Path

from lxml import etree

from services.authz.pep import PolicyDecisionPoint
from services.container.service import CallContext, SoapService, operation
from services.vmrepository import wire
from services.vmrepository.config import RepositoryConfig
from services.vmrepository.registry import Registry
from services.wsrf.lifetime import Sweeper

__all__ = ["VMRepositoryService", "RepositoryConfig"]


class VMRepositoryService(SoapService):
    name = "VMRepositoryService"
    wsdl = "vmrepository.wsdl"

    def __init__(self, state_dir: Path, config: RepositoryConfig, pdp: PolicyDecisionPoint):
        super().__init__(state_dir)
        self.config = config
        self.registry = Registry(self.state_dir, config, pdp)
        self.transfers = None  # set by attach_transfers: the GridFTP server of the store
        self._upload_sweeper = None

    # the core's parts, as the tests and the GridFTP face reach them
    @property
    def catalogue(self):
        return self.registry.catalogue

    @property
    def store(self):
        return self.registry.store

    @property
    def upload_dir(self) -> Path:
        return self.registry.upload_dir

    @property
    def authz(self):
        return self.registry.authz

    def attach_transfers(self, host: str, credential, trust, public_host: str | None = None,
                         **server_options) -> None:
        """Serve the image store and the upload area over GridFTP (started with the container). The gsiftp:// URLs
        name [repository] gridftp_public_host, else ``public_host`` (the host certificate's name: what a client's
        host check expects), else the listening address. ``server_options``: its GridFTP server's ([gridftp]'s
        bounds on sessions, the guests' DN patterns)."""
        from services.vmrepository.transfer import RepositoryTransfers

        c = self.config
        self.transfers = RepositoryTransfers(self.registry, c.gridftp_host or host, max(c.gridftp_port, 0),
                                             credential, trust, c.gridftp_public_host or public_host or "",
                                             **server_options)
        self.registry.transfers = self.transfers

    def start(self) -> None:
        if self.transfers is not None:
            self.transfers.start()
        if self.config.upload_max_age > 0:
            # an upload is removed between upload_max_age and 1.25 x upload_max_age (at most an hour) after it
            self._upload_sweeper = Sweeper(self.registry.sweep_uploads, min(3600.0, self.config.upload_max_age / 4),
                                           name="vmgrid-upload-sweep").start()

    def close(self) -> None:
        if self._upload_sweeper is not None:
            self._upload_sweeper.stop()
        if self.transfers is not None:
            self.transfers.stop()
        self.registry.close()

    # -- operations: parse -> call the core -> render ---------------------------------------------------
    @operation("RegisterImage")
    def register_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.registered(self.registry.register(ctx.caller, wire.workspace(req), wire.source(req)))

    @operation("ImportImages")
    def import_images(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        # the container validated the request against the WSDL's schema, each descriptor against workspace.xsd
        return wire.imported(self.registry.import_images(ctx.caller, wire.workspaces(req), schema_checked=True))

    @operation("QueryImages")
    def query_images(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.query_response(self.registry.query(ctx.caller, wire.query(req)))

    @operation("GetDescriptor")
    def get_descriptor(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.descriptor_response(self.registry.get(ctx.caller, wire.image_ref(req)))

    @operation("DuplicateImage")
    def duplicate_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.duplicated(self.registry.duplicate(ctx.caller, wire.image_ref(req), wire.text(req, "repo:name"),
                                                       wire.changes(req)))

    @operation("UpdateDescriptor")
    def update_descriptor(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.updated(self.registry.update(ctx.caller, wire.image_ref(req), wire.workspace(req)))

    @operation("RemoveImage")
    def remove_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.removed(self.registry.remove(ctx.caller, wire.image_ref(req)))

    @operation("ListVOs")
    def list_vos(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.vos_response(self.registry.vos(ctx.caller))

    @operation("GetImageLocation")
    def get_image_location(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.location_response(self.registry.location(ctx.caller, wire.image_ref(req)))

    @operation("GetUploadLocation")
    def get_upload_location(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.upload_location_response(self.registry.upload_location(ctx.caller, wire.workspace(req)))

    @operation("HoldImage")
    def hold_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.hold_response(self.registry.hold(ctx.caller, *wire.hold_request(req)))

    @operation("ReleaseImage")
    def release_image(self, ctx: CallContext, req: etree._Element) -> etree._Element:
        return wire.released(self.registry.release(ctx.caller, wire.hold_id(req)))
