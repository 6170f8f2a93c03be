"""The host-wide registry of job services' uid ranges ([jobs] job_uid_first, job_uid_count): a uid range is one job
service's alone. Two job services on one host (a host job service has one owner, so a host runs one per user) that
gave their first submitters the same uid let one's jobs read and write the other's through /proc/PID/cwd.

The registry is a directory (REGISTRY), one entry per job service state directory holding its range, read and
written under an flock of the directory's ``.lock``. An entry holds its range while its service runs (the `vmgrid serve` state lock,
``<state_dir>/../jobs.lock`` of services/container/cli.py's hold_state, is held) and, once it has stopped, while
any of its jobs runs on (a job's supervisor outlives its service, which re-attaches it at its next start): a process
under a uid of the range (the Uid: line of /proc/*/status) in a job's cgroup of that service (/proc/PID/cgroup), or
that a supervisor of that state directory started (attack13 H1). Then another service's range may not overlap it; after, it is taken over. (Not every process of the
range: tests give each of their processes a registry of its own, and other registries' jobs run under the same
uids of the host.) Nor may the range hold a uid or gid of an account the system knows."""
from __future__ import annotations

import fcntl
import grp
import hashlib
import json
import logging
import os
import pwd
from pathlib import Path

from services.jobs.runner import service_cgroup_name

REGISTRY = "/var/lib/vmgrid/job-uids"
KEYS = "[jobs] job_uid_first, job_uid_count"
log = logging.getLogger("vmgrid.JobService")


def accounts_in(first: int, count: int) -> list[str]:
    """The system's accounts and groups whose id lies in ``first`` .. ``first + count - 1``, as "name (uid N)".
    Only what the name services enumerate (/etc/passwd, /etc/group; an LDAP or SSSD source that does not enumerate
    is not seen: asking for each uid costs about 0.2 ms, 2 s per 10000, measured)."""
    found = [f"account {p.pw_name} (uid {p.pw_uid})" for p in pwd.getpwall() if first <= p.pw_uid < first + count]
    found += [f"group {g.gr_name} (gid {g.gr_gid})" for g in grp.getgrall() if first <= g.gr_gid < first + count]
    return found


def account_holding(uid: int) -> str | None:
    """The account whose uid, or the group whose gid, is ``uid``, as "account NAME (uid N)" or "group NAME (gid N)",
    asked of the name services for that one id (getpwuid, getgrgid: LDAP and SSSD answer them without enumerating,
    which accounts_in cannot rely on), or None. An account found is logged: the job service gives that uid to no
    job (JobStore.take_uid skips it) and the operator learns that the range is not the service's alone."""
    try:
        found = f"account {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        try:
            found = f"group {grp.getgrgid(uid).gr_name} (gid {uid})"
        except KeyError:
            return None
    log.warning("%s: uid %d is held by the %s (the system's name services know it): it is given to no job; give this "
                "job service a range of uids no account or group has", KEYS, uid, found)
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


def _status(pid: str) -> tuple[list[int], int] | None:
    """The uids (real, effective, saved, filesystem) and the parent of process ``pid``, or None (gone)."""
    uids, ppid = None, None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    uids = [int(u) for u in line.split()[1:]]
                elif line.startswith(b"PPid:"):
                    ppid = int(line.split()[1])
                if uids is not None and ppid is not None:
                    return uids, ppid
    except (OSError, ValueError, IndexError):
        pass
    return None


def _names(pid: int, state_dir: str) -> bool:
    """Whether process ``pid`` is a job supervisor of ``state_dir`` (services/jobs/runner.py starts it as
    ``python -I shim.py <state_dir>/control/<key>/spec.json``, in that control directory)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if (state_dir + "/").encode() in f.read():
                return True
        return os.readlink(f"/proc/{pid}/cwd").startswith(state_dir + "/")
    except OSError:
        return False


def _in_cgroup_of(pid: int, cgroup: str) -> bool:
    """Whether process ``pid`` is in a job's cgroup of the service whose cgroups are named ``cgroup``
    (``service_cgroup_name``): a line of /proc/PID/cgroup (any hierarchy, v1 or v2) names ``…/<cgroup>/<key>``. A
    job cannot leave it: its uid may not write the cgroup files (root's)."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            return any(f"/{cgroup}/".encode() in line for line in f)
    except OSError:
        return False


def processes_in(first: int, count: int, state_dir: str | None = None) -> list[tuple[int, int]]:
    """(pid, uid) of the processes whose real, effective, saved or filesystem uid lies in ``first`` ..
    ``first + count - 1`` (the Uid: line of /proc/PID/status): jobs, running on while their service is away. With
    ``state_dir``, only the jobs of that state directory's service: those in a job's cgroup of it (/proc/PID/cgroup:
    even a process that left its session and lost its parent, which is a child of init without PID namespaces),
    else those a supervisor of it started (an ancestor names it: a service whose jobs have no cgroups)."""
    cgroup = service_cgroup_name(state_dir) if state_dir is not None else None
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            found = _status(name)
            if found is not None:
                table[int(name)] = found
    result, supervisor = [], {}
    for pid, (ids, _) in table.items():
        held = [u for u in ids if first <= u < first + count]
        if not held:
            continue
        if state_dir is not None and not _in_cgroup_of(pid, cgroup):
            ancestor, steps, ours = pid, 0, False
            while ancestor > 1 and ancestor in table and steps < 64:
                if ancestor not in supervisor:
                    supervisor[ancestor] = _names(ancestor, state_dir)
                if supervisor[ancestor]:
                    ours = True
                    break
                ancestor, steps = table[ancestor][1], steps + 1
            if not ours:
                continue
        result.append((pid, held[0]))
    return result


def _held(state_dir: str, first: int, count: int) -> str | None:
    """Why the entry of ``state_dir``'s job service (``first``, ``count``) still holds its range, or None."""
    if _alive(state_dir):
        return "the running job service of"
    running = processes_in(first, count, state_dir)
    if running:
        pid, uid = running[0]
        return (f"the stopped job service whose jobs run on (process {pid} of uid {uid}"
                f"{f' and {len(running) - 1} more' if len(running) > 1 else ''}) of")
    return None


def _registry(registry: Path | None) -> Path:
    # tests give each of their processes a registry of its own (tests/conftest.py)
    return registry if registry is not None else Path(os.environ.get("VMGRID_JOB_UID_REGISTRY", REGISTRY))


def _overlapping(registry: Path, own: str, first: int, last: int):
    """The registry's entries of other state directories whose range overlaps ``first`` .. ``last``: (entry file,
    its state directory, first, count) each."""
    for entry in sorted(registry.glob("*.json")):
        try:
            other = json.loads(entry.read_text())
            o_dir, o_first, o_count = str(other["state_dir"]), int(other["first"]), int(other["count"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if o_dir == own or o_first + o_count <= first or last < o_first:
            continue
        yield entry, o_dir, o_first, o_count


def _accounts_refusal(first: int, count: int) -> str | None:
    taken = accounts_in(first, count)
    if not taken:
        return None
    return (f"{KEYS}: the range {first}-{first + count - 1} holds the {taken[0]}"
            f"{f' and {len(taken) - 1} more' if len(taken) > 1 else ''}: give this job service a range of uids no "
            f"account or group has")


def _overlap_refusal(registry: Path, first: int, last: int, o_dir: str, o_first: int, o_count: int,
                     why: str) -> str:
    return (f"{KEYS}: the range {first}-{last} overlaps {o_first}-{o_first + o_count - 1}, the range of {why} {o_dir} "
            f"(registered in {registry}): give each job service on a host a range of its own")


def refusal(state_dir: Path, first: int, count: int, registry: Path | None = None) -> str | None:
    """Why :func:`claim` would refuse ``first`` .. ``first + count - 1`` for the job service of ``state_dir`` now (an
    account or group of the system, or another job service's entry that still holds its range, has a uid of it), or
    None. Reads only: nothing is made or written (no registry, no state directory), so `vmgrid serve` asks it before
    any service opens its state (trial15 N2); :func:`claim` asks again under the registry's lock."""
    why = _accounts_refusal(first, count)
    if why is not None:
        return why
    registry, last = _registry(registry), first + count - 1
    if not registry.is_dir():
        return None
    for _entry, o_dir, o_first, o_count in _overlapping(registry, os.path.realpath(state_dir), first, last):
        held = _held(o_dir, o_first, o_count)
        if held is not None:
            return _overlap_refusal(registry, first, last, o_dir, o_first, o_count, held)
    return None


def claim(state_dir: Path, first: int, count: int, registry: Path | None = None) -> None:
    """Record ``first`` .. ``first + count - 1`` as the range of the job service of ``state_dir``, or raise a
    ValueError (one line naming the overlap and the keys to change) when an account or group of the system, or
    another job service's entry that still holds its range (``_held``), has a uid of it."""
    registry, last = _registry(registry), first + count - 1
    why = _accounts_refusal(first, count)
    if why is not None:
        raise ValueError(why)
    own = os.path.realpath(state_dir)
    for d in reversed(registry.parents[:len(registry.parents) - 1]):
        if not d.exists():               # made passable (0755), not the container's umask 077: /var/lib/vmgrid
            d.mkdir(exist_ok=True)       # may be a state directory its jobs reach their directories through
            os.chmod(d, 0o755)
    registry.mkdir(mode=0o700, exist_ok=True)
    lock = os.open(registry / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for entry, o_dir, o_first, o_count in _overlapping(registry, own, first, last):
            why = _held(o_dir, o_first, o_count)
            if why is not None:
                raise ValueError(_overlap_refusal(registry, first, last, o_dir, o_first, o_count, why))
            entry.unlink(missing_ok=True)        # its service and its state directory are gone, nothing runs: free
        name = hashlib.sha256(own.encode()).hexdigest()[:32] + ".json"
        tmp = registry / (name + ".tmp")
        tmp.write_text(json.dumps({"state_dir": own, "first": first, "count": count, "pid": os.getpid()}))
        os.replace(tmp, registry / name)
    finally:
        os.close(lock)
