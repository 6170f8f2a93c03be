"""The gsiftp:// URLs a container's GridFTP faces hand out name the host the host certificate names, as the
container's own service URLs do: a client checks the GridFTP server against that name, so a repository on a
machine whose certificate says central.example.org gave URLs naming localhost (its listening address), and
every registration from another machine was refused ("server certificate ... does not name localhost") until
[repository] gridftp_public_host was set. The configured names still win. Each service built is closed at the
test's end: a job service makes its own pids and memory cgroups (vmgrid-jobs-*) when it is built and removes them,
empty, when it is closed."""
from __future__ import annotations

import dataclasses

import pytest

from services.container.assemble import build_service
from services.jobs.config import JobsConfig
from services.vmrepository.config import RepositoryConfig
from tests.fixtures.grid import base_config


def config_with_host(grid_pki, tmp_path, name: str):
    grid_pki.issue_host(name)
    cfg = base_config(grid_pki, tmp_path / "state", 0)
    hosts = grid_pki.root / "hosts" / name
    cfg.security.host_cert, cfg.security.host_key = str(hosts / "hostcert.pem"), str(hosts / "hostkey.pem")
    return cfg


@pytest.fixture
def built():
    """build_service, each service it built closed at the test's end, and then no cgroup of a job service's (its
    pids and memory cgroups) left."""
    services = []

    def build(name: str, cfg):
        services.append(build_service(name, cfg))
        return services[-1]
    yield build
    cgroups = {p for s in services if hasattr(s, "jobs") for p in (s.jobs.pids_cgroup, s.jobs.memory.parent) if p}
    for service in reversed(services):
        service.close()
    assert not [str(p) for p in cgroups if p.exists()]


def test_the_repositorys_gsiftp_urls_name_the_host_certificates_host(grid_pki, tmp_path, built):
    cfg = config_with_host(grid_pki, tmp_path, "central.example.org")
    cfg.repository = RepositoryConfig(gridftp_port=0)
    assert built("repository", cfg).transfers.public_host == "central.example.org"
    cfg.repository = RepositoryConfig(gridftp_port=0, gridftp_public_host="files.example.org")
    assert built("repository", cfg).transfers.public_host == "files.example.org"


def test_the_job_services_gsiftp_urls_name_the_host_certificates_host(grid_pki, tmp_path, built):
    cfg = config_with_host(grid_pki, tmp_path, "jobs.example.org")
    cfg.jobs = JobsConfig(owner=grid_pki.alice.dn, gridftp_port=0)
    assert built("jobs", cfg).transfers.public_host == "jobs.example.org"
    cfg.jobs = dataclasses.replace(cfg.jobs, public_host="10.99.0.10")
    assert built("jobs", cfg).transfers.public_host == "10.99.0.10"
