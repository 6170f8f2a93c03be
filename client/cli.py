"""The `vmgrid` command line: one sub-command family per module, each registering itself."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading

from services.common.errors import CLIError, EscapingStream, printable  # the commands raise it (one class everywhere)

# Each module exposes register(subparsers) and gives its parsers a `func(args) -> int`.
COMMAND_MODULES = [
    "client.demo",               # vmgrid demo (the main job)
    "client.commands_repo",      # vmgrid repo ...
    "client.commands_image",     # vmgrid image ...
    "client.commands_vm",        # vmgrid vm ..., vmgrid report
    "client.commands_authz",     # vmgrid authz ...
    "client.commands_job",       # vmgrid job ... (the job service in a VM)
    "services.container.cli",    # vmgrid serve ...
    "security.cli",              # vmgrid ca ..., proxy-init, proxy-info
    "gridftp.cli",               # vmgrid transfer, vmgrid gridftp-server
]
# Commands whose start is part of what they measure: their parser alone is built, without importing the other
# families (lxml, cryptography, the services: 0.2 s of CPU; globus-url-copy starts in a few milliseconds).
# `vmgrid repo` too: `vmgrid repo import` of a directory is measured whole, as a site operator runs it.
ALONE = {"transfer": "gridftp.cli", "gridftp-server": "gridftp.cli", "repo": "client.commands_repo"}
# Commands that, run as the `vmgrid` process and successful, end without the interpreter's teardown (freeing every
# module and object: 0.03-0.05 s of CPU after a 1 GiB transfer, 0.1 s of wall time under load). By then the command
# has closed its files and sockets and joined its threads; stdout and stderr are flushed first.
EXIT_AT_ONCE = {"transfer"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or for a command in :data:`ALONE` only its family's."""
    parser = argparse.ArgumentParser(prog="vmgrid", description="Virtual machines on grid resources.")
    parser.add_argument("--version", action=_Version, help="show vmgrid's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [ALONE[command]] if command in ALONE else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _Version(argparse.Action):
    """`vmgrid --version`: the installed distribution's version (its metadata read only when asked), else the
    checkout's pyproject.toml."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"vmgrid {version()}")
        parser.exit()


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vmgrid")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        try:
            with open(pyproject, "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "(unknown version)"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    parser = build_parser(args_in[0] if args_in else None)
    args, extra = parser.parse_known_args(argv)
    if extra:                                   # a mistyped option: the usage of the command it was given to
        sub = _subcommand_parser(parser, args_in)
        sub.error(f"unrecognized arguments: {' '.join(extra)} (`{sub.prog} --help` lists the options)")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    # what a command prints carries services' words (names, states, descriptions, faults, a job's output): shown
    # escaped wherever it is printed, so that a hostile service cannot drive the user's terminal
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, EscapingStream) else EscapingStream(s) for s in streams)
    try:
        return _run(func, args, args_in, argv)
    finally:
        sys.stdout, sys.stderr = streams


def _run(func, args, args_in: list[str], argv: list[str] | None) -> int:
    try:
        rc = int(func(args) or 0)
        sys.stdout.flush()                  # here, where a reader that left is answered (below), not at exit
    except CLIError as exc:
        # a message carries a service's words (a fault's description): shown escaped, on one line, bounded
        print(f"vmgrid: {printable(exc, 4000)}{_what_to_do(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # a command that started something at a service says what goes on there and how to find it again
        note = getattr(args, "interrupt_note", None)
        print(f"vmgrid: interrupted{'; ' + note if note else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output left (`vmgrid repo query ... | head`): stop quietly, as cat and ls do; what
        # is still buffered for it goes nowhere rather than into a second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        wssec = sys.modules.get("security.wssec")       # loaded by any command that called a service
        if wssec is None or not isinstance(exc, wssec.WSSecurityError):
            raise
        # the service's answer failed the client's checks (the hardened parser, its signature, its signer, the
        # request it answers): nothing of it was used
        print(f"vmgrid: the answer was refused: {printable(exc, 4000)}", file=sys.stderr)
        return 1
    # the command is the first word: ``args.command`` may be a subcommand's own (``job submit ... -- CMD``)
    if argv is None and rc == 0 and args_in[0] in EXIT_AT_ONCE and _only_daemon_threads():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return rc


def _subcommand_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of the deepest sub-command named by the leading words (`vm deploy` ...)."""
    for word in words:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser = choices[word]
    return parser


def _what_to_do(message: str) -> str:
    """The step that mends a refusal the user can mend, when the service's own message does not name it."""
    if "[wsse:FailedAuthentication]" in message and message.startswith("proxy ") and " expired at " in message:
        return ": make a new proxy with `vmgrid proxy-init` (or grid-proxy-init)"
    return ""


def _only_daemon_threads() -> bool:
    """No thread left that a normal exit would wait for (a failed command's threads are left to the normal exit)."""
    return all(t.daemon or t is threading.main_thread() for t in threading.enumerate())


if __name__ == "__main__":
    # Run through the imported module so CLIError is one class everywhere (python -m client.cli).
    from client.cli import main as _main

    sys.exit(_main())
