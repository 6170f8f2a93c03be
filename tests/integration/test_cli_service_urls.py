"""Service URLs as a newcomer types them, against a local grid's processes (the Authorization service and the
VMRepository in one container, a VMManager node, a job service): a container's URL alone (https://HOST:PORT, with
or without /) works for every command, as it did for the job commands; another service's URL is refused in one
line naming which service it is and the path to give; a URL without a scheme says what to give. They used to end
in zeep's XMLSyntaxError, AttributeError "Service has no operation 'ListInstances'" or ValueError "No such
operation 'Deploy'", and `--url localhost:8444` in "refusing to load …/localhost:8444?wsdl"."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures.repository import bio_site

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with bio_site(tmp_path_factory.mktemp("urls"), image={"name": "e.qcow2", "fill": b"urls"}) as g:
        g.central = g.services_url.rsplit("/wsrf/services", 1)[0]        # https://localhost:PORT
        g.node = g.start_node("node1", {}).base_url
        alice = g.user("alice")
        g.jobs = g.start("jobs", ["jobs"], {"jobs": {"owner": alice.dn, "gridftp_port": -1}}).base_url
        g.env_extra = {"VMGRID_REPOSITORY": f"{g.central}/wsrf/services/VMRepositoryService",
                       "VMGRID_NODE": f"{g.node}/wsrf/services/VMManagerService",
                       "VMGRID_AUTHZ": f"{g.central}/wsrf/services/AuthorizationService"}
        yield g


def vmgrid(grid, *args, env=None):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**grid.env("alice"), **grid.env_extra, **(env or {})})


def ok(r) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def one_line(r, message: str) -> None:
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == f"vmgrid: {message}\n"


def test_a_containers_url_alone_names_its_service(grid):
    assert "bio" in ok(vmgrid(grid, "repo", "vos", "--url", grid.central))
    assert "bio" in ok(vmgrid(grid, "repo", "vos", "--url", grid.central + "/"))
    assert "bio" in ok(vmgrid(grid, "repo", "vos", "--url", grid.central + "/wsrf/services/"))
    assert "bio" in ok(vmgrid(grid, "repo", "vos", env={"VMGRID_REPOSITORY": grid.central}))
    ok(vmgrid(grid, "vm", "list", "--url", grid.node))
    ok(vmgrid(grid, "vm", "list", "--url", grid.node + "/"))
    ok(vmgrid(grid, "vm", "list", env={"VMGRID_NODE": grid.node}))
    ok(vmgrid(grid, "vm", "list", "--url", f"{grid.node}/wsrf/services/VMManagerService/"))
    assert "Permit" in ok(vmgrid(grid, "authz", "check", "me", "image.query", "vo=bio", "--url", grid.central))
    out = ok(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "by-base", "--url", grid.node + "/",
                    "--repository", grid.central, "--no-wait"))
    assert "by-base" in out
    assert "destroyed" in ok(vmgrid(grid, "vm", "destroy", "by-base", "--url", grid.node))


def test_another_services_url_is_refused_naming_it(grid):
    repo, node, jobs = (f"{grid.central}/wsrf/services/VMRepositoryService", f"{grid.node}/wsrf/services/VMManagerService",
                        f"{grid.jobs}/wsrf/services/JobService")
    one_line(vmgrid(grid, "vm", "list", "--url", repo),
             f"{repo} is the VMRepositoryService, not the VMManagerService: give the VMManagerService's URL "
             f"(https://HOST:PORT/wsrf/services/VMManagerService)")
    one_line(vmgrid(grid, "repo", "query", "name contains emboss", "--url", node),
             f"{node} is the VMManagerService, not the VMRepositoryService: give the VMRepositoryService's URL "
             f"(https://HOST:PORT/wsrf/services/VMRepositoryService)")
    one_line(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "nowhere", "--url", jobs),
             f"{jobs} is the JobService, not the VMManagerService: give the VMManagerService's URL "
             f"(https://HOST:PORT/wsrf/services/VMManagerService)")
    one_line(vmgrid(grid, "vm", "deploy", "bio/debian12-emboss", "nowhere", "--repository", node),
             f"{node} is the VMManagerService, not the VMRepositoryService: give the VMRepositoryService's URL "
             f"(https://HOST:PORT/wsrf/services/VMRepositoryService)")
    one_line(vmgrid(grid, "authz", "check", "me", "image.query", "--url", repo),
             f"{repo} is the VMRepositoryService, not the AuthorizationService: give the AuthorizationService's URL "
             f"(https://HOST:PORT/wsrf/services/AuthorizationService)")
    one_line(vmgrid(grid, "job", "list", node),
             f"{node} is the VMManagerService, not the JobService: give the JobService's URL "
             f"(https://HOST:PORT/wsrf/services/JobService)")
    assert "nowhere" not in ok(vmgrid(grid, "vm", "list", "--all"))          # nothing was deployed


def test_another_containers_url_alone_says_what_that_container_serves(grid):
    """trial16 T9: the central container's URL alone given as a node's, a node's container as a job service's: the
    completed URL has no WSDL there, and the line was `no service answers at …/VMManagerService (HTTP 404 …)`. The
    container's index of services (GET /) is asked then, and the line names what it serves."""
    one_line(vmgrid(grid, "vm", "list", "--url", grid.central),
             f"{grid.central} is the container of the AuthorizationService (vmgrid authz … --url), the "
             f"VMRepositoryService (vmgrid repo … --url), not of a VMManagerService: check the VMManagerService's URL "
             f"($VMGRID_NODE, --url (--node for job commands))")
    one_line(vmgrid(grid, "job", "list", grid.node),
             f"{grid.node} is the container of the VMManagerService (vmgrid vm … --url, vmgrid job … --node), not of a "
             f"JobService: check the service's URL; to reach an instance's job service through its node, name the "
             f"instance: vmgrid job … NAME --node {grid.node}")
    one_line(vmgrid(grid, "repo", "vos", "--url", grid.jobs + "/"),
             f"{grid.jobs}/ is the container of the JobService (vmgrid job … JOBS_URL), not of a VMRepositoryService: "
             f"check the VMRepositoryService's URL ($VMGRID_REPOSITORY, --url)")


def test_a_url_without_a_scheme_or_that_serves_no_wsdl_says_what_to_give(grid):
    bare = grid.node.split("://", 1)[1]                  # localhost:PORT
    one_line(vmgrid(grid, "vm", "list", "--url", bare),
             f"'{bare}' is not a VMManagerService URL: give https://HOST:PORT/wsrf/services/VMManagerService "
             f"(or https://HOST:PORT); did you mean https://{bare}?")
    for bad in ("https://local host:8443", "https://localhost:99999"):       # a space, a port out of range
        one_line(vmgrid(grid, "vm", "list", "--url", bad),
                 f"'{bad}' is not a VMManagerService URL: give https://HOST:PORT/wsrf/services/VMManagerService "
                 f"(or https://HOST:PORT)")
    one_line(vmgrid(grid, "vm", "list", "--url", f"{grid.node}/nothing"),
             f"no service answers at {grid.node}/nothing (HTTP 404 for its WSDL): check the VMManagerService's URL "
             f"($VMGRID_NODE, --url (--node for job commands))")
    one_line(vmgrid(grid, "repo", "vos", "--url", "ftp://localhost/x"),
             "'ftp://localhost/x' is not a VMRepositoryService URL: give "
             "https://HOST:PORT/wsrf/services/VMRepositoryService (or https://HOST:PORT)")
    # the job commands complete a container's URL too (the container's index of services, text, is never asked)
    assert ok(vmgrid(grid, "job", "list", f"{grid.jobs}/wsrf/services")).startswith("KEY")
    # a published schema: XML, but no WSDL of a service
    schema = f"{grid.jobs}/wsrf/share/schema/jobs.xsd"
    one_line(vmgrid(grid, "job", "list", schema), f"{schema} is not a grid service: its ?wsdl answer describes no "
                                                  f"service; give https://HOST:PORT/wsrf/services/JobService")


def test_authz_check_of_a_short_name_says_to_give_a_dn_or_me(grid):
    alice = grid.user("alice").dn
    ou = alice.rpartition("/CN=")[0]
    one_line(vmgrid(grid, "authz", "check", "alice", "image.query", "vo=bio"),
             f"'alice' is not a DN: give a full DN, /O=.../CN=NAME (in your OU: {ou}/CN=alice), or `me` for your own")
    one_line(vmgrid(grid, "authz", "groups", "bob"),
             f"'bob' is not a DN: give a full DN, /O=.../CN=NAME (in your OU: {ou}/CN=bob), or `me` for your own")
    assert "Permit" in ok(vmgrid(grid, "authz", "check", alice, "image.query", "vo=bio"))


def test_authz_check_of_an_amount_given_as_a_resource_attribute_says_to_give_it_as_context(grid):
    """`memory=4096` beside the resource attributes was taken as one, so the decision's memory limit went unchecked
    and the check answered Permit; it is an amount the request asks for: -C memory=4096."""
    one_line(vmgrid(grid, "authz", "check", "me", "vm.deploy", "type=image", "vo=bio", "memory=4096"),
             "memory=4096 is an amount the request asks for, checked against the decision's limits, not a resource "
             "attribute: give it as -C memory=4096")


def test_a_url_whose_wsdl_answer_is_a_web_page_is_one_line(grid):
    """A web server that is no grid container (here a plain HTTP one answering every GET with a text that is no XML)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"It works! (not XML)"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/wsrf/services/JobService"
        r = vmgrid(grid, "job", "list", url)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"vmgrid: {url} is not a grid service: its ?wsdl answer is not a WSDL ("), r.stderr
        assert r.stderr.endswith("); give https://HOST:PORT/wsrf/services/NAME\n") and r.stderr.count("\n") == 1
    finally:
        server.shutdown()
        server.server_close()
