"""The gsiftp:// URLs a container's GridFTP faces hand out name the host the host certificate names, as the
container's own service URLs do: a client checks the GridFTP server against that name, so a repository on a
machine whose certificate says central.example.org gave URLs naming localhost (its listening address), and
every registration from another machine was refused ("server certificate ... does not name localhost") until
[repository] gridftp_public_host was set. The configured names still win."""
from __future__ import annotations

import dataclasses

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


def test_the_repositorys_gsiftp_urls_name_the_host_certificates_host(grid_pki, tmp_path):
    cfg = config_with_host(grid_pki, tmp_path, "central.example.org")
    cfg.repository = RepositoryConfig(gridftp_port=0)
    assert build_service("repository", cfg).transfers.public_host == "central.example.org"
    cfg.repository = RepositoryConfig(gridftp_port=0, gridftp_public_host="files.example.org")
    assert build_service("repository", cfg).transfers.public_host == "files.example.org"


def test_the_job_services_gsiftp_urls_name_the_host_certificates_host(grid_pki, tmp_path):
    cfg = config_with_host(grid_pki, tmp_path, "jobs.example.org")
    cfg.jobs = JobsConfig(owner=grid_pki.alice.dn, gridftp_port=0)
    assert build_service("jobs", cfg).transfers.public_host == "jobs.example.org"
    cfg.jobs = dataclasses.replace(cfg.jobs, public_host="10.99.0.10")
    assert build_service("jobs", cfg).transfers.public_host == "10.99.0.10"
