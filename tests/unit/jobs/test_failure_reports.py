"""A failing test is reported, not an INTERNALERROR, while other threads log exceptions (conftest.py: one
ast.parse at a time on CPython 3.11 before 3.11.8)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

# what the job tests do: a thread (a job's, a container's) logs exceptions, whose traceback 3.11 parses line by
# line, and makes garbage with finalizers, while pytest parses a long module to show where a test failed
NOISY_THREAD = '''
import logging, threading
import pytest
from helpers import give_up

log = logging.getLogger("a-job-thread")
stop = threading.Event()


class Garbage:
    def __del__(self):
        sum(range(50))


def noisy():
    while not stop.is_set():
        try:
            {}["x"]
        except KeyError:
            log.exception("internal error")
        cycle = [Garbage() for _ in range(10)]
        for g in cycle:
            g.ref = cycle


@pytest.fixture(scope="module", autouse=True)
def background():
    t = threading.Thread(target=noisy, daemon=True)
    t.start()
    yield
    stop.set()
    t.join()


@pytest.mark.parametrize("i", range(60))
def test_fails_on_purpose(i):
    give_up()
'''


def helpers() -> str:
    """A long module (as test_manager.py is) whose last function fails an assertion."""
    filler = "".join(f"def helper_{i}(x):\n    return [x + {i} for _ in range(3) if x or {i}]\n\n\n" for i in range(150))
    return filler + "def give_up():\n    state = 'Done'\n    assert state == 'Failed', 'on purpose'\n"


def run_failing_tests(where: Path, *, guarded: bool) -> subprocess.CompletedProcess:
    where.mkdir()
    (where / "helpers.py").write_text(helpers())
    (where / "test_noisy.py").write_text(NOISY_THREAD)
    if guarded:
        shutil.copy(HERE / "conftest.py", where / "conftest.py")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-o", "addopts=", "--rootdir", str(where), str(where)], cwd=where, capture_output=True,
                          text=True, timeout=240, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(where)})


def test_a_failing_test_is_reported_while_other_threads_log_exceptions(tmp_path):
    r = run_failing_tests(tmp_path / "guarded", guarded=True)
    assert "INTERNALERROR" not in r.stdout + r.stderr, r.stdout[-3000:]
    assert "60 failed" in r.stdout and "AssertionError: on purpose" in r.stdout
    assert "assert state == 'Failed'" in r.stdout          # the failing line shown (pytest parsed helpers.py)
