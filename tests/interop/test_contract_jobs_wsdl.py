"""The job service's WSDL as a live container serves it (wsdl/jobs.wsdl and the schemas it imports, fetched from
the served URLs): it meets the WS-I Basic Profile 1.1 rules the other served WSDLs are held to
(tests/unit/contract/wsi.py), and suds-community (a SOAP stack no one here wrote) loads it and runs a job with it:
SubmitJob, GetResourceProperty with the signed JobKey header, a typed fault, Destroy."""
from __future__ import annotations

import ssl
import time
import urllib.request

import pytest
from lxml import etree

from security import safexml
from security.tls import grid_session
from security.wssec import sign_envelope, verify_envelope
from services.container.addressing import request_headers
from tests.interop.job_service import UNKNOWN_KEY
from tests.unit.contract import wsi

JOB = "http://vmgrid.org/ns/jobs/1"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]


def served_schemas(session, wsdl: etree._Element) -> dict[str, list[etree._Element]]:
    """Every schema the served WSDL imports, fetched from the schemaLocations it gives, with their imports."""
    schemas: dict[str, list[etree._Element]] = {}
    todo = [imp.get("schemaLocation") for imp in wsdl.iter(f"{{{wsi.XS}}}import")]
    seen = set()
    while todo:
        loc = todo.pop()
        if loc in seen:
            continue
        seen.add(loc)
        doc = etree.fromstring(session.get(loc, timeout=30).content)
        schemas.setdefault(doc.get("targetNamespace"), []).append(doc)
        todo += [i.get("schemaLocation") for i in doc.findall(f"{{{wsi.XS}}}import")]
    return schemas


def test_the_served_jobs_wsdl_conforms_to_ws_i_basic_profile(job_service):
    session = grid_session(job_service.pki.cert_dir)
    served = etree.fromstring(session.get(job_service.url + "?wsdl", timeout=30).content)
    schemas = served_schemas(session, served)
    assert JOB in schemas                                   # jobs.xsd, as served
    assert wsi.violations(served, schemas) == []
    address = served.find(".//{http://schemas.xmlsoap.org/wsdl/soap/}address").get("location")
    assert address.endswith("/wsrf/services/JobService")


def test_suds_loads_the_served_jobs_wsdl_and_runs_a_job(job_service):
    from suds import WebFault
    from suds.client import Client
    from suds.plugin import MessagePlugin
    from suds.transport.https import HttpAuthenticated

    pki = job_service.pki
    trust = pki.trust()
    actions = job_service.actions

    class Sign(MessagePlugin):
        """suds sends no WS-Addressing: the To and Action vmgrid requires are added, then everything signed
        (the JobKey header suds puts in, too: sign_envelope signs every header)."""
        operation = ""

        def sending(self, context):
            env = safexml.parse(context.envelope)
            header = env.find(f"{{{SOAP}}}Header")
            if header is None:
                header = etree.Element(f"{{{SOAP}}}Header")
                env.insert(0, header)
            header.extend(request_headers(job_service.url, actions[self.operation], f"urn:uuid:suds-{time.time_ns()}"))
            context.envelope = sign_envelope(env, pki.alice.proxy)

        def received(self, context):
            verify_envelope(context.reply, trust)

    class Transport(HttpAuthenticated):
        def u2handlers(self):
            return [urllib.request.HTTPSHandler(context=ssl.create_default_context(capath=str(pki.cert_dir)))]

    sign = Sign()
    client = Client(job_service.url + "?wsdl", transport=Transport(), plugins=[sign], cache=None,
                    location=job_service.url)
    methods = {m.name for p in client.wsdl.services[0].ports for m in p.methods.values()}
    assert {"SubmitJob", "GetResourceProperty", "Cancel", "Destroy"} <= methods

    def call(op, *args, key=None, **kwargs):
        sign.operation = op
        client.set_options(soapheaders=() if key is None else (_key_header(key),))
        return getattr(client.service, op)(*args, **kwargs)

    answer = call("SubmitJob", executable="/bin/echo", argument=["hello from suds"])
    key = next(p.text for p in etree.fromstring(client.last_received().str().encode()).iter(f"{{{JOB}}}JobKey"))
    assert answer.State in ("Pending", "StageIn", "Active", "Done")

    def state():
        return _state(client, call, key)

    for _ in range(200):
        if state() == "Done":
            break
        time.sleep(0.1)
    assert state() == "Done"

    with pytest.raises(WebFault) as fault:                   # typed: the detail is the declared fault element
        call("GetResourceProperty", "job:State", key=UNKNOWN_KEY)
    assert hasattr(fault.value.fault.detail, "ResourceUnknownFault")

    call("Destroy", key=key)


def _key_header(key: str):
    from suds.sax.element import Element
    el = Element("JobKey", ns=("job", JOB))
    el.setText(key)
    return el


def _state(client, call, key) -> str:
    call("GetResourceProperty", "job:State", key=key)
    reply = etree.fromstring(client.last_received().str().encode())
    return reply.findtext(f".//{{{JOB}}}State")
