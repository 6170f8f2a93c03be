"""Starting, watching and killing a job's process: no shell, a new session per job (its process group,
led by the shim that supervises it), a PID namespace per job where the service may make one (nothing the job
starts outlives it), a clean environment, bounded output capture (shim.py)."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.jobs.shim import remove_cgroup

SHIM = Path(__file__).with_name("shim.py")
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Exit:
    """How a job's process ended: ``code`` (minus the signal number when killed), or why it is unknown."""

    code: int | None
    error: str | None = None
    dropped: dict | None = None


def proc_start_time(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":      # a zombie is not running
        return None
    return fields[19] if len(fields) > 19 else None


def job_environment(work: Path, extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The job's environment: a fixed base (nothing of the service's own, no credentials) plus the job's."""
    env = {"PATH": BASE_PATH, "HOME": str(work), "LANG": "C.UTF-8", "PWD": str(work)}
    env.update(dict(extra))
    return env


class Process:
    """A job's shim: started here (a child) or found again after a restart (re-attached by pid)."""

    def __init__(self, pid: int, start: str | None, status_path: Path, child: subprocess.Popen | None = None):
        self.pid = pid
        self.start_time = start
        self.status_path = status_path
        self.child = child

    @classmethod
    def start(cls, argv: list[str], *, cwd: Path, env: dict[str, str], stdin: Path | None, stdout: Path,
              stderr: Path, control: Path, max_output: int, pid_namespace: bool = False,
              pids_cgroup: Path | None = None, max_processes: int = 0, processes_unbounded: str | None = None,
              max_file_size: int | None = None, uid: int | None = None,
              fds: dict[str, int] | None = None, tmp_size: int = 0, keep: Path | None = None,
              memory: dict | None = None, network: str = "host") -> "Process":
        """Start the job's supervisor. ``uid``: the account the program runs under (None: the service's own);
        ``fds``: the job's ``stdin``/``stdout``/``stderr`` already open (the service opened them before the job's
        uid could write its directory), passed to the supervisor instead of their paths; ``tmp_size``: bytes of the
        job's private /tmp (and /var/tmp) and of its /dev/shm (0: the host's); ``keep``: the directory (the service's
        state, the job's inside) kept at its path there, where it lies beneath them (default: ``cwd``); ``memory``: the
        job's memory bound (``MemoryBound.for_job``); ``network``: [jobs] network ("none": a network namespace of
        the job's own with only loopback)."""
        control.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = control / "exit.json"
        fds = fds or {}
        spec = {"argv": argv, "cwd": str(cwd), "env": env, "stdin": str(stdin) if stdin else None,
                "stdout": str(stdout), "stderr": str(stderr), "status": str(status), "max_output": max_output,
                "pid_namespace": pid_namespace, "pids_cgroup": str(pids_cgroup) if pids_cgroup else None,
                "max_processes": max_processes, "processes_unbounded": processes_unbounded,
                "max_file_size": max_file_size, "uid": uid, "tmp_size": tmp_size,
                "keep": str(keep if keep is not None else cwd), **(memory or {}), "network": network,
                **{f"{name}_fd": fd for name, fd in fds.items()}}
        spec_path = control / "spec.json"
        spec_path.write_text(json.dumps(spec))
        child = subprocess.Popen([sys.executable, "-I", str(SHIM), str(spec_path)], cwd=control, start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={"PATH": BASE_PATH, "LANG": "C.UTF-8"}, close_fds=True,
                                 pass_fds=tuple(fds.values()))
        return cls(child.pid, proc_start_time(child.pid), status, child)

    @classmethod
    def reattach(cls, pid: int, start: str | None, control: Path) -> "Process | None":
        """The shim ``pid`` if it still runs (same start time: not a reused pid); else None."""
        if start is None or proc_start_time(pid) != start:
            return None
        return cls(pid, start, control / "exit.json")

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.poll() is None
        return proc_start_time(self.pid) == self.start_time

    def wait(self, poll: float = 0.5) -> Exit:
        """Wait for the shim to end; the job's exit as the shim recorded it."""
        if self.child is not None:
            self.child.wait()
        else:
            while self.alive():
                time.sleep(poll)
        return read_exit(self.status_path)

    def kill(self, grace: float) -> None:
        """SIGTERM to the whole process group, SIGKILL after ``grace`` seconds if any of it is left."""
        if not self.alive():
            return
        _killpg(self.pid, signal.SIGTERM)
        self._kill_after(grace)

    def terminate(self, grace: float) -> None:
        """:meth:`kill` without waiting: SIGTERM to the whole process group now, and the SIGKILL ``grace`` seconds
        later from a thread of its own (one per process, however many ask), so a request thread that asks is free
        at once."""
        if not self.alive():
            return
        _killpg(self.pid, signal.SIGTERM)
        with _ESCALATING_LOCK:
            if self.pid in _ESCALATING:
                return
            _ESCALATING.add(self.pid)

        def escalate():
            try:
                self._kill_after(grace)
            finally:
                with _ESCALATING_LOCK:
                    _ESCALATING.discard(self.pid)

        threading.Thread(target=escalate, name=f"vmgrid-kill-{self.pid}", daemon=True).start()

    def _kill_after(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        _killpg(self.pid, signal.SIGKILL)


_ESCALATING: set[int] = set()        # the shims whose SIGKILL a thread of terminate() is waiting to send
_ESCALATING_LOCK = threading.Lock()


def pid_namespaces() -> str | None:
    """None if this service may run its jobs in PID namespaces of their own (CAP_SYS_ADMIN: the guest's job
    service runs as root), else why not. Asked of a throw-away shim (``shim.py --probe``: the supervisor's own way
    of making one), so the service's own children are unchanged."""
    result = subprocess.run([sys.executable, "-I", str(SHIM), "--probe"], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, env={"PATH": BASE_PATH, "LANG": "C.UTF-8"})
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or [f"the probe exited with status {result.returncode}"])[-1]


CGROUP_PREFIX = "vmgrid-jobs-"
log = logging.getLogger("vmgrid.JobService")


def service_cgroup_name(state_dir: Path | str) -> str:
    """The name of the cgroup that holds the cgroups of the jobs of the job service of ``state_dir``, in each
    hierarchy: ``vmgrid-jobs-`` and the first 16 hex digits of the SHA-256 of the state directory's real path (those
    that begin its uid registry entry's name, services/jobs/uids.py). The same at every start of that service, and
    no other service's: what is in it is that service's jobs, and nothing else's."""
    return CGROUP_PREFIX + hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]


def pids_cgroups(configured: str, state_dir: Path | str) -> tuple[Path | None, str | None]:
    """Where this service may make a pids cgroup per job: (the parent of the jobs' cgroups, None), or (None, why
    not). The hierarchy is ``configured``, else cgroup v1's /sys/fs/cgroup/pids, else cgroup v2's /sys/fs/cgroup
    if it has the pids controller. The parent is ``service_cgroup_name(state_dir)``: on cgroup v1 in the service's
    own pids cgroup (a bound the operator put on the service covers its jobs too), on cgroup v2 at the hierarchy's
    root (v2 enables no controller below a cgroup that holds processes, as the service's own does). Probed by
    making (and removing) one cgroup with a bound, as a job's will be."""
    if configured:
        root = Path(configured)
    elif Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        root = Path("/sys/fs/cgroup/pids")
    else:
        root = Path("/sys/fs/cgroup")
    try:
        v2 = (root / "cgroup.controllers").exists()
        if v2:
            if "pids" not in (root / "cgroup.controllers").read_text().split():
                return None, f"{root} (cgroup v2) has no pids controller"
            (root / "cgroup.subtree_control").write_text("+pids")
            parent = root / service_cgroup_name(state_dir)
        elif not (root / "cgroup.procs").exists():
            return None, f"no pids cgroup hierarchy at {root}"
        else:
            parent = root / own_cgroup_v1("pids").lstrip("/") / service_cgroup_name(state_dir)
        parent.mkdir(exist_ok=True)
        parent.chmod(0o755)          # a job (its own uid) may read its limits: not the container's umask 077
        if v2:
            (parent / "cgroup.subtree_control").write_text("+pids")
        probe = parent / f"probe-{uuid.uuid4().hex}"
        probe.mkdir()
        try:
            (probe / "pids.max").write_text("1")
        finally:
            probe.rmdir()
    except OSError as exc:
        return None, f"{exc.filename or root}: {exc.strerror or exc}"
    return parent, None


@dataclass(frozen=True)
class MemoryBound:
    """How much memory each job may have ([jobs] memory_limit), all the service's jobs together ([jobs]
    memory_total), and where the jobs' memory cgroups are made: in ``parent``, the service's, whose limit is the
    total."""

    limit: int                         # bytes per job; 0: no bound of each job's own
    total: int = 0                     # bytes of all the service's jobs together; 0: no bound
    parent: Path | None = None         # the service's memory cgroup, where each job's is made (None: nowhere)
    files: tuple[str, ...] = ()        # the files given a limit, in order (v1: memory, then memory + swap)
    extra: tuple[tuple[str, str], ...] = ()      # other files written (v2: memory.swap.max = 0)
    why_not: str | None = None         # why the jobs' memory is unbounded although a bound is asked
    always: tuple[tuple[str, str], ...] = ()     # written to every job's cgroup, whatever its limit (v1:
                                       # memory.oom_control 0: a job's cgroup inherits the service's 1, MemoryWatch)

    def cgroup(self, key: str) -> Path | None:
        return None if self.parent is None else self.parent / key

    def for_job(self, key: str) -> dict:
        """The shim's spec of job ``key``'s memory bound."""
        if self.parent is None:
            return {"memory_unbounded": self.why_not} if self.why_not else {}
        own = ([(f, self.limit) for f in self.files] + list(self.extra) if self.limit else []) + list(self.always)
        return {"memory_cgroup": str(self.cgroup(key)), "memory_limit": self.limit, "memory_limits": own,
                "memory_total": self.total, "memory_parent": str(self.parent)}

    def remove(self, key: str) -> None:
        """Remove job ``key``'s memory cgroup if its supervisor left it (it was killed), killing what is in it."""
        if self.parent is not None:
            remove_cgroup(str(self.cgroup(key)), tries=20)


MEMORY_SETTING = "bytes (0: no bound), a share of the machine's memory such as \"80%\", or \"auto\" (the default)"
MEMORY_FLOOR = 16 << 20         # the least memory bound in bytes a site may give: a shell and Python start in it
MEMORY_AUTO = "auto"            # the default of memory_limit and memory_total (memory_auto)
AUTO_SHARE = 75                 # "auto": at most this share (percent) of the machine's memory,
AUTO_RESERVE = 192 << 20        # and at most all of it but this, kept for the kernel, guestd and the job service
AUTO_FLOOR_SHARE = 25           # (their code's pages included: mem15), but at least this share
AUTO_JOB_MARGIN = 16 << 20      # memory_limit's "auto" is memory_total's less this


def memory_auto(total: int, job: bool = False) -> int:
    """[jobs] memory_total "auto" (its default) for a machine of ``total`` bytes: the smaller of AUTO_SHARE (75%) of
    it and all of it but AUTO_RESERVE (192 MiB), at least AUTO_FLOOR_SHARE (25%), rounded down to 4 KiB pages; with
    ``job``, memory_limit's "auto": that less AUTO_JOB_MARGIN (16 MiB), at least MEMORY_FLOOR, so that a job alone
    that takes all it can is stopped at its own limit and told so (the service's cgroup, where the total is, also
    holds a little kernel memory of jobs that ended: with both equal it is always the total that is reached).

    A share alone left a small guest too little: in a 384 MiB guest (MemTotal 344 MiB) 75% kept 86 MiB, less than
    the kernel, guestd and the job service hold at rest (about 98 MiB), so jobs filling their tmpfs (which no reclaim
    frees: no swap) made the kernel evict the service's code pages over and over before the jobs' cgroup reached its
    bound, and the service took 22 s to answer (trial14 U1, measured by mem15). The reserve matters below 768 MiB, the
    floor below 256 MiB."""
    share = total * AUTO_SHARE // 100
    floor = total * AUTO_FLOOR_SHARE // 100
    whole = max(floor, min(share, total - AUTO_RESERVE)) // 4096 * 4096
    return max(MEMORY_FLOOR, whole - AUTO_JOB_MARGIN) if job else max(4096, whole)


def memory_limit_bytes(setting: int | str, total: int | None = None, key: str = "memory_limit") -> int:
    """[jobs] memory_limit (or ``key``: memory_total) in bytes: an integer is bytes (0: no bound); "P%" is P percent
    of the machine's memory (``total``, default MemTotal of /proc/meminfo), rounded down to 4 KiB pages; "auto" (the
    default) is ``memory_auto`` of it (memory_limit's 16 MiB less than memory_total's). Bytes given, or a share's,
    below MEMORY_FLOOR (16 MiB) are refused. A ValueError (one line, naming the key) for anything else."""
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 0:
            raise ValueError(f"[jobs] {key} = {setting}: {MEMORY_SETTING}")
        if 0 < setting < MEMORY_FLOOR:      # trial14 U9: 1000 (meant as MiB?) started, then killed every job
            raise ValueError(f"[jobs] {key} = {setting}: bytes, at least {MEMORY_FLOOR} (16 MiB: no job starts in "
                             f"less), or 0 for no bound, or a share of the machine's memory such as \"80%\", or "
                             f"\"auto\" (the default)")
        return setting
    if setting == MEMORY_AUTO:
        return memory_auto(machine_memory() if total is None else total, job=key == "memory_limit")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", setting) if isinstance(setting, str) else None
    if match is None or not 0 < float(match.group(1)) <= 100:
        raise ValueError(f"[jobs] {key} = {setting!r}: {MEMORY_SETTING}; a share more than 0% and at most 100%")
    if total is None:
        total = machine_memory()
    share = int(total * float(match.group(1)) / 100) // 4096 * 4096
    if share < MEMORY_FLOOR:        # H3/X1: "0.001%" passed the floor bytes have, then every job was killed
        raise ValueError(f"[jobs] {key} = {setting!r} is {share} bytes of this machine's {total}: at least "
                         f"{MEMORY_FLOOR} (16 MiB: no job starts in less); give a larger share, bytes, or "
                         f"\"auto\" (the default)")
    return share


def machine_memory() -> int:
    """The machine's memory in bytes (MemTotal)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ValueError("/proc/meminfo has no MemTotal")


MEMORY_V1 = "/sys/fs/cgroup/memory"
CGROUP_V2 = "/sys/fs/cgroup"


def own_cgroup_v1(controller: str) -> str:
    """This process's cgroup of the v1 hierarchy of ``controller`` ("/" if none is named), from /proc/self/cgroup."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path or "/"
    return "/"


def write_limits(path: Path, values: list[tuple[str, object]]) -> None:
    """Write ``values`` (file, value) into the cgroup ``path``, in order, or in the reverse order when that fails
    (cgroup v1 keeps memory.limit_in_bytes at most memory.memsw.limit_in_bytes: lowering both goes memory first,
    raising them memory + swap first). OSError if neither order does."""
    try:
        for name, value in values:
            (path / name).write_text(str(value))
    except OSError:
        for name, value in reversed(values):
            (path / name).write_text(str(value))


def memory_summary(setting: int | str, limit: int, total_setting: int | str, total: int) -> str:
    """One line of what [jobs] memory_limit (``setting``, ``limit`` bytes) and memory_total came to, and whence."""
    def bound(value: int, what: str) -> str:
        return f"at most {value} bytes ({value / (1 << 20):.1f} MiB) {what}" if value else f"no bound {what}"
    return (f"jobs' memory: {bound(limit, 'each')} ([jobs] memory_limit = {setting!r}), "
            f"{bound(total, 'together')} (memory_total = {total_setting!r}) of this machine's "
            f"{machine_memory()} bytes")


def memory_cgroups(setting: int | str, total_setting: int | str, state_dir: Path | str) -> MemoryBound:
    """Where this service may make a memory cgroup per job bounding it to [jobs] memory_limit (``setting``), inside
    one of the service's own bounding all its jobs together to [jobs] memory_total (``total_setting``):
    ``service_cgroup_name(state_dir)``, made (or found again, its total set anew) at start and probed by making (and
    removing) a job's in it. cgroup v1 (the memory hierarchy at MEMORY_V1): the service's is made in the service's
    own memory cgroup (a bound the operator put on the service covers its jobs too), and memory, then memory + swap
    (memory.memsw, where the kernel accounts swap), are bounded; cgroup v2 (CGROUP_V2 with the memory controller):
    it is made at the hierarchy's root, each job's is the job's pids cgroup too, memory.max the limit and
    memory.swap.max 0. ``why_not`` says why neither could be used. A ValueError for a setting that means nothing."""
    limit = memory_limit_bytes(setting)
    total = memory_limit_bytes(total_setting, key="memory_total")
    log.info("%s", memory_summary(setting, limit, total_setting, total))     # trial15 X7: what "75%" is here
    if limit == 0 and total == 0:
        return MemoryBound(0)
    v1, v2 = Path(MEMORY_V1), Path(CGROUP_V2)
    name = service_cgroup_name(state_dir)
    try:
        if (v1 / "cgroup.procs").exists():
            parent = v1 / own_cgroup_v1("memory").lstrip("/") / name
            parent.mkdir(exist_ok=True)
            files: tuple[str, ...] = ("memory.limit_in_bytes",)
            if (parent / "memory.memsw.limit_in_bytes").exists():
                files += ("memory.memsw.limit_in_bytes",)
            extra: tuple[tuple[str, str], ...] = ()
            always: tuple[tuple[str, str], ...] = (("memory.oom_control", "0"),)     # the kernel kills at its own
            unbounded = "-1"
        elif (v2 / "cgroup.controllers").exists():
            if "memory" not in (v2 / "cgroup.controllers").read_text().split():
                return MemoryBound(limit, total, why_not=f"{v2} (cgroup v2) has no memory controller")
            (v2 / "cgroup.subtree_control").write_text("+memory")
            parent = v2 / name
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text("+memory")
            files = ("memory.max",)
            extra = (("memory.swap.max", "0"),) if (parent / "memory.swap.max").exists() else ()
            always = ()
            unbounded = "max"
        else:
            return MemoryBound(limit, total, why_not=f"no memory cgroup hierarchy ({v1}, or {v2} of cgroup v2)")
        parent.chmod(0o755)          # a job (its own uid) may read its limits: not the container's umask 077
        try:                         # the total (found again after a restart: what this start's configuration says)
            write_limits(parent, [(f, total or unbounded) for f in files]
                         + [(f, v if total else "max") for f, v in extra])
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            log.warning("[jobs] memory_total = %r: %s could not be lowered to %d bytes while the jobs that run on "
                        "use more (%s): it stays as it was until they end", total_setting, parent, total,
                        exc.strerror)
        write_limits(parent, list(always))     # a watch gone with its guard (both killed) left the choice disabled
        probe = parent / f"probe-{uuid.uuid4().hex}"
        probe.mkdir()
        try:
            write_limits(probe, ([(f, limit) for f in files] + list(extra) if limit else []) + list(always))
        finally:
            probe.rmdir()
    except OSError as exc:
        return MemoryBound(limit, total, why_not=f"{exc.filename or v1}: {exc.strerror or exc}")
    return MemoryBound(limit, total, parent, files, extra, always=always)


WATCH_MARGIN = (8 << 20, 64 << 20)    # cgroup v2: memory_total less this (a 16th of it, within these) is where the
                                      # service picks which job goes (memory.high), before the kernel at the total
TOTAL_KILL = "memory_total_kill"      # in a job's control directory: the service killed it at the total (shim.py)
KILL_WAIT = 10.0                      # seconds a job killed at the total is given to end before it may be chosen again
AT_TOTAL = 1 << 20                    # cgroup v1: usage within this of the total is at it (a waiting fault needs a
                                      # few pages at most; a job killed there gives back far more)


def cgroup_held(path: Path) -> int:
    """The bytes the memory cgroup ``path`` holds that reclaim cannot give back: its usage (its processes' memory,
    its tmpfs files, kernel memory) less its file cache (tmpfs pages are on the anon lists, not the file lists)."""
    v1 = (path / "memory.usage_in_bytes").exists()
    usage = int((path / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
    stat = dict(line.split()[:2] for line in (path / "memory.stat").read_text().splitlines() if " " in line)
    prefix = "total_" if v1 else ""
    return max(0, usage - int(stat.get(prefix + "active_file", 0)) - int(stat.get(prefix + "inactive_file", 0)))


def cgroup_has_processes(path: Path) -> bool:
    try:
        return bool((path / "cgroup.procs").read_text().split())
    except OSError:
        return False


class MemoryWatch:
    """attack15 H2: at [jobs] memory_total the kernel kills the process with the largest RSS among all the service's
    jobs, so a job whose memory is in its /tmp (tmpfs: in no process's RSS) or spread over many small processes made
    another job die, blamed for the total. The service chooses instead: the job whose memory cgroup holds the most
    (``cgroup_held``: its processes' memory and its tmpfs files, file cache left out) is killed, every process of it
    (its tmpfs, /tmp and /dev/shm, go with its mount namespace: their pages are freed, not only its processes'), and
    fails naming memory_total (TOTAL_KILL, read by its supervisor). Nothing a job's processes set (oom_score_adj)
    changes the choice.

    cgroup v1: ``memory.oom_control`` ``oom_kill_disable`` 1 on the service's cgroup, so that at the total the kernel
    kills nobody: a job's process that faults a page there waits (killable) and the kernel notifies the eventfd
    registered on memory.oom_control; the watch kills the job holding the most, its memory is uncharged, and the
    waiting processes go on. (What the kernel allocates inside a call, such as a write to tmpfs, is refused with
    ENOMEM there instead of waiting.) Each job's own cgroup has 0 (``MemoryBound.always``): past a job's own limit
    the kernel kills in it as before. cgroup v2 has no such switch: ``memory.high`` at the total less WATCH_MARGIN
    throttles the jobs' allocations there (the more, the further past it) and its ``memory.events`` wakes the watch,
    which kills there; the kernel at the total is the backstop, and a job alone is left to its own limit (the
    threshold is above it).

    Nothing stays disabled (v1) or throttled (v2) without the watch: a guard process (``shim.py --guard``, a session
    of its own) holds the read end of a pipe whose write end only the service holds, and writes the kernel's choice
    back (oom_kill_disable 0, memory.high "max") when it reads its end: the service killed, even with SIGKILL. The
    watch's thread does the same when it fails (any exception) or stops, and when the guard ends (killed) it does so
    and starts another before arming again. A service that starts sets 0 first (``memory_cgroups``)."""

    def __init__(self, bound: MemoryBound, control_dir: Path):
        self.parent, self.total, self.control_dir = bound.parent, bound.total, Path(control_dir)
        self.limit = bound.limit if 0 < bound.limit < bound.total else 0      # a job's own, below the total
        self.v1 = (self.parent / "memory.oom_control").exists()
        if self.v1:
            self.threshold = self.total
            self.arm, self.disarm = [("memory.oom_control", "1")], [("memory.oom_control", "0")]
        else:
            margin = min(WATCH_MARGIN[1], max(WATCH_MARGIN[0], self.total // 16))
            if self.limit:  # above a job's own limit ("auto": the total less 16 MiB), so a job alone meets its own
                margin = min(margin, max(1 << 20, (self.total - self.limit) // 2))
            self.threshold = self.total - margin
            self.arm, self.disarm = [("memory.high", str(self.threshold))], [("memory.high", "max")]
        self._killed: dict[str, float] = {}      # job key -> when the watch killed it
        self._fds: list[int] = []
        self.guard: subprocess.Popen | None = None
        self._guard_fd = -1
        self._stop_r, self._stop_w = os.pipe()
        try:
            if self.v1:
                self.event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._fds.append(self.event)
                control = os.open(self.parent / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
                self._fds.append(control)
                (self.parent / "cgroup.event_control").write_text(f"{self.event} {control}")
            else:
                self.event = os.open(self.parent / "memory.events", os.O_RDONLY | os.O_CLOEXEC)
                self._fds.append(self.event)
            self._start_guard()
            write_limits(self.parent, self.arm)
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, name="vmgrid-memory-total", daemon=True)

    @classmethod
    def start_for(cls, bound: MemoryBound, control_dir: Path) -> "MemoryWatch | None":
        """A watch of the jobs' total ``bound`` (None without one, or if the cgroup cannot be watched: logged)."""
        if bound.parent is None or not bound.total:
            return None
        try:
            watch = cls(bound, control_dir)
        except OSError as exc:
            log.warning("[jobs] memory_total: %s cannot be watched (%s): at the total the kernel kills the largest "
                        "process of all the jobs, whichever job holds the memory", bound.parent, exc.strerror or exc)
            return None
        watch._thread.start()
        return watch

    def _start_guard(self) -> None:
        """Start the guard and wait for its word that it reads its pipe (so arming never precedes it)."""
        argv = [sys.executable, "-I", str(SHIM), "--guard", str(self.parent)]
        for name, value in self.disarm:
            argv += [name, value]
        guard = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 start_new_session=True, close_fds=True, env={"PATH": BASE_PATH, "LANG": "C.UTF-8"})
        said = guard.stdout.readline()
        guard.stdout.close()
        if said != b"guarding\n":
            guard.stdin.close()
            guard.wait()
            raise OSError(errno.ECHILD, f"its guard ended at start (status {guard.returncode})")
        if self._guard_fd >= 0:
            os.close(self._guard_fd)
        self.guard, self._guard_fd = guard, os.pidfd_open(guard.pid)

    def _end_guard(self) -> None:
        if self.guard is not None:
            self.guard.stdin.close()        # it writes the kernel's choice back (again) and exits
            try:
                self.guard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.guard.kill()
                self.guard.wait()
            self.guard = None

    def _set_kernel_choice(self) -> None:
        try:
            write_limits(self.parent, self.disarm)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.error("[jobs] memory_total: %s: %s", self.parent, exc.strerror or exc)

    def _release(self) -> None:
        self._set_kernel_choice()
        self._end_guard()
        for fd in self._fds + [self._stop_r, self._stop_w, self._guard_fd]:
            if fd >= 0:
                os.close(fd)
        self._fds, self._stop_r, self._stop_w, self._guard_fd = [], -1, -1, -1

    def stop(self) -> None:
        """Stop watching: the kernel chooses at the total again (until the next start's watch)."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=10)
        self._release()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:              # whatever it was: never leave the jobs waiting for a choice nobody makes
            log.exception("[jobs] memory_total: the watch of %s failed: at the total the kernel chooses again (the "
                          "largest process)", self.parent)
        finally:
            self._set_kernel_choice()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self.event, select.POLLIN if self.v1 else select.POLLPRI)
        poller.register(self._guard_fd, select.POLLIN)
        busy = False
        while True:
            ready = dict(poller.poll(100 if busy else None))     # at the total: look again every 0.1 s
            if self._stop_r in ready:
                return
            if self._guard_fd in ready:          # the guard ended (killed): the kernel chooses until another guards
                self._set_kernel_choice()
                log.warning("[jobs] memory_total: the guard of %s ended (status %s): starting another",
                            self.parent, self.guard.wait())
                poller.unregister(self._guard_fd)
                self.guard.stdin.close()
                self._start_guard()
                poller.register(self._guard_fd, select.POLLIN)
                write_limits(self.parent, self.arm)
            if self.event in ready:
                if self.v1:
                    try:
                        os.eventfd_read(self.event)
                    except BlockingIOError:
                        pass
                else:                  # read, so that poll waits for the next change
                    os.lseek(self.event, 0, os.SEEK_SET)
                    os.read(self.event, 4096)
            busy = self.check()

    def at_total(self) -> bool:
        """v1: whether a process of the jobs waits at the total (memory.oom_control ``under_oom``) and the jobs
        still hold it (usage within AT_TOTAL of the limit, memory or memory + swap): a job's memory given back
        wakes the waiting processes, which unmark ``under_oom`` only once they have run again, so that alone would
        have a second job killed for the first's."""
        control = dict(line.split()[:2] for line in (self.parent / "memory.oom_control").read_text().splitlines()
                       if " " in line)
        if control.get("under_oom", "0") == "0":
            return False
        for usage, limit in (("memory.usage_in_bytes", "memory.limit_in_bytes"),
                             ("memory.memsw.usage_in_bytes", "memory.memsw.limit_in_bytes")):
            try:
                if int((self.parent / usage).read_text()) + AT_TOTAL >= int((self.parent / limit).read_text()):
                    return True
            except FileNotFoundError:       # no memsw (swap not accounted)
                continue
        return False

    def check(self) -> bool:
        """Kill the job holding the most if the jobs are at the total (v1: a process waits there; v2: they hold the
        threshold); whether to look again soon (still there)."""
        if self.v1:
            if not self.at_total():
                return False
        elif int((self.parent / "memory.current").read_text()) < self.threshold:
            return False
        now = time.monotonic()
        held = []
        for entry in os.scandir(self.parent):
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("probe-"):
                continue
            path = Path(entry.path)
            if not cgroup_has_processes(path):
                continue               # ended (its cgroup about to go): nothing to kill there
            if now - self._killed.get(entry.name, -KILL_WAIT) < KILL_WAIT:
                continue               # killed a moment ago, ending: its memory is being given back
            try:
                held.append((cgroup_held(path), entry.name))
            except (OSError, ValueError):      # gone meanwhile
                continue
        if not self.v1 and ((self.limit and sum(1 for h, _ in held if h) < 2) or sum(h for h, _ in held) <
                            self.threshold):
            return True                # v2: a job alone meets its own limit; file cache is freed by reclaim
        if not held:
            return True
        most, key = max(held)
        self.kill(key, most, sum(h for h, _ in held))
        self._killed = {k: t for k, t in self._killed.items() if now - t < KILL_WAIT}
        self._killed[key] = now
        return True

    def kill(self, key: str, most: int, together: int) -> None:
        """Kill every process of job ``key`` (its init first: with it its PID namespace), having told its
        supervisor why (TOTAL_KILL in its control directory, written first: the supervisor reads it once the init
        has ended)."""
        procs = self.parent / key / "cgroup.procs"
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            return
        why = (f"the program was killed by the job service, out of memory: this job service's jobs together reached "
               f"their memory total of {self.total} bytes ([jobs] memory_total), and this job held the most of it "
               f"({most} bytes, its /tmp included)")
        control = self.control_dir / key
        if control.is_dir():
            (control / TOTAL_KILL).write_text(json.dumps({"error": why, "processes": len(pids) or 1,
                                                          "bytes": self.total}))
        log.warning("job %s killed: the jobs held %d bytes at [jobs] memory_total = %d bytes, and it the most (%d "
                    "bytes)", key, together, self.total, most)
        for _ in range(100):           # every process of the job, its namespace's init first (in order of pid)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
            try:
                pids = [int(p) for p in procs.read_text().split()]
            except OSError:
                return


def remove_left_cgroups(parents: list[Path | None], live: Callable[[], set[str]]) -> list[str]:
    """Remove the cgroups in the service's ``parents`` (its pids and memory cgroups) of no job ``live()`` names (the
    keys of the jobs not yet ended, asked after the cgroups are listed): those a supervisor killed with the service
    (SIGKILL) could not remove, and those of jobs that ended or were destroyed while it was away, killing what is
    left in them (nothing of an ended job runs on). A job's cgroup is made after its record, and removed before it
    ends: one listed while it is being made is a live job's. The names removed."""
    listed = []
    for parent in dict.fromkeys(p for p in parents if p is not None):
        try:
            listed += [parent / e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
    if not listed:
        return []
    keep = live()
    return [path.name for path in listed if path.name not in keep and remove_cgroup(str(path), tries=5)]


def remove_service_cgroups(parents: list[Path | None]) -> None:
    """Remove the service's own cgroups (``parents``) if no job's cgroup is left in them (a job that runs on keeps
    them, found again at the next start); kills nothing."""
    for parent in dict.fromkeys(p for p in parents if p is not None):
        try:
            parent.rmdir()
        except OSError:
            pass


def remove_job_cgroup(parent: Path | None, key: str) -> None:
    """Remove a job's pids cgroup the supervisor left (it was killed), killing what is still in it."""
    if parent is not None:
        remove_cgroup(str(parent / key), tries=20)


NETWORKS = {"host": "the host's network, as any local account has it",
            "none": "a network namespace of the job's own with only loopback"}


def network_mode(setting: str) -> str:
    """[jobs] network checked: "host" or "none"; a ValueError (one line naming the key) for anything else."""
    if setting not in NETWORKS:
        raise ValueError(f"[jobs] network = {setting!r}: " + " or ".join(f'"{k}" ({v})' for k, v in NETWORKS.items()))
    return setting


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_supervisor(control: Path) -> tuple[int, str] | None:
    """The pid and start time the job's supervisor recorded when it started, if it did."""
    try:
        data = json.loads((control / "shim.json").read_text())
        return int(data["pid"]), str(data["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_exit(status_path: Path) -> Exit:
    try:
        data = json.loads(status_path.read_text())
    except FileNotFoundError:
        return Exit(None, "the job's process ended without leaving an exit status (it was killed with its "
                          "supervisor)")
    except (OSError, ValueError) as exc:
        return Exit(None, f"the job's exit status cannot be read: {exc}")
    return Exit(data.get("exit"), data.get("error"), data.get("dropped") or {})
