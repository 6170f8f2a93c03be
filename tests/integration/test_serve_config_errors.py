"""`vmgrid serve` with a configuration it cannot use: one line naming the configuration file and the key, exit
status 1, and nothing started or written (the state directory is not made). A typo in a value (`vmm = "tset"`)
and a missing host certificate used to end in a 25- or 34-line traceback (InvalidSpec, CredentialError)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

VMGRID = os.path.join(os.path.dirname(sys.executable), "vmgrid")      # the installed entry point


def node_toml(grid_pki, state, changes: dict | None = None) -> str:
    """A node's configuration as the README writes it, with ``changes`` ({(section, key): TOML value})."""
    keys = {("container", "port"): "0", ("container", "state_dir"): f'"{state}"',
            ("security", "cert_dir"): f'"{grid_pki.cert_dir}"',
            ("security", "host_cert"): f'"{grid_pki.host_cert_path}"',
            ("security", "host_key"): f'"{grid_pki.host_key_path}"',
            ("enforcement", "authz_url"): '"https://localhost:1/wsrf/services/AuthorizationService"',
            ("vmmanager", "node"): '"n3"', ("vmmanager", "vmm"): '"test"',
            ("vmmanager", "repository"): '"https://localhost:1/wsrf/services/VMRepositoryService"',
            # the GridFTP faces on free ports, not the site's 2811 and 2812 (taken by whatever else runs here)
            ("repository", "gridftp_port"): "0", ("jobs", "gridftp_port"): "0"}
    keys.update(changes or {})
    sections: dict[str, list[str]] = {}
    for (section, key), value in keys.items():
        sections.setdefault(section, []).append(f"{key} = {value}")
    return "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())


def serve(tmp_path, text: str, *extra: str, service: str = "vmmanager") -> subprocess.CompletedProcess:
    (tmp_path / "n3.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    return subprocess.run([VMGRID, "serve", service, "-c", "n3.toml", *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("key, value, message", [
    (("vmmanager", "vmm"), '"tset"', "n3.toml: vmmanager.vmm: 'tset' is not one of test, qemu"),
    (("vmmanager", "nic_kind"), '"tap"', "n3.toml: vmmanager.nic_kind: 'tap' is not one of user, network, bridge"),
    (("container", "tls_client_certs"), '"yes"',
     "n3.toml: container.tls_client_certs: 'yes' is not one of none, optional, required"),
    (("security", "host_cert"), '"host/nocert.pem"',
     "n3.toml: [security] host_cert = 'host/nocert.pem': certificate host/nocert.pem does not exist"),
    (("security", "host_key"), '"/etc/hostname"', "n3.toml: [security] host_key = '/etc/hostname': no private key in "
                                                   "/etc/hostname"),
    (("security", "cert_dir"), '"ca/nocerts"',
     "n3.toml: [security] cert_dir = 'ca/nocerts': trusted CA directory ca/nocerts does not exist"),
    (("container", "port"), "99999", "n3.toml: [container] port = 99999: a port is 0 to 65535 (0 picks a free one)"),
    (("container", "log_level"), '"verbose"', "n3.toml: [container] log_level = 'verbose': Unknown level: 'VERBOSE'"),
    (("container", "log_file"), '"nodir/node.log"',
     "n3.toml: [container] log_file = 'nodir/node.log': No such file or directory"),
    # numbers that cannot mean anything: each failed later (the first staging, the executor) or hung, or started
    (("vmmanager", "staging_parallel"), "0", "n3.toml: [vmmanager] staging_parallel = 0: GridFTP streams, 1 to 64"),
    (("security", "clock_skew"), "-5", "n3.toml: [security] clock_skew = -5: seconds, 0 to 3600"),
    (("security", "message_lifetime"), "0", "n3.toml: [security] message_lifetime = 0: seconds, 1 to 3600"),
    (("vmmanager", "staging_parallel"), "65", "n3.toml: [vmmanager] staging_parallel = 65: GridFTP streams, 1 to 64"),
    (("vmmanager", "deploy_workers"), "0", "n3.toml: [vmmanager] deploy_workers = 0: deployments at once, 1 or more"),
    (("vmmanager", "sweep_interval"), "-1.0", "n3.toml: [vmmanager] sweep_interval = -1.0: seconds, more than 0"),
    (("vmmanager", "guest_ready_timeout"), "nan", "n3.toml: [vmmanager] guest_ready_timeout = nan: seconds, more than 0"),
    (("vmmanager", "hold_linger"), "-5.0",
     "n3.toml: [vmmanager] hold_linger = -5.0: seconds (0: given back with the last instance), 0 or more"),
    (("vmmanager", "list_page"), "0", "n3.toml: [vmmanager] list_page = 0: instances a page, 1 to 1000"),
    # a lease range said "bad lease range '10.99.0.10' / network '10.99.0.0/24': Address cannot be empty"
    (("vmmanager", "lease_range"), '"10.99.0.10"',
     "n3.toml: [vmmanager] lease_range = '10.99.0.10': not a range (expected \"FIRST-LAST\", host addresses of "
     "10.99.0.0/24 in order, e.g. \"10.99.0.10-10.99.0.20\")"),
    (("vmmanager", "lease_range"), '"10.99.0.10-10.98.0.20"',
     "n3.toml: [vmmanager] lease_range = '10.99.0.10-10.98.0.20': not in order (expected \"FIRST-LAST\", host "
     "addresses of 10.99.0.0/24 in order, e.g. \"10.99.0.10-10.99.0.20\")"),
    (("vmmanager", "lease_range"), '"10.99.0.10-10.99.1.20"',
     "n3.toml: [vmmanager] lease_range = '10.99.0.10-10.99.1.20': not inside [vmmanager] network 10.99.0.0/24 "
     "(expected \"FIRST-LAST\", host addresses of 10.99.0.0/24 in order, e.g. \"10.99.0.10-10.99.0.20\")"),
    # a network too small, and one the default lease_range is not in: the example outside the gateway, the key
    # the operator did not set said to be the default (trial15 X11: "e.g. 10.99.0.1-10.99.0.0" for a /31)
    (("vmmanager", "network"), '"10.99.0.0/31"',
     "n3.toml: [vmmanager] network = '10.99.0.0/31': too small for a gateway and a lease range (a /30 holds one "
     "guest; e.g. \"10.99.0.0/24\")"),
    (("vmmanager", "network"), '"10.99.0.0/30"',
     "n3.toml: [vmmanager] lease_range = '10.99.0.10-10.99.0.250': the default, not inside [vmmanager] network "
     "10.99.0.0/30: set lease_range with network (expected \"FIRST-LAST\", host addresses of 10.99.0.0/30 in "
     "order, e.g. \"10.99.0.2-10.99.0.2\")"),
    # an http:// public URL of a container serving https: every call was refused (trial15 X3)
    (("container", "public_url"), '"http://localhost:8443"',
     "n3.toml: [container] public_url = 'http://localhost:8443': an http:// URL, but this container serves https "
     "([container] tls = true): give https://, or set tls = false"),
    # a header bound no SOAP request fits: every call was HTTP 431, nothing logged (trial15 X10)
    (("container.limits", "max_header_bytes"), "10",
     "n3.toml: [container.limits] max_header_bytes = 10: bytes, 4096 or more"),
    # the services' GridFTP servers' bounds ([gridftp]) and guests' DN patterns: their servers started with the defaults
    (("gridftp", "host_sessions"), "64",
     "n3.toml: [gridftp] host_sessions is 0 to 63 ([gridftp] max_sessions less one: users need one), not 64"),
    (("gridftp", "max_sessions_per_identity"), "0",
     "n3.toml: [gridftp] max_sessions_per_identity is 1 to 64 (at most [gridftp] max_sessions), not 0"),
    (("gridftp", "max_sessions_per_address"), '"16"',
     "n3.toml: [gridftp] max_sessions_per_address is 1 to 64 (at most [gridftp] max_sessions), not '16'"),
    (("gridftp", "transfer_idle_timeout"), "-1",
     "n3.toml: [gridftp] transfer_idle_timeout is seconds, 0 (no such bound) or more, not -1.0"),
    # the data ports, as `vmgrid gridftp-server --data-ports` takes them (the key was unknown before)
    (("gridftp", "data_ports"), '"51000,50000"',
     "n3.toml: [gridftp] data_ports = '51000,50000': expected LOW,HIGH, two ports 1 to 65535 in order (e.g. "
     "50000,51000)"),
    (("gridftp", "data_ports"), '"0-10"',
     "n3.toml: [gridftp] data_ports = '0-10': expected LOW,HIGH, two ports 1 to 65535 in order (e.g. 50000,51000)"),
    (("gridftp", "data_ports"), '"5_0,60"',       # Python's int() took it: 50 (attack15)
     "n3.toml: [gridftp] data_ports = '5_0,60': expected LOW,HIGH, two ports 1 to 65535 in order (e.g. 50000,51000)"),
    (("gridftp", "data_ports"), "50000", "n3.toml: gridftp.data_ports: expected a string, got 50000"),
    (("vmmanager", "guest_dns"), '["OU=site-guests"]',
     "n3.toml: [vmmanager] guest_dns: 'OU=site-guests' is not a DN pattern (e.g. \"/O=Grid/OU=site-guests/*\")"),
])
def test_a_value_that_cannot_be_used_is_one_line_naming_the_file_and_key(grid_pki, tmp_path, key, value, message):
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {key: value}))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: {message}\n"
    assert not (tmp_path / "state").exists()                # refused before any service opened its state


def test_a_wrong_service_name_and_port_are_refused_before_anything_starts(grid_pki, tmp_path):
    text = node_toml(grid_pki, tmp_path / "state")
    r = serve(tmp_path, text, service="vmmanger")
    assert r.returncode == 1 and r.stderr == ("vmgrid: unknown service 'vmmanger': serve one or more of repository, "
                                              "authz, vmmanager, jobs\n")
    r = serve(tmp_path, text, "--port", "70000")
    assert r.returncode == 2 and "argument --port: '70000' is not a port (0 to 65535; 0 picks a free one)" in r.stderr
    assert not (tmp_path / "state").exists()


def test_what_a_service_needs_is_named_before_the_host_credential_or_any_state(grid_pki, tmp_path):
    text = node_toml(grid_pki, tmp_path / "state", {("security", "host_cert"): '"host/nocert.pem"'})
    text = text.replace('authz_url = "https://localhost:1/wsrf/services/AuthorizationService"\n', "")
    r = serve(tmp_path, text)
    assert r.returncode == 1 and r.stderr == ("vmgrid: n3.toml: the VMManager authorizes every operation through the "
                                              "Authorization service: set [enforcement] authz_url\n")
    assert not (tmp_path / "state").exists()


def test_a_gridftp_face_that_cannot_listen_is_named_not_taken_for_the_containers_port(grid_pki, tmp_path):
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("repository", "gridftp_port"): "99999"}),
              service="repository")
    assert r.returncode == 1 and r.stderr == ("vmgrid: n3.toml: [repository] gridftp_port = 99999: a port is 0 to 65535 "
                                              "(0 picks a free one; -1: no GridFTP face)\n")
    assert not (tmp_path / "state").exists()
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("repository", "gridftp_port"): "0",
                                                                  ("repository", "gridftp_host"): '"192.0.2.1"'}),
              service="repository")             # TEST-NET-1: an address no interface here has
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.endswith("vmgrid: n3.toml: cannot start VMRepositoryService: Cannot assign requested address "
                             "(its GridFTP face: [repository] or [jobs] gridftp_host, gridftp_port)\n"), r.stderr


@pytest.mark.parametrize("service", ["repository", "jobs"])
def test_each_service_with_a_gridftp_server_checks_the_gridftp_section_at_start(grid_pki, tmp_path, service):
    """The repository's face and a job service's face take [gridftp] as a node's migration export does."""
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("jobs", "owner"): f'"{grid_pki.alice.dn}"',
                                                                  ("gridftp", "max_sessions"): "8",
                                                                  ("gridftp", "host_sessions"): "8"}),
              service=service)
    assert r.returncode == 1 and r.stderr == ("vmgrid: n3.toml: [gridftp] host_sessions is 0 to 7 ([gridftp] "
                                              "max_sessions less one: users need one), not 8\n"), r.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("key, value, message", [
    ("staging_parallel", "0", "[jobs] staging_parallel = 0: GridFTP streams, 1 to 64"),
    ("max_live_jobs", "0", "[jobs] max_live_jobs = 0: jobs, 1 or more"),
    ("staging_quota", "0", "[jobs] staging_quota = 0: bytes (each entry of a job's directory counts at least 4096), "
                           "16384 or more"),
    # quotas and a /tmp no job fits in, an owner or admin no certificate has, a default past the longest lifetime,
    # a consumer network that is none: each started a service that failed every job or refused everyone (trial15
    # X5, X6)
    ("staging_quota", "1", "[jobs] staging_quota = 1: bytes (each entry of a job's directory counts at least 4096), "
                           "16384 or more"),
    ("submitter_quota", "1000", "[jobs] submitter_quota = 1000: bytes (each entry of a job's directory counts at "
                                "least 4096), 16384 or more"),
    ("tmp_size", "1", "[jobs] tmp_size = 1: bytes, 1048576 or more"),
    ("owner", '"not a dn"', "[jobs] owner: 'not a dn' is not a DN (a grid DN starts with '/': 'not a dn'); the "
                            "instance owner's DN in /O=.../CN=... form, as `vmgrid proxy-info` shows it (e.g. "
                            "\"/O=Grid/OU=mysite/CN=alice\")"),
    ("admins", '["alice"]', "[jobs] admins: 'alice' is not a DN (a grid DN starts with '/': 'alice'); each a VO "
                            "admin's DN in /O=.../CN=... form, as `vmgrid proxy-info` shows it (e.g. "
                            "\"/O=Grid/OU=mysite/CN=alice\")"),
    ("default_lifetime", "999999", "[jobs] default_lifetime = 999999: more than [jobs] max_lifetime = 604800 (the "
                                   "longest lifetime a job may have): lower it, or raise max_lifetime"),
    ("consumer_allow", '["bad"]', "[jobs] consumer_allow: 'bad' is not a network (e.g. \"127.0.0.0/8\" or "
                                  "\"10.0.0.0/8\")"),
    ("kill_grace", "-1.0", "[jobs] kill_grace = -1.0: seconds (0: SIGKILL at once), 0 or more"),
    ("max_files", "0", "[jobs] max_files = 0: files and directories a job's directory holds, 1 or more"),
    ("memory_limit", '"2G"', "[jobs] memory_limit = '2G': bytes (0: no bound), a share of the machine's memory "
                             "such as \"80%\", or \"auto\" (the default); a share more than 0% and at most 100%"),
    ("memory_limit", "1000", "[jobs] memory_limit = 1000: bytes, at least 16777216 (16 MiB: no job starts in less), "
                             "or 0 for no bound, or a share of the machine's memory such as \"80%\", or \"auto\" "
                             "(the default)"),
    ("memory_total", '"half"', "[jobs] memory_total = 'half': bytes (0: no bound), a share of the machine's "
                               "memory such as \"80%\", or \"auto\" (the default); a share more than 0% and at "
                               "most 100%"),
    ("network", '"private"', "[jobs] network = 'private': \"host\" (the host's network, as any local account has it) "
                             "or \"none\" (a network namespace of the job's own with only loopback)"),
])
def test_a_job_service_number_that_cannot_mean_anything_is_refused_naming_its_key(grid_pki, tmp_path, key, value,
                                                                                  message):
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("jobs", "owner"): f'"{grid_pki.alice.dn}"',
                                                                  ("jobs", key): value}), service="jobs")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: n3.toml: {message}\n"
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("key, share", [("memory_limit", "0.01%"), ("memory_total", "0.001%")])
def test_a_memory_share_below_the_floor_is_refused_naming_the_bytes_it_came_to(grid_pki, tmp_path, key, share):
    """H3/X1: a share of the machine's memory below 16 MiB started, then every job was killed out of memory."""
    from services.jobs.runner import machine_memory

    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("jobs", "owner"): f'"{grid_pki.alice.dn}"',
                                                                  ("jobs", key): f'"{share}"'}), service="jobs")
    machine = machine_memory()
    came = int(machine * float(share[:-1]) / 100) // 4096 * 4096
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"vmgrid: n3.toml: [jobs] {key} = '{share}' is {came} bytes of this machine's {machine}: "
                        f"at least 16777216 (16 MiB: no job starts in less); give a larger share, bytes, or \"auto\" "
                        f"(the default)\n")
    assert not (tmp_path / "state").exists()


def test_every_number_rule_refuses_what_it_says_and_takes_the_default():
    """Each key of NUMBER_RULES: its default passes, a value just outside its rule is refused naming the key."""
    from services.container.assemble import NUMBER_RULES, check_service_config
    from services.container.config import Config

    from services.container.assemble import config_section

    for name, rules in NUMBER_RULES.items():
        # [security] and [container] are every service's, [enforcement] the enforcing services'
        service = {"security": "repository", "container": "repository", "container.limits": "authz",
                   "enforcement": "vmmanager"}.get(name, name)
        for key, (_what, (_holds, rule)) in rules.items():
            config = Config()
            config.enforcement.authz_url = "https://localhost:1/wsrf/services/AuthorizationService"
            config.jobs.owner = "/O=Grid/CN=alice"
            check_service_config(service, config)                     # the defaults
            section = config_section(config, name)
            default = getattr(section, key)
            least = 1 if rule.startswith("1 ") else 0
            bad = (least - 1) if isinstance(default, int) else (-0.5 if rule.startswith("0 ") else 0.0)
            setattr(section, key, type(default)(bad))
            with pytest.raises(ValueError, match=rf"^\[{name}\] {key} = "):
                check_service_config(service, config)


def test_a_container_hosting_the_authorization_service_beside_a_repository_without_authz_url_says_so(grid_pki,
                                                                                                      tmp_path):
    """An operator who hosts `authz repository` in one container and forgets [enforcement] authz_url gets a
    repository enforcing the built-in [policy] (default-deny for a VO the policy file grants), while `authz check`
    answers from the policy file: the start says which one the repository enforces and how to change it."""
    text = node_toml(grid_pki, tmp_path / "state")
    text = text.replace('authz_url = "https://localhost:1/wsrf/services/AuthorizationService"\n', "")
    assert "authz_url" not in text
    (tmp_path / "c.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    for services, warned in ((["authz", "repository"], True), (["repository"], False)):
        proc = subprocess.Popen([VMGRID, "serve", *services, "-c", "c.toml"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().startswith("vmgrid: serving"), proc.stderr.read()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
        assert ("vmgrid: warning: [enforcement] authz_url is not set: the repository enforces the built-in [policy] "
                "section, not the Authorization service this container hosts" in err) is warned, err


def test_a_users_certificate_given_as_the_host_certificate_is_refused_at_start(grid_pki, tmp_path):
    """A user's certificate (clientAuth only, no host name) as [security] host_cert started a container whose every
    client then failed its TLS handshake ("certificate verify failed"): now one line at start, nothing started."""
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {
        ("security", "host_cert"): f'"{grid_pki.alice.cert_path}"', ("security", "host_key"): f'"{grid_pki.alice.key_path}"'}))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"vmgrid: n3.toml: [security] host_cert = '{grid_pki.alice.cert_path}': {grid_pki.alice.dn} is "
                        f"not a TLS server's certificate (its extended key usage has no serverAuth); give the host's "
                        f"certificate (vmgrid ca host NAME)\n")
    assert not (tmp_path / "state").exists()


def test_a_services_state_is_closed_to_other_users(grid_pki, tmp_path):
    """Every VO's images, the catalogue, VM disks and guestd's tokens were world-readable (state directories 0755,
    files 0644: any local account read them). The state a container makes is its own user's (umask 077), each
    service's state directory is closed to others even where an earlier version left it open, and the directory
    above keeps only its search bit."""
    import stat

    state = tmp_path / "state"
    (state / "repository").mkdir(parents=True)
    old = state / "repository" / "left-by-an-earlier-version"
    old.write_text("secret")
    for path, mode in ((state, 0o755), (state / "repository", 0o755), (old, 0o644)):
        path.chmod(mode)
    (tmp_path / "c.toml").write_text(node_toml(grid_pki, state))
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    proc = subprocess.Popen([VMGRID, "serve", "repository", "-c", "c.toml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("vmgrid: serving"), proc.stderr.read()
        modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
                 for p in [state, *state.rglob("*")] if not p.is_symlink()}
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert modes.pop("state") == 0o711 and modes.pop("state/repository") == 0o700, modes
    assert modes.pop("state/repository/left-by-an-earlier-version") == 0o644      # behind a closed directory
    made = {p: m for p, m in modes.items() if m & 0o077}
    assert made == {}, made                   # everything the container made is its own user's alone
    assert "state/repository/catalogue.sqlite" in modes


@pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs its jobs under uids of their own: root only")
def test_a_job_reaches_its_own_directory_by_path_when_serve_made_the_state_directory():
    """`vmgrid serve` made a new state directory (and those above it) under its umask 077: 0700, never the 0711 its
    own rule promises, so a job under its own uid could not reach its directory by path: `cat "$HOME/x"`,
    `cd "$PWD"`, `python3 script.py` (made absolute) were refused (attack G4). A new state directory is now
    0711 and the directories made above it 0755."""
    import shutil
    import stat
    import tempfile
    from pathlib import Path

    from client.localgrid import LocalGrid

    top = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vmgrid-g4-"))    # pytest's own tmp tree is 0700
    try:
        top.chmod(0o755)
        state = top / "site" / "state"                                  # neither exists: serve makes both
        with LocalGrid(top / "grid") as g:
            alice = g.user("alice")
            sp = g.start("jobs", ["jobs"], {"container": {"state_dir": str(state)},
                                             "jobs": {"owner": alice.dn, "gridftp_port": 0}})
            url = f"{sp.base_url}/wsrf/services/JobService"
            r = subprocess.run([sys.executable, "-m", "client.cli", "job", "submit", url, "--wait", "--",
                                "/bin/sh", "-ec", 'echo mine > x; cat "$HOME/x"; cd "$PWD"; ls "$HOME" >/dev/null'],
                               env=g.env("alice"), capture_output=True, text=True, timeout=180)
            key = r.stdout.split()[0]
            status = subprocess.run([sys.executable, "-m", "client.cli", "job", "status", url, key],
                                    env=g.env("alice"), capture_output=True, text=True, timeout=60).stdout
            assert "state            Done\nexitCode         0\n" in status, r.stdout + r.stderr + status
            assert status.endswith("--- stdout (tail) ---\nmine\n"), status
        assert stat.S_IMODE((top / "site").stat().st_mode) == 0o755
        assert stat.S_IMODE(state.stat().st_mode) == 0o711
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("skew, accepted", [(None, False), (600, True)], ids=["default-60s", "clock_skew-600"])
def test_security_clock_skew_is_what_the_container_accepts(skew, accepted, monkeypatch):
    """`[security] clock_skew` and `message_lifetime` were read and used nowhere: with clock_skew = 600 a request
    dated 120 s ahead was still refused "beyond the allowed clock skew of 60 s" (trial T9). The container's
    WS-Security now verifies with them. Here the client's clock runs 2 minutes ahead (its signer's clock, in this
    test's process; the service is a process of its own with the real clock)."""
    import datetime as real_dt
    import tempfile
    import types
    from pathlib import Path

    import security.wssec as wssec
    from client.localgrid import LocalGrid
    from services.authz.client import AuthorizationClient
    from services.container.config import SecurityConfig
    from security.trust import TrustStore
    from services.soapclient import ClientError

    assert SecurityConfig().clock_skew == 60 == wssec.DEFAULT_POLICY.clock_skew.total_seconds()   # as documented

    class Ahead(real_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_dt.datetime.now(tz) + real_dt.timedelta(seconds=120)

    with tempfile.TemporaryDirectory() as top, LocalGrid(Path(top) / "grid") as g:
        alice = g.user("alice")
        policy = Path(top) / "policy.toml"
        policy.write_text(f'[policy]\nadmins = ["{alice.dn}"]\n')
        sp = g.start("authz", ["authz"], {"authz": {"policy": str(policy)},
                                          **({"security": {"clock_skew": skew}} if skew else {})})
        client = AuthorizationClient.connect(f"{sp.base_url}/wsrf/services/AuthorizationService",
                                             alice.credential, TrustStore(g.cert_dir))
        monkeypatch.setattr(wssec, "_dt", types.SimpleNamespace(datetime=Ahead, timedelta=real_dt.timedelta,
                                                                timezone=real_dt.timezone))
        if accepted:
            assert client.groups(alice.dn) == ([], [])
        else:
            with pytest.raises(ClientError, match="beyond the allowed clock skew of 60 s"):
                client.groups(alice.dn)



def test_a_migration_port_that_is_no_port_is_refused_at_start(grid_pki, tmp_path):
    """[vmmanager] migration_port (the node's migration GridFTP face, docs/vmmanager.md) out of 0-65535 is one line
    naming the file and the key at start. Before: no such key (the face took any free port)."""
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("vmmanager", "migration_port"): "70000"}))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == "vmgrid: n3.toml: [vmmanager] migration_port = 70000: a port (0 picks a free one), 0 to 65535\n"
    assert not (tmp_path / "state").exists()             # refused before any state is made


# trial14b V1-V8: values `vmgrid serve` took at start that then broke later (a container answering nothing, a query
# showing none, every deploy failing, every call ServiceUnavailable): one line naming the key at start, nothing made
@pytest.mark.parametrize("service, key, value, message", [
    ("repository", ("container", "threads"), "0", "[container] threads = 0: request threads, 1 or more"),
    ("vmmanager", ("container", "threads"), "-3", "[container] threads = -3: request threads, 1 or more"),
    # "slots must be at least 1", naming no key, after the repository had opened its catalogue
    ("repository", ("container.limits", "handshake_threads"), "0",
     "[container.limits] handshake_threads = 0: threads, 1 or more"),
    ("repository", ("container.limits", "handshake_timeout"), "0",
     "[container.limits] handshake_timeout = 0.0: seconds, more than 0"),
    ("authz", ("container.limits", "max_connections"), "0", "[container.limits] max_connections = 0: connections, 1 or more"),
    ("repository", ("container.limits", "body_min_rate"), "0",
     "[container.limits] body_min_rate = 0: bytes a second, 1 or more"),
    ("repository", ("container", "public_url"), '"ftp://x"',
     "[container] public_url = 'ftp://x': this container's public URL, an https:// URL (e.g. "
     "\"https://HOST:8443/wsrf/services/...\")"),
    # a path, query, fragment or user name: the WSDL's soap:address and every EPR named a URL the container does not
    # serve (404 for https://HOST:PORT/grid/wsrf/services/...: it serves /wsrf/services/ only)
    ("repository", ("container", "public_url"), '"https://localhost:8443/grid"',
     "[container] public_url = 'https://localhost:8443/grid': it has a path; this container's public URL is scheme, "
     "host and port only (e.g. \"https://HOST:8443\"): its services are served below it at /wsrf/services/NAME"),
    ("vmmanager", ("container", "public_url"), '"https://localhost:8443/?site=a#top"',
     "[container] public_url = 'https://localhost:8443/?site=a#top': it has a query and a fragment; this container's "
     "public URL is scheme, host and port only (e.g. \"https://HOST:8443\"): its services are served below it at "
     "/wsrf/services/NAME"),
    ("jobs", ("container", "public_url"), '"https://op@localhost:8443/wsrf/services"',
     "[container] public_url = 'https://op@localhost:8443/wsrf/services': it has a user name and a path; this "
     "container's public URL is scheme, host and port only (e.g. \"https://HOST:8443\"): its services are served "
     "below it at /wsrf/services/NAME"),
    ("repository", ("repository", "default_limit"), "0", "[repository] default_limit = 0: descriptors a page, 1 to 1000"),
    ("repository", ("repository", "upload_quota_bytes"), "-1", "[repository] upload_quota_bytes = -1: bytes, 1 or more"),
    ("repository", ("repository", "max_image_bytes"), "0", "[repository] max_image_bytes = 0: bytes, 1 or more"),
    ("repository", ("repository", "upload_max_age"), "-5", "[repository] upload_max_age = -5: seconds (0: kept), 0 or more"),
    ("repository", ("repository", "max_hold_seconds"), "0", "[repository] max_hold_seconds = 0: seconds, 1 or more"),
    ("repository", ("enforcement", "permit_ttl"), "-1",
     "[enforcement] permit_ttl = -1.0: seconds (0: not cached), 0 or more"),
    ("vmmanager", ("enforcement", "timeout"), "0", "[enforcement] timeout = 0.0: seconds, more than 0"),
    ("repository", ("enforcement", "authz_url"), '"not a url"',
     "[enforcement] authz_url = 'not a url': the Authorization service's URL, an https:// URL (e.g. "
     "\"https://HOST:8443/wsrf/services/...\")"),
    ("authz", ("authz", "slot_grace"), "-10", "[authz] slot_grace = -10: seconds, 0 or more"),
    ("authz", ("authz", "reload_interval"), "-1",
     "[authz] reload_interval = -1.0: seconds (0: only on SIGHUP, ReloadPolicy or an admin change), 0 or more"),
    ("vmmanager", ("vmmanager", "mac_prefix"), '"zz:00:00"',
     "[vmmanager] mac_prefix = 'zz:00:00': three hex octets, the first a unicast one (its lowest bit 0), "
     "e.g. \"52:54:00\""),
    ("vmmanager", ("vmmanager", "mac_prefix"), '"53:54:00"',
     "[vmmanager] mac_prefix = '53:54:00': three hex octets, the first a unicast one (its lowest bit 0), "
     "e.g. \"52:54:00\""),
    ("vmmanager", ("vmmanager", "gateway"), '"10.99.0.100"',
     "[vmmanager] gateway = '10.99.0.100': inside [vmmanager] lease_range 10.99.0.10-10.99.0.250 (a guest would be "
     "leased it) (expected a host address of 10.99.0.0/24 outside lease_range, e.g. \"10.99.0.1\")"),
    ("vmmanager", ("vmmanager", "gateway"), '"10.98.0.1"',
     "[vmmanager] gateway = '10.98.0.1': not inside [vmmanager] network 10.99.0.0/24 (expected a host address of "
     "10.99.0.0/24 outside lease_range, e.g. \"10.99.0.1\")"),
    ("vmmanager", ("vmmanager", "dns"), '["not-an-ip"]',
     "[vmmanager] dns: 'not-an-ip' is not an IP address (e.g. dns = [\"10.99.0.1\"])"),
    ("vmmanager", ("vmmanager", "repository"), '"localhost:29443"',
     "[vmmanager] repository = 'localhost:29443': the VMRepository service's URL, an https:// URL (e.g. "
     "\"https://HOST:8443/wsrf/services/...\")"),
    ("authz", ("authz", "audit_log"), '"nodir/sub/audit.log"', None),
])
def test_a_value_that_breaks_a_started_service_later_is_refused_at_start(grid_pki, tmp_path, service, key, value,
                                                                         message):
    changes = {key: value, **({("jobs", "owner"): f'"{grid_pki.alice.dn}"'} if service == "jobs" else {})}
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", changes), service=service)
    if message is None:      # the audit log's directory: named, and not made (a typo'd path is an error)
        message = (f"[authz] audit_log = 'nodir/sub/audit.log': no directory {tmp_path}/nodir/sub (give a file in an "
                   f"existing directory, or \"\" for <state_dir>/authz/audit.log)")
        assert not (tmp_path / "nodir").exists()
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: n3.toml: {message}\n"
    assert not (tmp_path / "state").exists()                # refused before any service opened its state


def test_an_audit_log_in_a_missing_directory_is_not_made_by_a_start_refused_for_its_policy(grid_pki, tmp_path):
    """trial14b V8: a start refused for its policy (a missing grid-mapfile) had made the audit log's directories."""
    (tmp_path / "policy.toml").write_text('[policy]\nadmins = []\n[groups.hep]\ngridmap = "missing.grid-mapfile"\n')
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("authz", "policy"): '"policy.toml"',
                                                                  ("authz", "audit_log"): '"logs/a/audit.log"'}),
              service="authz")
    assert r.returncode == 1 and "[authz] audit_log = 'logs/a/audit.log': no directory" in r.stderr, r.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("state_dir, message", [
    ("afile", "[container] state_dir = 'afile': not a directory"),
    ("afile/state", "[container] state_dir = 'afile/state': Not a directory"),
])
def test_a_state_dir_that_is_a_file_is_one_line(grid_pki, tmp_path, state_dir, message):
    """trial14b V12: a state_dir naming an existing file ended in a traceback (FileExistsError, cli.py private_state)."""
    (tmp_path / "afile").write_text("x")
    r = serve(tmp_path, node_toml(grid_pki, state_dir), service="repository")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: n3.toml: {message}\n"
    assert (tmp_path / "afile").read_text() == "x"


def test_a_public_url_of_scheme_host_and_port_is_taken_with_or_without_its_slash():
    from services.container.assemble import check_public_url
    for url in ("https://localhost:8443", "https://localhost:8443/", "http://10.77.0.10:8443", "https://[::1]:8443"):
        check_public_url(url)


@pytest.mark.parametrize("state_dir, message", [
    ("afile", "--state-dir 'afile': not a directory"),
    ("afile/state", "--state-dir 'afile/state': Not a directory"),
])
def test_a_state_dir_given_by_the_flag_is_named_as_the_flag(grid_pki, tmp_path, state_dir, message):
    """`--state-dir` overrides [container] state_dir: a value it gave that cannot be used is named as the flag, not as
    the configuration file's key (the file said nothing of it). Before: `n3.toml: [container] state_dir = 'afile': not
    a directory`."""
    (tmp_path / "afile").write_text("x")
    r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state"), "--state-dir", state_dir, service="repository")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == f"vmgrid: {message}\n"
    assert (tmp_path / "afile").read_text() == "x"
    assert not (tmp_path / "state").exists()                # the file's state_dir is not used either


def test_a_migration_port_another_process_holds_is_refused_before_any_state(grid_pki, tmp_path):
    """[vmmanager] migration_port held by another process: refused in the one line naming the key, before any state
    is made (the face listens where the node's URL names, and that host is known from the configuration: here the
    host certificate's name, localhost). Before: the refusal came from the node's start, after it had made its state
    directory and database and reconciled them."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        r = serve(tmp_path, node_toml(grid_pki, tmp_path / "state", {("vmmanager", "migration_port"): str(port)}))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert not (tmp_path / "state").exists(), r.stderr
    assert r.stderr == (f"vmgrid: n3.toml: [vmmanager] migration_port = {port}: the migration face cannot listen on "
                        f"it: Address already in use (another process listens on it: give a free port, or 0 for any)\n")
