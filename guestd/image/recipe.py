"""Image recipes: a TOML file saying what goes into a guest image (docs/images.md), parsed and checked
before anything is built. Every error names the file and the key."""
from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}$")          # workspace.xsd NameType
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+:~_\-]{0,63}$")       # workspace.xsd VersionType
VO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
SUITE = re.compile(r"^[a-z]{3,20}$")
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9.+\-]{1,63}$")                  # Debian policy 5.6.1
SIZE = re.compile(r"^(\d+)([MG])$")
SUITES_WITH_PYTHON311 = ("bookworm",)                                 # the vmgrid runtime's wheels are cp311

# key: (type, default); a default of REQUIRED means the recipe must set it.
REQUIRED = object()
_KIND_WORDS = {str: "a string", int: "a whole number", bool: "true or false", list: "a list"}   # as a TOML user says it
SCHEMA: dict[str, dict[str, tuple[type, object]]] = {
    "image": {"name": (str, REQUIRED), "version": (str, "1.0"), "vo": (str, REQUIRED), "description": (str, "")},
    "debian": {"suite": (str, "bookworm"), "packages": (list, []), "signature": (list, None)},
    "hardware": {"disk_size": (str, "1G"), "memory": (int, 256), "vcpus": (int, 1)},
    "container": {"command": (str, ""), "port": (int, 0)},
    "vmgrid": {"runtime": (bool, False)},
    "files": {},
}
MIN_DISK_MIB = 256
MAX_DISK_MIB = 64 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024


class RecipeError(ValueError):
    """A recipe that cannot be built; the message names the file and the key."""


@dataclass(frozen=True)
class Recipe:
    """A checked recipe. ``files`` maps a path in the guest to a file on this host."""

    path: Path
    name: str
    vo: str
    version: str = "1.0"
    description: str = ""
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    signature: tuple[str, ...] = ()
    disk_mib: int = 1024
    memory: int = 256
    vcpus: int = 1
    container_command: str = ""
    container_port: int = 0
    runtime: bool = False
    files: tuple[tuple[str, Path], ...] = field(default=())

    def content_key(self) -> str:
        """A hash of everything the recipe puts into the image (its values and its files' bytes)."""
        h = hashlib.sha256()
        for k in ("name", "vo", "version", "description", "suite", "packages", "signature", "disk_mib",
                  "memory", "vcpus", "container_command", "container_port", "runtime"):
            h.update(f"{k}={getattr(self, k)!r}\n".encode())
        for dest, src in self.files:
            h.update(dest.encode() + b"\0" + src.read_bytes() + b"\0")
        return h.hexdigest()


def find_recipe(name_or_path: str) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (guestd/image/recipes/NAME.toml)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.toml")))
    raise RecipeError(f"no recipe {name_or_path!r}: give a .toml file or one of the shipped recipes ({known})")


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(str(name_or_path))
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    return parse_recipe(data, path)


def parse_recipe(data: dict, path: Path) -> Recipe:
    """Check a parsed recipe against SCHEMA and the rules of each key; fill the defaults."""
    def bad(key: str, message: str) -> RecipeError:
        return RecipeError(f"{path}: {key}: {message}")

    values: dict[str, dict] = {}
    for section, value in data.items():
        if section not in SCHEMA:
            raise bad(section, f"unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(value, dict):
            raise bad(section, "must be a table ([{}])".format(section))
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        values[section] = {}
        if section == "files":
            continue
        for key in given:
            if key not in keys:
                raise bad(f"{section}.{key}", f"unknown key (known: {', '.join(keys)})")
        for key, (kind, default) in keys.items():
            if key not in given:
                if default is REQUIRED:
                    raise bad(f"{section}.{key}", "missing (required)")
                values[section][key] = default
                continue
            v = given[key]
            if kind is int and (isinstance(v, bool) or not isinstance(v, int)) or not isinstance(v, kind):
                shown = str(v).lower() if isinstance(v, bool) else repr(v)        # TOML's true, not Python's
                raise bad(f"{section}.{key}", f"must be {_KIND_WORDS[kind]}, not {shown}")
            values[section][key] = v

    img, deb, hw, ct = values["image"], values["debian"], values["hardware"], values["container"]
    if not NAME.match(img["name"]):
        raise bad("image.name", f"{img['name']!r} must be 1-128 characters of [A-Za-z0-9._+-], starting alphanumeric")
    if not VERSION.match(img["version"]):
        raise bad("image.version", f"{img['version']!r} is not a version such as 1.0")
    if not VO.match(img["vo"]):
        raise bad("image.vo", f"{img['vo']!r} must be 1-64 characters of [A-Za-z0-9._-]")
    if len(img["description"]) > 4096:
        raise bad("image.description", "longer than 4096 characters")
    if not SUITE.match(deb["suite"]):
        raise bad("debian.suite", f"{deb['suite']!r} is not a Debian suite name such as bookworm")
    for key in ("packages", "signature"):
        for p in deb[key] or []:
            if not isinstance(p, str) or not PACKAGE.match(p):
                raise bad(f"debian.{key}", f"{p!r} is not a Debian package name")
    packages = tuple(dict.fromkeys(deb["packages"]))
    signature = tuple(dict.fromkeys(deb["signature"] if deb["signature"] is not None
                                    else [*packages, "python3", "libc6"]))
    if len(signature) > 256:
        raise bad("debian.signature", "at most 256 packages (workspace.xsd librarySignature)")
    m = SIZE.match(hw["disk_size"])
    if not m:
        raise bad("hardware.disk_size", f"{hw['disk_size']!r} must be a size such as 512M or 2G")
    disk_mib = int(m.group(1)) * (1024 if m.group(2) == "G" else 1)
    if not MIN_DISK_MIB <= disk_mib <= MAX_DISK_MIB:
        raise bad("hardware.disk_size", f"{hw['disk_size']} is outside {MIN_DISK_MIB}M..{MAX_DISK_MIB // 1024}G")
    if not 64 <= hw["memory"] <= 4194304:
        raise bad("hardware.memory", f"{hw['memory']} MiB: must be at least 64 (guestd needs python3)")
    if not 1 <= hw["vcpus"] <= 256:
        raise bad("hardware.vcpus", f"{hw['vcpus']}: must be between 1 and 256")
    if len(ct["command"]) > 1024 or any(ord(c) < 32 for c in ct["command"]):
        raise bad("container.command", "must be one printable line of at most 1024 characters")
    if not 0 <= ct["port"] <= 65535:
        raise bad("container.port", f"{ct['port']} is not a TCP port")
    if ct["port"] and not ct["command"]:
        raise bad("container.port", "a port without a container command")
    runtime = values["vmgrid"]["runtime"]
    if runtime and deb["suite"] not in SUITES_WITH_PYTHON311:
        raise bad("vmgrid.runtime", f"needs python3.11 in the guest: suite {', '.join(SUITES_WITH_PYTHON311)}")
    files = []
    for dest, src in data.get("files", {}).items():
        key = f"files.{dest!r}"
        if not isinstance(src, str):
            raise bad(key, "must be the path of a file on this host (relative to the recipe)")
        d = PurePosixPath(dest)
        if not d.is_absolute() or ".." in d.parts or str(d) in ("/",) or any(ord(c) < 32 for c in dest):
            raise bad(key, "the path in the guest must be absolute, without '..'")
        source = (path.parent / src).resolve()
        if not source.is_file():
            raise bad(key, f"{source} is not a file")
        if source.stat().st_size > MAX_FILE_BYTES:
            raise bad(key, f"{source} is larger than {MAX_FILE_BYTES // 2**20} MiB")
        files.append((str(d), source))
    return Recipe(path=path, name=img["name"], vo=img["vo"], version=img["version"],
                  description=img["description"], suite=deb["suite"], packages=packages, signature=signature,
                  disk_mib=disk_mib, memory=hw["memory"], vcpus=hw["vcpus"], container_command=ct["command"],
                  container_port=ct["port"], runtime=runtime, files=tuple(files))
