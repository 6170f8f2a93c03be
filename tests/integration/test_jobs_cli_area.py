"""`vmgrid job …` against a real `vmgrid serve jobs` process (trial15 X2, X8, X13, N1): the instance's owner follows an
admin's job without its output tails; a file put in the caller's staging area (`vmgrid job info` shows its URL) is
staged in as `staged:NAME`; `vmgrid job lifetime` moves a job's termination time within the service's max_lifetime;
and a `--stage-in F` upload that failed leaves no restart marker behind. docs/jobs.md's staging-area block is run as
written."""
from __future__ import annotations

import json
import re
import socket
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from client.localgrid import LocalGrid
from tests.integration.test_jobs_cli import DOCS, PY, start_jobs, vmgrid

pytestmark = pytest.mark.timeout(300)
WITHHELD = "(output tails: the submitter's and the admins' only)"


@pytest.fixture
def grid(tmp_path):
    """alice owns the instance, admin is a VO admin (as test_jobs_cli's grid)."""
    with LocalGrid(tmp_path / "grid") as g:
        sp = start_jobs(g)
        g.jobs_url = f"{sp.base_url}/wsrf/services/JobService"
        yield g


def test_the_instance_owner_follows_an_admins_job_without_its_output_tails(grid):
    """alice owns the instance, admin is a VO admin. His job's output tails are his and the admins' only, the rest is
    hers to see: `job status` (and --json) and `job wait` show its state, owner, times and outputs, with a line saying
    the tails are withheld, and never the tails. Before: AccessDenied and nothing else, rc 1."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--wait", "--stage-out", "secret.txt", "--", "/bin/sh", "-c",
                 "echo s3cret > secret.txt; echo s3cret", user="admin").stdout.strip()
    admin_dn = grid.user("admin").dn
    r = vmgrid(grid, "job", "status", url, key)
    assert "s3cret" not in r.stdout + r.stderr
    assert re.search(r"^state +Done$", r.stdout, re.M), r.stdout
    assert re.search(rf"^owner +{re.escape(admin_dn)}$", r.stdout, re.M), r.stdout
    assert re.search(r"^ended +\d{4}-", r.stdout, re.M), r.stdout
    assert re.search(r"^output +secret\.txt 7 bytes sha256 [0-9a-f]{64}$", r.stdout, re.M), r.stdout
    assert WITHHELD in r.stdout.splitlines()
    shown = json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)
    assert (shown["state"], shown["owner"], shown["outputTailsWithheld"]) == ("Done", admin_dn, True)
    assert shown["stdoutTail"] == "" and "secret.txt" in [o["name"] for o in shown["outputs"]]
    r = vmgrid(grid, "job", "wait", url, key)
    assert r.stdout == "Done (exit code 0)\n" and WITHHELD in r.stderr and "s3cret" not in r.stderr
    # the submitter still reads them, and nothing says they are withheld
    r = vmgrid(grid, "job", "status", url, key, user="admin")
    assert "--- stdout (tail) ---\ns3cret\n" in r.stdout and WITHHELD not in r.stdout
    # what the docs say she may not do stays refused: the lifetime of his job
    r = vmgrid(grid, "job", "lifetime", url, key, "2h", check=False)
    assert r.returncode == 1 and r.stderr.startswith("vmgrid: AccessDenied: ") and r.stderr.count("\n") == 1


def test_the_instance_owner_getting_an_admins_job_is_told_whose_files_they_are(grid, tmp_path):
    """trial16 T4: `job get` of an admin's job by the instance's owner printed the face's raw refusal (`'SIZE
    /jobs/job-…/stdout' refused: 550 …: no such file, or permission denied.`); the client had the job's owner from
    its status. Now one line naming whose it is and what she sees; nothing is fetched, nothing is made."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--wait", "--", "/bin/sh", "-c", "echo s3cret",
                 user="admin").stdout.strip()
    r = vmgrid(grid, "job", "get", url, key, "-o", str(tmp_path / "got"), check=False)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"vmgrid: job {key} is {grid.user('admin').dn}'s: its files are its submitter's and the job "
                        f"service's admins' only, nothing fetched (you see its state and outputs: vmgrid job status "
                        f"{url} {key})\n"), r.stderr
    assert not (tmp_path / "got").exists()
    # the submitter fetches them as before
    vmgrid(grid, "job", "get", url, key, "-o", str(tmp_path / "his"), user="admin")
    assert (tmp_path / "his" / "stdout").read_text() == "s3cret\n"


def test_the_staging_area_commands_of_docs_jobs_md_run_as_written(grid, tmp_path):
    """docs/jobs.md's block: `job info` shows the caller's staging area as a gsiftp:// URL, `vmgrid transfer` puts
    ref.fa there, a job stages it in as staged:ref.fa (before: "--stage-in staged:ref.fa: no such file"), and
    `job lifetime ... 2d` moves the job's end two days on. The file stays in the area for the next job."""
    text = DOCS.read_text()
    m = re.search(r"<!-- run as written by tests/integration/test_jobs_cli_area.py -->\n```sh\n(.*?)```", text, re.S)
    assert m, "docs/jobs.md lost its staging-area block"
    work = tmp_path / "work"
    work.mkdir()
    (work / "ref.fa").write_text(">ref\nGATTACA\n")
    repo = Path(__file__).resolve().parents[2]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vmgrid").write_text(f"#!/bin/sh\nexec env PYTHONPATH={repo} {PY} -m client.cli \"$@\"\n")
    (bindir / "vmgrid").chmod(0o755)
    env = {**grid.env("alice"), "JOBS": grid.jobs_url, "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"}
    r = subprocess.run(["bash", "-e", "-c", m.group(1) + 'echo "$REF"\n'], cwd=work, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    area = re.search(r"^stagingURL +(gsiftp://\S+/staging/[0-9a-f]+/)$", r.stdout, re.M)
    assert area, r.stdout
    assert re.search(rf"^instanceOwner +{re.escape(grid.user('alice').dn)}$", r.stdout, re.M), r.stdout
    assert "--- stdout (tail) ---\n13 ref.fa\n" in r.stdout                    # wc -c of the staged file
    key = r.stdout.split()[-1]
    line = next(line for line in r.stdout.splitlines() if line.startswith(f"{key}: terminates at "))
    end = datetime.strptime(line.split("terminates at ")[1][:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    assert abs(end - (datetime.now(timezone.utc) + timedelta(days=2))) < timedelta(minutes=10), line
    status = json.loads(vmgrid(grid, "job", "status", grid.jobs_url, key, "--json").stdout)
    assert datetime.fromisoformat(status["terminationTime"]).replace(microsecond=0) == end
    # the area's file serves the next job too (staged: files stay), and the service names the area of the caller
    again = vmgrid(grid, "job", "submit", grid.jobs_url, "--wait", "--stage-in", "staged:ref.fa", "--", "wc", "-c",
                   "ref.fa").stdout.strip()
    assert json.loads(vmgrid(grid, "job", "status", grid.jobs_url, again, "--json").stdout)["stdoutTail"] == \
        "13 ref.fa\n"
    assert vmgrid(grid, "job", "info", grid.jobs_url, "--staging-url").stdout == area.group(1) + "\n"
    assert vmgrid(grid, "job", "info", grid.jobs_url, "--staging-url", user="admin").stdout != area.group(1) + "\n"
    r = vmgrid(grid, "job", "submit", grid.jobs_url, "--stage-in", "staged:a/b", "--", "true", check=False)
    assert r.returncode == 1 and "staging area, which is flat" in r.stderr and r.stderr.count("\n") == 1


def test_job_lifetime_beyond_the_services_max_lifetime_is_refused_with_the_latest_end(grid):
    """The service keeps a job at most max_lifetime (7 d) from its submission: `job lifetime ... 8d` is refused in one
    line naming the bound and the latest end; the termination time is unchanged. An ISO 8601 time is taken too."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--wait", "--", "true").stdout.strip()
    before = json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["terminationTime"]
    r = vmgrid(grid, "job", "lifetime", url, key, "8d", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"vmgrid: 8d: job {key} would live longer than this service keeps a job: its max_lifetime is 604800 s " \
           f"from a job's submission (submitted " in r.stderr and "termination time is unchanged" in r.stderr
    assert json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["terminationTime"] == before
    for when, message in (("-5m", "'-5m' is in the past: give a duration from now, e.g. 5m"),
                          ("soon", "'soon' is neither a duration")):
        r = vmgrid(grid, "job", "lifetime", url, key, when, check=False)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    when = (datetime.now(timezone.utc) + timedelta(hours=30)).replace(microsecond=0)
    r = vmgrid(grid, "job", "lifetime", url, key, when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert r.stdout.startswith(f"{key}: terminates at {when:%Y-%m-%d %H:%M:%S} UTC (")


def test_a_failed_stage_in_upload_leaves_no_restart_marker(tmp_path):
    """The job service's GridFTP face has one data port, held: `job submit --stage-in F`'s upload is refused 425
    (transient) until it gives up. Its file's once-name is never asked for again, so no restart marker of it stays in
    ~/.cache/vmgrid/gridftp (before: one stayed for good, trial15 N1). `vmgrid transfer` of the same file to the same
    face keeps its marker, for the same command to resume."""
    held = socket.socket()
    held.bind(("0.0.0.0", 0))
    held.listen(1)
    port = held.getsockname()[1]
    with LocalGrid(tmp_path / "grid") as g, held:
        alice, admin = g.user("alice"), g.user("admin")
        sp = g.start("jobs", ["jobs"], {"jobs": {"owner": alice.dn, "admins": [admin.dn], "gridftp_port": 0},
                                        "gridftp": {"data_ports": f"{port},{port}"}})
        url = f"{sp.base_url}/wsrf/services/JobService"
        (tmp_path / "seqs.txt").write_text("acgt\n" * 1000)
        cache = tmp_path / "cache"
        env = {**g.env("alice"), "XDG_CACHE_HOME": str(cache)}
        r = subprocess.run([PY, "-m", "client.cli", "job", "submit", url, "--stage-in", str(tmp_path / "seqs.txt"),
                            "--", "true"], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 1 and "425" in r.stderr and r.stdout == "", r.stdout + r.stderr
        markers = cache / "vmgrid" / "gridftp"
        assert not markers.exists() or list(markers.iterdir()) == []
        # a transfer the user names keeps its marker (the same command resumes it): the check above is not vacuous
        area = subprocess.run([PY, "-m", "client.cli", "job", "info", url, "--staging-url"], env=env,
                              capture_output=True, text=True, timeout=180).stdout.strip()
        r = subprocess.run([PY, "-m", "client.cli", "transfer", str(tmp_path / "seqs.txt"), area, "--retries", "0"],
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 1 and len(list(markers.iterdir())) == 1, r.stderr
