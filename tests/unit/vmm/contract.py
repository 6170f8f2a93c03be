"""The VMM contract: one suite of cases every VMM backend passes (the libvirt test driver here in
tests/unit/vmm, QEMU with a real guest in tests/vm). A backend's test module subclasses VMMContract
and provides the fixtures:

  vmm           the node under test (a VMM)
  make_spec     make_spec(name) -> a valid InstanceSpec on that node (files made as the backend needs)
  other_node    an OtherNode: a second node, as the migration target
  wait_booted   wait_booted(vmm, name): until the guest can honour the power button (no-op if simulated)
"""
from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path
from typing import Protocol

import pytest

from services.vmmanager.vmm import (VMM, IllegalState, InstanceExists, InstanceNotFound, InstanceState,
                                    InvalidSpec, LifecycleEventKind, Unsupported)


class OtherNode(Protocol):
    def restore(self, save_file: Path, spec) -> dict:
        """Restore on the other node; return {'state': str, 'disks': [paths], 'instances': [names]}."""


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


class VMMContract:
    """Cases for every backend; each test names the behaviour it proves."""

    def test_define_makes_a_shut_off_instance_listed_with_its_spec(self, vmm: VMM, make_spec):
        spec = make_spec("c-define")
        vmm.define(spec)
        assert vmm.state("c-define") == InstanceState.SHUTOFF
        listed = {i.name: i for i in vmm.list_instances()}
        assert listed["c-define"].uuid == spec.uuid and listed["c-define"].persistent
        assert vmm.spec_of("c-define") == spec

    def test_define_twice_is_refused_and_keeps_the_first(self, vmm: VMM, make_spec):
        spec = make_spec("c-twice")
        vmm.define(spec)
        with pytest.raises(InstanceExists):
            vmm.define(spec)
        with pytest.raises(InstanceExists):   # same uuid under another name
            vmm.define(dataclasses.replace(make_spec("c-twice-b"), uuid=spec.uuid))
        assert vmm.spec_of("c-twice") == spec

    def test_invalid_spec_defines_nothing(self, vmm: VMM, make_spec):
        bad = dataclasses.replace(make_spec("c-bad"), memory_mib=1)
        with pytest.raises(InvalidSpec):
            vmm.define(bad)
        assert "c-bad" not in {i.name for i in vmm.list_instances()}

    def test_start_runs_and_start_paused_freezes(self, vmm: VMM, make_spec):
        vmm.define(make_spec("c-run"))
        vmm.start("c-run")
        assert vmm.state("c-run") == InstanceState.RUNNING
        vmm.define(make_spec("c-frozen"))
        vmm.start("c-frozen", paused=True)
        assert vmm.state("c-frozen") == InstanceState.PAUSED
        with pytest.raises(IllegalState):
            vmm.start("c-run")

    def test_pause_and_resume_follow_the_states(self, vmm: VMM, make_spec):
        vmm.define(make_spec("c-pause"))
        with pytest.raises(IllegalState):
            vmm.pause("c-pause")                 # not running yet
        vmm.start("c-pause")
        vmm.pause("c-pause")
        assert vmm.state("c-pause") == InstanceState.PAUSED
        with pytest.raises(IllegalState):
            vmm.pause("c-pause")
        vmm.resume("c-pause")
        assert vmm.state("c-pause") == InstanceState.RUNNING
        with pytest.raises(IllegalState):
            vmm.resume("c-pause")

    def test_save_stops_the_instance_and_restore_continues_it(self, vmm: VMM, make_spec, tmp_path):
        spec = make_spec("c-save")
        vmm.define(spec)
        vmm.start("c-save")
        save_file = tmp_path / "c-save.state"
        vmm.save("c-save", save_file)
        assert save_file.stat().st_size > 0
        assert vmm.state("c-save") == InstanceState.SAVED
        with pytest.raises(IllegalState):
            vmm.pause("c-save")
        assert vmm.restore(save_file) == "c-save"
        assert vmm.state("c-save") == InstanceState.RUNNING
        assert vmm.spec_of("c-save").uuid == spec.uuid

    def test_restore_paused_stays_paused(self, vmm: VMM, make_spec, tmp_path):
        vmm.define(make_spec("c-rp"))
        vmm.start("c-rp")
        vmm.save("c-rp", tmp_path / "c-rp.state")
        vmm.restore(tmp_path / "c-rp.state", paused=True)
        assert vmm.state("c-rp") == InstanceState.PAUSED

    def test_save_refuses_to_overwrite_and_restore_needs_a_file(self, vmm: VMM, make_spec, tmp_path):
        vmm.define(make_spec("c-sv"))
        vmm.start("c-sv")
        (tmp_path / "taken").write_bytes(b"precious")
        with pytest.raises(InvalidSpec):
            vmm.save("c-sv", tmp_path / "taken")
        assert (tmp_path / "taken").read_bytes() == b"precious"
        assert vmm.state("c-sv") == InstanceState.RUNNING
        with pytest.raises(InvalidSpec):
            vmm.restore(tmp_path / "missing.state")

    def test_restore_of_a_running_instance_is_refused(self, vmm: VMM, make_spec, tmp_path):
        vmm.define(make_spec("c-rr"))
        vmm.start("c-rr")
        vmm.save("c-rr", tmp_path / "c-rr.state")
        vmm.restore(tmp_path / "c-rr.state")
        with pytest.raises(IllegalState):
            vmm.restore(tmp_path / "c-rr.state")

    def test_migration_path_save_copy_restore_on_another_node(self, vmm: VMM, make_spec, other_node, tmp_path):
        spec = make_spec("c-move")
        vmm.define(spec)
        vmm.start("c-move")
        save_file = tmp_path / "c-move.state"
        vmm.save("c-move", save_file)
        target = tmp_path / "target"
        target.mkdir()
        moved_disks = []
        for d in spec.disks:                       # the overlay goes along with the saved state
            dest = target / Path(d.path).name
            if Path(d.path).exists():
                shutil.copy2(d.path, dest)
            moved_disks.append(dataclasses.replace(d, path=dest))
        target_spec = dataclasses.replace(spec, disks=tuple(moved_disks))
        if spec.channel is not None:
            target_spec = dataclasses.replace(target_spec, channel=dataclasses.replace(
                spec.channel, path=Path(str(spec.channel.path) + ".t")))
        copied = tmp_path / "copied.state"
        shutil.copy2(save_file, copied)
        result = other_node.restore(copied, target_spec)
        assert result["state"] == InstanceState.RUNNING.value
        assert result["disks"] == [str(d.path) for d in moved_disks]
        assert vmm.state("c-move") == InstanceState.SAVED   # the source still holds it until it lets go
        vmm.undefine("c-move")
        with pytest.raises(InstanceNotFound):
            vmm.state("c-move")

    def test_restore_with_a_spec_of_other_devices_is_refused(self, vmm: VMM, make_spec, tmp_path):
        spec = make_spec("c-mism")
        vmm.define(spec)
        vmm.start("c-mism")
        vmm.save("c-mism", tmp_path / "s.state")
        with pytest.raises(InvalidSpec):
            vmm.restore(tmp_path / "s.state", dataclasses.replace(spec, cdroms=()))
        with pytest.raises(InvalidSpec):
            vmm.restore(tmp_path / "s.state", make_spec("c-other"))
        assert vmm.state("c-mism") == InstanceState.SAVED

    def test_shutdown_powers_the_instance_off(self, vmm: VMM, make_spec, wait_booted):
        vmm.define(make_spec("c-down"))
        vmm.start("c-down")
        wait_booted(vmm, "c-down")
        assert vmm.shutdown("c-down", timeout=60) is True
        assert vmm.state("c-down") == InstanceState.SHUTOFF
        with pytest.raises(IllegalState):
            vmm.shutdown("c-down")

    def test_shutdown_of_a_paused_instance_is_refused(self, vmm: VMM, make_spec):
        vmm.define(make_spec("c-pd"))
        vmm.start("c-pd", paused=True)
        with pytest.raises(IllegalState):
            vmm.shutdown("c-pd", timeout=1)
        assert vmm.state("c-pd") == InstanceState.PAUSED

    def test_destroy_stops_at_once_and_is_idempotent(self, vmm: VMM, make_spec):
        vmm.define(make_spec("c-kill"))
        vmm.start("c-kill", paused=True)
        vmm.destroy("c-kill")
        assert vmm.state("c-kill") == InstanceState.SHUTOFF
        vmm.destroy("c-kill")
        assert vmm.state("c-kill") == InstanceState.SHUTOFF
        vmm.start("c-kill")                       # the definition and disks stay
        assert vmm.state("c-kill") == InstanceState.RUNNING

    def test_undefine_removes_only_a_stopped_instance(self, vmm: VMM, make_spec):
        vmm.define(make_spec("c-gone"))
        vmm.start("c-gone")
        with pytest.raises(IllegalState):
            vmm.undefine("c-gone")
        vmm.destroy("c-gone")
        vmm.undefine("c-gone")
        assert "c-gone" not in {i.name for i in vmm.list_instances()}
        with pytest.raises(InstanceNotFound):
            vmm.state("c-gone")

    @pytest.mark.parametrize("verb", ["start", "pause", "resume", "destroy", "undefine", "state",
                                      "shutdown", "spec_of"])
    def test_unknown_instance_is_not_found(self, vmm: VMM, verb):
        with pytest.raises(InstanceNotFound):
            getattr(vmm, verb)("c-nobody")

    def test_lifecycle_events_follow_the_verbs(self, vmm: VMM, make_spec, tmp_path):
        seen = []
        arrived = threading.Event()

        def on_event(ev):
            if ev.instance == "c-events":
                seen.append(ev.kind)
                if ev.kind == LifecycleEventKind.UNDEFINED:
                    arrived.set()

        handle = vmm.subscribe(on_event)
        try:
            vmm.define(make_spec("c-events"))
            vmm.start("c-events")
            vmm.pause("c-events")
            vmm.resume("c-events")
            vmm.save("c-events", tmp_path / "e.state")
            vmm.restore(tmp_path / "e.state")
            vmm.destroy("c-events")
            vmm.undefine("c-events")
            assert arrived.wait(10), f"no undefined event; saw {seen}"
        finally:
            vmm.unsubscribe(handle)
        K = LifecycleEventKind
        order = [K.DEFINED, K.STARTED, K.PAUSED, K.RESUMED, K.STOPPED, K.STARTED, K.STOPPED, K.UNDEFINED]
        it = iter(seen)
        assert all(kind in it for kind in order), f"events out of order: {seen}"

    def test_a_subscriber_for_some_kinds_hears_only_those(self, vmm: VMM, make_spec):
        K = LifecycleEventKind
        stops, every = [], []
        arrived = threading.Event()

        def on_any(ev):
            if ev.instance == "c-kinds":
                every.append(ev.kind)
                if ev.kind == K.UNDEFINED:
                    arrived.set()

        only = vmm.subscribe(lambda ev: stops.append(ev.kind) if ev.instance == "c-kinds" else None,
                             (K.STOPPED, K.CRASHED))
        handle = vmm.subscribe(on_any)
        try:
            vmm.define(make_spec("c-kinds"))
            vmm.start("c-kinds")
            vmm.destroy("c-kinds")
            vmm.undefine("c-kinds")
            assert arrived.wait(10), f"no undefined event; saw {every}"
        finally:
            vmm.unsubscribe(handle)
            vmm.unsubscribe(only)
        # one event thread delivers in order: the stop reached both before the undefine reached the second
        assert stops == [K.STOPPED] and K.STARTED in every and K.STOPPED in every, (stops, every)

    def test_unsubscribed_callbacks_hear_nothing(self, vmm: VMM, make_spec):
        seen = []
        handle = vmm.subscribe(seen.append)
        vmm.unsubscribe(handle)
        vmm.define(make_spec("c-quiet"))
        vmm.start("c-quiet")
        time.sleep(0.3)
        assert [e for e in seen if e.instance == "c-quiet"] == []

    def test_capabilities_are_checked_in_one_place(self, vmm: VMM, make_spec):
        caps = vmm.capabilities
        assert caps.live_migration is False       # vmgrid migrates by save, copy and restore
        with pytest.raises(Unsupported):
            vmm.require("live_migration")
        vmm.define(make_spec("c-caps"))
        vmm.start("c-caps")
        if caps.guest_channel:
            assert vmm.guest_channel("c-caps").instance == "c-caps"
        else:
            with pytest.raises(Unsupported):
                vmm.guest_channel("c-caps")
            with pytest.raises(Unsupported):
                vmm.sync_guest_time("c-caps")
