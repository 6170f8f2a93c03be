"""The XPath dialect's scan, in a worker process: one XPath evaluation inside libxml2 cannot be
interrupted from Python, and a nested expression over a large descriptor can run for hours. The
worker reads the catalogue (SQLite, read-only) itself, evaluates the caller's VOs' descriptors only,
stops itself when the query's CPU budget is spent, and is killed by the kernel (RLIMIT_CPU) when one
evaluation overruns it; the repository then answers BadQuery (reason "budget") and starts a new worker.
The scan uses no CPU of the repository process, so it never holds the GIL other callers need."""
from __future__ import annotations

import json
import math
import os
import queue
import resource
import select
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from services.faults import BadQuery
from services.vmrepository.query import ORDERABLE, XPathQuery

WORKERS = 2                      # XPath scans that run at once; more wait for a worker
WAIT_FOR_WORKER = 30.0           # seconds a query waits for a free worker before it is refused ("busy")
WORKER_MEMORY = 1 << 30          # address space of a worker (RLIMIT_AS)
WORKER_IDLE_EXIT = float(os.environ.get("VMGRID_XPATH_IDLE_EXIT", 300))  # seconds an idle worker waits, then exits


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "services.vmrepository.xpath_scan"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     close_fds=True)

    def ask(self, request: dict) -> dict | None:
        """The worker's answer, or None when it ended without one (see ``ended_idle``)."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError, ValueError):
            line = b""
        return json.loads(line) if line else None

    def ended(self) -> int:
        """How the worker ended: 0 on its own (idle), a negative signal number when killed (RLIMIT_CPU: SIGXCPU),
        a positive exit status when it failed."""
        return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:               # a request left unflushed to a worker that had ended
                pass


class XPathScanner:
    """A small pool of scan workers for one catalogue."""

    def __init__(self, db_path: Path, workers: int = WORKERS):
        self.db_path = str(db_path)
        self._slots = threading.BoundedSemaphore(workers)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self.restarts = 0

    def query(self, xp: XPathQuery, vos: list[str], order: str, descending: bool, offset: int,
              limit: int) -> tuple[int, list[str]]:
        """(total, the page's image ids) of the caller's VOs' descriptors satisfying ``xp``."""
        if not vos:
            return 0, []
        if not self._slots.acquire(timeout=WAIT_FOR_WORKER):
            raise BadQuery("every XPath worker is busy; try again", reason="busy")
        try:
            request = {"db": self.db_path, "expression": xp.expression, "namespaces": xp.namespaces, "vos": vos,
                       "order": order, "descending": descending, "offset": offset, "limit": limit,
                       "cpu_seconds": max(0.0, xp.budget.seconds - xp.budget.used)}
            retried = False
            while True:
                try:
                    worker = self._idle.get_nowait()
                except queue.Empty:
                    worker = _Worker()
                answer = worker.ask(request)
                if answer is not None:
                    break
                status = worker.ended()
                worker.close()
                if status == 0 and not retried:      # it had ended idle: ask a new one
                    retried = True
                    continue
                self.restarts += 1
                if status < 0:
                    raise BadQuery(f"the XPath query used more than its budget of {xp.budget.seconds:g} s of CPU "
                                   f"time; narrow it (fewer nested predicates)", reason="budget")
                raise BadQuery(f"the XPath worker failed (exit status {status})", reason="xpath evaluation")
            self._idle.put(worker)
        finally:
            self._slots.release()
        if "error" in answer:
            raise BadQuery(answer["message"], reason=answer["error"])
        return answer["total"], answer["ids"]

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


_SCANNERS: dict[str, XPathScanner] = {}
_LOCK = threading.Lock()


def scanner(db_path: Path) -> XPathScanner:
    """The scanner of the catalogue at ``db_path`` (one per catalogue and process)."""
    with _LOCK:
        s = _SCANNERS.get(str(db_path))
        if s is None:
            s = _SCANNERS[str(db_path)] = XPathScanner(db_path)
        return s


# -- the worker --------------------------------------------------------------------------------------------

def _cpu_used() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def xpath_true(result) -> bool:
    """XPath 1.0's boolean(): a node-set is true when not empty, a number when neither 0 nor NaN."""
    if isinstance(result, list):
        return len(result) > 0
    if isinstance(result, float):
        return result != 0 and result == result
    return bool(result)


def _scan(request: dict, connections: dict[str, sqlite3.Connection]) -> dict:
    from lxml import etree

    seconds = float(request["cpu_seconds"])
    start = _cpu_used()
    # the kernel ends this process (SIGXCPU) if one evaluation overruns the budget by a second
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(start + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    order = request["order"]
    if order not in ORDERABLE.values():
        return {"error": "bad order", "message": f"cannot order by {order!r}"}
    db = connections.get(request["db"])
    if db is None:
        db = connections[request["db"]] = sqlite3.connect(f"file:{request['db']}?mode=ro", uri=True)
    vos = list(request["vos"])
    direction = "DESC" if request["descending"] else "ASC"
    xp = etree.XPath(request["expression"], namespaces=request["namespaces"], smart_strings=False)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    offset, limit = int(request["offset"]), int(request["limit"])
    total, ids = 0, []
    rows = db.execute(f"SELECT image_id, descriptor FROM images WHERE vo IN ({','.join('?' * len(vos))}) "
                      f"ORDER BY {order} {direction}, image_id {direction}", vos)
    for image_id, descriptor in rows:
        if _cpu_used() - start > seconds:
            return {"error": "budget", "message": f"the XPath query used more than its budget of {seconds:g} s of "
                                                  f"CPU time; narrow it"}
        try:
            result = xp(etree.fromstring(descriptor, parser))
        except etree.XPathEvalError as exc:
            return {"error": "xpath evaluation", "message": f"XPath evaluation failed: {exc}"}
        if xpath_true(result):
            if offset <= total < offset + limit:
                ids.append(image_id)
            total += 1
    return {"total": total, "ids": ids}


def main() -> None:
    """Answer one JSON request per line on standard input until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    connections: dict[str, sqlite3.Connection] = {}
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], WORKER_IDLE_EXIT)
        if not ready:
            return                                   # idle: the scanner starts a new worker when needed
        line = sys.stdin.buffer.readline()
        if not line:
            return
        try:
            answer = _scan(json.loads(line), connections)
        except MemoryError:
            answer = {"error": "budget", "message": "the XPath query needs more memory than a query may use"}
        except sqlite3.Error as exc:
            answer = {"error": "catalogue", "message": f"the catalogue could not be read: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    os.nice(5)
    main()
