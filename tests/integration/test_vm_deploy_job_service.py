"""`vmgrid vm deploy` of an instance whose grid container serves jobs answers Running once that job service
answers, so the first `vmgrid job submit` right after it does not wait for it (trial14 M6: deploy said
"job service ... (started)", and the first submit still printed "vmgrid: waiting for the job service of NAME...":
guestd's "started" is the container's process, which listens some seconds later).

A node on libvirt's test driver (tests/fixtures/grid.py, no guest channel: the node is made to report the job
service a guest's container would, at a port nothing listens on yet); the deploy as a child process; the job
service (a real one, jobs run) started only once the deploy said it waits for it; then `vmgrid job submit NAME`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from client.localgrid import free_port
from services.container.assemble import build_container, build_service
from services.jobs.config import JobsConfig
from tests.fixtures.grid import base_config

pytestmark = pytest.mark.timeout(300)


def test_deploy_answers_once_the_job_service_answers_and_the_first_submit_does_not_wait(vm_grid, grid_pki,
                                                                                         tmp_path, monkeypatch):
    vm_grid.register(name="served")
    port = free_port()
    record = {"url": f"https://localhost:{port}/wsrf/services/JobService", "dn": grid_pki.host_dn}
    monkeypatch.setattr("services.vmmanager.guestcred.job_service", lambda home: dict(record) if home else None)
    env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": vm_grid.node_url(0),
           "VMGRID_REPOSITORY": vm_grid.repository_url}
    deploy = subprocess.Popen([sys.executable, "-m", "client.cli", "vm", "deploy", "bio/served", "js1",
                               "--lifetime", "10m"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    container = None
    try:
        said = []
        for line in deploy.stderr:              # until the deploy says it waits for the job service (or ends)
            said.append(line)
            if "waiting for the job service of js1" in line:
                break
        assert said and "waiting for the job service of js1" in said[-1], "".join(said)
        assert deploy.poll() is None
        cfg = base_config(grid_pki, tmp_path / "jobs", port)
        cfg.jobs = JobsConfig(owner=grid_pki.alice.dn, admins=[grid_pki.admin.dn], gridftp_port=0, kill_grace=2.0,
                              logs={"container": str(tmp_path / "container.log")})
        (tmp_path / "container.log").write_text("container started\n")
        container = build_container(cfg, [build_service("jobs", cfg)]).start()
        out, err = deploy.communicate(timeout=120)
        assert deploy.returncode == 0, err
        assert "state  Running" in out, out
        submit = subprocess.run([sys.executable, "-m", "client.cli", "job", "submit", "js1", "--wait", "--",
                                 "/bin/true"], env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stderr
        assert "waiting for" not in submit.stderr, submit.stderr
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        if container is not None:
            container.stop()


def test_a_job_command_naming_a_paused_saved_or_shutoff_instance_says_so_at_once(vm_grid, grid_pki, monkeypatch):
    """trial16 T1: the node reports the instance's job service (a guest's record, at a port nothing listens on) and
    its State; a Paused, Saved or Shutoff instance keeps the record, and `vmgrid job status NAME JOB` went to the
    guest's address all the same: 60 s and `timed out` (Paused), `No route to host` (Saved, Shutoff), never a word of
    the state. Now one line at once naming the state and the command that brings the service back. (T10: a name the
    caller has no instance of says how another's is named.)"""
    descriptor = vm_grid.register(name="frozen")
    record = {"url": f"https://localhost:{free_port()}/wsrf/services/JobService", "dn": grid_pki.host_dn}
    monkeypatch.setattr("services.vmmanager.guestcred.job_service", lambda home: dict(record) if home else None)
    vmm = vm_grid.vmm(grid_pki.alice)
    ref = vmm.deploy(descriptor, "fz1", 600, wait=True).ref

    def job(*args, user=grid_pki.alice):
        env = {**os.environ, **user.env(grid_pki.cert_dir), "VMGRID_NODE": vm_grid.node_url(0)}
        return subprocess.run([sys.executable, "-m", "client.cli", "job", *args], env=env, capture_output=True,
                              text=True, timeout=60)      # the wait for a job service that never answers is 120 s

    try:
        for act, state, command in ((lambda: vmm.pause(ref), "Paused", "resume"),
                                    (lambda: vmm.save(ref), "Saved", "restore"),
                                    (lambda: (vmm.restore(ref), vmm.shutdown(ref, "Trash")), "Shutoff", "start")):
            act()
            assert vmm.status(ref).state == state
            r = job("status", "fz1", "job-" + "a" * 32)
            assert r.returncode == 1 and r.stdout == "", r.stderr
            assert r.stderr == (f"vmgrid: instance fz1 is {state}: its job service answers when it runs again "
                                f"(vmgrid vm {command} fz1)\n"), r.stderr
        other = job("list", "fz1", "--node", vm_grid.node_url(0), user=grid_pki.bob)
        assert other.returncode == 1 and other.stderr.count("\n") == 1, other.stderr
        assert other.stderr.startswith(f"vmgrid: you have no live instance named 'fz1' on {vm_grid.node_url(0)}; "
                                       f"another user's instance (yours to use as one of its job service's admins) "
                                       f"is named by its key (inst-…) or by its job service's URL"), other.stderr
    finally:
        vmm.destroy(ref)


def test_a_new_client_reads_an_instance_of_a_node_that_has_no_earlier_phase_timings(vm_grid, grid_pki, monkeypatch):
    """EarlierPhaseTimings (trial16 T3) is newer than the nodes that run: such a node answers InvalidArgument for it,
    and `vmgrid vm status` failed on it (seen: a QEMU run whose nodes had started before the change). The client asks
    again without it, once per node; `vmgrid vm status` shows the instance."""
    from services.wsrf.properties import PropertySet
    from services.vmmanager import wire

    older = PropertySet([p for p in wire.INSTANCE_PROPERTIES.properties if p.qname != wire.q("EarlierPhaseTimings")],
                        what="an instance")
    monkeypatch.setattr(wire, "INSTANCE_PROPERTIES", older)
    descriptor = vm_grid.register(name="older")
    vmm = vm_grid.vmm(grid_pki.alice)
    ref = vmm.deploy(descriptor, "old1", 600, wait=True).ref
    try:
        env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": vm_grid.node_url(0)}
        r = subprocess.run([sys.executable, "-m", "client.cli", "vm", "status", "old1"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Running" in r.stdout, r.stderr
        assert vmm.status(ref).earlier_phases == [] and vmm._unknown == {"EarlierPhaseTimings"}
    finally:
        vmm.destroy(ref)
