"""The other node of a migration, over signed SOAP as the user (the proxy the client delegated to this node):
AcceptMigration and CompleteMigration. The SOAP face hands this to the node core (``peer_factory``)."""
from __future__ import annotations

from security.pki import Credential
from services.soapclient import GridServiceClient
from services.vmmanager import migration_wire
from services.vmmanager.values import MigrationOffer
from services.vmmanager.wire import NS, instance_epr


class SoapPeer:
    """The node at ``url``; ``connect_to``: the addresses the node's address policy checked its name against (every
    connection goes to one of them, the name is never resolved again; TLS checks the certificate for the name)."""

    def __init__(self, url: str, credential: Credential, trust, timeout: float, *,
                 connect_to: tuple[tuple[int, tuple], ...] | None = None):
        self.url = url
        self.credential = credential
        self.trust = trust
        self.timeout = timeout
        self.connect_to = connect_to
        self._service: GridServiceClient | None = None

    def _client(self) -> GridServiceClient:
        if self._service is None:
            client = GridServiceClient(self.url, self.credential, self.trust, connect_to=self.connect_to)
            client.zeep.transport.operation_timeout = self.timeout
            self._service = client
        return self._service

    def accept(self, offer: MigrationOffer):
        client = self._client()
        kwargs = migration_wire.accept_request(offer, client.to_zeep)
        if "sourceProof" in kwargs and not self._takes_proof(client):
            # a target of an earlier version: its contract has no sourceProof (it would refuse the element) and it
            # checks none; the offer goes as such a target knows it
            del kwargs["sourceProof"]
        return migration_wire.instance_of(client.call("AcceptMigration", **kwargs))

    def _takes_proof(self, client: GridServiceClient) -> bool:
        try:
            return "sourceProof" in {name for name, _ in
                                     client.zeep.get_element(f"{{{NS['vmm']}}}AcceptMigration").type.elements}
        except Exception:  # noqa: BLE001 - a contract we cannot read: sent (a target that checks needs it)
            return True

    def complete(self, key: str, commit: bool):
        resp = self._client().call("CompleteMigration", commit=commit,
                                   _soapheaders=[instance_epr(self.url, key).headers()[0]])
        return resp.findtext("vmm:outcome", namespaces=NS), migration_wire.instance_of(resp)

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
