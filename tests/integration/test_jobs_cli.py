"""`vmgrid serve jobs` as a process and `vmgrid job …` as a scientist runs them: docs/jobs.md's commands
run as written, errors as one clear line, and a job service killed with SIGKILL and restarted that
answers every job with its real state or Failed with the reason."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from client.localgrid import LocalGrid

pytestmark = pytest.mark.timeout(300)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "jobs.md"
PY = sys.executable
JOB_PY = "/usr/bin/python3"      # a program a job may run: jobs run under a uid of their own (not root's /root/...)


def doc_block() -> str:
    text = DOCS.read_text()
    m = re.search(r"<!-- run as written by tests/integration/test_jobs_cli.py -->\n```sh\n(.*?)```", text, re.S)
    assert m, "docs/jobs.md lost its tested block"
    return m.group(1)


def start_jobs(g: LocalGrid, port: int | None = None):
    alice, admin = g.user("alice"), g.user("admin")
    return g.start("jobs", ["jobs"], {"jobs": {
        "owner": alice.dn, "admins": [admin.dn], "gridftp_port": 0, "kill_grace": 2.0,
        "logs": {"container": str(g.root / "jobs.log")}}}, port=port)


@pytest.fixture
def grid(tmp_path):
    with LocalGrid(tmp_path / "grid") as g:
        g.user("bob")
        sp = start_jobs(g)
        g.jobs_url = f"{sp.base_url}/wsrf/services/JobService"
        yield g


def vmgrid(grid, *args, user="alice", check=True, cwd=None):
    r = subprocess.run([PY, "-m", "client.cli", *args], env=grid.env(user), capture_output=True, text=True,
                       timeout=180, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"vmgrid {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_the_commands_of_docs_jobs_md_run_as_written(grid, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    repo = Path(__file__).resolve().parents[2]
    bindir = tmp_path / "bin"                 # `vmgrid` on PATH: this checkout's command line
    bindir.mkdir()
    (bindir / "vmgrid").write_text(f"#!/bin/sh\nexec env PYTHONPATH={repo} {PY} -m client.cli \"$@\"\n")
    (bindir / "vmgrid").chmod(0o755)
    env = {**grid.env("alice"), "JOBS": grid.jobs_url, "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"}
    r = subprocess.run(["bash", "-e", "-c", doc_block()], cwd=work, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (work / "results" / "sorted.txt").read_text() == "acgt\ngattaca\ntata\n"
    assert "acgt\ngattaca\ntata\n" in r.stdout                   # cat results/sorted.txt
    assert [p.name for p in (work / "only").iterdir()] == ["sorted.txt"]       # one output by name
    assert "only/sorted.txt\n" in r.stdout and "cancelled/stdout\n" in r.stdout
    assert (work / "cancelled" / "stdout").read_text() in ("", "started\n")   # what it wrote before its Cancel
    assert "is Cancelled: its outputs are what its program wrote before it ended" in r.stderr
    assert "Done (exit code 0)" in r.stdout and "Cancelled" in r.stdout
    assert "output           sorted.txt 18 bytes sha256" in r.stdout
    assert "serving JobService" in r.stdout                      # the container's log, read by its owner
    assert "destroyed" in r.stdout


def test_the_refresh_proxy_commands_of_docs_jobs_md_run_as_written(grid, tmp_path):
    """docs/jobs.md's `vmgrid job refresh-proxy` block as written: a job with a gsiftp:// stage-out (to $OUT, never
    reached: the job is cancelled before its stage-out) gets a new proxy twice, the second for 6 h; each replaces the
    one the service keeps. The proxy's end is printed."""
    import datetime as dt

    from cryptography import x509

    text = DOCS.read_text()
    m = re.search(r"<!-- run as written by tests/integration/test_jobs_cli.py \(with \$OUT[^>]*-->\n```sh\n(.*?)```",
                  text, re.S)
    assert m, "docs/jobs.md lost its refresh-proxy block"
    work = tmp_path / "work"
    work.mkdir()
    repo = Path(__file__).resolve().parents[2]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vmgrid").write_text(f"#!/bin/sh\nexec env PYTHONPATH={repo} {PY} -m client.cli \"$@\"\n")
    (bindir / "vmgrid").chmod(0o755)
    env = {**grid.env("alice"), "JOBS": grid.jobs_url, "OUT": "gsiftp://localhost:9/results",
           "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"}
    r = subprocess.run(["bash", "-e", "-c", m.group(1) + 'echo "$ALIGN"\n'], cwd=work, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    key = r.stdout.split()[-1]
    lines = [line for line in r.stdout.splitlines() if "now move with a proxy of yours valid until" in line]
    assert len(lines) == 2 and all(line.startswith(f"{key}: its gsiftp:// files") for line in lines), r.stdout
    until = [dt.datetime.strptime(line.rsplit(" ", 1)[1], "%Y-%m-%dT%H:%M:%SZ") for line in lines]
    assert until[1] < until[0]                              # --lifetime 6h: sooner than the job's end (12 h at most)
    kept = next((grid.root).rglob(f"control/{key}/delegated-proxy.pem")).read_bytes()
    assert x509.load_pem_x509_certificate(kept).not_valid_after_utc.replace(tzinfo=None, microsecond=0) == until[1]
    vmgrid(grid, "job", "cancel", grid.jobs_url, key)


def test_errors_are_one_clear_line(grid, tmp_path):
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--", JOB_PY, "-c", "import sys; sys.exit(3)").stdout.strip()
    r = vmgrid(grid, "job", "wait", url, key, check=False)
    assert r.returncode == 1 and f"vmgrid: job {key} Failed: the program exited with status 3" in r.stderr
    for args, message in (
            (("job", "status", url, key), "vmgrid: AccessDenied: "),
            (("job", "list", url), "vmgrid: AccessDenied: "),
            (("job", "submit", url, "--", "true"), "vmgrid: AccessDenied: ")):
        r = vmgrid(grid, *args, user="bob", check=False)
        assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
        # trial16 T2: the refusal names where this service's admins come from, not "the VO's admins" (a VO admin
        # of the Authorization service who is not one of them was told only VO admins may)
        assert r.stderr.endswith(": only the instance's owner and this job service's admins may use it ([jobs] "
                                 "admins; in a guest, the [vmmanager] job_admins of the node that deployed it)\n"), \
            r.stderr
    for args, message in (
            (("job", "status", url, "job-42"), "is not a job key"),
            (("job", "submit", url, "--stage-in", str(tmp_path / "none.txt"), "--", "true"), "no such file"),
            (("job", "status", url, "job-" + "a" * 32), "vmgrid: ResourceUnknown: "),
            (("job", "status", "ftp://not-a-job-service", key), "vmgrid: 'ftp://not-a-job-service' is not a JobService URL"),
            (("job", "status", "my-vm", key, "--node", "https://localhost:1/wsrf/services/VMManagerService"),
             "vmgrid: cannot fetch the WSDL of https://localhost:1/"),
            (("job", "submit", url, "--lifetime", "99d", "--", "true"), "vmgrid: LimitExceeded: ")):
        r = vmgrid(grid, *args, check=False)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_what_cannot_work_is_refused_before_submission_with_what_would(grid, tmp_path):
    """--lifetime 0 was the service's default (24 h), silently; --stdin naming a local file failed the job after
    submission (`no such file in the job's directory`) with no word of --stage-in."""
    url = grid.jobs_url
    (tmp_path / "seqs.txt").write_text("tata\nacgt\n")
    for args, message in (
            (("--lifetime", "0"), "vmgrid: --lifetime 0: a job's lifetime is a positive duration"),
            (("--lifetime=-5m",), "vmgrid: --lifetime -5m: a job's lifetime is a positive duration"),
            (("--stdin", "seqs.txt"), "vmgrid: --stdin seqs.txt names a file of the job's directory, not a local one: "
                                      "that directory holds only what --stage-in brings; send your local file with "
                                      "--stage-in seqs.txt"),
            (("--stdin", "other.txt", "--stage-in", "seqs.txt"), "vmgrid: --stdin other.txt is not staged in: the "
                                                                 "job's directory holds only what --stage-in brings "
                                                                 "(here seqs.txt)")):
        r = vmgrid(grid, "job", "submit", url, *args, "--", "sort", cwd=tmp_path, check=False)
        assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert vmgrid(grid, "job", "list", url, "--all").stdout.count("job-") == 0       # nothing was submitted
    key = vmgrid(grid, "job", "submit", url, "--stage-in", "seqs.txt", "--stdin", "seqs.txt", "--lifetime", "1h",
                 "--wait", "--", "sort", cwd=tmp_path).stdout.strip()
    status = json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)
    assert status["stdoutTail"] == "acgt\ntata\n"
    from datetime import datetime
    lived = datetime.fromisoformat(status["terminationTime"]) - datetime.fromisoformat(status["submitted"])
    assert round(lived.total_seconds()) == 3600


def test_a_failed_wait_shows_why_with_the_stderr_tail_and_a_cancelled_jobs_outputs_are_fetched(grid, tmp_path):
    """`job wait` of a failed job showed no stderr tail (only `job status` did), a missing output read `Failed (exit
    code 0)`, a program named with its arguments in one word failed with no word of the shell; `job get` of a
    Cancelled job exited 0 having fetched nothing, and could not fetch one output alone."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--", JOB_PY, "-c", "import sys; sys.stderr.write('bad input\\n'); "
                                                             "sys.exit(3)").stdout.strip()
    r = vmgrid(grid, "job", "wait", url, key, check=False)
    assert r.returncode == 1 and r.stdout == "Failed (exit code 3)\n"
    assert r.stderr.endswith(f"vmgrid: job {key} Failed: the program exited with status 3\n"
                             f"--- stderr (tail) ---\nbad input\n"), r.stderr
    r = vmgrid(grid, "job", "submit", url, "--stage-out", "result.png", "--wait", "--", "true", check=False)
    assert r.returncode == 1 and r.stderr.endswith(": the program exited with status 0, but output result.png was "
                                                   "not produced\n"), r.stderr
    r = vmgrid(grid, "job", "submit", url, "--wait", "--", "sort seqs.txt", check=False)
    assert r.returncode == 1 and (
        "Failed: cannot start sort seqs.txt: No such file or directory (no shell runs a job: 'sort seqs.txt' is taken "
        "as one program's name; give the program and each argument as words of their own, sort seqs.txt, or run a "
        "shell yourself: sh -c '...')") in r.stderr

    key = vmgrid(grid, "job", "submit", url, "--", JOB_PY, "-c", "import sys, time; print('partial', flush=True); "
                 "sys.stderr.write('warn\\n'); time.sleep(600)").stdout.strip()
    while json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["stdoutTail"] != "partial\n":
        pass
    assert vmgrid(grid, "job", "cancel", url, key).stdout == "Cancelled\n"
    r = vmgrid(grid, "job", "get", url, key, "-o", "all", cwd=tmp_path)
    assert r.stdout == "all/stdout\nall/stderr\n" and "is Cancelled: its outputs are what its program wrote" in r.stderr
    assert (tmp_path / "all" / "stdout").read_text() == "partial\n"
    assert (tmp_path / "all" / "stderr").read_text() == "warn\n"
    r = vmgrid(grid, "job", "get", url, key, "stderr", "-o", "one", cwd=tmp_path)
    assert r.stdout == "one/stderr\n" and [p.name for p in (tmp_path / "one").iterdir()] == ["stderr"]
    r = vmgrid(grid, "job", "get", url, key, "stderr", "result.txt", "-o", "none", cwd=tmp_path, check=False)
    assert r.returncode == 1 and r.stderr == (f"vmgrid: job {key} is Cancelled: it has no output result.txt (its "
                                              f"outputs: stdout, stderr), nothing fetched\n")
    assert not (tmp_path / "none").exists()

    stall = socket.socket()                  # a GridFTP "server" that never answers: a job stuck in StageIn
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)
    try:
        key = vmgrid(grid, "job", "submit", url, "--stage-in", f"gsiftp://127.0.0.1:{stall.getsockname()[1]}/x",
                     "--", "true").stdout.strip()
        vmgrid(grid, "job", "cancel", url, key)
        r = vmgrid(grid, "job", "get", url, key, "-o", "early", cwd=tmp_path, check=False)
        assert r.returncode == 1 and r.stderr == (f"vmgrid: job {key} was Cancelled before its program started: it "
                                                  f"has no outputs, nothing fetched\n")
        assert not (tmp_path / "early").exists()
    finally:
        stall.close()


def test_a_job_being_cancelled_is_followed_to_cancelled_by_cancel_and_get(grid, tmp_path):
    """The service answers a Cancel at once with the job's live state while its program is being stopped (here it
    ignores SIGTERM and the grace is 600 s). `job cancel --no-wait` prints that state and says what comes; `job
    status` says the job is being cancelled; `job cancel` and `job get` wait, on the client's side, until it is
    Cancelled, and get fetches what it wrote. The test ends the program itself."""
    import os

    alice = grid.user("alice")
    sp = grid.start("slowkill", ["jobs"], {"jobs": {"owner": alice.dn, "gridftp_port": 0, "kill_grace": 600.0,
                                                 "job_uid_first": 910000}})     # beside the grid's: a range of its own
    url = f"{sp.base_url}/wsrf/services/JobService"
    from tests.unit.jobs.test_manager import WHO_AM_I, host_pid
    program = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               f"print({WHO_AM_I}, flush=True); time.sleep(900)")      # who it is, for the host to find it
    key = vmgrid(grid, "job", "submit", url, "--", JOB_PY, "-c", program).stdout.strip()
    while not (status := json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout))["stdoutTail"]:
        assert status["state"] not in ("Done", "Failed", "Cancelled"), status      # it never printed: say why
    who = status["stdoutTail"].strip()
    pid = host_pid(who)
    assert pid is not None, who
    try:
        r = vmgrid(grid, "job", "cancel", url, key, "--no-wait")
        assert r.stdout == "Active\n" and r.stderr == (
            f"job {key} is being cancelled: its program is being stopped and what it wrote recorded; then it is "
            f"Cancelled (`vmgrid job wait {url} {key}` follows it)\n")
        assert ("state            Active (being cancelled: its program is stopped and what it wrote recorded, then "
                "it is Cancelled)\n") in vmgrid(grid, "job", "status", url, key).stdout
        assert json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["cancelRequested"] is True
        waiting = {}
        for name, args in (("cancel", ("job", "cancel", url, key)), ("get", ("job", "get", url, key, "-o", "out"))):
            waiting[name] = subprocess.Popen([PY, "-m", "client.cli", *args], env=grid.env("alice"), cwd=tmp_path,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = {name: p.stderr.readline() for name, p in waiting.items()}      # each says it waits, and why
        assert lines == {
            "cancel": f"job {key} is being cancelled: its program is being stopped and what it wrote recorded; waiting "
                      f"until it is Cancelled\n",
            "get": f"job {key} is being cancelled: its program is being stopped and what it wrote recorded; its "
                   f"outputs are fetched once it is Cancelled\n"}
        assert all(p.poll() is None for p in waiting.values())
    finally:
        os.kill(pid, signal.SIGKILL)                 # what the grace would end, 600 s later
    out = {name: p.communicate(timeout=120) for name, p in waiting.items()}
    assert [p.returncode for p in waiting.values()] == [0, 0], out
    assert out["cancel"][0] == "Cancelled\n"
    assert out["get"][0] == "out/stdout\nout/stderr\n" and "is Cancelled: its outputs are what its program wrote" in \
        out["get"][1]
    assert (tmp_path / "out" / "stdout").read_text() == f"{who}\n"
    assert json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["cancelRequested"] is False


def test_a_job_service_killed_and_restarted_answers_every_job_with_its_real_state(grid, tmp_path):
    url = grid.jobs_url
    # the job waits for "release" in its own directory (its /tmp is its own: no gate the test could open there)
    waiting = vmgrid(grid, "job", "submit", url, "--", JOB_PY, "-c",
                     "import os, time\nwhile not os.path.exists('release'): time.sleep(0.05)\nprint('ok')"
                     ).stdout.strip()
    release = grid.root / "jobs" / "jobs" / "jobs" / waiting / "release"
    quick = vmgrid(grid, "job", "submit", url, "--wait", "--", JOB_PY, "-c", "print('quick')").stdout.strip()
    stall = socket.socket()                  # a GridFTP "server" that never answers: a job stuck in StageIn
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)
    staging = vmgrid(grid, "job", "submit", url, "--stage-in", f"gsiftp://127.0.0.1:{stall.getsockname()[1]}/x",
                     "--", "true").stdout.strip()
    for key, state in ((waiting, "Active"), (staging, "StageIn")):
        while json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["state"] != state:
            pass
    port = grid.processes["jobs"].port
    grid.stop("jobs", signal.SIGKILL)
    start_jobs(grid, port=port)
    try:
        status = {k: json.loads(vmgrid(grid, "job", "status", url, k, "--json").stdout)
                  for k in (waiting, quick, staging)}
        assert status[quick]["state"] == "Done" and status[quick]["stdoutTail"] == "quick\n"
        assert status[waiting]["state"] == "Active"                   # re-attached: still running
        assert status[staging]["state"] == "Failed" and status[staging]["failure"].startswith("Interrupted:")
    finally:
        release.touch()
        stall.close()
    out = vmgrid(grid, "job", "wait", url, waiting).stdout
    assert "Done (exit code 0)" in out
    assert json.loads(vmgrid(grid, "job", "status", url, waiting, "--json").stdout)["stdoutTail"] == "ok\n"


def test_the_configuration_examples_load_and_every_jobs_key_is_documented_with_its_default(tmp_path):
    import dataclasses

    from services.container.config import load_config
    from services.jobs.config import JobsConfig

    example = re.search(r"```toml\n(\[container\].*?)```", DOCS.read_text(), re.S).group(1)
    (tmp_path / "jobs.toml").write_text(example)
    cfg = load_config(tmp_path / "jobs.toml")
    assert cfg.jobs.owner == "/O=Grid/OU=mysite/CN=alice" and set(cfg.jobs.logs) == {"container", "guestd"}
    documented = (DOCS.parent / "configuration.md").read_text().split("## [jobs]")[1]
    for f in dataclasses.fields(JobsConfig):
        if f.default is dataclasses.MISSING:             # lists and tables: the key is there
            assert re.search(rf"^({f.name} = |\[jobs\.{f.name}\])", documented, re.M), f.name
            continue
        line = re.search(rf"^{f.name} = (\S+)", documented, re.M)
        assert line and line.group(1).strip('"') == str(f.default), f"[jobs] {f.name} in docs/configuration.md"


def test_a_job_service_without_an_owner_does_not_start(tmp_path):
    cfg = tmp_path / "jobs.toml"
    cfg.write_text(f'[container]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n')
    r = subprocess.run([PY, "-m", "client.cli", "serve", "jobs", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr == f"vmgrid: {cfg}: the job service needs the instance owner's DN: set [jobs] owner\n"


def test_ctrl_c_while_following_a_job_says_the_job_goes_on_and_how_to_find_it_again(grid):
    """Ctrl-C stops the following only: the job runs on, and the message names the commands that reach it."""
    import signal

    url = grid.jobs_url
    proc = subprocess.Popen([PY, "-m", "client.cli", "job", "submit", url, "--wait", "--", "sleep", "600"],
                            env=grid.env("alice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        key = proc.stdout.readline().strip()            # submitted
        assert key.startswith("job-"), key + proc.stderr.read()
        while "Active" not in proc.stderr.readline():   # the job runs, followed
            assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert (f"vmgrid: interrupted; job {key} goes on at the service (`vmgrid job wait {url} {key}` follows it "
            f"again, `vmgrid job cancel {url} {key}` stops it)") in err
    assert "Active" in vmgrid(grid, "job", "status", url, key).stdout   # not lost, not cancelled
    vmgrid(grid, "job", "cancel", url, key)


def test_job_get_does_not_overwrite_the_scientists_files_unless_asked(grid, tmp_path):
    """A file of the scientist's with an output's name is not replaced: `get` names it, fetches nothing, and
    `--overwrite` replaces it; files that already are the outputs (a second `get`) are kept and not fetched again."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--wait", "--stage-out", "sorted.txt", "--",
                 "sh", "-c", "printf 'b\\na\\n' | sort > sorted.txt; echo done").stdout.strip().splitlines()[0]
    results = tmp_path / "results"
    results.mkdir()
    (results / "sorted.txt").write_text("my own notes, not to be lost\n")
    r = vmgrid(grid, "job", "get", url, key, "-o", str(results), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"vmgrid: {results / 'sorted.txt'} already exists with other contents than the job's "
                        f"output: nothing fetched (--overwrite replaces it, or name another directory with -o)\n")
    assert (results / "sorted.txt").read_text() == "my own notes, not to be lost\n"
    assert sorted(p.name for p in results.iterdir()) == ["sorted.txt"]          # nothing fetched, not even stdout

    r = vmgrid(grid, "job", "get", url, key, "-o", str(results), "--overwrite")
    assert (results / "sorted.txt").read_text() == "a\nb\n" and (results / "stdout").read_text() == "done\n"
    assert str(results / "sorted.txt") in r.stdout.splitlines()

    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    vmgrid(grid, "job", "get", url, key, "-o", str(results))                     # the outputs already: kept
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before

    (results / "stdout").unlink()
    (results / "stderr").unlink()
    (results / "stderr").mkdir()                                                 # a directory: never replaced
    r = vmgrid(grid, "job", "get", url, key, "-o", str(results), "--overwrite", check=False)
    assert r.returncode == 1 and f"{results / 'stderr'} is a directory: nothing fetched" in r.stderr, r.stderr
    assert not (results / "stdout").exists()


def test_job_log_help_on_a_service_that_shows_no_logs_says_so_and_where_they_are_named(tmp_path):
    """README's jobs.toml on a host has no [jobs.logs]: `vmgrid job log "$JOBS" help` printed an empty line, which
    reads as a failure; it says the service shows none and names the configuration table."""
    with LocalGrid(tmp_path / "grid") as g:
        sp = g.start("jobs", ["jobs"], {"jobs": {"owner": g.user("alice").dn, "gridftp_port": 0}})
        url = f"{sp.base_url}/wsrf/services/JobService"
        r = vmgrid(g, "job", "log", url, "help")
        assert r.stdout == "this job service shows no logs (its configuration's [jobs.logs] names none)\n", r.stdout
        r = vmgrid(g, "job", "log", url, "container", check=False)
        assert r.returncode == 1 and r.stderr == "vmgrid: ResourceUnknown: no log 'container'; this service shows: none\n"


def test_job_get_without_a_job_key_says_the_key_is_what_is_missing(grid, tmp_path):
    """trial13 U7: `vmgrid job get "$JOBS" $J -o results/` with $J empty (a failed submit) said "the following
    arguments are required: job, OUTPUT", though OUTPUT is optional (fetch only these); an empty key given quoted
    ("$J") is named as empty, not quoted back as ''."""
    r = vmgrid(grid, "job", "get", grid.jobs_url, "-o", str(tmp_path / "results"), check=False)
    assert r.returncode == 2 and r.stderr.endswith(
        "vmgrid job get: error: the following arguments are required: job\n"), r.stderr
    assert "OUTPUT\n" not in r.stderr.splitlines()[-1]
    r = vmgrid(grid, "job", "get", grid.jobs_url, "", "-o", str(tmp_path / "results"), check=False)
    assert r.returncode == 1 and r.stderr == ("vmgrid: the job key is empty: give the job's key (job-<32 hex digits>, "
                                              "as submit printed it)\n"), r.stderr
    assert not (tmp_path / "results").exists()


def test_the_job_commands_take_the_vm_commands_url_option_for_the_node(grid):
    """trial13 U6: the job commands name the instance's VMManager with --node, the vm commands with --url; each
    group takes the other's spelling too (here a node that does not listen: the option reached the command)."""
    key = "job-" + "a" * 32
    for option in ("--node", "--url"):
        r = vmgrid(grid, "job", "status", "my-vm", key, option, "https://localhost:1/wsrf/services/VMManagerService",
                   check=False)
        assert r.returncode == 1 and r.stderr.startswith("vmgrid: cannot fetch the WSDL of https://localhost:1/") \
            and r.stderr.count("\n") == 1, (option, r.stderr)
    shown = vmgrid(grid, "job", "status", "--help").stdout
    assert "--node NODE" in shown and "--url" not in shown.replace("--url, as the vm commands spell it", "")


def test_a_file_of_the_jobs_directory_that_is_no_output_comes_with_transfer_from_its_directory_url(grid, tmp_path):
    """docs/jobs.md (trial13 U5): `job get` fetches standard output and error and the --stage-out files; another file
    the job made (tmap's plot when not staged out) is no output, and comes with `vmgrid transfer` from the job's
    directory URL (`job status` shows it)."""
    url = grid.jobs_url
    key = vmgrid(grid, "job", "submit", url, "--wait", "--stage-out", "a.txt", "--", "sh", "-c",
                 "echo a > a.txt; echo plot > a.1.png").stdout.strip()
    r = vmgrid(grid, "job", "get", url, key, "a.1.png", "-o", str(tmp_path / "got"), check=False)
    assert r.returncode == 1 and "a.1.png" in r.stderr and "nothing fetched" in r.stderr, r.stderr
    directory = json.loads(vmgrid(grid, "job", "status", url, key, "--json").stdout)["directory"]
    assert directory.startswith("gsiftp://") and directory.endswith(f"/{key}/")
    vmgrid(grid, "transfer", f"{directory}a.1.png", str(tmp_path / "a.1.png"), "-q")
    assert (tmp_path / "a.1.png").read_text() == "plot\n"
