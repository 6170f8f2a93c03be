"""What the service's bounds on a job's resources did to it, read from what its supervisor recorded when the program
ended (control/<key>/exit.json and the spec it ran by, services/jobs/shim.py): processes the kernel killed past the
memory bound, forks refused at max_processes, output dropped past max_output, and a bound the service could not apply there (and why). The job's
ResourceBounds property (services/jobs/wire.py) publishes them: a job whose program exited 0 after the kernel killed
one of its processes is Done, and only this says so."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BoundEvent:
    """One bound and what it did to the job: ``resource`` (memory, processes, tmp, stdout, stderr) and a one-line
    ``description``; ``setting`` the [jobs] key that set the bound and ``bound`` its value (bytes; processes and
    threads for processes); ``processes_killed``, ``bytes_dropped`` or ``forks_refused`` (forks and thread creations
    the kernel refused at the bound) what it did; ``unbounded`` why it could not be applied (the job ran without
    it)."""

    resource: str
    description: str
    setting: str | None = None
    bound: int | None = None
    processes_killed: int | None = None
    bytes_dropped: int | None = None
    unbounded: str | None = None
    forks_refused: int | None = None

    @property
    def acted(self) -> bool:
        """Whether the bound did something to the job (killed a process, dropped output, refused a fork), rather
        than being absent."""
        return bool(self.processes_killed or self.bytes_dropped or self.forks_refused)


_KILLED = re.compile(r"(\d+) process(?:es)? killed past ")
# what the supervisor says of a bound it could not apply, by its exit status key: (resource, setting, its prefix)
_UNBOUNDED = (("memory", None, "unbounded: "), ("processes", "max_processes", "unbounded: "),
              ("tmp", "tmp_size", "shared with the host: "))


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def bound_events(status: dict, spec: dict) -> list[BoundEvent]:
    """The events of a job's exit status ``status`` (exit.json) run by ``spec`` (spec.json: the bounds' values; {}
    if unknown), in a fixed order: memory, processes, tmp, stdout, stderr."""
    events = []
    memory = status.get("memory")
    killed = status.get("memory_killed")
    if isinstance(killed, dict) and _int(killed.get("processes")):
        n, setting, limit = killed["processes"], str(killed.get("setting") or ""), _int(killed.get("bytes"))
        past = f"the jobs' total of {limit}" if setting == "memory_total" else str(limit)
        key = f" ([jobs] {setting})" if setting else ""
        events.append(BoundEvent("memory", f"{n} process{'es' if n > 1 else ''} killed past {past} bytes{key}",
                                 setting or None, limit, processes_killed=n))
    elif isinstance(memory, str) and _KILLED.match(memory):     # a supervisor from before memory_killed
        events.append(BoundEvent("memory", memory, processes_killed=int(_KILLED.match(memory).group(1))))
    for resource, setting, prefix in _UNBOUNDED:
        refused = status.get("processes_refused")
        if resource == "processes" and isinstance(refused, dict) and _int(refused.get("forks")):
            n, limit = refused["forks"], _int(refused.get("bound"))
            at = f"at {limit} processes and threads" if limit is not None else "at the bound"
            events.append(BoundEvent("processes", f"{n} fork{'s' if n > 1 else ''} refused {at} ([jobs] "
                                     f"max_processes)", "max_processes", limit, forks_refused=n))
        said = status.get(resource)
        if isinstance(said, str) and said.startswith(prefix):
            limit = _int(spec.get(setting)) if setting else None
            events.append(BoundEvent(resource, said, setting, limit, unbounded=said[len(prefix):]))
    dropped = status.get("dropped")
    for stream in ("stdout", "stderr"):
        n = _int(dropped.get(stream)) if isinstance(dropped, dict) else None
        if n:
            limit = _int(spec.get("max_output"))
            kept = f"the first {limit} bytes" if limit is not None else "the bound"
            events.append(BoundEvent(stream, f"{n} bytes dropped past {kept} ([jobs] max_output)", "max_output",
                                     limit, bytes_dropped=n))
    return events


def read_bound_events(control: Path) -> list[BoundEvent] | None:
    """The events of the job whose supervisor's files are in ``control``; None while nothing is known (its program
    has not ended, or ended leaving no exit status: killed with its supervisor)."""
    try:
        status = json.loads((control / "exit.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        spec = json.loads((control / "spec.json").read_text())
    except (OSError, ValueError):
        spec = {}
    if not isinstance(status, dict):
        return None
    return bound_events(status, spec if isinstance(spec, dict) else {})
