"""The VMRepository over real signed SOAP on loopback: every operation through zeep built from the
served WSDL, every response valid against the published schema, every fault typed and harmless."""
from __future__ import annotations

import copy

import pytest
from lxml import etree

from client.soap import GridServiceClient
from services.container.contract import Contract
from services.descriptor import Descriptor, parse_descriptor
from services.faults import (AccessDenied, BadQuery, ChecksumMismatch, DuplicateName, ImageInUse,
                             InvalidArgument, InvalidDescriptor, InvalidSource, UnknownImage)
from tests.fixtures.repository import EXAMPLES, signed_call

REPO = "http://vmgrid.org/ns/vmrepository/1"
WS = "http://vmgrid.org/ns/workspace/1"
CONTRACT = Contract("vmrepository.wsdl")
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"


def example(name: str = "debian12-emboss") -> bytes:
    return (EXAMPLES / f"{name}.xml").read_bytes()


def test_a_bulk_import_is_sent_in_the_envelope_it_was_built_in_on_a_second_connection(repo_server):
    """`vmgrid repo import`'s calls: a second client of the service on connections of its own reuses the WSDL the
    first parsed, and an ImportImages request is built inside the envelope that is signed and sent (no move of the
    whole request into an envelope, no zeep rendering)."""
    from client.repository import RepositoryClient

    pki = repo_server.pki
    ws = repo_server.client(pki.admin).register(example(), local_path=str(repo_server.image("bulk.qcow2")))
    alice = repo_server.client(pki.alice)
    other = alice.service.another()
    assert other.zeep.wsdl is alice.service.zeep.wsdl
    assert other.zeep.transport.session is not alice.service.zeep.transport.session
    variants = []
    for name in ("bulk-a", "bulk-b"):
        v = parse_descriptor(example())
        v.find(f"{{{WS}}}identity/{{{WS}}}name").text = name
        v.find(f"{{{WS}}}image").append(copy.deepcopy(ws.find(f"{{{WS}}}image/{{{WS}}}sha256")))
        variants.append(v)
    ids = RepositoryClient(other).import_images(variants, move=True)
    assert [Descriptor(alice.show(i)).name for i in ids] == ["bulk-a", "bulk-b"]
    request = variants[0].getparent()
    body, envelope = request.getparent(), request.getparent().getparent()
    assert request.tag == f"{{{REPO}}}ImportImages" and variants[1].getparent() is request
    assert body.nsmap.get("wsu") == WSU and envelope.tag == f"{{{SOAP_ENV}}}Envelope"
    signature = envelope.find(f"{{{SOAP_ENV}}}Header/{{{WSSE}}}Security/{{http://www.w3.org/2000/09/xmldsig#}}Signature")
    assert signature is not None and body.get(f"{{{WSU}}}Id") is not None     # this very Body was signed


class ValidatingClient:
    """Wraps GridServiceClient.call so every payload the service returns is checked against the schema."""

    def __init__(self, client: GridServiceClient):
        self.client = client
        self.seen: list[str] = []
        original = client.call

        def call(operation, **kwargs):
            payload = original(operation, **kwargs)
            CONTRACT.validator.assertValid(payload)
            self.seen.append(operation)
            return payload

        client.call = call


def test_every_operation_through_zeep_validates_against_the_published_schema(repo_server):
    pki = repo_server.pki
    admin, alice = repo_server.client(pki.admin), repo_server.client(pki.alice)
    checks = [ValidatingClient(admin.service), ValidatingClient(alice.service)]

    ws = admin.register(example(), local_path=str(repo_server.image("emboss.qcow2")))
    d = Descriptor(ws)
    assert d.image_id.startswith("img-") and d.owner == pki.admin.dn and len(d.sha256) == 64 and d.size > 0

    found = alice.query(["library emboss >= 6.6", "ram >= 256"])
    assert found.total == 1 and Descriptor(found.descriptors[0]).image_id == d.image_id
    by_xpath = alice.query(xpath="/ws:workspace/ws:software/ws:librarySignature/ws:library[ws:name='emboss']")
    assert [Descriptor(x).image_id for x in by_xpath.descriptors] == [d.image_id]

    shown = alice.show(f"bio/{d.name}")
    assert etree.tostring(shown, method="c14n") == etree.tostring(ws, method="c14n")

    dup = Descriptor(alice.duplicate(d.image_id, "emboss-big", memory=4096, vcpus=2,
                                     container_command="/opt/grid/bin/start --port 9000"))
    assert (dup.memory, dup.vcpus, dup.container_command) == (4096, 2, "/opt/grid/bin/start --port 9000")
    assert dup.sha256 == d.sha256 and dup.image_id != d.image_id and dup.owner == pki.alice.dn

    variant = parse_descriptor(example())
    variant.find(f"{{{WS}}}identity/{{{WS}}}name").text = "emboss-imported"
    variant.find(f"{{{WS}}}image").append(copy.deepcopy(ws.find(f"{{{WS}}}image/{{{WS}}}sha256")))
    (imported_id,) = alice.import_images([variant])
    imported = Descriptor(alice.show(imported_id))
    assert (imported.sha256, imported.size, imported.blake3) == (d.sha256, d.size, d.blake3)
    assert imported.owner == pki.alice.dn and imported.name == "emboss-imported"
    assert alice.remove(imported_id) is False

    changed = copy.deepcopy(alice.show(dup.image_id))
    changed.find(f"{{{WS}}}identity/{{{WS}}}description").text = "EMBOSS with more memory"
    updated = Descriptor(alice.update(dup.image_id, changed))
    assert updated.description == "EMBOSS with more memory" and updated.image_id == dup.image_id

    assert alice.vos() == [("bio", 2)]
    location = alice.service.call("GetImageLocation", image=d.image_id)
    assert location.findtext(f"{{{REPO}}}url").endswith(f"/images/{d.sha256}")
    assert location.findtext(f"{{{REPO}}}url").startswith("gsiftp://")
    upload = alice.service.call("GetUploadLocation").findtext(f"{{{REPO}}}url")
    assert upload.startswith("gsiftp://") and "/uploads/" in upload
    hold_id, expires = alice.hold(dup.image_id, "https://node1/wsrf/services/VMManagerService#inst-1", 60)
    with pytest.raises(ImageInUse) as held:
        alice.remove(dup.image_id)
    assert held.value.holder == ["https://node1/wsrf/services/VMManagerService#inst-1"]
    assert "a node gives its hold back once its last instance of the image has ended" in str(held.value)
    assert alice.release(hold_id) is True
    assert alice.remove(dup.image_id) is False          # the original still uses the bytes
    assert repo_server.service.store.exists(d.sha256)
    assert admin.remove(d.image_id) is True              # the last reference: bytes deleted
    assert not repo_server.service.store.exists(d.sha256)

    assert set(checks[0].seen) | set(checks[1].seen) == set(CONTRACT.operations)


@pytest.fixture
def populated(repo_server):
    admin = repo_server.client(repo_server.pki.admin)
    ws = admin.register(example(), local_path=str(repo_server.image("base.qcow2")))
    return repo_server, admin, Descriptor(ws)


def _invalid_descriptor_request(image_path: str) -> etree._Element:
    desc = parse_descriptor(example())
    desc.find(f"{{{WS}}}hardware/{{{WS}}}memory").text = "lots"
    req = etree.Element(f"{{{REPO}}}RegisterImage", nsmap={"repo": REPO})
    req.append(desc)
    etree.SubElement(etree.SubElement(req, f"{{{REPO}}}source"), f"{{{REPO}}}localPath").text = image_path
    return req


def test_an_invalid_descriptor_is_a_typed_fault_with_the_line(populated):
    server, admin, _ = populated
    before = server.snapshot()
    status, fault = signed_call(server.url, _invalid_descriptor_request(str(server.image("x.qcow2"))),
                                server.pki.admin.proxy, server.pki.trust())
    assert status == 500 and fault.tag.endswith("Fault")
    detail = fault.find("detail")[0]
    assert etree.QName(detail).localname == "InvalidDescriptorFault"
    line = int(detail.findtext("{http://vmgrid.org/ns/faults/1}line"))
    pretty = etree.tostring(_invalid_descriptor_request("")[0], pretty_print=True).decode().splitlines()
    assert "<memory>lots</memory>" in pretty[line - 1]
    assert "lots" in detail.findtext("{http://vmgrid.org/ns/faults/1}schemaMessage")
    assert server.snapshot() == before


@pytest.mark.parametrize("case", [
    "unknown-image", "duplicate-name", "bad-field", "bad-number", "bad-version", "bad-regex", "bad-xpath", "bad-order",
    "held", "checksum", "size", "outside-ingest", "missing-file", "format-mismatch", "given-image-id",
    "other-vo-read", "other-owner-remove", "member-local-ingest", "foreign-update", "bad-ref", "hold-too-long",
    "member-hold", "unknown-hold",
])
def test_each_fault_is_typed_and_leaves_the_store_unchanged(populated, case):
    server, admin, d = populated
    pki = server.pki
    alice, bob = server.client(pki.alice), server.client(pki.bob)
    if case == "held":
        admin.hold(d.image_id, "node-a", 60)
    good_image = str(server.image("another.qcow2"))
    before = server.snapshot()
    with_sha = parse_descriptor(example("debian12-emboss-bigmem"))
    etree.SubElement(with_sha.find(f"{{{WS}}}image"), f"{{{WS}}}sha256").text = "0" * 64
    with_size = parse_descriptor(example("debian12-emboss-bigmem"))
    etree.SubElement(with_size.find(f"{{{WS}}}image"), f"{{{WS}}}size").text = "1"
    raw_desc = example("sl4-blast")
    with_id = parse_descriptor(example("debian12-emboss-bigmem"))
    with_id.find(f"{{{WS}}}identity/{{{WS}}}name").addnext(etree.Element(f"{{{WS}}}imageId"))
    with_id.find(f"{{{WS}}}identity/{{{WS}}}imageId").text = "img-" + "a" * 32
    foreign = parse_descriptor(example())
    foreign.find(f"{{{WS}}}identity/{{{WS}}}vo").text = "hep"
    expected, call = {
        "unknown-image": (UnknownImage, lambda: alice.show("bio/no-such-image")),
        "duplicate-name": (DuplicateName, lambda: admin.register(example(), local_path=good_image)),
        "bad-field": (BadQuery, lambda: alice.query(["colour = blue"])),
        "bad-number": (BadQuery, lambda: alice.query(["ram >= lots"])),
        "bad-version": (BadQuery, lambda: alice.query(["library emboss >= six"])),
        "bad-regex": (BadQuery, lambda: alice.query(["name matches (unclosed"])),
        "bad-xpath": (BadQuery, lambda: alice.query(xpath="/ws:workspace[")),
        "bad-order": (BadQuery, lambda: alice.query(order_by="colour")),
        "held": (ImageInUse, lambda: admin.remove(d.image_id)),
        "checksum": (ChecksumMismatch, lambda: admin.register(with_sha, local_path=good_image)),
        "size": (ChecksumMismatch, lambda: admin.register(with_size, local_path=good_image)),
        "outside-ingest": (InvalidSource, lambda: admin.register(example("debian12-emboss-bigmem"),
                                                                 local_path="/etc/passwd")),
        "missing-file": (InvalidSource, lambda: admin.register(example("debian12-emboss-bigmem"),
                                                               local_path=str(server.ingest_dir / "nope.qcow2"))),
        "format-mismatch": (InvalidDescriptor, lambda: admin.register(raw_desc, local_path=good_image)),
        "given-image-id": (InvalidDescriptor, lambda: admin.register(with_id, local_path=good_image)),
        "other-vo-read": (AccessDenied, lambda: bob.show(d.image_id)),
        "other-owner-remove": (AccessDenied, lambda: alice.remove(d.image_id)),
        "member-local-ingest": (AccessDenied, lambda: alice.register(example("debian12-emboss-bigmem"),
                                                                     local_path=good_image)),
        "foreign-update": (InvalidDescriptor, lambda: admin.update(d.image_id, foreign)),
        "bad-ref": (InvalidArgument, lambda: alice.show("no-slash-no-id")),
        "hold-too-long": (InvalidArgument, lambda: admin.hold(d.image_id, "node", 10**9)),
        "member-hold": (AccessDenied, lambda: alice.hold(d.image_id, "node", 60)),   # not her image
        "unknown-hold": (InvalidArgument, lambda: alice.release("hold-nope")),
    }[case]
    with pytest.raises(expected) as raised:
        call()
    assert raised.value.description
    assert server.snapshot() == before


def test_queries_see_only_the_callers_vos(populated):
    server, admin, d = populated
    admin.register(example("debian12-hep"), local_path=str(server.image("hep.qcow2")))
    alice, bob = server.client(server.pki.alice), server.client(server.pki.bob)
    assert [Descriptor(x).vo for x in alice.query().descriptors] == ["bio"]
    assert [Descriptor(x).vo for x in bob.query().descriptors] == ["hep"]
    assert [Descriptor(x).vo for x in bob.query(xpath="true()").descriptors] == ["hep"]
    assert bob.vos() == [("hep", 1)]


def test_results_are_ordered_and_paged(repo_server):
    admin, alice = repo_server.client(repo_server.pki.admin), repo_server.client(repo_server.pki.alice)
    base = Descriptor(admin.register(example(), local_path=str(repo_server.image("p.qcow2"))))
    for i, mem in enumerate([1024, 768, 2048, 256]):
        admin.duplicate(base.image_id, f"copy-{i}", memory=mem)
    page1 = alice.query(order_by="memory", descending=True, limit=2)
    page2 = alice.query(order_by="memory", descending=True, limit=2, offset=2)
    page3 = alice.query(order_by="memory", descending=True, limit=2, offset=4)
    mems = [Descriptor(x).memory for p in (page1, page2, page3) for x in p.descriptors]
    assert page1.total == page2.total == page3.total == 5
    assert mems == [2048, 1024, 768, 512, 256]


def test_suds_loads_the_wsdl_and_runs_a_query(populated):
    """suds-community (a SOAP stack no one here wrote) with WS-Security applied in its message plugin."""
    from suds.client import Client
    from suds.plugin import MessagePlugin

    from security.wssec import sign_envelope, verify_envelope
    from security import safexml

    server, _, d = populated
    pki = server.pki
    trust = pki.trust()

    class Sign(MessagePlugin):
        def marshalled(self, context):
            pass

        def sending(self, context):
            # suds sends no WS-Addressing: add the To and Action every vmgrid service requires, then sign
            from services.container.addressing import request_headers

            env = safexml.parse(context.envelope)
            header = env.find("{http://schemas.xmlsoap.org/soap/envelope/}Header")
            if header is None:
                header = etree.Element("{http://schemas.xmlsoap.org/soap/envelope/}Header")
                env.insert(0, header)
            header.extend(request_headers(server.url, "http://vmgrid.org/ns/vmrepository/1/QueryImages",
                                          "urn:uuid:suds"))
            context.envelope = sign_envelope(env, pki.alice.proxy)

        def received(self, context):
            verify_envelope(context.reply, trust)

    from suds.transport.https import HttpAuthenticated

    class Transport(HttpAuthenticated):
        def u2handlers(self):
            import ssl
            import urllib.request
            ctx = ssl.create_default_context(capath=str(pki.cert_dir))
            return [urllib.request.HTTPSHandler(context=ctx)]

    client = Client(server.url + "?wsdl", transport=Transport(), plugins=[Sign()], cache=None)
    crit = client.factory.create("{http://vmgrid.org/ns/vmrepository/1}CriterionType")
    crit.field, crit.operator, crit.value = "library.emboss", ">=", "6.6"
    group = client.factory.create("{http://vmgrid.org/ns/vmrepository/1}CriteriaGroupType")
    group.criterion = [crit]
    criteria = client.factory.create("{http://vmgrid.org/ns/vmrepository/1}CriteriaType")
    criteria.group = [group]
    result = client.service.QueryImages(criteria=criteria)
    assert result.total == 1
    assert result.workspace[0].identity.imageId == d.image_id
