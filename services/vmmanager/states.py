"""The life of a VM instance: its deployment phases, its states and which operation is allowed in which state."""
from __future__ import annotations

import enum

from services.faults import IllegalTransition


class State(str, enum.Enum):
    REGISTERED = "Registered"      # authorized, recorded, address leased
    STAGING = "Staging"            # the image is coming into the node cache
    STARTING = "Starting"          # overlay, context, define and power on
    RUNNING = "Running"
    PAUSED = "Paused"
    SAVED = "Saved"                # frozen to a state file on the node
    SHUTTING_DOWN = "ShuttingDown"
    SHUTOFF = "Shutoff"
    DESTROYED = "Destroyed"        # final: everything released
    FAILED = "Failed"              # final: everything released, Failure says why
    MIGRATING = "Migrating"        # source: frozen and being moved to another node (services.vmmanager.migration)
    INCOMING = "Incoming"          # target: registered and restored paused, until the source commits
    MIGRATED = "Migrated"          # final (source): the instance lives on another node; its old EPR says where


# The deployment phases, in the order they run, each timed (the PhaseTimings resource property).
# A deploy runs either power-on + guest-ready (a cold boot) or restore (a clone of the image's warm
# snapshot, services/vmmanager/warm.py), never both (a failed restore falls back to the cold phases).
PHASES = ("authorize", "register", "lease", "stage", "overlay", "context", "restore", "power-on", "guest-ready")
COLD_PHASES = tuple(p for p in PHASES if p != "restore")
WARM_PHASES = tuple(p for p in PHASES if p not in ("power-on", "guest-ready"))

# The migration phases (source and target together), each timed like Deploy's, in their order. prepare (at the
# target) comes before freeze: the guest runs on at the source until the target said yes; the downtime is freeze
# to resume. fixup follows resume: guestd answers only in a running guest (it takes the new address, the clock is
# set on resume)
MIGRATION_PHASES = ("authorize", "prepare", "freeze", "transfer", "restore", "resume", "fixup", "release")

TRANSIENT = frozenset({State.REGISTERED, State.STAGING, State.STARTING, State.SHUTTING_DOWN})
MIGRATION = frozenset({State.MIGRATING, State.INCOMING})   # resolved by migration.reconcile, not failed
FINAL = frozenset({State.DESTROYED, State.FAILED, State.MIGRATED})
LIVE = frozenset(State) - FINAL

# operation -> the states it may start from
ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.SHUTOFF}),
    "pause": frozenset({State.RUNNING}),
    "resume": frozenset({State.PAUSED}),
    "save": frozenset({State.RUNNING, State.PAUSED}),
    "restore": frozenset({State.SAVED}),
    "shutdown-normal": frozenset({State.RUNNING}),
    "shutdown-trash": frozenset({State.RUNNING, State.PAUSED, State.SHUTTING_DOWN, State.SHUTOFF}),
    "destroy": LIVE - MIGRATION,
    "set-lifetime": LIVE - MIGRATION,
    "inspect": frozenset(State),
    "subscribe": LIVE - MIGRATION,
    "migrate": frozenset({State.RUNNING, State.PAUSED, State.SAVED}),
}


def check(state: State, operation: str) -> None:
    """Raise IllegalTransition unless ``operation`` may run in ``state``."""
    if state not in ALLOWED[operation]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[operation]))
        raise IllegalTransition(f"cannot {operation} an instance that is {state.value} (allowed from: {allowed})",
                                state=state.value, operation=operation)
