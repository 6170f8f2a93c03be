"""What running a program through the job service costs on loopback: a signed SubmitJob, the job run
under its supervisor and followed to Done with GetMultipleResourceProperties, against starting the same
program with subprocess in this process (the peer, measured in the same run); and a job with a staged
input and its outputs fetched back verified over the service's GridFTP face.

    python bench/bench_jobs.py [--n 20] [--mib 16]
    python bench/bench_jobs.py --wide 20000

Prints mean times and the ratios against the peer. With --wide N, instead: removing a destroyed job's directory of
N empty directories (services/jobs/tree.py remove_tree, as the trash thread does) against `rm -rf` of the same
(attack14 H3: the remover listed the directory again after each sub-directory).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.container.assemble import build_container, build_service  # noqa: E402
from services.container.config import Config  # noqa: E402
from services.jobs.client import JobClient  # noqa: E402
from services.jobs.config import JobsConfig  # noqa: E402
from services.jobs.store import JobSpec, StageOut  # noqa: E402
from services.soapclient import GridServiceClient  # noqa: E402
from tests.fixtures.pki import build_grid_pki  # noqa: E402


def mean(n: int, func) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        func()
        samples.append(time.perf_counter() - t)
    return statistics.mean(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--wide", type=int, default=0, help="time removing N empty directories instead")
    args = parser.parse_args()
    if args.wide:
        return wide(args.wide)
    root = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    pki = build_grid_pki(root / "pki")
    cfg = Config()
    cfg.container.port = 0
    cfg.container.state_dir = str(root / "state")
    cfg.security.cert_dir, cfg.security.host_cert, cfg.security.host_key = (
        str(pki.cert_dir), str(pki.host_cert_path), str(pki.host_key_path))
    cfg.jobs = JobsConfig(owner=pki.alice.dn, gridftp_port=0, max_live_jobs=1000)
    service = build_service("jobs", cfg)
    container = build_container(cfg, [service]).start()
    soap = GridServiceClient(container.url("JobService"), pki.alice.proxy, pki.trust())
    jobs = JobClient(soap)
    program = ["/usr/bin/python3", "-c", "pass"]     # one a job may run: jobs run under a uid of their own
    try:
        peer = mean(args.n, lambda: subprocess.run(program, check=True))

        def turnaround():
            info = jobs.wait(jobs.submit(JobSpec(program[0], tuple(program[1:]))), interval=0.02)
            assert info.state == "Done", info

        job = mean(args.n, turnaround)
        data = root / "input.bin"
        data.write_bytes(os.urandom(args.mib << 20))

        def staged():
            stage = jobs.stage_local(data)
            spec = JobSpec("cp", (data.name, "copy.bin"), stage_in=(stage,), stage_out=(StageOut("copy.bin"),))
            info = jobs.wait(jobs.submit(spec), interval=0.02)
            assert info.state == "Done", info
            jobs.fetch_outputs(info, root / "out" / info.key)     # a directory per round: every output fetched

        rounds = max(1, args.n // 5)
        staged_s = mean(rounds, staged)
        local_copy = mean(rounds, lambda: subprocess.run(["cp", str(data), str(root / "local-copy.bin")], check=True))
    finally:
        soap.close()
        container.stop()
        shutil.rmtree(root, ignore_errors=True)     # 16 MiB per round: a run leaves 240 MB otherwise
    print(f"{'what':58} {'mean':>10} {'x peer':>8}")
    print(f"{'peer: subprocess.run(python -c pass) here':58} {peer * 1000:8.1f}ms {1.0:8.1f}")
    print(f"{'job: SubmitJob + run + followed to Done (signed, TLS)':58} {job * 1000:8.1f}ms {job / peer:8.1f}")
    print(f"{'peer: cp of %d MiB here' % args.mib:58} {local_copy * 1000:8.1f}ms {1.0:8.1f}")
    print(f"{'job: %d MiB staged in, cp, outputs fetched verified' % args.mib:58} {staged_s * 1000:8.1f}ms "
          f"{staged_s / local_copy:8.1f}")
    return 0


def wide(n: int) -> int:
    from services.jobs.tree import remove_tree

    root = Path(tempfile.mkdtemp(prefix="bench-jobs-wide-"))
    try:
        took = {}
        for how in ("rm -rf", "remove_tree"):
            top = root / "job"
            top.mkdir()
            fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i in range(n):
                    os.mkdir(f"d{i}", dir_fd=fd)
            finally:
                os.close(fd)
            t = time.perf_counter()
            if how == "rm -rf":
                subprocess.run(["rm", "-rf", str(top)], check=True)
            else:
                remove_tree(top)
            took[how] = time.perf_counter() - t
            assert not top.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'what':58} {'time':>10} {'x peer':>8}")
    print(f"{'peer: rm -rf of %d empty directories' % n:58} {took['rm -rf']:9.2f}s {1.0:8.1f}")
    print(f"{'remove_tree of the same (the trash thread)':58} {took['remove_tree']:9.2f}s "
          f"{took['remove_tree'] / took['rm -rf']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
