"""One ast.parse at a time in the tests' process on CPython 3.11 before 3.11.8.

There the AST constructor's recursion counter is one per interpreter, not per call (CPython gh-106905, fixed
in 3.11.8 by python/cpython#113476): two threads in ``ast.parse`` at once, the GIL passed between them while a
garbage collection runs a finalizer, make it raise ``SystemError: AST constructor recursion depth mismatch``.
The tests' job threads and containers log exceptions, and 3.11's ``traceback`` parses each line it prints
(``_extract_caret_anchors_from_line_segment``), while pytest parses the test's module to report a failure
(``getstatementrange_ast``): the report crashed with ``INTERNALERROR … AST constructor recursion depth
mismatch`` instead of showing the failure (``--tb=line`` parses nothing and got by). The lock below makes
every ``ast.parse`` (pytest's, traceback's, the assertion rewriter's) wait for the one under way; a fixed
CPython needs none of it."""
from __future__ import annotations

import ast
import sys
import threading

import pytest

from services.jobs import tree

AST_PARSE_RACES = (3, 11) <= sys.version_info[:3] < (3, 11, 8)

if AST_PARSE_RACES and not getattr(ast.parse, "vmgrid_one_at_a_time", False):
    _parse = ast.parse
    _one_at_a_time = threading.RLock()

    def _parse_alone(*args, **kwargs):
        with _one_at_a_time:
            return _parse(*args, **kwargs)

    _parse_alone.vmgrid_one_at_a_time = True
    ast.parse = _parse_alone


@pytest.fixture
def held_removal(monkeypatch) -> threading.Event:
    """The trash's remover (services/jobs/tree.py remove_tree) waits until the test sets the event this returns (at
    most 60 s), then removes as it does: a destroyed job's directory stays in the trash meanwhile. Set again at
    teardown, so no remover is left waiting."""
    release = threading.Event()
    remove = tree.remove_tree

    def held(top):
        release.wait(60)
        remove(top)

    monkeypatch.setattr(tree, "remove_tree", held)
    yield release
    release.set()
