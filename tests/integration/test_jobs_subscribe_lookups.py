"""A job service's Subscribe checks its caps (an instance's or a job's subscriptions, a subscriber's) before it
looks the consumer's name up, in a real container on loopback (HTTPS, WS-Security both ways): a Subscribe the caps
refuse asks the name server nothing and holds none of the subscriber's lookups (attack14 H2)."""
from __future__ import annotations

import socket

import pytest

from services.faults import LimitExceeded
from services.jobs.store import JobSpec
from services.wsrf import notification
from services.wsrf.notification import ConsumerPolicy
from tests.fixtures.resolver import stalling
from tests.integration.test_jobs_service import PY, JobGrid

pytestmark = pytest.mark.timeout(300)


def test_a_subscribe_past_the_caps_is_refused_before_the_consumer_is_looked_up(grid_pki, tmp_path, monkeypatch):
    """alice's job has its subscriptions (a cap of 1 here): her Subscribe naming a consumer whose name stalls is
    LimitExceededFault at once, the name server is never asked and none of her lookups is under way. Before: the
    consumer was looked up first, so the Subscribe took one of her lookups and waited out the deadline
    (InvalidArgumentFault "did not resolve within 0.5 s"), whatever the caps said."""
    monkeypatch.setattr(notification, "_LOOKUPS", notification.Lookups())
    monkeypatch.setattr(notification, "MAX_PER_RESOURCE", 1)
    release = stalling(monkeypatch, "capped.stalled.test")
    asked: list[str] = []
    stalled = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: asked.append(host) or stalled(host, *a, **k))
    grid = JobGrid(grid_pki, tmp_path)
    try:
        grid.service.consumer_policy = ConsumerPolicy(allow=("127.0.0.0/8",), resolve_timeout=0.5)
        alice = grid.client(grid_pki.alice)
        key = alice.submit(JobSpec(PY, ("-c", "import time; time.sleep(600)")))
        alice.subscribe(key, "http://127.0.0.1:9/notify")
        with pytest.raises(LimitExceeded) as exc:
            alice.subscribe(key, "http://capped.stalled.test:9/notify")
        assert exc.value.limit == "subscriptions-per-resource"
        assert "capped.stalled.test" not in asked and notification._LOOKUPS.held == 0
        assert [s.consumer for s in grid.service.jobs.subscriptions.of(key, 0)] == ["http://127.0.0.1:9/notify"]
    finally:
        release.set()
        grid.close()
