"""`vmgrid serve`: run a grid container hosting one or more services."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from services.common.errors import CLIError, printable
from services.common.reserve import release_if_full


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a grid container hosting vmgrid services",
                              description="Run a grid container (HTTPS + WS-Security) hosting the named services.")
    p.add_argument("services", nargs="+", metavar="SERVICE", help="repository, authz, vmmanager, jobs (several may share one container)")
    p.add_argument("-c", "--config", help="TOML configuration file (docs/configuration.md)")
    p.add_argument("--port", type=port_number, help="override [container] port")
    p.add_argument("--state-dir", help="override [container] state_dir")
    p.set_defaults(func=run)


def port_number(text: str) -> int:
    """--port: a TCP port, 0 to 65535 (0 picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0 picks a free one)")
    return port


def setup_logging(level: str, path: str = "") -> None:
    """The container's log: one line per record, time, level, logger and message (docs/configuration.md).

    The line names no function, file or thread, so the logging module is told not to look for them: by default
    every record walks the stack to find its caller (Logger.findCaller) and reads the thread's and process's
    names, which was a few per cent of a node's CPU per deploy+destroy. These are the switches the logging
    HOWTO's "Optimization" section gives; they only drop what this format never prints."""
    logging._srcfile = None          # no findCaller: %(funcName)s, %(lineno)d, %(pathname)s are not used
    logging.logThreads = False       # no %(thread)d, %(threadName)s
    logging.logProcesses = False     # no %(process)d
    logging.logMultiprocessing = False
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


_HELD: list[int] = []      # the state locks' descriptors, open for the life of the process


def private_state(state_dir: str, services: list[str], key: str = "[container] state_dir") -> None:
    """A service's state is its own: every VO's image bytes, the catalogue, VM disks, the contexts holding guestd's
    token, the policy and its audit log, users' staged files. Files and directories the container makes are for its
    own user only (umask 077), and each service's state directory is closed to everyone else even where an earlier
    version left it open (0755, its files 0644: any local account read them). The state directory above them keeps
    only its search bit for others; the job service sets its own directories' modes (its jobs run under uids of
    their own and must reach their directories, services/jobs). ``key``: what gave ``state_dir`` (the key, or
    ``--state-dir``), for the warnings."""
    import os

    # a state directory made now (and the directories above it) is made as a site would (0755), before the umask:
    # made under umask 077 it was 0700, which the closing below does not open, and a job under its own uid could not
    # reach its own directory by its path ($HOME, $PWD, `python3 script.py` made absolute: attack G4)
    os.umask(0o022)
    os.makedirs(state_dir, exist_ok=True)
    os.umask(0o077)

    _change_mode(state_dir, off=0o077 & ~0o011, why="close {} to other users")
    if "jobs" in services:
        _open_the_way(state_dir, key)
    for name in services:
        service_dir = os.path.join(state_dir, name)
        if name != "jobs" and os.path.isdir(service_dir):
            _change_mode(service_dir, off=0o077, why="close {} to other users")


def _open_the_way(state_dir: str, key: str) -> None:
    """The job service's jobs run under uids of their own, in directories below the state directory, and must
    reach them by path: the state directory gets its search bit for others (only that: 0711) if it lacks it, and a
    directory above it that others cannot search is named in a warning (vmgrid did not make it: the site chooses)."""
    import os
    import stat

    log = logging.getLogger("vmgrid.container")
    _change_mode(state_dir, on=0o011, why="give {} its search bit for the jobs' uids")
    path = os.path.dirname(os.path.abspath(state_dir))
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            warning = (f"{path} is not searchable by other users: the jobs (each under a uid of its own) cannot "
                       f"reach their directories under {state_dir} by path ($HOME); chmod o+x {path} or choose "
                       f"another {key}")
            log.warning("%s", warning)
            print(f"vmgrid: warning: {warning}", file=sys.stderr, flush=True)
            break
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent


def _change_mode(path: str, *, off: int = 0, on: int = 0, why: str) -> None:
    """Take the mode bits ``off`` from ``path`` and give it ``on``; a path the container does not own keeps its mode
    and a warning says so (``why`` names the change, ``{}`` standing for the path): the service still starts."""
    import os
    import stat

    mode = stat.S_IMODE(os.stat(path).st_mode)
    wanted = (mode & ~off) | on
    if wanted != mode:
        try:
            os.chmod(path, wanted)
        except PermissionError as exc:
            logging.getLogger("vmgrid.container").warning("cannot %s: %s", why.format(path), exc.strerror)


def hold_state(state_dir: str, services: list[str], key: str = "[container] state_dir") -> None:
    """Each service's state belongs to one `vmgrid serve` at a time: a second container started on the same
    state (the same command twice, a restart before the old process ended) would reconcile a live node's
    records as if it had crashed (its Running instances made Failed) and share the databases. A lock per
    service (`<state_dir>/<service>.lock`, flock, released by the kernel when the process ends, even by
    SIGKILL; close-on-exec, so the job shims and QEMU processes that outlive the container do not hold it).
    ``key``: what gave ``state_dir`` (the key, or ``--state-dir``), for the refusal."""
    import errno
    import fcntl
    import os

    os.makedirs(state_dir, exist_ok=True)
    for name in services:
        path = os.path.join(state_dir, f"{name}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):     # a full disk: starting matters more (docs/repository.md)
                logging.getLogger("vmgrid.container").warning("no state lock %s: %s", path, exc.strerror)
                continue
            raise CLIError(f"cannot open the state lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CLIError(f"the {name} state in {state_dir} is in use by another `vmgrid serve`"
                           f"{f' (pid {holder})' if holder.isdigit() else ''}: stop it first, or give this "
                           f"container a {key} of its own") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass                                               # the pid is a courtesy; the lock is what counts
        _HELD.append(fd)


def unused_authz(services: list[str], config) -> str:
    """The warning for a container that hosts the Authorization service beside a service that enforces a policy
    (the repository, a node) without [enforcement] authz_url: those enforce the built-in [policy] section, not the
    Authorization service beside them, so `vmgrid authz check` and the policy admin's rules say one thing and the
    services do another. "" when there is nothing to say."""
    enforcing = [name for name in services if name in ("repository", "vmmanager")]
    if "authz" not in services or not enforcing or config.enforcement.authz_url:
        return ""
    verb = "enforces" if len(enforcing) == 1 else "enforce"
    return (f"[enforcement] authz_url is not set: the {' and the '.join(enforcing)} {verb} the built-in [policy] "
            f"section, not the Authorization service this container hosts; set authz_url to its URL "
            f"(https://HOST:{config.container.port}/wsrf/services/AuthorizationService) to enforce its policy")


def run(args) -> int:
    from security.pki import PKIError
    from services.container.assemble import (SERVICE_NAMES, apply_data_ports, build_container, build_service,
                                             check_migration_port, check_service_config, check_state_dir,
                                             host_credential, trust_store)
    from services.container.config import ConfigError, load_config
    from services.vmmanager.vmm.errors import VMMError

    unknown = [name for name in args.services if name not in SERVICE_NAMES]
    if unknown:
        raise CLIError(f"unknown service {unknown[0]!r}: serve one or more of {', '.join(SERVICE_NAMES)}")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.port is not None:
        config.container.port = args.port
    # a value the configuration file gave that cannot be used is named with the file (ValueError: the services'
    # checks name their key, "[vmmanager] list_page must be ..."); what the system refuses (OSError) as it is
    where = f"{config.source}: " if args.config else ""
    # the state directory is named as it was given: --state-dir (no file gave it), else the key
    if args.state_dir:
        config.container.state_dir = args.state_dir
        state_key, state_where = "--state-dir", ""
        state_given = f"--state-dir {args.state_dir!r}"
    else:
        state_key, state_where = "[container] state_dir", where
        state_given = f"[container] state_dir = {config.container.state_dir!r}"
    try:
        setup_logging(config.container.log_level, config.container.log_file)
    except ValueError as exc:
        raise CLIError(f"{where}[container] log_level = {config.container.log_level!r}: {exc}") from None
    except OSError as exc:
        raise CLIError(f"{where}[container] log_file = {config.container.log_file!r}: {exc.strerror}") from None
    if not 0 <= config.container.port <= 65535:        # before any service opens its state
        raise CLIError(f"{where}[container] port = {config.container.port}: a port is 0 to 65535 (0 picks a free one)")
    try:                                               # refused before any service opens its state
        check_state_dir(config.container.state_dir, state_given)
    except ValueError as exc:
        raise CLIError(f"{state_where}{exc}") from None
    try:
        for name in args.services:
            check_service_config(name, config)
        host_credential(config), trust_store(config)
        if "vmmanager" in args.services:
            check_migration_port(config)           # a port another process holds (the face opens at the start)
    except ValueError as exc:
        raise CLIError(f"{where}{exc}") from None
    apply_data_ports(config, args.services)        # [gridftp] data_ports: this process's GridFTP data listeners
    try:
        private_state(config.container.state_dir, args.services, state_key)
        hold_state(config.container.state_dir, args.services, state_key)
    except OSError as exc:             # a state_dir below a file, one not ours to make: one line, not a traceback
        raise CLIError(f"{state_where}{state_given}: {exc.strerror or exc}"
                       f"{f' ({exc.filename})' if exc.filename and exc.filename != config.container.state_dir else ''}"
                       ) from None
    release_if_full(config.container.state_dir)    # a restart on a full disk still opens its databases
    try:
        services = [build_service(name, config) for name in args.services]
        container = build_container(config, services, port=args.port)
    except (ValueError, PKIError, VMMError) as exc:
        raise CLIError(f"{where}{printable(exc, 2000)}") from None
    except OSError as exc:
        raise CLIError(f"cannot start: {exc.filename}: {exc.strerror}" if exc.filename else
                       f"cannot start: {exc.strerror or exc}") from None
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        container.start()
    except ValueError as exc:          # a service's own port its configuration names ([vmmanager] migration_port)
        raise CLIError(f"{where}{exc}") from None
    except OSError as exc:
        if container.listening:        # its own port was bound: a service's listener (a GridFTP face) failed
            raise CLIError(f"{where}cannot start {', '.join(s.name for s in services)}: {exc.strerror or exc} "
                           f"(its GridFTP face: [repository] or [jobs] gridftp_host, gridftp_port)") from None
        raise CLIError(f"cannot listen on {config.container.host}:{args.port or config.container.port}: "
                       f"{exc.strerror} (another container on that port? [container] port or --port)") from None
    unused = unused_authz(args.services, config)
    if unused:
        logging.getLogger("vmgrid.container").warning("%s", unused)
        print(f"vmgrid: warning: {unused}", file=sys.stderr, flush=True)
    print(f"vmgrid: serving {', '.join(s.name for s in services)} at {container.base_url}", flush=True)
    container.serve_forever()
    return 0
