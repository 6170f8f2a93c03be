"""`vmgrid job lifetime` past a job service's max_lifetime says the service's bound and the latest end it allows,
computed from the bound the service's fault gives. A hostile service (a VM owner's) may give any words there:
`²` (a digit to str.isdigit, not to int) or 5,000 digits ended the command in a ValueError or OverflowError
traceback (attack16 G5). A stand-in for the service (the real fault class, a fake connection): the CLI's handling
of the fault's words is what is tested; the real service's fault is tested in tests/integration/test_jobs_cli*.py."""
from __future__ import annotations

import argparse
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

import client.commands_job as commands_job
from client.cli import CLIError
from services.faults import LimitExceeded


@pytest.mark.parametrize("allowed, latest", [("3600", True), ("\u00b2", False), ("9" * 5000, False),
                                             ("99999999999999", False)])
def test_the_services_bound_is_shown_and_computed_with_only_when_it_is_a_count(monkeypatch, allowed, latest):
    class Jobs:
        def set_lifetime(self, key, seconds, when=None):
            raise LimitExceeded("past max_lifetime", limit="max_lifetime", allowed=allowed, requested="7200")

        def status(self, key):
            return SimpleNamespace(submitted=datetime(2026, 1, 1, tzinfo=timezone.utc))

    monkeypatch.setattr(commands_job, "connect", lambda args: Jobs())
    args = argparse.Namespace(job="job-" + "0" * 32, when="2h")
    with pytest.raises(CLIError) as exc:
        commands_job.cmd_lifetime(args)
    said = str(exc.value)
    assert "would live longer than this service keeps a job" in said and "unchanged" in said
    assert ("at the latest until 2026-01-01 01:00:00 UTC" in said) == latest, said
