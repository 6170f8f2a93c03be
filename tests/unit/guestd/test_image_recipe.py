"""Image recipes: parsing, defaults and a clear error for every kind of bad recipe; the pure parts of
the disk (partition table, kernel version) and the descriptor (versions from dpkg). The whole build
runs in tests/vm/test_image_recipe_qemu.py (it needs root and a Debian mirror)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from client.cli import main as vmgrid
from guestd.image import disk
from guestd.image.describe import DescribeError, library_signature, upstream_version
from guestd.image.recipe import RECIPES_DIR, RecipeError, load_recipe

MINIMAL = '[image]\nname = "mini"\nvo = "bio"\n'


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_minimal_recipe_gets_every_default(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert (r.name, r.vo, r.version, r.description) == ("mini", "bio", "1.0", "")
    assert (r.suite, r.packages, r.signature) == ("bookworm", (), ("python3", "libc6"))
    assert (r.disk_mib, r.memory, r.vcpus) == (1024, 256, 1)
    assert (r.container_command, r.container_port, r.runtime, r.files) == ("", 0, False, ())


def test_the_shipped_recipes_parse():
    base, emboss = load_recipe("base"), load_recipe("emboss")
    assert base.packages == () and not base.runtime and base.container_command == ""
    assert "emboss" in emboss.packages and emboss.runtime and emboss.container_command
    assert emboss.signature[0] == "emboss"
    assert {dest for dest, _ in emboss.files} == {"/etc/vmgrid/jobs.toml"}
    assert {p.stem for p in RECIPES_DIR.glob("*.toml")} == {"base", "emboss"}


def test_packages_default_into_the_signature_and_files_resolve_beside_the_recipe(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.toml").write_text("x = 1\n")
    r = load_recipe(write(tmp_path, MINIMAL + '[debian]\npackages = ["emboss", "ncbi-blast+", "emboss"]\n'
                                              '[files]\n"/etc/a.toml" = "conf/a.toml"\n'))
    assert r.packages == ("emboss", "ncbi-blast+")
    assert r.signature == ("emboss", "ncbi-blast+", "python3", "libc6")
    assert r.files == (("/etc/a.toml", (tmp_path / "conf" / "a.toml").resolve()),)


def test_the_content_key_follows_values_and_file_bytes(tmp_path):
    (tmp_path / "f").write_text("one")
    text = MINIMAL + '[files]\n"/etc/f" = "f"\n'
    k1 = load_recipe(write(tmp_path, text)).content_key()
    assert load_recipe(write(tmp_path, text)).content_key() == k1
    (tmp_path / "f").write_text("two")
    k2 = load_recipe(write(tmp_path, text)).content_key()
    k3 = load_recipe(write(tmp_path, text + '[hardware]\nmemory = 512\n')).content_key()
    assert len({k1, k2, k3}) == 3


BAD = [
    ("", "image.name: missing"),
    ('[image]\nname = "x"\n', "image.vo: missing"),
    (MINIMAL + "[extra]\na = 1\n", "extra: unknown section"),
    (MINIMAL.replace('vo = "bio"', 'vo = "bio"\ncolour = "red"'), "image.colour: unknown key"),
    ('[image]\nname = "bad name"\nvo = "bio"\n', "image.name: 'bad name' must be"),
    ('[image]\nname = "x"\nvo = "b/o"\n', "image.vo"),
    ('[image]\nname = "x"\nvo = "bio"\nversion = 2\n', "image.version: must be a string, not 2"),
    (MINIMAL + '[debian]\npackages = "emboss"\n', "debian.packages: must be a list, not 'emboss'"),
    (MINIMAL + '[debian]\npackages = ["Emboss!"]\n', "debian.packages: 'Emboss!' is not a Debian package name"),
    (MINIMAL + '[debian]\nsuite = "Bookworm 12"\n', "debian.suite"),
    (MINIMAL + '[hardware]\ndisk_size = "2T"\n', "hardware.disk_size: '2T' must be a size"),
    (MINIMAL + '[hardware]\ndisk_size = "100M"\n', "hardware.disk_size: 100M is outside"),
    (MINIMAL + '[hardware]\nmemory = 32\n', "hardware.memory: 32 MiB"),
    (MINIMAL + '[hardware]\nmemory = true\n', "hardware.memory: must be a whole number, not true"),
    (MINIMAL + '[hardware]\nvcpus = 0\n', "hardware.vcpus"),
    (MINIMAL + '[container]\nport = 8443\n', "container.port: a port without a container command"),
    (MINIMAL + '[container]\ncommand = "a\\nb"\n', "container.command: must be one printable line"),
    (MINIMAL + '[container]\ncommand = "x"\nport = 70000\n', "container.port: 70000 is not a TCP port"),
    (MINIMAL + '[debian]\nsuite = "trixie"\n[vmgrid]\nruntime = true\n', "vmgrid.runtime: needs python3.11"),
    (MINIMAL + '[vmgrid]\nruntime = "yes"\n', "vmgrid.runtime: must be true or false, not 'yes'"),
    (MINIMAL + '[files]\n"etc/x" = "r.toml"\n', "the path in the guest must be absolute"),
    (MINIMAL + '[files]\n"/etc/../x" = "r.toml"\n', "without '..'"),
    (MINIMAL + '[files]\n"/etc/x" = "missing.txt"\n', "missing.txt is not a file"),
    (MINIMAL + '[files]\n"/etc/x" = 3\n', "must be the path of a file"),
    ('files = 3\n' + MINIMAL, "files: must be a table"),
    ('[image\nname = "x"', "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_recipe_gets_an_error_naming_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unknown_recipe_names_and_unreadable_files(tmp_path):
    with pytest.raises(RecipeError, match="no recipe 'nope'.*base, emboss"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "absent.toml")


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, capsys):
    path = write(tmp_path, MINIMAL + '[hardware]\nmemory = "lots"\n')
    assert vmgrid(["image", "check", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"vmgrid: {path}: hardware.memory: must be a whole number, not 'lots'"
    assert vmgrid(["image", "build", str(path)]) == 1
    assert capsys.readouterr().err.strip() == err
    assert vmgrid(["image", "check", "emboss", "--json"]) == 0
    assert '"vmgrid_runtime": true' in capsys.readouterr().out


def test_debian_versions_become_upstream_versions():
    assert upstream_version("6.6.0+dfsg-11+b1") == "6.6.0"
    assert upstream_version("2.36-9+deb12u9") == "2.36"
    assert upstream_version("1:2.12.0+ds-3") == "2.12.0"
    assert upstream_version("3.11.2-1+b1") == "3.11.2"
    assert upstream_version("2.12-1") == "2.12"
    assert upstream_version("5.2~rc1-1") == "5.2"


def test_the_signature_comes_from_installed_packages_only():
    installed = {"emboss": "6.6.0+dfsg-11", "libc6": "2.36-9", "python3": "3.11.2-1+b1"}
    assert library_signature(installed, ("emboss", "libc6")) == [("emboss", "6.6.0"), ("glibc", "2.36")]
    with pytest.raises(DescribeError, match="does not have: ncbi-blast\\+"):
        library_signature(installed, ("emboss", "ncbi-blast+"))


def test_the_disk_has_a_bootable_fat_partition_then_the_root(tmp_path):
    boot = tmp_path / "boot.fat"
    boot.write_bytes(b"B" * 1024 + b"\0" * (4 * 2**20 - 1024))
    root = tmp_path / "root.ext4"
    root.write_bytes(b"\0" * 2**20 + b"R" * 512 + b"\0" * (2**20 - 512))
    raw = tmp_path / "disk.raw"
    total = 16 * 2**20 // 512
    disk.assemble(raw, boot, root, total)
    data = raw.read_bytes()
    assert len(data) == total * 512 and data[510:512] == b"\x55\xaa"
    assert data[:440] == disk.MBR_CODE.read_bytes()[:440]          # syslinux' MBR boot code
    entries = [struct.unpack_from("<B3sB3sII", data, 446 + 16 * i) for i in range(4)]
    (flag1, _, type1, _, start1, count1), (flag2, _, type2, _, start2, count2) = entries[:2]
    assert (flag1, type1, start1, count1) == (0x80, 0x0E, 2048, 4 * 2**20 // 512)
    assert (flag2, type2, start2) == (0, 0x83, 2048 + count1) and start2 + count2 == total
    assert entries[2][2] == entries[3][2] == 0
    assert data[2048 * 512:2048 * 512 + 1024] == b"B" * 1024
    assert data[start2 * 512 + 2**20:start2 * 512 + 2**20 + 512] == b"R" * 512
    with pytest.raises(disk.DiskError, match="does not fit"):
        disk.assemble(raw, boot, root, 2048 + count1 + 100)


def test_the_kernel_version_comes_from_the_bzimage_header(tmp_path):
    header = bytearray(0x4000)
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x20E, 0x1000)
    version = b"6.1.0-27-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0"
    header[0x1200:0x1200 + len(version)] = version
    (tmp_path / "vmlinuz").write_bytes(bytes(header))
    assert disk.kernel_version(tmp_path / "vmlinuz") == "6.1.0-27-cloud-amd64"
    (tmp_path / "junk").write_bytes(b"\0" * 4096)
    with pytest.raises(disk.DiskError, match="not a Linux bzImage"):
        disk.kernel_version(tmp_path / "junk")


def test_a_disk_too_small_for_the_files_says_which_size_would_do(tmp_path):
    staging = tmp_path / "root"
    staging.mkdir()
    with open(staging / "big", "wb") as f:
        f.truncate(300 * 2**20)
        f.seek(300 * 2**20 - 1)
        f.write(b"x")
    with pytest.raises(disk.DiskError, match=r"too much for a 256 MiB disk: set hardware.disk_size to at least 3\d\dM"):
        disk.make_disk(tmp_path / "d.qcow2", tmp_path, staging, tmp_path / "k", tmp_path / "i", "x", 256)


def test_the_vmgrid_runtime_is_the_pinned_distributions_and_imports_on_its_own(tmp_path):
    import subprocess

    from guestd.image import runtime

    names = {d.metadata["Name"].lower(): d.version for d in runtime.requirements()}
    assert names["lxml"] == "6.1.3" and names["zeep"] == "4.3.3" and "cryptography" in names
    assert "matplotlib" not in names and "numpy" not in names and "pytest" not in names   # no extras
    pins = runtime.install(tmp_path)
    target = tmp_path / runtime.GUEST_DIR
    assert (tmp_path / "usr/lib/python3/dist-packages/vmgrid.pth").read_text() == f"/{runtime.GUEST_DIR}\n"
    assert (target / "vmgrid-requirements.txt").read_text().splitlines() == pins
    assert not list(target.rglob("__pycache__")) and (target / "wsdl" / "workspace.xsd").is_file()
    # Debian's own python3.11, isolated from this virtual environment, imports from the copy alone
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); import client.cli, lxml.etree, signxml, zeep, "
            "services.descriptor; print(client.cli.__file__)")
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(target / "client" / "cli.py")


def test_a_rebuild_prunes_only_the_recipes_older_images_that_are_old_enough(tmp_path):
    import os
    import time

    from guestd.image.build import prune_stale

    keep, old, young, other = (tmp_path / n for n in ("r-" + "a" * 16, "r-" + "b" * 16, "r-" + "c" * 16,
                                                        "s-" + "d" * 16))
    for d in (keep, old, young, other, tmp_path / "base-bookworm-0123456789ab"):
        d.mkdir()
    long_ago = time.time() - 7200
    for d in (old, other, tmp_path / "base-bookworm-0123456789ab"):
        os.utime(d, (long_ago, long_ago))
    assert prune_stale(tmp_path, "r", keep, min_age=3600) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [keep.name, young.name, other.name, "base-bookworm-0123456789ab"])


def test_packages_go_on_as_a_layer_over_the_one_minbase_keyed_by_its_name_and_the_sorted_packages(tmp_path,
                                                                                                  monkeypatch):
    """Without root or a mirror: the debootstrap and the apt run are recorded, not run."""
    from guestd.image import build as b

    ran = []

    def debootstrap(base, cache, mirror, suite, include, log):
        ran.append(("debootstrap", include))
        base.mkdir()
        (base / ".complete").write_text(mirror)

    def apt_layer(minbase, layer, cache, packages, log):
        ran.append(("apt", minbase.name, tuple(packages)))
        layer.mkdir()
        (layer / ".complete").write_text("x")

    monkeypatch.setattr(b, "_debootstrap", debootstrap)
    monkeypatch.setattr(b, "_apt_layer", apt_layer)
    base = b.base_rootfs(tmp_path, "http://mirror", "bookworm", (), log=lambda m: None)
    assert base.name.startswith("base-bookworm-") and ran == [("debootstrap", ("python3",))]
    a = b.base_rootfs(tmp_path, "http://mirror", "bookworm", ("libvirt0", "hello", "python3"), log=lambda m: None)
    same = b.base_rootfs(tmp_path, "http://mirror", "bookworm", ("hello", "libvirt0"), log=lambda m: None)
    other = b.base_rootfs(tmp_path, "http://mirror", "bookworm", ("emboss",), log=lambda m: None)
    assert a == same and a.name.startswith("layer-bookworm-") and other != a
    assert ran[1:] == [("apt", base.name, ("hello", "libvirt0")), ("apt", base.name, ("emboss",))]  # one debootstrap


def cached_build(tmp_path: Path) -> tuple[Path, Path, object]:
    """A recipe and a build cache that already holds its image (the cache entry `build_recipe` returns without
    building; the build itself needs a Debian mirror and minutes, and runs in tests/vm/test_image_recipe_qemu.py):
    a small qcow2 and the example descriptor, as a build leaves them."""
    import json
    import subprocess

    from guestd.image.build import image_key

    recipe_path = write(tmp_path, MINIMAL)
    cache = tmp_path / "cache"
    entry = cache / f"mini-{image_key(load_recipe(recipe_path))}"
    entry.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(entry / "mini.qcow2"), "8M"], check=True)
    from services.container.contract import WSDL_DIR

    (entry / "mini.xml").write_bytes((WSDL_DIR / "examples" / "debian12-emboss.xml").read_bytes())
    (entry / "manifest.json").write_text(json.dumps({
        "disk": "mini.qcow2", "descriptor": "mini.xml", "cmdline": "console=ttyS0", "kernel_version": "6.1.0",
        "key": entry.name.split("-", 1)[1], "name": "mini", "distribution": "debian 12", "libraries": {}}))
    return recipe_path, cache, entry


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="vmgrid image build needs root")
def test_image_build_out_keeps_an_edited_descriptor_unless_asked_to_overwrite(tmp_path, capsys):
    recipe, cache, entry = cached_build(tmp_path)
    out = tmp_path / "images"
    args = ["image", "build", str(recipe), "--cache", str(cache), "--out", str(out)]
    assert vmgrid(args) == 0
    capsys.readouterr()
    built = (entry / "mini.xml").read_bytes()
    assert (out / "mini.xml").read_bytes() == built and (out / "mini.qcow2").is_file()
    assert vmgrid(args) == 0                        # the same bytes there: kept, nothing to say
    capsys.readouterr()

    edited = built.replace(b"</description>", b" (my notes)</description>", 1)
    assert edited != built
    (out / "mini.xml").write_bytes(edited)          # the scientist's own edits
    disk_before = (out / "mini.qcow2").stat().st_mtime_ns
    assert vmgrid(args) == 1
    err = capsys.readouterr().err
    assert str(out / "mini.xml") in err and "--overwrite" in err and "nothing copied" in err, err
    assert (out / "mini.xml").read_bytes() == edited
    assert (out / "mini.qcow2").stat().st_mtime_ns == disk_before
    assert sorted(p.name for p in out.iterdir()) == ["mini.qcow2", "mini.xml"]     # no .part left

    assert vmgrid(args + ["--overwrite"]) == 0
    assert (out / "mini.xml").read_bytes() == built
