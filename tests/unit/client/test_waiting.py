"""`vmgrid job ... INSTANCE` while a just-started job service comes up (issue 12): one line, not one per
retry; a spinner only on a terminal; the refusal itself once the wait is over. The attempts are a stand-in
for the connection (it refuses a given number of times), the clock is the test's own: nothing waits."""
from __future__ import annotations

import io

import pytest

from client.cli import CLIError
from client.commands_job import until_listening


class Refused(Exception):
    pass


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def attempts(refusals: int):
    left = [refusals]

    def attempt():
        if left[0]:
            left[0] -= 1
            raise Refused("Connection refused")
        return "client"
    return attempt


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_service_coming_up_is_one_line_however_many_retries():
    out, clock = io.StringIO(), Clock()
    assert until_listening(attempts(20), "the job service of job-vm", Refused, out=out, sleep=clock.sleep,
                           clock=clock) == "client"
    assert out.getvalue() == "vmgrid: waiting for the job service of job-vm...\n"
    assert clock.now == 40.0          # it did retry twenty times, every 2 s


def test_on_a_terminal_a_spinner_on_that_line_then_ready():
    out, clock = Tty(), Clock()
    until_listening(attempts(5), "the job service of job-vm", Refused, out=out, sleep=clock.sleep, clock=clock)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.startswith("vmgrid: waiting for the job service of job-vm... |")
    assert text.endswith("\bready\n") and text.count("\b") == 5


def test_no_line_when_it_answers_at_once_and_the_refusal_once_the_wait_is_over():
    out, clock = io.StringIO(), Clock()
    assert until_listening(attempts(0), "x", Refused, out=out, sleep=clock.sleep, clock=clock) == "client"
    assert out.getvalue() == ""
    with pytest.raises(CLIError, match="Connection refused"):
        until_listening(attempts(1000), "x", Refused, wait=10, out=out, sleep=clock.sleep, clock=clock)
    assert out.getvalue() == "vmgrid: waiting for x...\n"
