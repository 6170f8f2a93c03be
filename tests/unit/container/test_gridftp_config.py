"""[gridftp]: the services' GridFTP servers' bounds on sessions, as docs/configuration.md writes them, and what
serve hands each server (services.container.assemble.gridftp_options)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from services.container.assemble import gridftp_options
from services.container.config import Config, GridFTPConfig, load_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_the_documented_gridftp_section_is_the_configs_and_loads(tmp_path):
    section = re.search(r"^\[gridftp\].*?(?=^\[|^```)", DOC.read_text(), re.S | re.M).group(0)
    for f in dataclasses.fields(GridFTPConfig):
        if f.default is None:                       # not given: derived from max_sessions (a comment names it)
            assert re.search(rf"^# {f.name} ", section, re.M), f.name
        else:
            line = re.search(rf"^{f.name} = (\S+)", section, re.M)
            value = line and (line.group(1).strip('"') if isinstance(f.default, str) else float(line.group(1)))
            assert line and value == f.default, f"[gridftp] {f.name} in docs/configuration.md"
    (tmp_path / "c.toml").write_text(section)
    assert load_config(tmp_path / "c.toml").gridftp == GridFTPConfig()


def test_the_options_carry_the_keys_given_and_the_sites_guests():
    cfg = Config()
    assert gridftp_options(cfg) == {"max_sessions": 64, "transfer_idle_timeout": 60.0, "passive_per_identity": 2,
                                    "passive_wait": 10.0, "guests": ["/O=Grid/OU=vmgrid-guests/*", "/O=Grid/OU=vmgrid-guests/*"]}
    cfg.gridftp = GridFTPConfig(max_sessions=32, max_sessions_per_address=4)
    cfg.vmmanager.guest_ou, cfg.vmmanager.guest_dns = "site-guests", []
    assert gridftp_options(cfg) == {"max_sessions": 32, "max_sessions_per_address": 4, "transfer_idle_timeout": 60.0,
                                    "passive_per_identity": 2, "passive_wait": 10.0, "guests": ["/O=Grid/OU=site-guests/*"]}
