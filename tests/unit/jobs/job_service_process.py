"""The job service's core (JobManager, real jobs) in a process of its own, for tests that place the service in a
cgroup or kill it with SIGKILL: ``python job_service_process.py STATE CONFIG ARGS [--hold FILE] [--no-pid-namespace]``.

CONFIG is [jobs] as JSON, ARGS the job's program arguments (python3 ARGS...) as JSON. Without ``--hold`` it runs
the job to its end and prints the job's end as JSON (state, failure, stdout, the service's pids cgroup), then
stops. With ``--hold FILE`` it prints the job's key and its supervisor's pid as JSON once FILE exists in the job's
directory, and runs on until killed."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from services.jobs.config import JobsConfig  # noqa: E402
from services.jobs.manager import JobManager  # noqa: E402
from services.jobs.store import JobSpec  # noqa: E402
from tests.unit.jobs.test_manager import OWNER, PY, shut, wait_final, wait_until  # noqa: E402


def main(argv: list[str]) -> int:
    state, config, args = Path(argv[0]), json.loads(argv[1]), tuple(json.loads(argv[2]))
    hold = argv[argv.index("--hold") + 1] if "--hold" in argv else None
    m = JobManager(state, JobsConfig(owner=OWNER, **config))
    if "--no-pid-namespace" in argv:
        m.pid_namespace = False          # as a service without CAP_SYS_ADMIN runs its jobs
    m.start()
    if hold is not None:
        job = m.submit(OWNER, JobSpec(executable=PY, arguments=args))
        wait_until(lambda: (m.jobs_dir / job.key / hold).exists() or m.store.get(job.key).final)
        print(json.dumps({"key": job.key, "shim": m.store.get(job.key).pid}), flush=True)
        while True:
            time.sleep(60)
    try:
        job = wait_final(m, m.submit(OWNER, JobSpec(executable=PY, arguments=args)).key)
        print(json.dumps({"state": job.state.value, "failure": job.failure, "pids": str(m.pids_cgroup),
                          "stdout": (m.jobs_dir / job.key / "stdout").read_text()}))
    finally:
        shut(m)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
