"""Fixtures of the QEMU tier: the guest image (built once, cached under var/guest-image/), a node
embedding QEMU (qemu:///embed, one per test process), instance specs for real guests, cleanup."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "vmm"))   # the shared contract

from guestd.image.build import GuestImage, build  # noqa: E402
from guestd.image.sample import make_overlay  # noqa: E402
from services.vmmanager.context import build_context, write_context_iso  # noqa: E402
from services.vmmanager.vmm import (Disk, GuestChannel, InstanceSpec, KernelBoot, LibvirtQemuDriver, Nic,  # noqa: E402
                                    Port, VMMError, qemu_user_missing)
from services.vmmanager.vmm.config import domain_xml  # noqa: E402

HELPER = Path(__file__).with_name("node_helper.py")


JOBS_SCENE = Path(__file__).with_name("jobs_grid.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """vmgrid's real guest (Debian cloud kernel, busybox initramfs, minbase + python3 + guestd), built on
    first use (about a minute) and cached by a hash of the builder and guestd sources."""
    if os.geteuid() != 0:
        pytest.skip("the QEMU tier needs root (debootstrap, QEMU as root)")
    return build(log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def qemu_prerequisites():
    """libvirt's QEMU driver insists on its 'libvirt-qemu' system user even when QEMU runs as root;
    Debian creates it in libvirt-daemon-system, which vmgrid does not install. Create it if missing."""
    if os.geteuid() != 0:
        pytest.skip("the QEMU tier needs root")
    if qemu_user_missing():
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                        "/var/lib/libvirt", "--shell", "/usr/sbin/nologin", "libvirt-qemu"], check=True)


@pytest.fixture(scope="session")
def vm_dir():
    """A short directory (Unix socket paths must stay under 108 bytes) for this test process."""
    d = Path(tempfile.mkdtemp(prefix="vmgrid-vm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def jobs_image(qemu_prerequisites, tmp_path_factory):
    """The job-service guest (tests/vm/images.py: the vmgrid runtime, its job service as the grid container)."""
    from images import build_jobs_image
    return build_jobs_image(tmp_path_factory.mktemp("recipe"), log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def jobs_scene(jobs_image, vm_dir):
    """One guest of the job-service image, booted once for test_guest_jobs_qemu.py and test_migrate_qemu.py:
    tests/vm/jobs_grid.py runs the job service's checks on the first of two bridge-mode nodes, then migrates
    the guest to the second and runs the migration's, all in a network namespace of its own (vgjob-<hex>).
    What it saw, a part ("jobs", "migration") per test module."""
    from scene import run_scene
    result = run_scene(JOBS_SCENE, jobs_image.directory, vm_dir, "vgjob", "guest jobs and migration scene",
                       detail=8000)
    print(f"guest jobs and migration scene: grid and nodes {result.get('setup_seconds')} s, deploy "
          f"{result.get('deploy_seconds')} s, job service checks (deploy included) {result.get('jobs_seconds')} s, "
          f"migration checks {result.get('migration_seconds')} s "
          f"(migrate {result['migration'].get('migrate_seconds')} s)", file=sys.stderr)
    return result


@pytest.fixture(scope="session")
def qemu_node(qemu_prerequisites, vm_dir):
    node = LibvirtQemuDriver(root=vm_dir / "root")
    yield node
    for info in node.list_instances():
        try:
            node.destroy(info.name)
            node.undefine(info.name)
        except VMMError:
            pass
    node.close()


def new_guest_spec(image: GuestImage, vm_dir: Path, name: str, memory_mib: int = 192,
                   container: list[str] | None = None, address: str = "10.0.2.15", gateway: str = "10.0.2.2",
                   bridge: str | None = None, cmdline: str | None = None):
    """A real guest's InstanceSpec and context: its own overlay on the image, context ISO, console log,
    guest channel socket (in a short directory: Unix socket paths stay under 108 bytes). The NIC is
    QEMU user mode, or a tap on ``bridge``; ``cmdline`` replaces the image's kernel command line."""
    d = vm_dir / f"{name}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    mac = "52:54:00:%02x:%02x:%02x" % tuple(uuid.uuid4().bytes[:3])
    ctx = build_context(instance=name, hostname=name, mac=mac, address=address, netmask="255.255.255.0",
                        gateway=gateway, dns=["10.0.2.3"] if bridge is None else [], container_command=container)
    write_context_iso(ctx, d / "context.iso")
    overlay = make_overlay(image.rootfs, d / "disk.qcow2")
    nic = Nic(mac) if bridge is None else Nic(mac, "bridge", bridge)
    spec = InstanceSpec(
        name=name, memory_mib=memory_mib, vcpus=1, disks=(Disk(overlay),), cdroms=(d / "context.iso",),
        nics=(nic,), serial_ports=(Port("file", d / "console.log"),),
        boot=KernelBoot(image.kernel, image.initrd, image.cmdline if cmdline is None else cmdline),
        channel=GuestChannel(d / "guestd.sock", ctx.token))
    return spec, ctx


@pytest.fixture
def guest_spec_factory(guest_image, vm_dir):
    """make(name, memory_mib=..., container=...) -> (InstanceSpec, context) for a real guest."""
    return lambda name, **kw: new_guest_spec(guest_image, vm_dir, name, **kw)


@pytest.fixture(scope="session")
def target_root(vm_dir):
    return vm_dir / "target-root"


class SubprocessNode:
    """The other node of a migration: a QEMU root of its own in a child process (node_helper.py)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root, self.workdir = root, workdir

    def restore(self, save_file: Path, spec, guest_timeout: float = 0.0, save_to: Path | None = None) -> dict:
        spec_file = self.workdir / f"{spec.name}-{uuid.uuid4().hex[:6]}.xml"
        spec_file.write_text(domain_xml(spec, "qemu"))
        cmd = [sys.executable, str(HELPER), str(self.root), str(save_file), str(spec_file)]
        if guest_timeout:
            cmd += ["--guest-timeout", str(guest_timeout)]
        if save_to is not None:
            cmd += ["--save-to", str(save_to)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        assert proc.returncode == 0 and lines, f"node helper failed: {proc.stderr[-3000:]}"
        result = json.loads(lines[-1])
        assert "error" not in result, result["error"]
        return result


@pytest.fixture
def subprocess_node(target_root, vm_dir):
    return SubprocessNode(target_root, vm_dir)


def wait_for_guestd(node: LibvirtQemuDriver, name: str, timeout: float = 120.0) -> dict:
    """Block until guestd in ``name`` reports ready; its status."""
    return node.guest_channel(name).wait_ready(timeout=timeout)


def console_tail(spec: InstanceSpec) -> str:
    try:
        return Path(spec.serial_ports[0].path).read_text()[-2000:]
    except (OSError, IndexError):
        return ""


__all__ = ["wait_for_guestd", "console_tail", "dataclasses"]
