"""[jobs] in the TOML configuration (docs/configuration.md): who may use the job service, its bounds,
its GridFTP face and the logs it shows."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class JobsConfig:
    """[jobs]. What each number may be beyond its type (a new numeric key gets its rule there too): NUMBER_RULES in
    services/container/assemble.py, checked at start."""

    owner: str = ""                    # the instance owner's DN (the VMManager delivers it in the context)
    admins: list[str] = field(default_factory=list)   # the VO's admins' DNs
    gridftp_port: int = 2812           # the job directories' GridFTP face; 0 picks a free port, -1 none
    gridftp_host: str = ""             # its listen address ("" = the container's host)
    public_host: str = ""              # the host name in the gsiftp:// URLs it gives ("" = derived)
    default_lifetime: int = 86400      # seconds a job resource lives when SubmitJob names none
    max_lifetime: int = 604800         # the longest lifetime a job may have or be given
    max_live_jobs: int = 32            # jobs not yet Done/Failed/Cancelled at once
    max_output: int = 67108864         # bytes of standard output (and of error) kept per job
    tail_bytes: int = 4096             # bytes shown in the StdoutTail/StderrTail properties
    kill_grace: float = 5.0            # seconds between SIGTERM and SIGKILL when a job is cancelled
    sweep_interval: float = 1.0        # seconds between lifetime checks
    staging_parallel: int = 2          # GridFTP streams per staged file
    staging_quota: int = 4294967296    # bytes each user's staging area holds (GridFTP 552 beyond), and the most
                                       # one job's stage-in may fetch into its directory
    submitter_quota: int = 17179869184  # bytes all of one submitter's job directories hold, ended jobs' included:
                                       # SubmitJob is refused beyond (LimitExceeded), a running job killed
    max_files: int = 100000            # files, directories and links one job's directory may hold (each counts
                                       # at least a block): a running job past it is killed with the reason
    tmp_size: int = 268435456          # bytes of a job's private /tmp (/var/tmp the same) and, apart, of its
                                       # /dev/shm: tmpfs in memory, in a mount namespace of the job's, gone with it
    max_processes: int = 256           # processes and threads one job may have at once (a pids cgroup per job)
    pids_cgroup: str = ""              # the pids cgroup hierarchy ("" = /sys/fs/cgroup/pids (v1) or
                                       # /sys/fs/cgroup (v2), whichever has the pids controller)
    memory_limit: int | str = "auto"   # memory one job may have (a memory cgroup per job; past it the kernel kills
                                       # in the job, which fails "out of memory"): bytes, 0 = no bound, "P%" of the
                                       # machine's memory (MemTotal at start), or "auto": memory_total's "auto"
                                       # less 16 MiB (services/jobs/runner.py memory_auto)
    memory_total: int | str = "auto"   # memory all the service's jobs may have together (one memory cgroup of the
                                       # service's holding the jobs'; there the service kills the job holding the
                                       # most, its /tmp included, which fails naming this key: runner.py
                                       # MemoryWatch): bytes, 0 = no bound, "P%", or "auto": the
                                       # smaller of 75% and all of it but 192 MiB, at least 25%; the rest stays for
                                       # the system (its code's pages included) however many jobs run
    network: str = "host"              # "host": jobs share the host's network; "none": each job has a network
                                       # namespace of its own with only loopback (docs/jobs.md)
    job_uid_first: int = 900000        # each running job holds a uid (and gid) of this range of its own, given back
    job_uid_count: int = 10000         # when it ends, to its submitter's next jobs only; recorded in jobs.sqlite
    logs: dict[str, str] = field(default_factory=dict)   # GetLog: name -> file (e.g. container, guestd)
    consumer_allow: list[str] = field(default_factory=list)  # networks notification consumers may be on even
                                       # though loopback/link-local (e.g. "127.0.0.0/8" for a local grid)


def check_uid_range(j: JobsConfig, state_dir: Path | None = None) -> None:
    """[jobs] job_uid_first, job_uid_count (and that the service runs as root, which giving jobs uids needs): a
    ValueError in one line naming the keys, asked by `vmgrid serve` before any service opens its state, so that a
    refused start makes no state directory (trial15 N2: job_uid_count = 0 was refused once the state and jobs.lock
    were made) and again when the job service starts. With ``state_dir``, also no uid of the range an account's or
    group's, nor another running job service's (services/jobs/uids.py refusal: read only)."""
    if os.geteuid() != 0:
        raise ValueError("the job service runs each job under a uid of its own ([jobs] job_uid_first, "
                         "job_uid_count), out of reach of its credential, its state and other jobs: "
                         "start it as root")
    first, count = j.job_uid_first, j.job_uid_count
    if first < 1000 or count < 1 or first + count > 2**32 - 2:
        raise ValueError(f"[jobs] job_uid_first = {first}, job_uid_count = {count}: a range of at least one uid from "
                         f"1000 up, below 4294967294")
    if state_dir is not None:
        from services.jobs import uids

        why = uids.refusal(Path(state_dir), first, count)
        if why is not None:
            raise ValueError(why)
