"""`vmgrid image …`: guest images from recipes (docs/images.md)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from client.cli import CLIError


def register(subparsers) -> None:
    image = subparsers.add_parser("image", help="build guest images from recipes",
                                  description="Build bootable guest images and their descriptors from recipes "
                                              "(docs/images.md).")
    sub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="build (or reuse from the cache) a recipe's image and descriptor",
                       description="Build a recipe's qcow2 and its descriptor (cached by the recipe's content and "
                                   "the builder's and guestd's sources). Needs root and a Debian mirror. "
                                   "Register the pair with `vmgrid repo register DESCRIPTOR IMAGE`.")
    p.add_argument("recipe", help="a recipe file (.toml) or a shipped recipe's name (base, emboss)")
    p.add_argument("--out", type=Path, help="also copy NAME.qcow2 and NAME.xml into this directory (an existing file "
                                            "there with other contents is kept: the build stops and names it)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: replace existing NAME.qcow2/NAME.xml that differ from the build's (your edits "
                        "to NAME.xml are lost)")
    p.add_argument("--cache", type=Path, help="the build cache (default var/guest-image/ in the checkout)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache holds the image")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("check", help="check a recipe without building it",
                       description="Parse and check a recipe; print it with every default filled in.")
    p.add_argument("recipe", help="a recipe file (.toml) or a shipped recipe's name")
    p.add_argument("--json", action="store_true", help="the recipe as JSON")
    p.set_defaults(func=cmd_check)


def _load(name: str):
    from guestd.image.recipe import RecipeError, load_recipe

    try:
        return load_recipe(name)
    except RecipeError as exc:
        raise CLIError(str(exc)) from None


def _recipe_dict(r) -> dict:
    return {"recipe": str(r.path), "name": r.name, "version": r.version, "vo": r.vo, "description": r.description,
            "suite": r.suite, "packages": list(r.packages), "signature": list(r.signature),
            "disk_mib": r.disk_mib, "memory": r.memory, "vcpus": r.vcpus,
            "container_command": r.container_command, "container_port": r.container_port,
            "vmgrid_runtime": r.runtime, "files": {dest: str(src) for dest, src in r.files}}


def _check_descriptor(path: Path) -> None:
    """The descriptor as the repository will read it (services/descriptor.py, wsdl/workspace.xsd)."""
    from services.descriptor import parse_descriptor
    from services.faults import VMGridFault

    try:
        parse_descriptor(path.read_bytes())
    except (OSError, VMGridFault) as exc:
        raise CLIError(f"{path}: the built descriptor is not valid: {exc}") from None


def cmd_check(args) -> int:
    recipe = _load(args.recipe)
    d = _recipe_dict(recipe)
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        for k, v in d.items():
            print(f"{k:18} {v}")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return hashlib.file_digest(fa, "sha256").digest() == hashlib.file_digest(fb, "sha256").digest()


def _copy_out(sources: list[Path], out: Path, overwrite: bool) -> list[Path]:
    """Copy the built files into ``out``. A file already there with the same bytes is kept as it is; one with
    other bytes (a descriptor the scientist edited, another disk) is refused, naming it, before anything is
    copied, unless ``overwrite``. Each copy goes to NAME.part first and replaces NAME only when complete."""
    targets = [out / src.name for src in sources]
    try:
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out}: not a directory")
        for target in targets:
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise CLIError(f"{target} is not a regular file: nothing copied (move it away)")
        differ = [t for s, t in zip(sources, targets) if t.exists() and not _same_file(s, t)]
        if differ and not overwrite:
            raise CLIError(f"{', '.join(map(str, differ))} already {'exists' if len(differ) == 1 else 'exist'} "
                           f"with other contents (your edits?): nothing copied; move {'it' if len(differ) == 1 else 'them'} "
                           f"away, choose another --out, or give --overwrite to replace")
        out.mkdir(parents=True, exist_ok=True)
        for src, target in zip(sources, targets):
            if target.exists() and _same_file(src, target):
                continue
            part = target.with_name(target.name + ".part")
            try:
                shutil.copy2(src, part)
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot copy the image into {out}: {exc.strerror or exc}") from None
    return targets


def cmd_build(args) -> int:
    from guestd.image.build import DEFAULT_CACHE, ImageBuildError, build_recipe

    recipe = _load(args.recipe)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        image = build_recipe(recipe, args.cache or DEFAULT_CACHE, force=args.force, log=log)
    except ImageBuildError as exc:
        raise CLIError(f"image {recipe.name}: {exc}") from None
    _check_descriptor(image.descriptor)
    disk, descriptor = image.rootfs, image.descriptor
    if args.out is not None:
        disk, descriptor = _copy_out([image.rootfs, image.descriptor], args.out, args.overwrite)
    manifest = json.loads((image.directory / "manifest.json").read_text())
    result = {"name": image.name, "image": str(disk), "descriptor": str(descriptor),
              "kernel": image.kernel_version, "distribution": manifest["distribution"],
              "libraries": manifest["libraries"], "size": disk.stat().st_size, "key": image.key}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"image       {result['image']}")
        print(f"descriptor  {result['descriptor']}")
        print(f"register    vmgrid repo register {result['descriptor']} {result['image']}")
    return 0
