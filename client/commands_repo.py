"""`vmgrid repo …`: the VMRepository from the command line."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

from client.cli import CLIError
from client.output import emit_descriptors, show_descriptor, table
from services.common.errors import printable

DEFAULT_REPOSITORY = "https://localhost:8443/wsrf/services/VMRepositoryService"


def add_grid_options(p, env_var: str, default: str, what: str) -> None:
    p.add_argument("--url", default=os.environ.get(env_var, default),
                   help=f"the {what} service URL (default ${env_var} or {default})")
    p.add_argument("--cert-dir", help="trusted CA directory (default $X509_CERT_DIR or /etc/grid-security/certificates)")
    p.add_argument("--proxy", help="credential file (default $X509_USER_PROXY, /tmp/x509up_u<uid>, ~/.globus)")


def add_format(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", dest="format", action="store_const", const="json", help="JSON output")
    g.add_argument("--xml", dest="format", action="store_const", const="xml", help="the descriptors as XML")
    p.set_defaults(format="table")


def register(subparsers) -> None:
    repo = subparsers.add_parser("repo", help="the VO's VM image repository",
                                 description="Query and manage the VMRepository.")
    sub = repo.add_subparsers(dest="repo_command", metavar="COMMAND", required=True)

    p = sub.add_parser("register", help="register an image with its descriptor")
    p.add_argument("descriptor", type=Path, help="the descriptor XML file (wsdl/workspace.xsd)")
    p.add_argument("image", help="the image file")
    p.add_argument("--on-host", action="store_true",
                   help="IMAGE is a path on the repository host, inside an ingest directory (admins); "
                        "otherwise it is uploaded from here over GridFTP")
    p.add_argument("-p", "--parallel", type=int, default=4, help="GridFTP streams for the upload (default 4)")
    p.add_argument("--name", help="register the image under this name instead of the descriptor's identity/name "
                                  "(the file is not changed)")
    add_format(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("import", help="register a directory of descriptors naming image bytes already here",
                       description="Register every descriptor file (*.xml) of DIRECTORY, all or none. Each names "
                                   "by image/sha256 the bytes of an image already in the repository that you may "
                                   "read (register one with `vmgrid repo register` first); each is validated and "
                                   "authorized as a registration is. Invalid files are all reported and nothing is "
                                   "sent; a refusal by the repository names the file and undoes the import.")
    p.add_argument("directory", type=Path, help="a directory of descriptor files (*.xml)")
    p.add_argument("--batch", type=int, default=1000, help="descriptors per call (default and most 1000)")
    p.add_argument("--json", dest="format", action="store_const", const="json", default="table",
                   help="the files and their new image ids as JSON")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("query", help="find images by criteria",
                       description="Criteria are FIELD OP VALUE, e.g. 'ram >= 512' 'distribution = debian' "
                                   "'library emboss >= 6.6'; all must hold; a lone 'or' starts another group. "
                                   "Operators: = != < <= > >= contains matches (or eq ne lt le gt ge). No criteria lists every image.")
    p.add_argument("criteria", nargs="*", help="criteria (quote each one)")
    p.add_argument("--xpath", help="an XPath 1.0 expression on each descriptor instead (prefix ws:)")
    p.add_argument("--order-by", default=None, help="name (default), vo, owner, created, updated, memory, vcpus, size")
    p.add_argument("--desc", action="store_true", help="descending order")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many (default 20, max 1000)")
    add_format(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("show", help="one image's descriptor")
    p.add_argument("image", help="image id (img-…) or VO/name")
    add_format(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("duplicate", help="a new descriptor sharing the image bytes, with changes")
    p.add_argument("image")
    p.add_argument("name", help="the new image name")
    p.add_argument("--memory", help="RAM: MiB, or with a unit as queries take it (512M, 4G)")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--container", dest="container_command", help="the grid container command")
    p.add_argument("--description")
    p.add_argument("--version")
    add_format(p)
    p.set_defaults(func=cmd_duplicate)

    p = sub.add_parser("update", help="replace an image's descriptor (the bytes stay)")
    p.add_argument("image")
    p.add_argument("descriptor", type=Path)
    add_format(p)
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("remove", help="remove an image (its bytes go when nothing else uses them)")
    p.add_argument("image")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("vos", help="your VOs and their image counts")
    add_format(p)
    p.set_defaults(func=cmd_vos)

    for name, action in sub.choices.items():
        add_grid_options(action, "VMGRID_REPOSITORY", DEFAULT_REPOSITORY, "VMRepository")


def connect(args):
    """A RepositoryClient for the command's --url as the user's credential."""
    from client.repository import RepositoryClient

    return RepositoryClient(grid_client(args, "VMRepositoryService"))


def grid_client(args, service: str | None = None):
    """A signed SOAP client for the command's --url; the credential and trust store are read once per
    command (`vmgrid repo import` opens two connections). ``service``: the service expected there (VMManagerService,
    ...): a URL of its container alone (https://HOST:PORT) is completed with its path, and another service's URL is
    refused, naming which service it is."""
    from client.soap import ClientError, GridServiceClient, service_url
    from security.pki import PKIError, load_credential

    given = args.url
    if service is not None:
        try:
            args.url = service_url(args.url, service)
        except ClientError as exc:
            raise CLIError(str(exc)) from None

    loaded = getattr(args, "_credential_and_trust", None)
    try:
        if loaded is None:
            loaded = args._credential_and_trust = (
                load_credential(proxy=args.proxy) if args.proxy else load_credential(), trust_store(args))
        credential, trust = loaded
    except (PKIError, OSError) as exc:
        raise CLIError(str(exc)) from None
    try:
        return GridServiceClient(args.url, credential, trust, timeout=call_timeout(), service=service)
    except ClientError as exc:
        if "HTTP 404" in str(exc):
            if service is not None and given != args.url:     # a container's URL alone: say what that one serves
                served = container_services(args.url, trust)
                if served is not None:
                    raise CLIError(another_container(given, args.url, service, served)) from None
            raise CLIError(no_such_service(args.url, service)) from None
        raise CLIError(str(exc)) from None


def container_services(url: str, trust) -> list[str] | None:
    """The services the container of ``url`` hosts, as its index at / names them (what a GET there
    answers: one `NAME<TAB>WSDL URL` line each), or None when it cannot say."""
    from urllib.parse import urlsplit

    from security.https import HTTPSPool
    from security.tls import client_ssl_context

    parts = urlsplit(url)
    try:
        pool = HTTPSPool(f"{parts.scheme}://{parts.netloc}/", client_ssl_context(trust.cert_dir), timeout=30.0,
                         max_answer=64 << 10)
        answer = pool.get("/")
    except Exception:                      # noqa: BLE001 - the plain 404 line then
        return None
    if answer.status_code != 200:
        return None
    names = [line.split("\t", 1)[0] for line in answer.content.decode("utf-8", "replace").splitlines()]
    return [printable(n, 80) for n in names if re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", n)]


# the command that takes each service's URL (what another container's URL alone is pointed to)
_COMMANDS_OF = {"VMManagerService": "vmgrid vm … --url, vmgrid job … --node",
                "VMRepositoryService": "vmgrid repo … --url", "AuthorizationService": "vmgrid authz … --url", "JobService": "vmgrid job … JOBS_URL"}


def another_container(given: str, url: str, service: str, served: list[str]) -> str:
    """trial16 T9: a container's URL alone, completed with ``service``'s path, is another container's: it serves
    ``served``, not ``service``. Say which, and where each belongs."""
    if not served:
        return f"{given} serves no {service} (its container hosts no service): {no_service_hint(url, service)}"
    which = ", ".join(f"the {n} ({_COMMANDS_OF[n]})" if n in _COMMANDS_OF else f"the {n}" for n in served)
    hint = ""
    if service == "JobService" and "VMManagerService" in served:
        hint = "; to reach an instance's job service through its node, name the instance: vmgrid job … NAME --node " \
               f"{given}"
    return f"{given} is the container of {which}, not of a {service}: {no_service_hint(url, service)}{hint}"


# the environment variable naming each service's URL (README), and the option that names it
_SERVICE_URL_FROM = {"VMManagerService": ("VMGRID_NODE", "--url (--node for job commands)"),
                     "VMRepositoryService": ("VMGRID_REPOSITORY", "--url"),
                     "AuthorizationService": ("VMGRID_AUTHZ", "--url")}
_DEFAULT_URLS = ("https://localhost:8443/wsrf/services/VMManagerService", DEFAULT_REPOSITORY,
                 "https://localhost:8443/wsrf/services/AuthorizationService")


def no_service_hint(url: str, service: str | None = None) -> str:
    """What to do when ``url`` names no service there: which variable or option names it (``service``, the one the
    command expects, else the URL's last word), and whether the default was used because neither was given."""
    service = service or url.split("?")[0].rstrip("/").rpartition("/")[2]
    env, option = _SERVICE_URL_FROM.get(service, (None, "the service's URL"))
    if env is None:
        return f"check {option}"
    if os.environ.get(env) is None and url in _DEFAULT_URLS:
        return f"${env} is not set, so the default URL was used: give the {service}'s URL with {option} or set ${env}"
    return f"check the {service}'s URL (${env}, {option})"


def no_such_service(url: str, service: str | None = None) -> str:
    return f"no service answers at {url} (HTTP 404 for its WSDL): {no_service_hint(url, service)}"


def parse_memory(text: str) -> int:
    """--memory: MiB, or a size with a unit as a query takes it (512M, 4G, 4GiB; services.descriptor.number_value),
    within the descriptor's bounds (workspace.xsd: 1 MiB to 4 TiB)."""
    from services.descriptor import number_value

    try:
        mib = number_value("hardware.memory", text)
    except ValueError:
        mib = None
    if mib is None or mib != int(mib) or not 1 <= mib <= 4194304:
        raise CLIError(f"--memory is RAM in MiB (or with a unit: 512M, 4G), 1 to 4194304 (4 TiB), not {text}")
    return int(mib)


def call_timeout() -> float | None:
    """$VMGRID_CALL_TIMEOUT: the seconds one call to a service may take whole (its answer read to the end), and the
    fetch of its WSDL and of each schema; by default 120 (60 for the WSDL and schemas)."""
    text = os.environ.get("VMGRID_CALL_TIMEOUT", "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if not 0 < seconds < 1e6:
        raise CLIError(f"VMGRID_CALL_TIMEOUT is {text!r}: give seconds, more than 0")
    return seconds


def trust_store(args):
    """The trusted CA directory of --cert-dir, X509_CERT_DIR or the Globus defaults; a missing one is a CLI
    message naming how to give it (a newcomer who did not export X509_CERT_DIR), not a traceback."""
    from client.soap import default_trust
    from security.trust import ChainError

    try:
        return default_trust(args.cert_dir)
    except ChainError as exc:
        raise CLIError(f"{exc}: give your grid's CA certificates with --cert-dir DIR or "
                       f"`export X509_CERT_DIR=DIR`") from None


def _read_descriptor(path: Path):
    """A descriptor file, validated here first so errors name the file's own lines."""
    from services.descriptor import parse_descriptor
    from services.faults import VMGridFault

    try:
        return parse_descriptor(path.read_bytes())
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror}") from None
    except VMGridFault as exc:
        raise CLIError(f"{path}: {exc.description}") from None


def _call(func, *args, **kwargs):
    """Run a client call; typed faults and transport failures become one-line CLI errors."""
    from client.soap import ClientError
    from services.faults import BadQuery, InvalidDescriptor, VMGridFault

    try:
        return func(*args, **kwargs)
    except InvalidDescriptor as exc:
        raise CLIError(f"invalid descriptor: {exc.description}") from None
    except BadQuery as exc:
        raise CLIError(f"bad query: {exc.description}") from None
    except VMGridFault as exc:
        raise CLIError(f"{type(exc).__name__}: {exc.description}") from None
    except ClientError as exc:
        raise CLIError(str(exc)) from None


def _image_hint(repo, ref: str) -> str:
    """For an image reference without its VO (``emboss-real``): the VO/name to give, when exactly one VO whose
    images the caller may read has an image of that name (the query answers only with those)."""
    from services.vmrepository.query import Criterion

    ref = ref.strip()
    if not ref or "/" in ref or ref.startswith("img-"):
        return ""
    try:
        found = repo.query([[Criterion("name", "=", ref)]], limit=50)
    except Exception:       # noqa: BLE001 - only a hint: the reference's own error is what the user gets
        return ""
    vos = sorted({d.findtext("{*}identity/{*}vo") for d in found.descriptors})
    if len(vos) == 1:
        return f"did you mean {vos[0]}/{ref}?"
    if vos:
        return f"images named {ref} are in the VOs {', '.join(vos)}: give VO/{ref}"
    return f"no image you may read is named {ref} (vmgrid repo query 'name contains {ref}' searches)"


def _on_image(repo, func, ref: str, *args, **kwargs):
    """``func(ref, ...)``; an image reference the repository cannot read (InvalidArgument) gets the hint above."""
    from services.faults import InvalidArgument

    try:
        return func(ref, *args, **kwargs)
    except InvalidArgument as exc:
        hint = _image_hint(repo, ref)
        if not hint:
            raise
        raise CLIError(f"InvalidArgument: {exc.description}; {hint}") from None


def cmd_register(args) -> int:
    if not args.on_host and not 1 <= args.parallel <= 64:      # as `vmgrid transfer -p` (a GridFTP server's bound)
        raise CLIError("-p must be between 1 and 64")
    descriptor = _read_descriptor(args.descriptor)
    if args.name is not None:
        _rename(descriptor, args.name)
    repo = connect(args)
    if args.on_host:
        ws = _call(repo.register, descriptor, local_path=args.image)
    else:
        ws = _call(upload_and_register, repo, args, descriptor)
    emit_descriptors([ws], args.format)
    return 0


def _rename(descriptor, name: str) -> None:
    """The descriptor's identity/name set to ``name``, checked as the repository checks it (wsdl/workspace.xsd)."""
    from services.descriptor import check_descriptor, set_field
    from services.faults import VMGridFault

    set_field(descriptor, "identity", "name", name)
    try:
        check_descriptor(descriptor)
    except VMGridFault as exc:
        raise CLIError(f"--name {name!r}: {exc.description}") from None


def upload_and_register(repo, args, descriptor):
    """Upload the image from this machine into the caller's directory of the repository's upload
    area (GridFTP, parallel, restartable, verified), then register it. The descriptor carries the
    local sha256, so the repository refuses bytes that are not the ones sent."""
    import hashlib
    from pathlib import Path

    import gridftp
    from gridftp.cli import ProgressBar
    from services.descriptor import set_field
    from services.vmrepository.transfer import NAME

    path = Path(args.image)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    from services.descriptor import Descriptor
    from services.vmrepository.store import image_format_of

    actual, said = image_format_of(path), Descriptor(descriptor).image_format    # the repository refuses a mismatch
    if actual != said:                                                           # after the upload: say it before
        raise CLIError(f"{path} is a {actual} image but {args.descriptor} says <format>{said}</format>: nothing "
                       f"uploaded (correct the descriptor, or convert: qemu-img convert -O {said} {path} NEW)")
    name = path.name if NAME.fullmatch(path.name) else "image-" + hashlib.sha256(path.name.encode()).hexdigest()[:16]
    location = repo.upload_location(descriptor)     # a descriptor the repository refuses is refused before the upload
    bar = ProgressBar(sys.stderr, "uploading") if sys.stderr.isatty() else None
    service = repo.service
    args.interrupt_note = ("nothing is registered; run the same command again: the upload resumes from the server's "
                           "last restart marker (it sends one every few seconds)")
    try:
        result = gridftp.upload(path, location.rstrip("/") + "/" + name, args.parallel,
                                credential=service.credential, trust=service.trust, progress=bar)
    except gridftp.GridFTPError as exc:
        raise CLIError(f"upload to {location} failed: {exc}") from None
    finally:
        if bar:
            bar.finish()
    reused = f", {result.bytes_reused} of them sent by an earlier attempt" if result.bytes_reused else ""
    print(f"uploaded {result.size} bytes in {result.seconds:.1f} s ({result.mbit_per_s:.0f} Mbit/s){reused}, "
          f"sha256 {result.sha256}", file=sys.stderr)
    args.interrupt_note = ("the upload is complete and in your upload area; run the same command again to register it "
                           "(the upload is not repeated)")
    set_field(descriptor, "image", "sha256", result.sha256)
    return repo.register(descriptor, upload=name)


def read_descriptor_dir(directory: Path) -> list[tuple[Path, object]]:
    """Every descriptor file of ``directory``, parsed and validated; a CLIError listing every bad file
    (each also printed as its own ``vmgrid: FILE: reason`` line) when any is bad. A directory may hold tens of
    thousands: the names are listed and sorted as strings once, each file opened relative to the directory and read
    with one ``os.read`` of at most the largest descriptor and a byte (8 us a file against 30 with ``open()`` and a
    file object); a longer one is refused unread."""
    from services.descriptor import MAX_DESCRIPTOR_BYTES, WS, parse_descriptor
    from services.faults import InvalidDescriptor, VMGridFault

    if not directory.is_dir():
        raise CLIError(f"{directory}: not a directory")
    with os.scandir(directory) as listing:
        names = sorted(e.name for e in listing if e.name.endswith(".xml"))
    if not names:
        raise CLIError(f"{directory}: no descriptor files (*.xml)")
    identity, image = f"{{{WS}}}identity", f"{{{WS}}}image"
    wanted = {f"{{{WS}}}{name}": name for name in ("name", "vo", "imageId", "sha256")}
    good, errors, seen = [], [], {}
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            path = directory / name
            try:
                # never follows a symbolic link (out of the directory or not), never waits on a FIFO or a device
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
                try:
                    kind = _not_a_file(os.fstat(fd).st_mode)
                    if kind:
                        errors.append(f"{_shown(path)}: {kind}, not a regular file: not read")
                        continue
                    data = os.read(fd, MAX_DESCRIPTOR_BYTES + 1)
                    if len(data) > MAX_DESCRIPTOR_BYTES:        # not read further: parse_descriptor's refusal
                        raise InvalidDescriptor(f"descriptor of {os.fstat(fd).st_size} bytes exceeds "
                                                f"{MAX_DESCRIPTOR_BYTES} bytes")
                finally:
                    os.close(fd)
                ws = parse_descriptor(data)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    errors.append(f"{_shown(path)}: a symbolic link: not followed (copy the file into {_shown(directory)})")
                else:
                    errors.append(f"{_shown(path)}: {exc.strerror}")
                continue
            except VMGridFault as exc:
                errors.append(f"{_shown(path)}: {exc.description}")
                continue
            f = {}                      # identity/name, vo, imageId and image/sha256, in one pass over two sections
            for section in ws:
                if section.tag == identity or section.tag == image:
                    for c in section:
                        key = wanted.get(c.tag)
                        if key and c.text is not None:
                            f.setdefault(key, c.text)
            image_id, vo, ws_name = f.get("imageId"), f.get("vo"), f.get("name")
            if image_id:
                errors.append(f"{_shown(path)}: carries an imageId ({image_id}); the repository assigns it")
            elif not f.get("sha256"):
                errors.append(f"{_shown(path)}: no image/sha256 naming the image bytes in the repository")
            elif (vo, ws_name) in seen:
                errors.append(f"{_shown(path)}: the name {vo}/{ws_name} is also in {_shown(seen[vo, ws_name].name)}")
            else:
                seen[vo, ws_name] = path
                good.append((path, ws))
    finally:
        os.close(dir_fd)
    if errors:
        for line in errors:
            print(f"vmgrid: {line}", file=sys.stderr)
        raise CLIError(f"{len(errors)} of {len(names)} descriptor files in {directory} are not importable; "
                       f"nothing was imported")
    return good


def _not_a_file(mode: int) -> str | None:
    """What a directory entry that is not a regular file is (a FIFO, a device, ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


def _shown(path) -> str:
    """A file name as printed on one line: control characters (a newline, an escape sequence), bidi overrides and
    undecodable bytes escaped, so that a name cannot forge another line or hide what it is."""
    text = str(path)
    if text.isprintable() and not any(c in _BIDI for c in text):
        return text
    return "".join(c if c.isprintable() and c not in _BIDI else ascii(c)[1:-1] for c in text)


_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


IMPORT_IN_FLIGHT = 2   # ImportImages calls of one `vmgrid repo import` under way at once


def cmd_import(args) -> int:
    """Every descriptor file is read and validated first (nothing is sent when one is bad); then the batches go
    out with IMPORT_IN_FLIGHT calls under way, each on its own connection, so that the command signing and
    sending one batch and the repository checking and storing another use both ends at once. A batch refused
    stops the sending; what the batches before it registered is removed again."""
    import re
    import threading
    import time
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from queue import SimpleQueue

    from client.repository import RepositoryClient
    from client.soap import ClientError
    from services.faults import VMGridFault

    if not 1 <= args.batch <= 1000:
        raise CLIError("--batch is between 1 and 1000")
    # The connection (TLS, the WSDL fetched and read) is made while the files are read, the repository's side of it
    # on the other core. Bad files are reported first, whatever becomes of the connection (a daemon thread: a
    # repository that does not answer does not hold up the report).
    connected: SimpleQueue = SimpleQueue()
    threading.Thread(target=lambda: connected.put(_attempt(connect, args)), name="vmgrid-connect", daemon=True).start()
    entries = read_descriptor_dir(args.directory)
    repo0 = connected.get()
    if isinstance(repo0, Exception):
        raise repo0
    batches = [entries[first:first + args.batch] for first in range(0, len(entries), args.batch)]
    repos = [repo0] + [RepositoryClient(repo0.service.another())
                       for _ in range(min(IMPORT_IN_FLIGHT, len(batches)) - 1)]
    idle: SimpleQueue = SimpleQueue()
    for repo in repos:
        idle.put(repo)

    def send(batch):
        repo = idle.get()
        try:
            return repo.import_images([ws for _, ws in batch], move=True)
        finally:
            idle.put(repo)

    started = time.monotonic()
    done: list[tuple[Path, str]] = []
    refused = None                       # (the batch, the fault) of the first refusal
    waiting = iter(batches)
    under_way: deque = deque()
    with ThreadPoolExecutor(len(repos), thread_name_prefix="vmgrid-import") as pool:
        def top_up():
            while refused is None and len(under_way) < len(repos):
                batch = next(waiting, None)
                if batch is None:
                    return
                # a batch sent is in under_way before an interrupt can be taken (it is waited for and undone)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    under_way.append((batch, pool.submit(send, batch)))
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

        recorded: set = set()                # the calls whose images are in ``done``
        previous_term = signal.signal(signal.SIGTERM, _interrupt)   # a kill is an interrupt too: undone alike
        try:
            top_up()                         # inside: an interrupt once the first batches are out undoes them too
            while under_way:
                batch, future = under_way[0]     # left in under_way until answered: an interrupt waits for it
                try:
                    ids = future.result()
                except (VMGridFault, ClientError) as exc:
                    refused = refused or (batch, exc)
                    under_way.popleft()
                    continue
                # recorded as one step: an interrupt between adding its images and marking it recorded counted
                # them twice, and the undo then removed each twice (the second removal refused: UnknownImage)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    done += [(path, image_id) for (path, _), image_id in zip(batch, ids)]
                    recorded.add(future)
                    under_way.popleft()
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
                top_up()
        except KeyboardInterrupt:
            # Ctrl-C (or SIGTERM) between or during batches: no further batch is sent; the calls under way are
            # waited for (what they register is known only from their answers), and everything is removed again
            refused = refused or (None, None)
            for batch, future in under_way:
                if future in recorded:
                    continue
                try:
                    ids = future.result()
                except Exception:  # noqa: BLE001 - refused or lost: nothing of it to remove
                    continue
                done += [(path, image_id) for (path, _), image_id in zip(batch, ids)]
            args.interrupt_note = f"nothing was imported{_undo(repos[0], done)}"
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_term)
    if refused is not None:
        batch, exc = refused
        what = f"{type(exc).__name__}: {exc.description}" if isinstance(exc, VMGridFault) else str(exc)
        m = re.match(r"descriptor (\d+)\b", getattr(exc, "description", "") or "")
        if m and 1 <= int(m.group(1)) <= len(batch):
            what = f"{_shown(batch[int(m.group(1)) - 1][0])}: {what}"
        raise CLIError(f"{what}; nothing was imported{_undo(repos[0], done)}") from None
    seconds = time.monotonic() - started
    if args.format == "json":
        json.dump([{"file": str(p), "imageId": i} for p, i in done], sys.stdout, indent=2)
        print()
    else:
        print(f"imported {len(done)} descriptor{'' if len(done) == 1 else 's'} from {args.directory} in {seconds:.1f} s "
              f"({len(done) / max(seconds, 1e-9):.0f}/s)")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _attempt(func, *args):
    """``func(*args)``, or what it raised (handed from a thread to the one that reports it)."""
    try:
        return func(*args)
    except Exception as exc:  # noqa: BLE001 - raised again in the command's own thread
        return exc


def _undo(repo, done: list[tuple[Path, str]]) -> str:
    """Remove what the other batches of a failed import registered; says what could not be removed."""
    left = []
    for path, image_id in reversed(done):     # the batches sent before the refused one, and any under way with it
        try:
            repo.remove(image_id)
        except Exception:  # noqa: BLE001 - report, keep undoing the rest
            left.append(f"{path} ({image_id})")
    if left:
        return f" except {len(left)} descriptor(s) of its other batches that could not be removed: {', '.join(left)}"
    return (f" (the {len(done)} descriptor{'' if len(done) == 1 else 's'} of its other batches "
            f"{'was' if len(done) == 1 else 'were'} removed again)" if done else "")


def cmd_query(args) -> int:
    if args.limit is not None and not 1 <= args.limit <= 1000 or args.offset < 0:
        raise CLIError("--limit is 1 to 1000 descriptors (default 20), --offset 0 or more")
    repo = connect(args)
    result = _call(repo.query, args.criteria, xpath=args.xpath, order_by=args.order_by,
                   descending=args.desc, offset=args.offset, limit=args.limit)
    emit_descriptors(result.descriptors, args.format, total=result.total, offset=result.offset)
    return 0


def cmd_show(args) -> int:
    repo = connect(args)
    ws = _call(_on_image, repo, repo.show, args.image)
    if args.format == "table":
        show_descriptor(ws)
    else:
        emit_descriptors([ws], args.format)
    return 0


def cmd_duplicate(args) -> int:
    memory = parse_memory(args.memory) if args.memory is not None else None
    repo = connect(args)
    ws = _call(_on_image, repo, repo.duplicate, args.image, args.name, memory=memory, vcpus=args.vcpus,
               container_command=args.container_command, description=args.description, version=args.version)
    emit_descriptors([ws], args.format)
    return 0


def cmd_update(args) -> int:
    descriptor = _read_descriptor(args.descriptor)
    repo = connect(args)
    emit_descriptors([_call(_on_image, repo, repo.update, args.image, descriptor)], args.format)
    return 0


def cmd_remove(args) -> int:
    repo = connect(args)
    deleted = _call(_on_image, repo, repo.remove, args.image)
    print(f"removed {args.image}" + ("; its image bytes were deleted" if deleted else
                                     "; its image bytes stay (other descriptors use them)"))
    return 0


def cmd_vos(args) -> int:
    vos = _call(connect(args).vos)
    if args.format == "json":
        json.dump([{"vo": v, "images": n} for v, n in vos], sys.stdout, indent=2)
        print()
    else:
        table(["vo", "images"], vos)
    return 0
