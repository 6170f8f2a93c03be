"""[jobs] job_uid_first, job_uid_count that a job service cannot use are refused by `vmgrid serve jobs` before anything
is made on disk (trial15 N2: `job_uid_count = 0` was refused once the state directory, its jobs/ and jobs.lock were
made): a real `vmgrid serve jobs` process, each refusal one line naming the keys, exit status 1."""
from __future__ import annotations

import fcntl
import json
import os
import pwd

import pytest

from tests.integration.test_serve_config_errors import node_toml, serve

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs its jobs under uids: root only")]

RANGE = "a range of at least one uid from 1000 up, below 4294967294"


def _serve_jobs(grid_pki, tmp_path, first: int, count: int):
    return serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {
        ("jobs", "owner"): f'"{grid_pki.alice.dn}"', ("jobs", "job_uid_first"): str(first),
        ("jobs", "job_uid_count"): str(count)}), service="jobs")


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else ["(none)"]


@pytest.mark.parametrize("first, count", [(951000, 0), (10, 100), (4294967000, 10000), (900000, -1)])
def test_a_uid_range_that_cannot_be_used_is_refused_before_the_state_is_made(grid_pki, tmp_path, first, count):
    """Fails without the fix: the same line, but state/jobs and state/jobs.lock were made first."""
    r = _serve_jobs(grid_pki, tmp_path, first, count)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: n3.toml: [jobs] job_uid_first = {first}, job_uid_count = {count}: {RANGE}\n"
    assert not (tmp_path / "state").exists(), _tree(tmp_path / "state")


def test_a_uid_range_holding_an_account_is_refused_and_a_state_directory_there_is_left_as_it_was(grid_pki, tmp_path):
    """A restart with the range moved onto the system's accounts (here the one of the highest uid, nobody's on
    Debian): refused naming the account, and the state directory that was there gains nothing (no jobs/, no
    jobs.lock, no database)."""
    account = max((p for p in pwd.getpwall() if 1000 <= p.pw_uid < 4294967294 - 100), key=lambda p: p.pw_uid,
                  default=None)
    if account is None:
        pytest.skip("no account of uid 1000 or more here")
    state = tmp_path / "state"
    (state / "repository").mkdir(parents=True)                # another service's state, as a site's would be
    before = _tree(state)
    r = _serve_jobs(grid_pki, tmp_path, account.pw_uid - 10, 100)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.startswith(f"vmgrid: n3.toml: [jobs] job_uid_first, job_uid_count: the range "
                               f"{account.pw_uid - 10}-{account.pw_uid + 89} holds the ") and r.stderr.count("\n") == 1
    assert "give this job service a range of uids no account or group has" in r.stderr
    assert _tree(state) == before


def test_a_uid_range_of_a_running_job_service_is_refused_before_the_state_is_made(grid_pki, tmp_path):
    """Another job service of this host, running (its `vmgrid serve` holds its jobs.lock), registered 953000-953009:
    a second one given 953005-953104 is refused naming it, before its state is made. Fails without the fix: refused
    once state/jobs and state/jobs.lock were made."""
    registry = os.environ["VMGRID_JOB_UID_REGISTRY"]          # this test process's (tests/conftest.py)
    other = tmp_path / "other" / "jobs"
    other.mkdir(parents=True)
    entry = os.path.join(registry, "other-service.json")
    with open(other.parent / "jobs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                      # as its `vmgrid serve` holds it while it runs
        with open(entry, "w") as f:
            json.dump({"state_dir": os.path.realpath(other), "first": 953000, "count": 10, "pid": os.getpid()}, f)
        try:
            r = _serve_jobs(grid_pki, tmp_path, 953005, 100)
        finally:
            os.unlink(entry)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"vmgrid: n3.toml: [jobs] job_uid_first, job_uid_count: the range 953005-953104 overlaps "
                        f"953000-953009, the range of the running job service of {os.path.realpath(other)} "
                        f"(registered in {registry}): give each job service on a host a range of its own\n")
    assert not (tmp_path / "state").exists(), _tree(tmp_path / "state")
