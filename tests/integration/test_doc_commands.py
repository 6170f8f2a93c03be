"""Commands of README.md and docs/ that no other test runs as written, run here as written.

- docs/security.md's grid CA block, by bash -e, in a mount namespace of its own (`unshare --mount`) where
  /var/lib is an empty tmpfs and HOME a temporary directory: the block's own paths (/var/lib/vmgrid/ca,
  ~/.globus) as a reader types them, and nothing of this machine's touched. Then its section "Names"'s
  refused name (`vmgrid ca user "x/CN=host/localhost"`), as written, with the message the doc gives.
- docs/authz.md's "Running it" block (each container as written, in a network namespace of its own) and its
  `vmgrid authz check me ...` example, as alice (a member of bio) against a live Authorization
  service (VMGRID_AUTHZ set, as the doc's "--url" line says).
- The test-suite commands the docs show (`./run.sh test ...`, `.venv/bin/python -m pytest ...`): running them
  here would run the suite inside itself (the QEMU tier's take minutes and their own lock), so each runs as
  written with `--collect-only -q` appended: its paths name tests that exist and pytest takes its options. A
  synopsis (`./run.sh test ARGS`: a word in capitals) is not a command and is skipped.
- docs/jobs.md's `vmgrid serve jobs -c jobs.toml` with the doc's example configuration as written (its
  /var/lib/vmgrid, /etc/grid-security, ports 8443 and 2812), in mount and network namespaces of its own.
- README's `./run.sh setup` (its first block's `./run.sh demo` runs in tests/integration/test_demo.py).
- docs/images.md's recipe example, saved as blast.toml, and its block (the file it names made, `vmgrid image check
  blast.toml`), and the one-line error the doc quotes for that file missing.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from client.localgrid import LocalGrid
from services.authz.edit import site_policy
from services.authz.policy import Group
from tests.fixtures.namespaces import can_unshare, vmgrid_command

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def marked_block(doc: Path, containing: str, test: str = "tests/integration/test_doc_commands.py") -> str:
    """The sh block of ``doc`` marked as run as written by ``test`` that holds ``containing``."""
    blocks = re.findall(r"<!-- run as written by " + re.escape(test) + r"[^>]*-->\n```sh\n(.*?)```", doc.read_text(),
                        re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{doc.relative_to(ROOT)} lost its block with {containing!r} run as written by {test}"
    return found[0]


def vmgrid_on_path(tmp_path: Path) -> Path:
    """A directory with `vmgrid`, this checkout's command line."""
    return vmgrid_command(tmp_path / "bin")


@pytest.mark.skipif(not can_unshare("--mount"), reason="needs `unshare --mount` (root): the block writes "
                                                        "/var/lib/vmgrid/ca, which must be a private tmpfs")
def test_the_ca_commands_of_docs_security_md_run_as_written(tmp_path):
    block = marked_block(ROOT / "docs" / "security.md", "vmgrid ca init")
    had_var_lib_vmgrid = Path("/var/lib/vmgrid").exists()
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "block.sh").write_text(block)
    # the section "Names": `vmgrid ca user "x/CN=host/localhost"` is `vmgrid: user name ... contains '/', '='`
    names = re.search(r"\(`(vmgrid ca user [^`]+)` is `vmgrid: (user name) \.\.\. (contains [^`]+)`\)",
                      (ROOT / "docs" / "security.md").read_text().replace("\n", " "))
    assert names, "docs/security.md lost its refused-name example"
    (tmp_path / "names.sh").write_text(names.group(1) + "\n")
    # /var/lib: an empty tmpfs in this namespace only; the block, unchanged, then runs by bash -e; then the
    # refused name, as written, in the block's environment (its VMGRID_CA_DIR)
    script = (f"mount -t tmpfs vmgrid-doc /var/lib && exec bash -c 'set -e; . {tmp_path / 'block.sh'}; set +e; "
              f". {tmp_path / 'names.sh'} 2>{tmp_path / 'names.err'}; echo $? >{tmp_path / 'names.rc'}'")
    env = {"PATH": f"{vmgrid_on_path(tmp_path)}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert Path("/var/lib/vmgrid").exists() == had_var_lib_vmgrid       # the machine's /var/lib untouched
    # what the block promises: the user's credential in ~/.globus (0600 key), revoked, and listed
    assert (home / ".globus" / "usercert.pem").is_file()
    assert (home / ".globus" / "userkey.pem").stat().st_mode & 0o777 == 0o600
    listed = r.stdout.splitlines()
    assert any("CN=host/node1.example.org" in ln for ln in listed), r.stdout
    assert any("CN=alice" in ln and "revoked" in ln.lower() for ln in listed), r.stdout
    refused = (tmp_path / "names.err").read_text()
    assert (tmp_path / "names.rc").read_text().strip() == "1", refused
    assert refused.startswith(f"vmgrid: {names.group(2)} ") and names.group(3) in refused, refused


def test_the_authz_check_example_of_docs_authz_md_runs_as_written(tmp_path):
    block = marked_block(ROOT / "docs" / "authz.md", "vmgrid authz check")
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmgrid authz check me "), block
    with LocalGrid(tmp_path / "grid") as grid:
        admin, alice = grid.user("admin"), grid.user("alice")
        (tmp_path / "ingest").mkdir()
        grid.start_central(site_policy(admins=[admin.dn], groups=[Group("bio", members=(alice.dn,))]),
                           tmp_path / "ingest")
        env = {**grid.env("alice"), "VMGRID_AUTHZ": f"{grid.services_url}/AuthorizationService",
               "PATH": f"{vmgrid_on_path(tmp_path)}:/usr/bin:/bin"}
        r = subprocess.run(["bash", "-e", "-c", block], env=env, capture_output=True, text=True, timeout=120)
        # a member of bio may deploy a bio image (whoever owns it) within the site's memory limit
        assert r.returncode == 0 and "Permit" in r.stdout, f"{r.returncode}\n{r.stdout}\n{r.stderr}"
        over = subprocess.run(["bash", "-e", "-c", block.replace("memory=4096", "memory=999999")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert over.returncode == 3, f"{over.stdout}\n{over.stderr}"       # the exit status the synopsis gives


TEST_COMMAND = re.compile(r"(?:\.venv/bin/python -m pytest|\./run\.sh test)(?: [^`\n#|]*)?")


def documented_test_commands() -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in TEST_COMMAND.finditer(line):
                seen.setdefault(m.group(0).strip(), f"{doc.relative_to(ROOT)}:{n}")
    return sorted((where, cmd) for cmd, where in seen.items())


TESTS = documented_test_commands()


def test_the_docs_show_their_test_commands():
    shown = {cmd for _, cmd in TESTS}
    assert {"./run.sh test", ".venv/bin/python -m pytest tests/vm -q"} <= shown, shown


@pytest.mark.parametrize("where,command", TESTS, ids=[c for _, c in TESTS])
def test_a_documented_test_command_collects_tests_as_written(where, command):
    if re.search(r"\b[A-Z]{2,}\b", command):
        pytest.skip("a synopsis (a word in capitals), not a command")
    r = subprocess.run(f"{command} --collect-only -q", shell=True, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{where}: `{command}`\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # "N tests collected" (-q), or a line "FILE: N" per test file (-q given twice)
    counts = re.findall(r"(\d+) tests? collected", r.stdout) or re.findall(r"^\S+\.py: (\d+)$", r.stdout, re.M)
    assert sum(map(int, counts)) > 0, f"{where}: `{command}` collects nothing:\n{r.stdout[-2000:]}"


@pytest.mark.skipif(not can_unshare("--net"), reason="needs `unshare --net` (root): the doc's containers take "
                                                          "the site's fixed port 8443")
def test_the_serve_commands_of_docs_authz_md_run_as_written(tmp_path):
    """docs/authz.md's "Running it": the Authorization service in its own container, a repository asking it over
    SOAP from another, then both in one container. Each line as written (its comment aside), in a network
    namespace of its own (port 8443 is the site's); site.toml and repo.toml are the test's (the doc names them,
    docs/configuration.md has their keys). Alice then lists her VOs from each repository: an answer means the
    repository asked the Authorization service and was answered."""
    from client.localgrid import write_toml

    block = marked_block(ROOT / "docs" / "authz.md", "vmgrid serve authz")
    own, repository, both = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert own == "vmgrid serve authz -c site.toml" and both == "vmgrid serve authz repository -c site.toml", block
    grid = LocalGrid(tmp_path / "grid")
    admin, alice = grid.user("admin"), grid.user("alice")
    site = tmp_path / "site"
    site.mkdir()
    (site / "policy.toml").write_text(site_policy(admins=[admin.dn], groups=[Group("bio", members=(alice.dn,))]))
    security = {"cert_dir": str(grid.cert_dir), "host_cert": str(grid.host_dir / "hostcert.pem"),
                "host_key": str(grid.host_dir / "hostkey.pem")}
    authz_url = "https://localhost:8443/wsrf/services/AuthorizationService"
    write_toml(site / "site.toml", {"container": {"port": 8443, "state_dir": "state/site"}, "security": security,
                                    "authz": {"policy": "policy.toml"}, "enforcement": {"authz_url": authz_url},
                                    "repository": {"gridftp_port": 0}})
    write_toml(site / "repo.toml", {"container": {"port": 8444, "state_dir": "state/repo"}, "security": security,
                                    "enforcement": {"authz_url": authz_url}, "repository": {"gridftp_port": 0}})

    def serve(command: str, log: str) -> str:
        return (f"{command} > {log} 2>&1 & PIDS=\"$PIDS $!\"\n"
                f"for i in $(seq 600); do grep -qs 'vmgrid: serving' {log} && break; kill -0 $! || exit 9; "
                f"sleep 0.1; done\n")

    def vos(port: int, out: str) -> str:
        return f"vmgrid repo vos --url https://localhost:{port}/wsrf/services/VMRepositoryService > {out}\n"

    script = ("set -e\nip link set lo up\ntrap 'kill $PIDS 2>/dev/null; wait' EXIT\nPIDS=\n"
              + serve(own, "own.log") + serve(repository, "repo.log") + vos(8444, "vos-apart.txt")
              + "kill $PIDS; wait $PIDS || true\nPIDS=\n"
              + serve(both, "both.log") + vos(8443, "vos-both.txt"))
    env = {**grid.env("alice"), "PATH": f"{vmgrid_on_path(tmp_path)}:/usr/sbin:/sbin:/usr/bin:/bin"}
    r = subprocess.run(["unshare", "--net", "bash", "-c", script], cwd=site, env=env, capture_output=True,
                       text=True, timeout=300)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in site.glob("*.log"))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert "vmgrid: serving AuthorizationService" in (site / "own.log").read_text()
    assert "vmgrid: serving VMRepositoryService" in (site / "repo.log").read_text()
    assert "vmgrid: serving AuthorizationService, VMRepositoryService" in (site / "both.log").read_text()
    for answer in ("vos-apart.txt", "vos-both.txt"):
        assert (site / answer).read_text().splitlines()[0].split() == ["VO", "IMAGES"], answer
    audit = (site / "state" / "site" / "authz" / "audit.log").read_text()
    assert audit.count(alice.dn) >= 2, audit[-2000:]          # asked about alice by each repository


def test_the_readmes_set_up_command_runs_as_written():
    """README's `./run.sh setup`, as written from the checkout's root: this checkout is set up already (the
    test runs in its .venv), so it checks what is installed and returns in seconds."""
    assert "`./run.sh setup`" in (ROOT / "README.md").read_text()
    r = subprocess.run("./run.sh setup", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (ROOT / ".venv" / "bin" / "vmgrid").is_file()


@pytest.mark.skipif(not (can_unshare("--mount") and can_unshare("--net")),
                    reason="needs `unshare --mount --net` (root): the doc's configuration uses /var/lib/vmgrid, "
                           "/etc/grid-security and the fixed ports 8443 and 2812")
def test_the_job_service_of_docs_jobs_md_runs_as_written_with_the_docs_configuration(tmp_path):
    """docs/jobs.md's "Running the service": `vmgrid serve jobs -c jobs.toml` as written, jobs.toml being the doc's
    example as written (its state in /var/lib/vmgrid, the host credential where a site keeps it,
    /etc/grid-security, ports 8443 and 2812). In mount and network namespaces of the test's own: /etc is an
    overlay whose changes stay in tmp_path, /var/lib and /var/log are empty tmpfs. The doc's owner, alice of
    mysite, then runs a job on it."""
    doc = (ROOT / "docs" / "jobs.md").read_text()
    block = marked_block(ROOT / "docs" / "jobs.md", "vmgrid serve jobs")
    example = re.search(r"```toml\n(\[container\].*?)```", doc, re.S)
    assert example, "docs/jobs.md lost its configuration example"
    (command,) = [ln for ln in block.splitlines() if ln.strip()]
    assert command == "vmgrid serve jobs -c jobs.toml", command
    work = tmp_path / "work"
    work.mkdir()
    (work / "jobs.toml").write_text(example.group(1))
    for d in ("etc-upper", "etc-work"):
        (tmp_path / d).mkdir()
    url = "https://localhost:8443/wsrf/services/JobService"
    script = f"""set -e
ip link set lo up
mount -t overlay vmgrid-doc-etc -o lowerdir=/etc,upperdir={tmp_path}/etc-upper,workdir={tmp_path}/etc-work /etc
mount -t tmpfs vmgrid-doc-lib /var/lib
mount -t tmpfs vmgrid-doc-log /var/log
vmgrid ca init --dir ca --dn "/O=Grid/OU=mysite/CN=mysite CA" > /dev/null
vmgrid ca host localhost --dir ca --ou mysite --out /etc/grid-security > /dev/null
mkdir -p /etc/grid-security/certificates && cp ca/certificates/* /etc/grid-security/certificates/
vmgrid ca user alice --dir ca --ou mysite --out alice > /dev/null
vmgrid proxy-init -q -cert alice/usercert.pem -key alice/userkey.pem -out alice/proxy.pem
{command} > serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait' EXIT
for i in $(seq 600); do grep -qs 'vmgrid: serving' serve.log && break; kill -0 $SERVE; sleep 0.1; done
export X509_USER_PROXY=alice/proxy.pem X509_CERT_DIR=ca/certificates
JOB=$(vmgrid job submit {url} -- echo from the doc)
vmgrid job wait {url} "$JOB"
vmgrid job status {url} "$JOB"
ls /var/lib/vmgrid > state.txt
PROBE=$(vmgrid job submit {url} -- sh -c 'id -u; cat /etc/grid-security/hostkey.pem; ls /var/lib/vmgrid/jobs; cat /var/lib/vmgrid/jobs/jobs.sqlite; true')
vmgrid job wait {url} "$PROBE"
vmgrid job get {url} "$PROBE" -o probe > /dev/null
"""
    env = {"PATH": f"{vmgrid_on_path(tmp_path)}:/usr/sbin:/sbin:/usr/bin:/bin", "HOME": str(tmp_path),
           "LANG": "C.UTF-8"}
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--net", "bash", "-c", script],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    log = (work / "serve.log").read_text() if (work / "serve.log").exists() else ""
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n--- serve.log\n{log[-3000:]}"
    assert "vmgrid: serving JobService" in log and "from the doc" in r.stdout and "Done" in r.stdout, r.stdout
    assert (work / "state.txt").read_text().strip(), "the service kept no state in /var/lib/vmgrid"
    # alice's job runs as a uid of her own, not the service's root: the host's key and the service's state are out
    # of its reach (docs/jobs.md "Running the service")
    out, err = (work / "probe" / "stdout").read_text(), (work / "probe" / "stderr").read_text()
    assert int(out.split()[0]) >= 900000 and "PRIVATE KEY" not in out and "jobs.sqlite" not in out, out
    assert err.count("Permission denied") == 3, err
    assert not (tmp_path / "etc-upper").joinpath("passwd").exists()        # /etc itself untouched


def test_the_recipe_example_of_docs_images_md_is_checked_as_written(tmp_path):
    """docs/images.md's "Writing a recipe": the example saved as blast.toml where the doc says (the checkout: its
    guestd/ here a symlink), then the doc's block by bash -e: the file the recipe names is made from the emboss
    template and `vmgrid image check` prints the recipe with every default, the file resolved beside it. Without
    that file, the check is the one-line error the doc quotes."""
    doc = (ROOT / "docs" / "images.md").read_text()
    example = re.search(r"## Writing a recipe\n\n```toml\n(.*?)```", doc, re.S)
    assert example, "docs/images.md lost its recipe example"
    block = marked_block(ROOT / "docs" / "images.md", "vmgrid image check blast.toml")
    (tmp_path / "guestd").symlink_to(ROOT / "guestd")
    (tmp_path / "blast.toml").write_text(example.group(1))
    env = {"PATH": f"{vmgrid_on_path(tmp_path)}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    missing = subprocess.run(["bash", "-c", "vmgrid image check blast.toml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    quoted = re.search(r"\(`(vmgrid: blast\.toml:\s+files\.'[^']+': )\.\.\.(/blast/jobs\.toml is not a file)`\)", doc)
    assert quoted, "docs/images.md lost its missing-file error"
    assert missing.returncode == 1 and missing.stderr.startswith(" ".join(quoted.group(1).split())), missing.stderr
    assert missing.stderr.rstrip().endswith(quoted.group(2)), missing.stderr
    r = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    shown = dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert shown["name"] == "debian12-blast" and shown["disk_mib"] == "2048" and shown["vmgrid_runtime"] == "True"
    assert str(tmp_path / "blast" / "jobs.toml") in shown["files"], r.stdout
