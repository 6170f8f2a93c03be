"""The job service's wire conversion and GridFTP face rules, without a container: SubmitJob read back
as the JobSpec the client sent, properties valid against the published schema whatever a program
prints, and who may touch which path on the face."""
from __future__ import annotations

import time

import pytest
from lxml import etree

from services.container.contract import Contract
from services.jobs import wire
from services.jobs.staging import JobTransfers, staging_area
from services.jobs.store import Job, JobSpec, JobState, OutputFile, StageIn, StageOut
from services.wsrf.epr import EndpointReference
from services.wsrf.namespaces import RP

CONTRACT = Contract("jobs.wsdl")
OWNER, ADMIN, OTHER = "/O=Grid/CN=alice", "/O=Grid/CN=admin", "/O=Grid/CN=bob"


def test_a_submit_request_reads_back_as_the_spec_the_client_sent():
    spec = JobSpec("needle", ("-asequence", "a.fasta", ""), (("EMBOSS_DATA", "/usr/share/EMBOSS"),), "work",
                   "in.txt", "out.txt", "err.txt", (StageIn("staged:a.fasta", "work/a.fasta", "a" * 64),
                                                    StageIn("gsiftp://h:2811/b.fasta", "b.fasta")),
                   (StageOut("work/x.needle"), StageOut("plot.png", "gsiftp://h:2811/results/plot.png")), 3600)
    req = etree.Element(wire.q("SubmitJob"), nsmap={"job": wire.JOB})
    kwargs = wire.submit_arguments(spec)
    for name in ("executable", "argument", "environment", "directory", "stdin", "stdout", "stderr", "stageIn",
                 "stageOut", "lifetime"):
        values = kwargs.get(name)
        for value in values if isinstance(values, list) else ([values] if values is not None else []):
            el = etree.SubElement(req, wire.q(name))
            if isinstance(value, dict):
                for k, v in value.items():
                    etree.SubElement(el, wire.q(k)).text = str(v)
            else:
                el.text = str(value)
    CONTRACT.validator.assertValid(req)
    assert wire.parse_submit(req) == spec


def test_a_lifetime_of_0_is_sent_and_refused_by_the_schema_never_dropped_into_the_default():
    """A client that dropped lifetime 0 had the job live the service's default (24 h) instead of being told."""
    for lifetime in (0, -5):
        assert wire.submit_arguments(JobSpec("true", lifetime=lifetime))["lifetime"] == lifetime
        req = etree.Element(wire.q("SubmitJob"), nsmap={"job": wire.JOB})
        etree.SubElement(req, wire.q("executable")).text = "true"
        etree.SubElement(req, wire.q("lifetime")).text = str(lifetime)
        with pytest.raises(etree.DocumentInvalid):
            CONTRACT.validator.assertValid(req)
    assert "lifetime" not in wire.submit_arguments(JobSpec("true"))


def test_properties_are_schema_valid_whatever_the_program_printed():
    job = Job("job-" + "ab" * 16, OWNER, JobState.FAILED, JobSpec("prog", ("\x1b[31m", "x")), time.time(),
              time.time() + 60, time.time(), time.time(), -9, "killed \x00 by signal 9",
              outputs=(OutputFile("stdout", 12, "c" * 64),), progress={"filesDone": 1, "filesTotal": 2,
                                                                       "bytesDone": 10, "current": "a"})
    view = wire.JobView(job, "\x1b[1mbold\x00\x07 text\n", "\ufffe\x01", "gsiftp://h:2812/jobs/k/")
    resp = etree.Element(f"{{{RP}}}GetMultipleResourcePropertiesResponse", nsmap={"wsrf-rp": RP})
    resp.extend(wire.JOB_PROPERTIES.all(view))
    CONTRACT.validator.assertValid(resp)
    assert wire.StdoutTail.read(resp) == "\ufffd[1mbold\ufffd\ufffd text\n"
    assert wire.ExitCode.read(resp) == -9 and wire.Outputs.read(resp) == [("stdout", 12, "c" * 64, None)]
    summary = wire.job_element(job, EndpointReference.of("https://h/wsrf/services/JobService", wire.KEY_TAG, job.key))
    listing = etree.Element(wire.q("ListJobsResponse"), nsmap={"job": wire.JOB})
    listing.append(summary)
    CONTRACT.validator.assertValid(listing)


def test_the_gridftp_face_lets_a_jobs_submitter_and_the_admins_read_it_and_each_write_only_their_staging_area():
    owners = {"job-1": OWNER, "job-2": ADMIN}
    face = JobTransfers.__new__(JobTransfers)
    face.may_read = lambda dn, key: key in owners and dn in (owners[key], ADMIN)     # JobManager.may_fetch's rule
    face.may_use = lambda dn: dn in (OWNER, ADMIN)
    mine, theirs = staging_area(OWNER), staging_area(ADMIN)
    assert face.authorize(OWNER, "read", "/jobs/job-1/out.txt") and face.authorize(OWNER, "list", "/jobs/job-1")
    assert face.authorize(ADMIN, "read", "/jobs/job-1/out.txt") and face.authorize(ADMIN, "list", "/jobs/job-1")
    assert not face.authorize(OWNER, "write", "/jobs/job-1/out.txt")      # outputs are not rewritten
    assert not face.authorize(ADMIN, "write", "/jobs/job-1/out.txt")      # by an admin neither
    assert not face.authorize(OWNER, "read", "/jobs/job-2/out.txt")       # the job's submitter and the admins only
    assert not face.authorize(OWNER, "read", "/jobs/job-9/x")
    assert face.authorize(OWNER, "write", f"/staging/{mine}/a.fasta")
    assert not face.authorize(OWNER, "read", f"/staging/{theirs}/a.fasta")
    assert not face.authorize(OTHER, "write", f"/staging/{staging_area(OTHER)}/a")   # not a user of this VM
    assert not face.authorize(None, "read", "/jobs/job-1/out.txt")
    assert not face.authorize(OWNER, "list", "/")


def live_job(cancel_requested: bool) -> Job:
    now = time.time()
    return Job("job-" + "cd" * 16, OWNER, JobState.ACTIVE, JobSpec("prog"), now, now + 60, now,
               cancel_requested=cancel_requested)


def test_a_job_being_cancelled_says_so_in_a_schema_valid_property_and_only_then():
    for requested in (True, False):
        resp = etree.Element(f"{{{RP}}}GetMultipleResourcePropertiesResponse", nsmap={"wsrf-rp": RP})
        resp.extend(wire.JOB_PROPERTIES.all(wire.JobView(live_job(requested))))
        CONTRACT.validator.assertValid(resp)
        assert (resp.find(wire.CancelRequested.qname) is not None) == requested
        assert wire.CancelRequested.read(resp, False) is requested and wire.State.read(resp) == "Active"
    answer = etree.Element(wire.q("CancelResponse"), nsmap={"job": wire.JOB})
    etree.SubElement(answer, wire.q("State")).text = "Active"          # Cancel's answer while it is carried out
    CONTRACT.validator.assertValid(answer)


def test_the_client_reads_a_job_service_from_before_cancel_requested():
    """A guest image built before CancelRequested has a job service that refuses the name (InvalidArgument): the
    client asks again without it rather than failing every `vmgrid job status`."""
    from services.faults import InvalidArgument
    from services.jobs.client import JobClient
    from services.wsrf.properties import PropertySet

    older = PropertySet([p for p in wire.JOB_PROPERTIES.properties if not isinstance(p, wire.CancelRequested)],
                        what="a job")
    asked = []

    class OlderService:                     # answers as that service's PropertySet does
        url = "https://guest.example.org:8443/wsrf/services/JobService"

        def call(self, operation, *args, ResourceProperty=(), _soapheaders=None):
            asked.append([str(n) for n in ResourceProperty])
            resp = etree.Element(f"{{{RP}}}GetMultipleResourcePropertiesResponse", nsmap={"wsrf-rp": RP})
            for name in ResourceProperty:
                resp.extend(older.values(wire.JobView(live_job(False)), str(name)))
            return resp

    info = JobClient(OlderService()).status("job-" + "cd" * 16)
    assert (info.state, info.cancel_requested, info.executable) == ("Active", False, "prog")
    assert wire.CancelRequested.qname in asked[0] and wire.CancelRequested.qname not in asked[1]

    class Refusing(OlderService):             # any other refusal is the caller's, not asked again
        def call(self, operation, *args, **kwargs):
            asked.append("refused")
            raise InvalidArgument("'job-x' is not a job key (job-<32 hex digits>)", argument="JobKey")

    asked.clear()
    with pytest.raises(InvalidArgument, match="not a job key"):
        JobClient(Refusing()).status("job-" + "cd" * 16)
    assert asked == ["refused"]
