"""`vmgrid image build` end to end: a small recipe (GNU hello, an extra file, a container command, the
vmgrid runtime)
built as a scientist runs it, its descriptor checked against the image file and against what the
booted guest itself reports, the pair registered unchanged in a real VMRepository with
`vmgrid repo register`, and the repository's copy of the bytes booted under QEMU by itself (boot
method disk: no kernel, initrd or anything else from the builder's cache)."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from guestd.image.sample import make_overlay
from services.descriptor import NSMAP, Descriptor, parse_descriptor
from services.vmmanager.context import build_context, write_context_iso
from services.vmmanager.vmm import Disk, GuestChannel, InstanceSpec, Nic, Port

from conftest import console_tail
from images import write_hello_recipe

REPO = Path(__file__).resolve().parents[2]


def register(repo_server, grid_pki, descriptor: Path, image: Path) -> dict:
    """`vmgrid repo register DESCRIPTOR IMAGE --json` as the admin, in its own process; the stored descriptor."""
    r = subprocess.run([sys.executable, "-m", "client.cli", "repo", "register", str(descriptor), str(image), "--json",
                        "--url", repo_server.url, "--cert-dir", str(grid_pki.cert_dir),
                        "--proxy", str(grid_pki.admin.proxy_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["descriptors"][0]


def boot_by_itself(qemu_node, vm_dir: Path, image: Path, ws: Descriptor, name: str,
                   command: list[str] | None = None):
    """Define and start a guest the way a node deploys a disk-boot image: an overlay on ``image``, the
    context CD-ROM (with ``command`` or the descriptor's container command), a console file, the guest
    channel, no kernel (boot=None). Returns (spec, its directory)."""
    d = vm_dir / f"{name}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    mac = "52:54:00:%02x:%02x:%02x" % tuple(uuid.uuid4().bytes[:3])
    if command is None and ws.container_command:
        command = shlex.split(ws.container_command)
    ctx = build_context(instance=name, hostname=name, mac=mac, address="10.0.2.15", netmask="255.255.255.0",
                        gateway="10.0.2.2", dns=["10.0.2.3"], container_command=command)
    write_context_iso(ctx, d / "context.iso")
    spec = InstanceSpec(name=name, memory_mib=ws.memory, vcpus=ws.vcpus,
                        disks=(Disk(make_overlay(image, d / "disk.qcow2")),), cdroms=(d / "context.iso",),
                        nics=(Nic(mac),), serial_ports=(Port("file", d / "console.log"),), boot=None,
                        channel=GuestChannel(d / "guestd.sock", ctx.token))
    qemu_node.define(spec)
    qemu_node.start(spec.name)
    return spec, d


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The recipe built with the command line (cached in var/guest-image/ across runs)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("building an image needs root (debootstrap)")
    d = tmp_path_factory.mktemp("recipe")
    recipe = write_hello_recipe(d)       # tests/vm/images.py: the same recipe the background pre-build makes
    out = d / "out"
    proc = subprocess.run([sys.executable, "-m", "client.cli", "image", "build", str(recipe), "--out", str(out),
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    return {"result": result, "image": Path(result["image"]), "descriptor": Path(result["descriptor"]),
            "recipe": recipe}


def test_the_build_writes_the_pair_into_the_out_directory(built):
    assert built["image"].parent == built["descriptor"].parent == built["recipe"].parent / "out"
    assert (built["image"].name, built["descriptor"].name) == ("vmtest-hello.qcow2", "vmtest-hello.xml")


def test_the_descriptor_is_valid_and_describes_the_image_file(built):
    d = Descriptor(parse_descriptor(built["descriptor"].read_bytes()))     # workspace.xsd, hardened parse
    assert d.sha256 == hashlib.sha256(built["image"].read_bytes()).hexdigest()
    assert d.size == built["image"].stat().st_size
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(built["image"])],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == d.image_format == "qcow2"
    assert [(k.role, k.size, k.bus) for k in d.disks] == [("root", info["virtual-size"], "virtio")]
    assert info["virtual-size"] == 768 * 2**20
    assert (d.name, d.version, d.vo, d.memory, d.vcpus) == ("vmtest-hello", "2.0", "bio", 192, 1)
    assert d.element.findtext("ws:software/ws:boot/ws:method", namespaces=NSMAP) == "disk"
    assert d.container_command == "/bin/sh /etc/vmgrid/facts.sh"
    assert d.distribution == "debian" and set(d.libraries) == {"hello", "python3"}
    assert d.owner is None and d.image_id is None            # the repository sets these


def test_registered_unchanged_the_image_boots_by_itself_and_is_what_the_descriptor_says(
        built, repo_server, grid_pki, qemu_node, vm_dir):
    stored = register(repo_server, grid_pki, built["descriptor"], built["image"])
    assert stored["identity"]["name"] == "vmtest-hello" and stored["identity"]["owner"] == grid_pki.admin.dn
    ours = Descriptor(parse_descriptor(built["descriptor"].read_bytes()))
    assert stored["image"]["sha256"] == ours.sha256

    # boot the repository's copy of the bytes: boot method disk, nothing from the builder's cache
    spec, d = boot_by_itself(qemu_node, vm_dir, repo_server.service.store.path(ours.sha256), ours, "recipe-guest")
    try:
        status = qemu_node.guest_channel(spec.name).wait_ready(timeout=240)
        assert status["ready"] and status["instance"] == "recipe-guest", console_tail(spec)
        facts, deadline = None, time.monotonic() + 240
        while facts is None and time.monotonic() < deadline:    # the container writes its line once it runs
            m = re.search(r"FACTS (\S+) (\S+) (\S+) (\S+) (.+)", (d / "console.log").read_text(errors="replace"))
            facts = m.groups() if m else time.sleep(0.2)
        assert facts, console_tail(spec)
        debian_version, uname_r, hello_version, runtime, hello_says = facts
        assert ours.element.findtext("ws:software/ws:distribution/ws:version", namespaces=NSMAP) == debian_version
        assert ours.kernel_version == uname_r
        assert hello_version.startswith(ours.libraries["hello"])
        assert hello_says.strip() == "Hello, world!"
        assert runtime == "runtime-ok"            # vmgrid's packages and their dependencies import in the guest
    finally:
        qemu_node.destroy(spec.name)
        qemu_node.undefine(spec.name)



def test_the_shipped_example_descriptor_registers_with_the_base_image_and_boots_it(
        guest_image, repo_server, grid_pki, qemu_node, vm_dir):
    example = REPO / "wsdl" / "examples" / "debian12-guest.xml"
    ex = Descriptor(parse_descriptor(example.read_bytes()))
    built_ws = Descriptor(parse_descriptor(guest_image.descriptor.read_bytes()))
    section = lambda ws, path: [(e.tag, (e.text or "").strip()) for e in ws.element.find(path, NSMAP).iter()]  # noqa: E731
    for path in ("ws:hardware", "ws:software/ws:boot", "ws:identity"):
        assert section(ex, path) == section(built_ws, path), path       # what the builder writes for base
    assert ex.kernel_version.split(".")[0] == built_ws.kernel_version.split(".")[0]
    assert set(ex.libraries) == set(built_ws.libraries)

    stored = register(repo_server, grid_pki, example, guest_image.rootfs)
    spec, _ = boot_by_itself(qemu_node, vm_dir, repo_server.service.store.path(stored["image"]["sha256"]), ex,
                             "example-guest")
    try:
        status = qemu_node.guest_channel(spec.name).wait_ready(timeout=240)
        assert status["ready"], console_tail(spec)
        assert status["container"]["running"] and status["container"]["command"] == shlex.split(ex.container_command)
    finally:
        qemu_node.destroy(spec.name)
        qemu_node.undefine(spec.name)
