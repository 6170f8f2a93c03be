"""``python3 -m guestd.init``: PID 1 of a vmgrid guest image: mount the basics, run guestd, reap orphans.

The guest image's initramfs switches root to this; no other init system is needed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

# cgroup2: the job service bounds each job's processes with a pids cgroup (docs/jobs.md, [jobs] max_processes);
# /dev/shm: POSIX shared memory and semaphores (Python's multiprocessing Lock and Pool, OpenMP runtimes), a tmpfs
# (1777) as every Linux distribution mounts it
MOUNTS = (("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("cgroup2", "/sys/fs/cgroup", "cgroup2"),
          ("devtmpfs", "/dev", "devtmpfs"), ("tmpfs", "/run", "tmpfs"), ("tmpfs", "/tmp", "tmpfs"),
          ("devpts", "/dev/pts", "devpts"), ("tmpfs", "/dev/shm", "tmpfs"))


def mount_basics() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for source, target, fstype in MOUNTS:
        if os.path.ismount(target):
            continue
        os.makedirs(target, exist_ok=True)
        if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
            print(f"guestd-init: mount {target}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)


def protect_from_oom_killer(score: int = -900) -> None:
    """guestd and what it starts (the grid container: the job service) are the guest's last choice when it runs out
    of memory (trial14 U1: two jobs' tmpfs files, which count in no process's size, made the kernel kill the job
    service). Each job's program is set back to 0 by the job service's shim, so a job is always chosen first."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError as exc:
        print(f"guestd-init: oom_score_adj: {exc.strerror or exc}", file=sys.stderr)


def main() -> int:
    if os.getpid() != 1:
        from .daemon import main as daemon_main
        return daemon_main(sys.argv[1:])
    mount_basics()
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    while True:
        pid = os.fork()
        if pid == 0:
            protect_from_oom_killer()
            from .daemon import main as daemon_main
            os._exit(daemon_main(sys.argv[1:]))
        while True:                        # reap every child; restart guestd if it is the one
            try:
                done, status = os.wait()
            except ChildProcessError:
                break
            if done == pid:
                print(f"guestd-init: guestd exited ({status}); restarting", file=sys.stderr)
                break
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
