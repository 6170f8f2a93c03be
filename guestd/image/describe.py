"""The descriptor of a built image, from what is really in it: the root's /etc/debian_version and
os-release, its dpkg database (dpkg-query --admindir), the kernel's own version string, the qcow2's
size and sha256. Validated against wsdl/workspace.xsd (with lxml: guestd, this builder included,
imports nothing of the services; `vmgrid image build` validates again with services/descriptor.py)."""
from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from lxml import etree

from .recipe import Recipe

WS = "http://vmgrid.org/ns/workspace/1"
SCHEMA = Path(__file__).resolve().parents[2] / "wsdl" / "workspace.xsd"
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+:~_\-]{0,63}$")
# Debian package names whose signature entry goes by the name scientists query (docs/query.md)
SIGNATURE_NAMES = {"libc6": "glibc"}


class DescribeError(RuntimeError):
    pass


def os_release(root: Path) -> dict[str, str]:
    out = {}
    for path in (root / "etc" / "os-release", root / "usr" / "lib" / "os-release"):
        if path.exists():
            for line in path.read_text().splitlines():
                if "=" in line and not line.startswith("#"):
                    k, v = line.split("=", 1)
                    out[k.strip()] = v.strip().strip('"')
            break
    return out


def distribution(root: Path) -> tuple[str, str]:
    """(name, version) of the root's distribution: debian and /etc/debian_version (e.g. 12.8)."""
    rel = os_release(root)
    name = rel.get("ID", "")
    version = rel.get("VERSION_ID", "")
    dv = root / "etc" / "debian_version"
    if dv.exists() and re.match(r"^\d+(\.\d+)*$", dv.read_text().strip()):
        version = dv.read_text().strip()
    if not name or not VERSION.match(version or "-"):
        raise DescribeError(f"cannot tell the distribution of {root} (os-release ID={name!r}, version={version!r})")
    return name, version


def installed_packages(root: Path) -> dict[str, str]:
    """Every installed package of the root with its Debian version, from its own dpkg database."""
    proc = subprocess.run(["dpkg-query", f"--admindir={root / 'var' / 'lib' / 'dpkg'}", "-W",
                           "-f", "${Package}\t${Version}\t${db:Status-Status}\n"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DescribeError(f"dpkg-query on {root}: {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        name, version, status = line.split("\t")
        if status == "installed":
            out[name] = version
    return out


def upstream_version(debian_version: str) -> str:
    """The upstream part of a Debian version: 6.6.0+dfsg-11+b1 -> 6.6.0, 1:2.36-9+deb12u9 -> 2.36."""
    v = debian_version.split(":", 1)[-1]
    if "-" in v:
        v = v.rsplit("-", 1)[0]
    v = re.split(r"[+~]", v, maxsplit=1)[0] or v
    return v if VERSION.match(v) else re.sub(r"[^A-Za-z0-9.+:~_\-]", "", v)[:64] or "0"


def library_signature(packages: dict[str, str], wanted: tuple[str, ...]) -> list[tuple[str, str]]:
    missing = [p for p in wanted if p not in packages]
    if missing:
        raise DescribeError(f"the signature names packages the image does not have: {', '.join(missing)}")
    return [(SIGNATURE_NAMES.get(p, p), upstream_version(packages[p])) for p in wanted]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def descriptor(recipe: Recipe, *, distro: tuple[str, str], kernel: str, cmdline: str,
               libraries: list[tuple[str, str]], disk_bytes: int, image: Path) -> bytes:
    """The descriptor document (UTF-8 XML) for a built image; validated against workspace.xsd."""
    E = lambda tag, *children, text=None: _el(tag, children, text)  # noqa: E731
    identity = [E("name", text=recipe.name), E("version", text=recipe.version), E("vo", text=recipe.vo)]
    if recipe.description:
        identity.append(E("description", text=recipe.description))
    hardware = [E("architecture", text="x86_64"), E("vcpus", text=str(recipe.vcpus)),
                E("memory", text=str(recipe.memory)),
                E("disk", E("role", text="root"), E("size", text=str(disk_bytes)), E("format", text="qcow2"),
                  E("bus", text="virtio"), E("target", text="vda")),
                E("cdrom", E("bus", text="ide"), E("purpose", text="context")),
                E("serialPort", E("type", text="file"), E("purpose", text="console")),
                E("nic", E("model", text="virtio"))]
    software = [E("os", text="linux"),
                E("distribution", E("name", text=distro[0]), E("version", text=distro[1])),
                E("kernel", E("version", text=kernel)),
                E("boot", E("method", text="disk"), E("cmdline", text=cmdline))]
    if libraries:
        software.append(E("librarySignature", *[E("library", E("name", text=n), E("version", text=v))
                                                  for n, v in libraries]))
    parts = [E("identity", *identity), E("hardware", *hardware), E("software", *software),
             E("image", E("format", text="qcow2"), E("sha256", text=sha256_file(image)),
               E("size", text=str(image.stat().st_size)))]
    if recipe.container_command:
        container = [E("command", text=recipe.container_command)]
        if recipe.container_port:
            container.append(E("port", text=str(recipe.container_port)))
        parts.append(E("container", *container))
    root = E("workspace", *parts)
    root.addprevious(etree.Comment(f" built by `vmgrid image build` from the recipe {recipe.path.name} "))
    schema = etree.XMLSchema(etree.parse(str(SCHEMA)))
    if not schema.validate(root):
        raise DescribeError(f"the descriptor made for {recipe.name} is not valid: {schema.error_log.last_error}")
    return etree.tostring(root.getroottree(), pretty_print=True, xml_declaration=True, encoding="UTF-8")


def _el(tag: str, children, text: str | None) -> etree._Element:
    el = etree.Element(f"{{{WS}}}{tag}", nsmap={None: WS})
    el.text = text
    el.extend(children)
    return el
