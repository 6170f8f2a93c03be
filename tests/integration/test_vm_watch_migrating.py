"""`vmgrid vm watch NAME` started while the instance is Migrating (trial14 M3: "IllegalTransition: cannot subscribe
an instance that is Migrating"): the node takes no subscription until the migration ends (the subscribers it carries
to the target are read when it begins), so the command says it waits, asks the instance's state until the migration
ends, and then watches it where it is: on the target once it moved, on the source once it was rolled back.
Two nodes on libvirt's test driver (tests/fixtures/grid.py), the real command as a child process; the migration is
held in its freeze (the source's save waits) while the watch starts."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from services.vmmanager.vmm import VMMError
from tests.fixtures.grid import start_grid

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(grid_pki, tmp_path_factory):
    g = start_grid(grid_pki, tmp_path_factory.mktemp("watch-migrating") / "grid", nodes=2)
    g.image = g.register(name="watched")
    try:
        yield g
    finally:
        g.close()


def freeze_held(grid, grid_pki, monkeypatch, name: str, *, fail_freeze: bool = False):
    """Deploy ``name`` on node 0 and migrate it to node 1 in a thread (``mover``), the source's save held until ``go``
    is set (then it goes on, or fails the freeze); returned once the freeze began: (ref, outcome, mover, go), the
    outcome the moved instance's info or the fault once ``mover`` ended."""
    source = grid.node(0)
    frozen, go = threading.Event(), threading.Event()
    real_save = source.vmm.save

    def save(key, path, *args, **kwargs):
        frozen.set()
        assert go.wait(120)
        if fail_freeze:
            raise VMMError("injected: the save fails")
        return real_save(key, path, *args, **kwargs)
    monkeypatch.setattr(source.vmm, "save", save)
    ref = grid.vmm(grid_pki.alice, 0).deploy(grid.image, name, 600, wait=True).ref
    outcome: dict = {}

    def migrate():
        try:
            outcome["moved"] = grid.vmm(grid_pki.alice, 0).migrate(ref, grid.node_url(1))
        except Exception as exc:            # noqa: BLE001 - the test reads it
            outcome["fault"] = exc
    mover = threading.Thread(target=migrate, daemon=True)
    mover.start()
    if not frozen.wait(60):
        go.set()
        raise AssertionError("the migration's freeze did not begin within 60 s")
    return ref, outcome, mover, go


def watch_while_migrating(grid, grid_pki, monkeypatch, name: str, *, fail_freeze: bool = False):
    """:func:`freeze_held`, the freeze held until `vmgrid vm watch NAME` (against node 0) said what it does; then the
    migration goes on (or fails its freeze): the watch's process, the migration's outcome (the moved instance's info
    or the fault) and the watch's first line."""
    ref, outcome, mover, go = freeze_held(grid, grid_pki, monkeypatch, name, fail_freeze=fail_freeze)
    assert grid.node(0).store.get(ref.key).state == "Migrating"
    env = {**os.environ, **grid_pki.alice.env(grid_pki.cert_dir), "VMGRID_NODE": grid.node_url(0)}
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "vm", "watch", name, "--timeout", "120"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        go.set()
        mover.join(120)
        monkeypatch.undo()
        return proc, outcome, ref, first
    except BaseException:
        go.set()
        proc.kill()
        proc.wait()
        raise


def watched_to_its_end(proc, first: str, outcome: dict, *, as_expected: bool, ended: str, destroy) -> None:
    """The rest of the watch ``proc`` (killed if anything here fails): the migration's ``outcome`` is the one the test
    expects (``as_expected``), the watch's first line said it waits, the next that the migration ended (``ended``),
    the next that it listens where the instance is; ``destroy()`` ends the instance there, and the watch ends 0, no
    IllegalTransition said, its last line the instance's Running -> Destroyed."""
    try:
        assert as_expected, outcome
        assert "Migrating: a migration has begun; waiting for its end to watch it" in first, \
            first + proc.stderr.read() if proc.poll() is not None else first
        line = proc.stdout.readline()
        assert ended in line, line
        listening = proc.stdout.readline()
        assert ": Running (listening at " in listening, listening
        destroy()                       # the instance's change ends the watch
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "IllegalTransition" not in err, err
    assert out.rstrip().splitlines()[-1].split(": ", 1)[1].startswith("Running -> Destroyed"), out


def test_a_watch_started_while_the_instance_migrates_waits_and_follows_it_to_its_new_node(grid, grid_pki,
                                                                                          monkeypatch):
    proc, outcome, ref, first = watch_while_migrating(grid, grid_pki, monkeypatch, "watched-moving")
    watched_to_its_end(proc, first, outcome, as_expected="moved" in outcome,
                       ended=f"the migration ended; now on {grid.node_url(1)}",
                       destroy=lambda: grid.vmm(grid_pki.alice, 1).destroy(outcome["moved"].ref))


def test_a_watch_started_while_the_instance_migrates_stays_on_the_source_when_it_is_rolled_back(grid, grid_pki,
                                                                                               monkeypatch):
    proc, outcome, ref, first = watch_while_migrating(grid, grid_pki, monkeypatch, "watched-staying",
                                                      fail_freeze=True)
    watched_to_its_end(proc, first, outcome,
                       as_expected="fault" in outcome and getattr(outcome["fault"], "phase", None) == "freeze",
                       ended=f"the migration ended; it stays on {grid.node_url(0)}",
                       destroy=lambda: grid.vmm(grid_pki.alice, 0).destroy(ref))


def test_a_migrating_instance_answers_subscribe_destroy_and_set_termination_time_with_a_declared_fault(
        grid, grid_pki, monkeypatch):
    """The node refuses them while the instance is Migrating, with IllegalTransitionFault (its state in the detail),
    which the WSDL declares for the three: a typed client gets it as such (the tests' container would answer an
    undeclared fault as InternalFault), and `vm watch` reads the state from it without asking again."""
    from services.faults import IllegalTransition

    vm = grid.vmm(grid_pki.alice, 0)
    ref, outcome, mover, go = freeze_held(grid, grid_pki, monkeypatch, "held-in-freeze")
    try:
        for operation, call in (("subscribe", lambda: vm.subscribe(ref, "https://consumer.example.org:9443/c")),
                                ("destroy", lambda: vm.destroy(ref)),
                                ("set-lifetime", lambda: vm.set_termination_time(ref, seconds=3600))):
            with pytest.raises(IllegalTransition) as refused:
                call()
            assert (refused.value.state, refused.value.operation) == ("Migrating", operation)
    finally:
        go.set()
        mover.join(120)
        monkeypatch.undo()
    assert "moved" in outcome, outcome
    grid.vmm(grid_pki.alice, 1).destroy(outcome["moved"].ref)
