"""The host job service (wsdl/jobs.wsdl) in a real container on loopback, for the clients other SOAP stacks build
from its served WSDL: alice owns the instance, admin administers it, jobs run on this host under uids of their own
(as in tests/integration/test_jobs_service.py). `job_service` is the pytest fixture; each stack's test runs the
same scientist's steps (JOB_STEPS) and checks them with check_job_steps."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from services.container.assemble import build_container, build_service
from services.container.contract import Contract
from services.jobs.config import JobsConfig
from tests.fixtures.grid import base_config

# What the clients do, in this order: submit a small job, find it Done with exit code 0 in ListJobs (includeEnded)
# and read its properties (State, Outputs, CancelRequested: absent; ResourceBounds: present with no event, the bounds
# did nothing to it), submit a long one and cancel it (CancelRequested while it is being stopped), Cancel it
# again (IllegalTransitionFault), destroy both, then ask for a destroyed job (ResourceUnknownFault) and submit a job
# the schema refuses (InvalidArgumentFault).
JOB_STEPS = ["SubmitJob", "State", "ListJobs", "Outputs", "CancelRequestedAfterEnd", "ResourceBounds", "SubmitLongJob",
             "Cancel",
             "CancelRequested", "Cancelled", "IllegalTransitionFault", "Destroy", "DestroyLong",
             "ResourceUnknownFault", "InvalidArgumentFault"]
ECHO = ["/bin/echo", "hello from a job"]
ECHO_SHA256 = hashlib.sha256(b"hello from a job\n").hexdigest()
# a program that ignores SIGTERM: Cancel answers while it is being stopped (Active, CancelRequested true) and it ends
# Cancelled at SIGKILL, kill_grace later (unless Cancel came before the shell set its trap: Cancelled at once)
LONG = ["/bin/sh", "-c", "trap '' TERM; sleep 300"]
UNKNOWN_KEY = "job-" + "0" * 32


@dataclass
class JobService:
    pki: object
    url: str
    container: object

    @property
    def actions(self) -> dict[str, str]:
        """The wsa:Action (soapAction) of each operation of jobs.wsdl."""
        return {op.name: op.soap_action for op in Contract("jobs.wsdl").operations.values()}


@pytest.fixture
def job_service(grid_pki, tmp_path):
    cfg = base_config(grid_pki, tmp_path / "jobs-state", 0)
    cfg.jobs = JobsConfig(owner=grid_pki.alice.dn, admins=[grid_pki.admin.dn], gridftp_port=0, kill_grace=2.0,
                          consumer_allow=["127.0.0.0/8"],   # the SoapUI project subscribes a consumer on localhost
                          logs={"container": str(tmp_path / "container.log")})
    (tmp_path / "container.log").write_text("container started\n")
    container = build_container(cfg, [build_service("jobs", cfg)]).start()
    try:
        # the host certificate is host/localhost: the clients check the name
        yield JobService(grid_pki, container.url("JobService").replace("127.0.0.1", "localhost"), container)
    finally:
        container.stop()


def check_job_steps(steps: dict[str, dict], detail=lambda s: s["detail"]) -> None:
    """The answers a client reported for JOB_STEPS (each step's detail as the client reports it: a string)."""
    assert list(steps) == JOB_STEPS, steps
    assert all(s["ok"] for s in steps.values()), steps
    d = {name: detail(s) for name, s in steps.items()}
    assert d["SubmitJob"].startswith("job-") and len(d["SubmitJob"]) == 36
    assert d["State"] == "Done"
    assert d["ListJobs"] == "Done 0"
    # the job's standard output, listed with its size and sha256
    assert f"stdout {len('hello from a job') + 1} {ECHO_SHA256}" in d["Outputs"].split(";")
    assert d["CancelRequestedAfterEnd"] == "absent"
    assert d["ResourceBounds"] == "0 events"                # known (the program ended): no bound acted on it
    assert d["Cancel"] in ("Cancelled", "Active")            # Active: being stopped, its outputs recorded
    assert d["CancelRequested"] in ("true", "absent")        # absent: Cancelled already
    assert d["Cancelled"] == "Cancelled"
    assert d["IllegalTransitionFault"] == "IllegalTransitionFault"
    assert d["ResourceUnknownFault"] == "ResourceUnknownFault"
    assert d["InvalidArgumentFault"] == "InvalidArgumentFault"

