"""What `vmgrid job …` says when the instance named has no job service: the reason its node's answer gives
(State and GuestStatus), or, where the node cannot tell them apart, both reasons and how to tell which."""
from __future__ import annotations

from types import SimpleNamespace

from client.commands_job import no_job_service

READY = "ready; address 10.99.0.12/255.255.255.0 on eth0; container running (pid 312)"


def info(state="Running", guest=READY):
    return SimpleNamespace(state=state, guest_status=guest, vo="bio", image_name="debian12-hello",
                           image_id="img-" + "1" * 32)


def test_a_ready_guest_that_asked_for_no_certificate_names_both_reasons_and_how_to_tell_them_apart():
    """It said only `[vmmanager] guest_ca`, even when the image has no job runtime."""
    text = no_job_service("my-vm", info())
    assert text.startswith(f"instance my-vm (Running) has no job service (guest: {READY}): guestd asked the node "
                           f"for no job service certificate, so either the image does not host the job service")
    assert "`vmgrid repo show bio/debian12-hello`" in text and "serve jobs" in text      # the image's side
    assert "[vmmanager] guest_ca is unset" in text                                       # the node's side
    assert "\n" not in text


def test_the_nodes_own_word_is_the_reason_when_it_tried():
    guest = READY + "; job service not started: guestd did not answer the certificate within 10 s"
    text = no_job_service("my-vm", info(guest=guest))
    assert text.startswith("instance my-vm (Running) has no job service: the node says: job service not started: "
                           "guestd did not answer the certificate within 10 s (docs/jobs.md")
    assert "guest_ca" not in text and "repo show" not in text
    # a note that says there is none (as a node may say which of the two reasons it is) is quoted whole
    text = no_job_service("my-vm", info(guest=READY + "; no job service: the image ships no /etc/vmgrid/jobs.toml"))
    assert "has no job service: the node says: no job service: the image ships no /etc/vmgrid/jobs.toml (" in text


def test_a_failed_grid_step_is_named():
    text = no_job_service("my-vm", info(guest="ready, failed steps: clock, grid; address 10.99.0.12/24 on eth0"))
    assert "guestd's grid step, which prepares the image's job service, failed in the guest" in text
    assert "guest_ca" not in text


def test_a_guest_not_ready_and_an_instance_not_running_say_so():
    for guest in ("none", "no report: timed out after 120 s", "not ready: no ready report"):
        text = no_job_service("my-vm", info(guest=guest))
        assert f"(guest: {guest}): guestd in it has not reported ready" in text and "guest_ca" not in text
    text = no_job_service("my-vm", info(state="Paused", guest="none"))
    assert text.startswith("instance my-vm (Paused) has no job service: it is Paused (guest: none); a job service "
                           "is set up when it runs")
