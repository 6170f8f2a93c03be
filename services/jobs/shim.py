"""The supervisor of one job's process (Python standard library only, run as its own script).

The job service starts ``python3 shim.py SPEC`` in a new session (so the shim leads the job's process
group) and the shim starts the program without a shell (as root: under a small init of its own that is PID 1
of a new PID namespace, so that nothing the program starts outlives it, not even a process that calls
setsid: when that init exits the kernel kills every process of the namespace), copies its standard output and error into
files up to a bound, waits, and writes the exit status to a file. The shim outlives a job service
that dies, so a restarted service finds either the shim still running (and re-attaches) or the exit
status it left (the job's real end), never a job silently lost.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat as _stat
import subprocess
import sys
import threading
import time

CHUNK = 65536
CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")      # where any account may write: the job's own, in its namespace
# other directories any account may write on some systems (FHS, Debian): where one is a real directory (not a link)
# writable by all, the job has its own too (a tmpfs each), so no job leaves anything there for another
SHARED_DIRS = ("/run/lock", "/var/lock", "/var/crash")


def copy_bounded(src, dest, limit: int, counts: dict, name: str) -> None:
    """Copy ``src`` into ``dest`` (a path, or the fd the service opened for it) until ``limit`` bytes, then keep
    draining and count the rest."""
    kept = dropped = 0
    with open(dest, "ab", buffering=0) as out:
        while True:
            data = src.read1(CHUNK) if hasattr(src, "read1") else src.read(CHUNK)
            if not data:
                break
            room = max(0, limit - kept)
            if room:
                out.write(data[:room])
                kept += min(room, len(data))
            dropped += max(0, len(data) - room)
    counts[name] = dropped


def write_status(path: str, status: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def own_start_time() -> str:
    with open("/proc/self/stat") as f:
        stat = f.read()
    return stat[stat.rfind(")") + 2:].split()[19]


def end_the_rest_of_the_group() -> None:
    """The program has ended: end what it left running in the job's process group (a child in the background
    would outlive the job, its Destroy and its lifetime, and one holding the output pipes would keep the job
    Active). SIGTERM to the group (this shim ignores it), then SIGKILL to each other member still there. A
    process that left the group (setsid) is out of reach."""
    group = os.getpgrp()
    if group != os.getpid():
        return                      # not leading a group of its own (run by hand): nothing is ours to end
    try:
        os.killpg(group, signal.SIGTERM)
    except OSError:
        return
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            if int(stat[stat.rfind(")") + 2:].split()[2]) == group:
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def enter_pid_namespace() -> str | None:
    """Make this process's next child PID 1 of a new PID namespace; None if done, else why not (no privilege)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def private_ipc() -> str | None:
    """Give the job an IPC namespace of its own: the System V shared memory segments, semaphores and message queues
    and the POSIX message queues it makes are seen by no other job nor the host, and go with its last process (a
    segment left behind would outlive it, in memory, for any account its mode lets in). None, or why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWIPC) != 0:
        return os.strerror(ctypes.get_errno())
    return None


CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def private_network() -> str | None:
    """Give the job a network namespace of its own ([jobs] network = "none") with only its loopback, brought up:
    it reaches no other job's listener on localhost nor its abstract Unix sockets (they are the namespace's), and
    nothing beyond the machine; its own localhost works. None, or why not."""
    import fcntl
    import socket
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return os.strerror(ctypes.get_errno())
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            name = b"lo".ljust(16, b"\0")
            flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, name + b"\0" * 24)[:18])[1]
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH", name, flags | IFF_UP) + b"\0" * 22)
    except OSError as exc:
        return f"loopback: {exc.strerror or exc}"
    return None


def private_mounts(tmp: tuple[int, str] | None, proc: bool) -> dict:
    """Give the job (this process and what it starts) a mount namespace of its own, made before the uid is dropped:

    - with ``tmp`` (a size in bytes, and the directory to keep): a /tmp and /var/tmp of its own (one tmpfs of that
      size), a /dev/shm of its own (another), and one of each of SHARED_DIRS that is a directory any account may
      write (/run/lock: another each), whose tmpfs go with its last process, so nothing the job writes there
      outlives it, reaches another job or takes more of the host's memory than the size each. The directory to
      keep (the service's state directory, the job's inside) stays at its path, its directories above with their
      owners and modes, where it lies beneath one of them (a state directory under /tmp);
    - with ``proc`` (this process is PID 1 of the job's PID namespace): a /proc of that namespace, so the job sees
      its own processes only (``ps``, /proc/PID), /proc/self its own.

    What could not be done, by what it is about ("tmp", "proc"): why not (no privilege: the host's are shared)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target: str, fstype, flags: int, data) -> None:
        if libc.mount(source, target.encode(), fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), target)

    if libc.unshare(CLONE_NEWNS) != 0:
        why_not = os.strerror(ctypes.get_errno())
        return {**({"tmp": why_not} if tmp else {}), **({"proc": why_not} if proc else {})}
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE, None)        # nothing mounted here reaches the host's namespace
    except OSError as exc:
        why_not = f"{exc.filename}: {exc.strerror}"
        return {**({"tmp": why_not} if tmp else {}), **({"proc": why_not} if proc else {})}
    told = {}
    if tmp is not None:
        try:
            _private_dirs(mount, *tmp)
        except OSError as exc:
            told["tmp"] = f"{exc.filename}: {exc.strerror}"
    if proc:
        try:
            mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        except OSError as exc:
            told["proc"] = f"{exc.filename}: {exc.strerror}"
    return told


def _private_dirs(mount, size: int, keep: str) -> None:
    """private_mounts' tmpfs (``mount``: its mount(2)): PRIVATE_DIRS, SHARED_DIRS where any account may write them,
    and ``keep`` at its path where it lies beneath one of them."""
    keep = os.path.realpath(keep)
    targets = [d for d in PRIVATE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    for d in SHARED_DIRS:
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if _stat.S_ISDIR(st.st_mode) and st.st_mode & 0o002:
            targets.append(d)
    under = next((d for d in targets if keep.startswith(d + "/")), None)
    path = []                 # the directories from there down to ``keep``: (path, stat), as the host has them
    if under is not None:
        d = under
        for part in os.path.relpath(keep, under).split("/"):
            d = os.path.join(d, part)
            path.append((d, os.stat(d)))
        held = os.open(keep, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    tmpfs = f"size={size},mode=1777".encode()
    for target in targets:
        if target == "/var/tmp" and "/tmp" in targets:
            mount(b"/tmp", target, None, MS_BIND, None)     # the same tmpfs as /tmp: one bound for both
        else:
            mount(b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    if under is not None:
        for d, st in path:
            os.makedirs(d, exist_ok=True)
            os.chown(d, st.st_uid, st.st_gid)
            os.chmod(d, st.st_mode & 0o7777)
        mount(f"/proc/self/fd/{held}".encode(), keep, None, MS_BIND | MS_REC, None)
        os.close(held)


def make_cgroup(path: str, limits: list, made: bool = False) -> str | None:
    """Make the job's cgroup ``path`` (its parent made by the service's probe), unless ``made`` (cgroup v2: the one
    cgroup of the job, made for another controller already), and write its ``limits`` (file name, value: e.g.
    pids.max, memory.max) in order; None if done, else why not (a cgroup this call made is removed again)."""
    if not made:
        try:
            os.mkdir(path)
            os.chmod(path, 0o755)    # the job (its own uid) may read its own limits: not the container's umask 077
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
    for name, value in limits:
        try:
            with open(os.path.join(path, name), "w") as f:
                f.write(str(value))
        except OSError as exc:
            if not made:
                os.rmdir(path)
            return f"{path}/{name}: {exc.strerror or exc}"
    return None


def oom_kills(path: str) -> int:
    """How many processes the kernel killed in the memory cgroup ``path`` for want of memory (its limit): the
    ``oom_kill`` count of cgroup v2's memory.events, or of v1's memory.oom_control (Linux 4.13 on); 0 if unknown."""
    return _counter(path, ("memory.events", "memory.oom_control"), "oom_kill")


def forks_refused(path: str) -> int:
    """How many forks (and thread creations) the kernel refused in the pids cgroup ``path`` at its pids.max: the
    ``max`` count of its pids.events (cgroup v1 and v2); 0 if unknown. Read before the cgroup is removed, for the
    job's ResourceBounds (services/jobs/bounds.py)."""
    return _counter(path, ("pids.events",), "max")


def _counter(path: str, files: tuple[str, ...], key: str) -> int:
    """The count on the line ``key N`` of the first of the cgroup ``path``'s ``files`` that has one; 0 if none."""
    for name in files:
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    if line.startswith(key + " "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0


LIMIT_SLACK = 1 << 20      # a cgroup v1 peak within this of a limit reached it (charges come in batches)


def limit_events(path: str | None) -> int:
    """How often the memory cgroup ``path`` reached its own limit, on cgroup v2: the ``max`` count of its
    memory.events (a limit reached at an ancestor is not counted there); 0 on cgroup v1 or if unknown."""
    try:
        with open(os.path.join(path, "memory.events")) as f:
            for line in f:
                if line.startswith("max "):
                    return int(line.split()[1])
    except (OSError, ValueError, TypeError):
        pass
    return 0


def limit_reached(path: str | None, limit: int, events_before: int = 0) -> bool:
    """Whether the memory cgroup ``path`` reached its own ``limit``: on cgroup v2 its memory.events ``max`` count
    grew past ``events_before``; on cgroup v1 its peak (memory.max_usage_in_bytes, or memory + swap's) came within
    LIMIT_SLACK of it (v1's memory.failcnt counts nothing on recent kernels)."""
    if path is None or not limit:
        return False
    if os.path.exists(os.path.join(path, "memory.events")):
        return limit_events(path) > events_before
    for name in ("memory.max_usage_in_bytes", "memory.memsw.max_usage_in_bytes"):
        try:
            with open(os.path.join(path, name)) as f:
                if int(f.read().split()[0]) + LIMIT_SLACK >= limit:
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def memory_cause(limit: int, total: int, own_hit: bool, total_hit: bool) -> str:
    """Which bound the kernel enforced when it killed in a job: "total" ([jobs] memory_total, all the service's jobs
    together) when that one was reached during the job and the job's own limit was not, else "limit"."""
    if total and (total_hit or not limit) and not (limit and own_hit):
        return "total"
    return "limit"


def memory_failure(limit: int, exit_code: int, kills: int, total: int = 0, cause: str = "limit") -> str | None:
    """Why the job failed when the kernel killed ``kills`` of its processes past its memory ``limit`` (``cause``
    "limit") or past the ``total`` of all the service's jobs (``cause`` "total") and the program's exit is
    ``exit_code``; None when the program exited 0 all the same (the job is not failed)."""
    if not kills or exit_code == 0:
        return None
    if cause == "total":
        over = (f"this job service's jobs together used more than their memory total of {total} bytes ([jobs] "
                f"memory_total)")
    else:
        over = f"the job used more than its memory limit of {limit} bytes ([jobs] memory_limit)"
    if exit_code == -signal.SIGKILL:
        return f"the program was killed by the kernel, out of memory: {over}"
    how = f"killed by signal {-exit_code}" if exit_code < 0 else f"exited with status {exit_code}"
    return (f"the program {how} after the kernel killed {'a process' if kills == 1 else f'{kills} processes'} of "
            f"the job, out of memory: {over}")


def join_cgroup(path: str) -> str | None:
    """Move this process (and so everything it starts from now on) into the cgroup ``path``; None, or why not."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")              # 0: the writer itself (its pid in its own namespace would be 1)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def remove_cgroup(path: str, tries: int = 200) -> bool:
    """Kill whatever is left in the job's cgroup (a process that escaped the group and the namespace cannot
    escape it) and remove it; False if it could not be removed (the service tries again when the job is
    destroyed)."""
    for _ in range(tries):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                left = f.read().split()
        except OSError:
            return False
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        time.sleep(0.05)          # the killed processes are being reaped: retry the rmdir
    return False


def start_init(run) -> int:
    """Fork the job's init with SIGTERM blocked: a Cancel's SIGTERM that arrives before the init has installed
    its handler stays pending (the init unblocks it once its handler is in place) instead of being lost to the
    handler it inherited from the shim. ``run`` is the init's body (never returns)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        raise
    if pid == 0:
        run()                 # never returns
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return pid


def run_init(argv: list[str], cwd: str, env: dict, stdin, stdout: int, stderr: int, report: int,
             cgroups: list | None = None, max_file_size: int | None = None, uid: int | None = None,
             tmp: tuple[int, str] | None = None, network: str = "host") -> None:
    """PID 1 of the job's namespace (a forked child of the shim, started by ``start_init`` with SIGTERM blocked;
    never returns): join the job's cgroups (``cgroups``: what each bounds, "processes" or "memory", and its path),
    bound the size of each file it writes, start the program (as ``uid``, its group too and no other, when the
    service gives the job an account of its own), forward SIGTERM to it (a PID 1 gets no signal it has no handler
    for, and the program may have left the group), reap every orphan, and exit once the program has ended, which
    ends every other process of the namespace. An IPC namespace of the job's (``private_ipc``) and a mount
    namespace (``private_mounts``): a /proc of its PID namespace (when this is its PID 1) and, with ``tmp`` (a size
    and the directory to keep), a private /tmp, /var/tmp, /dev/shm and /run/lock. With ``network`` "none" a network
    namespace of the job's with only loopback (``private_network``): the program does not start without it. How it
    ended goes to ``report`` as JSON."""
    program = None
    pending = []
    told: dict = {}

    def forward(signum, frame):
        if program is None:
            pending.append(signum)
        else:
            try:
                os.kill(program.pid, signum)
            except OSError:
                pass
    signal.signal(signal.SIGTERM, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})    # one that came meanwhile is delivered now
    try:
        joined: dict = {}
        for what, path in cgroups or ():
            why_not = joined[path] if path in joined else join_cgroup(path)
            joined[path] = why_not
            if why_not is not None:
                told[what] = f"unbounded: {why_not}"
        in_namespace = os.getpid() == 1          # PID 1 of the job's own PID namespace: its /proc is the job's
        if network == "none":
            why_not = private_network()
            if why_not is not None:          # asked for by the operator: no job runs on the host's network instead
                told.update({"exit": 127, "error": f"the job cannot have a network of its own ([jobs] network = "
                                                   f"\"none\"): {why_not}"})
                os.write(report, json.dumps(told).encode())
                return
        why_not = private_ipc()
        if why_not is not None:
            told["ipc"] = f"the host's: {why_not}"
        if tmp is not None or in_namespace:
            why_not = private_mounts(tmp, in_namespace)
            if "tmp" in why_not:
                told["tmp"] = f"shared with the host: {why_not['tmp']}"
            if "proc" in why_not:
                told["proc"] = f"the host's: {why_not['proc']}"
        if max_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
        try:     # the program is the kernel's first choice, whatever the service's own score (trial14 U1: in a
            with open("/proc/self/oom_score_adj", "w") as f:    # guest guestd protects itself and the job service,
                f.write("0")           # and its children inherit that); written as root, the job cannot lower it
        except OSError:
            pass
        try:
            account = {} if uid is None else {"user": uid, "group": uid, "extra_groups": [], "umask": 0o077}
            program = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                                       close_fds=True, restore_signals=True, **account)
        except OSError as exc:
            told.update({"exit": 127, "error": f"cannot start {argv[0]}: {exc.strerror or exc}"})
            os.write(report, json.dumps(told).encode())
            return
        try:       # the kernel's choice when the job runs out of memory: the program, never its init
            with open("/proc/self/oom_score_adj", "w") as f:      # (set after the fork: the program has 0)
                f.write("-1000")
        except OSError:
            pass
        for signum in pending:
            os.kill(program.pid, signum)
        while True:                          # reap orphans too, until the program itself has ended
            pid, status = os.waitpid(-1, 0)
            if pid == program.pid:
                code = os.waitstatus_to_exitcode(status)
                break
        told["exit"] = code
        os.write(report, json.dumps(told).encode())
    finally:
        os._exit(0)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    # who supervises this job, before the program starts: a service that died before recording it finds it here
    write_status(os.path.join(os.path.dirname(spec["status"]), "shim.json"),
                 {"pid": os.getpid(), "start": own_start_time()})
    status: dict = {"exit": None, "dropped": {}}
    # Cancel signals the whole group: the shim lives on to record how the program ended (a handler,
    # not SIG_IGN, so the program itself gets the default disposition back at exec).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # the job's files: fds the service opened before the job's uid could put a link in their place, or paths
    if spec.get("stdin_fd") is not None:
        stdin = os.fdopen(spec["stdin_fd"], "rb")
    else:
        stdin = open(spec["stdin"], "rb") if spec.get("stdin") else subprocess.DEVNULL
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    report_r, report_w = os.pipe()
    # the copying threads start before the namespace: a process whose children go to another PID namespace
    # can start no more threads
    threads = [threading.Thread(target=copy_bounded, args=(os.fdopen(fd, "rb", buffering=0), path, spec["max_output"],
                                                          status["dropped"], name))
               for fd, path, name in ((out_r, spec.get("stdout_fd", spec["stdout"]), "stdout"),
                                      (err_r, spec.get("stderr_fd", spec["stderr"]), "stderr"))]
    for t in threads:
        t.start()
    why_not = enter_pid_namespace() if spec.get("pid_namespace") else "not asked"
    if why_not is not None and spec.get("pid_namespace"):
        status["isolation"] = f"process group only: {why_not}"
    cgroups = []                    # (what it bounds, path): one per controller, one path for both on cgroup v2
    wanted = []
    if spec.get("pids_cgroup"):                  # the service found a pids cgroup hierarchy: one cgroup per job
        wanted.append(("processes", spec["pids_cgroup"], [("pids.max", spec["max_processes"])]))
    elif spec.get("processes_unbounded"):      # the service's probe found none: say so with the job's status
        status["processes"] = f"unbounded: {spec['processes_unbounded']}"
    if spec.get("memory_cgroup"):                # a memory cgroup per job: past its limit the kernel kills in it
        wanted.append(("memory", spec["memory_cgroup"], spec["memory_limits"]))
    elif spec.get("memory_unbounded"):
        status["memory"] = f"unbounded: {spec['memory_unbounded']}"
    for what, path, limits in wanted:
        why_not = make_cgroup(path, limits, made=any(path == p for _, p in cgroups))
        if why_not is None:
            cgroups.append((what, path))
        else:
            status[what] = f"unbounded: {why_not}"
    memory = next((p for what, p in cgroups if what == "memory"), None)
    total_before = limit_events(spec.get("memory_parent")) if memory is not None else 0

    def init_body():
        os.close(report_r)
        for fd in (spec.get("stdout_fd"), spec.get("stderr_fd")):      # the copying threads' (the shim's)
            if fd is not None:
                os.close(fd)
        run_init(spec["argv"], spec["cwd"], spec["env"], stdin, out_w, err_w, report_w, cgroups,
                 spec.get("max_file_size"), spec.get("uid"),
                 (spec["tmp_size"], spec["keep"]) if spec.get("tmp_size") else None, spec.get("network", "host"))
    init = start_init(init_body)          # PID 1 of the job's namespace (without one: a plain child doing the same)
    for fd in (out_w, err_w, report_w):
        os.close(fd)
    if stdin is not subprocess.DEVNULL:
        stdin.close()
    _, wait_status = os.waitpid(init, 0)     # a namespace ends with its init: nothing of the job is left in it
    end_the_rest_of_the_group()     # before the joins: a process left behind in the group may hold the output pipes
    kills = oom_kills(memory) if memory is not None else 0        # before the cgroup goes
    pids = next((p for what, p in cgroups if what == "processes"), None)
    refused = forks_refused(pids) if pids is not None else 0      # (jobstat16: forks refused at max_processes)
    if kills:
        limit, total = spec.get("memory_limit", 0), spec.get("memory_total", 0)
        cause = memory_cause(limit, total, limit_reached(memory, limit),
                             limit_reached(spec.get("memory_parent"), total, total_before))
    for path in dict.fromkeys(p for _, p in cgroups):
        remove_cgroup(path)
    for t in threads:
        t.join()
    with os.fdopen(report_r, "rb") as f:
        told = f.read()
    if told:
        status.update(json.loads(told))      # the program's exit code, negative: the signal that ended it
    else:                                    # the init was killed (SIGKILL to the group): so was the program
        status["exit"] = os.waitstatus_to_exitcode(wait_status)
    chosen = total_kill(os.path.dirname(spec["status"])) if memory is not None and status["exit"] != 0 else None
    if chosen is not None:        # the service killed the job at the jobs' total: it held the most of it
        kills, total = chosen["processes"], spec.get("memory_total", 0)
        status["memory"] = f"{kills} process{'es' if kills > 1 else ''} killed past the jobs' total of {total} bytes"
        status["memory_killed"] = {"processes": kills, "setting": "memory_total", "bytes": total}
        status["error"] = chosen["error"]
    elif kills:
        past = (f"the jobs' total of {spec['memory_total']}" if cause == "total" else str(spec["memory_limit"]))
        status["memory"] = f"{kills} process{'es' if kills > 1 else ''} killed past {past} bytes"
        # the same as data, for the service's ResourceBounds property (services/jobs/bounds.py)
        status["memory_killed"] = {"processes": kills, "setting": f"memory_{cause}",
                                   "bytes": spec["memory_total"] if cause == "total" else spec["memory_limit"]}
        failure = memory_failure(spec["memory_limit"], status["exit"], kills, spec.get("memory_total", 0), cause)
        if failure is not None and not status.get("error"):
            status["error"] = failure
    if refused:      # as data, for the ResourceBounds property (services/jobs/bounds.py)
        status["processes_refused"] = {"forks": refused, "bound": spec.get("max_processes")}
    write_status(spec["status"], status)
    return 0


TOTAL_KILL = "memory_total_kill"    # services/jobs/runner.py MemoryWatch: why the service killed the job


def total_kill(control: str) -> dict | None:
    """What the job service's MemoryWatch wrote in the job's ``control`` directory before killing it at the jobs'
    memory total (it held the most): {"error": why, "processes": how many}; None if it did not."""
    try:
        with open(os.path.join(control, TOTAL_KILL)) as f:
            chosen = json.load(f)
        if isinstance(chosen.get("error"), str) and int(chosen.get("processes", 1)) > 0:
            return {"error": chosen["error"], "processes": int(chosen.get("processes", 1))}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def guard(cgroup: str, values: list[str]) -> int:
    """``shim.py --guard CGROUP FILE VALUE ...``: started by the job service's MemoryWatch with a pipe as its
    standard input, whose write end only the service holds. It says "guarding", reads until the end of the pipe
    (the service stopped the watch, or died: even SIGKILL closes it) and then writes each VALUE into FILE of
    CGROUP (oom_kill_disable 0, memory.high "max": the kernel's own choice at the jobs' total), so that no job
    waits at the total for a choice nobody is left to make. SIGTERM and SIGINT do the same before it exits."""
    def leave(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        os.write(1, b"guarding\n")
        while os.read(0, 4096):
            pass
    finally:
        for name, value in zip(values[::2], values[1::2]):
            try:
                with open(os.path.join(cgroup, name), "w") as f:
                    f.write(value)
            except OSError:
                pass
    return 0


def probe() -> int:
    """Whether jobs may have PID namespaces here (``shim.py --probe``, run once by the job service at start in a
    throw-away process): make one and its first process as a job's supervisor does; exit 0, or say why not."""
    why_not = enter_pid_namespace()
    if why_not is not None:
        sys.exit(why_not)
    first = os.fork()
    if first == 0:
        os._exit(0)
    os.waitpid(first, 0)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--guard":
        sys.exit(guard(sys.argv[2], sys.argv[3:]))
    sys.exit(probe() if sys.argv[1] == "--probe" else main(sys.argv[1]))
