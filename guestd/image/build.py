"""Build vmgrid guest images from recipes (docs/images.md): a Debian cloud kernel, a busybox initramfs,
a debootstrap minbase root with python3, the recipe's packages and files, and guestd (PID 1 helper),
as one self-contained disk-bootable qcow2 (MBR, syslinux, kernel and initrd on a FAT boot partition,
ext4 root) plus its descriptor. Cached under var/guest-image/.

    python -m guestd.image.build [--force] [--cache DIR] [RECIPE]      (vmgrid image build RECIPE)

An image directory is keyed by a hash of the recipe's content, this builder's and guestd's sources,
so a rerun is instant and a change to any of them rebuilds. The root tree (the slow part) is cached
apart: one debootstrap minbase shared by every recipe, and per package list a layer on it that apt
fills in a chroot, keyed by the minbase's key and the package list. Needs root, debootstrap, busybox-static, cpio,
e2fsprogs, qemu-utils, syslinux, syslinux-common, mtools, apt-get and a reachable Debian mirror.
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import guestd

from .describe import DescribeError, descriptor, distribution, installed_packages, library_signature
from .disk import ROOT_DEVICE, DiskError, kernel_version, make_disk
from .recipe import Recipe, RecipeError, load_recipe
from . import runtime
from .runtime import RuntimeCopyError

SUITE = "bookworm"                   # the suite of the default mirror lookup and of the kernel (host apt)
KERNEL_META = "linux-image-cloud-amd64"
INCLUDE = ("python3",)
# Kernel modules the initramfs loads (with their dependencies): disks, NIC, guest channel, CD-ROM, power button.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "ata_piix", "sr_mod", "isofs",
           "evdev", "button")
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
        "var/lib/apt/lists", "var/log")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "var" / "guest-image"
CMDLINE = f"console=ttyS0 root={ROOT_DEVICE} rw quiet panic=1"
STALE_AFTER = 3600.0                 # seconds: a recipe's older image folders are deleted once this old


class ImageBuildError(RuntimeError):
    """The guest image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: ``rootfs`` is the whole bootable disk (boot partition + root partition),
    ``descriptor`` its workspace descriptor. The disk boots by itself (descriptor boot method disk);
    ``kernel``, ``initrd`` and ``cmdline`` are copies of what its boot partition holds, for direct
    kernel boot in tests and benchmarks."""

    directory: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    kernel_version: str
    key: str
    name: str = "base"
    descriptor: Path | None = None

    @classmethod
    def load(cls, directory: Path) -> "GuestImage":
        m = json.loads((directory / "manifest.json").read_text())
        return cls(directory, directory / "vmlinuz", directory / "initrd.img", directory / m["disk"],
                   m["cmdline"], m["kernel_version"], m["key"], m["name"], directory / m["descriptor"])


def _run(step: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise ImageBuildError(f"{step}: {' '.join(cmd[:3])} ... exited {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def source_key() -> str:
    """Hash of the builder's and guestd's sources (the recipe's content is hashed on top)."""
    h = hashlib.sha256(f"{KERNEL_META} {INCLUDE} {MODULES} {CMDLINE}".encode())
    root = Path(guestd.__file__).resolve().parent
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".sh") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def debian_mirror(files: list[Path] | None = None, suite: str = SUITE) -> str:
    """The Debian mirror apt uses on this machine (sources.list or deb822 .sources), else deb.debian.org.

    VMGRID_DEBIAN_MIRROR overrides it.
    """
    if os.environ.get("VMGRID_DEBIAN_MIRROR"):
        return os.environ["VMGRID_DEBIAN_MIRROR"]
    if files is None:
        files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                if "deb" in fields.get("Types", "").split() and suite in suites:
                    for uri in fields.get("URIs", "").split():
                        if "security" not in uri:
                            return uri.rstrip("/")
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^\]]*\]", " ", line.split("#")[0])   # drop [options]
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                    return parts[1].rstrip("/")
    return DEFAULT_MIRROR


def _kernel_package() -> str:
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", "--important", KERNEL_META], capture_output=True, text=True)
        found = re.findall(r"Depends:\s*(linux-image-\S+)", proc.stdout)
        if found:
            return found[0]
        if attempt == 0:
            _run("apt-get update", ["apt-get", "update", "-q"])
    raise ImageBuildError(f"apt knows no {KERNEL_META}")


def fetch_kernel(work: Path) -> tuple[Path, str]:
    """Download and unpack the Debian cloud kernel package; return its tree and version."""
    package = _kernel_package()
    work.mkdir(parents=True, exist_ok=True)
    _run("download the kernel", ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=work)
    deb = next(work.glob(f"{package}_*.deb"))
    tree = work / "kernel"
    _run("unpack the kernel", ["dpkg-deb", "-x", str(deb), str(tree)])
    version = package.removeprefix("linux-image-")
    return tree, version


def module_load_order(tree: Path, version: str, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to lib/modules/VERSION) in an order insmod can load them."""
    moddir = tree / "lib" / "modules" / version
    by_name: dict[str, str] = {}
    for ko in moddir.rglob("*.ko"):
        by_name[ko.name.removesuffix(".ko").replace("-", "_")] = str(ko.relative_to(moddir))
    deps: dict[str, list[str]] = {}

    def depends(path: str) -> list[str]:
        # the module's own .modinfo says what it needs: "depends=a,b" (no depmod needed)
        if path not in deps:
            found = re.search(rb"\0depends=([^\0]*)\0", (moddir / path).read_bytes())
            names = found.group(1).decode().split(",") if found and found.group(1) else []
            deps[path] = [by_name[n.replace("-", "_")] for n in names if n]
        return deps[path]

    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in depends(path):
            visit(dep)
        order.append(path)

    builtin = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif f"/{name}.ko" not in builtin:
            raise ImageBuildError(f"kernel {version} has no module {name}")
    return order


def build_initramfs(tree: Path, version: str, out: Path, work: Path) -> None:
    root = work / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise ImageBuildError("busybox is not installed (Debian package busybox-static)")
    shutil.copy2(busybox, root / "bin" / "busybox")
    order = module_load_order(tree, version, MODULES)
    moddir = tree / "lib" / "modules" / version
    for rel in order:
        dest = root / "lib" / "modules" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, dest)
    (root / "modules.load").write_text("".join(f"{rel}\n" for rel in order))
    init = root / "init"
    shutil.copy2(Path(__file__).with_name("initramfs-init.sh"), init)
    init.chmod(0o755)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    proc = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                          input="\n".join(files).encode(), capture_output=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"cpio: {proc.stderr.decode().strip()}")
    out.write_bytes(gzip.compress(proc.stdout, compresslevel=6))


def base_rootfs(cache: Path, mirror: str, suite: str = SUITE, packages: tuple[str, ...] = (), log=print) -> Path:
    """The trimmed root tree an image starts from, cached: the debootstrap minbase with python3 (every
    recipe shares it), and for a recipe with ``packages`` a layer on it, that minbase copied with the
    packages added by apt in a chroot (their Depends, no Recommends, like debootstrap's --include),
    cached by the minbase's key and the package list. A second full debootstrap per package list cost
    about three minutes; a layer costs what its packages cost."""
    minbase = _minbase(cache, mirror, suite, log)
    extra = sorted(set(p for p in packages if p not in INCLUDE))
    if not extra:
        return minbase
    key = hashlib.sha256(f"{minbase.name} apt {extra} {TRIM} {LAYER_APT}".encode()).hexdigest()[:12]
    layer = cache / f"layer-{suite}-{key}"
    with open(cache / f".lock-layer-{key}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)         # two recipes with the same packages share one layer
        if not (layer / ".complete").exists():
            _apt_layer(minbase, layer, cache, extra, log)
    return layer


def _minbase(cache: Path, mirror: str, suite: str, log) -> Path:
    key = hashlib.sha256(f"{suite} minbase {INCLUDE} {TRIM}".encode()).hexdigest()[:12]
    base = cache / f"base-{suite}-{key}"
    with open(cache / f".lock-base-{key}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)         # every recipe shares one debootstrap
        if not (base / ".complete").exists():
            _debootstrap(base, cache, mirror, suite, INCLUDE, log)
    return base


def _debootstrap(base: Path, cache: Path, mirror: str, suite: str, include: tuple[str, ...], log) -> None:
    log(f"debootstrap {suite} with {', '.join(include)} (cached in {base.name} afterwards)")
    shutil.rmtree(base, ignore_errors=True)
    tmp = cache / f"base-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        _run("debootstrap", ["debootstrap", "--variant=minbase", f"--include={','.join(include)}",
                             f"--cache-dir={debs}", suite, str(tmp), mirror])
    except ImageBuildError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for rel in TRIM:
        shutil.rmtree(tmp / rel, ignore_errors=True)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
    (tmp / ".complete").write_text(mirror + "\n")
    tmp.rename(base)


# apt in the layer's chroot: no daemons started (policy-rc.d), no Recommends, the .deb files kept in
# the builder's cache (the same folder debootstrap fills), the host's DNS for the mirror. It runs in a
# mount namespace of its own, so its bind mounts and /proc vanish with it, however it ends.
LAYER_APT = """set -e
mount --make-rprivate /
mount --bind "$DEBS" "$ROOT/var/cache/apt/archives"
mount -t proc proc "$ROOT/proc"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
chroot "$ROOT" apt-get -q -o Acquire::Retries=3 update
chroot "$ROOT" apt-get -q -y -o Acquire::Retries=3 -o APT::Sandbox::User=root --no-install-recommends install "$@"
"""


def _apt_layer(minbase: Path, layer: Path, cache: Path, packages: list[str], log) -> None:
    log(f"layer on {minbase.name}: apt-get install {' '.join(packages)} (cached in {layer.name} afterwards)")
    shutil.rmtree(layer, ignore_errors=True)
    tmp = cache / f"layer-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    debs = cache / "debs"
    (debs / "partial").mkdir(parents=True, exist_ok=True)
    try:
        _run("copy the minbase", ["cp", "-a", str(minbase), str(tmp)])
        (tmp / ".complete").unlink()
        for d in ("var/cache/apt/archives", "var/lib/apt/lists/partial", "var/log/apt"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        resolv = tmp / "etc" / "resolv.conf"
        kept = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        policy = tmp / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        _run("apt-get install in the layer", ["unshare", "--mount", "--fork", "env", f"ROOT={tmp}", f"DEBS={debs}",
                                              "sh", "-c", LAYER_APT, "apt-layer", *packages])
        policy.unlink()
        resolv.unlink()
        if kept is not None:
            resolv.write_bytes(kept)
    except (ImageBuildError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ImageBuildError(str(exc)) from None
    for rel in TRIM:
        shutil.rmtree(tmp / rel, ignore_errors=True)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
    (tmp / ".complete").write_text(f"{minbase.name} + {' '.join(packages)}\n")
    tmp.rename(layer)


def install_guestd(rootfs: Path, hostname: str = "vmgrid-guest") -> None:
    """Copy guestd (without this image builder) into the guest's dist-packages."""
    src = Path(guestd.__file__).resolve().parent
    dest = rootfs / "usr" / "lib" / "python3" / "dist-packages" / "guestd"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "image", "*.pyc"))
    (rootfs / "etc" / "hostname").write_text(hostname + "\n")
    (rootfs / "var" / "log").mkdir(parents=True, exist_ok=True)


def install_files(rootfs: Path, files: tuple[tuple[str, Path], ...]) -> None:
    """The recipe's extra files, at their paths in the guest (parents made, mode kept)."""
    for dest, src in files:
        target = rootfs / dest.lstrip("/")
        if target.is_symlink() or target.is_dir():
            raise ImageBuildError(f"recipe file {dest}: the image has a directory or link there")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def image_key(recipe: Recipe) -> str:
    """The cache key of a recipe's image: its content, the builder's and guestd's sources, and the
    vmgrid runtime's sources and pins when the recipe asks for it."""
    h = hashlib.sha256((recipe.content_key() + source_key()).encode())
    if recipe.runtime:
        h.update(runtime.key().encode())
        for pkg in (*runtime.PACKAGES, "wsdl"):
            for f in sorted((runtime.REPO / pkg).rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                    h.update(str(f.relative_to(runtime.REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_recipe(recipe: Recipe, cache: Path = DEFAULT_CACHE, force: bool = False, log=print) -> GuestImage:
    """Return the cached image of ``recipe`` for the current sources, building it first if needed."""
    if os.geteuid() != 0:
        raise ImageBuildError("building a guest image needs root (debootstrap)")
    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        key = image_key(recipe)
    except RuntimeCopyError as exc:
        raise ImageBuildError(str(exc)) from None
    final = cache / f"{recipe.name}-{key}"
    prune_abandoned_work(cache)
    with open(cache / f".lock-{recipe.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)         # one builder per recipe at a time (pytest-xdist workers)
        if (final / "manifest.json").exists() and not force:
            return GuestImage.load(final)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        work = cache / f"work-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            mirror = debian_mirror(suite=recipe.suite)
            log(f"image {recipe.name} ({key}): kernel from apt, {recipe.suite} root from {mirror}")
            t = time.monotonic()
            tree, _ = fetch_kernel(work / "kernel-deb")
            timings["kernel"] = time.monotonic() - t
            t = time.monotonic()
            packages = recipe.packages
            if recipe.runtime:
                packages += tuple(p for p in runtime.DEBIAN_PACKAGES if p not in packages)
            base = base_rootfs(cache, mirror, recipe.suite, packages, log)
            timings["root"] = time.monotonic() - t
            t = time.monotonic()
            out = work / "image"
            out.mkdir()
            vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
            version = kernel_version(vmlinuz)
            shutil.copy2(vmlinuz, out / "vmlinuz")
            build_initramfs(tree, version, out / "initrd.img", work)
            timings["initramfs"] = time.monotonic() - t
            t = time.monotonic()
            staging = work / "rootfs"
            _run("copy the base rootfs", ["cp", "-a", str(base), str(staging)])
            (staging / ".complete").unlink(missing_ok=True)
            install_guestd(staging)
            pins: list[str] = []
            if recipe.runtime:
                pins = runtime.install(staging)
            install_files(staging, recipe.files)
            distro = distribution(staging)
            libraries = library_signature(installed_packages(staging), recipe.signature)
            disk = out / f"{recipe.name}.qcow2"
            make_disk(disk, work, staging, out / "vmlinuz", out / "initrd.img", CMDLINE, recipe.disk_mib)
            timings["disk"] = time.monotonic() - t
            xml = descriptor(recipe, distro=distro, kernel=version, cmdline=CMDLINE, libraries=libraries,
                             disk_bytes=recipe.disk_mib * 1024 * 1024, image=disk)
            (out / f"{recipe.name}.xml").write_bytes(xml)
            manifest = {"key": key, "name": recipe.name, "recipe": str(recipe.path), "suite": recipe.suite,
                        "mirror": mirror, "kernel_version": version, "cmdline": CMDLINE,
                        "disk": disk.name, "descriptor": f"{recipe.name}.xml", "modules": list(MODULES),
                        "distribution": list(distro), "libraries": dict(libraries), "runtime": pins,
                        "timings": timings, "total_seconds": time.monotonic() - t0,
                        "disk_bytes": disk.stat().st_size}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            out.rename(final)
            prune_stale(cache, recipe.name, final)
            log(f"image {recipe.name} built in {manifest['total_seconds']:.1f} s: {final}")
            return GuestImage.load(final)
        except (DiskError, DescribeError, RuntimeCopyError) as exc:
            raise ImageBuildError(str(exc)) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if work.exists():                    # rmtree can trip over its own unlinks here; rm does not
                subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def prune_abandoned_work(cache: Path) -> list[Path]:
    """Delete the work folders (``work-<key>-<pid>``, a gigabyte each) of builders that are gone: a builder
    ended by SIGTERM or SIGKILL (a test session's background prebuild stopped at its end, a killed
    `vmgrid image build`) never reaches its own clean-up."""
    gone = []
    for old in cache.glob("work-*-*"):
        pid = old.name.rsplit("-", 1)[1]
        if old.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                subprocess.run(["rm", "-rf", "--one-file-system", str(old)], check=False)
            gone.append(old)
    return gone


def prune_stale(cache: Path, name: str, keep: Path, min_age: float = STALE_AFTER) -> list[Path]:
    """Delete the recipe's other image folders built more than ``min_age`` seconds ago. Registered copies
    boot on (they carry their boot partition); a younger folder may still back a running test session's
    overlays or direct kernel boot, so it stays until a later build."""
    stale = re.compile(rf"{re.escape(name)}-[0-9a-f]{{16}}|[0-9a-f]{{16}}")
    gone = []
    for old in cache.iterdir():
        if old.is_dir() and stale.fullmatch(old.name) and old != keep and time.time() - old.stat().st_mtime > min_age:
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old)
    return gone


def build(cache: Path = DEFAULT_CACHE, force: bool = False, log=print, recipe: str | Path = "base") -> GuestImage:
    """The image of a recipe (default: the shipped ``base`` guest the tests boot)."""
    return build_recipe(load_recipe(recipe), cache, force, log)

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached image is current")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache directory (default {DEFAULT_CACHE})")
    ap.add_argument("recipe", nargs="?", default="base", help="a recipe file or a shipped recipe's name (default base)")
    args = ap.parse_args(argv)
    try:
        image = build(args.cache, args.force, recipe=args.recipe)
    except (ImageBuildError, RecipeError) as exc:
        print(f"guest image: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) for k, v in asdict(image).items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
