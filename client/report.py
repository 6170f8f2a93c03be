"""The poster's figure: the proportion of a deployment's time each phase takes, for one or many
deployments, as a table and as a PNG (matplotlib)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from services.vmmanager.states import MIGRATION_PHASES, PHASES

COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#9c755f", "#b07aa1", "#ff9da7")


@dataclass(frozen=True)
class Deployment:
    label: str
    phases: tuple[tuple[str, float], ...]

    @property
    def total(self) -> float:
        return sum(s for _, s in self.phases)

    @property
    def migration(self) -> bool:
        """An instance that arrived by migration: its phases are the migration's (authorize ... release)."""
        return any(n == "freeze" for n, _ in self.phases)


def phase_table(deployments: list[Deployment], phases: tuple[str, ...] = PHASES) -> list[tuple[str, float, float, float]]:
    """Per phase: (name, mean seconds, median seconds, share of the summed deployment time in %)."""
    rows = []
    grand = sum(d.total for d in deployments) or 1.0
    for name in phases:
        values = [s for d in deployments for n, s in d.phases if n == name]
        if values:
            rows.append((name, statistics.fmean(values), statistics.median(values), 100 * sum(values) / grand))
    return rows


def print_report(deployments: list[Deployment], out) -> None:
    """The deployment phase table; then, if any instance arrived by migration, the migration phase table."""
    migrations = [d for d in deployments if d.migration]
    deployments = [d for d in deployments if not d.migration]
    _print_table(deployments, PHASES, "deployment(s)", out)
    if migrations:
        print(file=out)
        _print_table(migrations, MIGRATION_PHASES, "migration(s)", out)


def _print_table(items: list[Deployment], phases: tuple[str, ...], what: str, out) -> None:
    print(f"{len(items)} {what}; phase times in seconds", file=out)
    print(f"{'phase':<12} {'mean':>9} {'median':>9} {'share':>7}", file=out)
    for name, mean, median, share in phase_table(items, phases):
        print(f"{name:<12} {mean:>9.4f} {median:>9.4f} {share:>6.1f}%", file=out)
    total = [d.total for d in items]
    if total:
        print(f"{'total':<12} {statistics.fmean(total):>9.4f} {statistics.median(total):>9.4f} {100:>6.1f}%", file=out)


def draw(deployments: list[Deployment], path: Path, title: str = "Deployment phases") -> Path:
    """A PNG: the share of each phase overall (pie) and per deployment (stacked bars); deployments only."""
    deployments = [d for d in deployments if not d.migration]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = phase_table(deployments)
    fig, (pie, bars) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    colour = dict(zip(PHASES, COLOURS))
    shares = [(n, share) for n, _, _, share in rows if share > 0]
    # a thin wedge's label would sit on its neighbour's: those shares are read from the legend instead
    pie.pie([s for _, s in shares], labels=[f"{n}\n{s:.1f}%" if s >= 5 else "" for n, s in shares],
            colors=[colour[n] for n, _ in shares], startangle=90, counterclock=False,
            wedgeprops={"linewidth": 1, "edgecolor": "white"})
    pie.set_title(f"share of deployment time\n({len(deployments)} deployment(s))")
    shown = deployments[-30:]
    for i, d in enumerate(shown):
        left = 0.0
        for name, seconds in d.phases:
            bars.barh(i, seconds, left=left, color=colour.get(name, "#999999"),
                      label=name if i == 0 else None, edgecolor="white", linewidth=0.5)
            left += seconds
    bars.set_yticks(range(len(shown)), [d.label for d in shown], fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("seconds")
    bars.set_title("each deployment, phase by phase")
    share_of = {n: share for n, _, _, share in rows}
    named = [n for n in PHASES if n in share_of]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in named]
    # beside the bars, not over them (it hid the last deployment's bar)
    bars.legend(handles, [f"{n} {share_of[n]:.1f}%" for n in named], fontsize=8, loc="upper left",
                bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
