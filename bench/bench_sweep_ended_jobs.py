"""How long a job service's sweep takes when many jobs have ended (attack15: about 1 s a sweep at 100,000 ended
records): a JobManager (root, as the job service runs) on a throw-away state directory holding ``--ended`` ended job
records, each with its job and control directory (its standard output of 100 bytes), swept ``--sweeps`` times; then,
where the store keeps when an ended directory is due to be counted again (jobstat16), the same once every one has been
(the steady state: the first sweeps after an upgrade count the ended jobs of before again, a batch at a time). Prints
the seconds of each sweep and of the submitter's total a submit asks for. The job uid registry is a throw-away one.

    .venv/bin/python bench/bench_sweep_ended_jobs.py [--ended 100000] [--sweeps 5]      (as root)

Run it from another checkout with PYTHONPATH=that checkout to compare (before/after)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def build(state: Path, ended: int, owner: str) -> None:
    from services.jobs.store import JobSpec, JobStore

    store = JobStore(state / "jobs.sqlite")           # the schema of the code under test
    spec = JobSpec("true").to_json()
    for d in ("jobs", "control"):
        (state / d).mkdir(mode=0o711, exist_ok=True)
    with store.db.write("bench") as db:
        for i in range(ended):
            key = f"job-{i:032x}"
            db.execute("INSERT INTO jobs (key, owner, state, spec, submitted, termination, started, ended, exit_code, "
                       "outputs) VALUES (?, ?, 'Done', ?, 1.0, 4e9, 2.0, 3.0, 0, ?)",
                       (key, owner, spec, json.dumps([["stdout", 100, "0" * 64, None]])))
            (state / "jobs" / key).mkdir(mode=0o700)
            (state / "jobs" / key / "stdout").write_bytes(b"x" * 100)
            (state / "control" / key).mkdir(mode=0o700)
    store.close()


def timed(what: str, call) -> float:
    started = time.perf_counter()
    call()
    took = time.perf_counter() - started
    print(f"{what:40} {took:8.3f} s", flush=True)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ended", type=int, default=100000)
    parser.add_argument("--sweeps", type=int, default=5)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="vmgrid-sweep-bench-"))
    os.environ["VMGRID_JOB_UID_REGISTRY"] = str(top / "registry")
    owner = "/O=Grid/OU=bench/CN=owner"
    m = None
    try:
        from services.jobs.config import JobsConfig
        from services.jobs.manager import JobManager

        state = top / "state"
        state.mkdir()
        started = time.perf_counter()
        build(state, args.ended, owner)
        print(f"{args.ended} ended jobs written in {time.perf_counter() - started:.1f} s", flush=True)
        m = JobManager(state, JobsConfig(owner=owner))     # not started (no sweeper thread): this sweeps
        for i in range(args.sweeps):
            m._recount_rest = 0.0                  # (jobstat16's recount rests after a round: not between these)
            timed(f"sweep {i + 1}", m.sweep)
        timed("submitter_bytes (a submit's check)", lambda: m.submitter_bytes(owner))
        db = m.store.db.conn()
        if "recount_at" in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}:
            due = db.execute("SELECT COUNT(*) FROM jobs WHERE recount_at <= ?", (time.time(),)).fetchone()[0]
            print(f"(still due to be counted again: {due}; now as if each had been)", flush=True)
            with m.store.db.write("bench") as w:
                w.execute("UPDATE jobs SET recount_at = 4e9, held = 4096 WHERE recount_at IS NOT NULL")
            for i in range(args.sweeps):
                m._recount_rest = 0.0
                timed(f"steady sweep {i + 1}", m.sweep)
            timed("submitter_bytes (a submit's check)", lambda: m.submitter_bytes(owner))
    finally:
        if m is not None:
            m.close()
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
