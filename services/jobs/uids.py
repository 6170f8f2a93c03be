"""The host-wide registry of job services' uid ranges ([jobs] job_uid_first, job_uid_count): a uid range is one job
service's alone. Two job services on one host (a host job service has one owner, so a host runs one per user) that
gave their first submitters the same uid let one's jobs read and write the other's through /proc/PID/cwd.

The registry is a directory (REGISTRY), one entry per job service state directory holding its range, read and
written under an flock of the directory's ``.lock``. An entry belongs to its state directory: another service's range may not overlap it while that service runs (the
`vmgrid serve` state lock, ``<state_dir>/../jobs.lock`` of services/container/cli.py's hold_state, is held), nor
while its state directory is there (a stopped service comes back to its jobs: their shims outlive it and run on
under uids of its range), nor while any process runs under a uid of it (/proc/*/status). It is given up when its
service starts with another range (its entry is replaced) or its state directory is gone and nothing runs under
the range (attack13 H1). Nor may the range hold a uid or gid of an account the system knows."""
from __future__ import annotations

import fcntl
import grp
import hashlib
import json
import os
import pwd
from pathlib import Path

REGISTRY = "/var/lib/vmgrid/job-uids"
KEYS = "[jobs] job_uid_first, job_uid_count"


def accounts_in(first: int, count: int) -> list[str]:
    """The system's accounts and groups whose id lies in ``first`` .. ``first + count - 1``, as "name (uid N)".
    Only what the name services enumerate (/etc/passwd, /etc/group; an LDAP or SSSD source that does not enumerate
    is not seen: asking for each uid costs about 0.2 ms, 2 s per 10000, measured)."""
    found = [f"account {p.pw_name} (uid {p.pw_uid})" for p in pwd.getpwall() if first <= p.pw_uid < first + count]
    found += [f"group {g.gr_name} (gid {g.gr_gid})" for g in grp.getgrall() if first <= g.gr_gid < first + count]
    return found


def _alive(state_dir: str) -> bool:
    """Whether the job service of ``state_dir`` runs: its `vmgrid serve` holds the state lock."""
    try:
        fd = os.open(os.path.join(os.path.dirname(state_dir), "jobs.lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def processes_in(first: int, count: int) -> list[tuple[int, int]]:
    """(pid, uid) of the processes whose real, effective, saved or filesystem uid lies in ``first`` ..
    ``first + count - 1`` (the Uid: line of /proc/PID/status): a job's, running on while its service is away."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        held = [u for u in map(int, line.split()[1:]) if first <= u < first + count]
                        if held:
                            found.append((int(name), held[0]))
                        break
        except (OSError, ValueError):          # gone meanwhile
            continue
    return found


def _held(state_dir: str, first: int, count: int) -> str | None:
    """Why the entry of ``state_dir``'s job service (``first``, ``count``) still holds its range, or None."""
    if _alive(state_dir):
        return "the running job service of"
    if os.path.lexists(state_dir):
        return "the stopped job service (its state directory is there: its jobs may run on) of"
    running = processes_in(first, count)
    if running:
        pid, uid = running[0]
        return (f"the job service, gone with its state directory, whose jobs run on (process {pid} of uid {uid}"
                f"{f' and {len(running) - 1} more' if len(running) > 1 else ''}) of")
    return None


def claim(state_dir: Path, first: int, count: int, registry: Path | None = None) -> None:
    """Record ``first`` .. ``first + count - 1`` as the range of the job service of ``state_dir``, or raise a
    ValueError (one line naming the overlap and the keys to change) when an account or group of the system, or
    another job service's entry that still holds its range (``_held``), has a uid of it."""
    if registry is None:      # tests give each of their processes a registry of its own (tests/conftest.py)
        registry = Path(os.environ.get("VMGRID_JOB_UID_REGISTRY", REGISTRY))
    last = first + count - 1
    taken = accounts_in(first, count)
    if taken:
        raise ValueError(f"{KEYS}: the range {first}-{last} holds the {taken[0]}"
                         f"{f' and {len(taken) - 1} more' if len(taken) > 1 else ''}: give this job service a range "
                         f"of uids no account or group has")
    own = os.path.realpath(state_dir)
    for d in reversed(registry.parents[:len(registry.parents) - 1]):
        if not d.exists():               # made passable (0755), not the container's umask 077: /var/lib/vmgrid
            d.mkdir(exist_ok=True)       # may be a state directory its jobs reach their directories through
            os.chmod(d, 0o755)
    registry.mkdir(mode=0o700, exist_ok=True)
    lock = os.open(registry / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for entry in sorted(registry.glob("*.json")):
            try:
                other = json.loads(entry.read_text())
                o_dir, o_first, o_count = str(other["state_dir"]), int(other["first"]), int(other["count"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if o_dir == own or o_first + o_count <= first or last < o_first:
                continue
            why = _held(o_dir, o_first, o_count)
            if why is not None:
                raise ValueError(f"{KEYS}: the range {first}-{last} overlaps {o_first}-{o_first + o_count - 1}, the "
                                 f"range of {why} {o_dir} (registered in {registry}): give each job service on a "
                                 f"host a range of its own")
            entry.unlink(missing_ok=True)        # its service and its state directory are gone, nothing runs: free
        name = hashlib.sha256(own.encode()).hexdigest()[:32] + ".json"
        tmp = registry / (name + ".tmp")
        tmp.write_text(json.dumps({"state_dir": own, "first": first, "count": count, "pid": os.getpid()}))
        os.replace(tmp, registry / name)
    finally:
        os.close(lock)
