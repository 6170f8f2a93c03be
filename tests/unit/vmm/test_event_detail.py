"""Lifecycle event details by name (services/vmmanager/vmm/libvirt_driver.py), looked up once per pair."""
from __future__ import annotations

import libvirt

from services.vmmanager.vmm.libvirt_driver import _event_detail


def test_event_details_are_named_as_libvirt_names_them_and_unknown_ones_by_number():
    _event_detail.cache_clear()
    assert _event_detail(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED) == "destroyed"
    assert _event_detail(libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED) == "booted"
    assert _event_detail(libvirt.VIR_DOMAIN_EVENT_STOPPED, 999) == "999"
    _event_detail(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
    assert _event_detail.cache_info().hits == 1          # every deploy+destroy sends the same few pairs
