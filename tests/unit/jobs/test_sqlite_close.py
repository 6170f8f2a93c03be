"""services.sqlite.Database.close() while another thread's query runs: that thread's query ends normally (its
connection is closed when it lets go of it), where closing it from under the query crashed the process (SIGSEGV:
a job service stopped while a job's watcher thread read its record). Run in a child process, so that the crash it
guards against fails this test instead of ending the test run; the query is held running by an SQL function of the
test's own (no timing: the close comes once the function has started)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent('''
    import sys, threading, gc
    sys.path.insert(0, sys.argv[1])
    from services.sqlite import Database
    d = Database(sys.argv[2])
    started, release, out = threading.Event(), threading.Event(), {}

    def held():
        started.set()
        release.wait(30)
        return 1

    def worker():
        c = d.conn()
        c.create_function("held", 0, held)
        out["first"] = c.execute("SELECT held()").fetchone()[0]
        out["then"] = c.execute("SELECT 2").fetchone()[0]

    idle = threading.Thread(target=lambda: d.conn().execute("SELECT 1").fetchone())
    idle.start(); idle.join()                          # a connection no thread uses any more
    t = threading.Thread(target=worker)
    t.start()
    started.wait(30)
    d.close()                                          # under the running query
    release.set()
    t.join(30)
    print(out["first"], out["then"], len(d._all))
''')


def test_closing_under_another_threads_query_lets_it_finish(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(tmp_path / "db.sqlite")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.split() == ["1", "2", "0"]
