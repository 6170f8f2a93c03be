"""Step grid: prepare the grid container of an image that hosts vmgrid's job service.

An image says it hosts the job service by shipping a template ``/etc/vmgrid/jobs.toml`` (the emboss
recipe does). With a ``grid`` object in the context (the instance's owner, the VO's admins, the
node's trusted CA files), this step

- writes the trusted CA directory ``/etc/vmgrid/certificates``,
- makes the container's own key in the guest (kept across boots) and a certificate request for it, with
  the vmgrid runtime's ``python3 -m services.jobs.guestkey`` (guestd itself has no cryptography),
- writes ``/etc/vmgrid/jobs.toml`` from the template: owner, admins, the credential's paths, the
  public URL on the leased address, the logs the owner may read (the container's, guestd's),
- holds the container step until the node answers the request: the host sends the certificate it
  issued with a ``certificate`` message (:func:`install_certificate`), which starts the container (on a
  later boot the earlier certificate serves meanwhile, and the new one restarts the container).

The request travels in this step's report (``detail.csr``), which the node reads from guestd's status.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from ..context import InstanceContext
from . import Environment, StepResult, guarded

NAME = "grid"
KEYGEN = ("python3", "-m", "services.jobs.guestkey")
KEYGEN_TIMEOUT = 120.0
MAX_CERT = 16 * 1024
HOLD = "waiting for the grid container's certificate from the node"


def paths(env: Environment) -> dict[str, Path]:
    base = env.roots.etc / "vmgrid"
    return {"template": base / "jobs.template.toml", "config": base / "jobs.toml", "trust": base / "certificates",
            "key": base / "container-key.pem", "cert": base / "container-cert.pem",
            "container_log": env.roots.log / "vmgrid-container.log", "guestd_log": env.roots.log / "guestd.log"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)          # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def dump_toml(doc: dict[str, Any]) -> str:
    """Tables of scalars and lists, nested tables as [a.b] (what a vmgrid configuration holds)."""
    out: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if name:
            out.append(f"\n[{name}]")
        out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{json.dumps(k)}" if name else json.dumps(k), v)

    table("", doc)
    return "\n".join(out).lstrip("\n") + "\n"


def _write_trust(directory: Path, files: dict[str, str]) -> None:
    partial = directory.with_name(directory.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, text in files.items():            # names checked by the context's validation
        (partial / name).write_text(text)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def _keygen(env: Environment, key: Path) -> str:
    command = env.state.get("grid_keygen", KEYGEN)
    proc = subprocess.run([*command, str(key)], capture_output=True, text=True, timeout=KEYGEN_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr.strip()[-300:]}")
    csr = proc.stdout.strip()
    if not csr.startswith("-----BEGIN CERTIFICATE REQUEST-----"):
        raise RuntimeError(f"{' '.join(command)} printed no certificate request")
    return csr + "\n"


def _prepare(ctx: InstanceContext, env: Environment) -> dict[str, Any]:
    p = paths(env)
    if ctx.grid is None:
        return {"configured": False, "why": "no grid object in the context"}
    if not p["template"].is_file():
        if not p["config"].is_file():
            return {"configured": False, "why": "the image ships no /etc/vmgrid/jobs.toml"}
        shutil.copyfile(p["config"], p["template"])     # the image's own file, kept as the template
    doc = tomllib.loads(p["template"].read_text())
    container = doc.setdefault("container", {})
    port = int(container.get("port", 8443))
    container.update(public_url=f"https://{ctx.network.address}:{port}")
    doc["security"] = {**doc.get("security", {}), "cert_dir": str(p["trust"]), "host_cert": str(p["cert"]),
                       "host_key": str(p["key"])}
    jobs = doc.setdefault("jobs", {})
    jobs.update(owner=ctx.grid.owner, admins=list(ctx.grid.admins), public_host=ctx.network.address)
    jobs["logs"] = {**jobs.get("logs", {}), "container": str(p["container_log"]), "guestd": str(p["guestd_log"])}
    _write_trust(p["trust"], ctx.grid.trust)
    csr = _keygen(env, p["key"])
    p["config"].write_text(dump_toml(doc))
    if not p["cert"].is_file():       # a certificate of an earlier boot serves until the node sends a new one
        env.state["container_hold"] = HOLD
    return {"configured": True, "port": port, "gridftp_port": int(jobs.get("gridftp_port", 2812)), "csr": csr}


def handle(ctx: InstanceContext, env: Environment) -> StepResult:
    return guarded(NAME, _prepare, ctx, env)


def install_certificate(env: Environment, message: dict[str, Any]) -> dict[str, Any]:
    """The host's ``certificate`` message: keep the certificate the node issued for the container's key and
    start the held container (or restart a running one, so it signs with the new certificate)."""
    pem = message.get("certificate")
    if not isinstance(pem, str) or len(pem) > MAX_CERT or not pem.startswith("-----BEGIN CERTIFICATE-----"):
        raise ValueError(f"certificate must be one PEM certificate of at most {MAX_CERT} bytes")
    p = paths(env)
    if not p["key"].is_file():
        raise RuntimeError("this guest made no container key (the grid step did not run)")
    partial = p["cert"].with_name(p["cert"].name + ".part")
    partial.write_text(pem)
    os.replace(partial, p["cert"])
    start = env.state.pop("container_start", None)
    env.state.pop("container_hold", None)
    if start is not None:
        start()
        return {"installed": True, "container": "started"}
    sup = env.state.get("container")
    if sup is not None and sup.proc is not None and sup.proc.poll() is None:
        sup.proc.terminate()                 # its supervisor starts it again with the new certificate
        return {"installed": True, "container": "restarting"}
    return {"installed": True, "container": "none"}


def log_to_file(env: Environment) -> None:
    """guestd's own log also goes to a file the job service shows its owner ([jobs.logs] guestd)."""
    path = paths(env)["guestd_log"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError:
        return
    handler.setFormatter(logging.Formatter("%(asctime)s guestd: %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
