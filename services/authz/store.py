"""The policy file as the service holds it: loaded and checked at start, reloaded when it (or a
grid-mapfile it imports) changes, on SIGHUP or on request; a policy that does not check out is
refused and the previous one stays in force. Admin changes are edits of the file, written atomically."""
from __future__ import annotations

import difflib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.authz.audit import AuditLog
from services.authz.edit import check_edit, reparse, write_atomically
from services.authz.policy import Group, Policy, PolicyError, Rule, load_policy, parse_policy

log = logging.getLogger("vmgrid.authz")

Signature = tuple[tuple[str, int, int, int] | tuple[str, None, None, None], ...]


@dataclass(frozen=True)
class PolicyStatus:
    file: str
    version: str
    loaded: float                 # when the policy in force was loaded (epoch seconds)
    rules: int
    groups: int
    error: PolicyError | None     # the last refused policy, if the one in force is older than the file
    error_at: float | None


def signature(files: tuple[str, ...] | list[str]) -> Signature:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((f, None, None, None))
    return tuple(out)


# An edit: (file text, policy) -> (new text, the rules and groups the new policy must have).
Change = Callable[[str, Policy], tuple[str, list[Rule], dict[str, Group]]]


class PolicyFile:
    def __init__(self, path: Path, *, audit: AuditLog | None = None):
        self.path = Path(path)
        self.audit = audit
        self._lock = threading.RLock()
        self._policy = load_policy(self.path)           # an invalid policy at start: the service does not start
        self._loaded = time.time()
        self._seen = signature(self._policy.files)
        self._pending: Signature | None = None         # a change seen by the watcher, not yet settled
        self._error: PolicyError | None = None
        self._error_at: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Policy:
        return self._policy

    def status(self) -> PolicyStatus:
        with self._lock:
            p = self._policy
            return PolicyStatus(str(self.path), p.version, self._loaded, len(p.rules), len(p.groups),
                                self._error, self._error_at)

    def _install(self, policy: Policy, why: str, by: str | None, before: Signature | None = None) -> bool:
        """Put ``policy`` in force. ``before``: the files' signature taken before they were read, so a change
        made while (or just after) they were read is still seen as a change by the watcher."""
        changed = policy.version != self._policy.version
        known = {s[0]: s for s in before or ()}
        self._seen = tuple(known.get(f) or signature([f])[0] for f in policy.files)
        self._policy = policy
        self._loaded = time.time()
        self._error = self._error_at = None
        if changed:
            log.info("policy %s loaded from %s (%s): %d rules, %d groups", policy.version, self.path, why,
                     len(policy.rules), len(policy.groups))
            if self.audit:
                self.audit.record("reload", sync=True, by=by, result="ok", reason=why, policy=policy.version)
        return changed

    def reload(self, why: str = "request", by: str | None = None) -> bool:
        """Read the file again; True if the policy changed. An invalid file raises PolicyError and the
        policy in force stays."""
        with self._lock:
            files = self._policy.files
            before = signature(_files_after_failure(self.path, files))
            try:
                policy = load_policy(self.path)
            except PolicyError as exc:
                self._seen = before
                first = self._error is None or str(self._error) != str(exc)
                self._error, self._error_at = exc, time.time()
                if first:
                    log.error("policy refused, %s stays in force: %s", self._policy.version, exc)
                    if self.audit:
                        self.audit.record("reload", sync=True, by=by, result="refused", reason=why, error=str(exc),
                                          policy=self._policy.version)
                raise
            return self._install(policy, why, by, before)

    def poll(self) -> None:
        """Reload if the file or a grid-mapfile changed since it was last read and has stayed the same since
        the previous poll (called by the watcher). A file caught while an editor or ``cat >`` rewrites it in
        place (truncated, half written) is not taken: only a change that has settled for one interval is,
        so a half-written file that happens to parse (an empty one does) never replaces the policy."""
        with self._lock:
            now = signature([s[0] for s in self._seen])
            if now == self._seen:
                self._pending = None
                return
            if now != self._pending:
                self._pending = now            # seen changing: look again at the next poll
                return
        try:
            self.reload("file changed")
        except PolicyError:
            pass

    # -- watching ---------------------------------------------------------------------------------
    def start_watching(self, interval: float) -> None:
        """Poll every ``interval`` seconds (0: only when :meth:`wake` is called, e.g. on SIGHUP)."""
        if self._thread is not None:
            return

        def run():
            while not self._stop.is_set():
                woken = self._wake.wait(interval if interval > 0 else None)
                if self._stop.is_set():
                    return
                if woken:
                    self._wake.clear()
                    try:
                        self.reload("SIGHUP")
                    except PolicyError:
                        pass
                else:
                    self.poll()

        self._thread = threading.Thread(target=run, name="vmgrid-authz-policy", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask the watcher to reload now (safe from a signal handler)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -- admin edits ------------------------------------------------------------------------------
    def edit(self, change: Change, *, by: str, operation: str, target: str) -> tuple[Policy, Policy]:
        """Apply ``change`` to the file as it is on disk, check the result, write it atomically and put it in
        force. Refused (PolicyError) when the file on disk is invalid or the edit would not check out."""
        with self._lock:
            try:
                try:
                    text = self.path.read_text(encoding="utf-8")
                except OSError as exc:
                    raise PolicyError(str(self.path), f"cannot read the policy file: {exc.strerror}") from None
                try:
                    old = parse_policy(text, str(self.path), base_dir=self.path.resolve().parent)
                except PolicyError as exc:
                    raise PolicyError(exc.file, f"the policy file on disk is invalid, fix it first: {exc.reason}",
                                      line=exc.line, rule=exc.rule) from None
                new_text, rules, groups = change(text, old)
                new = reparse(new_text, old)
                check_edit(old, new, rules=rules, groups=groups)
            except PolicyError as exc:
                if self.audit:
                    self.audit.record("admin", sync=True, by=by, operation=operation, target=target,
                                      result="refused", error=str(exc))
                raise
            write_atomically(self.path, new_text)
            before = self._policy.version
            self._install(new, f"{operation} {target}", by)
            if self.audit:
                diff = "".join(difflib.unified_diff(text.splitlines(True), new_text.splitlines(True), "before",
                                                    "after", n=0))
                self.audit.record("admin", sync=True, by=by, operation=operation, target=target, result="ok",
                                  before=before, policy=new.version, diff=diff)
            return old, new


def _files_after_failure(path: Path, previous: tuple[str, ...]) -> list[str]:
    """The files to watch after a refused reload: the policy file and the grid-mapfiles it names now."""
    return [str(path)] + [f for f in previous if f != str(path)]
