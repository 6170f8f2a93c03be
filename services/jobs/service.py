"""The job service's SOAP face: turns the messages of wsdl/jobs.wsdl into calls of the core
(services.jobs.manager) and its answers into messages. Authorization comes first in every operation
(the core's owner-or-admin rule), before a job key is even read."""
from __future__ import annotations

import time
from pathlib import Path

from lxml import etree

from services.common.xsdtime import format_datetime
from services.container.service import CallContext, SoapService, operation
from services.faults import AccessDenied, InvalidArgument
from services.jobs import wire
from services.jobs.config import JobsConfig
from services.jobs.manager import JobManager
from services.jobs.staging import JobTransfers, Stager, staging_area
from services.jobs.store import Job, JobState
from services.wsrf.epr import EndpointReference
from services.wsrf.lifetime import requested_termination, set_termination_time_response
from services.wsrf.namespaces import RL, RP
from services.wsrf.notification import ConsumerPolicy, Notifier, notify_envelope, parse_subscribe, subscribe_response
from services.wsrf.properties import parse_qname
from services.wsrf.resource import resource_key

J = wire.JOB


def _el(local: str, text: object | None = None) -> etree._Element:
    el = etree.Element(wire.q(local), nsmap={"job": J})
    if text is not None:
        el.text = str(text)
    return el


class JobService(SoapService):
    name = "JobService"
    wsdl = "jobs.wsdl"
    extra_understood_headers = frozenset({wire.KEY_TAG})

    def __init__(self, state_dir: Path, config: JobsConfig, *, credential=None, trust=None,
                 notifier: Notifier | None = None, consumer_policy: ConsumerPolicy | None = None):
        super().__init__(state_dir)
        self.config = config
        stager = (lambda staging: Stager(credential, trust, staging, config.staging_parallel)) if credential else None
        self.jobs = JobManager(self.state_dir, config, stager)
        self.jobs.listeners.append(self._notify)
        self.notifier = notifier
        self.consumer_policy = consumer_policy or ConsumerPolicy()
        self.transfers: JobTransfers | None = None
        self.log.info("job service for %s reconciled: %s", config.owner, self.jobs.reconcile_report)

    def attach_transfers(self, host: str, credential, trust, **server_options) -> None:
        """Give the service its GridFTP face ([jobs] gridftp_port): each job's directory for its submitter and the
        VO's admins to read (JobManager.may_fetch), each user's staging area for that user;
        ``server_options``: GridFTPFace's ([gridftp]'s bounds on sessions, the guests' DN patterns)."""
        self.transfers = JobTransfers(self.jobs.jobs_dir, self.jobs.staging_dir, self.config.gridftp_host or host,
                                      self.config.gridftp_port, credential, trust, public_host=self.config.public_host,
                                      may_read=self.jobs.may_fetch, may_use=self.jobs.may_use,
                                      staging_quota=self.config.staging_quota, **server_options)

    def start(self) -> None:
        if self.transfers is not None:
            self.transfers.start()
        self.jobs.start()

    def close(self) -> None:
        if self.transfers is not None:
            self.transfers.stop()
        if self.notifier is not None:
            self.notifier.close()
        self.jobs.close()

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def service_url(self) -> str:
        """This service's public URL, which the container binds it to (the EPRs' address)."""
        return self.address

    def _epr(self, key: str) -> EndpointReference:
        return EndpointReference.of(self.service_url, wire.KEY_TAG, key)

    def _job(self, ctx: CallContext, action: str) -> Job:
        """The job the request's JobKey header names, once the caller is known to be allowed at all."""
        self.jobs.check(ctx.dn, action)
        key = resource_key(ctx.headers, wire.KEY_TAG, "job")
        if not wire.KEY_PATTERN.fullmatch(key):    # headers are not schema-validated with the body
            raise InvalidArgument(f"{key[:80]!r} is not a job key (job-<32 hex digits>)", argument="JobKey")
        return self.jobs.job(ctx.dn, key, action)

    def _view(self, ctx: CallContext, job: Job, names: list[str]) -> wire.JobView:
        """What the properties ``names`` (Clark QNames) render for the caller: the output tails are read only when
        asked for, and only for the job's submitter or an admin (AccessDenied otherwise: what a job wrote is not
        every user's of the service); what the bounds did to the job (ResourceBounds) only when asked for."""
        url = f"{self.transfers.base_url}/jobs/{job.key}/" if self.transfers is not None else None
        tails = {which: self.jobs.tail(ctx.dn, job, which) if prop.qname in names else ""
                 for which, prop in (("stdout", wire.StdoutTail), ("stderr", wire.StderrTail))}
        bounds = self.jobs.resource_bounds(job) if wire.ResourceBounds.qname in names else None
        return wire.JobView(job, tails["stdout"], tails["stderr"], url, bounds)

    def _notify(self, job: Job, old: JobState, new: JobState) -> None:
        if self.notifier is None or not self.service_url:
            return
        now = time.time()
        bounds = None
        for s in self.jobs.subscriptions.of(job.key, 0.0 if job.final else now):
            if job.final and bounds is None:          # what the bounds did, with the job's end (read once)
                bounds = self.jobs.resource_bounds(job)
            message = wire.state_change(job.key, old.value, new.value, job.exit_code, now, bounds)
            self.notifier.send(s.consumer, notify_envelope(s.consumer, self._epr(job.key), "job:StateChange",
                                                           message, {"job": J}), owner=s.subscriber)
        if job.final:
            self.jobs.subscriptions.drop(job.key)

    # -- the factory -------------------------------------------------------------------------------------------
    @operation("SubmitJob")
    def submit_job(self, ctx, req):
        self.jobs.check(ctx.dn, "job.submit")
        if ctx.caller.limited:
            # what a limited proxy is for (Globus: GRAM refuses it): it moves data, it starts nothing
            raise AccessDenied(f"{ctx.dn} signed with a limited proxy, which cannot start a job (make a full proxy: "
                               f"vmgrid proxy-init without -limited)", subject=ctx.dn, action="job.submit",
                               resource="the job service", rule="limited-proxy-no-submit")
        proxy = (req.findtext("job:delegatedProxy", namespaces=wire.NS) or "").strip()
        job = self.jobs.submit(ctx.dn, wire.parse_submit(req), proxy.encode() if proxy else None)
        resp = _el("SubmitJobResponse")
        resp.append(wire.job_element(job, self._epr(job.key)))
        return resp

    @operation("ListJobs")
    def list_jobs(self, ctx, req):
        def flag(name: str) -> bool:
            return (req.findtext(f"job:{name}", namespaces=wire.NS) or "false").strip() in ("true", "1")

        bounds = flag("includeResourceBounds")      # asked for only: an older client is answered as before
        resp = _el("ListJobsResponse")
        for job in self.jobs.list(ctx.dn, include_ended=flag("includeEnded")):
            events = self.jobs.resource_bounds(job) if bounds and job.final else None
            resp.append(wire.job_element(job, self._epr(job.key), events))
        return resp

    @operation("GetServiceInfo")
    def get_service_info(self, ctx, req):
        self.jobs.check(ctx.dn, "job.info")
        resp = _el("GetServiceInfoResponse")
        etree.SubElement(resp, wire.q("instanceOwner")).text = self.config.owner
        if self.transfers is not None:
            etree.SubElement(resp, wire.q("gridftp")).text = self.transfers.base_url
        etree.SubElement(resp, wire.q("stagingDirectory")).text = f"/staging/{staging_area(ctx.dn)}/"
        for name in sorted(self.config.logs):
            etree.SubElement(resp, wire.q("log")).text = name
        return resp

    @operation("GetLog")
    def get_log(self, ctx, req):
        name = req.findtext("job:name", namespaces=wire.NS).strip()
        limit = int(req.findtext("job:maxBytes", namespaces=wire.NS) or 65536)
        size, truncated, text = self.jobs.read_log(ctx.dn, name, limit)
        resp = _el("GetLogResponse")
        for local, value in (("name", name), ("size", size), ("truncated", "true" if truncated else "false"),
                             ("text", wire.xml_text(text))):
            etree.SubElement(resp, wire.q(local)).text = str(value)
        return resp

    # -- a job ---------------------------------------------------------------------------------------------------
    @operation("Cancel")
    def cancel(self, ctx, req):
        job = self._job(ctx, "job.cancel")
        state = self.jobs.cancel(ctx.dn, job.key)
        resp = _el("CancelResponse")
        etree.SubElement(resp, wire.q("State")).text = state.value
        return resp

    @operation("RefreshJobProxy")
    def refresh_job_proxy(self, ctx, req):
        job = self._job(ctx, "job.refresh-proxy")
        proxy = (req.findtext("job:delegatedProxy", namespaces=wire.NS) or "").strip()
        expires = self.jobs.refresh_proxy(ctx.dn, job.key, proxy.encode())
        resp = _el("RefreshJobProxyResponse")
        etree.SubElement(resp, wire.q("proxyExpires")).text = format_datetime(expires)
        return resp

    @operation("Destroy")
    def destroy(self, ctx, req):
        job = self._job(ctx, "job.destroy")
        self.jobs.destroy(ctx.dn, job.key)
        return etree.Element(f"{{{RL}}}DestroyResponse", nsmap={"wsrf-rl": RL})

    @operation("SetTerminationTime")
    def set_termination_time(self, ctx, req):
        job = self._job(ctx, "job.set-lifetime")
        now = time.time()
        when = requested_termination(req, now)
        if when is None:
            raise InvalidArgument("a job always has a termination time; ask for a later one",
                                  argument="RequestedTerminationTime")
        return set_termination_time_response(self.jobs.set_termination(ctx.dn, job.key, when), now)

    @operation("GetResourceProperty")
    def get_resource_property(self, ctx, req):
        job = self._job(ctx, "job.read")
        return wire.JOB_PROPERTIES.get(self._view(ctx, job, [parse_qname(req)]), req)

    @operation("GetMultipleResourceProperties")
    def get_multiple_resource_properties(self, ctx, req):
        job = self._job(ctx, "job.read")
        names = [parse_qname(el) for el in req.iterfind(f"{{{RP}}}ResourceProperty")]
        return wire.JOB_PROPERTIES.get_multiple(self._view(ctx, job, names), req)

    @operation("Subscribe")
    def subscribe(self, ctx, req):
        job = self._job(ctx, "job.subscribe")
        request = parse_subscribe(req)
        self.jobs.subscriptions.check_caps(job.key, ctx.dn)     # the caps before the lookup: a refused one costs none
        self.consumer_policy.check(request.consumer, caller=ctx.dn)     # her own bound on lookups
        s = self.jobs.subscribe(ctx.dn, job.key, request.consumer, request.initial_termination)
        return subscribe_response(EndpointReference.of(self.service_url, wire.q("SubscriptionKey"), s.key),
                                  s.expires, nsmap={"job": J})
