"""`vmgrid report`: instances that arrived by migration get a migration phase table of their own; the
deployment table (and figure) keep to deployments."""
from __future__ import annotations

import io

from client.report import Deployment, phase_table, print_report
from services.vmmanager.states import MIGRATION_PHASES


def test_migrations_are_reported_beside_deployments_not_mixed_in():
    deployed = Deployment("a@node1", (("authorize", 0.01), ("register", 0.02), ("stage", 1.0)))
    migrated = Deployment("b@node2", tuple((p, 0.5) for p in MIGRATION_PHASES))
    out = io.StringIO()
    print_report([deployed, migrated], out)
    text = out.getvalue()
    assert "1 deployment(s)" in text and "1 migration(s)" in text
    deploy_part, migration_part = text.split("1 migration(s)")
    assert "\nauthorize " in deploy_part and "0.0100" in deploy_part and "0.5000" not in deploy_part
    assert [line.split()[0] for line in migration_part.splitlines()[2:]] == [*MIGRATION_PHASES, "total"]
    assert [r[0] for r in phase_table([migrated], MIGRATION_PHASES)] == list(MIGRATION_PHASES)
