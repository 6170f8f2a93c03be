"""The job service on the wire: SubmitJob read into a JobSpec, a job's resource properties (one class
each, read back by the client with the same classes), the Job summary element, the state-change
notification. No decisions here: services.jobs.manager makes them."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from lxml import etree

from services.common.xsdtime import format_datetime, to_datetime
from services.jobs.bounds import BoundEvent
from services.jobs.store import Job, JobSpec, StageIn, StageOut
from services.wsrf.epr import EndpointReference
from services.wsrf.lifetime import CurrentTime, TerminationTime
from services.wsrf.namespaces import RL, WSA
from services.wsrf.properties import PropertySet, ResourceProperty, element, sub

JOB = "http://vmgrid.org/ns/jobs/1"
NS = {"job": JOB, "wsa": WSA, "wsrf-rl": RL}
KEY_TAG = f"{{{JOB}}}JobKey"
KEY_PATTERN = re.compile(r"job-[0-9a-f]{32}")
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """Text a program printed, made fit for XML (control characters become U+FFFD)."""
    return _NOT_XML.sub("\ufffd", text)


def q(local: str) -> str:
    return f"{{{JOB}}}{local}"


# -- SubmitJob -----------------------------------------------------------------------------------------------
def parse_submit(req: etree._Element) -> JobSpec:
    """A schema-valid job:SubmitJob element as a JobSpec."""
    def text(el, name):
        v = el.findtext(f"job:{name}", namespaces=NS)
        return v.strip() if v is not None else None

    lifetime = text(req, "lifetime")
    return JobSpec(
        executable=req.findtext("job:executable", namespaces=NS),
        arguments=tuple(a.text or "" for a in req.iterfind("job:argument", NS)),
        environment=tuple((text(e, "name"), e.findtext("job:value", default="", namespaces=NS))
                          for e in req.iterfind("job:environment", NS)),
        directory=text(req, "directory"), stdin=text(req, "stdin"),
        stdout=text(req, "stdout") or "stdout", stderr=text(req, "stderr") or "stderr",
        stage_in=tuple(StageIn(text(s, "source"), text(s, "name"), text(s, "sha256"))
                       for s in req.iterfind("job:stageIn", NS)),
        stage_out=tuple(StageOut(text(s, "name"), text(s, "destination"))
                        for s in req.iterfind("job:stageOut", NS)),
        lifetime=int(lifetime) if lifetime else None)


def submit_arguments(spec: JobSpec) -> dict:
    """A JobSpec as zeep keyword arguments of SubmitJob (the client's side)."""
    kwargs: dict = {"executable": spec.executable}
    if spec.arguments:
        kwargs["argument"] = list(spec.arguments)
    if spec.environment:
        kwargs["environment"] = [{"name": n, "value": v} for n, v in spec.environment]
    for name in ("directory", "stdin"):
        if getattr(spec, name):
            kwargs[name] = getattr(spec, name)
    if spec.stdout != "stdout":
        kwargs["stdout"] = spec.stdout
    if spec.stderr != "stderr":
        kwargs["stderr"] = spec.stderr
    if spec.stage_in:
        kwargs["stageIn"] = [{"source": s.source, "name": s.name, **({"sha256": s.sha256} if s.sha256 else {})}
                             for s in spec.stage_in]
    if spec.stage_out:
        kwargs["stageOut"] = [{"name": s.name, **({"destination": s.destination} if s.destination else {})}
                              for s in spec.stage_out]
    if spec.lifetime is not None:          # 0 too: the service refuses it, never reads it as its default
        kwargs["lifetime"] = spec.lifetime
    return kwargs


# -- a job's resource properties ------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobView:
    """What the properties render: the job's record and what the service reads for it on demand."""

    job: Job
    stdout_tail: str = ""
    stderr_tail: str = ""
    directory_url: str | None = None
    bounds: tuple[BoundEvent, ...] | None = None      # what the bounds did (ResourceBounds); None: nothing known

    @property
    def termination(self) -> float:
        return self.job.termination


class _Time(ResourceProperty):
    attr = ""

    def value(self, v: JobView):
        t = getattr(v.job, self.attr)
        return None if t is None else format_datetime(t)

    @classmethod
    def parse(cls, el):
        return to_datetime(el.text)


class State(ResourceProperty):
    qname = q("State")

    def value(self, v: JobView):
        return v.job.state.value


class Owner(ResourceProperty):
    qname = q("Owner")

    def value(self, v: JobView):
        return v.job.owner


class Executable(ResourceProperty):
    qname = q("Executable")

    def value(self, v: JobView):
        return xml_text(v.job.spec.executable)


class Arguments(ResourceProperty):
    qname = q("Arguments")

    def elements(self, v: JobView):
        el = element(self.qname)
        for a in v.job.spec.arguments:
            sub(el, q("argument"), xml_text(a))
        return [el]

    @classmethod
    def parse(cls, el):
        return [a.text or "" for a in el.iterfind("job:argument", NS)]


class ExitCode(ResourceProperty):
    qname = q("ExitCode")

    def value(self, v: JobView):
        return v.job.exit_code

    @classmethod
    def parse(cls, el):
        return int(el.text)


class Failure(ResourceProperty):
    qname = q("Failure")

    def value(self, v: JobView):
        return None if v.job.failure is None else xml_text(v.job.failure)


class Submitted(_Time):
    qname, attr = q("Submitted"), "submitted"


class Started(_Time):
    qname, attr = q("Started"), "started"


class Ended(_Time):
    qname, attr = q("Ended"), "ended"


class StdoutTail(ResourceProperty):
    qname = q("StdoutTail")

    def value(self, v: JobView):
        return xml_text(v.stdout_tail)


class StderrTail(ResourceProperty):
    qname = q("StderrTail")

    def value(self, v: JobView):
        return xml_text(v.stderr_tail)


class StagingProgress(ResourceProperty):
    qname = q("StagingProgress")

    def elements(self, v: JobView):
        p = v.job.progress or {}
        el = element(self.qname)
        for name in ("filesDone", "filesTotal", "bytesDone"):
            sub(el, q(name), int(p.get(name, 0)))
        if p.get("current"):
            sub(el, q("current"), xml_text(p["current"]))
        return [el]

    @classmethod
    def parse(cls, el):
        return {"filesDone": int(el.findtext("job:filesDone", namespaces=NS)),
                "filesTotal": int(el.findtext("job:filesTotal", namespaces=NS)),
                "bytesDone": int(el.findtext("job:bytesDone", namespaces=NS)),
                "current": el.findtext("job:current", namespaces=NS)}


class Outputs(ResourceProperty):
    qname = q("Outputs")

    def elements(self, v: JobView):
        el = element(self.qname)
        for o in v.job.outputs:
            f = sub(el, q("file"))
            sub(f, q("name"), o.name)
            sub(f, q("size"), o.size)
            sub(f, q("sha256"), o.sha256)
            if o.destination:
                sub(f, q("destination"), o.destination)
        return [el]

    @classmethod
    def parse(cls, el):
        return [(f.findtext("job:name", namespaces=NS), int(f.findtext("job:size", namespaces=NS)),
                 f.findtext("job:sha256", namespaces=NS), f.findtext("job:destination", namespaces=NS))
                for f in el.iterfind("job:file", NS)]


class CancelRequested(ResourceProperty):
    """true while a live job's accepted Cancel is carried out (its program being stopped, what it wrote being
    recorded); absent otherwise. Newer than the rest: a job service before it answers InvalidArgument when asked."""
    qname = q("CancelRequested")

    def value(self, v: JobView):
        return "true" if v.job.cancel_requested and not v.job.final else None

    @classmethod
    def parse(cls, el):
        return (el.text or "").strip() in ("true", "1")


class ResourceBounds(ResourceProperty):
    """What the service's bounds on the job's resources did to it (services/jobs/bounds.py), once its program has
    ended: one event each (none: nothing happened); absent while nothing is known (the program has not ended, or
    left no exit status). Newer than the rest: a job service before it answers InvalidArgument when asked."""
    qname = q("ResourceBounds")
    FIELDS = (("setting", "setting"), ("bound", "bound"), ("processesKilled", "processes_killed"),
              ("bytesDropped", "bytes_dropped"), ("forksRefused", "forks_refused"), ("unbounded", "unbounded"))

    def elements(self, v: JobView):
        if v.bounds is None:
            return []
        el = element(self.qname)
        for e in v.bounds:
            event = sub(el, q("event"))
            sub(event, q("resource"), e.resource)
            for local, attr in self.FIELDS:
                if getattr(e, attr) is not None:
                    sub(event, q(local), xml_text(str(getattr(e, attr))))
            sub(event, q("description"), xml_text(e.description))
        return [el]

    @classmethod
    def parse(cls, el):
        def number(text):       # a service's words: ASCII digits of a 64-bit count, else unknown (never a traceback)
            text = (text or "").strip()
            return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None

        events = []
        for e in el.iterfind("job:event", NS):
            values = {attr: e.findtext(f"job:{local}", namespaces=NS) for local, attr in cls.FIELDS}
            for attr in ("bound", "processes_killed", "bytes_dropped", "forks_refused"):
                values[attr] = number(values[attr])
            events.append(BoundEvent(e.findtext("job:resource", default="", namespaces=NS),
                                     e.findtext("job:description", default="", namespaces=NS), **values))
        return events


class DirectoryURL(ResourceProperty):
    qname = q("DirectoryURL")

    def value(self, v: JobView):
        return v.directory_url


JOB_PROPERTIES = PropertySet(
    [State(), Owner(), Executable(), Arguments(), ExitCode(), Failure(), Submitted(), Started(), Ended(),
     StdoutTail(), StderrTail(), StagingProgress(), Outputs(), DirectoryURL(), CancelRequested(), ResourceBounds(),
     TerminationTime(), CurrentTime()],
    what="a job")


def job_element(job: Job, epr: EndpointReference, bounds: tuple[BoundEvent, ...] | None = None) -> etree._Element:
    """job:Job (JobType): the job's EPR and its summary; with ``bounds`` (ListJobs' includeResourceBounds, a job
    whose program ended) its ResourceBounds last."""
    el = etree.Element(q("Job"), nsmap={"job": JOB, "wsa": WSA, "wsrf-rl": RL})
    el.append(epr.to_element())
    v = JobView(job, bounds=bounds)
    for prop in (State(), Owner(), Executable(), Submitted(), ExitCode(), Failure(), TerminationTime(),
                 ResourceBounds()):
        el.extend(prop.elements(v))
    return el


def state_change(key: str, old: str, new: str, exit_code: int | None, when: float | None = None,
                 bounds: tuple[BoundEvent, ...] | None = None) -> etree._Element:
    """job:StateChangeNotification, the message of a Notify; with ``bounds`` (the change to a final state of a job
    whose program ended) its ResourceBounds last."""
    el = etree.Element(q("StateChangeNotification"), nsmap={"job": JOB})
    sub(el, KEY_TAG, key)
    sub(el, q("oldState"), old)
    sub(el, q("newState"), new)
    sub(el, q("time"), format_datetime(time.time() if when is None else when))
    if exit_code is not None:
        sub(el, q("ExitCode"), exit_code)
    el.extend(ResourceBounds().elements(JobView(None, bounds=bounds)))     # none when ``bounds`` is None
    return el
