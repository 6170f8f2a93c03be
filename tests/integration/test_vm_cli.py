"""`vmgrid vm …` and `vmgrid report` as a scientist runs them against a local grid's processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.faults import interrupt_client_at
from tests.fixtures.repository import bio_site
from tests.fixtures.watch import vm_watch

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with bio_site(tmp_path_factory.mktemp("vmcli"), image={"name": "e.qcow2", "fill": b"vmcli"}) as g:
        base = g.services_url
        node = g.start_node("node1", {"sweep_interval": 0.3})
        g.env_extra = {"VMGRID_REPOSITORY": f"{base}/VMRepositoryService",
                       "VMGRID_NODE": node.base_url + "/wsrf/services/VMManagerService"}
        yield g


def vmgrid(grid, *args, user="alice", check=True, cwd=None):
    r = subprocess.run([sys.executable, "-m", "client.cli", *args], env={**grid.env(user), **grid.env_extra},
                       capture_output=True, text=True, timeout=120, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"vmgrid {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_deploy_control_and_report_from_the_command_line(grid, tmp_path):
    out = vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "cli-1", "--lifetime", "10m", "--json")
    info = json.loads(out.stdout)
    assert info["state"] == "Running" and info["address"].startswith("10.99.0.")
    assert "Staging" in out.stderr or "Running" in out.stderr
    assert ", lifetime 10 min" in out.stderr and "bare number" not in out.stderr
    listed = vmgrid(grid, "vm", "list").stdout
    assert "cli-1" in listed and "Running" in listed
    assert "Paused" in vmgrid(grid, "vm", "pause", "cli-1").stdout
    assert "Running" in vmgrid(grid, "vm", "resume", "cli-1").stdout
    assert "Saved" in vmgrid(grid, "vm", "save", "cli-1").stdout
    assert "Running" in vmgrid(grid, "vm", "restore", "cli-1").stdout
    assert "terminates at" in vmgrid(grid, "vm", "lifetime", "cli-1", "20m").stdout
    status = json.loads(vmgrid(grid, "vm", "status", info["key"], "--json").stdout)
    assert status["state"] == "Running" and [p["name"] for p in status["phases"]][:3] == ["authorize", "register",
                                                                                        "lease"]
    assert "Shutoff" in vmgrid(grid, "vm", "shutdown", "cli-1", "--trash").stdout
    assert "destroyed" in vmgrid(grid, "vm", "destroy", "cli-1").stdout
    report = vmgrid(grid, "report", "--out", str(tmp_path / "fig.png")).stdout
    assert "stage" in report and "share" in report
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bare_number_lifetime_under_a_minute_is_said_to_be_seconds(grid):
    """`--lifetime 30` is 30 seconds (as the help says); deploy says so, and how to name minutes or hours."""
    out = vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "brief", "--lifetime", "30", "--no-wait")
    assert ("lifetime 30 s (a bare number is seconds: 30m, 30h or 30d name minutes, hours, days)" in out.stderr), \
        out.stderr
    vmgrid(grid, "vm", "destroy", "brief")


def _watched(grid, name: str, meanwhile) -> str:
    """`vmgrid vm watch NAME` until it ends: once it listens, ``meanwhile(consumer URL, process)`` runs, then the
    instance's lifetime is cut to 2 s (the node's sweeper ends it); what the watch printed."""
    with vm_watch(name, {**grid.env("alice"), **grid.env_extra}) as watch:
        meanwhile(watch.consumer, watch.proc)
        vmgrid(grid, "vm", "lifetime", name, "2s")
        out, _ = watch.finish()
    return out


def test_watch_follows_signed_state_changes(grid):
    """watch subscribes, then the instance's lifetime is cut short and the node's sweeper ends it: the
    watcher sees the signed change to Destroyed. (The lifetime is shortened only once watch listens, so a
    slow machine cannot let the instance expire before watch finds it.)"""
    vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "watched", "--lifetime", "10m")
    out = _watched(grid, "watched", lambda consumer, watch: None)
    assert "-> Destroyed" in out and "signed by /O=Grid/OU=vmgrid/CN=host/localhost" in out


def test_watch_takes_the_job_commands_node_option_and_writes_every_time_alike(grid):
    """trial13 U6 and Minor: `vm watch NAME --node URL` (the job commands' spelling) was a usage error; it follows
    the instance on the node named, with VMGRID_NODE unset. Its own lines (the first, "now on ...") wrote the local
    HH:MM:SS and the node's changes an ISO time with microseconds: all write the one format now."""
    import re

    node = grid.env_extra["VMGRID_NODE"]
    vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "by-node", "--lifetime", "10m")
    env = {k: v for k, v in {**grid.env("alice"), **grid.env_extra}.items() if k != "VMGRID_NODE"}
    with vm_watch("by-node", env, "--node", node) as watch:
        vmgrid(grid, "vm", "lifetime", "by-node", "2s")
        out, _ = watch.finish()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z by-node: "
    assert re.match(stamp + r"Running \(listening at https?://", watch.first), watch.first
    assert "-> Destroyed" in out and all(re.match(stamp, line) for line in out.splitlines()), out
    # the vm commands take it too: a node that does not listen is the one asked
    r = vmgrid(grid, "vm", "status", "by-node", "--node", "https://localhost:1/wsrf/services/VMManagerService",
               check=False)
    assert r.returncode == 1 and "https://localhost:1/" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    shown = vmgrid(grid, "vm", "watch", "--help").stdout
    assert "--url URL" in shown and "--node URL" not in shown and "--node NODE" not in shown


def test_watch_takes_no_change_another_host_signs(grid):
    """A guest's container or another node holds a grid host certificate too. A Notify for the watched instance's
    key, signed by host/10.99.0.250 as the producer at its own address and sent to the watcher's consumer, is
    refused by the consumer (it subscribed to the node's credential only), ends nothing and is not shown; the node's
    own change to Destroyed then is."""
    import urllib.error
    import urllib.request

    from client.localgrid import OU
    from security.wssec import sign_envelope
    from services.vmmanager.wire import state_change_envelope

    key = json.loads(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "spoofed", "--lifetime", "10m",
                            "--json").stdout)["key"]

    def forge(consumer, watch):
        other = grid.ca.issue_host("10.99.0.250", ou=OU)
        forged = state_change_envelope(consumer, "https://10.99.0.250:8443/wsrf/services/VMManagerService", key,
                                       "spoofed", "Running", "Destroyed", 0.0)
        request = urllib.request.Request(consumer, data=sign_envelope(forged, other), headers={
            "Content-Type": "text/xml; charset=utf-8",
            "SOAPAction": '"http://docs.oasis-open.org/wsn/bw-2/NotificationConsumer/Notify"'})
        with pytest.raises(urllib.error.HTTPError) as refused:     # refused by the consumer: not the node's ...
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 500 and b"signed by /O=Grid/OU=vmgrid/CN=host/10.99.0.250" in refused.value.read()
        assert watch.poll() is None              # ... and the watch still runs

    out = _watched(grid, "spoofed", forge)
    assert "10.99.0.250" not in out and "1970" not in out
    assert out.count("-> Destroyed") == 1 and "signed by /O=Grid/OU=vmgrid/CN=host/localhost" in out


def test_a_url_with_no_vmmanager_is_one_line_saying_what_to_check(grid):
    """The central container serves no VMManagerService: naming it is one line, not a bare HTTP 404."""
    url = grid.services_url + "/VMManagerService"
    r = vmgrid(grid, "vm", "list", "--url", url, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"vmgrid: no service answers at {url} (HTTP 404 for its WSDL): check the "
                                f"VMManagerService's URL ($VMGRID_NODE, --url (--node for job commands))")


@pytest.mark.parametrize("args, message", [
    (["vm", "pause", "nobody"], "no live instance"),
    (["vm", "deploy", "bio/none", "x"], "UnknownImage"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--lifetime", "soon"], "not a duration"),
    (["vm", "status", "inst-" + "0" * 32], "ResourceUnknown"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--memory", "0"],
     "--memory is RAM in MiB (or with a unit: 512M, 4G), 1 to 4194304 (4 TiB), not 0"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--memory", "lots"], "1 to 4194304 (4 TiB), not lots"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--memory", "1.3M"], "1 to 4194304 (4 TiB), not 1.3M"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--lifetime", "-5m"],
     "'-5m' is in the past: give a duration from now, e.g. 5m"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--lifetime", "0"],
     "a lifetime of '0' ends at once: give at least 1 s (e.g. 90m, 2h, 1d)"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--lifetime", "400d"],
     "a lifetime of '400d' is more than a node gives: at most 365d"),
    (["vm", "lifetime", "nobody", "-5m"], "'-5m' is in the past: give a duration from now, e.g. 5m"),
    # attack16 G5: past what a date can hold, an OverflowError traceback (zeep, isodate)
    (["vm", "lifetime", "nobody", "99999999999999999999999"],
     "a lifetime of '99999999999999999999999' is longer than any service grants: give at most 36500d"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--lifetime", "99999999999999"], "at most 36500d"),
    (["vm", "lifetime", "nobody", "\u0665m"], "is not a duration"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--lifetime", "30d"],
     "LimitExceeded: lifetime 2592000 s (30 d) exceeds the limit of 86400 s (1 d)"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--memory", "99999999"], "not 99999999"),
    (["vm", "deploy", "bio/debian12-emboss", "x", "--vcpus", "0"], "--vcpus must be 1 to 256, not 0"),
])
def test_errors_are_one_clear_line(grid, args, message):
    r = vmgrid(grid, *args, check=False)
    assert r.returncode == 1 and r.stderr.startswith("vmgrid: ") and message in r.stderr
    assert "Traceback" not in r.stderr
    if args[:2] == ["vm", "deploy"]:                 # nothing deployed by a refused deploy
        assert "x" not in [i["identifier"] for i in json.loads(vmgrid(grid, "vm", "list", "--json").stdout)]


def test_options_of_an_instance_command_that_cannot_be_used_are_one_line_and_change_nothing(grid, tmp_path):
    vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "opts-1", "--no-wait")
    repo = grid.env_extra["VMGRID_REPOSITORY"]
    node = grid.env_extra["VMGRID_NODE"].split("://", 1)[1].split("/", 1)[0]        # localhost:PORT
    for args, message in (
            (["vm", "shutdown", "opts-1", "--timeout", "-1"],
             "--timeout is the seconds the guest gets before it is forced off, 0 or more, not -1"),
            (["vm", "watch", "opts-1", "--listen", "bad"],
             "--listen is HOST:PORT (e.g. 127.0.0.1:0, where 0 picks a free port), not 'bad'"),
            (["vm", "watch", "opts-1", "--listen", "127.0.0.1:99999"],
             "--listen is HOST:PORT (e.g. 127.0.0.1:0, where 0 picks a free port), not '127.0.0.1:99999'"),
            (["vm", "watch", "opts-1", "--timeout", "-3"],
             "--timeout is seconds, 0 (until the instance ends) or more, not -3"),
            (["vm", "migrate", "opts-1", "--to", node],
             f"'{node}' is not a VMManagerService URL: give https://HOST:PORT/wsrf/services/VMManagerService "
             f"(or https://HOST:PORT); did you mean https://{node}?"),
            (["vm", "migrate", "opts-1", "--to", repo],
             f"{repo} is the VMRepositoryService, not the VMManagerService: give the VMManagerService's URL "
             f"(https://HOST:PORT/wsrf/services/VMManagerService)"),
            (["report", "--out", "/proc/phases.png"], "cannot write the figure to /proc/phases.png: No such file "
                                                       "or directory")):
        r = vmgrid(grid, *args, check=False)
        assert r.returncode == 1 and r.stdout == "" and r.stderr == f"vmgrid: {message}\n", (args, r.stderr)
    status = json.loads(vmgrid(grid, "vm", "status", "opts-1", "--json").stdout)
    assert status["state"] == "Running" and status["node"] == "node1"
    vmgrid(grid, "vm", "destroy", "opts-1")


def test_memory_takes_the_size_units_queries_take(grid):
    """`--memory 4G` as `vmgrid repo query 'ram >= 4G'` takes it (services.descriptor.number_value): 4096 MiB."""
    for given, mib in (("1G", 1024), ("768M", 768), ("1.5GiB", 1536), ("640", 640)):
        info = json.loads(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", f"mem-{mib}", "--memory", given,
                                 "--no-wait", "--json").stdout)
        assert info["memory"] == mib, (given, info)
        vmgrid(grid, "vm", "destroy", f"mem-{mib}")


def test_version():
    r = subprocess.run([sys.executable, "-m", "client.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    from importlib.metadata import version
    assert r.stdout == f"vmgrid {version('vmgrid')}\n"


def test_an_instance_that_ended_is_named_with_its_state_and_the_command_that_shows_it(grid):
    """A scientist whose instance ended (destroyed, its lifetime over, lost in a node restart) and who asks for it
    by name is told what became of it, not only that there is no live one."""
    key = json.loads(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "ended-1", "--json").stdout)["key"]
    vmgrid(grid, "vm", "destroy", "ended-1")
    r = vmgrid(grid, "vm", "status", "ended-1", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.endswith(f"no live instance named 'ended-1' on {grid.env_extra['VMGRID_NODE']}: the last one so "
                             f"named is Destroyed ({key}); `vmgrid vm list --all` lists it\n"), r.stderr
    listed = vmgrid(grid, "vm", "list", "--all").stdout
    assert f"{key}  ended-1     Destroyed" in listed
    row = next(line for line in listed.splitlines() if key in line)
    assert not row.rstrip().endswith(" s"), row          # an ended instance has no lifetime left to show


def test_an_expired_proxy_is_refused_with_the_step_that_mends_it(grid, tmp_path):
    import datetime as dt
    import time

    from security.pki import make_proxy, save_proxy

    alice = grid.user("alice")
    proxy = make_proxy(alice.credential, hours=1 / 3600)          # one second
    path = save_proxy(proxy, tmp_path / "short.pem")
    while dt.datetime.now(dt.timezone.utc) <= proxy.certificate.not_valid_after_utc + dt.timedelta(seconds=1):
        time.sleep(0.2)
    r = vmgrid(grid, "vm", "list", "--proxy", str(path), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "expired at" in r.stderr and r.stderr.rstrip().endswith(
        ": make a new proxy with `vmgrid proxy-init` (or grid-proxy-init)"), r.stderr


def test_a_job_command_on_an_instance_without_a_job_service_says_what_gives_one(grid):
    vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "nojobs")
    try:
        r = vmgrid(grid, "job", "submit", "nojobs", "--", "true", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        # libvirt's test driver has no guest channel: GuestStatus stays "none", and the message says what that means
        assert r.stderr.startswith("vmgrid: instance nojobs (Running) has no job service (guest: none): guestd in "
                                   "it has not reported ready"), r.stderr
        assert "libvirt's test driver" in r.stderr and "docs/jobs.md" in r.stderr
    finally:
        vmgrid(grid, "vm", "destroy", "nojobs")


@pytest.fixture
def stalling_node(grid, tmp_path):
    """stalling_node(name) -> (its VMManager URL, its fault directory): a node of the grid's own, whose fault
    directory (services/common/crash.py) the test sets, e.g. with tests.fixtures.faults.interrupt_client_at."""
    def start(name: str):
        faults = tmp_path / "faults"
        faults.mkdir()
        node = grid.start_node(name, {}, extra_env={"VMGRID_FAULTDIR": str(faults)})
        return node.base_url + "/wsrf/services/VMManagerService", faults
    return start


def test_ctrl_c_while_following_a_deployment_says_it_goes_on(grid, stalling_node):
    """The node holds the deployment after staging (services/common/crash.py's stall) while the client follows it."""

    url, faults = stalling_node("node-stall")
    # interrupted once the deployment is under way at the node, which goes on
    rc, err = interrupt_client_at(faults, "deploy.staged", ["vm", "deploy", "bio/debian12-emboss", "held-run", "--url",
                                                            url], {**grid.env("alice"), **grid.env_extra})
    assert rc == 130 and "Traceback" not in err, err
    assert ("vmgrid: interrupted; the deployment of held-run goes on at the node (`vmgrid vm status held-run "
            f"--url {url}` follows it, `vmgrid vm destroy held-run --url {url}` ends it)") in err
    r = vmgrid(grid, "vm", "status", "held-run", "--url", url, "--json")
    assert json.loads(r.stdout)["identifier"] == "held-run"
    vmgrid(grid, "vm", "destroy", "held-run", "--url", url)


def test_ctrl_c_while_waiting_for_a_migration_says_it_goes_on(grid, stalling_node):
    """`vmgrid vm migrate` interrupted while the target holds the migration (services/common/crash.py's stall after
    its prepare step): it said only "vmgrid: interrupted", though the migration went on and committed. It now says
    so and how to follow it; the migration does go on."""
    import time

    vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "mig-held")
    url, faults = stalling_node("node-mstall")
    # interrupted once the migration is under way at the target, which goes on
    rc, err = interrupt_client_at(faults, "migration.target-prepared", ["vm", "migrate", "mig-held", "--to", url],
                                  {**grid.env("alice"), **grid.env_extra})
    assert rc == 130 and "Traceback" not in err, err
    assert ("vmgrid: interrupted; the migration of mig-held goes on between the nodes (`vmgrid vm status mig-held` "
            f"follows it: the instance is Migrating, then on {url} or back here, Running)") in err, err
    deadline = time.monotonic() + 120
    while True:
        r = vmgrid(grid, "vm", "status", "mig-held", "--url", url, "--json", check=False)
        if r.returncode == 0 and json.loads(r.stdout)["state"] == "Running":
            break
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.2)
    vmgrid(grid, "vm", "destroy", "mig-held", "--url", url)
