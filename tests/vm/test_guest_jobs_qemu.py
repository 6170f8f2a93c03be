"""The grid container in a real QEMU guest (issue 12 §3): a small recipe image with the vmgrid runtime
and the job service as its container command, deployed through a bridge-mode node with a guest CA; the
scientist's job commands by instance name (tests/vm/jobs_grid.py runs the grid and the commands inside
a network namespace the session fixture jobs_scene makes, vgjob-<hex>). One guest serves every check below,
and then the migration's of test_migrate_qemu.py (the same scene, run once)."""
from __future__ import annotations

import json

import pytest

from scene import scene_part


pytestmark = pytest.mark.timeout(2400)     # the image build (first run) and one guest booted under TCG


@pytest.fixture(scope="module")
def seen(jobs_scene):
    """The job service's part of the scene (run once per session, tests/vm/conftest.py); what it saw."""
    return scene_part(jobs_scene, "jobs")


def status(step: dict) -> dict:
    assert step["rc"] == 0, step["err"]
    return json.loads(step["out"])


def test_the_node_issues_the_guest_container_its_certificate_and_shows_the_endpoint(seen):
    inst = seen["instance"]
    assert inst["state"] == "Running", inst["failure"] or inst["guest_status"]
    js = inst["job_service"]
    assert js["url"] == f"https://{inst['address']}:8443/wsrf/services/JobService", js
    assert js["dn"] == f"/O=Grid/OU=vmgrid-guests/CN=host/{inst['address']}"
    assert f"job service {js['url']} (started)" in inst["guest_status"]
    shown = seen["steps"]["vm_status"]
    assert shown["rc"] == 0 and f"jobs  {js['url']}  ({js['dn']})" in shown["out"], shown


def test_a_job_stages_in_and_out_by_instance_name_and_its_outputs_come_back_verified(seen):
    s = seen["steps"]
    assert s["submit"]["rc"] == 0 and s["submit"]["out"].startswith("job-"), s["submit"]["err"]
    assert s["wait"]["rc"] == 0 and s["wait"]["out"].startswith("Done"), s["wait"]
    st = status(s["status"])
    assert st["state"] == "Done" and st["exitCode"] == 0 and st["owner"] == "/O=Grid/OU=vmgrid/CN=alice"
    assert {o["name"] for o in st["outputs"]} >= {"sorted.txt", "stdout", "stderr"}
    assert s["get"]["rc"] == 0, s["get"]["err"]
    assert seen["sorted"] == "acgt\ngattaca\ntata\n"


def test_a_failing_job_is_failed_with_its_exit_status(seen):
    s = seen["steps"]
    assert s["fail"]["rc"] == 1 and "Failed" in s["fail"]["err"], s["fail"]
    st = status(s["fail_status"])
    assert st["state"] == "Failed" and st["exitCode"] == 3 and "oops" in st["stderrTail"]


def test_a_job_runs_in_a_pid_namespace_of_its_own_in_the_guest(seen):
    """The guest's job service (root) puts each job under an init of a new PID namespace (docs/jobs.md): the
    program's shell sees itself as PID 2, so what it leaves running, setsid or not, ends with the namespace."""
    st = status(seen["steps"]["pidns_status"])
    assert st["state"] == "Done" and st["stdoutTail"] == "2\n", st


def test_a_job_s_processes_are_bounded_by_a_pids_cgroup_in_the_guest(seen):
    """guestd's init mounts cgroup v2, so the guest's job service puts each job in a pids cgroup of its own
    under the service's vmgrid-jobs-<…>/ with [jobs] max_processes (256 by default) as its pids.max."""
    st = status(seen["steps"]["cgroup_status"])
    assert st["state"] == "Done", (st.get("failure"), st.get("stdoutTail"), st.get("stderrTail"), st)
    lines = st["stdoutTail"].splitlines()
    assert lines[0].startswith("0::/vmgrid-jobs-") and lines[0].count("/") == 2 and lines[1] == "256", st


def test_a_job_s_memory_is_bounded_and_it_sees_only_its_own_processes_in_the_guest(seen):
    """The guest's job service puts each job in a memory cgroup (cgroup v2: its pids cgroup) with memory.max the
    default [jobs] memory_limit "auto": memory_total's "auto" (the smaller of 75% of the guest's memory and all of it
    but 192 MiB, at least 25%: in this 384 MiB guest the second) less 16 MiB; the job's /proc is its PID namespace's:
    its init, its shell and what the shell started, none of the guest's."""
    st = status(seen["steps"]["memory_status"])
    assert st["state"] == "Done", (st.get("failure"), st.get("stdoutTail"), st.get("stderrTail"), st)
    limit, meminfo, pids = st["stdoutTail"].splitlines()
    total = int(meminfo.split()[1]) * 1024
    auto_total = max(total // 4, min(total * 3 // 4, total - (192 << 20))) // 4096 * 4096
    assert int(limit) == auto_total - (16 << 20), st["stdoutTail"]
    assert "1" in pids.split() and max(map(int, pids.split())) < 20, pids


def test_a_job_past_its_memory_limit_is_failed_out_of_memory_in_the_guest(seen):
    """A job that takes all of the guest's memory is killed by the kernel at its limit and fails saying so (its own
    limit, [jobs] memory_limit: "auto" is 16 MiB below the jobs' total, which the service's cgroup reaches first
    when both are equal); the job service lives on (the steps after it ran)."""
    s = seen["steps"]
    assert s["oom"]["rc"] == 1, s["oom"]
    st = status(s["oom_status"])
    assert st["state"] == "Failed" and st["exitCode"] == -9, st
    assert st["failure"].startswith("the program was killed by the kernel, out of memory: the job used more than its "
                                    "memory limit of "), st["failure"]
    assert "survived" not in st["stdoutTail"]
    # its ResourceBounds (cgroup v2 here): what the memory bound did, the bound and the key that set it
    [memory] = [e for e in st["resourceBounds"] if e["resource"] == "memory"]
    assert memory["setting"] == "memory_limit" and memory["processesKilled"] >= 1, st["resourceBounds"]
    assert str(memory["bound"]) in st["failure"], (memory, st["failure"])


def test_two_jobs_filling_their_tmp_are_bounded_together_and_the_job_service_stays(seen):
    """trial14 U1: two jobs each within every bound (35% of the guest's memory in its own /tmp, held a minute)
    together took more than the guest could give: with the jobs' memory_total at 75% of a 384 MiB guest, the guest
    ran short before the jobs' cgroup reached its bound, and the kernel evicted the job service's code pages over and
    over (it was unreachable for 28 s; tmpfs pages count in no process's size, and without swap nothing frees them).
    With the default total "auto" (all of this guest's memory but 192 MiB) the kernel kills in one of the two jobs
    at the total, which fails naming [jobs] memory_total; the other ends; the job service answered every wait and
    never restarted: its log (`vmgrid job log NAME container`, read after every step of the scene) shows one
    start."""
    s = seen["steps"]
    assert all(r["rc"] == 0 and r["out"].startswith("job-") for r in s["tmp_two"]), s["tmp_two"]
    for r in s["tmp_two_wait"]:
        assert r["out"].split()[:1] in (["Done"], ["Failed"]), r
    ended = [status(r) for r in s["tmp_two_status"]]
    assert any(st["state"] == "Failed" and "([jobs] memory_total)" in (st["failure"] or "") for st in ended), \
        [(st["state"], st["failure"], st["stdoutTail"]) for st in ended]
    log = s["log_container"]["out"]
    assert log.count("job service for ") == 1 and log.count(" reconciled: ") == 1, log[:3000]


def test_a_job_reaches_its_directory_by_path_and_has_posix_shared_memory(seen):
    """In a guest a job could not open its own directory by its path ($HOME, $PWD: `vmgrid serve` made
    /var/lib/vmgrid 0700) and had no /dev/shm (multiprocessing's Lock and Pool failed): BLAST+'s makeblastdb and
    any multiprocessing program failed in every guest job (trial T12, T13)."""
    st = status(seen["steps"]["reach_status"])
    assert st["state"] == "Done", (st.get("failure"), st.get("stdoutTail"), st.get("stderrTail"), st)
    assert st["stdoutTail"] == "mine\n[3, 4]\n", st


def test_a_jobs_tmp_and_dev_shm_are_its_own_in_the_guest_and_go_with_it(seen):
    """The guest's job service (root) gives each job a /tmp (= /var/tmp) and a /dev/shm of its own, tmpfs of [jobs]
    tmp_size (256 MiB by default) in a mount namespace of the job's: what one job writes there, the next job of
    the same submitter (her uid) does not find."""
    st = status(seen["steps"]["tmpns_status"])
    assert st["state"] == "Done", (st.get("failure"), st.get("stdoutTail"), st.get("stderrTail"), st)
    mounts = [line.split()[1] for line in st["stdoutTail"].splitlines() if "size=262144k" in line]
    assert mounts == ["/tmp", "/var/tmp", "/dev/shm"], st["stdoutTail"]     # guestd's init mounts /dev/shm
    after = status(seen["steps"]["tmpns_next_status"])
    assert after["state"] == "Done" and after["stdoutTail"] == "next\n", after


def test_cancel_ends_a_long_job(seen):
    s = seen["steps"]
    assert s["cancel"]["rc"] == 0, s["cancel"]["err"]
    assert status(s["cancelled"])["state"] == "Cancelled"


def test_another_user_is_denied_every_job_operation(seen):
    s = seen["steps"]
    assert s["bob_vm_status"]["rc"] != 0 and "no live instance named" in s["bob_vm_status"]["err"]
    for op, r in s["bob"].items():
        assert r["rc"] != 0, f"bob's {op} was not refused: {r}"
        assert "AccessDenied" in r["err"] or "not authorized" in r["err"].lower() or "denied" in r["err"].lower(), \
            f"bob's {op}: {r['err']}"


def test_a_job_can_neither_see_nor_kill_the_job_service_and_the_other_jobs_go_on(seen):
    """The scene's "killer" job used to SIGKILL the job service (root's, in the guest) to show guestd restarting it;
    since a job runs under a uid of its own in a PID namespace with a /proc of its own, it finds no process of the
    service and kills none. (guestd's restart of a container that died: tests/unit/guestd/test_guestd_steps.py.)"""
    s = seen["steps"]
    assert s["after_restart"]["rc"] == 0, s["after_restart"]["err"]
    keys = {row["key"]: row["state"] for row in json.loads(s["after_restart"]["out"])}
    assert keys[s["submit"]["out"]] == "Done"
    survivor = status(s["survivor_status"])
    assert survivor["state"] == "Active", survivor        # its program still runs
    killer = status(s["killer_status"])
    assert (killer["state"], killer["stdoutTail"]) == ("Done", "seen 0 killed 0\n"), killer
    assert s["survivor_cancel"]["rc"] == 0, s["survivor_cancel"]["err"]
    assert status(s["first_after"])["state"] == "Done"


def test_the_owner_reads_the_container_and_guestd_logs(seen):
    s = seen["steps"]
    assert s["log_help"]["rc"] == 0 and {"container", "guestd"} <= set(s["log_help"]["out"].split()), s["log_help"]
    assert s["log_container"]["rc"] == 0 and s["log_container"]["out"], s["log_container"]
    assert s["log_guestd"]["rc"] == 0 and "ready" in s["log_guestd"]["out"], s["log_guestd"]


def test_everything_is_cleaned_up(seen):
    assert "cleanup" not in seen, seen["cleanup"]
    assert seen["bridge_after"] is False
