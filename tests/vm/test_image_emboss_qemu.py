"""The shipped `emboss` recipe, built and booted: EMBOSS 6.6 runs in the guest (embossversion, needle,
tmap with a PNG plot) and the vmgrid runtime imports. Opt-in (VMGRID_TEST_EMBOSS=1): the first build
downloads about 650 MB, which CI does not need for anything else."""
from __future__ import annotations

import os
import re
import time

import pytest

from guestd.image.build import build
from services.descriptor import NSMAP, Descriptor, parse_descriptor

from conftest import console_tail
from test_image_recipe_qemu import boot_by_itself

pytestmark = pytest.mark.skipif(os.environ.get("VMGRID_TEST_EMBOSS") != "1",
                                reason="opt-in: VMGRID_TEST_EMBOSS=1 (builds the 650 MB EMBOSS image once)")

SCRIPT = (
    "v=$(embossversion -auto 2>&1); "
    "id=$(needle -asequence asis:MKTAYIAKQRQISFVKSHFSRQ -bsequence asis:MKTAYIAKQRQISFVKAHFSRQ -gapopen 10 "
    "-gapextend 0.5 -outfile stdout -auto 2>&1 | sed -n 's/^# Identity: *//p' | tr -d ' '); "
    "tmap -sequence asis:MLELLPTAVEGVSQAQITGRPEWIWLALGTALMGLGTLYFLVKGMGVSDPDAKKFYAITTLVPAIAFTMYLSMLLGYGLTMVPFGGEQNPIYWARYADWLFTTPLLLLDLALLVDADQGTILALVGADGIMIGTGLVGALTKVYSYRFVWWAISTAAMLYILYVLFFGFTSKAESMRPEVASTFKVLRNVTVVLWSAYPVVWLIGSEGAGIVPLNIETLLFMVLDVSAKVGFGLILLRSRAIFGEAEAPEPSAGDGAAATSD "
    "-graph png -goutfile /tmp/tmap -outfile /tmp/tmap.txt -auto > /dev/null 2>&1; "
    "png=$(head -c 4 /tmp/tmap.1.png 2>/dev/null | tail -c 3); "
    "rt=$(python3 -c 'import client.cli, services.container.assemble; print(\"runtime-ok\")' 2>&1 | tail -n 1 | tr ' ' _); "
    'echo "EMBOSS ${v:-none} ${id:-none} ${png:-none} ${rt:-none}" > /dev/ttyS0; sleep 3600'
)


def test_emboss_runs_in_the_built_guest(qemu_prerequisites, qemu_node, vm_dir):
    image = build(recipe="emboss")
    ws = Descriptor(parse_descriptor(image.descriptor.read_bytes()))
    assert ws.libraries["emboss"] == "6.6.0" and ws.memory == 512
    assert ws.element.findtext("ws:software/ws:boot/ws:method", namespaces=NSMAP) == "disk"
    spec, d = boot_by_itself(qemu_node, vm_dir, image.rootfs, ws, "emboss-guest", command=["/bin/sh", "-c", SCRIPT])
    try:
        assert qemu_node.guest_channel(spec.name).wait_ready(timeout=300)["ready"], console_tail(spec)
        found, deadline = None, time.monotonic() + 300
        while found is None and time.monotonic() < deadline:
            found = re.search(r"EMBOSS (\S+) (\S+) (\S+) (\S+)", (d / "console.log").read_text(errors="replace"))
            found = found or time.sleep(0.5)
        assert found, console_tail(spec)
        version, identity, png, runtime = found.groups()
        assert version.startswith("6.6"), found.group(0)
        assert identity.startswith("21/22"), found.group(0)        # needle: one substitution in 22
        assert png == "PNG", found.group(0)                          # tmap drew its plot
        assert runtime == "runtime-ok", found.group(0)
    finally:
        qemu_node.destroy(spec.name)
        qemu_node.undefine(spec.name)
