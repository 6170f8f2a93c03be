"""`vmgrid demo --real`'s last line and report.md's Timings: the total is the whole run, the image's build included
(trial14b V11: `done in 203.0 s (image built)` after a 356.2 s build, report.md's `total 203.0` below `image build
356.2`)."""
from __future__ import annotations

import re

from client.demo_real import finish_timings, write_report


def test_the_total_includes_the_image_build_and_the_grids_part_is_named(tmp_path):
    timings = {"image build": 356.2, "register": 7.6, "deploy to ready (all 3)": 63.4, "jobs (6, submit to fetched)": 81.0}
    line = finish_timings(timings, "built", 356.2, grid_seconds=203.0, total_seconds=559.2)
    assert line == "done in 559.2 s (image built in 356.2 s, the grid's part 203.0 s)"
    write_report(tmp_path, {"timings": timings, "instances": {}}, [])
    rows = dict(re.findall(r"^\| ([^|]+) \| ([0-9.]+) \|$", (tmp_path / "report.md").read_text(), re.M))
    assert rows["total (the image included)"] == "559.2" and rows["the grid (register to destroyed)"] == "203.0"
    assert "total" not in rows                                   # no "total" smaller than one of its parts
    assert float(rows["total (the image included)"]) >= max(float(v) for k, v in rows.items() if not k.startswith("total"))
    cached = finish_timings({}, "cached", 0.4, grid_seconds=203.0, total_seconds=204.1)
    assert cached == "done in 204.1 s (image from the cache in 0.4 s, the grid's part 203.0 s)"
