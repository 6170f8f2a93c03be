"""The job service in a real container on loopback (HTTPS, WS-Security both ways), through zeep built
from its served WSDL: stage-in and stage-out over real GridFTP with verified outputs, failing and
cancelled jobs, notifications, another user refused everything, schema-invalid requests refused with
typed faults, every response valid against the published schema."""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from pathlib import Path

import pytest
from cheroot import wsgi
from lxml import etree

from client.soap import GridServiceClient
from gridftp import GridFTPServer, download, upload
from gridftp.client import GridFTPClient
from gridftp.errors import GridFTPError
from security.wssec import verify_envelope
from services.container.assemble import build_container, build_service
from services.container.contract import Contract
from services.faults import AccessDenied, IllegalTransition, InvalidArgument, ResourceUnknown
from services.jobs.client import JobClient
from services.jobs.config import JobsConfig
from services.jobs.staging import staging_area
from services.jobs.store import JobSpec, StageIn, StageOut
from services.jobs.wire import JOB
from services.wsrf.properties import PropertySet
from tests.fixtures.grid import base_config
from tests.fixtures.repository import signed_call

CONTRACT = Contract("jobs.wsdl")
PY = "/usr/bin/python3"      # a program a job may run: jobs run under a uid of their own (not root's /root/...)
pytestmark = pytest.mark.timeout(300)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError("condition not reached")


class JobGrid:
    def __init__(self, pki, root: Path, threads: int | None = None, **jobs):
        self.pki = pki
        cfg = base_config(pki, root / "state", 0)
        if threads is not None:
            cfg.container.threads = threads
        cfg.jobs = JobsConfig(owner=pki.alice.dn, admins=[pki.admin.dn], gridftp_port=0, consumer_allow=["127.0.0.0/8"],
                              logs={"container": str(root / "container.log")}, **{"kill_grace": 2.0, **jobs})
        (root / "container.log").write_text("line 1\ncontainer started\n")
        self.service = build_service("jobs", cfg)
        self.container = build_container(cfg, [self.service]).start()
        self.url = self.container.url("JobService")
        # the scientist's own GridFTP server, hers alone: the job service reads her inputs and writes her outputs
        # there as her (the proxy she delegated at submit), never as itself (the host DN); who came is in `seen`
        self.files = root / "scientist"
        (self.files / "results").mkdir(parents=True)
        self.seen: list[tuple[str, str]] = []
        self.gridftp = GridFTPServer(self.files, "127.0.0.1", 0, credential=pki.host, trust=pki.trust(),
                                     authorize=lambda dn, op, path: self.seen.append((dn, op)) or dn == pki.alice.dn,
                                     upload_area="/results")
        self.gridftp.start()
        self.gridftp_url = f"gsiftp://localhost:{self.gridftp.port}"
        self.clients = []

    def client(self, user) -> JobClient:
        c = GridServiceClient(self.url, user.proxy, self.pki.trust())
        self.clients.append(c)
        return JobClient(c)

    def close(self):
        """End what a test left running, then stop: no job outlives its test (a job service's uid range stays its own
        while a job of it runs on, so a later test's service could not take it: services/jobs/uids.py)."""
        jobs = self.service.jobs
        for job in jobs.store.list(live_only=True):
            try:
                jobs.cancel(self.pki.admin.dn, job.key)
            except IllegalTransition:        # it ended meanwhile
                pass
        deadline = time.monotonic() + 120
        while jobs._threads and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in self.clients:
            c.close()
        self.gridftp.stop()
        self.container.stop()


@pytest.fixture
def grid(grid_pki, tmp_path):
    g = JobGrid(grid_pki, tmp_path)
    yield g
    g.close()


class Validating:
    """Checks every payload the service returns against the published schema; records the operations."""

    def __init__(self, jobs: JobClient):
        self.seen: set[str] = set()
        original = jobs.service.call

        def call(operation, *args, **kwargs):
            payload = original(operation, *args, **kwargs)
            CONTRACT.validator.assertValid(payload)
            self.seen.add(operation)
            return payload

        jobs.service.call = call


class Consumer:
    """A notification consumer that keeps the job state changes of signed Notify messages."""

    def __init__(self, trust):
        self.trust = trust
        self.changes: queue.Queue = queue.Queue()
        self.server = wsgi.Server(("127.0.0.1", 0), self._app, numthreads=2)

    def _app(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        caller, root = verify_envelope(body, self.trust)
        for change in root.iter(f"{{{JOB}}}StateChangeNotification"):
            self.changes.put((change.findtext(f"{{{JOB}}}JobKey"), change.findtext(f"{{{JOB}}}newState"), caller.dn))
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [b""]

    def __enter__(self):
        self.server.prepare()
        threading.Thread(target=self.server.serve, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.stop()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.bind_addr[1]}/notify"

    def until(self, key: str, state: str, timeout: float = 60):
        while True:
            got = self.changes.get(timeout=timeout)
            if got[:2] == (key, state):
                return got


def test_a_job_with_stage_in_and_out_every_operation_validates_and_outputs_come_back_verified(grid, grid_pki, tmp_path):
    alice = grid.client(grid_pki.alice)
    check = Validating(alice)
    (grid.files / "ref.fasta").write_bytes(b">ref\nACGTACGT\n")
    local = tmp_path / "query.fasta"
    local.write_bytes(b">q\nACGA\n")
    staged = alice.stage_local(local)                        # the scientist's file, over the service's own face
    assert staged.sha256 == sha(local.read_bytes())
    script = ("import hashlib; a = open('in/query.fasta','rb').read(); b = open('in/ref.fasta','rb').read();"
              "open('result.txt','w').write(f'{len(a)} {len(b)}\\n'); print('aligned')")
    spec = JobSpec(PY, ("-c", script), stage_in=(
        StageIn(f"staged:{local.name}", "in/query.fasta", staged.sha256),
        StageIn(f"{grid.gridftp_url}/ref.fasta", "in/ref.fasta")),
        stage_out=(StageOut("result.txt", f"{grid.gridftp_url}/results/result.txt"),), lifetime=600)
    with Consumer(grid_pki.trust()) as consumer:
        key = alice.submit(spec)
        alice.subscribe(key, consumer.url)
        info = alice.wait(key, timeout=120)
        assert consumer.until(key, "Done")[2] == grid_pki.host.subject      # signed by the service
    assert (info.state, info.exit_code, info.failure) == ("Done", 0, None)
    assert info.stdout_tail == "aligned\n" and info.owner == grid_pki.alice.dn
    assert info.progress["filesDone"] == info.progress["filesTotal"] == 2
    expected = b"8 14\n"
    assert (grid.files / "results" / "result.txt").read_bytes() == expected      # sent to the scientist's server
    assert {dn for dn, _ in grid.seen} == {grid_pki.alice.dn} and "write" in {op for _, op in grid.seen}  # as her
    outputs = {name: (size, digest) for name, size, digest, _ in info.outputs}
    assert outputs["result.txt"] == (len(expected), sha(expected))
    fetched = alice.fetch_outputs(info, tmp_path / "out")                         # and over the face, verified
    assert sorted(p.name for p in fetched) == ["result.txt", "stderr", "stdout"]
    assert (tmp_path / "out" / "result.txt").read_bytes() == expected
    # the rest of the contract
    assert [e.text for e in alice.property(key, f"{{{JOB}}}State")] == ["Done"]
    assert alice.set_lifetime(key, 1200) is not None
    assert [j.findtext(f"{{{JOB}}}State") for j in alice.list()] == []             # live jobs only
    assert len(alice.list(include_ended=True)) == 1
    assert "container started" in alice.log("container")
    with pytest.raises(IllegalTransition):
        alice.cancel(key)
    alice.destroy(key)
    with pytest.raises(ResourceUnknown):
        alice.status(key)
    # Cancel's answer: test_cancel_of_a_long_job; RefreshJobProxy's: test_jobs_delegation.py's refresh test
    assert check.seen | {"Cancel", "RefreshJobProxy"} == set(CONTRACT.operations)


def test_outputs_come_only_from_the_face_the_service_is_pinned_to(grid, grid_pki, tmp_path):
    """A job service reached through its instance is held to one DN (the subject the node issued it): its GridFTP
    face must present that DN too, so a DirectoryURL naming another server (a guest's service is untrusted) reaches
    no other server with the caller's credential. Pinned to the service's own DN the outputs come; pinned to
    another, nothing is fetched and nothing written."""
    from types import SimpleNamespace

    from gridftp.errors import AuthenticationError

    alice = grid.client(grid_pki.alice)
    info = alice.wait(alice.submit(JobSpec(PY, ("-c", "print('pinned')"))), timeout=120)
    assert info.state == "Done"

    def pinned(dn):
        return JobClient(SimpleNamespace(credential=grid_pki.alice.proxy, trust=grid_pki.trust(),
                                         expected_host_dn=dn, url=grid.url))

    with pytest.raises(AuthenticationError, match="expected '/O=Grid/OU=vmgrid/CN=host/guest.example.org'"):
        pinned("/O=Grid/OU=vmgrid/CN=host/guest.example.org").fetch_outputs(info, tmp_path / "elsewhere")
    assert not any((tmp_path / "elsewhere").rglob("*")) if (tmp_path / "elsewhere").exists() else True
    fetched = pinned(grid_pki.host.subject).fetch_outputs(info, tmp_path / "out")
    assert (tmp_path / "out" / "stdout").read_text() == "pinned\n" and len(fetched) == 2


def test_a_staging_area_and_a_jobs_stage_in_hold_at_most_the_staging_quota(grid_pki, tmp_path):
    """[jobs] staging_quota bounds each user's staging area over the service's GridFTP face (the server's upload
    quota: 552 naming the quota and the usage, before a byte is written; nothing of a refused upload stays or
    counts) and what one job's stage-in fetches into its directory (the job Failed naming the quota, nothing
    of the file left). Without it a client could fill the guest's disk, and the service's SQLite with it."""
    assert JobsConfig().staging_quota == 4 * 1024 ** 3          # the default (docs/configuration.md)
    (tmp_path / "g").mkdir()
    grid = JobGrid(grid_pki, tmp_path / "g", staging_quota=20000)   # at least 16384 (JOB_DIR_FLOOR)
    try:
        alice = grid.client(grid_pki.alice)
        first, second, small = tmp_path / "first.dat", tmp_path / "second.dat", tmp_path / "small.dat"
        first.write_bytes(b"f" * 12000)
        second.write_bytes(b"s" * 12000)
        small.write_bytes(b"m" * 8000)
        alice.stage_local(first)
        with pytest.raises(GridFTPError) as exc:
            alice.stage_local(second)                  # what `vmgrid job submit --stage-in` shows (CLIError)
        assert getattr(exc.value, "code", None) == 552 and "12000 of your 20000 bytes" in str(exc.value)
        area = grid.service.jobs.staging_dir / staging_area(grid_pki.alice.dn)
        assert sorted(p.name for p in area.iterdir()) == ["first.dat"]
        alice.stage_local(small)                       # the refused upload took none of the room
        # no directory in a staging area (its files would escape the quota's count)
        face = grid.service.transfers.server.url(f"/staging/{staging_area(grid_pki.alice.dn)}/sub/x.dat")
        with pytest.raises(GridFTPError):
            upload(small, face.replace("localhost", "127.0.0.1"), 1, credential=grid_pki.alice.proxy,
                   trust=grid_pki.trust(), retries=0, timeout=5, state_dir=tmp_path / "st")
        assert not (area / "sub").exists()
        # a job's stage-in from a gsiftp:// source: at most the quota into its directory
        (grid.files / "big.dat").write_bytes(b"b" * 30000)
        key = alice.submit(JobSpec(PY, ("-c", "pass"), stage_in=(StageIn(f"{grid.gridftp_url}/big.dat", "in/big.dat"),)))
        info = alice.wait(key, timeout=120)
        assert info.state == "Failed" and "stage-in quota" in info.failure and "staging_quota" in info.failure
        left = grid.service.jobs.jobs_dir / key / "in"
        assert not left.exists() or list(left.iterdir()) == []
        # two staged files that fit the area but not, together, one job's stage-in
        key = alice.submit(JobSpec(PY, ("-c", "pass"), stage_in=(StageIn("staged:first.dat", "a"),
                                                                 StageIn("staged:small.dat", "b"),
                                                                 StageIn("staged:first.dat", "c"))))
        info = alice.wait(key, timeout=120)
        assert info.state == "Failed" and "staged:first.dat: larger than the 0 bytes left" in info.failure
        assert not (grid.service.jobs.jobs_dir / key / "c").exists()
        # a file larger than the whole quota: no deletion makes room, and the advice is the job service's (trial13
        # U3: "delete or register uploads first", the repository's)
        huge = tmp_path / "huge.dat"
        huge.write_bytes(b"h" * 30000)
        with pytest.raises(GridFTPError) as exc:
            alice.stage_local(huge)
        assert "this needs 30000 bytes, more than all 20000 bytes of your quota" in str(exc.value)
        assert "[jobs] staging_quota: ask its operator" in str(exc.value) and "register" not in str(exc.value)
        assert "gsiftp:// URL" not in str(exc.value)     # trial14 U3: a gsiftp:// stage-in meets the same bound
    finally:
        grid.close()


def test_a_file_staged_for_one_job_leaves_the_staging_area_when_the_job_has_it(grid_pki, tmp_path):
    """The staging area (bounded by staging_quota) kept every file `vmgrid job submit --stage-in` ever uploaded, so
    a scientist who had staged a few GiB of inputs over her jobs could stage nothing more, and vmgrid has no command
    to delete them. A file uploaded for one job (stage_local(once=True), as job submit does) leaves the area once
    the job has copied it; a file put there otherwise serves any number of jobs and stays (jobs.xsd)."""
    (tmp_path / "g").mkdir()
    grid = JobGrid(grid_pki, tmp_path / "g")
    try:
        alice = grid.client(grid_pki.alice)
        area = grid.service.jobs.staging_dir / staging_area(grid_pki.alice.dn)
        data = tmp_path / "db.fa"
        data.write_bytes(b">s\nACGT\n")
        once = alice.stage_local(data, once=True)
        assert once.source.startswith("staged:once.") and once.source.endswith(".db.fa") and once.name == "db.fa"
        kept = alice.stage_local(data)
        assert sorted(p.name for p in area.iterdir()) == sorted([once.source[7:], "db.fa"])
        reader = ("-c", "print(open('db.fa').read().split()[1])")
        job = alice.submit(JobSpec(PY, reader, stage_in=(once,)))
        assert alice.wait(job, timeout=120).stdout_tail == "ACGT\n"
        for _ in range(2):                                  # the other serves one job after another
            job = alice.submit(JobSpec(PY, reader, stage_in=(kept,)))
            assert alice.wait(job, timeout=120).stdout_tail == "ACGT\n"
        assert [p.name for p in area.iterdir()] == ["db.fa"]
    finally:
        grid.close()


def test_a_failing_job_is_failed_with_its_exit_code_and_stderr(grid, grid_pki):
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(PY, ("-c", "import sys; print('oops', file=sys.stderr); sys.exit(7)")))
    info = alice.wait(key, timeout=120)
    assert (info.state, info.exit_code) == ("Failed", 7)
    assert "exited with status 7" in info.failure and info.stderr_tail == "oops\n"


def test_cancel_of_a_long_job(grid, grid_pki):
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(PY, ("-c", "import time; print('started', flush=True); time.sleep(600)")))
    check = Validating(alice)
    info = alice.status(key)
    while info.stdout_tail != "started\n":
        assert not info.final
        info = alice.status(key)
    assert info.state == "Active"
    assert alice.cancel(key) in ("Cancelled", "Active")   # Active: still being stopped, its outputs recorded
    info = alice.wait(key, timeout=60)
    assert info.state == "Cancelled" and info.exit_code == -15 and not info.cancel_requested
    assert [name for name, *_ in info.outputs] == ["stdout", "stderr"]
    assert "Cancel" in check.seen


def test_cancels_under_way_hold_no_request_thread(grid_pki, tmp_path):
    """A container of two request threads, three jobs whose programs ignore SIGTERM, a grace of 600 s. Each Cancel
    held its request thread until its program had ended and its outputs were recorded (600 s here): two Cancels
    took every thread and a third request waited for them. Now each Cancel answers the job's live state at once,
    and a GetMultipleResourceProperties sent while the Cancels are under way is answered while the programs still
    run (the jobs Active, their Cancels recorded): no request waited for a program. The test then ends the
    programs itself; each job ends Cancelled with its outputs."""
    import os
    import signal

    (tmp_path / "g").mkdir()
    grid = JobGrid(grid_pki, tmp_path / "g", threads=2, kill_grace=600.0)
    try:
        alice = grid.client(grid_pki.alice)
        check = Validating(alice)
        program = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True);"
                   "time.sleep(900)")
        keys = [alice.submit(JobSpec(PY, ("-c", program))) for _ in range(3)]
        for key in keys:
            while alice.status(key).stdout_tail != "started\n":
                pass
        answers: dict[str, str] = {}
        clients = {key: grid.client(grid_pki.alice) for key in keys}      # one connection each: all at once
        checks = [Validating(c) for c in clients.values()]
        cancellers = [threading.Thread(target=lambda k=k, c=c: answers.update({k: c.cancel(k)}))
                      for k, c in clients.items()]
        for t in cancellers:
            t.start()
        during = [alice.status(key) for key in keys]          # sent while the Cancels are under way
        for t in cancellers:
            t.join(120)
        assert [i.state for i in during] == ["Active"] * 3    # answered while every program still ran
        assert answers == {key: "Active" for key in keys}
        assert all("Cancel" in c.seen for c in checks)        # each answer valid against the schema
        after = [alice.status(key) for key in keys]           # every Cancel answered: every program still runs
        assert [(i.state, i.cancel_requested, i.outputs) for i in after] == [("Active", True, [])] * 3
        store = grid.service.jobs.store
        for key in keys:
            os.killpg(store.get(key).pid, signal.SIGKILL)     # what the grace would end, 600 s later
        for key in keys:
            info = alice.wait(key, timeout=60)
            assert (info.state, info.cancel_requested) == ("Cancelled", False)
            assert {name: size for name, size, *_ in info.outputs} == {"stdout": len("started\n"), "stderr": 0}
        assert "GetMultipleResourceProperties" in check.seen
    finally:
        for job in grid.service.jobs.store.list(live_only=True):
            if job.pid:
                try:
                    os.killpg(job.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        grid.close()


def test_another_user_is_denied_every_operation_and_the_files(grid, grid_pki, tmp_path):
    alice, bob = grid.client(grid_pki.alice), grid.client(grid_pki.bob)
    key = alice.submit(JobSpec(PY, ("-c", "open('secret.txt','w').write('s')"), stage_out=(StageOut("secret.txt"),)))
    info = alice.wait(key, timeout=120)
    assert info.state == "Done"
    unknown = "job-" + "0" * 32
    for k in (key, unknown):                 # the same answer for a job that does not exist: nothing revealed
        for call in (bob.status, bob.cancel, bob.destroy, lambda x: bob.set_lifetime(x, 60),
                     lambda x: bob.property(x, f"{{{JOB}}}State"), lambda x: bob.subscribe(x, "http://127.0.0.1:9/")):
            with pytest.raises(AccessDenied):
                call(k)
    for call in (lambda: bob.submit(JobSpec("true")), bob.list, bob.info, lambda: bob.log("container")):
        with pytest.raises(AccessDenied):
            call()
    with pytest.raises(GridFTPError):        # nor the job's files over the GridFTP face
        download(f"{info.directory_url}secret.txt", tmp_path / "stolen", 1, credential=grid_pki.bob.proxy,
                 trust=grid_pki.trust())
    assert not (tmp_path / "stolen").exists()
    admin = grid.client(grid_pki.admin)       # a VO admin may read it
    assert admin.status(key).state == "Done"
    assert alice.status(key).state == "Done"  # and nothing bob did changed it


def test_a_jobs_output_tail_is_its_submitters_and_the_admins_only(grid, grid_pki):
    """StdoutTail and StderrTail are what the job wrote: the instance's owner reads none of an admin's job (its files
    on the GridFTP face are his alone too), an admin reads hers (the admin rule), anyone else nothing; the job's
    other properties stay readable as before (JobClient.status asks them again without the tails). Without the check
    alice read the admin's secret."""
    alice, admin = grid.client(grid_pki.alice), grid.client(grid_pki.admin)
    his = admin.submit(JobSpec(PY, ("-c", "import sys; print('admin secret'); sys.stderr.write('admin err')")))
    hers = alice.submit(JobSpec(PY, ("-c", "print('alice out')")))
    assert admin.wait(his, timeout=120).stdout_tail == "admin secret\n"
    for prop in ("StdoutTail", "StderrTail"):
        with pytest.raises(AccessDenied, match="may not read the output of job"):
            alice.property(his, f"{{{JOB}}}{prop}")
    # her status of it asks every property, the tails with them: refused those, it asks again without (trial15 X2)
    seen = alice.status(his)
    assert (seen.state, seen.owner, seen.stdout_tail, seen.stderr_tail, seen.tails_withheld) == \
        ("Done", grid_pki.admin.dn, "", "", True)
    assert [name for name, *_ in seen.outputs] == [name for name, *_ in admin.status(his).outputs]
    assert [el.text for el in alice.property(his, f"{{{JOB}}}State")] == ["Done"]
    assert admin.wait(hers, timeout=120).stdout_tail == "alice out\n"      # the admin rule
    assert alice.status(hers).stdout_tail == "alice out\n"


# a job that keeps swapping its directory d for a symbolic link to `outside` (an atomic exchange, renameat2
# RENAME_EXCHANGE), 5 ms each way, and says which is in place (the file `state`)
SWAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.mkdir("d")
open("d/out.txt", "w").write("inside\\n")
os.symlink(sys.argv[1], "l")
def put(state):
    open("state.tmp", "w").write(state)
    os.rename("state.tmp", "state")
put("dir")
n = 0
while True:
    time.sleep(0.005)
    if libc.renameat2(-100, b"d", -100, b"l", 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    n += 1
    put("link" if n % 2 else "dir")
"""


@pytest.mark.timeout(600)
def test_a_job_swapping_a_directory_for_a_link_makes_the_face_read_nothing_outside_its_directory(grid, grid_pki,
                                                                                              tmp_path):
    """The GridFTP face (root) looked a path up, then stat'ed, opened, hashed or listed it by that path again: a
    running job that swaps a directory of its own for a symbolic link in between made it serve what the link names
    (here a directory of root's standing for another user's job or the host key). The job swaps d for a link all
    the time while alice reads d/out.txt, its size, its checksum and d's listing; half the rounds the face, once it
    has looked the path up, waits until the link is in place (a hook that widens the window: without the fix those
    rounds read the outside file). Every answer is the inside file, or a refusal."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "out.txt").write_text("SECRET " * 100)
    (outside / "outside-only.txt").write_text("x")
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(PY, ("-c", SWAPPER, str(outside))))
    work = grid.service.jobs.jobs_dir / key
    wait_until(lambda: (work / "state").exists() or alice.status(key).final)
    assert alice.status(key).state == "Active"
    files = grid.service.transfers.server.files
    plain_real_path = files.real_path
    widen = threading.Event()

    def real_path_then_wait_for_the_link(vpath):
        real = plain_real_path(vpath)
        if widen.is_set() and vpath.startswith("/jobs/"):
            wait_until(lambda: (work / "state").read_text() == "link", timeout=10)
        return real

    files.real_path = real_path_then_wait_for_the_link
    inside, refused, outside_seen = 0, 0, []
    url = f"{grid.service.transfers.base_url}/jobs/{key}/d/out.txt".replace("localhost", "127.0.0.1")
    try:
        with GridFTPClient(url, credential=grid_pki.alice.proxy, trust=grid_pki.trust(),
                           server_dn=grid_pki.host.subject) as face:
            for round in range(160):
                (widen.set if round % 2 else widen.clear)()
                for command in (f"SIZE /jobs/{key}/d/out.txt", f"CKSM SHA256 0 -1 /jobs/{key}/d/out.txt",
                                f"STAT /jobs/{key}/d"):
                    wait_until(lambda: (work / "state").read_text() == "dir", timeout=10)   # each starts with d
                    reply = face.command(command)
                    if reply.code == 550:
                        refused += 1
                    elif reply.text.strip() in ("7", sha(b"inside\n")) or "out.txt" in reply.text:
                        inside += 1
                    if "SECRET" in reply.text or "outside-only" in reply.text or reply.text.strip() in (
                            "700", sha(b"SECRET " * 100)):
                        outside_seen.append((command, reply.text))
                if round % 8 in (0, 1):
                    got = tmp_path / f"got{round}"
                    try:
                        download(url, got, 1, credential=grid_pki.alice.proxy, trust=grid_pki.trust(), retries=0)
                    except GridFTPError:
                        refused += 1
                    else:
                        data = got.read_bytes()
                        if data == b"inside\n":
                            inside += 1
                        else:
                            outside_seen.append(("RETR", data[:40]))
    finally:
        files.real_path = plain_real_path
        alice.cancel(key)
    assert outside_seen == []
    assert inside > 0           # the face still serves d (refused: the rounds that found the link in d's place)
    assert alice.wait(key, timeout=120).state == "Cancelled"


class OlderWire:
    """services.jobs.wire as a job service from before CancelRequested (and so ResourceBounds) serves it (an older
    guest image), or from before the properties named in ``lacks`` (wire's class names): its property set has none of
    them and refuses their names, as any unknown one (counted in ``refused``)."""

    def __init__(self, lacks: tuple[str, ...] = ("CancelRequested", "ResourceBounds")):
        from services.jobs import wire
        self.wire = wire
        self.refused = []
        older = self

        class Older(PropertySet):
            def values(self, resource, qname):
                if qname not in self.by_name:
                    older.refused.append(qname)
                return super().values(resource, qname)

        self.JOB_PROPERTIES = Older([p for p in wire.JOB_PROPERTIES.properties
                                     if type(p).__name__ not in lacks], what="a job")

    def __getattr__(self, name):
        return getattr(self.wire, name)


def test_a_new_client_follows_and_cancels_a_job_on_a_service_from_before_cancel_requested(grid, grid_pki,
                                                                                         monkeypatch):
    """The real service, its properties as an older job service has them: the client's first status is refused
    for CancelRequested (InvalidArgumentFault naming it) and asked again without it (then for ResourceBounds, newer
    still, and again without that); the client remembers them, so
    following the job (wait polls status) and its Cancel cost no second refusal (without that, each poll was
    asked twice and refused once); the job's other properties read as before, CancelRequested as false."""
    older = OlderWire()
    monkeypatch.setattr("services.jobs.service.wire", older)
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(PY, ("-c", "import time; print('started', flush=True); time.sleep(600)")))
    info = wait_until(lambda: (i := alice.status(key)).stdout_tail == "started\n" and i)
    assert (info.state, info.cancel_requested, info.executable) == ("Active", False, PY)
    assert older.refused == [f"{{{JOB}}}CancelRequested", f"{{{JOB}}}ResourceBounds"]
    with pytest.raises(InvalidArgument, match="no resource property"):          # the service itself is older
        alice.property(key, f"{{{JOB}}}CancelRequested")
    older.refused.clear()
    alice.cancel(key)
    done = alice.wait(key, timeout=120)
    assert (done.state, done.cancel_requested, done.resource_bounds) == ("Cancelled", False, None)
    assert {name for name, *_ in done.outputs} == {"stdout", "stderr"}
    assert older.refused == []


def test_two_running_jobs_of_one_submitter_reach_neither_each_others_files(grid, grid_pki):
    """Her jobs shared her uid: one read and rewrote another running beside it by its key. Each running job has a
    uid of its own now: both are refused (EACCES), the first's file is untouched, and its uid is not the second's."""
    alice = grid.client(grid_pki.alice)
    first = alice.submit(JobSpec(PY, ("-c", "import os, time; open('secret.txt', 'w').write('first secret');"
                                            "print(os.getuid(), flush=True); time.sleep(600)")))
    uid = wait_until(lambda: alice.status(first).stdout_tail.strip())
    probe = (f"import os\nfor mode in 'r', 'w':\n    try:\n        f = open('../{first}/secret.txt', mode)\n"
             f"        print(f.read() if mode == 'r' else 'opened')\n    except OSError as exc:\n"
             f"        print(mode, exc.errno)\nprint(os.getuid())")
    second = alice.wait(alice.submit(JobSpec(PY, ("-c", probe))), timeout=120)
    assert second.state == "Done" and second.stdout_tail.split("\n")[:2] == ["r 13", "w 13"], second.stdout_tail
    assert second.stdout_tail.split("\n")[2] != uid
    assert (grid.service.jobs.jobs_dir / first / "secret.txt").read_text() == "first secret"
    assert alice.status(first).state == "Active"
    alice.cancel(first)
    assert alice.wait(first, timeout=120).state == "Cancelled"


def test_a_limited_proxy_starts_no_job(grid, grid_pki):
    """A limited proxy moves data and starts nothing (Globus' GRAM refuses it; vmgrid's default policy refuses it
    vm.deploy): the owner's limited proxy, handed to a data service, cannot run a command in her VM. Her full proxy
    still can, and the limited one still reads what she has. Fails without the check: the job ran."""
    from security.pki import make_proxy
    limited = make_proxy(grid_pki.alice.credential, limited=True, key=grid_pki.keys.take())
    jobs = JobClient(GridServiceClient(grid.url, limited, grid_pki.trust()))
    grid.clients.append(jobs.service)
    with pytest.raises(AccessDenied, match="limited proxy"):
        jobs.submit(JobSpec(PY, ("-c", "print('ran')")))
    assert jobs.list(include_ended=True) == []
    grid.client(grid_pki.alice).submit(JobSpec("true"))
    assert len(jobs.list(include_ended=True)) == 1


@pytest.mark.parametrize("payload, argument", [
    (f'<job:SubmitJob xmlns:job="{JOB}"><job:argument>x</job:argument></job:SubmitJob>', "executable"),
    (f'<job:SubmitJob xmlns:job="{JOB}"><job:executable>true</job:executable><job:stageIn><job:source>'
     f'http://example.org/x</job:source><job:name>x</job:name></job:stageIn></job:SubmitJob>', "source"),
    (f'<job:SubmitJob xmlns:job="{JOB}"><job:executable>true</job:executable><job:stdout>../../etc/x'
     f'</job:stdout></job:SubmitJob>', "stdout"),
    (f'<job:SubmitJob xmlns:job="{JOB}"><job:executable>true</job:executable><job:lifetime>-5</job:lifetime>'
     f'</job:SubmitJob>', "lifetime"),
    (f'<job:SubmitJob xmlns:job="{JOB}"><job:executable>true</job:executable><job:lifetime>0</job:lifetime>'
     f'</job:SubmitJob>', "lifetime"),            # not the service's default: another client may send 0
    (f'<job:GetLog xmlns:job="{JOB}"><job:name>../etc/passwd</job:name></job:GetLog>', "name"),
])
def test_schema_invalid_requests_get_a_typed_fault(grid, grid_pki, payload, argument):
    status, fault = signed_call(grid.url, etree.fromstring(payload), grid_pki.alice.proxy, grid_pki.trust())
    assert status == 500
    detail = fault.find("detail/{http://vmgrid.org/ns/faults/1}InvalidArgumentFault")
    assert detail is not None and argument in detail.findtext("{http://vmgrid.org/ns/faults/1}Description")
    assert grid.service.jobs.store.list() == []


@pytest.mark.parametrize("spec", [
    JobSpec(PY, ("-c", "pass"), stage_out=(StageOut("result.vmgrid-part", None),)),
    JobSpec(PY, ("-c", "pass"), stdout="log/out.vmgrid-part.ranges"),
    JobSpec(PY, ("-c", "pass"), stage_in=(StageIn("staged:a", "in.vmgrid-part"),))])
def test_names_the_transfer_keeps_for_its_part_files_are_refused_at_submission(grid, grid_pki, spec):
    """An output named X.vmgrid-part could never be fetched (the face does not serve such names) and would collide
    with output X's part file in `vmgrid job get`: refused with the name and the reason, nothing submitted."""
    alice = grid.client(grid_pki.alice)
    with pytest.raises(InvalidArgument, match="are the transfer's own; choose another name"):
        alice.submit(spec)
    assert alice.list(include_ended=True) == []


def test_a_bad_job_key_is_invalid_and_an_unknown_one_is_resource_unknown(grid, grid_pki):
    alice = grid.client(grid_pki.alice)
    with pytest.raises(InvalidArgument):
        alice.status("job-not-a-key")
    with pytest.raises(ResourceUnknown):
        alice.status("job-" + "1" * 32)


@pytest.mark.timeout(120)
def test_an_upload_refused_at_stor_fails_at_once_with_the_servers_message(grid, grid_pki, tmp_path):
    """The server refuses the STOR after the client opened its data connections (here 550: a staging area has
    no directories; the server leaves its passive port open and never accepts): the client reads the refusal
    and ends its data connections, whose TLS handshakes would otherwise wait for their timeout. The timeout
    here is an hour: without the fix the test is stopped by its own 120 s timeout instead."""
    small = tmp_path / "small.dat"
    small.write_bytes(b"m" * 400)
    area = staging_area(grid_pki.alice.dn)
    face = grid.service.transfers.server.url(f"/staging/{area}/sub/x.dat").replace("localhost", "127.0.0.1")
    for parallel in (1, 3):
        with pytest.raises(GridFTPError) as exc:
            upload(small, face, parallel, credential=grid_pki.alice.proxy, trust=grid_pki.trust(), retries=0,
                   timeout=3600, state_dir=tmp_path / "st")
        assert getattr(exc.value, "code", None) == 550 and "no directories in a staging area" in str(exc.value)
    alice = grid.client(grid_pki.alice)
    assert alice.stage_local(small).name == "small.dat"          # the service goes on


def test_a_subscribers_stalling_consumer_names_are_bounded_as_hers(grid_pki, tmp_path, monkeypatch):
    """A job service's Subscribe looks the consumer's name up as the node's does, on the subscriber's own share of the
    lookups (services/wsrf/notification.py RESOLVERS_PER_CALLER): alice's names that the name server never answers
    wait out the deadline two at a time, the next is refused at once naming her lookups; before, the job service
    charged them to the process's total only, where her stalled names kept everyone's lookups waiting."""
    from services.faults import InvalidArgument
    from services.wsrf import notification
    from services.wsrf.notification import ConsumerPolicy
    from tests.fixtures.resolver import stalling

    grid = JobGrid(grid_pki, tmp_path)
    names = [f"stalled-{n}.test" for n in range(notification.RESOLVERS_PER_CALLER + 1)]
    release = stalling(monkeypatch, *names)
    try:
        grid.service.consumer_policy = ConsumerPolicy(allow=("127.0.0.0/8",), resolve_timeout=0.5)
        alice = grid.client(grid_pki.alice)
        key = alice.submit(JobSpec(PY, ("-c", "import time; time.sleep(600)")))
        said = []
        for name in names:
            with pytest.raises(InvalidArgument) as exc:
                alice.subscribe(key, f"http://{name}:9/notify")
            said.append(exc.value.description)
        assert all("did not resolve within 0.5 s" in d for d in said[:-1]), said
        assert (f"has not answered {notification.RESOLVERS_PER_CALLER} lookups of names you gave this node"
                in said[-1]), said
    finally:
        release.set()
        grid.close()
