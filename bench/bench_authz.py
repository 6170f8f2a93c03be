"""What asking the Authorization service costs: one decision in-process, one signed SOAP Authorize on
loopback (TLS, WS-Security), a cached permit, a ClaimSlot; and a VMRepository GetDescriptor with the
built-in policy (the peer) against the same call authorized through the service, cold and cached.

    python bench/bench_authz.py [--n 300]

Prints a table of mean latencies and the ratios against the peer measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import shutil
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.authz.pep import Subject  # noqa: E402
from services.container.assemble import build_container, build_service  # noqa: E402
from services.container.config import VOConfig  # noqa: E402
from tests.fixtures.pki import build_grid_pki  # noqa: E402
from tests.unit.authz.authz_support import AuthzSite, descriptor, policy_text  # noqa: E402


def timed(n: int, func) -> float:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        func(i)
        samples.append(time.perf_counter() - t)
    return statistics.mean(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    n = parser.parse_args().n
    root = Path(tempfile.mkdtemp(prefix="bench-authz-"))
    pki = build_grid_pki(root / "pki")
    alice = Subject(pki.alice.dn)
    image = {"type": "image", "vo": "bio", "owner": pki.alice.dn}
    site = AuthzSite(pki, root / "site", policy_text(groups={"bio": {"members": [pki.alice.dn]}}, limits={
        "max_instances_per_user": 10 ** 6, "max_instances_per_group": 10 ** 6}), repository=True, permit_ttl=0)
    try:
        policy = site.authority.policy.current
        rows = [("policy.decide, in-process", timed(n * 10, lambda i: policy.decide(alice, "image.read", image, {})))]
        pep = site.pep(permit_ttl=0)
        pep.decide(alice, "image.read", image, {})
        rows.append(("Authorize, signed SOAP", timed(n, lambda i: pep.decide(alice, "image.read", image, {}))))
        cached = site.pep(permit_ttl=3600)
        cached.decide(alice, "image.read", image, {})
        rows.append(("Authorize, cached permit", timed(n * 10, lambda i: cached.decide(alice, "image.read", image,
                                                                                        {}))))
        rows.append(("ClaimSlot, signed SOAP", timed(n, lambda i: pep.claim_slot(alice, "vm.deploy", f"i-{i}", image,
                                                                                   {"memory": "256"}))))

        repo = site.repository(pki.alice.proxy)
        repo.register(descriptor("bench", "bio"), upload=site.upload("bench.img", pki.alice.dn))
        repo.show("bio/bench")
        through_service = timed(n, lambda i: repo.show("bio/bench"))
        site.repo_service.authz.pdp = cached
        cached_repo = timed(n, lambda i: repo.show("bio/bench"))
        # the peer: the same repository state served with the built-in [policy] section
        cfg = site.config("repository")
        cfg.enforcement.authz_url = ""
        cfg.repository.gridftp_port = -1
        cfg.policy.vos = {"bio": VOConfig(members=[pki.alice.dn])}
        site.repo.stop()
        static_service = build_service("repository", cfg)
        container = build_container(cfg, [static_service]).start()
        try:
            from client.repository import RepositoryClient
            from client.soap import GridServiceClient

            static_repo = RepositoryClient(GridServiceClient(container.url("VMRepositoryService"), pki.alice.proxy,
                                                             pki.trust()))
            static_repo.show("bio/bench")
            peer = timed(n, lambda i: static_repo.show("bio/bench"))
        finally:
            container.stop()
        site.repo = None
        rows += [("GetDescriptor, built-in policy (peer)", peer),
                 ("GetDescriptor, Authorization service", through_service),
                 ("GetDescriptor, Authorization service, cached", cached_repo)]
    finally:
        site.close()
        shutil.rmtree(root, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  mean ms")
    for name, ms in rows:
        print(f"{name:{width}}  {ms:8.3f}")
    print(f"\nGetDescriptor through the service / built-in policy: {through_service / peer:.2f}x "
          f"(cached permits: {cached_repo / peer:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
