"""The job service's core (no SOAP): who may use it, jobs from submission to their end (stage in, run,
stage out), Cancel, lifetimes, and what a restart finds. GRAM's ManagedJobFactory, in vmgrid's words."""
from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from gridftp.checksum import hash_file
from gridftp.filespace import PART_SUFFIX, SIDECAR_SUFFIX, is_internal
from security.delegation import DelegationError
from services.faults import (AccessDenied, IllegalTransition, InvalidArgument, LimitExceeded, ResourceUnknown,
                            ServiceUnavailable)
from services.jobs.bounds import BoundEvent, read_bound_events
from services.jobs.config import JobsConfig
from services.jobs.files import chown_tree, lock, open_beneath, open_output
from services.jobs.runner import (Exit, Process, job_environment, memory_cgroups, memory_limit_bytes, network_mode,
                                  pid_namespaces, pids_cgroups, proc_start_time, read_exit, read_supervisor,
                                  remove_job_cgroup, remove_left_cgroups, remove_service_cgroups)
from services.jobs.staging import ONCE, Stager, StagingError, as_submitter, inside
from services.jobs import tree, uids
from services.jobs.store import FINAL, Job, JobSpec, JobState, JobStore, OutputFile
from services.wsrf.lifetime import Sweeper
from services.wsrf.notification import Subscription, Subscriptions, new_subscription_key

log = logging.getLogger("vmgrid.JobService")
RULE = "instance-owner-or-vo-admin"
# who reads what a job wrote (StdoutTail, StderrTail) and who cancels, destroys, sets the lifetime of or refreshes the
# proxy of a job: its submitter and the VO's admins (the instance's owner only of her own jobs)
JOB_RULE = OUTPUT_RULE = "job-submitter-or-vo-admin"
VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
LIVE_BEFORE_RUN = {JobState.PENDING, JobState.STAGE_IN}
# seconds a Cancel waits for its job to end before it answers: a program that ends at its SIGTERM, whose outputs
# are quickly hashed, is answered Cancelled; one that takes longer is answered with its live state (it ends
# Cancelled by itself). Short, so that a few Cancels do not hold a container's request threads.
CANCEL_ANSWER_WAIT = 1.0
# the proxy a job's submitter delegated at submit (control/<key>/): its gsiftp:// files are moved with it
DELEGATED_PROXY = "delegated-proxy.pem"
# ended jobs' directories a sweep asks the store for, at most, to count again (those due the longest first); it counts
# them for at most tree.WALK_SHARE of its interval and rests after (attack15: the sweeps read every ended job's record)
RECOUNT_BATCH = 64
# entries of jobs/ and control/ one sweep's orphan search looks at: a pass over them all is spread over sweeps
ORPHAN_BATCH = 1000

StateListener = Callable[[Job, JobState, JobState], None]


class JobManager:
    """Jobs of one job service, kept in ``state_dir``: jobs.sqlite, jobs/<key>/ (each job's directory,
    its working directory inside), control/<key>/ (the supervisor's files, out of the job's reach),
    staging/<area>/ (what owners uploaded to stage in)."""

    def __init__(self, state_dir: Path, config: JobsConfig, stager_factory: Callable[[Path], Stager] | None = None):
        if not config.owner:
            raise ValueError("the job service needs the instance owner's DN: set [jobs] owner")
        if os.geteuid() != 0:
            raise ValueError("the job service runs each job under a uid of its own ([jobs] job_uid_first, "
                             "job_uid_count), out of reach of its credential, its state and other jobs: "
                             "start it as root")
        if config.job_uid_first < 1000 or config.job_uid_count < 1 or config.job_uid_first + config.job_uid_count > 2**32 - 2:
            raise ValueError(f"[jobs] job_uid_first = {config.job_uid_first}, job_uid_count = {config.job_uid_count}: "
                             f"a range of at least one uid from 1000 up, below 4294967294")
        memory_limit_bytes(config.memory_limit)          # one that means nothing is refused before anything is done
        memory_limit_bytes(config.memory_total, key="memory_total")
        network_mode(config.network)
        uids.claim(Path(state_dir), config.job_uid_first, config.job_uid_count)     # no account's, no other service's
        self.config = config
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.control_dir = self.state_dir / "control"
        self.staging_dir = self.state_dir / "staging"
        # a job reaches its own directory only: jobs/ is passed through (0711, not listed), jobs/<key>/ is 0700 of the
        # submitter's uid; control/, staging/ and the database are the service's alone
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for d, mode in ((self.state_dir, 0o711), (self.jobs_dir, 0o711), (self.control_dir, 0o700),
                        (self.staging_dir, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)
        self.store = JobStore(self.state_dir / "jobs.sqlite")
        for f in self.state_dir.glob("jobs.sqlite*"):
            os.chmod(f, 0o600)
        self.subscriptions = Subscriptions(self.store.db, "subscriptions", "job")
        self.stager = stager_factory(self.staging_dir) if stager_factory else None
        self.listeners: list[StateListener] = []
        self._procs: dict[str, Process] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._guard = threading.Lock()
        self._ended = threading.Condition()      # notified whenever a job reaches a final state
        self._stop = threading.Event()
        self._sweeper: Sweeper | None = None
        self._resume: list[tuple[str, Callable[[], None]]] = []
        why_not = pid_namespaces()
        self.pid_namespace = why_not is None
        if why_not is not None:
            log.warning("jobs run in process groups only, not in PID namespaces of their own (%s: the job service "
                        "needs CAP_SYS_ADMIN, e.g. root as in a guest): a process a job starts that calls setsid "
                        "outlives the job", why_not)
        self.pids_cgroup: Path | None = None
        self.processes_unbounded: str | None = None
        if config.max_processes > 0:
            self.pids_cgroup, self.processes_unbounded = pids_cgroups(config.pids_cgroup, self.state_dir)
            if self.processes_unbounded is not None:
                log.warning("jobs' processes are unbounded, not at most [jobs] max_processes = %d each (%s: the job "
                            "service needs a pids cgroup hierarchy it may write, e.g. root as in a guest): a fork "
                            "bomb in a job can exhaust the node", config.max_processes, self.processes_unbounded)
        self.memory = memory_cgroups(config.memory_limit, config.memory_total, self.state_dir)   # runner.py
        if self.memory.why_not is not None:
            log.warning("jobs' memory is unbounded, not at most [jobs] memory_limit = %r (%d bytes) each (%s: the job "
                        "service needs a memory cgroup hierarchy it may write, e.g. root as in a guest): a job can take "
                        "all of the node's memory", config.memory_limit, self.memory.limit, self.memory.why_not)
        self._over_quota: dict[str, str] = {}
        self.counts = tree.Counts(config.max_files, config.sweep_interval)   # live jobs' and trash entries' last counts
        self.trash = tree.Trash(self.state_dir / "trash")     # destroyed jobs' directories, until removed
        self._trash_held: dict[str, int] = {}    # a trash entry's bytes: the job's at its Destroy, then as counted
        self._recount_rest = 0.0                 # (monotonic) no ended directory is counted again before
        # the keys of the jobs not destroyed (what the orphan search compares jobs/ and control/ with: no record is
        # read per directory); a submit adds one under _guard, a Destroy takes it out
        self._known = {r[0] for r in self.store.db.conn().execute("SELECT key FROM jobs WHERE destroyed = 0")}
        self._orphan_walk: Iterator[Path] | None = None      # the orphan search's pass under way
        self._orphan_pass: set[Path] = set()                 # what it found without a record so far
        self.reconcile_report = self.reconcile()

    # -- who may use it -----------------------------------------------------------------------------
    def may_use(self, dn: str) -> bool:
        return dn == self.config.owner or dn in self.config.admins

    def check(self, dn: str, action: str, resource: str = "the job service") -> None:
        """Refuse anyone but the instance's owner and the VO's admins, before anything is looked up."""
        if not self.may_use(dn):
            raise AccessDenied(f"{dn} may not {action} on {resource}: only the instance's owner and the VO's "
                               f"admins may use its job service", subject=dn, action=action, resource=resource,
                               rule=RULE)

    def job(self, dn: str, key: str, action: str = "job.read") -> Job:
        self.check(dn, action, key)
        job = self.store.get(key)
        if job is None:
            raise ResourceUnknown(f"no job {key} here (never submitted, or destroyed)", resource=key)
        return job

    def own_job(self, dn: str, key: str, action: str, doing: str) -> Job:
        """The job ``key`` for ``dn`` to act on (``doing``: "cancel", ...): AccessDenied unless ``dn`` submitted it or
        is one of the VO's admins (the rule the output tails follow): the instance's owner acts on her own jobs only,
        never on an admin's; an admin on anyone's."""
        job = self.job(dn, key, action)
        if not self.is_submitter_or_admin(dn, job):
            raise AccessDenied(f"{dn} may not {doing} job {key}: only the job's submitter and the VO's admins may",
                               subject=dn, action=action, resource=key, rule=JOB_RULE)
        return job

    def is_submitter_or_admin(self, dn: str, job: Job) -> bool:
        return dn == job.owner or dn in self.config.admins

    # -- the service's life -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sweeper and the watchers of the jobs found running at start-up."""
        for key, run in self._resume:
            self._spawn(key, run)
        self._resume.clear()
        self._sweeper = Sweeper(self.sweep, self.config.sweep_interval, name="vmgrid-job-lifetimes").start()

    def close(self) -> None:
        """Stop watching. Running jobs go on (their supervisors outlive the service) and are found again."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.stop()
        if not self.store.live_keys():    # none runs nor starts: the service's cgroups go (when empty)
            remove_service_cgroups([self.pids_cgroup, self.memory.parent])
        self.store.close()

    # -- submission ---------------------------------------------------------------------------------------
    def submit(self, dn: str, spec: JobSpec, proxy_pem: bytes | None = None) -> Job:
        """``proxy_pem``: the proxy ``dn`` delegated to this service (SubmitJob's delegatedProxy), needed for gsiftp://
        stage-ins and stage-outs, which are moved as the submitter."""
        self.check(dn, "job.submit")
        self._validate(spec)
        proxy_pem = self._delegation(dn, spec, proxy_pem)
        default = min(self.config.default_lifetime, self.config.max_lifetime)
        lifetime = default if spec.lifetime is None else spec.lifetime
        if lifetime > self.config.max_lifetime:
            raise LimitExceeded(f"a lifetime of {lifetime} s exceeds this service's {self.config.max_lifetime} s",
                                limit="max_lifetime", allowed=str(self.config.max_lifetime), requested=str(lifetime))
        self._check_submitter_quota(dn)
        with self._guard:
            live = self.store.count_live()
            if live >= self.config.max_live_jobs:
                raise LimitExceeded(f"{live} jobs are live here; the service runs at most {self.config.max_live_jobs}",
                                    limit="max_live_jobs", allowed=str(self.config.max_live_jobs),
                                    requested=str(live + 1))
            # a uid for it when its program starts (the start-time check stays: a backstop)
            first, count = self.config.job_uid_first, self.config.job_uid_count
            why = self.store.uid_shortfall(dn, first, count)
            if why is not None:
                raise LimitExceeded(why, limit="job_uid_count", allowed=str(count), requested=str(count + 1))
            now = time.time()
            job = Job("job-" + uuid.uuid4().hex, dn, JobState.PENDING, spec, now, now + lifetime)
            (self.jobs_dir / job.key).mkdir(mode=0o700)
            if proxy_pem is not None:
                (self.control_dir / job.key).mkdir(mode=0o700)
                (self.control_dir / job.key / DELEGATED_PROXY).write_bytes(proxy_pem)
            self.store.add(job)      # the record first: a restart from here on finds the job
            self._known.add(job.key)
        log.info("job %s submitted by %s: %s", job.key, dn, spec.executable)
        self._spawn(job.key, lambda: self._run(job.key))
        return job

    def _validate(self, spec: JobSpec) -> None:
        if not spec.executable or "\0" in spec.executable:
            raise InvalidArgument("the executable is empty", argument="executable")
        if spec.lifetime is not None and spec.lifetime <= 0:
            # 0 is no request for the default: a client that means the default names no lifetime
            raise InvalidArgument(f"a lifetime of {spec.lifetime} s: a job lives a positive number of seconds (name "
                                  f"none for the service's default)", argument="lifetime")
        for name, _ in spec.environment:
            if not VARIABLE.fullmatch(name):
                raise InvalidArgument(f"{name!r} is not an environment variable name", argument="environment")
        paths = [("directory", spec.directory), ("stdin", spec.stdin), ("stdout", spec.stdout),
                 ("stderr", spec.stderr)] + [("stageIn", s.name) for s in spec.stage_in] + \
                [("stageOut", s.name) for s in spec.stage_out]
        for what, rel in paths:
            if rel is None:
                continue
            if rel.startswith("/") or ".." in rel.split("/") or not rel.strip("/"):
                raise InvalidArgument(f"{what} {rel!r} must be a relative path inside the job's directory",
                                      argument=what)
            if is_internal(rel):
                # the GridFTP face never serves these names (a file being received and its range markers), and a
                # client fetching output X receives it as X.vmgrid-part: an output so named could not come back
                raise InvalidArgument(f"{what} {rel!r}: names ending in {PART_SUFFIX} or {SIDECAR_SUFFIX} are the "
                                      f"transfer's own; choose another name", argument=what)
        if spec.stdin is not None:
            # a job's directory starts empty but for what is staged in: any other stdin could never be there
            staged = {os.path.normpath(s.name) for s in spec.stage_in}
            if os.path.normpath(spec.stdin) not in staged:
                raise InvalidArgument(f"stdin {spec.stdin!r} is not staged in: the job's directory holds only the "
                                      f"files staged in when the program starts (here "
                                      f"{', '.join(sorted(staged)) or 'none'})", argument="stdin")
        for s in spec.stage_in:
            if not s.source.startswith(("gsiftp://", "ftp://", "staged:")):
                raise InvalidArgument(f"stage-in source {s.source!r}: a gsiftp:// or ftp:// URL, or staged:NAME",
                                      argument="stageIn")
            if s.source.startswith(("gsiftp://", "ftp://")) and self.stager is None:
                raise InvalidArgument("this job service has no GridFTP credential to fetch files",
                                      argument="stageIn")
        if any(s.destination for s in spec.stage_out) and self.stager is None:
            raise InvalidArgument("this job service has no GridFTP credential to send files", argument="stageOut")

    def _delegation(self, dn: str, spec: JobSpec, proxy_pem: bytes | None) -> bytes | None:
        """The proxy ``dn`` delegated for the job's gsiftp:// files, checked (None: the job moves none). Those are
        moved as the submitter, never with this service's own credential: a host credential is a node to the site's
        policy (it may read every VO's images), and a job's URL is the submitter's choice (a confused deputy).
        A limited proxy is taken for stage-ins and stage-outs alike (`vmgrid job submit` delegates one): a GridFTP
        server writes for a limited proxy as it reads for one (Globus' globus-gridftp-server and vmgrid's alike:
        tests/interop/test_jobs_limited_stage_out.py); what a limited proxy cannot do is start a job or deploy a VM,
        which nothing a job service does with it needs. A full one (an older client's) is still taken."""
        reads = [s.source for s in spec.stage_in if as_submitter(s.source)]
        writes = [s.destination for s in spec.stage_out if as_submitter(s.destination)]
        if not reads and not writes:
            return None
        if not proxy_pem:
            raise InvalidArgument(f"{(reads + writes)[0]}: this job service moves a job's gsiftp:// files as its "
                                  f"submitter, with a proxy the client delegates at submit (delegatedProxy), and this "
                                  f"submit carries none: update your vmgrid client (its `vmgrid job submit` delegates "
                                  f"one)", argument="delegatedProxy")
        try:
            self.stager.delegated(proxy_pem, dn)
        except DelegationError as exc:
            raise InvalidArgument(f"delegatedProxy: {exc.reason}", argument="delegatedProxy") from None
        return proxy_pem

    def refresh_proxy(self, dn: str, key: str, proxy_pem: bytes) -> float:
        """Replace the proxy job ``key``'s gsiftp:// files are moved with (GRAM's globus-job-refresh-credentials): a
        delegated proxy lives at most 12 h, a job up to ``max_lifetime``. Only the job's submitter may (its files move
        as her: an admin's proxy would move them as him), of a live job with gsiftp:// files, and the proxy is checked
        exactly as at submit (:meth:`_delegation`: hers, for this service's key, valid; limited or not). Returns
        when the new proxy expires; the next file staged uses it."""
        job = self.job(dn, key, "job.refresh-proxy")
        if dn != job.owner:
            raise AccessDenied(f"{dn} may not refresh the proxy of job {key}: only the job's submitter may (its "
                               f"gsiftp:// files move as her)", subject=dn, action="job.refresh-proxy", resource=key,
                               rule="job-submitter")
        if job.final:
            raise IllegalTransition(f"job {key} is already {job.state.value}: it moves no more files",
                                    state=job.state.value, operation="RefreshJobProxy")
        if not proxy_pem:
            raise InvalidArgument("delegatedProxy is empty: delegate a proxy of yours for this service's key (`vmgrid "
                                  "job refresh-proxy` does)", argument="delegatedProxy")
        if self._delegation(dn, job.spec, proxy_pem) is None:
            raise InvalidArgument(f"job {key} moves no gsiftp:// file: it keeps no proxy to refresh",
                                  argument="delegatedProxy")
        control = self.control_dir / key
        control.mkdir(mode=0o700, exist_ok=True)
        # a name of this refresh's own (0600, O_EXCL): two refreshes at once never write into one file (attack14)
        fd, tmp = tempfile.mkstemp(prefix=DELEGATED_PROXY + ".", suffix=".new", dir=control)
        try:
            with open(fd, "wb") as f:
                f.write(proxy_pem)
            os.replace(tmp, control / DELEGATED_PROXY)     # a stage reading it meanwhile reads the old or the new
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        now = self.store.get(key)
        if now is None:                     # destroyed meanwhile: no credential is left behind
            try:
                tree.remove_tree(control)
            except OSError as exc:
                log.warning("job %s: could not remove %s: %s", key, control, exc.strerror or exc)
            raise ResourceUnknown(f"job {key} was destroyed meanwhile", resource=key)
        if now.final:                       # ended meanwhile: the proxy is not kept past it
            self._forget_proxy(key)
            raise IllegalTransition(f"job {key} ended meanwhile: it moves no more files", state=now.state.value,
                                    operation="RefreshJobProxy")
        log.info("job %s: its submitter refreshed its proxy", key)
        return self.stager.delegated(proxy_pem, dn).certificate.not_valid_after_utc.timestamp()

    def _staged_for_this_job_alone(self, job: Job, i: int) -> bool:
        """Whether the source of ``job``'s ``i``-th stage-in is a staged: file uploaded for this job alone
        (``staged:once.…``, as `vmgrid job submit --stage-in` uploads) that no later stage-in of the job names: the
        job takes it out of the staging area once copied. A file put there otherwise may serve any number of jobs
        (jobs.xsd: "put files there, then stage them in as staged:NAME") and stays."""
        source = job.spec.stage_in[i].source
        if not source.startswith("staged:" + ONCE):
            return False
        return not any(s.source == source for s in job.spec.stage_in[i + 1:])

    def _submitter_credential(self, job: Job):
        """The proxy the job's submitter delegated at submit, checked again now (expired or revoked meanwhile:
        StagingError saying so): what the job's gsiftp:// files are moved with."""
        try:
            pem = (self.control_dir / job.key / DELEGATED_PROXY).read_bytes()
        except FileNotFoundError:
            raise StagingError(f"no proxy of {job.owner} was delegated for this job's gsiftp:// files") from None
        try:
            return self.stager.delegated(pem, job.owner)
        except DelegationError as exc:
            raise StagingError(f"the proxy {job.owner} delegated at submit cannot be used ({exc.reason}): a job's "
                               f"gsiftp:// files are moved as its submitter") from None

    # -- running ------------------------------------------------------------------------------------------
    def _spawn(self, key: str, target: Callable[[], None]) -> None:
        def guarded():
            try:
                target()
            except Exception as exc:  # the job ends Failed, never stuck live
                if self._stop.is_set():
                    return
                log.exception("job %s: internal error", key)
                self._set_state(key, JobState.FAILED, failure=f"internal error of the job service: {exc}",
                                ended=time.time())
                self.free_uid(key)          # and nothing of it runs on under its uid
            finally:
                with self._guard:
                    self._threads.pop(key, None)
                    self._procs.pop(key, None)

        t = threading.Thread(target=guarded, name=f"vmgrid-{key[:12]}", daemon=True)
        with self._guard:
            self._threads[key] = t
        t.start()

    def _set_state(self, key: str, new: JobState, *, expect: set[JobState] | None = None,
                   or_cancelled: bool = False, **values) -> bool:
        """Move a job to ``new`` (from ``expect`` only, when given; never from a final state). With
        ``or_cancelled``, a job whose Cancel was accepted ends Cancelled instead (in the same transaction, so a
        Cancel that comes while the job ends is never lost between the two). A job that ends holds its directory,
        counted once after its end, against its submitter's quota (and again now and then: :meth:`_recount_ended`)."""
        held = None
        if new in FINAL or or_cancelled:
            held = self.counts.get(key, self.jobs_dir / key, final=True).at_least(self.config.staging_quota)
        old = self.store.set_state(key, new, expect=expect, or_cancelled=or_cancelled, held=held,
                                   recount_at=self._next_recount(), **values)
        if old is None:
            return False
        job = self.store.get(key)
        if job is not None and old != job.state:
            log.info("job %s: %s -> %s", key, old.value, job.state.value)
            for listener in self.listeners:
                try:
                    listener(job, old, job.state)
                except Exception:
                    log.exception("state listener failed for job %s", key)
        if job is not None and job.final:
            self._forget_proxy(key)
        if job is None or job.final:
            with self._ended:
                self._ended.notify_all()
        return True

    def _forget_proxy(self, key: str) -> None:
        """An ended job moves no more files: the proxy its submitter delegated is not kept past it (trial13)."""
        try:
            (self.control_dir / key / DELEGATED_PROXY).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("job %s: could not remove its delegated proxy: %s", key, exc.strerror)

    def _run(self, key: str) -> None:
        job = self.store.get(key)
        if job is None or job.final:
            return
        spec, work = job.spec, self.jobs_dir / key
        if spec.stage_in:
            if not self._set_state(key, JobState.STAGE_IN, expect={JobState.PENDING}):
                return
            done_bytes = 0
            submitter = None        # the submitter's delegated credential, at the first gsiftp:// source
            for i, s in enumerate(spec.stage_in):
                if self._cancelled(key):
                    return
                self.store.update(key, progress={"filesDone": i, "filesTotal": len(spec.stage_in),
                                                 "bytesDone": done_bytes, "current": s.name})
                try:
                    dest = inside(work, s.name)
                    if as_submitter(s.source) and submitter is None:
                        submitter = self._submitter_credential(job)
                    self.stager.fetch(s.source, dest, job.owner, s.sha256, lambda n, base=done_bytes: self.store.update(
                        key, progress={"filesDone": i, "filesTotal": len(spec.stage_in), "bytesDone": base + n,
                                       "current": s.name}), room=self.config.staging_quota - done_bytes,
                                      credential=submitter, release=self._staged_for_this_job_alone(job, i))
                except StagingError as exc:
                    self._set_state(key, JobState.FAILED, failure=f"stage-in failed: {exc}", ended=time.time())
                    return
                done_bytes += dest.stat().st_size
            self.store.update(key, progress={"filesDone": len(spec.stage_in), "filesTotal": len(spec.stage_in),
                                             "bytesDone": done_bytes})
        try:
            cwd = inside(work, spec.directory) if spec.directory else work
            cwd.mkdir(parents=True, exist_ok=True)
            stdin = inside(work, spec.stdin) if spec.stdin else None
            if stdin is not None and not stdin.is_file():
                raise StagingError(f"stdin {spec.stdin}: no such file in the job's directory")
            stdout, stderr = inside(work, spec.stdout), inside(work, spec.stderr)
        except StagingError as exc:
            self._set_state(key, JobState.FAILED, failure=str(exc), ended=time.time())
            return
        for p in (stdout, stderr):
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            uid = self.store.take_uid(key, job.owner, self.config.job_uid_first, self.config.job_uid_count,
                                      held_elsewhere=uids.account_holding)      # an account the system knows: skipped
        except LookupError as exc:
            self._set_state(key, JobState.FAILED, failure=str(exc), ended=time.time())
            return
        # the job's files are opened while the directory is still the service's alone (no link can be in their
        # place), then the directory is given to the submitter's uid and the program runs as that uid
        fds = {"stdout": os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600),
               "stderr": os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)}
        try:
            if stdin is not None:
                fds["stdin"] = os.open(stdin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            chown_tree(work, uid)
            proc = Process.start([spec.executable, *spec.arguments], cwd=cwd,
                                 env=job_environment(cwd, spec.environment), stdin=stdin, stdout=stdout, stderr=stderr,
                                 control=self.control_dir / key, max_output=self.config.max_output,
                                 pid_namespace=self.pid_namespace,
                                 pids_cgroup=self.pids_cgroup / key if self.pids_cgroup else None,
                                 max_processes=self.config.max_processes, processes_unbounded=self.processes_unbounded,
                                 max_file_size=self.config.staging_quota, uid=uid, fds=fds,
                                 tmp_size=self.config.tmp_size, keep=self.state_dir, memory=self.memory.for_job(key),
                                 network=self.config.network)
        finally:
            for fd in fds.values():
                os.close(fd)
        with self._guard:
            self._procs[key] = proc
        if not self._set_state(key, JobState.ACTIVE, expect=LIVE_BEFORE_RUN, started=time.time(), pid=proc.pid,
                               pid_start=proc.start_time):
            proc.kill(self.config.kill_grace)       # cancelled while it was being started
        self._finish(key, proc.wait())

    def _watch(self, key: str, proc: Process) -> None:
        """A job re-attached after a restart: wait for its supervisor, then finish it."""
        with self._guard:
            self._procs[key] = proc
        self._finish(key, proc.wait())

    def free_uid(self, key: str) -> None:
        """Job ``key`` has ended (its directory is the service's again, its outputs recorded): its uid goes back to
        its submitter's next jobs, once nothing of the job runs under it. In a PID namespace of its own nothing
        outlives the job's program; a supervisor still there (a job destroyed while the service stopped, before its
        SIGKILL) is killed with its namespace. Without PID namespaces a process the job started may have left its
        group (setsid): every process of the uid is killed (the range is the service's own: docs/jobs.md)."""
        uid = self.store.held_uids().get(key)
        if uid is None:
            return
        pid, start = self.store.supervisor(key)
        if pid and start and proc_start_time(pid) == start:
            try:
                os.killpg(pid, signal.SIGKILL)          # the shim leads its session; its init ends the namespace
            except OSError:
                pass
        if not self.pid_namespace:
            kill_every_process_of(uid)
        self.store.release_uid(key)

    def _cancelled(self, key: str) -> bool:
        job = self.store.get(key)
        return job is None or job.final or job.cancel_requested

    def _finish(self, key: str, exit: Exit) -> None:
        """The program ended: record how, stage the outputs out, and end the job Done or Failed."""
        remove_job_cgroup(self.pids_cgroup, key)       # left by a supervisor that was killed, with what it held
        self.memory.remove(key)
        if self._stop.is_set():      # the service stopped: the next one finds the exit status
            return
        lock(self.jobs_dir / key)        # out of reach of the submitter's other jobs while its outputs are hashed
        try:
            self._finish_locked(key, exit)
        finally:
            if not self._stop.is_set():
                self.free_uid(key)          # its outputs are recorded: the uid is free for her next job

    def _finish_locked(self, key: str, exit: Exit) -> None:
        over = self._over_quota.pop(key, None)
        job = self.store.get(key)
        if job is None:
            return
        if job.cancel_requested or job.final:
            self._stage_out(job, send=False)      # what it wrote before it was stopped, fetchable and verified
            self.store.update(key, exit_code=exit.code)
            self._set_state(key, JobState.CANCELLED, ended=time.time(), exit_code=exit.code)
            return
        failure = None
        if exit.code is None or exit.error:
            failure = exit.error or "the job's exit status is unknown"
            if exit.error and any(c.isspace() for c in job.spec.executable):
                failure += (f" (no shell runs a job: {job.spec.executable!r} is taken as one program's name; give "
                            f"the program and each argument as words of their own, "
                            f"{shlex.join(job.spec.executable.split())}, or run a shell yourself: sh -c '...')")
        elif over is not None:                 # the sweep killed it: its directory outgrew the quota
            failure = over
        elif exit.code == -signal.SIGXFSZ:
            failure = (f"the program wrote a file past {self.config.staging_quota} bytes, the job's quota ([jobs] "
                       f"staging_quota), and was killed by SIGXFSZ")
        if failure is not None:
            self._stage_out(job, send=False)
            self._set_state(key, JobState.FAILED, ended=time.time(), exit_code=exit.code, failure=failure,
                            or_cancelled=True)
            return
        if not self._set_state(key, JobState.STAGE_OUT, expect={JobState.ACTIVE}, exit_code=exit.code):
            return
        failure = self._stage_out(job)
        if exit.code != 0:
            why = f"killed by signal {-exit.code}" if exit.code < 0 else f"exited with status {exit.code}"
            why += self._file_bound_hint(job, exit.code)
            failure = f"the program {why}" + (f"; {failure}" if failure else "")
        elif failure:
            failure = f"the program exited with status 0, but {failure}"
        else:             # its final count (locked: no job writes on): the sweep that would have killed it came late
            count = self.counts.get(key, self.jobs_dir / key, final=True)
            if count.problem is not None:
                failure = f"the job's directory {count.problem}"
            elif count.bytes > self.config.staging_quota:
                failure = (f"the job's directory holds {count.bytes} bytes, past its quota of "
                           f"{self.config.staging_quota} bytes ([jobs] staging_quota)")
        # a Cancel accepted meanwhile (during the stage-out) ends it Cancelled
        if failure:
            self._set_state(key, JobState.FAILED, ended=time.time(), failure=failure, or_cancelled=True)
        else:
            self._set_state(key, JobState.DONE, ended=time.time(), or_cancelled=True)

    def _file_bound_hint(self, job: Job, code: int) -> str:
        """Why a program that ended badly may have: a file of it reached the per-file bound (RLIMIT_FSIZE, [jobs]
        staging_quota). The kernel's SIGXFSZ killed the top program only when it wrote the file itself; a shell
        running the writer exits with 128+SIGXFSZ, and Python (which ignores SIGXFSZ) raises "File too large" and
        exits 1: the status alone named no quota (trial U2)."""
        hint = (f" (a file it wrote reached the job's per-file bound of {self.config.staging_quota} bytes, [jobs] "
                f"staging_quota)")
        if code == 128 + signal.SIGXFSZ:
            return hint
        try:       # through no link the job put there (as tail())
            _, _, text = _tail_fd(open_beneath(self.jobs_dir / job.key, job.spec.stderr), 4096)
        except OSError:
            return ""
        return hint if ("File too large" in text or "File size limit exceeded" in text) else ""

    def _stage_out(self, job: Job, send: bool = True) -> str | None:
        """Hash the outputs (standard output and error first), send those with a destination; the failure, if any.
        Without ``send`` (a job stopped or failed before its stage-out): hash what there is, send nothing."""
        work, spec = self.jobs_dir / job.key, job.spec
        uid = self.store.job_uid(job.key)
        outputs: list[OutputFile] = []
        problems: list[str] = []
        submitter = None        # the submitter's delegated credential, at the first gsiftp:// destination
        counted = 0           # the outputs' bytes so far (``_counted``): no more than the job's quota is hashed
        wanted = [(spec.stdout, None), (spec.stderr, None)] + [(s.name, s.destination) for s in spec.stage_out]
        seen = set()
        for i, (name, destination) in enumerate(wanted):
            if send and destination and self._cancelled(job.key):
                send = False          # Cancel came during the stage-out: the rest is hashed and sent nowhere
            destination = destination if send else None
            if (name, destination) in seen:
                continue
            seen.add((name, destination))
            # what the job wrote, through no symbolic link, owned by its uid: never a file of the service or of
            # another job a link or a hard link names
            try:
                fd = open_output(work, name, uid)
            except FileNotFoundError:
                if i >= 2 and send:
                    problems.append(f"output {name} was not produced")
                continue
            except OSError as exc:           # a FIFO, a device, a link, someone else's file in its place
                problems.append(f"output {name} cannot be read: {exc.strerror}")
                continue
            try:
                counted += _counted(os.fstat(fd))
                if counted > self.config.staging_quota:
                    problems.append(f"output {name} was not hashed: the outputs come to {counted} bytes, past the "
                                    f"job's quota of {self.config.staging_quota} bytes ([jobs] staging_quota)")
                    continue
                path = Path(f"/proc/self/fd/{fd}")       # the file opened, whatever takes its name meanwhile
                digest = hash_file(path)
                if destination:
                    self.store.update(job.key, progress={**job.progress, "current": name})
                    try:
                        if as_submitter(destination) and submitter is None:
                            submitter = self._submitter_credential(job)
                        self.stager.send(path, destination, digest, lambda n: None, credential=submitter)
                    except StagingError as exc:
                        problems.append(f"stage-out failed: {exc}")
                        destination = None        # not sent: it stays in the job's directory (`vmgrid job get`)
                size = os.fstat(fd).st_size
            except OSError as exc:
                problems.append(f"output {name} cannot be read: {exc.strerror}")
                continue
            finally:
                os.close(fd)
            outputs.append(OutputFile(name, size, digest, destination))
            self.store.update(job.key, outputs=tuple(outputs))
        return "; ".join(problems) or None

    # -- control --------------------------------------------------------------------------------------------
    def cancel(self, dn: str, key: str, answer_wait: float = CANCEL_ANSWER_WAIT) -> JobState:
        """Cancel a live job; the state to answer. A job whose program has not started is Cancelled at once. A
        running one gets SIGTERM now (SIGKILL ``kill_grace`` seconds later, sent by a thread of its own) and stays
        in its live state, its Cancel recorded (``CancelRequested``), until its thread has recorded what the
        program wrote (hashed, as any output): only then is it Cancelled, so whoever reads Cancelled finds its
        outputs. One in its stage-out sends no further file. Cancel waits at most ``answer_wait`` seconds for that
        end and answers the state the job has then: no request thread waits for a program's grace or for its
        outputs' hashing."""
        job = self.own_job(dn, key, "job.cancel", "cancel")
        if self.store.request_cancel(key) is None:
            job = self.job(dn, key, "job.cancel")       # ended meanwhile (or destroyed: ResourceUnknown)
            raise IllegalTransition(f"job {key} is already {job.state.value}", state=job.state.value,
                                    operation="Cancel")
        if self._set_state(key, JobState.CANCELLED, expect=LIVE_BEFORE_RUN, ended=time.time()):
            return JobState.CANCELLED               # no program ran: nothing to record (a stage-in stops)
        with self._guard:
            proc, thread = self._procs.get(key), self._threads.get(key)
        if proc is not None:
            proc.terminate(self.config.kill_grace)
        elif thread is None:                        # no thread of the job's own to end it: one that does
            self._spawn(key, lambda: self._end_cancelled(key))
        self._wait_for_end(key, answer_wait)
        job = self.store.get(key)
        return job.state if job is not None else JobState.CANCELLED      # destroyed meanwhile (Cancelled first)

    def _end_cancelled(self, key: str) -> None:
        job = self.store.get(key)
        if job is not None and not job.final:
            self._stage_out(job, send=False)
            self._set_state(key, JobState.CANCELLED, ended=time.time())
        self.free_uid(key)

    def _wait_for_end(self, key: str, timeout: float) -> None:
        def ended() -> bool:
            job = self.store.get(key)
            return job is None or job.final

        with self._ended:
            self._ended.wait_for(ended, timeout)

    def destroy(self, dn: str, key: str) -> None:
        self.own_job(dn, key, "job.destroy", "destroy")
        self._destroy(key, f"by {dn}")

    def _destroy(self, key: str, why: str) -> None:
        job = self.store.get(key)
        if job is None:
            return
        if not job.final:
            self.store.update(key, cancel_requested=True)
            with self._guard:
                proc = self._procs.get(key)
            if proc is not None:
                proc.terminate(self.config.kill_grace)     # the SIGKILL comes later, from a thread of its own
            self._set_state(key, JobState.CANCELLED, ended=time.time(), failure=f"destroyed {why}")
        # its directories are moved aside, still counted for its submitter, and removed after the answer
        # (services/jobs/tree.py): the record goes only once nothing of it is left in jobs/ or control/
        try:
            moved = self.trash.put(self.jobs_dir / key, job.owner)
            self.trash.put(self.control_dir / key, job.owner, ".control")
        except OSError as exc:
            log.warning("job %s: its directories could not be moved aside to be removed: %s", key, exc)
            raise ServiceUnavailable(f"job {key} could not be destroyed: its directory could not be moved aside "
                                     f"({exc.strerror or exc}); the job is kept: try again later",
                                     service="JobService") from None
        if moved is not None:
            self.counts.moved(key, moved)
        held = self.store.destroy(key)
        with self._guard:
            self._known.discard(key)
        if moved is not None:
            self._trash_held[moved] = held      # what it counts for its submitter until the sweeps count it
        self.subscriptions.drop(key)
        remove_job_cgroup(self.pids_cgroup, key)
        self.memory.remove(key)
        self.trash.empty()
        log.info("job %s destroyed %s", key, why)

    def set_termination(self, dn: str, key: str, when: float) -> float:
        job = self.own_job(dn, key, "job.set-lifetime", "set the lifetime of")
        now = time.time()
        if when <= now:
            raise InvalidArgument("the requested termination time is in the past; use Destroy to end it now",
                                  argument="RequestedTerminationTime")
        if when - job.submitted > self.config.max_lifetime:
            allowed = self.config.max_lifetime
            raise LimitExceeded(f"a lifetime of {int(when - job.submitted)} s exceeds this service's {allowed} s",
                                limit="max_lifetime", allowed=str(allowed), requested=str(int(when - job.submitted)))
        self.store.update(key, termination=when)
        return when

    def subscribe(self, dn: str, key: str, consumer: str, until: float | None) -> Subscription:
        """Record a subscription to the job's state changes (the consumer already checked by the caller's
        policy); it ends with the job's lifetime at the latest."""
        job = self.job(dn, key, "job.subscribe")
        if not consumer.startswith(("https://", "http://")):
            raise InvalidArgument("the consumer reference needs an http(s) address", argument="ConsumerReference")
        expires = job.termination if until is None else min(until, job.termination)
        sub = Subscription(new_subscription_key(), key, consumer, dn, expires)
        self.subscriptions.add(sub)
        return sub

    def list(self, dn: str, include_ended: bool = False) -> list[Job]:
        self.check(dn, "job.list")
        return self.store.list(live_only=not include_ended)

    # -- what the owner reads ---------------------------------------------------------------------------------
    def may_read_output(self, dn: str, job: Job) -> bool:
        """What a job wrote is its submitter's, and the VO's admins' (the admin rule): the instance's owner reads
        no admin's job output, nor one admin another's."""
        return self.is_submitter_or_admin(dn, job)

    def may_fetch(self, dn: str, key: str) -> bool:
        """Whether ``dn`` may read job ``key``'s files on the service's GridFTP face (/jobs/<key>/, read and list
        only): who reads its output tails (:meth:`may_read_output`, the rule Cancel and Destroy follow too), of a job
        that is here; a user of the service only."""
        if not self.may_use(dn):
            return False
        job = self.store.get(key)
        return job is not None and self.may_read_output(dn, job)

    def tail(self, dn: str, job: Job, which: str) -> str:
        """The end of the job's standard output or error (``which``) for ``dn``: AccessDenied unless ``dn`` submitted
        the job or is an admin."""
        self.check(dn, "job.read-output", job.key)
        if not self.may_read_output(dn, job):
            raise AccessDenied(f"{dn} may not read the output of job {job.key}: only the job's submitter and the "
                               f"VO's admins may", subject=dn, action="job.read-output", resource=job.key,
                               rule=OUTPUT_RULE)
        name = job.spec.stdout if which == "stdout" else job.spec.stderr
        try:       # through no link the job put there: never the service's files
            return _tail_fd(open_beneath(self.jobs_dir / job.key, name), self.config.tail_bytes)[2]
        except OSError:
            return ""

    def resource_bounds(self, job: Job) -> tuple[BoundEvent, ...] | None:
        """What the service's bounds did to ``job`` (processes the memory bound killed, output dropped past
        max_output, a bound it ran without), as its supervisor recorded it when the program ended: the job's
        ResourceBounds property. None while nothing is known (its program has not ended, or left no exit status)."""
        events = read_bound_events(self.control_dir / job.key)
        return None if events is None else tuple(events)

    def read_log(self, dn: str, name: str, max_bytes: int = 65536) -> tuple[int, bool, str]:
        """The tail of a configured log: (its size, whether the text is only its end, the text)."""
        self.check(dn, "job.read-log", f"log {name}")
        path = self.config.logs.get(name)
        if path is None:
            raise ResourceUnknown(f"no log {name!r}; this service shows: {', '.join(sorted(self.config.logs)) or 'none'}",
                                  resource=name)
        try:
            return _tail(Path(path), max_bytes)
        except FileNotFoundError:
            return 0, False, ""
        except OSError as exc:
            raise ResourceUnknown(f"log {name!r} cannot be read: {exc.strerror}", resource=name) from None

    # -- lifetimes and restarts -------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        self.check_quotas()
        self._remove_orphans()
        expired = self.store.expired(time.time() if now is None else now)
        for key in expired:
            try:
                self._destroy(key, "when its termination time passed")
            except Exception:
                log.exception("could not destroy expired job %s", key)
        self.trash.empty()             # what a removal left (a job still writing), or a restart found
        remove_left_cgroups([self.pids_cgroup, self.memory.parent], lambda: set(self.store.live_keys()))
        return expired

    def _remove_orphans(self) -> None:
        """Directories in jobs/ and control/ of no job (left by a Destroy of an earlier version, or a crash
        between a Destroy's record and its move) go to the trash, found so by two passes in a row of the search. A
        sweep looks at ORPHAN_BATCH entries of a pass (a pass over many kept jobs takes several sweeps: a sweep's cost
        does not grow with them), each against the keys of the jobs kept (no record is read)."""
        with self._guard:                  # a submit makes a job's directory and its key under it
            if self._orphan_walk is None:
                self._orphan_walk = self._entries()
            for _ in range(ORPHAN_BATCH):
                path = next(self._orphan_walk, None)
                if path is None:
                    break
                if path.name not in self._known:
                    self._orphan_pass.add(path)
            else:
                return                     # the pass goes on at the next sweep
            self._orphan_walk, found, self._orphan_pass = None, self._orphan_pass, set()
        for path in self.trash.orphans(found):
            try:
                self.trash.put(path, "", ".orphan" if path.parent == self.jobs_dir else ".control")
            except OSError as exc:
                log.warning("could not move the orphaned %s aside: %s", path, exc)

    def _entries(self) -> Iterator[Path]:
        """The entries of jobs/ and control/, read as they are asked for (one pass of the orphan search)."""
        for d in (self.jobs_dir, self.control_dir):
            with os.scandir(d) as entries:
                for entry in entries:
                    yield d / entry.name

    def check_quotas(self) -> None:
        """Kill each running job whose directory holds more than the job's quota (``[jobs] staging_quota``), or
        whose submitter's job directories together (ended jobs' included) hold more than ``[jobs]
        submitter_quota``: it ends Failed with the reason. (Each file the program writes is bounded by the kernel,
        RLIMIT_FSIZE; the directories are counted by the sweeps, each at most every sweep: tree.Counts.)"""
        with self._guard:
            running = list(self._procs.items())
        fresh = self.counts.refresh({key: self.jobs_dir / key for key, _ in running if key not in self._over_quota})
        # trash entries and ended jobs' directories too: a job of the same submitter may still write into a file there
        # it opened before (attack14 H1). Trash entries in a round of their own (they go as the trash is emptied);
        # ended jobs' as the store says they are due (:meth:`_recount_ended`): no sweep reads every ended job
        trash = {name: self.trash.path / name for name in os.listdir(self.trash.path)}
        for name, count in self.counts.refresh(trash).items():
            self._trash_held[name] = count.at_least(self.config.staging_quota)
        self._trash_held = {name: held for name, held in self._trash_held.items() if name in trash}
        self.counts.keep(set(self.store.live_keys()) | set(trash))     # the ended ones' are the store's (held)
        self._recount_ended()
        totals: dict[str, int] = {}
        for key, proc in running:
            if key in self._over_quota or key not in fresh:
                continue
            count = fresh[key]
            used = count.bytes
            job = self.store.get(key)
            if count.problem is not None:        # uncountable is over quota, never "vanished" (attack13 H2, H4)
                self._over_quota[key] = f"the job's directory {count.problem}: the job was killed"
            elif used > self.config.staging_quota:
                self._over_quota[key] = (f"the job's directory grew to {used} bytes, past its quota of "
                                         f"{self.config.staging_quota} bytes ([jobs] staging_quota): the job was "
                                         f"killed")
            elif job is not None:
                if job.owner not in totals:
                    totals[job.owner] = self.submitter_bytes(job.owner)
                if totals[job.owner] > self.config.submitter_quota:
                    self._over_quota[key] = (f"the submitter's job directories grew to {totals[job.owner]} bytes, "
                                             f"past the submitter's quota of {self.config.submitter_quota} bytes "
                                             f"([jobs] submitter_quota): the job was killed")
            if key in self._over_quota:
                log.warning("job %s: %s", key, self._over_quota[key])
                proc.terminate(self.config.kill_grace)

    def submitter_bytes(self, dn: str) -> int:
        """What all of ``dn``'s job directories hold, ended jobs' included until destroyed, and destroyed jobs'
        until removed (the trash): each directory's last count (services/jobs/tree.py; a running job's is counted
        by the sweeps, an ended job's at its end and again by the sweeps: :meth:`_recount_ended`); one that could
        not be counted counts a job's quota. Her ended jobs' are one running total in the store (held_by): none of
        their records is read."""
        quota = self.config.staging_quota
        total = self.store.ended_held(dn)
        for key in self.store.live_keys(dn):
            total += self.counts.get(key, self.jobs_dir / key).at_least(quota)
        for path in self.trash.of(dn):
            held = self._trash_held.get(path.name)
            total += held if held is not None else self.counts.get(path.name, path, True).at_least(quota)
        return total

    def _recount_ended(self) -> None:
        """Count again the directories of ended jobs the store says are due (at most RECOUNT_BATCH, the longest due
        first), each every tree.ENDED_EVERY sweep intervals at most, for at most tree.WALK_SHARE of the interval, and
        rest nine times what the round took (the share of a core tree.py's counting keeps): what was not reached
        stays due, first at the next round. A sweep reads the due ones' keys only, however many jobs have ended."""
        if time.monotonic() < self._recount_rest:
            return
        started, budget = time.monotonic(), tree.WALK_SHARE * self.counts.interval
        for key in self.store.due_recounts(time.time(), RECOUNT_BATCH):
            count = tree.count_tree(self.jobs_dir / key, self.config.max_files)
            self.store.set_held(key, count.at_least(self.config.staging_quota), self._next_recount())
            if time.monotonic() - started >= budget:
                break
        spent = time.monotonic() - started
        self._recount_rest = time.monotonic() + spent * (1 - tree.WALK_SHARE) / tree.WALK_SHARE

    def _next_recount(self) -> float:
        """When an ended job's directory counted now is due to be counted again: tree.ENDED_EVERY of the counts'
        intervals (the sweep interval) from now, by the wall clock (the store keeps it across restarts)."""
        return time.time() + tree.ENDED_EVERY * self.counts.interval

    def _check_submitter_quota(self, dn: str) -> None:
        used = self.submitter_bytes(dn)
        if used >= self.config.submitter_quota:
            raise LimitExceeded(f"your job directories hold {used} bytes, ended jobs' included, and this service "
                                f"keeps at most {self.config.submitter_quota} bytes of one submitter's ([jobs] "
                                f"submitter_quota): destroy jobs you have fetched (vmgrid job destroy) to submit more",
                                limit="submitter_quota", allowed=str(self.config.submitter_quota),
                                requested=str(used))

    def reconcile(self) -> dict[str, int]:
        """At start (after a crash too): every live job is found again running (re-attached), ended (its
        real exit), or Failed with the reason; none is lost silently."""
        report = {"reattached": 0, "finished": 0, "failed_interrupted": 0, "failed_lost": 0}
        for job in self.store.list(live_only=True):
            key, control = job.key, self.control_dir / job.key
            if job.state == JobState.ACTIVE:
                proc = Process.reattach(job.pid, job.pid_start, control) if job.pid else None
                if proc is not None:
                    self._resume.append((key, lambda k=key, p=proc: self._watch(k, p)))
                    report["reattached"] += 1
                    continue
                exit = read_exit(control / "exit.json")
                if exit.code is not None:
                    self._resume.append((key, lambda k=key, e=exit: self._finish(k, e)))
                    report["finished"] += 1
                    continue
                lock(self.jobs_dir / key)
                self._stage_out(job, send=False)      # what it wrote before it was lost stays fetchable
                self._set_state(key, JobState.FAILED, ended=time.time(),
                                failure="Lost: the job's process ended while the job service was down and left no "
                                        "exit status")
                self.free_uid(key)
                report["failed_lost"] += 1
                continue
            started = read_supervisor(control) if job.state in LIVE_BEFORE_RUN else None
            if started is not None:          # it died between starting the program and recording it
                proc = Process.reattach(*started, control)
                exit = read_exit(control / "exit.json")
                if proc is not None or exit.code is not None:
                    self._set_state(key, JobState.ACTIVE, started=time.time(), pid=started[0], pid_start=started[1])
                    self._resume.append((key, (lambda k=key, p=proc: self._watch(k, p)) if proc is not None else
                                         (lambda k=key, e=exit: self._finish(k, e))))
                    report["reattached" if proc is not None else "finished"] += 1
                    continue
            self._set_state(key, JobState.FAILED, ended=time.time(),
                            failure=f"Interrupted: the job service restarted while the job was {job.state.value}"
                                    + ("; the program had ended" if job.state == JobState.STAGE_OUT else
                                       "; the program was not started"))
            report["failed_interrupted"] += 1
        # a uid held by no job that goes on (ended, destroyed, or failed above while the service was down) is freed
        resumed = {key for key, _ in self._resume}
        for key in self.store.held_uids():
            if key not in resumed:
                self.free_uid(key)
        # the cgroups of jobs that ended, failed above or were destroyed while the service was away (a supervisor
        # killed with it left them): the jobs found running, or to be finished, keep theirs
        remove_left_cgroups([self.pids_cgroup, self.memory.parent], lambda: set(self.store.live_keys()))
        return report


def kill_every_process_of(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a job's: root's never), as ``uid`` itself: kill(-1) reaches every process
    the caller may signal (its real or saved uid), all at once (the kernel holds the task list meanwhile, so none
    forks past it), the caller (a shell) and init excepted."""
    if uid < 1000:
        raise ValueError(f"uid {uid} is no job's")
    try:
        subprocess.run(["/bin/sh", "-c", "kill -s KILL -- -1 2>/dev/null; exit 0"], user=uid, group=uid,
                       extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/", stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not end the processes of uid %d: %s", uid, exc)


def _counted(st: os.stat_result) -> int:
    """What a file counts against a quota: the larger of its size and its allocated blocks. A sparse file costs
    no disk but is hashed and served at its size; blocks reserved past the size (fallocate) are disk taken."""
    return max(st.st_size, st.st_blocks * 512)


def _tail(path: Path, limit: int) -> tuple[int, bool, str]:
    """The end of a plain file; anything else a job may leave in its place (a FIFO, which would block the
    reader for ever, a device) raises OSError."""
    return _tail_fd(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), limit)


def _tail_fd(fd: int, limit: int) -> tuple[int, bool, str]:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a plain file")
    with open(fd, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - limit))
        data = f.read(limit)
    return size, size > limit, data.decode("utf-8", "replace")
