"""The guest images the QEMU tier boots, named in one place so that the tests and their background
pre-build (tests/vm/prebuild.py, started by tests/conftest.py) ask for the same recipes: the cache under
var/guest-image/ is keyed by recipe content, and the builder's per-recipe lock makes a test that needs an
image wait for the pre-build of it instead of building it twice."""
from __future__ import annotations

import os
from pathlib import Path

from guestd.image.build import GuestImage, build

REPO = Path(__file__).resolve().parents[2]

JOBS_RECIPE = """\
[image]
name = "vmtest-jobs"
version = "1.0"
vo = "bio"
description = "job service test guest: the vmgrid runtime, its job service as the grid container"

[debian]
# the package set of test_image_recipe_qemu.py's recipe: both images share one cached apt layer on the minbase
packages = ["hello"]
signature = ["hello", "python3"]

[hardware]
disk_size = "1G"
memory = 384

[container]
command = "python3 -m client.cli serve jobs -c /etc/vmgrid/jobs.toml"
port = 8443

[vmgrid]
runtime = true

[files]
"/etc/vmgrid/jobs.toml" = "jobs.toml"
"""

# test_image_recipe_qemu.py's recipe (built there with `vmgrid image build`, from the cache when pre-built here)
HELLO_RECIPE = """\
[image]
name = "vmtest-hello"
version = "2.0"
vo = "bio"
description = "recipe test: GNU hello and a file of our own"

[debian]
packages = ["hello"]
signature = ["hello", "python3"]

[hardware]
disk_size = "768M"
memory = 192

[container]
command = "/bin/sh /etc/vmgrid/facts.sh"

[vmgrid]
runtime = true

[files]
"/etc/vmgrid/facts.sh" = "facts.sh"
"""
# the guest's own view of itself, written to the serial console by the recipe's container command
HELLO_FACTS = """rt=$(python3 -c 'import client.cli, services.container.assemble, lxml, cryptography; print("runtime-ok")' 2>&1 | tail -n 1 | tr ' ' _)
rt=${rt:-no-output}
echo "FACTS $(cat /etc/debian_version) $(uname -r) $(dpkg-query -W -f='${Version}' hello) $rt $(hello)" > /dev/ttyS0
"""


def real_demo_enabled() -> bool:
    """Whether tests/vm/test_demo_real_qemu.py runs (always, unless VMGRID_TEST_REAL_DEMO=0)."""
    return os.environ.get("VMGRID_TEST_REAL_DEMO") != "0"


def build_jobs_image(workdir: Path, log=print) -> GuestImage:
    """The job-service guest of test_guest_jobs_qemu.py and test_migrate_qemu.py; ``workdir`` holds its recipe."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "jobs.toml").write_bytes((REPO / "guestd/image/recipes/emboss/jobs.toml").read_bytes())
    (workdir / "vmtest-jobs.toml").write_text(JOBS_RECIPE)
    return build(recipe=workdir / "vmtest-jobs.toml", log=log)


def write_hello_recipe(workdir: Path) -> Path:
    """test_image_recipe_qemu.py's recipe and its file in ``workdir``; the recipe's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "facts.sh").write_text(HELLO_FACTS)
    (workdir / "hello.toml").write_text(HELLO_RECIPE)
    return workdir / "hello.toml"


def build_all(workdir: Path, log=print) -> None:
    """Every image the selected QEMU tests boot, in the order they are first needed."""
    build(log=log)                                  # the base guest (its minbase is every image's root)
    build_jobs_image(workdir, log)
    if real_demo_enabled():
        build(recipe="emboss", log=log)
    build(recipe=write_hello_recipe(workdir / "hello"), log=log)   # its apt layer is the job-service guest's
