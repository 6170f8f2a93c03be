"""Load with faults (issues 9 and 16): clients deploying, pausing and destroying on two test-driver nodes while
a seeded schedule SIGKILLs a node (once right after the repository granted an image hold), the central process
(once while a node stages an image over GridFTP) and restarts them. Afterwards every invariant holds: image
holds and authorization slots are exactly the live instances', no orphan lease or overlay, no instance in a
transitional state or known to two nodes, every image hashes to its sha256, the audit chain is intact and no
release is left pending. Bounded: 30 s of load plus the restarts (about two minutes on a busy 2-core
machine). The hypervisor's domains are counted through each node's ListDomains (a site admin's call: the test
driver's domains live inside the node process): no orphan domain and no live Running/Paused instance
without its domain, on the node that stays up around each node fault, on the restarted one once back, and on
both at the end. tests/integration/test_node_domains.py shows the same count seeing a stray domain and a
vanished one."""
from __future__ import annotations

import pytest

from tests.fixtures.chaos import FAULTS, ChaosGrid, run_load

pytestmark = pytest.mark.timeout(600)


def test_load_with_faults_keeps_every_invariant(tmp_path):
    cg = ChaosGrid(tmp_path / "chaos")
    try:
        run = run_load(cg, clients=4, seconds=30, seed=16, faults=True, fault_every=4)
    finally:
        cg.close()
    print(dict(run.operations), dict(run.errors), dict(run.faults), run.invariants)
    assert set(run.faults) == set(FAULTS)
    assert run.operations["deploy"] > 0 and run.operations["destroy"] > 0
    violations = {k: v for k, v in run.invariants.items() if k != "live instances" and v}
    assert violations == {}
