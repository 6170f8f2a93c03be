"""Forks refused at [jobs] max_processes, and what the bounds did to a job in ListJobs and in its end's notification
(jobstat16): the real job service in a real container on loopback (HTTPS, WS-Security both ways), a real job on this
host's pids cgroups forking until the kernel refuses it. Before, a refused fork was recorded nowhere (the job's pids
cgroup, with its pids.events, went with the job); ListJobs and the notifications carried no ResourceBounds. A client
that does not ask ListJobs for them is answered as before (valid against the schema of before)."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from cheroot import wsgi
from lxml import etree

from client.cli import main
from security.wssec import verify_envelope
from services.container.contract import WSDL_DIR, Contract
from services.jobs import wire
from services.jobs.bounds import BoundEvent
from services.jobs.store import JobSpec
from tests.integration.test_jobs_service import CONTRACT, PY, JobGrid, Validating
from tests.integration.test_jobs_service import Consumer as StateConsumer

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup").is_dir(),
                                 reason="a pids cgroup per job needs root and a cgroup hierarchy")]
MAX = 16
# waits for the file 'go' (the test subscribes meanwhile), forks children that wait on a pipe until 3 forks are
# refused, ends them and exits 0: Done with exit code 0, and only ResourceBounds says forks were refused
FORKER = """
import os, time
while not os.path.exists('go'):
    time.sleep(0.05)
r, w = os.pipe()
n = refused = 0
while refused < 3 and n < 1000:
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    n += 1
print('forked', n, 'refused', refused, flush=True)
os.close(w)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""
LINE = f"3 forks refused at {MAX} processes and threads ([jobs] max_processes)"
EVENT = BoundEvent("processes", LINE, "max_processes", MAX, forks_refused=3)


@pytest.fixture
def grid(grid_pki, tmp_path):
    g = JobGrid(grid_pki, tmp_path, max_processes=MAX)
    yield g
    g.close()


class Consumer(StateConsumer):
    """A notification consumer keeping each signed StateChangeNotification element it receives (its server, start
    and stop as test_jobs_service's)."""

    def __init__(self, trust):
        self.trust, self.got, self.cond = trust, [], threading.Condition()
        self.server = wsgi.Server(("127.0.0.1", 0), self._app, numthreads=2)

    def _app(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        _, root = verify_envelope(body, self.trust)
        with self.cond:
            self.got += list(root.iter(f"{{{wire.JOB}}}StateChangeNotification"))
            self.cond.notify_all()
        start_response("200 OK", [("Content-Type", "text/xml")])
        return [b""]

    def until(self, state: str) -> etree._Element:
        with self.cond:
            assert self.cond.wait_for(lambda: any(e.findtext(wire.q("newState")) == state for e in self.got), 120)
            return next(e for e in self.got if e.findtext(wire.q("newState")) == state)


def cli(grid, command: str, *args: str) -> int:
    return main(["job", command, grid.url, "--proxy", str(grid.pki.alice.proxy_path), "--cert-dir",
                 str(grid.pki.cert_dir), *args])


def older_schema(tmp_path: Path) -> etree.XMLSchema:
    """The validator of jobs.wsdl's schemas as they were before jobstat16: no includeResourceBounds, no ResourceBounds
    in JobType nor in StateChangeNotification, no forksRefused (what an older client holds)."""
    old = tmp_path / "older-wsdl"
    shutil.copytree(WSDL_DIR, old)
    xsd = etree.parse(str(old / "jobs.xsd"))
    xs = {"xs": "http://www.w3.org/2001/XMLSchema"}
    gone = xsd.xpath("//xs:element[@name='includeResourceBounds' or @name='forksRefused' or "
                     "@ref='job:ResourceBounds']", namespaces=xs)
    assert len(gone) == 4
    for el in gone:
        el.getparent().remove(el)
    xsd.write(str(old / "jobs.xsd"))
    wrapper = etree.Element(f"{{{xs['xs']}}}schema", nsmap=xs)
    for imp in Contract("jobs.wsdl").tree.iterfind(f"//{{{xs['xs']}}}schema/{{{xs['xs']}}}import"):
        etree.SubElement(wrapper, f"{{{xs['xs']}}}import", namespace=imp.get("namespace"),
                         schemaLocation=(old / imp.get("schemaLocation")).as_uri())
    return etree.XMLSchema(wrapper)


def test_forks_refused_at_max_processes_are_a_processes_event_in_status_list_and_the_end_notification(
        grid, grid_pki, tmp_path, capsys):
    alice = grid.client(grid_pki.alice)
    check = Validating(alice)                      # every answer valid against the published schema
    key = alice.submit(JobSpec(PY, ("-c", FORKER)))
    with Consumer(grid_pki.trust()) as consumer:
        alice.subscribe(key, consumer.url)
        (grid.service.jobs.jobs_dir / key / "go").write_text("")
        info = alice.wait(key, timeout=120)
        assert (info.state, info.exit_code, info.failure) == ("Done", 0, None), info.stderr_tail
        assert info.stdout_tail.endswith(" refused 3\n"), info.stdout_tail
        # the property: before, empty (nothing recorded the refusals)
        assert info.resource_bounds == [EVENT]
        (el,) = alice.property(key, wire.ResourceBounds.qname)
        assert el.findtext(f"{{{wire.JOB}}}event/{{{wire.JOB}}}forksRefused") == "3"
        # the end's notification carries them (valid against the schema), the earlier ones none
        done = consumer.until("Done")
        CONTRACT.validator.assertValid(done)
        assert wire.ResourceBounds.parse(done.find(wire.ResourceBounds.qname)) == [EVENT]
        assert all(e.find(wire.ResourceBounds.qname) is None for e in consumer.got if e is not done)

    # ListJobs: asked for, each ended job carries them; not asked (an older client), answered as before
    (listed,) = [j for j in alice.list(include_ended=True, resource_bounds=True)
                 if key in etree.tostring(j).decode()]
    assert wire.ResourceBounds.parse(listed.find(wire.ResourceBounds.qname)) == [EVENT]
    assert "ListJobs" in check.seen
    older = older_schema(tmp_path)
    plain = alice.service.call("ListJobs", includeEnded=True)
    assert plain.find(f"job:Job/{wire.ResourceBounds.qname}", wire.NS) is None
    older.assertValid(plain)
    with pytest.raises(etree.DocumentInvalid):     # what only a client that asks is sent
        older.assertValid(alice.service.call("ListJobs", includeEnded=True, includeResourceBounds=True))

    # the CLI: status's line, wait's final line, list's BOUNDS marker (and --json)
    capsys.readouterr()
    assert cli(grid, "status", key) == 0
    assert f"\nprocesses        {LINE}\n" in capsys.readouterr().out
    assert cli(grid, "wait", key) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Done (exit code 0); processes: {LINE}"
    quiet = alice.submit(JobSpec("true"))
    alice.wait(quiet, timeout=120)
    assert cli(grid, "list", "--all") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KEY", "STATE", "EXIT", "BOUNDS", "PROGRAM", "SUBMITTED"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows[key][1:5] == ["Done", "0", "processes", PY]
    assert rows[quiet][1:4] == ["Done", "0", "true"]            # no bound met: the column is empty
    assert cli(grid, "list", "--all", "--json") == 0
    by_key = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert (by_key[key]["boundsMet"], by_key[key]["resourceBounds"]) == (["processes"], [LINE])
    assert (by_key[quiet]["boundsMet"], by_key[quiet]["resourceBounds"]) == ([], [])


def test_a_job_within_max_processes_has_no_processes_event(grid, grid_pki):
    alice = grid.client(grid_pki.alice)
    key = alice.submit(JobSpec(PY, ("-c", "import os; pid = os.fork(); pid and os.waitpid(pid, 0)")))
    info = alice.wait(key, timeout=120)
    assert (info.state, info.resource_bounds) == ("Done", [])
