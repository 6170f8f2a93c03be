"""Load with and without faults, side by side (issue 16): the same seeded client load on a local grid (two
test-driver nodes, the central process), once quiet and once while a node, the central process and a GridFTP
transfer are SIGKILLed and restarted. Prints operations, errors by type after retries, latency p50/p95 per
operation and each invariant's count of violations (all 0 on a consistent grid), the nodes' orphan domains and
Running/Paused instances without a domain among them (each node's ListDomains, as a site admin).

    .venv/bin/python bench/bench_chaos.py                 # --clients 20 --seconds 90 --seed 16 --fault-every 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.chaos import ChaosGrid, Run, percentile, run_load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--fault-every", type=float, default=8)
    ap.add_argument("--retries", type=int, default=6)
    args = ap.parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs: dict[str, Run] = {}
    for label, faults in (("quiet", False), ("faults", True)):
        with tempfile.TemporaryDirectory(prefix="vgchaos-") as root:
            cg = ChaosGrid(Path(root) / "grid")
            try:
                runs[label] = run_load(cg, clients=args.clients, seconds=args.seconds, seed=args.seed,
                                       faults=faults, retries=args.retries, fault_every=args.fault_every)
            finally:
                cg.close()
    quiet, faulty = runs["quiet"], runs["faults"]
    print(f"\n{args.clients} clients, {args.seconds:g} s, seed {args.seed}; faults injected: "
          f"{dict(faulty.faults)}")
    print(f"\n{'operations':<44}{'quiet':>10}{'faults':>10}")
    for op in sorted(set(quiet.operations) | set(faulty.operations)):
        print(f"  {op:<42}{quiet.operations[op]:>10}{faulty.operations[op]:>10}")
    print(f"\n{'errors after retries':<44}{'quiet':>10}{'faults':>10}")
    for err in sorted(set(quiet.errors) | set(faulty.errors)) or ["(none)"]:
        print(f"  {err:<42}{quiet.errors[err]:>10}{faulty.errors[err]:>10}")
    print(f"\n{'latency (s)':<32}{'quiet p50':>12}{'p95':>8}{'faults p50':>12}{'p95':>8}{'p95 ratio':>10}")
    for op in sorted(set(quiet.latencies) | set(faulty.latencies)):
        q, f = quiet.latencies.get(op, []), faulty.latencies.get(op, [])
        ratio = percentile(f, 95) / percentile(q, 95) if q and f else float("nan")
        print(f"  {op:<30}{percentile(q, 50):>12.3f}{percentile(q, 95):>8.3f}{percentile(f, 50):>12.3f}"
              f"{percentile(f, 95):>8.3f}{ratio:>10.2f}")
    width = max(60, *(len(n) + 2 for n in quiet.invariants))
    print(f"\n{'invariant (violations; live instances: count)':<{width}}{'quiet':>8}{'faults':>8}")
    for name in quiet.invariants:
        print(f"  {name:<{width - 2}}{quiet.invariants[name]:>8}{faulty.invariants[name]:>8}")
    broken = {k: v for r in runs.values() for k, v in r.invariants.items() if k != "live instances" and v}
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
