"""Step container: start the grid container command from the context and keep it running
(restart policy always / on-failure / never, with a growing back-off), reporting each change."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any, Callable

from ..context import ContainerContext, InstanceContext
from . import Environment, StepResult, guarded

NAME = "container"
MAX_BACKOFF = 30.0


class Supervisor:
    """Runs one command, restarts it by policy, and tells ``on_change`` about every start and exit."""

    def __init__(self, spec: ContainerContext, log_path: os.PathLike,
                 on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.spec, self.log_path, self.on_change = spec, log_path, on_change
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.spawn_seconds: float | None = None     # the first start's Popen (recontext_seconds shows it)

    def start(self) -> int:
        t = time.monotonic()
        pid = self._spawn()
        self.spawn_seconds = time.monotonic() - t
        self._thread = threading.Thread(target=self._watch, name="guestd-container", daemon=True)
        self._thread.start()
        return pid

    def _spawn(self) -> int:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **self.spec.environment}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(list(self.spec.command), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self.proc.pid

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stopped.is_set():
            started = time.monotonic()
            rc = self.proc.wait()
            self.last_exit = rc
            if self._stopped.is_set():
                break
            again = self.spec.restart == "always" or (self.spec.restart == "on-failure" and rc != 0)
            self._notify(event="exited", restart=again)
            if not again:
                break
            backoff = 0.5 if time.monotonic() - started > MAX_BACKOFF else min(backoff * 2, MAX_BACKOFF)
            if self._stopped.wait(backoff):
                break
            try:
                self._spawn()
                self.restarts += 1
                self._notify(event="restarted")
            except OSError as exc:
                self._notify(event="failed", error=str(exc))
                break

    def _notify(self, **extra: Any) -> None:
        if self.on_change is not None:
            self.on_change({**self.status(), **extra})

    def status(self) -> dict[str, Any]:
        running = self.proc is not None and self.proc.poll() is None
        nice = None          # the container's CPU priority: never guestd's raised one (guestd/rewake.py)
        if running:
            try:
                nice = os.getpriority(os.PRIO_PROCESS, self.proc.pid)
            except OSError:
                pass
        return {"command": list(self.spec.command), "pid": self.proc.pid if self.proc else None,
                "running": running, "restarts": self.restarts, "last_exit": self.last_exit, "nice": nice}

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._thread is not None:
            self._thread.join(timeout)


def _start(ctx: InstanceContext, env: Environment) -> dict[str, Any]:
    if ctx.container is None:
        return {"configured": False}
    if env.state.get("container_hold"):          # the grid step waits for the node's certificate first
        env.state["container_start"] = lambda: _launch(ctx, env)
        return {"configured": True, "running": False, "held": env.state["container_hold"]}
    return _launch(ctx, env)


def _launch(ctx: InstanceContext, env: Environment) -> dict[str, Any]:
    sup = Supervisor(ctx.container, env.roots.log / "vmgrid-container.log", env.state.get("on_container_change"))
    env.state["container"] = sup
    sup.start()
    return {"configured": True, **sup.status()}


def handle(ctx: InstanceContext, env: Environment) -> StepResult:
    return guarded(NAME, _start, ctx, env)
