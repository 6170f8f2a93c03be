"""`vmgrid transfer` and `vmgrid gridftp-server` as a user runs them (child processes, real servers)."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from gridftp.cli import ProgressBar
from gridftp.errors import GridFTPError

from tests.fixtures.drip import dripping_listener
from tests.unit.gridftp.gridftp_helpers import REPO, MiB, ServerProcess, make_file, sha256_of


def blake3_of(path) -> str:
    import blake3

    return blake3.blake3(path.read_bytes()).hexdigest()


def vmgrid(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_transfer_download_upload_and_third_party(start_server, tree, tmp_path):
    big = make_file(tree / "data" / "big", 5 * MiB + 1)
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    got = vmgrid("transfer", server.url("/data/big"), str(out_dir), "-p", "3", "--progress")
    assert got.returncode == 0, got.stderr
    assert sha256_of(out_dir / "big") == sha256_of(big)
    assert f"blake3 {blake3_of(big)} verified" in got.stdout          # both ends are vmgrid: BLAKE3
    assert "3 streams" in got.stdout and "Mbit/s" in got.stdout
    assert "100.0%" in got.stderr and "[####" in got.stderr        # the progress bar
    sent = vmgrid("transfer", str(out_dir / "big"), server.url("/up/"), "-q", "--state-dir", str(tmp_path / "s"))
    assert sent.returncode == 0, sent.stderr
    assert sha256_of(tree / "up" / "big") == sha256_of(big)
    assert sent.stderr == ""                                        # -q: no bar
    third = vmgrid("transfer", server.url("/data/big"), server.url("/up/copy"), "-p", "2",
                   "--state-dir", str(tmp_path / "s"))
    assert third.returncode == 0, third.stderr
    assert sha256_of(tree / "up" / "copy") == sha256_of(big)


def test_transfer_errors_are_one_line_messages(start_server, tmp_path):
    server = start_server()
    missing = vmgrid("transfer", server.url("/data/nope"), str(tmp_path / "x"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("vmgrid: ") and "550" in missing.stderr and "Traceback" not in missing.stderr
    local = vmgrid("transfer", str(tmp_path / "a"), str(tmp_path / "b"))
    assert local.returncode == 1 and "URL" in local.stderr
    wrong = vmgrid("transfer", server.url("/data/small"), str(tmp_path / "c"), "--sha256", "0" * 64)
    assert wrong.returncode == 1 and "does not match" in wrong.stderr
    assert not (tmp_path / "c").exists()
    parallel = vmgrid("transfer", server.url("/data/small"), str(tmp_path / "d"), "-p", "0")
    assert parallel.returncode == 1
    typo = vmgrid("transfer", server.url("/data/small"), str(tmp_path / "no-such-dir" / "e"))
    assert typo.returncode == 1 and typo.stderr == f"vmgrid: {tmp_path}/no-such-dir/e: no directory {tmp_path}/no-such-dir (create it first)\n"
    assert not (tmp_path / "no-such-dir").exists()                  # no folder made for a mistyped path


def test_transfer_starts_without_the_other_command_families(start_server, tree, tmp_path):
    """A download's start is part of its time: `vmgrid transfer ftp://...` loads neither the other command
    families (lxml, the services) nor TLS/GSI (cryptography, pyOpenSSL, not even the standard ssl module), nor
    dataclasses, typing or hashlib, and still downloads and verifies (with BLAKE3, from a vmgrid server)."""
    server = start_server()
    probe = ("import sys; from client.cli import main; rc = main(sys.argv[1:]); "
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'OpenSSL', 'lxml', 'zeep', 'ssl'}); "
             "print('loaded:', heavy, 'vmmanager' in str(sorted(sys.modules))); "
             "print('start:', sorted({'dataclasses', 'typing', 'hashlib'} & set(sys.modules))); sys.exit(rc)")
    got = subprocess.run([sys.executable, "-c", probe, "transfer", server.url("/data/small"), str(tmp_path / "s"),
                          "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert "loaded: [] False" in got.stdout
    assert "start: []" in got.stdout            # nor dataclasses, typing, hashlib: a BLAKE3 download needs none
    assert (tmp_path / "s").read_bytes() == (tree / "data" / "small").read_bytes()


def test_transfer_ends_without_the_teardown_and_loses_no_output(start_server, tree, tmp_path):
    """A successful `vmgrid transfer` run as the process ends without the interpreter's teardown (its atexit
    handlers do not run) once its output is flushed into the pipe and the file has its name; a failed one ends
    the normal way."""
    server = start_server()
    out = tmp_path / "out"
    out.mkdir()
    probe = ("import atexit, sys; from client.cli import main; "
             "atexit.register(lambda: print('teardown ran', flush=True)); sys.exit(main())")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe, "transfer", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    ok = run(server.url("/data/f3m"), str(out / "f"), "-q")
    assert ok.returncode == 0, ok.stderr
    assert "teardown ran" not in ok.stdout
    assert ok.stdout.rstrip().endswith("verified") and "3.0 MiB in" in ok.stdout     # every line, through a pipe
    assert sha256_of(out / "f") == sha256_of(tree / "data" / "f3m")
    assert sorted(p.name for p in out.iterdir()) == ["f"]                           # no partial file, no sidecar
    failed = run(server.url("/data/nope"), str(out / "g"), "-q")
    assert failed.returncode == 1 and "vmgrid:" in failed.stderr
    assert "teardown ran" in failed.stdout


def test_gridftp_server_command(tree, tmp_path):
    refused = vmgrid("gridftp-server", "--root", str(tree), "--port", "0", "--no-tls")
    assert refused.returncode == 1 and "nobody could log in" in refused.stderr
    server = ServerProcess(tree, "--anonymous", "--no-tls")
    try:
        got = vmgrid("transfer", f"ftp://127.0.0.1:{server.port}/data/f3m", str(tmp_path / "f"), "-q")
        assert got.returncode == 0, got.stderr
        assert sha256_of(tmp_path / "f") == sha256_of(tree / "data" / "f3m")
    finally:
        server.stop()
    assert server.proc.returncode == 0                  # SIGTERM stops it cleanly


def test_progress_bar_line():
    bar = ProgressBar(io.StringIO(), "image")
    bar._samples = [(0.0, 0), (2.0, 250_000_000)]       # 1 Gbit/s over the last two seconds
    line = bar.line(250_000_000, 1_000_000_000)
    assert "25.0%" in line and "1000.0 Mbit/s" in line and "ETA 0:06" in line
    assert line.count("#") == 7


def test_gsi_from_the_command_line(grid_pki, tree, tmp_path):
    """`vmgrid gridftp-server --grid-mapfile` and `vmgrid transfer --gsi --prot C|P` (AUTH GSSAPI)."""
    gridmap = tmp_path / "grid-mapfile"
    gridmap.write_text(f'"{grid_pki.alice.dn}" alice\n')
    server = ServerProcess(tree, "--cert", str(grid_pki.host_cert_path), "--key", str(grid_pki.host_key_path),
                           "--cert-dir", str(grid_pki.cert_dir), "--grid-mapfile", str(gridmap),
                           "--data-peer", "127.0.0.2")
    try:
        url = f"gsiftp://localhost:{server.port}/data/f3m"
        common = ["--cert-dir", str(grid_pki.cert_dir), "-q"]
        got = vmgrid("transfer", "--gsi", url, str(tmp_path / "p"), "--proxy", str(grid_pki.alice.proxy_path),
                     *common)
        assert got.returncode == 0, got.stderr
        assert sha256_of(tmp_path / "p") == sha256_of(tree / "data" / "f3m")
        clear = vmgrid("transfer", "--gsi", "--prot", "C", url, str(tmp_path / "c"), "--proxy",
                       str(grid_pki.alice.proxy_path), *common)
        assert clear.returncode == 1 and "521" in clear.stderr       # the server requires private data
        bob = vmgrid("transfer", "--gsi", url, str(tmp_path / "b"), "--proxy", str(grid_pki.bob.proxy_path),
                     *common)
        assert bob.returncode == 1 and "grid-mapfile" in bob.stderr and "Traceback" not in bob.stderr
    finally:
        server.stop()
    bad = tmp_path / "bad-map"
    bad.write_text('"/O=Grid/unterminated alice\n')
    refused = vmgrid("gridftp-server", "--root", str(tree), "--port", "0", "--cert", str(grid_pki.host_cert_path),
                     "--key", str(grid_pki.host_key_path), "--cert-dir", str(grid_pki.cert_dir),
                     "--grid-mapfile", str(bad))
    assert refused.returncode == 1 and refused.stderr.startswith("vmgrid: ")


def test_ctrl_c_in_a_download_says_how_to_resume_and_the_same_command_finishes_it(start_server, tree, tmp_path):
    import signal
    import time

    big = make_file(tree / "data" / "slow", 8 * MiB)
    server = start_server(max_rate=2 * MiB)                       # about 4 s: time to interrupt it
    out = tmp_path / "slow"
    part = tmp_path / "slow.vmgrid-part"
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "transfer", server.url("/data/slow"), str(out), "-q"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not part.exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.5)                                            # some of the 8 MiB arrived (2 MiB/s)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "vmgrid: interrupted; run the same command again: it fetches only the bytes still missing\n"
    assert not out.exists() and part.exists()
    again = vmgrid("transfer", server.url("/data/slow"), str(out), "-q")
    assert again.returncode == 0, again.stderr
    assert "resumed from an earlier attempt" in again.stdout and sha256_of(out) == sha256_of(big)


def test_a_transfer_cut_by_the_servers_end_says_the_same_command_resumes(start_server, tree, tmp_path):
    """The server goes away in the middle of a download: the failure said only "control connection closed",
    though the same command resumes it as after Ctrl-C; it now says so."""
    import time

    make_file(tree / "data" / "cut", 8 * MiB)
    server = start_server(max_rate=2 * MiB)                       # about 4 s: time to stop the server under it
    part = tmp_path / "cut.vmgrid-part"
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "transfer", server.url("/data/cut"),
                             str(tmp_path / "cut"), "-q", "--retries", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not part.exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)
        server.stop()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert err.endswith("; run the same command again: it fetches only the bytes still missing\n"), err


def test_an_expired_proxy_is_refused_with_what_to_do(grid_pki, tree, tmp_path):
    """AUTH TLS (vmgrid peers): the server refuses an expired proxy; the message says so and what mends it."""
    import datetime as dt
    import time

    from security.pki import make_proxy, save_proxy

    proxy = make_proxy(grid_pki.alice.credential, hours=1 / 3600)
    path = save_proxy(proxy, tmp_path / "short.pem")
    while dt.datetime.now(dt.timezone.utc) <= proxy.certificate.not_valid_after_utc + dt.timedelta(seconds=1):
        time.sleep(0.2)
    server = ServerProcess(tree, "--cert", str(grid_pki.host_cert_path), "--key", str(grid_pki.host_key_path),
                           "--cert-dir", str(grid_pki.cert_dir))
    try:
        got = vmgrid("transfer", f"gsiftp://localhost:{server.port}/data/f3m", str(tmp_path / "x"), "--proxy",
                     str(path), "--cert-dir", str(grid_pki.cert_dir), "-q")
    finally:
        server.stop()
    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
    assert "refused the credential" in got.stderr and got.stderr.count("\n") == 1
    assert (f": your proxy expired at {proxy.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: make a new "
            "proxy with `vmgrid proxy-init` (or grid-proxy-init)\n") in got.stderr
    assert not (tmp_path / "x").exists()


def test_a_credential_of_a_ca_the_server_does_not_trust_is_refused_with_its_likely_causes(grid_pki, tree, tmp_path):
    """AUTH TLS in TLS 1.3: the client learns of the refusal only as an EOF; the message says the server refused the
    credential in the handshake and why that mostly is, not "EOF occurred in violation of protocol" (trial12 T15)."""
    server = ServerProcess(tree, "--cert", str(grid_pki.host_cert_path), "--key", str(grid_pki.host_key_path),
                           "--cert-dir", str(grid_pki.cert_dir))
    try:
        got = vmgrid("transfer", f"gsiftp://localhost:{server.port}/data/small", str(tmp_path / "x"), "--proxy",
                     str(grid_pki.stranger.proxy_path), "--cert-dir", str(grid_pki.cert_dir), "-q")
    finally:
        server.stop()
    assert got.returncode == 1 and got.stderr.count("\n") == 1, got.stderr
    # the server's alert (unknown CA) names the cause; when the client reads only an EOF, the likely causes
    said = got.stderr.removeprefix("vmgrid: localhost refused the credential during the TLS handshake: ")
    assert said in ("the server does not trust its CA (`vmgrid proxy-info` shows what you present)\n",
                    "the server may not trust its CA, or it is an expired, revoked or legacy proxy (`vmgrid "
                    "proxy-info` shows what you present)\n"), got.stderr
    assert not (tmp_path / "x").exists()


def test_a_refusal_read_as_a_bare_eof_names_the_likely_causes():
    """What the trial met (trial12 T15): TLS 1.3, the server's refusal read as an EOF."""
    import ssl

    from gridftp.client import _refused_in_handshake

    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)")
    assert _refused_in_handshake("localhost", eof) == (
        "localhost refused the credential during the TLS handshake: the server may not trust its CA, or it is an "
        "expired, revoked or legacy proxy (`vmgrid proxy-info` shows what you present)")


def test_a_full_local_disk_is_named_not_blamed_on_the_server(start_server, tree, tmp_path):
    """A download into a 1 MiB tmpfs: the message is this side's full disk (it was the server's 426 abort, which
    the full disk had caused); what arrived stays for a resume."""
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    make_file(tree / "data" / "eight", 8 * MiB)
    server = start_server()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        got = vmgrid("transfer", server.url("/data/eight"), str(small / "eight"), "-q")
        assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
        assert got.stderr == "vmgrid: cannot store the data here: No space left on device\n", got.stderr
        assert not (small / "eight").exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_server_that_drips_its_replies_fails_the_attempt_at_the_given_timeout(tmp_path):
    """--timeout bounds how long one reply may take, a byte at a time or not at all: a server sending its
    greeting a byte every 0.3 s (no read ever waits long) is given up after --timeout, then once more
    (--retries 1), and the message names the bound; bad values are refused before connecting."""
    connections: list = []
    listener, stop = dripping_listener(b"220", b" ", accepted=connections)
    try:
        url = f"ftp://127.0.0.1:{listener.getsockname()[1]}/x"
        r = vmgrid("transfer", "--timeout", "1.5", "--retries", "1", "-q", url, str(tmp_path / "x"), timeout=120)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        # the reply's own deadline ("a reply still incomplete 1.5 s after it began") or the socket's read timeout
        assert "1.5 s" in r.stderr and ("reply still incomplete" in r.stderr or "no whole reply" in r.stderr), r.stderr
        assert len(connections) == 2                 # the attempt and its one retry
        assert not (tmp_path / "x").exists()
        for bad in (["--timeout", "0"], ["--timeout", "-1"], ["--retries", "-1"]):
            r = vmgrid("transfer", *bad, url, str(tmp_path / "x"))
            assert r.returncode == 1 and "--timeout is seconds" in r.stderr, r.stderr
        assert len(connections) == 2                 # refused before connecting
    finally:
        stop.set()
        listener.close()


def test_gridftp_server_options_that_cannot_be_used_are_one_line(grid_pki, tmp_path):
    """A port out of range (was OverflowError), a negative rate or marker interval (it served), a missing root, a
    bound on sessions out of its range or a guest pattern that is no DN."""
    root = tmp_path / "root"
    root.mkdir()
    host = ["--cert", str(grid_pki.host_cert_path), "--key", str(grid_pki.host_key_path),
            "--cert-dir", str(grid_pki.cert_dir)]
    for extra, message in (
            (["--root", str(root), "--port", "99999"], "--port is 0 to 65535 (0 picks a free one), not 99999"),
            (["--root", str(root), "--port", "0", "--max-rate", "-5"],
             "--max-rate is bytes a second, 0 (unlimited) or more; --marker-interval seconds, more than 0"),
            (["--root", str(root), "--port", "0", "--marker-interval", "0"],
             "--max-rate is bytes a second, 0 (unlimited) or more; --marker-interval seconds, more than 0"),
            (["--root", str(tmp_path / "nosuch"), "--port", "0"],
             f"cannot start the server: {tmp_path / 'nosuch'}: No such file or directory"),
            # the bounds on sessions (they had no option; the library clamped what made no sense, unsaid)
            (["--root", str(root), "--port", "0", "--max-sessions", "0"],
             "--max-sessions is 1 or more (control connections at once), not 0"),
            (["--root", str(root), "--port", "0", "--max-sessions", "8", "--max-sessions-per-identity", "9"],
             "--max-sessions-per-identity is 1 to 8 (at most --max-sessions), not 9"),
            (["--root", str(root), "--port", "0", "--max-sessions-per-address", "0"],
             "--max-sessions-per-address is 1 to 64 (at most --max-sessions), not 0"),
            (["--root", str(root), "--port", "0", "--host-sessions", "64"],
             "--host-sessions is 0 to 63 (--max-sessions less one: users need one), not 64"),
            (["--root", str(root), "--port", "0", "--transfer-idle-timeout", "-1"],
             "--transfer-idle-timeout is seconds, 0 (no such bound) or more, not -1.0"),
            # the passive data ports' bounds (a keyword of the library only; 0 was taken as 1, unsaid)
            (["--root", str(root), "--port", "0", "--passive-per-identity", "0"],
             "--passive-per-identity is 1 or more (passive data ports one identity may hold that no data connection "
             "has reached), not 0"),
            (["--root", str(root), "--port", "0", "--passive-wait", "-1"],
             "--passive-wait is seconds, 0 (an untaken passive data port is never closed) or more, not -1.0"),
            (["--root", str(root), "--port", "0", "--guest-dn", "OU=site-guests"],
             "--guest-dn 'OU=site-guests' is not a DN pattern (e.g. \"/O=Grid/OU=site-guests/*\")")):
        r = vmgrid("gridftp-server", *extra, *host, timeout=20)
        assert r.returncode == 1 and r.stdout == "" and r.stderr == f"vmgrid: {message}\n", (extra, r.stderr)


def test_an_existing_local_destination_is_refused_unless_overwrite_and_a_failed_overwrite_keeps_it(
        start_server, tree, tmp_path):
    """`vmgrid transfer URL FILE` onto a FILE that exists replaced it without a word (globus-url-copy does): a
    scientist's results were lost to a mistyped name. It is refused in one line naming the file and --overwrite,
    before connecting; with --overwrite a transfer that fails (a wrong digest, an interrupted one) leaves the old file
    whole and nothing under its name but it, and one that succeeds replaces it."""
    import signal
    import time

    big = make_file(tree / "data" / "slow", 8 * MiB)
    server = start_server(max_rate=2 * MiB)                       # about 4 s: time to interrupt it
    out = tmp_path / "results"
    out.mkdir()
    kept = out / "slow"
    kept.write_bytes(b"a week of results\n")
    for dst in (str(kept), str(out)):                              # the file, or its directory keeping the name
        r = vmgrid("transfer", server.url("/data/slow"), dst, "-q")
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert r.stderr == f"vmgrid: {kept} exists: nothing transferred (give --overwrite to replace it)\n"
    assert kept.read_bytes() == b"a week of results\n" and sorted(p.name for p in out.iterdir()) == ["slow"]
    wrong = vmgrid("transfer", server.url("/data/small"), str(kept), "--overwrite", "-q", "--sha256", "0" * 64)
    assert wrong.returncode == 1 and "does not match" in wrong.stderr
    assert kept.read_bytes() == b"a week of results\n"
    part = out / "slow.vmgrid-part"
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "transfer", server.url("/data/slow"), str(kept),
                             "--overwrite", "-q"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not part.exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert kept.read_bytes() == b"a week of results\n" and part.exists()       # the new bytes wait beside it
    again = vmgrid("transfer", server.url("/data/slow"), str(kept), "--overwrite", "-q")
    assert again.returncode == 0, again.stderr
    assert sha256_of(kept) == sha256_of(big) and sorted(p.name for p in out.iterdir()) == ["slow"]


def test_an_upload_onto_an_existing_remote_file_replaces_it_only_once_verified(start_server, tree, tmp_path):
    """A remote DST is replaced as FTP's STOR replaces it (no --overwrite asked: docs/gridftp.md says why); vmgrid's
    server keeps the old file until the new one arrived whole and verified, so a failed upload leaves it."""
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    (tree / "up").mkdir(exist_ok=True)
    (tree / "up" / "f").write_bytes(b"old\n")
    new = make_file(tmp_path / "new", 3 * MiB)
    wrong = vmgrid("transfer", str(new), server.url("/up/f"), "-q", "--sha256", "0" * 64, "--state-dir",
                   str(tmp_path / "s1"))
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr
    assert (tree / "up" / "f").read_bytes() == b"old\n"
    ok = vmgrid("transfer", str(new), server.url("/up/f"), "-q", "--state-dir", str(tmp_path / "s2"))
    assert ok.returncode == 0, ok.stderr
    assert sha256_of(tree / "up" / "f") == sha256_of(new)


def test_an_upload_refused_for_its_sha256_says_what_to_do_and_the_same_command_then_works(start_server, tree,
                                                                                          tmp_path):
    """`vmgrid transfer FILE URL --sha256 WRONG`: the message named no digest the server received ("sha256 (refused
    by the server)") and the wrong one stayed in the restart log, so the command run again without --sha256 failed
    the same way. Now the message says what the server received and what to do, and both retries work."""
    server = start_server(upload_area="/up", insecure_anonymous_writes=True)
    new = make_file(tmp_path / "new", 3 * MiB)
    state = ["--state-dir", str(tmp_path / "s")]
    wrong = vmgrid("transfer", str(new), server.url("/up/f"), "-q", "--sha256", "0" * 64, *state)
    assert wrong.returncode == 1 and wrong.stdout == "", wrong.stderr
    assert wrong.stderr == (f"vmgrid: /up/f: sha256 {sha256_of(new)} does not match the expected {'0' * 64}; nothing "
                            f"of it is kept: check --sha256 and run the command again with the right digest (or "
                            f"without --sha256: the file's own is then computed)\n")
    again = vmgrid("transfer", str(new), server.url("/up/f"), "-q", *state)
    assert again.returncode == 0, again.stderr
    assert sha256_of(tree / "up" / "f") == sha256_of(new)
    assert vmgrid("transfer", str(new), server.url("/up/g"), "-q", "--sha256", "1" * 64, *state).returncode == 1
    right = vmgrid("transfer", str(new), server.url("/up/g"), "-q", "--sha256", sha256_of(new), *state)
    assert right.returncode == 0, right.stderr
    assert sha256_of(tree / "up" / "g") == sha256_of(new)
    third = vmgrid("transfer", server.url("/up/g"), server.url("/up/h"), "-q", "--sha256", "2" * 64, *state)
    assert third.returncode == 1 and third.stderr.endswith(
        "(or without --sha256: the source's is then asked)\n"), third.stderr
    assert vmgrid("transfer", server.url("/up/g"), server.url("/up/h"), "-q", *state).returncode == 0
    assert sha256_of(tree / "up" / "h") == sha256_of(new)
    down = vmgrid("transfer", server.url("/up/g"), str(tmp_path / "d"), "-q", "--sha256", "3" * 64)
    assert down.returncode == 1 and down.stderr.endswith(
        "nothing of it is kept: check --sha256 and run the command again with the right digest (or without "
        "--sha256: the source's is then asked)\n"), down.stderr
    assert not list(tmp_path.glob("d*"))


def _doc_block(containing: str) -> str:
    """docs/gridftp.md's sh block marked as run as written by this file that holds ``containing``."""
    text = (REPO / "docs" / "gridftp.md").read_text()
    blocks = re.findall(r"<!-- run as written by tests/unit/gridftp/test_gridftp_cli.py -->\n```sh\n(.*?)```", text,
                        re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"docs/gridftp.md lost its block with {containing!r}"
    return found[0]


def test_the_session_bounds_of_docs_gridftp_md_hold_as_written(grid_pki, tree, tmp_path):
    """docs/gridftp.md's `vmgrid gridftp-server` with a site's bounds and its own guest OU, run as written from a
    directory holding served/, the host credential and the CA directory: a user gets 4 sessions and a 421 naming the
    bound at the fifth; a guest container's certificate under the site's guest OU alike (only vmgrid-guests was
    known: it counted as a host, bound by nothing, taking the hosts' share); the host certificate gets more."""
    from tests.fixtures.namespaces import vmgrid_command
    from tests.unit.gridftp.test_gridftp_sessions import session

    block = _doc_block("--guest-dn")
    site = tmp_path / "site"
    site.mkdir()
    (site / "served").symlink_to(tree)
    (site / "certificates").symlink_to(grid_pki.cert_dir)
    shutil.copy(grid_pki.host_cert_path, site / "hostcert.pem")
    shutil.copy(grid_pki.host_key_path, site / "hostkey.pem")
    bindir = vmgrid_command(tmp_path / "bin")
    proc = subprocess.Popen(["sh", "-c", block], cwd=site, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    held = []
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), (line, proc.poll())
        server = type("Started", (), {"port": int(line)})
        guest = grid_pki.issue_host("10.0.0.7", ou="site-guests")
        for who, name in ((grid_pki.alice.proxy, grid_pki.alice.dn), (guest, guest.identity)):
            held += [session(server, who, grid_pki) for _ in range(4)]
            with pytest.raises(GridFTPError) as refused:
                session(server, who, grid_pki)
            assert "421" in str(refused.value) and f"Too many sessions for {name}: at most 4 logged in" in str(
                refused.value)
        held += [session(server, grid_pki.host, grid_pki) for _ in range(5)]       # a host: no per-user bound
        for s in held:
            assert s.command("NOOP").code == 200
    finally:
        for s in held:
            s.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)


def test_gridftp_server_closes_a_session_with_no_transfer_after_its_option(tree):
    """--transfer-idle-timeout 1: a logged-in session sending only NOOPs gets 421 and is closed; and
    --max-sessions-per-address 1 bounds anonymous sessions from one address."""
    from tests.unit.gridftp.gridftp_helpers import RawFTP, noop_until_refused

    server = ServerProcess(tree, "--anonymous", "--no-tls", "--transfer-idle-timeout", "1",
                           "--max-sessions-per-address", "1")
    try:
        s = RawFTP("127.0.0.1", server.port, timeout=30)
        s.login_anonymous()
        other = RawFTP("127.0.0.1", server.port, timeout=30)
        other.expect("USER anonymous", 331)
        refused = other.cmd("PASS test@")
        assert refused.code == 421 and "at most 1 logged in at once per address" in refused.text
        other.close()
        closed = noop_until_refused(s)
        assert closed.code == 421 and "No transfer for 1 s" in closed.text
        s.close()
    finally:
        server.stop()


def test_gridftp_server_refuse_guests_turns_guest_logins_away(grid_pki, tree):
    """`vmgrid gridftp-server --refuse-guests`: a guest container's certificate (/O=Grid/OU=vmgrid-guests/CN=host/…,
    the default --guest-dn) is refused at login (530) where, without the flag, it logs in as a user; a host's
    credential logs in either way. Before: no such option (the server's refuse_guests was not reachable)."""
    from gridftp.client import GridFTPClient

    assert "--refuse-guests" in vmgrid("gridftp-server", "--help").stdout
    guest = grid_pki.issue_guest("10.0.0.9")
    common = ("--cert", str(grid_pki.host_cert_path), "--key", str(grid_pki.host_key_path),
              "--cert-dir", str(grid_pki.cert_dir))
    for flags, refused in (((), False), (("--refuse-guests",), True)):
        server = ServerProcess(tree, *common, *flags)
        try:
            url = f"gsiftp://localhost:{server.port}/"
            GridFTPClient(url, credential=grid_pki.host, trust=grid_pki.cert_dir).connect().close()
            client = GridFTPClient(url, credential=guest, trust=grid_pki.cert_dir)
            if refused:
                with pytest.raises(GridFTPError, match="530"):
                    client.connect()
            else:
                client.connect().close()
        finally:
            server.stop()


def _free_range(width: int = 16) -> tuple[int, int]:
    """``width`` consecutive ports nothing listens on now (above the kernel's ephemeral range's usual start)."""
    import random
    import socket
    for _ in range(50):
        low = random.randrange(20000, 30000)
        try:
            socks = [socket.create_server(("127.0.0.1", p)) for p in range(low, low + width)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return low, low + width - 1
    raise RuntimeError("no free port range")


def test_gridftp_server_data_ports_bound_its_passive_ports(tree, tmp_path):
    """`vmgrid gridftp-server --data-ports LOW,HIGH`: every PASV/EPSV port the server opens is in the range (a site
    firewall opens just those), and a download over them works; a range that is none is a one-line error. Before:
    no such option, and the passive ports were any ephemeral port."""
    from tests.unit.gridftp.gridftp_helpers import RawFTP

    low, high = _free_range()
    server = ServerProcess(tree, "--anonymous", "--no-tls", "--data-ports", f"{low},{high}")
    try:
        raw = RawFTP("127.0.0.1", server.port)
        raw.login_anonymous()
        ports = [raw.pasv()[1] for _ in range(5)]
        raw.close()
        assert all(low <= p <= high for p in ports), (ports, low, high)
        got = vmgrid("transfer", f"ftp://127.0.0.1:{server.port}/data/f3m", str(tmp_path / "f"), "-q")
        assert got.returncode == 0, got.stderr
    finally:
        server.stop()
    for bad in ("51000,50000", "x", "0,10", ""):
        refused = vmgrid("gridftp-server", "--root", str(tree), "--port", "0", "--anonymous", "--no-tls",
                         "--data-ports", bad)
        assert refused.returncode == 1 and refused.stderr.startswith("vmgrid: --data-ports") \
            and "LOW,HIGH" in refused.stderr, refused.stderr

