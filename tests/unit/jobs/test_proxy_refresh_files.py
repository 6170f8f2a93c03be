"""RefreshJobProxy writes the new proxy under a temporary name of its own (attack14, Observations): two refreshes of
one job at once each replace the kept proxy whole (one fixed `delegated-proxy.pem.new`, opened with O_TRUNC, let the
second write into the first's file, and the first's rename then failed: InternalFault)."""
from __future__ import annotations

import os

import pytest

from services.jobs.manager import DELEGATED_PROXY
from services.jobs.store import JobSpec, StageOut
from tests.unit.jobs.test_manager import OWNER, PY, delegated, manager, shut

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the job service runs as root")


def test_two_refreshes_of_one_job_at_once_each_write_a_file_of_their_own(tmp_path, grid_pki, monkeypatch):
    m = manager(tmp_path / "state", grid_pki)
    try:
        spec = JobSpec(PY, ("-c", "import time; time.sleep(300)"),
                       stage_out=(StageOut("r.txt", "gsiftp://localhost:1/results/r.txt"),))
        job = m.submit(OWNER, spec, delegated(grid_pki))
        first, second = delegated(grid_pki), delegated(grid_pki)
        real, nested = os.replace, []

        def replace(src, dst, *args, **kwargs):
            if not nested and os.path.basename(dst) == DELEGATED_PROXY:      # another refresh comes in between
                nested.append("under way")
                m.refresh_proxy(OWNER, job.key, second)
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        m.refresh_proxy(OWNER, job.key, first)
        monkeypatch.undo()
        assert nested
        control = m.control_dir / job.key
        assert (control / DELEGATED_PROXY).read_bytes() == first          # the last one replaced, whole
        assert not [n for n in os.listdir(control) if n.endswith(".new")]
        assert oct(os.stat(control / DELEGATED_PROXY).st_mode & 0o777) == "0o600"
    finally:
        shut(m)
