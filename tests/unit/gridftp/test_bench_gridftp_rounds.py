"""bench/bench_gridftp.py's loopback part (issue 13 §5): the cases run in rounds in ABBA order, and the table
compares vmgrid with globus-url-copy both by the ratio of the medians and round by round, with the spread of each
case and the window's facts. The bench itself needs root and minutes; these check its arithmetic and order."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import bench_gridftp as bench  # noqa: E402


def test_each_round_runs_the_cases_in_the_reverse_order_of_the_one_before():
    cases = bench.loopback_cases("s" * 64, "b" * 64, goal_pair=False)
    assert cases[0][:2] == ("globus-url-copy", 1) and cases[1][:2] == ("vmgrid (blake3 known)", 1)
    assert cases[1][2] == ["--blake3", "b" * 64]
    orders = [bench.round_order(cases, i) for i in range(4)]
    assert orders[0] == cases and orders[2] == cases
    assert orders[1] == cases[::-1] and orders[3] == cases[::-1]
    # over two rounds the goal's pair runs once in each order: A B ... then ... B A
    first = [[c[:2] for c in o].index(("globus-url-copy", 1)) < [c[:2] for c in o].index(("vmgrid (blake3 known)", 1))
             for o in orders[:2]]
    assert first == [True, False]


def test_the_goal_pair_alone():
    assert [c[:2] for c in bench.loopback_cases("s" * 64, "b" * 64, goal_pair=True)] == \
        [("globus-url-copy", 1), ("vmgrid (blake3 known)", 1)]


def test_the_table_gives_medians_spreads_and_both_ratios():
    results = bench.Results()
    globus = [0.60, 0.75, 0.57, 0.70]
    vmgrid = [0.72, 0.58, 0.60, 0.66]
    for g, v in zip(globus, vmgrid):
        results.add("loopback", "globus-url-copy", 1, g, 0.7)
        results.add("loopback", "vmgrid (blake3 known)", 1, v, 0.9)
    results.loads = [1.5, 2.3]
    results.loopback_window = (1_800_000_000.0, 1_800_000_060.0)
    results.steal = 0.012
    text = "\n".join(bench.loopback_table(results, 1024))
    assert "4 rounds" in text and "ABBA" in text
    assert "2027-01-15 08:00:00-08:01:00 UTC" in text and "1.5-2.3" in text and "steal 1.2%" in text
    row = next(line for line in text.splitlines() if line.startswith("vmgrid (blake3 known)"))
    # median 0.63 s, fastest 0.58, slowest 0.72; globus' median 0.65 s: 1.03x; round by round 0.83-1.29, median 1.03
    assert "0.63s" in row and "0.58s" in row and "0.72s" in row
    assert "1.03x" in row
    ratios = bench.paired_ratios(globus, vmgrid)
    assert ratios == pytest.approx([0.60 / 0.72, 0.75 / 0.58, 0.57 / 0.60, 0.70 / 0.66])
    assert "(0.83-1.29)" in row
    assert "0.90s" in row       # the client's CPU
