"""A configuration value outside its key's choices is refused when the file is loaded, naming the file and the
key: before anything starts (a node with nic_kind = "brigde" used to start, serve, stage an image and only then
fail the deployment)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.container.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("section, key, value", [
    ("vmmanager", "vmm", "tset"), ("vmmanager", "nic_kind", "brigde"), ("container", "tls_client_certs", "yes"),
    ("container", "log_level", "verbose")])
def test_a_value_outside_the_keys_choices_is_refused_naming_the_file_and_key(tmp_path, section, key, value):
    path = tmp_path / "node.toml"
    path.write_text(f'[{section}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError, match=rf"node.toml: {section}\.{key}: '{value}' is not one of"):
        load_config(path)


def test_the_choices_accept_every_documented_value(tmp_path):
    path = tmp_path / "node.toml"
    for vmm in ("test", "qemu"):
        for nic in ("user", "network", "bridge"):
            path.write_text(f'[vmmanager]\nvmm = "{vmm}"\nnic_kind = "{nic}"\n[container]\nlog_level = "INFO"\n'
                            f'tls_client_certs = "optional"\n')
            config = load_config(path)
            assert (config.vmmanager.vmm, config.vmmanager.nic_kind) == (vmm, nic)


def test_serve_says_it_on_one_line_and_starts_nothing(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f'[container]\nstate_dir = "{tmp_path / "state"}"\n[vmmanager]\nvmm = "tset"\n')
    r = subprocess.run([str(REPO / ".venv/bin/vmgrid"), "serve", "vmmanager", "-c", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == f"vmgrid: {path}: vmmanager.vmm: 'tset' is not one of 'test', 'qemu'"
    assert not (tmp_path / "state").exists()
