"""`vmgrid job …`: run programs through the job service of a VM's grid container (GRAM's role): submit
with files to stage in and out, follow, cancel, fetch the outputs verified, read the guest's logs.

ENDPOINT is an instance (its key inst-… or your identifier for it) on the node --node (default
$VMGRID_NODE): its job service is looked up in the instance's JobService resource property, and its
answers must be signed by exactly the certificate subject the node issued to that instance. Or it is the
job service's URL (https://HOST:PORT/wsrf/services/JobService; https://HOST:PORT is completed)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

from client.cli import CLIError
from services.common.errors import printable

DEFAULT_NODE = "https://localhost:8443/wsrf/services/VMManagerService"
START_WAIT = 120.0      # seconds a just-started job service of an instance named may take to listen
CANCEL_WAIT = 600.0     # seconds `job cancel` and `job get` wait for a cancelled job to be Cancelled
ONE_PROGRAM = "-- PROGRAM [ARG ...]"


class _OneProgram(argparse.HelpFormatter):
    """Writes `job submit`'s program as one program and its arguments: argparse repeats a "+" argument's
    metavar (`-- PROGRAM ARGS [-- PROGRAM ARGS ...]`), which reads as if several programs could follow."""

    def _format_args(self, action, default_metavar):
        if action.metavar == ONE_PROGRAM:
            return ONE_PROGRAM
        return super()._format_args(action, default_metavar)


def register(subparsers) -> None:
    job = subparsers.add_parser("job", help="run programs in a VM through its job service",
                                description="Submit jobs to the job service of a VM's grid container, follow "
                                            "them and fetch their outputs.")
    sub = job.add_subparsers(dest="job_command", metavar="COMMAND", required=True)

    p = sub.add_parser("submit", help="submit a program (after --) with files to stage in and out",
                       description="Submit PROGRAM ARGS (never run through a shell). Prints the job's key.")
    p.add_argument("endpoint", help="an instance (inst-… or your identifier) on --node, or the job service URL")
    p.add_argument("--stage-in", action="append", default=[], metavar="F",
                   help="a local file (uploaded to the service's GridFTP face), staged:NAME (a file you put in "
                        "your staging area there: `vmgrid job info` shows its URL) or a gsiftp:// URL the service "
                        "fetches as you (with a proxy of yours this command delegates to it); it lands in the job's "
                        "directory under its own name (./staged:NAME is a local file so named)")
    p.add_argument("--stage-out", action="append", default=[], metavar="F",
                   help="a file the job makes (NAME, or NAME=gsiftp://… to have the service send it there too, as "
                        "you)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable")
    p.add_argument("--dir", help="the working directory inside the job's directory")
    p.add_argument("--stdin", help="a file of the job's directory as standard input")
    p.add_argument("--stdout", default="stdout", help="file name for standard output (default stdout)")
    p.add_argument("--stderr", default="stderr", help="file name for standard error (default stderr)")
    p.add_argument("--lifetime", help="how long the job resource lives: seconds or 90m, 2h, 1d")
    p.add_argument("--wait", action="store_true", help="follow the job to its end (exit status 1 unless Done)")
    p.add_argument("command", nargs="+", metavar=ONE_PROGRAM,
                   help="the one program to run and its arguments")
    p.formatter_class = _OneProgram
    p.set_defaults(func=cmd_submit)

    for name, helptext, func in (("status", "a job's resource properties", cmd_status),
                                 ("wait", "follow a job to its end (exit status 1 unless Done)", cmd_wait),
                                 ("cancel", "cancel a job (its process group is killed) and wait until it is "
                                            "Cancelled, what it wrote recorded", cmd_cancel),
                                 ("destroy", "destroy a job and its directory", cmd_destroy),
                                 ("get", "fetch a job's outputs (all, or those named), verified, into a directory",
                                  cmd_get)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("endpoint")
        p.add_argument("job", help="the job's key (job-…)")
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=3600, help="seconds (default 3600)")
        if name == "cancel":
            p.add_argument("--no-wait", action="store_true",
                           help="print the state the service answers and return (a job still being stopped ends "
                                "Cancelled by itself)")
        if name == "get":
            # default given: argparse then counts OUTPUT as optional (without it a missing job key was "the
            # following arguments are required: job, OUTPUT")
            p.add_argument("outputs", nargs="*", metavar="OUTPUT", default=[],
                           help="an output's name (as `vmgrid job status` lists it): fetch only these (default: all)")
            p.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR", help="directory (default .)")
            p.add_argument("--overwrite", action="store_true",
                           help="replace files in the directory that have an output's name but other contents "
                                "(without it such files are named and nothing is fetched)")
        p.set_defaults(func=func)

    p = sub.add_parser("refresh-proxy", help="delegate a new proxy for a job's gsiftp:// files (a proxy lives 12 h "
                                             "at most), as globus-job-refresh-credentials",
                       description="Delegate a new proxy of your credential to the job service for the job's "
                                   "gsiftp:// stage-ins and stage-outs, replacing the one delegated at submit.")
    p.add_argument("endpoint")
    p.add_argument("job", help="the job's key (job-…)")
    p.add_argument("--lifetime", help="how long the new proxy lives: seconds or 90m, 2h (default: until the job's "
                                      "termination time, and never past it; at most 12 h, never past your own proxy)")
    p.set_defaults(func=cmd_refresh_proxy)

    p = sub.add_parser("lifetime", help="move a job's termination time (when it passes, the job and its outputs are "
                                        "destroyed)",
                       description="Move a job's termination time, as `vmgrid vm lifetime` an instance's: when it "
                                   "passes, a running job is killed and the job, its directory and its outputs are "
                                   "destroyed. At most the service's max_lifetime from the job's submission.")
    p.add_argument("endpoint")
    p.add_argument("job", help="the job's key (job-…)")
    p.add_argument("when", help="from now: seconds or 90m, 2h, 1d; or an ISO 8601 time")
    p.set_defaults(func=cmd_lifetime)
    p._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?\s*[smhd]?$")   # -5m reaches the command (vm lifetime's)

    p = sub.add_parser("info", help="the service: its owner, GridFTP face, your staging area (a gsiftp:// URL), logs",
                       description="What the job service says of itself and of you: the instance's owner, its "
                                   "GridFTP face, and your staging area as a gsiftp:// URL: a file put there "
                                   "(`vmgrid transfer FILE URLNAME`, globus-url-copy) is staged into any job of "
                                   "yours with --stage-in staged:NAME.")
    p.add_argument("endpoint")
    p.add_argument("--staging-url", action="store_true", help="print only your staging area's URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("list", help="the jobs of the service")
    p.add_argument("endpoint")
    p.add_argument("--all", action="store_true", help="also ended ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("log", help="the tail of a guest log (the container's, guestd's)")
    p.add_argument("endpoint")
    p.add_argument("name", help="a log name the service shows (vmgrid job log ENDPOINT help lists them)")
    p.add_argument("--bytes", type=int, default=65536, help="at most this many bytes (default 65536)")
    p.set_defaults(func=cmd_log)

    for action in sub.choices.values():
        action.add_argument("--node", default=os.environ.get("VMGRID_NODE", DEFAULT_NODE),
                            help="the VMManager of the instance named (default $VMGRID_NODE or "
                                 f"{DEFAULT_NODE}; --url, as the vm commands spell it, is the same)")
        action.add_argument("--url", dest="node", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        action.add_argument("--cert-dir", help="trusted CA directory (default $X509_CERT_DIR)")
        action.add_argument("--proxy", help="credential file (default $X509_USER_PROXY, /tmp/x509up_u<uid>)")


# -- helpers ---------------------------------------------------------------------------------------------


def is_url(text: str) -> bool:
    return "://" in text


def instance_job_service(args) -> tuple[str, str]:
    """The job service URL and certificate subject of the instance ``args.endpoint`` on ``args.node``."""
    from client.commands_vm import resolve, vmm_client

    vm = vmm_client(args, args.node)
    info = call(vm.status, resolve(vm, args.endpoint))
    if not info.job_service or not info.job_service.get("url") or not info.job_service.get("dn"):
        raise CLIError(no_job_service(args.endpoint, info))
    return info.job_service["url"], info.job_service["dn"]


def no_job_service(name: str, info) -> str:
    """Why an instance has no job service, as far as its node's answer tells (its State and GuestStatus: what
    guestd reported, and the node's note on the job service when it tried to start one), and how to tell the
    reasons the node cannot tell apart."""
    guest = printable(info.guest_status or "none")
    head = f"instance {printable(name)} ({printable(info.state)}) has no job service"
    where = "docs/jobs.md, \"In a guest\"; or name the job service's URL instead"
    note = re.search(r"(?:no )?job service", guest)
    if note:              # the node's own note on the guest's job service (how its certificate request went)
        return f"{head}: the node says: {guest[note.start():]} ({where})"
    if guest == "none" or guest.startswith(("no report", "not ready")):
        if info.state != "Running":
            return (f"{head}: it is {printable(info.state)} (guest: {guest}); a job service is set up when it runs "
                    f"and guestd in it reports ready ({where})")
        return (f"{head} (guest: {guest}): guestd in it has not reported ready, and the node starts a job service "
                f"only then (`vmgrid vm status {printable(name)}` shows a jobs line once it has; a node whose VMM has "
                f"no guest channel, libvirt's test driver, never hears from guestd) ({where})")
    failed = guest.partition("failed steps: ")[2].split(";")[0]
    if "grid" in [step.strip() for step in failed.split(",")]:
        return (f"{head} (guest: {guest}): guestd's grid step, which prepares the image's job service, failed in the "
                f"guest ({where})")
    image = f"{info.vo}/{info.image_name}" if info.vo and info.image_name else info.image_id or "its image"
    return (f"{head} (guest: {guest}): guestd asked the node for no job service certificate, so either the image "
            f"does not host the job service (`vmgrid repo show {printable(image)}`: one that does has the container "
            f"`python3 -m client.cli serve jobs …` and the vmgrid runtime, e.g. the emboss recipe's) or the node gives "
            f"guests none (its [vmmanager] guest_ca is unset: ask the node's operator) ({where})")


def connect(args):
    from client.commands_repo import grid_client
    from services.jobs.client import JobClient

    if is_url(args.endpoint):
        args.url = args.endpoint      # a container's URL alone is completed, another service's refused by name
        return JobClient(grid_client(args, "JobService"))
    url, dn = instance_job_service(args)
    return JobClient(reach_job_service(args, url, dn, f"the job service of {args.endpoint}"))


def reach_job_service(args, url: str, dn: str, what: str):
    """A signed client of the job service at ``url`` whose host certificate is ``dn``, once it listens (a Running
    instance's service may take seconds after guestd started it: :func:`until_listening`); a CLIError else."""
    from client.commands_repo import call_timeout, trust_store
    from client.soap import ClientError, GridServiceClient, Unreachable
    from security.pki import PKIError, load_credential

    def attempt():
        try:
            credential = load_credential(proxy=args.proxy) if args.proxy else load_credential()
            return GridServiceClient(url, credential, trust_store(args), expected_host_dn=dn, timeout=call_timeout())
        except Unreachable as exc:
            if "refused" in str(exc):
                raise                                  # not listening yet: asked again
            raise CLIError(str(exc)) from None
        except (PKIError, OSError, ClientError) as exc:
            raise CLIError(str(exc)) from None

    return until_listening(attempt, what, Unreachable)


def until_listening(attempt, what: str, refused: type[Exception], *, wait: float = START_WAIT,
                    interval: float = 2.0, out=None, sleep=None, clock=None):
    """``attempt()`` until it stops raising ``refused`` (the instance is Running and its job service was
    started: it may not listen yet), for at most ``wait`` seconds. One line says so (a spinner on a terminal);
    the last refusal is the error once ``wait`` has passed."""
    import time

    from client.output import Waiting

    sleep, clock = sleep or time.sleep, clock or time.monotonic
    deadline = clock() + wait
    waiting = Waiting(what, out)
    while True:
        try:
            result = attempt()
        except refused as exc:
            if clock() > deadline:
                waiting.done("gave up")
                raise CLIError(str(exc)) from None
            waiting.tick()
            sleep(interval)
            continue
        waiting.done()
        return result


def call(func, *a, **kw):
    from client.commands_repo import _call
    from gridftp.errors import GridFTPError

    try:
        return _call(func, *a, **kw)
    except (GridFTPError, RuntimeError, OSError) as exc:
        raise CLIError(str(exc)) from None


def check_key(text: str) -> str:
    from services.jobs.wire import KEY_PATTERN

    if not text.strip():
        raise CLIError("the job key is empty: give the job's key (job-<32 hex digits>, as submit printed it)")
    if not KEY_PATTERN.fullmatch(text):
        raise CLIError(f"{text!r} is not a job key (job-<32 hex digits>, as submit printed it)")
    return text


class Follow:
    """Prints a job's state and staging progress on standard error when they change."""

    def __init__(self):
        self.last = None

    def __call__(self, info) -> None:
        p = info.progress or {}
        line = info.state
        if info.state in ("StageIn", "StageOut") and p.get("filesTotal"):
            line += f": {p['filesDone']}/{p['filesTotal']} files, {p['bytesDone']} bytes"
            if p.get("current"):
                line += f" ({p['current']})"
        if line != self.last:
            print(f"  {printable(line)}", file=sys.stderr, flush=True)
            self.last = line


def bounds_acted(info) -> str:
    """What the service's bounds did to an ended job (a process the memory bound killed, output dropped), as
    `; memory: 1 process killed past N bytes ([jobs] memory_limit)` (each), or "" (nothing, or nothing known)."""
    return "".join(f"; {printable(e.resource)}: {printable(e.description)}"
                   for e in info.resource_bounds or () if e.acted)


def ended(info, bounds_told: bool = False) -> int:
    """The CLI's exit status for an ended job, with its reason and the tail of its standard error (what `job
    status` shows) on standard error when it did not succeed; a Done job that a bound acted on (its program exited 0
    after the kernel killed one of its processes) says so there too, unless ``bounds_told`` (`job wait`'s line)."""
    if info.state == "Done":
        acted = bounds_acted(info)
        if acted and not bounds_told:
            print(f"vmgrid: job {printable(info.key)} Done, but {acted[2:]}", file=sys.stderr)
        return 0
    why = info.failure or (f"exit code {info.exit_code}" if info.exit_code is not None else "")
    print(f"vmgrid: job {printable(info.key)} {printable(info.state)}" + (f": {printable(why)}" if why else ""),
          file=sys.stderr)
    _print_tail("stderr", info.stderr_tail, sys.stderr)
    return 1


def _print_tail(label: str, tail: str, out) -> None:
    if tail:
        print(f"--- {label} (tail) ---\n{tail}", end="" if tail.endswith("\n") else "\n", file=out)


# -- the commands ------------------------------------------------------------------------------------------
def _lifetime(text: str | None) -> int | None:
    from client.commands_vm import parse_seconds

    if text is None:
        return None
    if text.strip().startswith("-"):
        raise CLIError(f"--lifetime {text}: a job's lifetime is a positive duration (seconds, or 90m, 2h, 1d)")
    seconds = parse_seconds(text, minimum=0)      # 0 is refused here, with what leaving it out means
    if seconds <= 0:
        raise CLIError(f"--lifetime {text}: a job's lifetime is a positive duration (seconds, or 90m, 2h, 1d); "
                       f"without --lifetime the job gets the service's default")
    return seconds


STAGED = "staged:"      # --stage-in staged:NAME: a file of the caller's staging area on the service's face


def _stage_in_name(item: str) -> str:
    """The name a --stage-in F lands under in the job's directory."""
    if item.startswith(STAGED):
        return item[len(STAGED):]
    return Path(urlsplit(item).path).name if item.startswith(("gsiftp://", "ftp://")) else Path(item).name


def _check_stdin(stdin: str | None, stage_in: list[str]) -> None:
    """--stdin names a file of the job's directory, which holds nothing but what is staged in when the program
    starts: refused before anything is uploaded or submitted, with the --stage-in that would bring it."""
    if stdin is None:
        return
    names = {_stage_in_name(item) for item in stage_in}
    if os.path.normpath(stdin) in names:
        return
    name = Path(stdin).name
    if Path(stdin).is_file():
        raise CLIError(f"--stdin {stdin} names a file of the job's directory, not a local one: that directory holds "
                       f"only what --stage-in brings; send your local file with --stage-in {shlex.quote(stdin)}"
                       + ("" if name == stdin else f" --stdin {shlex.quote(name)}"))
    raise CLIError(f"--stdin {stdin} is not staged in: the job's directory holds only what --stage-in brings "
                   f"(here {', '.join(sorted(names)) or 'nothing'}) when the program starts")


def _refuse_older_proxy(credential, stage_in: list[str], stage_out: list[str]) -> None:
    """A job's files move over GridFTP with TLS (AUTH TLS, PROT P): a local --stage-in is uploaded with the caller's
    credential, a gsiftp:// one (and a stage-out sent to one) is moved by the service with a proxy delegated from it.
    A chain holding a legacy (grid-proxy-init -old) or draft (-draft) proxy cannot authenticate there: refused before
    anything is uploaded or submitted, in `vmgrid transfer`'s words (its own check), rather than a job that fails at
    its staging."""
    from gridftp.client import older_proxy_refusal

    moved = [f"--stage-in {item}" for item in stage_in if not item.lower().startswith(("ftp://", STAGED))]
    moved += [f"--stage-out {item}" for item in stage_out if item.partition("=")[2].lower().startswith("gsiftp://")]
    if not moved:
        return
    why = older_proxy_refusal(credential, gsi=False, prot="P")
    if why is not None:
        raise CLIError(f"{moved[0]}: {why}; no job was submitted")


def _check_staged(item: str) -> None:
    """A staging area is flat: staged:NAME names a file in it (what the service takes, jobs.xsd), refused here
    before anything is uploaded or submitted."""
    name = item[len(STAGED):]
    if not name or "/" in name or name in (".", ".."):
        raise CLIError(f"--stage-in {item}: staged:NAME names a file of your staging area, which is flat (no "
                       f"directories): `vmgrid job info ENDPOINT` shows its URL")


def cmd_submit(args) -> int:
    from gridftp.cli import ProgressBar
    from services.jobs.store import JobSpec, StageIn, StageOut

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CLIError("name the program to run after --")
    env = []
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--env {item!r}: write NAME=VALUE")
        env.append((name, value))
    lifetime = _lifetime(args.lifetime)
    _check_stdin(args.stdin, args.stage_in)
    for item in args.stage_in:
        if item.startswith(STAGED):
            _check_staged(item)
        elif not item.startswith(("gsiftp://", "ftp://")) and not Path(item).is_file():
            raise CLIError(f"--stage-in {item}: no such file")
    jobs = connect(args)
    _refuse_older_proxy(jobs.service.credential, args.stage_in, args.stage_out)
    why = call(jobs.older_service_refusal, list(args.stage_in) + [i.partition("=")[2] for i in args.stage_out])
    if why is not None:         # before anything is uploaded
        raise CLIError(why)
    stage_in = []
    for item in args.stage_in:
        if item.startswith(("gsiftp://", "ftp://", STAGED)):      # the service fetches it (staged: from the area)
            stage_in.append(StageIn(item, _stage_in_name(item)))
            continue
        path = Path(item)
        bar = ProgressBar(sys.stderr, f"staging {path.name}") if sys.stderr.isatty() else None
        stage_in.append(call(jobs.stage_local, path, bar, once=True))     # its own: gone from the area once taken
    stage_out = []
    for item in args.stage_out:
        name, sep, url = item.partition("=")
        stage_out.append(StageOut(name, url if sep else None))
    spec = JobSpec(command[0], tuple(command[1:]), tuple(env), args.dir, args.stdin, args.stdout, args.stderr,
                   tuple(stage_in), tuple(stage_out), lifetime)
    key = call(jobs.submit, spec)
    print(key, flush=True)
    args.interrupt_note = _goes_on(args.endpoint, key)
    if args.wait:
        return ended(call(jobs.wait, key, on_update=Follow()))
    return 0


def _info_dict(info) -> dict:
    return {"key": info.key, "state": info.state, "cancelRequested": info.cancel_requested, "owner": info.owner,
            "executable": info.executable,
            "arguments": info.arguments, "exitCode": info.exit_code, "failure": info.failure,
            "submitted": info.submitted.isoformat() if info.submitted else None,
            "started": info.started.isoformat() if info.started else None,
            "ended": info.ended.isoformat() if info.ended else None,
            "terminationTime": info.termination.isoformat() if info.termination else None,
            "staging": info.progress, "directory": info.directory_url,
            "outputs": [{"name": n, "size": s, "sha256": h, "destination": d} for n, s, h, d in info.outputs],
            "stdoutTail": info.stdout_tail, "stderrTail": info.stderr_tail,
            "resourceBounds": None if info.resource_bounds is None else [
                {"resource": e.resource, "setting": e.setting, "bound": e.bound, "processesKilled": e.processes_killed,
                 "bytesDropped": e.bytes_dropped, "unbounded": e.unbounded, "description": e.description}
                for e in info.resource_bounds],
            "outputTailsWithheld": info.tails_withheld}


TAILS_WITHHELD = "(output tails: the submitter's and the admins' only)"


def cmd_status(args) -> int:
    info = call(connect(args).status, check_key(args.job))
    if args.json:
        print(json.dumps(_info_dict(info), indent=2))
        return 0
    d = _info_dict(info)
    if info.cancel_requested:
        d["state"] += " (being cancelled: its program is stopped and what it wrote recorded, then it is Cancelled)"
    for k in ("key", "state", "exitCode", "failure", "owner", "executable", "submitted", "started", "ended",
              "terminationTime", "directory"):
        if d[k] not in (None, ""):
            print(f"{k:16} {printable(d[k])}")
    for e in info.resource_bounds or ():          # what the bounds did: a Done job's killed process too
        print(f"{printable(e.resource):16} {printable(e.description)}")
    for n, s, h, _ in info.outputs:
        print(f"{'output':16} {printable(n)} {printable(s)} bytes sha256 {printable(h)}")
    if info.tails_withheld:
        print(TAILS_WITHHELD)
    for label, tail in (("stdout", info.stdout_tail), ("stderr", info.stderr_tail)):
        _print_tail(label, tail, sys.stdout)
    return 0


def _goes_on(endpoint: str, key: str) -> str:
    """What an interrupted `submit --wait` or `wait` tells: only the waiting stopped."""
    where = shlex.quote(endpoint)
    return (f"job {key} goes on at the service (`vmgrid job wait {where} {key}` follows it again, "
            f"`vmgrid job cancel {where} {key}` stops it)")


def cmd_wait(args) -> int:
    args.interrupt_note = _goes_on(args.endpoint, args.job)
    info = call(connect(args).wait, check_key(args.job), args.timeout, on_update=Follow())
    line = printable(info.state) if info.exit_code is None else f"{printable(info.state)} (exit code {info.exit_code})"
    print(line + bounds_acted(info))
    if info.tails_withheld:
        print(TAILS_WITHHELD, file=sys.stderr)
    return ended(info, bounds_told=True)


def _being_cancelled(key: str) -> str:
    return f"job {key} is being cancelled: its program is being stopped and what it wrote recorded"


def _follow_cancel(args, jobs, key: str, why: str):
    """Wait (here: no request of the service waits) until a job being cancelled has ended; its JobInfo."""
    print(f"{_being_cancelled(key)}; {why}", file=sys.stderr, flush=True)
    args.interrupt_note = (f"job {key} goes on being cancelled at the service (`vmgrid job wait "
                           f"{shlex.quote(args.endpoint)} {key}` follows it)")
    return call(jobs.wait, key, CANCEL_WAIT)


def cmd_cancel(args) -> int:
    from services.jobs.client import FINAL_STATES

    jobs, key = connect(args), check_key(args.job)
    state = call(jobs.cancel, key)
    if state in FINAL_STATES:
        print(printable(state))
    elif args.no_wait:
        print(printable(state))
        print(f"{_being_cancelled(key)}; then it is Cancelled (`vmgrid job wait {shlex.quote(args.endpoint)} {key}` "
              f"follows it)", file=sys.stderr)
    else:
        print(printable(_follow_cancel(args, jobs, key, "waiting until it is Cancelled").state))
    return 0


def cmd_destroy(args) -> int:
    call(connect(args).destroy, check_key(args.job))
    print(f"{args.job} destroyed")
    return 0


def cmd_refresh_proxy(args) -> int:
    from client.commands_vm import parse_seconds

    key = check_key(args.job)
    lifetime = None if args.lifetime is None else parse_seconds(args.lifetime, minimum=60)
    if lifetime is not None and lifetime > 12 * 3600:
        raise CLIError(f"--lifetime {args.lifetime}: a job service takes a proxy of at most 12 h (refresh it again "
                       f"later)")
    jobs = connect(args)
    expires = call(jobs.refresh_proxy, key, lifetime)
    print(f"{key}: its gsiftp:// files now move with a proxy of yours valid until "
          f"{expires.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return 0


def cmd_get(args) -> int:
    jobs = connect(args)
    info = call(jobs.status, check_key(args.job))
    if not info.final and info.cancel_requested:       # Cancelled once what it wrote is recorded: soon
        info = _follow_cancel(args, jobs, info.key, "its outputs are fetched once it is Cancelled")
    if not info.final:
        raise CLIError(f"job {info.key} is {info.state}; its outputs come when it has ended (vmgrid job wait)")
    key, state = printable(info.key), printable(info.state)
    why = f" ({printable(info.failure)})" if info.failure else ""
    if not info.outputs:
        if info.started is None and info.state != "Done":
            raise CLIError(f"job {key} {'was ' if state == 'Cancelled' else ''}{state} before its program "
                           f"started{why}: it has no outputs, nothing fetched")
        raise CLIError(f"job {key} is {state}{why} and its service recorded no outputs: nothing fetched (`vmgrid job "
                       f"status` shows the tails of its standard output and error)")
    if args.outputs and info.state != "Done":
        recorded = [name for name, *_ in info.outputs]
        missing = [n for n in args.outputs if n not in recorded]
        if missing:
            raise CLIError(f"job {key} is {state}{why}: it has no output {printable(', '.join(missing))} (its "
                           f"outputs: {printable(', '.join(recorded))}), nothing fetched")
    args.interrupt_note = (f"the outputs fetched so far are kept in {args.output}; the same command fetches the "
                           f"rest (a partly fetched file resumes)")
    for path in call(jobs.fetch_outputs, info, args.output, overwrite=args.overwrite, names=args.outputs):
        print(path)
    if info.state != "Done":          # fetched: what the program wrote before the job ended so
        print(f"job {key} is {state}{why}: its outputs are what its program wrote before it ended", file=sys.stderr)
    return 0


def cmd_lifetime(args) -> int:
    from datetime import datetime, timezone

    from client.commands_vm import parse_seconds
    from services.faults import LimitExceeded

    key, seconds, when = check_key(args.job), None, None
    if re.fullmatch(r"\s*-?\d+\s*[smhd]?\s*", args.when):
        seconds = parse_seconds(args.when, minimum=1)
    else:
        try:
            when = datetime.fromisoformat(args.when.strip().replace("Z", "+00:00"))
        except ValueError:
            raise CLIError(f"{args.when!r} is neither a duration (seconds or 90m, 2h, 1d) nor an ISO 8601 time") \
                from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    jobs = connect(args)

    def move():
        try:
            return jobs.set_lifetime(key, seconds, when=when), None
        except LimitExceeded as exc:
            if exc.limit != "max_lifetime":
                raise
            return None, exc

    new, over = call(move)
    if over is not None:        # the service's bound, said with the latest end it allows this job
        submitted = call(jobs.status, key).submitted
        latest = (f" (submitted {submitted:%Y-%m-%d %H:%M:%S} UTC: at the latest until "
                  f"{datetime.fromtimestamp(submitted.timestamp() + int(over.allowed), timezone.utc):%Y-%m-%d %H:%M:%S}"
                  f" UTC)" if submitted and str(over.allowed or "").isdigit() else "")
        raise CLIError(f"{args.when.strip()}: job {key} would live longer than this service keeps a job: its "
                       f"max_lifetime is {printable(over.allowed)} s from a job's submission{latest}; its termination "
                       f"time is unchanged (fetch its outputs before then: vmgrid job get)")
    now = datetime.now(timezone.utc)
    print(f"{key}: terminates at {new:%Y-%m-%d %H:%M:%S} UTC ({int((new - now).total_seconds())} s from now); then "
          f"it and its outputs are destroyed")
    return 0


def cmd_info(args) -> int:
    from services.jobs.wire import NS

    jobs = connect(args)
    root = call(jobs.info)
    url = call(jobs.staging_url)
    if args.staging_url:
        print(url)
        return 0
    d = {"instanceOwner": root.findtext("job:instanceOwner", namespaces=NS), "gridftp": root.findtext(
        "job:gridftp", namespaces=NS), "stagingDirectory": root.findtext("job:stagingDirectory", namespaces=NS),
         "stagingURL": url, "logs": [el.text for el in root.iterfind("job:log", NS)]}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k in ("instanceOwner", "gridftp", "stagingDirectory", "stagingURL"):
        if d[k] not in (None, ""):
            print(f"{k:16} {printable(d[k])}")
    if d["logs"]:
        print(f"{'logs':16} {printable(' '.join(d['logs']))}")
    print(f"(a file put in {printable(url)} is staged into a job of yours with --stage-in staged:NAME; it stays "
          f"until overwritten or deleted)")
    return 0


def cmd_list(args) -> int:
    from client.output import table
    from services.jobs.wire import JOB, NS

    from services.jobs.wire import ResourceBounds

    rows = []
    for el in call(connect(args).list, args.all, resource_bounds=True):
        found = el.find(ResourceBounds.qname)
        bounds = None if found is None else ResourceBounds.parse(found)     # None: nothing known (or an older service)
        rows.append({"key": el.findtext(f"wsa:EndpointReference/wsa:ReferenceParameters/{{{JOB}}}JobKey",
                                        namespaces=NS) or "",
                     "state": el.findtext("job:State", namespaces=NS), "executable": el.findtext(
                         "job:Executable", namespaces=NS), "exitCode": el.findtext("job:ExitCode", namespaces=NS),
                     "submitted": el.findtext("job:Submitted", namespaces=NS),
                     "boundsMet": None if bounds is None else [e.resource for e in bounds if e.acted],
                     "resourceBounds": None if bounds is None else [e.description for e in bounds]})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        # BOUNDS: the resources whose bound acted on the job (a process killed, forks refused, output dropped), e.g.
        # "memory" or "processes,stdout": `vmgrid job status` says what each did
        table(["KEY", "STATE", "EXIT", "BOUNDS", "PROGRAM", "SUBMITTED"],
              [[r["key"], r["state"], r["exitCode"] or "", ",".join(r["boundsMet"] or ()), r["executable"],
                r["submitted"]] for r in rows])
    return 0


def cmd_log(args) -> int:
    jobs = connect(args)
    if args.name == "help":
        from services.jobs.wire import NS

        names = [el.text for el in call(jobs.info).iterfind("job:log", NS)]
        # none: an empty line would read as a failure; say so, and where a site names them
        print("\n".join(names) if names else "this job service shows no logs (its configuration's [jobs.logs] names none)")
        return 0
    sys.stdout.write(call(jobs.log, args.name, args.bytes))
    return 0
