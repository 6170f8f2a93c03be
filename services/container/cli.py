"""`vmgrid serve`: run a grid container hosting one or more services."""
from __future__ import annotations

import logging
import signal
import sys

from services.common.errors import CLIError
from services.common.reserve import release_if_full


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a grid container hosting vmgrid services",
                              description="Run a grid container (HTTPS + WS-Security) hosting the named services.")
    p.add_argument("services", nargs="+", metavar="SERVICE", help="repository, authz, vmmanager (several may share one container)")
    p.add_argument("-c", "--config", help="TOML configuration file (docs/configuration.md)")
    p.add_argument("--port", type=int, help="override [container] port")
    p.add_argument("--state-dir", help="override [container] state_dir")
    p.set_defaults(func=run)


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


def run(args) -> int:
    from services.container.assemble import build_container, build_service
    from services.container.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.state_dir:
        config.container.state_dir = args.state_dir
    setup_logging(config.container.log_level, config.container.log_file)
    release_if_full(config.container.state_dir)    # a restart on a full disk still opens its databases
    try:
        services = [build_service(name, config) for name in args.services]
        container = build_container(config, services, port=args.port)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    container.start()
    print(f"vmgrid: serving {', '.join(s.name for s in services)} at {container.base_url}", flush=True)
    container.serve_forever()
    return 0
