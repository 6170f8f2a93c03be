"""services/wsrf: EPRs, the generic resource-property operations, lifetimes and notification records,
without HTTP."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import pytest
from lxml import etree

from services.common.xsdtime import format_datetime, format_duration, parse_datetime, parse_duration
from services.faults import InvalidArgument, ResourceUnknown
from services.sqlite import Database
from services.wsrf.epr import EndpointReference
from services.wsrf.lifetime import CurrentTime, Sweeper, TerminationTime, requested_termination, \
    set_termination_time_response
from services.wsrf.namespaces import RL, RP, WSA, WSNT, XPATH_DIALECT, XSI
from services.wsrf.notification import (ConsumerPolicy, Subscription, Subscriptions, notify_envelope,
                                        parse_subscribe, subscribe_response)
from services.wsrf.properties import PropertySet, ResourceProperty
from services.wsrf.resource import resource_key

T = "urn:test"


@dataclass
class Job:
    name: str
    state: str
    termination: float
    note: str | None = None


class Name(ResourceProperty[Job]):
    qname = f"{{{T}}}Name"

    def value(self, job):
        return job.name


class Note(ResourceProperty[Job]):
    qname = f"{{{T}}}Note"

    def value(self, job):
        return job.note


PROPS = PropertySet([Name(), Note(), TerminationTime(), CurrentTime()], what="a job", document=f"{{{T}}}Job")


def rp(tag: str, *qnames: str) -> etree._Element:
    el = etree.Element(f"{{{RP}}}{tag}", nsmap={"wsrf-rp": RP, "t": T, "wsrf-rl": RL})
    if tag == "GetResourceProperty":
        el.text = qnames[0]
    for q in qnames if tag != "GetResourceProperty" else ():
        etree.SubElement(el, f"{{{RP}}}ResourceProperty").text = q
    return el


def test_xsd_times_round_trip_and_bad_values_are_refused():
    ts = 1_790_000_000.25
    assert parse_datetime(format_datetime(ts)) == ts
    assert parse_duration("P1DT2H3M4.5S") == 86400 + 7200 + 180 + 4.5
    assert parse_duration(format_duration(90)) == 90
    for bad in ("P", "PT", "1H", "P1Y", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_datetime("yesterday")


def test_an_epr_round_trips_and_becomes_reference_headers():
    epr = EndpointReference.of("https://node1:8443/wsrf/services/X", f"{{{T}}}Key", "k-1")
    back = EndpointReference.from_element(epr.to_element())
    assert back == epr and back.parameter(f"{{{T}}}Key") == "k-1"
    (header,) = epr.headers()
    assert header.tag == f"{{{T}}}Key" and header.get(f"{{{WSA}}}IsReferenceParameter") == "true"
    assert resource_key([header], f"{{{T}}}Key") == "k-1"
    with pytest.raises(ResourceUnknown):
        resource_key([], f"{{{T}}}Key")


def test_properties_are_served_generically_and_read_back_by_the_same_names():
    job = Job("j1", "Running", time.time() + 60)
    one = PROPS.get(job, rp("GetResourceProperty", "t:Name"))
    assert Name.read(one) == "j1"
    many = PROPS.get_multiple(job, rp("GetMultipleResourceProperties", "t:Name", "t:Note", "wsrf-rl:TerminationTime"))
    assert Name.read(many) == "j1" and Note.read(many) is None          # no value: no element
    assert abs(TerminationTime.read(many).timestamp() - job.termination) < 1e-3
    with pytest.raises(InvalidArgument, match="a job has: CurrentTime, Name, Note, TerminationTime"):
        PROPS.get(job, rp("GetResourceProperty", "t:Nope"))
    with pytest.raises(InvalidArgument, match="prefix"):
        PROPS.get(job, rp("GetResourceProperty", "zz:Name"))


def test_query_resource_properties_evaluates_xpath_over_the_document():
    job = Job("j1", "Running", time.time() + 60, note="hello")
    req = etree.Element(f"{{{RP}}}QueryResourceProperties", nsmap={"wsrf-rp": RP})
    q = etree.SubElement(req, f"{{{RP}}}QueryExpression", Dialect=XPATH_DIALECT, nsmap={"t": T})
    q.text = "/t:Job/t:Note"
    assert Note.read(PROPS.query(job, req)) == "hello"
    q.text = "count(/t:Job/*) = 4"
    assert PROPS.query(job, req).text == "true"
    q.text = "/t:Job/["
    with pytest.raises(InvalidArgument):
        PROPS.query(job, req)
    q.set("Dialect", "urn:other")
    with pytest.raises(InvalidArgument, match="dialect"):
        PROPS.query(job, req)


def test_set_termination_time_reads_times_durations_and_nil():
    now = 1_790_000_000.0
    req = etree.Element(f"{{{RL}}}SetTerminationTime", nsmap={"wsrf-rl": RL, "xsi": XSI})
    etree.SubElement(req, f"{{{RL}}}RequestedLifetimeDuration").text = "PT30M"
    assert requested_termination(req, now) == now + 1800
    req[0].text = "thirty minutes"
    with pytest.raises(InvalidArgument):
        requested_termination(req, now)
    req.clear()
    t = etree.SubElement(req, f"{{{RL}}}RequestedTerminationTime")
    t.text = format_datetime(now + 5)
    assert requested_termination(req, now) == now + 5
    t.text = None
    t.set(f"{{{XSI}}}nil", "true")
    assert requested_termination(req, now) is None
    resp = set_termination_time_response(now + 5, now)
    assert parse_datetime(resp.findtext(f"{{{RL}}}NewTerminationTime")) == now + 5


def test_sweeper_calls_until_stopped():
    import threading

    seen = threading.Event()
    s = Sweeper(lambda now: seen.set(), 0.01).start()
    assert seen.wait(30)
    s.stop()


def test_consumer_policy_refuses_the_nodes_own_addresses_unless_configured():
    default = ConsumerPolicy()
    for url in ("http://127.0.0.1:9/x", "https://[::1]/x", "http://169.254.169.254/latest", "http://0.0.0.0/",
                "ftp://example.org/", "http:///x"):
        assert default.refusal(url), url
    assert default.refusal("https://192.0.2.10:8443/consumer") is None
    assert ConsumerPolicy(allow=("127.0.0.0/8",)).refusal("http://127.0.0.1:9/x") is None
    with pytest.raises(InvalidArgument):
        default.check("http://localhost:9/x")


def test_consumer_policy_sees_the_ipv4_address_an_ipv6_form_reaches():
    """A connection to ::ffff:127.0.0.1 reaches 127.0.0.1 (Python 3.11's is_loopback says False for it): the
    IPv4-mapped, IPv4-compatible, 6to4 and NAT64 forms of the node's own addresses are refused like the plain
    ones, and judged by the allowed networks as the address they reach."""
    default = ConsumerPolicy()
    for url in ("http://[::ffff:127.0.0.1]:9/x", "http://[::ffff:169.254.169.254]/latest", "http://[::127.0.0.1]/",
                "http://[2002:7f00:1::]/x", "http://[64:ff9b::a9fe:a9fe]/latest", "http://[::ffff:0.0.0.0]/"):
        assert default.refusal(url), url
    assert default.refusal("https://[::ffff:192.0.2.10]:8443/consumer") is None
    assert ConsumerPolicy(allow=("127.0.0.0/8",)).refusal("http://[::ffff:127.0.0.1]:9/x") is None
    with socket.socket(socket.AF_INET) as listener:        # what the refusal is about: the mapped form reaches IPv4
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(("::ffff:127.0.0.1", listener.getsockname()[1]), timeout=30):
            listener.accept()[0].close()


def test_subscribe_records_and_messages(tmp_path):
    req = etree.Element(f"{{{WSNT}}}Subscribe", nsmap={"wsnt": WSNT, "wsa": WSA})
    etree.SubElement(etree.SubElement(req, f"{{{WSNT}}}ConsumerReference"), f"{{{WSA}}}Address").text = "https://c/x"
    assert parse_subscribe(req).consumer == "https://c/x"
    req[0][0].text = "file:///etc/passwd"
    with pytest.raises(InvalidArgument):
        parse_subscribe(req)
    subs = Subscriptions(Database(tmp_path / "s.sqlite"))
    subs.add(Subscription("s1", "r1", "https://c/x", "/CN=a", 100.0))
    subs.add(Subscription("s2", "r1", "https://c/y", "/CN=a", 50.0))
    assert [s.key for s in subs.of("r1", 60.0)] == ["s1"]
    assert len(subs.of("r1", 0.0)) == 2
    subs.drop("r1")
    assert subs.of("r1", 0.0) == []
    epr = EndpointReference.of("https://n/x", f"{{{T}}}SubscriptionKey", "s1")
    resp = subscribe_response(epr, 100.0, 50.0)
    assert EndpointReference.from_element(resp.find(f"{{{WSNT}}}SubscriptionReference")) == epr
    env = notify_envelope("https://c/x", epr, "t:Changed", etree.Element(f"{{{T}}}Changed"), {"t": T})
    assert env.findtext(f".//{{{WSA}}}To") == "https://c/x"
    assert env.find(f".//{{{WSNT}}}Message/{{{T}}}Changed") is not None
