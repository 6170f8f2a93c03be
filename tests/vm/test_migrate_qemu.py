"""A running real guest migrated through the grid (issue 11): two bridge-mode QEMU nodes with different lease
ranges, `vmgrid vm migrate NAME --to NODE2`, then guestd has the target's address, MAC and clock and the job
service a certificate for the new address, with nothing restarted inside but the job service itself; then back to the
first node paused, where it takes that node's address when it is resumed.

One guest, booted once for test_guest_jobs_qemu.py and this module (the session fixture jobs_scene,
tests/vm/conftest.py): after the job service's checks on the first node, tests/vm/jobs_grid.py migrates it, inside
a network namespace the fixture makes (vgjob-<hex>)."""
from __future__ import annotations

import json
import sys

import pytest

from scene import scene_part

pytestmark = pytest.mark.timeout(2400)
CLOCK_BOUND = 2.0      # seconds: the guest clock against the host's bracket around the probe job


@pytest.fixture(scope="module")
def seen(jobs_scene):
    """The migration's part of the scene (run once per session, tests/vm/conftest.py); what it saw."""
    result = scene_part(jobs_scene, "migration", detail=8000)
    print(f"migration scene: migrate {result.get('migrate_seconds')} s", file=sys.stderr)
    after, probe = result.get("after", {}), result.get("probe_after", {})
    if "guest_time" in probe:
        print(f"migration scene: phases {after.get('phases')}; guest clock after resume: "
              f"{probe['guest_time'] - probe['host_before']:+.2f} s after the probe's submission, "
              f"{probe['guest_time'] - probe['host_after']:+.2f} s before its end; GuestStatus: "
              f"{after.get('guest_status')}", file=sys.stderr)
    return result


def test_the_cli_migrates_the_running_guest_to_the_other_nodes_pool(seen):
    m = seen["steps"]["migrate"]
    assert m["rc"] == 0, m["err"]
    before, after = seen["before"], seen["after"]
    assert before["state"] == "Running" and after["state"] == "Running", after
    assert before["address"].startswith("10.79.0.1") and after["address"].startswith("10.79.0.2"), (before, after)
    assert after["mac"] != before["mac"] and after["node"] == "mf2"


def test_the_same_processes_run_on_after_the_migration(seen):
    b, a = seen["probe_before"], seen["probe_after"]
    assert b["run"]["rc"] == 0 and a["run"]["rc"] == 0, (b["run"], a["run"])
    assert (a["pid"], a["start"], a["boot_id"]) == (b["pid"], b["start"], b["boot_id"]), "no reboot, same process"
    long = json.loads(seen["steps"]["long_status"]["out"])
    assert long["state"] == "Active", long        # the job started before the migration still runs


def test_the_guest_clock_is_the_hosts_after_resume(seen):
    a = seen["probe_after"]
    assert a["host_before"] - CLOCK_BOUND <= a["guest_time"] <= a["host_after"] + CLOCK_BOUND, a


def test_guestd_set_the_new_address_and_mac_and_says_so(seen):
    after = seen["after"]
    status = after["guest_status"]
    assert f"guestd set address {after['address']}, MAC {after['mac']}" in status, status
    assert f"address {after['address']}/255.255.255.0" in status, status
    assert seen["steps"]["vm_status"]["rc"] == 0 and after["address"] in seen["steps"]["vm_status"]["out"]


def test_the_new_address_answers_over_the_bridge_and_the_old_one_does_not(seen):
    assert seen["reach"]["new"] == "open", seen["reach"]
    assert seen["reach"]["old"] != "open", seen["reach"]


def test_the_job_service_has_a_certificate_for_the_new_address(seen):
    after = seen["after"]
    js = after["job_service"]
    assert js["url"] == f"https://{after['address']}:8443/wsrf/services/JobService", js
    assert js["dn"] == f"/O=Grid/OU=vmgrid-guests/CN=host/{after['address']}", js
    assert seen["before"]["job_service"]["dn"].endswith(seen["before"]["address"])
    # the probe ran through that job service after the migration, by instance name: a job works
    assert seen["probe_after"]["get"]["rc"] == 0, seen["probe_after"]["get"]
    assert seen["steps"]["cancel"]["rc"] == 0, seen["steps"]["cancel"]


def test_a_shutdown_and_start_on_the_target_boots_with_the_targets_lease(seen):
    """README "Known limits": libvirt restores a domain only with the MAC it was saved with, so the node redefines
    the migrated domain's persistent definition with its leased MAC after the restore; a Shutdown and Start on the
    target then boots the guest with the target's MAC and address (trial16 T7: seen by hand; pinned here)."""
    steps, after, started = seen["steps"], seen["after"], seen["started_on_target"]
    for step in ("shutdown_target", "start_target", "service_up_started", "nic_started", "nic_started_status"):
        assert steps[step]["rc"] == 0, (step, steps[step])
    assert "Shutoff" in steps["shutdown_target"]["out"] and "Running" in steps["start_target"]["out"], steps
    assert (started["state"], started["address"], started["mac"]) == ("Running", after["address"], after["mac"])
    tail = json.loads(steps["nic_started_status"]["out"]).get("stdoutTail") or ""
    assert tail.splitlines()[0].strip() == after["mac"], tail
    assert after["address"] in tail, tail


def test_everything_is_cleaned_up(seen):
    assert "cleanup" not in seen, seen["cleanup"]
    assert seen["bridge_after"] is False


def test_a_guest_migrated_back_paused_takes_the_first_nodes_address_when_resumed(seen):
    """Paused at the second node and migrated back: it arrives Paused with no fixup yet (guestd is not running);
    `vmgrid vm resume` there gives it the first node's lease (address, MAC), which guestd sets and says, and the job
    service answers at that address."""
    steps = seen["steps"]
    for step in ("pause", "migrate_back", "resume_back", "service_up_back"):
        assert steps[step]["rc"] == 0, (step, steps[step])
    arrived, back = seen["back_arrived"], seen["back"]
    assert arrived["state"] == "Paused" and back["state"] == "Running", (arrived, back)
    assert back["node"] != seen["after"]["node"] and back["address"].startswith("10.79.0.1"), back
    assert f"guestd set address {back['address']}, MAC {back['mac']}" in back["guest_status"], back
    assert back["job_service"]["url"] == f"https://{back['address']}:8443/wsrf/services/JobService", back
    assert seen["reach_back"]["new"] == "open", seen["reach_back"]
    assert seen["reach_back"]["old"] != "open", seen["reach_back"]
