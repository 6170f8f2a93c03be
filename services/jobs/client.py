"""A job service from the scientist's side: submit (uploading local inputs to the service's GridFTP
face first), follow, cancel, and fetch the outputs verified by the sha256 the service recorded."""
from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from lxml import etree

from gridftp import download, upload
from gridftp.filespace import is_internal
from services.faults import AccessDenied, InvalidArgument
from services.jobs import wire
from services.jobs.bounds import BoundEvent
from services.jobs.staging import MAX_STAGED, ONCE
from services.jobs.store import JobSpec, StageIn
from services.wsrf.epr import EndpointReference
from services.wsrf.lifetime import CurrentTime, TerminationTime
from services.wsrf.namespaces import RL

# jobs.xsd's RelativePathType: relative, no "..", no empty parts (what the service may name an output)
OUTPUT_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9._+\-]{0,127}(/[A-Za-z0-9_+\-][A-Za-z0-9._+\-]{0,127}){0,7}")

FINAL_STATES = ("Done", "Failed", "Cancelled")
# properties a job service of an older runtime (a guest image built before them) does not have: a status it
# refuses for one is asked again without the one it named
NEWER_PROPERTIES = frozenset({wire.CancelRequested.qname, wire.ResourceBounds.qname})
# what a job wrote: its submitter's and the VO's admins' only (the service's AccessDenied, action job.read-output, for
# anyone else, the instance's owner on an admin's job included): the rest of its properties are asked without them
TAILS = frozenset({wire.StdoutTail.qname, wire.StderrTail.qname})


class OutputsInTheWay(RuntimeError):
    """Files of the scientist's stand where a job's outputs would be written: nothing was fetched."""


class NoSuchOutput(RuntimeError):
    """An output asked for by name that the job's service did not record: nothing was fetched."""


def _same_contents(path: Path, size: int, sha256: str) -> bool:
    """Whether the file at ``path`` is the output already (its size and the sha256 the service recorded)."""
    import hashlib

    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == sha256.lower()
    except OSError:
        return False


@dataclass
class JobInfo:
    """A job as its resource properties describe it."""

    key: str
    state: str = ""
    owner: str = ""
    executable: str = ""
    arguments: list[str] = field(default_factory=list)
    exit_code: int | None = None
    failure: str | None = None
    submitted: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    progress: dict = field(default_factory=dict)
    outputs: list[tuple[str, int, str, str | None]] = field(default_factory=list)
    directory_url: str | None = None
    termination: datetime | None = None
    cancel_requested: bool = False      # a live job's Cancel is being carried out: it ends Cancelled
    # what the service's bounds did to the job once its program ended (none: nothing); None: nothing known (not
    # ended yet, no exit status, or a service older than the ResourceBounds property)
    resource_bounds: list[BoundEvent] | None = None
    tails_withheld: bool = False        # the service refused the caller the output tails (not her job): not asked

    @classmethod
    def from_properties(cls, key: str, props: etree._Element) -> "JobInfo":
        return cls(key, wire.State.read(props, ""), wire.Owner.read(props, ""), wire.Executable.read(props, ""),
                   wire.Arguments.read(props, []), wire.ExitCode.read(props), wire.Failure.read(props),
                   wire.Submitted.read(props), wire.Started.read(props), wire.Ended.read(props),
                   wire.StdoutTail.read(props, ""), wire.StderrTail.read(props, ""),
                   wire.StagingProgress.read(props, {}), wire.Outputs.read(props, []),
                   wire.DirectoryURL.read(props), TerminationTime.read(props),
                   wire.CancelRequested.read(props, False), wire.ResourceBounds.read(props))

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def _gsiftp(urls: Sequence[str]) -> list[str]:
    """The gsiftp:// URLs of ``urls`` (what a job service moves with a proxy delegated to it)."""
    return [u for u in urls if u.split(":", 1)[0].lower() == "gsiftp"]


def _moves_gsiftp(spec: JobSpec) -> bool:
    """Whether the job has a gsiftp:// stage-in or stage-out (which the service moves with a delegated proxy)."""
    return bool(_gsiftp([s.source for s in spec.stage_in] + [s.destination or "" for s in spec.stage_out]))


def _utc(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: int) -> str:
    """``seconds`` as the CLI spells a duration: 2d, 6h, 90m, 45s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- the ends the user asked for her jobs, kept where the client runs -----------------------------------------
# A job's TerminationTime is its service's word, and the service is one its users do not control (a VM's, run by
# its owner as root in her guest): the length of a proxy lent to it must not be its word (attack15). What the client
# itself knows is the end the user asked (`job submit --lifetime`, `job lifetime`), kept here per service and job.
def asked_ends_dir() -> Path:
    """Where the ends the user asked for her jobs are kept: ~/.cache/vmgrid/jobs ($XDG_CACHE_HOME's)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vmgrid" / "jobs"


def _asked_end_path(service_url: str, key: str) -> Path:
    import hashlib

    return asked_ends_dir() / (hashlib.sha256(f"{service_url}\n{key}".encode()).hexdigest()[:40] + ".json")


NO_RECORD = object()      # asked_end's answer for a job this client keeps no end of (submitted elsewhere)


def asked_end(service_url: str, key: str):
    """The end (seconds since the epoch) the user asked here for job ``key`` of ``service_url``; None if she asked
    none (the service's default, taken at submit); NO_RECORD if this client keeps nothing of the job."""
    import json

    try:
        record = json.loads(_asked_end_path(service_url, key).read_text())
        end = record["end"]
        return None if end is None else float(end)
    except (OSError, ValueError, KeyError, TypeError):
        return NO_RECORD


def remember_end(service_url: str, key: str, end: float | None) -> None:
    """Keep ``end`` (None: the service's default) as the end the user asked for job ``key``. A record's modification
    time is when it may go (a day past the end; 31 days after it was written without one): records past it are
    dropped meanwhile, by their times alone. A failure to write costs nothing but the record (a refresh then asks
    for --lifetime)."""
    import json

    folder, now = asked_ends_dir(), time.time()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in folder.glob("*.json"):
            try:
                if old.stat().st_mtime < now:
                    old.unlink()
            except OSError:
                continue
        path = _asked_end_path(service_url, key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"service": service_url, "job": key, "end": end}))
        goes = (end if end is not None else now + 30 * 86400) + 86400
        os.utime(tmp, (goes, goes))
        os.replace(tmp, path)
    except OSError:
        pass


def forget_end(service_url: str, key: str) -> None:
    try:
        _asked_end_path(service_url, key).unlink(missing_ok=True)
    except OSError:
        pass


class OlderJobService(RuntimeError):
    """The job service is of an older vmgrid that cannot do what was asked as asked; the message says what to do."""


class JobClient:
    """``service``: a client.soap.GridServiceClient for …/wsrf/services/JobService (signed as the user)."""

    def __init__(self, service):
        self.service = service
        self._info: etree._Element | None = None
        self._unknown: frozenset[str] = frozenset()      # NEWER_PROPERTIES this service has refused: not asked again
        self._no_tails: set[str] = set()     # jobs whose output tails the service refused the caller: not asked again
        # one line each for the user (the CLI prints them on standard error): a proxy lent shorter than asked
        self.notices: list[str] = []

    def ref(self, key: str) -> EndpointReference:
        return EndpointReference.of(self.service.url, wire.KEY_TAG, key)

    def _on(self, key: str, operation: str, *args, **kwargs) -> etree._Element:
        return self.service.call(operation, *args, _soapheaders=self.ref(key).headers(), **kwargs)

    # -- the factory --------------------------------------------------------------------------------------
    def info(self) -> etree._Element:
        if self._info is None:
            self._info = self.service.call("GetServiceInfo")
        return self._info

    def gridftp_url(self) -> str:
        url = self.info().findtext("job:gridftp", namespaces=wire.NS)
        if not url:
            raise RuntimeError(f"{self.service.url} has no GridFTP face to stage files through")
        return url

    def _face_dn(self) -> str | None:
        """The DN the service's GridFTP face must present: the one its answers must be signed by when that is pinned
        (a guest's job service, named through its instance: the subject the node issued it), so that a face URL the
        service names elsewhere reaches no other server with the caller's credential; None otherwise (the server's
        certificate must then name the URL's host)."""
        return getattr(self.service, "expected_host_dn", None)

    def stage_local(self, path: Path, progress: Callable[[int, int], None] | None = None, *,
                    once: bool = False) -> StageIn:
        """Upload a local file to the caller's staging area (verified); the StageIn that brings it into a job.
        ``once``: for one job only (`vmgrid job submit --stage-in`): it goes to the area under a name of its own,
        ``once.<random>.<name>``, which the service removes from the area when the job has copied it (a file put
        there otherwise stays, for any number of jobs, until overwritten or deleted)."""
        area = self.info().findtext("job:stagingDirectory", namespaces=wire.NS)
        name = path.name
        if once and len(name) <= MAX_STAGED - len(ONCE) - 17:
            name = f"{ONCE}{secrets.token_hex(8)}.{name}"
        url = f"{self.gridftp_url()}{area}{name}"
        if not once:
            result = upload(path, url, 2, credential=self.service.credential, trust=self.service.trust,
                            progress=progress, server_dn=self._face_dn())
            return StageIn(f"staged:{name}", path.name, result.sha256)
        # a once-name is never asked for again, so no later command resumes its upload: its restart markers are
        # kept for this upload's own retries only, never in ~/.cache/vmgrid/gridftp (trial15 N1)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vmgrid-stage-in-") as state:
            result = upload(path, url, 2, credential=self.service.credential, trust=self.service.trust,
                            progress=progress, server_dn=self._face_dn(), state_dir=state)
        return StageIn(f"staged:{name}", path.name, result.sha256)

    def staging_url(self) -> str:
        """The caller's staging area on the service's GridFTP face (gsiftp://HOST:PORT/staging/<area>/): a file put
        there (`vmgrid transfer`, globus-url-copy) is staged into any job of hers as ``staged:NAME``."""
        area = self.info().findtext("job:stagingDirectory", namespaces=wire.NS)
        if not area:
            raise RuntimeError(f"{self.service.url} names no staging directory of yours")
        return f"{self.gridftp_url().rstrip('/')}{area}"

    def service_certificate(self):
        """The certificate the job service signs its answers with (its own), read from a signed answer."""
        self._info = self.service.call("GetServiceInfo")
        signer = self.service.zeep.wsse.last_signer
        if signer is None:
            raise RuntimeError(f"{self.service.url}: its answer carried no verified signer")
        return signer.chain[0]

    def _takes_delegation(self) -> bool:
        """Whether the service's SubmitJob has delegatedProxy (one of an older runtime does not: it is sent none)."""
        return self._request_has("SubmitJob", "delegatedProxy")

    def _request_has(self, operation: str, field: str) -> bool:
        """Whether the service's WSDL gives ``operation``'s request the element ``field`` (an older runtime's may
        not: what it lacks is not sent)."""
        try:
            request = self.service.zeep.get_element(f"{{{wire.JOB}}}{operation}")
            return any(name == field for name, _ in request.type.elements)
        except (LookupError, AttributeError, ValueError):
            return False

    def older_service_refusal(self, urls: Sequence[str]) -> str | None:
        """Why this service cannot move ``urls`` (a job's stage-in sources and stage-out destinations) as the caller,
        or None. A job service of an older vmgrid, whose SubmitJob has no delegatedProxy (its WSDL), takes no proxy:
        it would move a gsiftp:// file with its own credential, not as the submitter (a guest's certificate, which
        GridFTP servers turn away at login; a host's, which the site's policy makes a node: attack12 G7), so the job
        would fail at its staging, or move her files as another. Asked before anything is uploaded or submitted."""
        moved = _gsiftp(urls)
        if not moved or self._takes_delegation():
            return None
        return (f"{moved[0]}: the job service at {self.service.url} is of an older vmgrid, whose SubmitJob takes no "
                f"delegated proxy: it would move the job's gsiftp:// files with its own credential, not as you, so "
                f"nothing was staged or submitted; give the job local files instead (--stage-in FILE goes through "
                f"the service's own GridFTP face, and `vmgrid job get` fetches its outputs), or ask whoever runs "
                f"it (for a VM's, its owner: a newer image) for a newer vmgrid")

    def limited_proxy_refusal(self, key: str | None = None) -> str:
        """What the user reads when the service refused the limited proxy lent for a job's gsiftp:// files
        (AccessDenied, rule limited-proxy) at submit, or at a refresh of job ``key``. A job service of an older vmgrid
        did so for a gsiftp:// stage-out and took a full proxy; so may one whose runner (a VM's owner, root in her
        guest, with its key) wants one of the user's: a full proxy is every grid action as the user until it expires
        (a VO admin's: the VO's images, the policy), so it is never lent on the service's word (attack15 H1)."""
        head = (f"the job service at {self.service.url} refused the limited proxy vmgrid lends a job for its gsiftp:// "
                f"files (AccessDenied, rule limited-proxy: an older vmgrid asks a full one for a gsiftp:// stage-out), "
                f"and vmgrid lends a job service no full proxy (whoever runs it could act as you with one)")
        if key is None:
            return (f"{head}, so no job was submitted; give the job local files instead (--stage-in FILE goes "
                    f"through the service's own GridFTP face; --stage-out NAME keeps an output in the job's directory: "
                    f"`vmgrid job get` fetches it, `vmgrid transfer` sends it on), or ask whoever runs the service "
                    f"(for a VM's, its owner: a newer image) for a newer vmgrid")
        return (f"{head}, so job {key} keeps the proxy it has; an output it cannot send stays in its directory "
                f"(`vmgrid job get` fetches it), or ask whoever runs the service (for a VM's, its owner: a newer "
                f"image) for a newer vmgrid")

    def submit(self, spec: JobSpec) -> str:
        """Submit; returns the job's key (its EPR is the service's address and the key). A job with a gsiftp://
        stage-in or stage-out carries a proxy of this client's credential delegated to the service (issued for the key
        of the certificate it signs with, as `vm migrate` delegates to a node): the service moves those files as the
        user, never as itself. The proxy lives as long as the job asks to (else the most a service takes, 12 h), never
        past the credential it is made from; one cut shorter than that is said in :attr:`notices`. The end the job asks
        (or none) is kept where the client runs (:func:`remember_end`): what :meth:`refresh_proxy` lends at most.
        It is limited (it moves data, it starts nothing: whoever holds the
        service's key, such as a guest's root, cannot run a job or deploy a VM with it): a GridFTP server takes a
        limited proxy for stage-outs as for stage-ins. A full one is never lent, whatever the service answers: one
        that refuses the limited one (AccessDenied, rule limited-proxy: an older vmgrid's, for a gsiftp:// stage-out,
        or one whose runner wants a full proxy of the user) gets no job (:class:`OlderJobService`,
        :meth:`limited_proxy_refusal` says why and what to do; attack15 H1). One older still takes no proxy at all: a
        job with a gsiftp:// file is not submitted to it (:meth:`older_service_refusal` says why)."""
        why = self.older_service_refusal([s.source for s in spec.stage_in] +
                                         [s.destination or "" for s in spec.stage_out])
        if why is not None:
            raise OlderJobService(why)
        kwargs = wire.submit_arguments(spec)
        asked_at = time.time()
        if not _moves_gsiftp(spec):
            resp = self.service.call("SubmitJob", **kwargs)
        else:
            from datetime import timedelta

            from security.delegation import MAX_LIFETIME, delegate

            lifetime = MAX_LIFETIME if spec.lifetime is None else min(timedelta(seconds=spec.lifetime), MAX_LIFETIME)
            service = self.service_certificate()
            kwargs["delegatedProxy"] = delegate(self.service.credential, service, lifetime=lifetime,
                                                limited=True).decode()
            try:
                resp = self.service.call("SubmitJob", **kwargs)
            except AccessDenied as exc:
                if exc.rule != "limited-proxy":
                    raise
                raise OlderJobService(self.limited_proxy_refusal()) from None     # never a full one on its word
        epr = EndpointReference.from_element(resp.find("job:Job/wsa:EndpointReference", wire.NS))
        key = epr.parameter(wire.KEY_TAG)
        # what a refresh of it lends at most, whatever its service says of its end later
        remember_end(self.service.url, key, None if spec.lifetime is None else asked_at + spec.lifetime)
        if "delegatedProxy" in kwargs:
            self._tell_submit_cut(key, spec.lifetime, kwargs["delegatedProxy"], asked_at)
        return key

    def _tell_submit_cut(self, key: str, asked: int | None, pem: str, asked_at: float) -> None:
        """A notice (:attr:`notices`) when the proxy lent at submit ends before the job's --lifetime asked it to,
        or, asked none, before the 12 h a service takes: what was asked, what it was cut to, why (trial15 X4)."""
        from datetime import timezone

        from cryptography import x509

        from security.delegation import MAX_LIFETIME

        until = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
        cap = MAX_LIFETIME.total_seconds()
        wanted = cap if asked is None else asked
        if until.timestamp() >= asked_at + wanted - 60:
            return
        if until.timestamp() < asked_at + min(wanted, cap) - 60:
            why = f"your own proxy ends then ({_utc(self.service.credential.not_after.astimezone(timezone.utc))})"
        else:
            why = "a job service takes no proxy longer than 12 h"
        what = "the job's" if asked is None else f"--lifetime {_span(asked)}, the job's"
        self.notices.append(f"job {key}: the proxy lent for its gsiftp:// files lives until {_utc(until)}, not "
                            f"{what} whole life: {why}; `vmgrid job refresh-proxy` lends a new one before then")

    def list(self, include_ended: bool = False, resource_bounds: bool = False) -> list[etree._Element]:
        """The job:Job elements ListJobs answers; with ``resource_bounds`` each ended job's job:ResourceBounds too,
        where the service's ListJobs takes includeResourceBounds (its WSDL says: an older one's does not, and is
        asked without it: its jobs carry none)."""
        kwargs = {"includeEnded": True} if include_ended else {}
        if resource_bounds and self._request_has("ListJobs", "includeResourceBounds"):    # jobstat16
            kwargs["includeResourceBounds"] = True
        resp = self.service.call("ListJobs", **kwargs)
        return list(resp.iterfind("job:Job", wire.NS))

    def log(self, name: str, max_bytes: int | None = None) -> str:
        resp = self.service.call("GetLog", name=name, **({"maxBytes": max_bytes} if max_bytes else {}))
        return resp.findtext("job:text", namespaces=wire.NS) or ""

    # -- a job ----------------------------------------------------------------------------------------------
    def status(self, key: str) -> JobInfo:
        """The job's properties. A job service from before one of NEWER_PROPERTIES (an older guest image) refuses it
        (InvalidArgument naming it): the status is asked again without it, and it is never asked again of this
        service, so following a job (:meth:`wait`) costs it no refusal per poll; such a job reads as the property's
        absence (``cancel_requested`` False, ``resource_bounds`` None). The others it knows are still asked (one
        from between the two has CancelRequested and not ResourceBounds). The output tails of a job that is not the
        caller's (an admin's job, read by the instance's owner) are refused (AccessDenied, job.read-output): the rest
        is asked again without them, and so at every later poll of the job (``tails_withheld``)."""
        names = [n for n in wire.JOB_PROPERTIES.names if n != CurrentTime.qname
                 and not (key in self._no_tails and n in TAILS)]
        try:
            props = self._ask(key, names)
        except AccessDenied as exc:
            if exc.action != "job.read-output" or key in self._no_tails:
                raise
            self._no_tails.add(key)
            props = self._ask(key, [n for n in names if n not in TAILS])
        info = JobInfo.from_properties(key, props)
        info.tails_withheld = key in self._no_tails
        return info

    def _ask(self, key: str, names: list[str]) -> etree._Element:
        """GetMultipleResourceProperties of ``names``, less those this service is known not to have; one of
        NEWER_PROPERTIES it refuses (InvalidArgument naming it) is dropped and never asked of it again (see
        :meth:`status`)."""
        while True:
            asked = [n for n in names if n not in self._unknown]
            try:
                return self._on(key, "GetMultipleResourceProperties",
                                ResourceProperty=[etree.QName(n) for n in asked])
            except InvalidArgument as exc:
                refused = {n for n in NEWER_PROPERTIES - self._unknown if n in str(exc)}
                if not refused:
                    raise
                self._unknown |= refused

    def property(self, key: str, qname: str) -> list[etree._Element]:
        return list(self._on(key, "GetResourceProperty", etree.QName(qname)))

    def cancel(self, key: str) -> str:
        """Cancel; the state the service answers: Cancelled, or the job's live state while its program is being
        stopped and what it wrote recorded (it ends Cancelled by itself: :meth:`wait` follows it there)."""
        return self._on(key, "Cancel").findtext("job:State", namespaces=wire.NS)

    def refresh_proxy(self, key: str, lifetime: int | None = None) -> datetime:
        """Delegate a new proxy of this client's credential to the service for job ``key``'s gsiftp:// files (GRAM's
        globus-job-refresh-credentials), replacing the one it keeps; when the new one expires. It lives ``lifetime``
        seconds, else until the end the user asked for the job here (`job submit --lifetime`, `job lifetime`: kept in
        :func:`asked_ends_dir`; asked none, the service's default: its termination time): never past the job's
        termination time the service reports, at most the 12 h a service takes, never past the credential it is made
        from. The service's word only ever shortens it: a service that claims a far end gets no longer a proxy
        (attack15). A job this client keeps no end of (submitted elsewhere) is refreshed only with ``lifetime``.
        A proxy cut shorter than asked is said in :attr:`notices` (trial15 X4). Limited, as :meth:`submit` delegates
        it; a service refusing it (AccessDenied, rule limited-proxy) is lent no full one (:class:`OlderJobService`,
        :meth:`limited_proxy_refusal`)."""
        from datetime import timedelta, timezone

        from security.delegation import MAX_LIFETIME, delegate

        try:
            self.service.zeep.get_element(f"{{{wire.JOB}}}RefreshJobProxy")
        except (LookupError, AttributeError, ValueError):
            raise RuntimeError(f"{self.service.url} is a job service of an older vmgrid, without RefreshJobProxy: "
                               f"its jobs keep the proxy delegated at submit (at most 12 h)") from None
        termination = TerminationTime.parse(self.property(key, TerminationTime.qname)[0])
        now = datetime.now(timezone.utc)
        asked = asked_end(self.service.url, key)
        if lifetime is None and asked is NO_RECORD:
            raise RuntimeError(f"job {key} was not submitted from here (no end you asked for it in "
                               f"{asked_ends_dir()}): name how long the new proxy lives with --lifetime (its service "
                               f"says the job ends at {_utc(termination)}, which vmgrid does not take on its word)")
        if lifetime is None and asked is not None and asked < now.timestamp() + 60:
            passed = _utc(datetime.fromtimestamp(asked, timezone.utc))
            raise RuntimeError(f"job {key}: the end you asked for it here ({passed}) has passed, yet its service says "
                               f"it ends at {_utc(termination)} (moved from elsewhere?): name how long the new proxy "
                               f"lives with --lifetime")
        # the bounds, each with why: the service's word only among them, never alone the one that lengthens it
        bounds = [(termination, "the job's termination time"),
                  (now + MAX_LIFETIME, "a job service takes no proxy longer than 12 h"),
                  (self.service.credential.not_after.astimezone(timezone.utc), "your own proxy ends then")]
        mine = datetime.fromtimestamp(asked, timezone.utc) if lifetime is None and asked not in (None, NO_RECORD) \
            else None
        if mine is not None:
            bounds.append((mine, "the end you asked for the job"))
        bound, why = min(bounds, key=lambda b: b[0])
        wanted = now + (timedelta(seconds=lifetime) if lifetime is not None else MAX_LIFETIME)
        until = max(min(wanted, bound), now + timedelta(seconds=60))
        service = self.service_certificate()
        try:        # limited, as at submit: it moves data, which is all a job's proxy is for
            resp = self._on(key, "RefreshJobProxy", delegatedProxy=delegate(
                self.service.credential, service, lifetime=until - datetime.now(timezone.utc), limited=True).decode())
        except AccessDenied as exc:
            if exc.rule != "limited-proxy":
                raise
            raise OlderJobService(self.limited_proxy_refusal(key)) from None     # never a full one on its word
        expires = TerminationTime.parse(resp.find("job:proxyExpires", wire.NS))
        if lifetime is not None and wanted > bound + timedelta(seconds=60):
            self.notices.append(f"job {key}: --lifetime {_span(lifetime)} asked a proxy until {_utc(wanted)}; it "
                                f"lives until {_utc(expires)}: {why} ({_utc(bound)})")
        elif mine is not None and bound == mine and termination > mine + timedelta(seconds=60):
            self.notices.append(f"job {key}: its service says it ends at {_utc(termination)}, later than the end you "
                                f"asked for it ({_utc(bound)}): the proxy lives until {_utc(expires)} (`vmgrid job "
                                f"lifetime` moves the job's end; --lifetime asks for a proxy's)")
        return expires

    def destroy(self, key: str) -> None:
        self._on(key, "Destroy")
        forget_end(self.service.url, key)

    def set_lifetime(self, key: str, seconds: int | None = None, *, when: datetime | None = None) -> datetime:
        """Move job ``key``'s termination time to ``seconds`` from now, or to ``when``; the new one."""
        if when is not None:
            from datetime import timezone

            kwargs = {"RequestedTerminationTime": when.astimezone(timezone.utc)}
            asked = when.timestamp()
        else:
            kwargs = {"RequestedLifetimeDuration": f"PT{int(seconds)}S"}
            asked = time.time() + int(seconds)
        resp = self._on(key, "SetTerminationTime", **kwargs)
        new = TerminationTime.parse(resp.find(f"{{{RL}}}NewTerminationTime"))
        remember_end(self.service.url, key, min(asked, new.timestamp()))     # what a refresh lends at most
        return new

    def subscribe(self, key: str, consumer_url: str) -> etree._Element:
        return self._on(key, "Subscribe", ConsumerReference={"Address": consumer_url})

    def wait(self, key: str, timeout: float = 3600, interval: float = 0.25,
             on_update: Callable[[JobInfo], None] | None = None) -> JobInfo:
        """Poll until the job is Done, Failed or Cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.status(key)
            if on_update:
                on_update(info)
            if info.final:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {key} still {info.state} after {timeout:.0f} s")
            time.sleep(interval)

    def fetch_outputs(self, info: JobInfo, dest: Path,
                      progress: Callable[[str, int, int], None] | None = None, *,
                      overwrite: bool = False, names: Sequence[str] | None = None) -> list[Path]:
        """Download every output of a job (or those ``names`` names: one the service did not record is
        :class:`NoSuchOutput`) into ``dest``, each verified against the sha256 the service recorded.

        A file already in ``dest`` under an output's name is the scientist's: one with the output's recorded
        sha256 is kept as it is (a second ``get``, or one after an interrupted one, fetches only the rest); one
        with other contents is replaced only with ``overwrite``, else :class:`OutputsInTheWay` names them all
        and nothing is fetched."""
        outputs = info.outputs
        if names:
            recorded = {o[0]: o for o in outputs}
            missing = [n for n in dict.fromkeys(names) if n not in recorded]
            if missing:
                raise NoSuchOutput(f"job {info.key} has no output {', '.join(missing)} (its outputs: "
                                   f"{', '.join(recorded) or 'none'}): nothing fetched")
            outputs = [recorded[n] for n in dict.fromkeys(names)]
        if not info.directory_url:
            raise RuntimeError("the job service has no GridFTP face to fetch outputs from")
        for name, *_ in outputs:            # the service (a guest) is untrusted: its names stay inside ``dest``
            if not isinstance(name, str) or not OUTPUT_NAME.fullmatch(name):
                raise RuntimeError(f"the job service named an output {name!r}, not a path inside the job's "
                                   f"directory (jobs.xsd RelativePathType): nothing fetched")
            if is_internal(name):      # received as NAME.vmgrid-part: one so named would be another's part file
                raise RuntimeError(f"the job service named an output {name!r}, a name the transfer keeps for its "
                                   f"own part files (a vmgrid job service refuses it at submission): nothing "
                                   f"fetched")
        clash = _clashing_outputs([o[0] for o in outputs])
        if clash:                  # a file cannot be both an output and a directory of another, nor two outputs
            raise RuntimeError(f"the job service named {clash}: nothing fetched")
        if dest.exists() and not dest.is_dir():
            raise RuntimeError(f"{dest} is a file: name a directory for the outputs")
        todo, differ, blocked = [], [], []
        for name, size, sha256, _ in outputs:
            target = dest / name
            parent = next((p for p in reversed(target.relative_to(dest).parents)
                           if str(p) != "." and (dest / p).exists() and not (dest / p).is_dir()), None)
            if parent is not None:
                blocked.append(f"{dest / parent} is a file, not a directory for {target}")
            elif target.is_dir():
                blocked.append(f"{target} is a directory")
            elif os.path.lexists(target):
                if not _same_contents(target, size, sha256):
                    differ.append(target)
                    todo.append((name, size, sha256, target))
            else:
                todo.append((name, size, sha256, target))
        if blocked:
            raise OutputsInTheWay(f"{'; '.join(blocked)}: nothing fetched (name another directory with -o)")
        if differ and not overwrite:
            raise OutputsInTheWay(f"{', '.join(map(str, differ))} already exist{'s' if len(differ) == 1 else ''} "
                                  f"with other contents than the job's output{'s' if len(differ) > 1 else ''}: "
                                  f"nothing fetched (--overwrite replaces "
                                  f"{'it' if len(differ) == 1 else 'them'}, or name another directory with -o)")
        dest.mkdir(parents=True, exist_ok=True)
        for name, size, sha256, target in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            # size: the recorded one; a GridFTP face announcing another is refused before a byte is received or
            # disk reserved (a guest's server could otherwise fill the disk before the sha256 told it apart)
            download(f"{info.directory_url}{name}", target, 2, credential=self.service.credential,
                     trust=self.service.trust, server_dn=self._face_dn(), sha256=sha256, size=size,
                     progress=(lambda d, t, n=name: progress(n, d, t)) if progress else None)
        return [dest / name for name, *_ in outputs]


def _clashing_outputs(names: Sequence[str]) -> str | None:
    """Why an output list cannot be fetched into one directory: a name twice, or one name a directory of another
    (``a`` and ``a/b``); None if it can."""
    seen: dict[str, str] = {}
    for name in names:
        norm = os.path.normpath(name)
        if norm in seen:
            return f"output {name} twice"
        seen[norm] = name
    for norm, name in seen.items():
        for parent in Path(norm).parents:
            if str(parent) in seen:
                return f"outputs {seen[str(parent)]} and {name}"
    return None
