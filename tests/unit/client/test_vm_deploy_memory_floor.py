"""`vmgrid vm deploy --memory` is refused below MIN_GUEST_MEMORY_MIB (client/commands_vm.py), which must be the least
a node defines a guest with (services/vmmanager/vmm/spec.py InstanceSpec.validate): the two kept together here."""
from __future__ import annotations

import pytest

from client.commands_vm import MIN_GUEST_MEMORY_MIB
from services.vmmanager.vmm.errors import InvalidSpec
from services.vmmanager.vmm.spec import InstanceSpec


def test_the_clients_floor_is_the_least_a_node_defines_a_guest_with():
    with pytest.raises(InvalidSpec, match="memory_mib"):
        InstanceSpec("probe", MIN_GUEST_MEMORY_MIB - 1).validate()
    with pytest.raises(InvalidSpec) as past_memory:            # the floor passes: the next check refuses (no disk)
        InstanceSpec("probe", MIN_GUEST_MEMORY_MIB).validate()
    assert "memory_mib" not in str(past_memory.value)
