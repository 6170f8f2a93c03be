"""The action vocabulary every enforcement point asks about: one name per operation, grouped by the
service that enforces it. A policy's action patterns must match at least one known action."""
from __future__ import annotations

import re
from fnmatch import fnmatchcase

# The VMRepository's actions (services/vmrepository/registry.py).
IMAGE_ACTIONS = (
    "image.query",             # search the catalogue (results are scoped to the caller's VOs)
    "image.list-vos",          # the caller's VOs and their image counts
    "image.read",              # one image's descriptor
    "image.upload",            # get an upload location in the repository's GridFTP area
    "image.register",          # register an image (context source = upload | local)
    "image.register-for-other",  # register an image owned by someone else
    "image.duplicate",         # a new descriptor sharing the image bytes
    "image.update",            # replace a descriptor
    "image.remove",            # remove an image
    "image.hold",              # pin an image while a deployment runs from it
    "image.release",           # release a hold
)

# The VMManager's actions (the poster's deployment, freeze and migration flows).
VM_ACTIONS = (
    "vm.deploy", "vm.list", "vm.inspect", "vm.start", "vm.pause", "vm.resume", "vm.save", "vm.restore",
    "vm.shutdown", "vm.destroy", "vm.set-lifetime", "vm.migrate",
)

# Site administration of the services (nodes, caches, leases); site admins by default (the default policy's
# site-admins rule is the only one that permits them). admin.node: a VMManager's ListDomains.
ADMIN_ACTIONS = (
    "admin.node", "admin.cache", "admin.lease", "admin.repository",
)

KNOWN_ACTIONS: tuple[str, ...] = IMAGE_ACTIONS + VM_ACTIONS + ADMIN_ACTIONS

ACTION_NAME = re.compile(r"^[a-z][a-z0-9-]*(\.[a-z0-9-]+)+$")
ACTION_PATTERN = re.compile(r"^[a-z*?][a-z0-9.*?-]*$")


def matching(pattern: str, known: tuple[str, ...] | frozenset[str] = KNOWN_ACTIONS) -> list[str]:
    """The known actions an action pattern (``vm.*``, ``image.re*``, ``*``) matches."""
    return [a for a in known if fnmatchcase(a, pattern)]
