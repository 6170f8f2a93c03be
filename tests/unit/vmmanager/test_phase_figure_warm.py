"""The poster's phase figure (client/report.py) with warm-snapshot deploys: a ``restore`` phase in place of
power-on and guest-ready, beside cold deploys, in the table and the PNG."""
from __future__ import annotations

import io

from client.report import Deployment, draw, phase_table, print_report
from services.vmmanager.states import COLD_PHASES, PHASES, WARM_PHASES

COLD = Deployment("cold", tuple((p, 1.0) for p in COLD_PHASES))
WARM = Deployment("warm", tuple((p, 0.5) for p in WARM_PHASES))


def test_restore_is_a_phase_of_its_own_in_the_order():
    assert "restore" in WARM_PHASES and "restore" not in COLD_PHASES
    assert {"power-on", "guest-ready"} & set(WARM_PHASES) == set()
    assert list(PHASES).index("context") < list(PHASES).index("restore") < list(PHASES).index("power-on")


def test_the_table_and_the_figure_show_restore_beside_the_cold_phases(tmp_path):
    rows = {name: (mean, share) for name, mean, _, share in phase_table([COLD, WARM])}
    assert rows["restore"] == (0.5, 100 * 0.5 / (COLD.total + WARM.total))
    assert rows["guest-ready"][0] == 1.0
    out = io.StringIO()
    print_report([WARM], out)
    assert "restore" in out.getvalue() and "guest-ready" not in out.getvalue()
    png = draw([COLD, WARM], tmp_path / "phases.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
