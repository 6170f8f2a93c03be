"""The supervisor of one job's process (Python standard library only, run as its own script).

The job service starts ``python3 shim.py SPEC`` in a new session (so the shim leads the job's process
group) and the shim starts the program without a shell, copies its standard output and error into
files up to a bound, waits, and writes the exit status to a file. The shim outlives a job service
that dies, so a restarted service finds either the shim still running (and re-attaches) or the exit
status it left (the job's real end), never a job silently lost.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

CHUNK = 65536


def copy_bounded(src, dest_path: str, limit: int, counts: dict, name: str) -> None:
    """Copy ``src`` into ``dest_path`` until ``limit`` bytes, then keep draining and count the rest."""
    kept = dropped = 0
    with open(dest_path, "ab", buffering=0) as out:
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
    stdin = open(spec["stdin"], "rb") if spec.get("stdin") else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
    except OSError as exc:
        status.update(exit=127, error=f"cannot start {spec['argv'][0]}: {exc.strerror or exc}")
        write_status(spec["status"], status)
        return 0
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    threads = [threading.Thread(target=copy_bounded, args=(pipe, path, spec["max_output"], status["dropped"], name))
               for pipe, path, name in ((proc.stdout, spec["stdout"], "stdout"), (proc.stderr, spec["stderr"], "stderr"))]
    for t in threads:
        t.start()
    code = proc.wait()
    end_the_rest_of_the_group()     # before the joins: a process left behind may hold the output pipes
    for t in threads:
        t.join()
    status["exit"] = code          # negative: the signal that ended it
    write_status(spec["status"], status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
