"""`vmgrid vm …` and `vmgrid report`: deploy and control VMs on a node, and the phase report."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from client.cli import CLIError
from client.commands_repo import (DEFAULT_REPOSITORY, _call, _on_image, add_format, add_grid_options,
                                  parse_memory)
from client.output import table
from services.common.errors import printable

DEFAULT_NODE = "https://localhost:8443/wsrf/services/VMManagerService"
FINAL = ("Destroyed", "Failed")


def register(subparsers) -> None:
    vm = subparsers.add_parser("vm", help="deploy and control virtual machines on a node",
                               description="Deploy images from the repository on a VMManager node and control them.")
    sub = vm.add_subparsers(dest="vm_command", metavar="COMMAND", required=True)

    p = sub.add_parser("deploy", help="deploy an image for a lifetime")
    p.add_argument("image", help="image id (img-…) or VO/name in the repository")
    p.add_argument("identifier", help="your name for the instance")
    p.add_argument("--lifetime", default="1h", help="how long it may live: seconds or e.g. 90m, 2h, 1d (default 1h)")
    p.add_argument("--paused", action="store_true", help="leave it paused once deployed")
    p.add_argument("--memory", help="RAM instead of the descriptor's: MiB, or with a unit as queries take it "
                                    "(512M, 4G)")
    p.add_argument("--vcpus", type=int, help="vCPUs instead of the descriptor's")
    p.add_argument("--repository", default=os.environ.get("VMGRID_REPOSITORY", DEFAULT_REPOSITORY),
                   help="the VMRepository URL (default $VMGRID_REPOSITORY)")
    p.add_argument("--no-wait", action="store_true", help="return once registered; do not follow the deployment")
    add_format(p)
    p.set_defaults(func=cmd_deploy)
    _durations_may_be_negative(p)

    p = sub.add_parser("list", help="your instances on the node")
    p.add_argument("--all", action="store_true", help="also destroyed and failed ones")
    p.add_argument("--page-size", type=int, metavar="N",
                   help="instances per ListInstances call, 1-1000 (default 200); every page is listed")
    add_format(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="an instance's resource properties")
    p.add_argument("instance", help="instance key (inst-…) or your identifier")
    add_format(p)
    p.set_defaults(func=cmd_status)

    for name, helptext in (("pause", "pause a running instance"), ("resume", "resume a paused instance"),
                           ("save", "freeze an instance to disk"), ("restore", "bring a saved instance back"),
                           ("start", "power on a shut-off instance"), ("destroy", "destroy an instance now")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("instance")
        p.set_defaults(func=cmd_control, verb=name)

    p = sub.add_parser("shutdown", help="shut an instance down (ACPI, then forced)")
    p.add_argument("instance")
    p.add_argument("--trash", action="store_true", help="power off at once")
    p.add_argument("--timeout", type=int, help="seconds to wait for the guest before forcing it off")
    p.set_defaults(func=cmd_shutdown)

    p = sub.add_parser("lifetime", help="move an instance's termination time")
    p.add_argument("instance")
    p.add_argument("when", help="from now: seconds or 90m, 2h, 1d; or an ISO 8601 time")
    p.set_defaults(func=cmd_lifetime)
    _durations_may_be_negative(p)

    p = sub.add_parser("migrate", help="move an instance to another node (cold: save, GridFTP, restore)")
    p.add_argument("instance", help="instance key (inst-…) or your identifier")
    p.add_argument("--to", required=True, metavar="NODE_URL", help="the target VMManager's URL")
    add_format(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("watch", help="follow an instance's state changes (signed notifications)")
    p.add_argument("instance")
    p.add_argument("--listen", default="127.0.0.1:0", help="where the notification consumer listens (host:port)")
    p.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0: until it ends)")
    p.set_defaults(func=cmd_watch)

    for action in sub.choices.values():
        add_grid_options(action, "VMGRID_NODE", DEFAULT_NODE, "VMManager")
        _node_spelling(action)

    node = subparsers.add_parser("node", help="site administration of a VMManager node",
                                 description="Site administration of a VMManager node (site admins only).")
    nsub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    p = nsub.add_parser("domains", help="the node's hypervisor domains beside its instance records",
                        description="The node's vmgrid domains (name, UUID, hypervisor state) with the instance "
                                    "each belongs to; an orphan domain has no live instance record, and a live "
                                    "Running or Paused instance whose domain is gone is listed as missing.")
    p.add_argument("--node", dest="url", default=os.environ.get("VMGRID_NODE", DEFAULT_NODE),
                   help=f"the VMManager URL (default $VMGRID_NODE or {DEFAULT_NODE})")
    p.add_argument("--cert-dir", help="trusted CA directory (default $X509_CERT_DIR or /etc/grid-security/certificates)")
    p.add_argument("--proxy", help="credential file (default $X509_USER_PROXY, /tmp/x509up_u<uid>, ~/.globus)")
    p.add_argument("--json", dest="format", action="store_const", const="json", default="table", help="JSON output")
    p.set_defaults(func=cmd_node_domains)
    p = nsub.add_parser("teardown", help="take down what a stopped bridge-mode node made of its network (root)",
                        description="On the node's host, as root, with the node stopped: remove what the node made "
                                    "of its bridge ([vmmanager] nic_source: the bridge it created, or only the "
                                    "gateway address it added to the site's bridge) and the nodes' guard tables "
                                    "of that bridge. Guests still plugged into the bridge would lose their network: "
                                    "refused while any is, unless --force.")
    p.add_argument("-c", "--config", required=True, help="the node's TOML configuration (as given to vmgrid serve)")
    p.add_argument("--force", action="store_true", help="even while guests' taps are on the bridge")
    p.set_defaults(func=cmd_node_teardown)

    p = subparsers.add_parser("report", help="the deployment phase report (table and figure)",
                              description="Collect your deployments' phase timings from nodes and draw the "
                                          "poster's figure: the share of each deployment phase.")
    p.add_argument("--nodes", nargs="+", default=[os.environ.get("VMGRID_NODE", DEFAULT_NODE)],
                   help="VMManager URLs (default $VMGRID_NODE)")
    p.add_argument("--out", type=Path, default=Path("phases.png"), help="the PNG to write (default phases.png)")
    p.add_argument("--json", action="store_true", help="print the deployments' phases as JSON")
    p.add_argument("--cert-dir")
    p.add_argument("--proxy")
    p.set_defaults(func=cmd_report)


# -- helpers ------------------------------------------------------------------------------------------
def _node_spelling(parser) -> None:
    """`--node URL`, as the job commands spell the VMManager's URL, is the same as --url here (--help shows --url)."""
    url = parser._option_string_actions["--url"]
    url.help += "; --node, as the job commands spell it, is the same"
    parser.add_argument("--node", dest="url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _durations_may_be_negative(parser) -> None:
    """`--lifetime -5m` reaches the command, which says what is wrong with it, instead of argparse's "expected one
    argument" (argparse reads a word that starts with - as an option unless it looks like a negative number, which
    by default means digits alone)."""
    parser._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?\s*[smhd]?$")


MAX_DURATION = 100 * 365 * 86400     # what a lifetime on the command line may ask (past it the SOAP stacks' dates overflow)


def parse_seconds(text: str, *, minimum: int = 1) -> int:
    """A duration from now: seconds, or a whole number with s, m, h or d; at least ``minimum`` seconds."""
    m = re.fullmatch(r"\s*(-?)(\d+)\s*([smhd]?)\s*", text, re.ASCII)
    if not m:
        raise CLIError(f"{text!r} is not a duration (seconds, or a number with s, m, h or d)")
    digits = m.group(2).lstrip("0") or "0"
    if m.group(1) and digits != "0":
        raise CLIError(f"{text.strip()!r} is in the past: give a duration from now, e.g. {text.strip()[1:]}")
    seconds = int(digits) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(3)] if len(digits) <= 12 else None
    if seconds is None or seconds > MAX_DURATION:
        raise CLIError(f"a lifetime of {text.strip()!r} is longer than any service grants: give at most "
                       f"{MAX_DURATION // 86400}d (a service's own max_lifetime is the bound it keeps)")
    if seconds < minimum:
        raise CLIError(f"a lifetime of {text.strip()!r} ends at once: give at least {minimum} s (e.g. 90m, 2h, 1d)")
    return seconds


def _human(seconds: int) -> str:
    """A lifetime as a person reads it: 45 s, 90 min, 2 h, 1 d 6 h."""
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min" + (f" {seconds % 60} s" if seconds % 60 else "")
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h" + (f" {seconds % 3600 // 60} min" if seconds % 3600 // 60 else "")
    return f"{seconds // 86400} d" + (f" {seconds % 86400 // 3600} h" if seconds % 86400 // 3600 else "")


def vmm_client(args, url: str | None = None):
    from client.commands_repo import grid_client
    from client.vmmanager import VMManagerClient

    if url:
        args.url = url
    return VMManagerClient(grid_client(args, "VMManagerService"))


def resolve(vm, text: str):
    """An instance by key (inst-…) or by the caller's identifier."""
    from client.vmmanager import InstanceRef

    if text.startswith("inst-"):
        return InstanceRef(vm.service.url, text)
    matches = [i for i in _call(vm.list) if i.identifier == text]
    if not matches:
        last = last_ended(vm, text)
        if last is not None:   # destroyed, failed (a lifetime that ran out, a node restarted...): say so and where
            where = ("`vmgrid vm list --all` lists it" if last.state == "Destroyed" else   # a destroyed one is unknown
                     f"`vmgrid vm status {last.ref.key}` shows it")                       # to the other calls
            if last.state == "Migrated":                  # the node knows where it went: say it, not a second step
                from services.faults import InstanceMoved

                try:
                    vm.status(last.ref)
                except InstanceMoved as exc:
                    if exc.address:
                        where = (f"it lives on at {exc.address}: name that node (--url for vm commands, --node for job "
                                 f"commands, or VMGRID_NODE)")
                except Exception:                         # noqa: BLE001 - the plain hint then
                    pass
            raise CLIError(f"you have no live instance named {text!r} on {vm.service.url}: the last one so named is "
                           f"{last.state}{f' ({last.failure})' if last.failure else ''} ({last.ref.key}); {where}")
        raise CLIError(f"you have no live instance named {text!r} on {vm.service.url}")
    return matches[0].ref


def last_ended(vm, identifier: str):
    """The caller's last instance named ``identifier`` that ended (Destroyed, Failed, Migrated), or None."""
    ended = sorted((i for i in _call(vm.list, True) if i.identifier == identifier and i.ref is not None),
                   key=lambda i: (i.created is not None, i.created))
    return ended[-1] if ended else None


def nothing_to_destroy(name: str, info) -> str | None:
    """What `vm destroy` says of an instance that ended already (trial14 M8: a Failed one was "no live instance
    ...", which left open whether it still held something): a Failed or Destroyed instance holds nothing on the
    node any more, only its record (kept, as every ended instance's, for `vm status` and `vm list --all`; the node
    takes no Destroy for it). None for any other state."""
    key = printable(info.ref.key)
    if info.state == "Destroyed":
        return f"{name}: nothing to destroy: it was destroyed already ({key}); `vmgrid vm list --all` lists it"
    if info.state != "Failed":
        return None
    why = f" ({printable(info.failure)})" if info.failure else ""
    return (f"{name}: nothing to destroy: it is Failed{why} ({key}), and a Failed instance holds nothing any more: "
            f"the node gave back its VM, disk files, address lease, image hold and instance slot when it failed (a "
            f"release the central services could not take then is retried by the node). Its record stays, as every "
            f"ended instance's: `vmgrid vm status {key}` shows it")


def instance_rows(infos) -> list[list]:
    from services.vmmanager.states import FINAL

    ended = {s.value for s in FINAL}         # no lifetime left to show (the record outlives the VM)
    rows = []
    for i in infos:
        left = None if i.state in ended else i.lifetime_left
        rows.append([i.ref.key if i.ref else "", i.identifier, i.state, f"{i.vo}/{i.image_name}", i.address or "",
                     i.mac or "", f"{i.memory} MiB", "" if left is None else f"{max(0, int(left))} s"])
    return rows


INSTANCE_HEADERS = ["key", "identifier", "state", "image", "address", "mac", "ram", "lifetime left"]


def info_json(i) -> dict:
    return {"key": i.ref.key if i.ref else None, "address_epr": i.ref.address if i.ref else None,
            "identifier": i.identifier, "state": i.state, "node": i.node, "owner": i.owner,
            "image": {"id": i.image_id, "name": i.image_name, "vo": i.vo, "sha256": i.sha256, "size": i.size},
            "memory": i.memory, "vcpus": i.vcpus, "address": i.address, "mac": i.mac,
            "created": i.created.isoformat() if i.created else None,
            "termination": i.termination.isoformat() if i.termination else None,
            "phases": [{"name": n, "seconds": s} for n, s in i.phases], "guest": i.guest_status,
            "failure": i.failure, "jobService": i.job_service}


# the states in which the guest runs or is on its way to (what guestd reports is shown then: `not ready` while it
# boots); in the others (Paused, Saved, Shutoff, migrating, ended) nothing in it answers
GUEST_RUNS = ("Registered", "Staging", "Starting", "Running", "ShuttingDown")


def show_info(i, fmt: str, out=None) -> None:
    out = sys.stdout if out is None else out      # bound at call time (tests swap sys.stdout)
    if fmt == "json":
        json.dump(info_json(i), out, indent=2)
        print(file=out)
        return
    rows = [("instance", f"{i.identifier} ({i.ref.key})"), ("state", i.state), ("node", i.node),
            ("owner", i.owner), ("image", f"{i.vo}/{i.image_name} {i.image_id}"),
            ("hardware", f"{i.memory} MiB RAM, {i.vcpus} vCPU"), ("address", f"{i.address or '-'}  mac {i.mac or '-'}"),
            ("termination", f"{i.termination:%Y-%m-%d %H:%M:%S} UTC" if i.termination else "-")]
    # what guestd reported (`ready …`, `not ready: …`) and the job service in the guest hold while the guest runs: a
    # Paused or Saved instance's "guest ready" and jobs line would name a guest and a service that do not answer
    # now. The node's own words on it (`shut down`, `destroyed; releases …`, `no report: …`) stay.
    if i.state in GUEST_RUNS or not i.guest_status.startswith(("ready", "not ready")):
        rows.append(("guest", i.guest_status))
    if i.job_service and i.state == "Running":
        rows.append(("jobs", f"{i.job_service.get('url')}  ({i.job_service.get('dn')})"))
    if i.failure:
        rows.append(("failure", i.failure))
    if i.phases:
        rows.append(("phases", "  ".join(f"{n} {s:.3f}s" for n, s in i.phases)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.rjust(width)}  {v}", file=out)


# -- commands -------------------------------------------------------------------------------------------
def cmd_deploy(args) -> int:
    from client.repository import RepositoryClient
    from client.commands_repo import grid_client
    from gridftp.cli import ProgressBar
    from services.descriptor import set_field

    # The descriptor's bounds (workspace.xsd), checked before anything is asked: 0 is not "the default"
    memory = parse_memory(args.memory) if args.memory is not None else None
    if args.vcpus is not None and not 1 <= args.vcpus <= 256:
        raise CLIError(f"--vcpus must be 1 to 256, not {args.vcpus}")
    lifetime = parse_seconds(args.lifetime)
    if lifetime > 31536000:
        raise CLIError(f"a lifetime of {args.lifetime.strip()!r} is more than a node gives: at most 365d")
    node_url = args.url
    args.url = args.repository
    repo = RepositoryClient(grid_client(args, "VMRepositoryService"))
    descriptor = _call(_on_image, repo, repo.show, args.image)
    if memory is not None:
        set_field(descriptor, "hardware", "memory", memory)
    if args.vcpus is not None:
        set_field(descriptor, "hardware", "vcpus", args.vcpus)
    vm = vmm_client(args, node_url)
    info = _call(vm.deploy, descriptor, args.identifier, lifetime, paused=args.paused)
    print(f"deploying {args.image} as {args.identifier} ({printable(info.ref.key)}) on {printable(info.node)}: "
          f"address {printable(info.address)}, mac {printable(info.mac)}, lifetime {_human(lifetime)}"
          + (f" (a bare number is seconds: {args.lifetime.strip()}m, {args.lifetime.strip()}h or "
             f"{args.lifetime.strip()}d name minutes, hours, days)" if args.lifetime.strip().isdigit() and lifetime < 60
             else ""), file=sys.stderr)
    name = shlex.quote(args.identifier)
    if node_url != os.environ.get("VMGRID_NODE"):             # a node named by --url: so do the commands
        name += f" --url {shlex.quote(node_url)}"
    args.interrupt_note = (f"the deployment of {args.identifier} goes on at the node (`vmgrid vm status {name}` "
                           f"follows it, `vmgrid vm destroy {name}` ends it)")
    if args.no_wait:
        show_info(info, args.format)
        return 0
    bar = ProgressBar(sys.stderr, "staging") if sys.stderr.isatty() else None
    last = [None]

    def update(i) -> None:
        done, total, _ = i.staged
        if bar and i.state == "Staging" and total:
            bar(done, total)
        if i.state != last[0]:
            if bar and last[0] == "Staging":
                bar(total, total)
                bar.finish()
            print(f"  {printable(i.state)}", file=sys.stderr)
            last[0] = i.state

    final = _call(vm.wait_for, info.ref, ("Running", "Paused"), 3600, update)
    _await_job_service(args, final)
    show_info(final, args.format)
    return 0 if final.state in ("Running", "Paused") else 1


def _await_job_service(args, info) -> None:
    """A Running instance's job service, as `vmgrid job` reaches it: the node reports it once guestd started the
    grid container (`job service URL (started)`), which then takes some seconds to listen, and the first `vmgrid
    job submit` right after the deploy waited for it (trial14 M6). The deploy waits instead (the same line, the same
    bound, the same test: its WSDL fetched over TLS from the host its certificate names), so that its Running means
    jobs can be submitted; a service that does not answer from here within the bound is said and the deploy ends
    as it is (its instance runs)."""
    from client.commands_job import reach_job_service

    service = info.job_service or {}
    if info.state != "Running" or not service.get("url") or not service.get("dn"):
        return
    try:
        reach_job_service(args, service["url"], service["dn"], f"the job service of {args.identifier}").close()
    except CLIError as exc:
        print(f"vmgrid: {args.identifier} runs, and its job service does not answer from here yet: {exc}",
              file=sys.stderr)


def cmd_list(args) -> int:
    if args.page_size is not None and not 1 <= args.page_size <= 1000:
        raise CLIError(f"--page-size must be 1 to 1000, not {args.page_size}")
    vm = vmm_client(args)
    infos = _call(vm.list, args.all, **({"page_size": args.page_size} if args.page_size else {}))
    if args.format == "json":
        json.dump([info_json(i) for i in infos], sys.stdout, indent=2)
        print()
    elif not infos:           # a header alone reads as a listing that failed half-way
        print(f"no instances of yours on {vm.service.url}" if args.all else
              f"no live instances of yours on {vm.service.url} (--all also lists destroyed and failed ones)")
    else:
        table(INSTANCE_HEADERS, instance_rows(infos))
    return 0


def cmd_status(args) -> int:
    from services.faults import ResourceUnknown

    vm = vmm_client(args)
    ref = resolve(vm, args.instance)

    def status():
        try:
            return vm.status(ref)
        except ResourceUnknown:         # a destroyed instance named by its key: the node answers for it no more,
            ended = ended_record(vm, ref.key)   # but keeps its record (trial15 X9): show that
            if ended is None:
                raise
            return ended

    show_info(_call(status), args.format)
    return 0


def ended_record(vm, key: str):
    """The caller's ended instance ``key`` as `vm list --all` has it (a destroyed one's record: the node's other
    calls answer ResourceUnknown for it), or None."""
    return next((i for i in vm.list(True) if i.ref is not None and i.ref.key == key and i.state in FINAL), None)


def cmd_control(args) -> int:
    vm = vmm_client(args)
    if args.verb == "destroy":
        return _destroy(vm, args.instance)
    ref = resolve(vm, args.instance)
    print(f"{args.instance}: {printable(_call(getattr(vm, args.verb), ref))}")
    return 0


def _destroy(vm, name: str) -> int:
    """`vm destroy NAME|KEY`; an instance that ended already (Failed, Destroyed) is said to need nothing."""
    from client.vmmanager import InstanceRef
    from services.faults import VMGridFault

    if name.startswith("inst-"):
        ref = InstanceRef(vm.service.url, name)
    else:
        live = [i for i in _call(vm.list) if i.identifier == name]
        if not live:
            last = last_ended(vm, name)
            said = nothing_to_destroy(name, last) if last is not None else None
            if said:
                print(said)
                return 0
            ref = resolve(vm, name)         # raises: no such instance, or where a migrated one lives on
        else:
            ref = live[0].ref

    def destroy():
        try:
            return vm.destroy(ref), None
        except VMGridFault:                 # ended meanwhile (or named by its key): what it is now, if it ended
            try:
                info = vm.status(ref)
            except VMGridFault:
                info = ended_record(vm, ref.key)    # destroyed: only `vm list --all` has it (trial15 X9)
            said = nothing_to_destroy(name, info) if info is not None else None
            if said is None:
                raise
            return [], said

    pending, said = _call(destroy)
    print(said or f"{name}: destroyed" + (f"; cleanup at the central services pending (will be retried): "
                                          f"{printable(', '.join(pending))}" if pending else ""))
    return 0


def cmd_node_teardown(args) -> int:
    from services.container.cli import hold_state
    from services.container.config import ConfigError, load_config
    from services.vmmanager.network import NetworkSetupError, NodeBridge
    from services.vmmanager.vmm import tap_name

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    v = config.vmmanager
    if v.nic_kind != "bridge":
        raise CLIError(f"{args.config}: [vmmanager] nic_kind is {v.nic_kind!r}: the node makes no bridge to take down")
    if not config.state_dir("vmmanager").is_dir():
        raise CLIError(f"{args.config}: no node state in {config.state_dir('vmmanager')} (its [container] state_dir): "
                       f"nothing made by this node is recorded there")
    hold_state(config.container.state_dir, ["vmmanager"])     # refused while the node runs (its state lock)
    tap_prefix = tap_name("00000000-0000-0000-0000-000000000000", 0)[:2]
    try:
        bridge = NodeBridge(v.nic_source, v.gateway, v.network, config.state_dir("vmmanager"))
        before = bridge.check()
        taps = [p for p in before.ports if p.startswith(tap_prefix)]
        if taps and not args.force:
            raise CLIError(f"guests are still on bridge {v.nic_source} ({', '.join(taps)}): they would lose their "
                           f"network; stop them first, or give --force")
        after = bridge.teardown()
    except NetworkSetupError as exc:
        raise CLIError(str(exc)) from None
    if before.made.get("bridge") and before.exists and not after.exists:
        print(f"removed bridge {v.nic_source} (the node made it)")
    elif before.made.get("address") and before.holds(bridge.address) and not after.holds(bridge.address):
        print(f"removed {bridge.address} from bridge {v.nic_source} (the site's bridge stays)")
    else:
        print(f"nothing the node made is left on {v.nic_source}")
    for name in after.removed_tables:
        print(f"removed nftables table bridge {name}")
    return 0


def cmd_node_domains(args) -> int:
    census = _call(vmm_client(args).domains)
    if args.format == "json":
        json.dump({"node": census.node,
                   "domains": [{"name": d.name, "uuid": d.uuid, "hypervisor_state": d.hypervisor_state,
                                "instance": d.instance, "instance_state": d.instance_state} for d in census.domains],
                   "missing": [{"instance": k, "instance_state": s} for k, s in census.missing]}, sys.stdout, indent=2)
        print()
        return 0
    rows = [(d.name, d.uuid, d.hypervisor_state, d.instance or "(orphan: no live record)", d.instance_state)
            for d in census.domains]
    rows += [("(missing)", "", "", k, s) for k, s in census.missing]
    table(("domain", "uuid", "hypervisor", "instance", "instance state"), rows)
    print(f"{printable(census.node)}: {len(census.domains)} domain(s), {len(census.orphans)} orphan, "
          f"{len(census.missing)} instance(s) missing their domain")
    return 0


def cmd_migrate(args) -> int:
    """Migrate, with a progress bar of the target's pull while it runs (on a terminal) and the phase table."""
    import threading

    from client.vmmanager import InstanceRef
    from gridftp.cli import ProgressBar

    vm = vmm_client(args)
    ref = resolve(vm, args.instance)
    # the target named well before the node is asked (its container's URL completed, another service refused)
    target = vmm_client(args, args.to)
    args.to = target.service.url
    result: dict = {}
    name = shlex.quote(args.instance) + (f" --url {shlex.quote(vm.service.url)}"
                                         if vm.service.url != os.environ.get("VMGRID_NODE") else "")
    args.interrupt_note = (f"the migration of {args.instance} goes on between the nodes (`vmgrid vm status {name}` "
                           f"follows it: the instance is Migrating, then on {args.to} or back here, Running)")

    def run() -> None:
        try:
            result["info"] = vm.migrate(ref, args.to)
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the main thread
            result["error"] = exc
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    if sys.stderr.isatty():
        bar = ProgressBar(sys.stderr, "transfer")
        while worker.is_alive():
            worker.join(0.5)
            try:
                done, total, _ = target.status(InstanceRef(args.to, ref.key)).staged
                if total:
                    bar(done, total)
            except Exception:   # noqa: BLE001 - not registered there yet, or already done
                pass
        bar.finish()
    worker.join()
    if "error" in result:
        def failed():
            raise result["error"]
        _call(failed)
    info = result["info"]
    print(f"{args.instance}: migrated to {printable(info.node)} ({printable(info.ref.address)}); "
          f"{printable(info.state)}, address {printable(info.address)}",
          file=sys.stderr)
    if args.format == "json":
        json.dump({**info_json(info), "phases": info.phases}, sys.stdout, indent=2)
        print()
    else:
        table(["phase", "seconds"], [[name, f"{seconds:.4f}"] for name, seconds in info.phases]
              + [["total", f"{sum(s for _, s in info.phases):.4f}"]])
    return 0


def cmd_shutdown(args) -> int:
    if args.timeout is not None and args.timeout < 0:
        raise CLIError(f"--timeout is the seconds the guest gets before it is forced off, 0 or more, not {args.timeout}")
    vm = vmm_client(args)
    state = _call(vm.shutdown, resolve(vm, args.instance), "Trash" if args.trash else "Normal", args.timeout)
    print(f"{args.instance}: {printable(state)}")
    return 0


def cmd_lifetime(args) -> int:
    seconds = when = None
    if re.fullmatch(r"\s*-?\d+\s*[smhd]?\s*", args.when):
        seconds = parse_seconds(args.when, minimum=0)
    else:
        try:
            when = datetime.fromisoformat(args.when.replace("Z", "+00:00"))
        except ValueError:
            raise CLIError(f"{args.when!r} is neither a duration nor an ISO 8601 time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    vm = vmm_client(args)
    ref = resolve(vm, args.instance)
    if seconds is not None:
        new, now = _call(vm.set_termination_time, ref, seconds=seconds)
    else:
        new, now = _call(vm.set_termination_time, ref, when=when)
    print(f"{args.instance}: terminates at {new:%Y-%m-%d %H:%M:%S} UTC ({int((new - now).total_seconds())} s from now)")
    return 0


def cmd_watch(args) -> int:
    from client.notifications import NotificationConsumer, node_dn
    from client.soap import default_trust
    from client.vmmanager import InstanceRef
    from services.common.xsdtime import now_datetime      # the node's time of a change is one too: one format
    from services.faults import InstanceMoved, VMGridFault

    host, port = _listen_address(args.listen)
    if args.timeout < 0:
        raise CLIError(f"--timeout is seconds, 0 (until the instance ends) or more, not {args.timeout:g}")
    vm = vmm_client(args)
    ref = resolve(vm, args.instance)
    # A change counts only when the node that holds the instance signed it, as its answers must be: the consumer
    # takes the Notify messages of the producers it subscribed to only (the DN of the host credential the node
    # answers with), and another node or a guest's container (host certificates too) could otherwise send this
    # instance's key with a state of its choosing. A migration hands the watch on: the node's own "-> Migrated",
    # then its answer naming the node the instance lives on now (InstanceMoved), make that node the producer heard
    # (the subscription moved with the instance) and its answer the state from then on.

    def show(change) -> None:
        print(f"{printable(change.time)} {args.instance}: {printable(change.old)} -> {printable(change.new)} "
              f"(signed by {printable(change.signer)})", flush=True)

    def moved_to() -> str | None:
        try:
            vm.status(ref)
        except InstanceMoved as exc:
            return exc.address or None
        except Exception:             # noqa: BLE001 - the node cannot say: the watch ends at Migrated
            return None
        return None

    try:
        consumer = NotificationConsumer(default_trust(args.cert_dir), host, port).start()
    except OSError as exc:
        raise CLIError(f"cannot listen at {args.listen} (--listen): {exc.strerror or exc}") from None
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        producer = _call(node_dn, vm)
        consumer.expect(producer)
        # a migration under way: the node takes no subscription until it ends (the subscribers it carries to the
        # target are read when it begins): wait for its end, then watch the instance where it is (trial14 M3)
        while migrating := _call(_unless_migrating, vm, ref, consumer.url):
            print(f"{now_datetime()} {args.instance}: {printable(migrating)}: a migration has begun; waiting for "
                  f"its end to watch it (asking its state every {MIGRATION_POLL:g} s)", flush=True)
            address = _migration_end(vm, ref, deadline)
            if address is False:                # --timeout ran out first
                return 0
            if address is None:                 # rolled back: here, as before
                print(f"{now_datetime()} {args.instance}: the migration ended; it stays on "
                      f"{printable(vm.service.url)}", flush=True)
                continue
            vm, ref = vmm_client(args, address), InstanceRef(address, ref.key)
            print(f"{now_datetime()} {args.instance}: the migration ended; now on {printable(address)}", flush=True)
            consumer.forget(producer)
            producer = _call(node_dn, vm)
            consumer.expect(producer)
        state = _call(vm.status, ref).state
        print(f"{now_datetime()} {args.instance}: {printable(state)} (listening at {consumer.url})",
              flush=True)
        while state not in FINAL:
            left = deadline - time.monotonic() if deadline else 3600.0
            if left <= 0:
                break
            try:
                change = consumer.wait(lambda c: c.key == ref.key, timeout=min(left, 3600.0))
            except TimeoutError:
                continue
            show(change)
            state = change.new
            if state == "Migrated":
                address = moved_to()
                if address is None:
                    break
                vm, ref = vmm_client(args, address), InstanceRef(address, ref.key)
                try:
                    there = node_dn(vm)
                except Exception as exc:    # noqa: BLE001 - the new node cannot be asked: the watch ends here
                    print(f"{now_datetime()} {args.instance}: now on {printable(address)}, which does "
                          f"not answer ({printable(exc)})", flush=True)
                    break
                consumer.expect(there)          # that node's changes from now on, not the old node's
                if there == producer:           # one credential: its changes were heard all along
                    print(f"{now_datetime()} {args.instance}: now on {printable(address)}", flush=True)
                    continue
                consumer.forget(producer)
                producer = there
                # its changes before it was known were refused: its answer says the state there now
                try:
                    state = vm.status(ref).state
                except VMGridFault as exc:      # the instance ended there already
                    print(f"{now_datetime()} {args.instance}: now on {printable(address)}: "
                          f"{printable(exc.description)}", flush=True)
                    break
                print(f"{now_datetime()} {args.instance}: now on {printable(address)}, "
                      f"{printable(state)}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.stop()
    return 0


MIGRATION_STATES = ("Migrating", "Incoming")
MIGRATION_POLL = 1.0          # seconds between two questions of a migrating instance's state (vm watch)


def _migration_end(vm, ref, deadline: float | None):
    """Ask the instance's state until its migration ends: None when it is still on this node (rolled back), the
    address of the node it now lives on (the node's InstanceMoved), False when ``deadline`` came first."""
    from services.faults import InstanceMoved

    def state_or_moved() -> tuple[str, str | None]:
        try:
            return vm.status(ref).state, None
        except InstanceMoved as exc:
            if not exc.address:
                raise CLIError(f"{ref.key} moved to another node, which {vm.service.url} does not name") from None
            return "Migrated", exc.address

    while deadline is None or time.monotonic() < deadline:
        time.sleep(MIGRATION_POLL)
        state, address = _call(state_or_moved)
        if address:
            return address
        if state not in MIGRATION_STATES:
            return None
    return False


def _unless_migrating(vm, ref, consumer_url: str) -> str | None:
    """Subscribe ``consumer_url`` to the instance's changes; when the node refuses because the instance is migrating
    (IllegalTransitionFault, its state Migrating at the source, Incoming at the target), that state instead. Its
    other refusals are raised."""
    from services.faults import IllegalTransition, InstanceMoved

    try:
        vm.subscribe(ref, consumer_url)
    except InstanceMoved:               # it ended in between: _migration_end reads where it went
        return "Migrating"
    except IllegalTransition as exc:
        if exc.state in MIGRATION_STATES:
            return exc.state
        raise
    return None


def _listen_address(text: str) -> tuple[str, int]:
    """--listen HOST:PORT (HOST may be left out: 127.0.0.1; PORT 0: a free one)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port or 0)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise CLIError(f"--listen is HOST:PORT (e.g. 127.0.0.1:0, where 0 picks a free port), not {text!r}")
    return host or "127.0.0.1", number


def cmd_report(args) -> int:
    from client.report import Deployment, draw, print_report

    deployments = []
    for url in args.nodes:
        vm = vmm_client(args, url)
        for i in _call(vm.list, True):
            if i.phases:
                deployments.append(Deployment(f"{i.identifier}@{i.node}", tuple(i.phases)))
    if not deployments:
        raise CLIError("no deployments with phase timings on " + ", ".join(args.nodes))
    try:                                # the figure first: a file that cannot be written is said before any output
        path = draw(deployments, args.out)
    except OSError as exc:
        raise CLIError(f"cannot write the figure to {args.out}: {exc.strerror}") from None
    if args.json:
        json.dump([{"deployment": d.label, "phases": dict(d.phases)} for d in deployments], sys.stdout, indent=2)
        print()
    else:
        print_report(deployments, sys.stdout)
    print(f"figure written to {path}", file=sys.stderr)
    return 0
