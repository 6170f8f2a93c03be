"""services/container/turns.py: the TLS handshake steps' turns (issue 9.3): at most `slots` at once, the
waiting ones round robin over client addresses, nothing lost when a waiter's deadline passes. Pure
asyncio: the holders are released by the test, in an order it chooses, so nothing depends on timing."""
from __future__ import annotations

import asyncio

import pytest

from services.container.turns import TurnGate, client_key


async def _scene(slots: int, keys: list[str]) -> tuple[list[str], list[int], TurnGate]:
    """One waiter per key, started in this order; each holds its turn until the test lets it go (one at a
    time). Returns the order the keys got their turns and how many held one at each moment."""
    gate = TurnGate(slots)
    order: list[str] = []
    holding: list[int] = []
    current = [0]
    go: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(len(keys))}
    entered = asyncio.Queue()

    async def one(i: int, key: str):
        async with gate.turn(key):
            current[0] += 1
            holding.append(current[0])
            order.append(key)
            await entered.put(i)
            await go[i].wait()
            current[0] -= 1

    tasks = [asyncio.ensure_future(one(i, k)) for i, k in enumerate(keys)]
    for _ in keys:
        i = await entered.get()
        go[i].set()                                    # let the holders go one after the other
    await asyncio.gather(*tasks)
    return order, holding, gate


def test_at_most_slots_hold_a_turn_at_once_and_everyone_gets_one():
    order, holding, gate = asyncio.run(_scene(3, ["127.0.0.10"] * 20))
    assert len(order) == 20 and max(holding) <= 3
    assert gate.busy == 0 and gate.queued == 0 and gate.passed == 20 and gate.waited >= 17


def test_waiting_addresses_are_taken_round_robin():
    order, _, _ = asyncio.run(_scene(1, ["a"] * 5 + ["b"] * 5 + ["c"] * 5))
    # the first "a" takes the free slot; then a, b and c take turns while all three wait
    assert order[:10] == ["a", "a", "b", "c", "a", "b", "c", "a", "b", "c"]


def test_a_flood_from_one_address_does_not_starve_another():
    """60 connections from one address arrive before one from another: the late one gets its turn right
    after the flood's first two, not after the 60."""
    order, _, _ = asyncio.run(_scene(1, ["127.0.0.66"] * 60 + ["127.0.0.2"]))
    assert len(order) == 61 and order.index("127.0.0.2") == 2


def test_a_waiter_whose_deadline_passes_leaves_the_queue_and_the_slot_is_not_lost():
    async def scene():
        gate = TurnGate(1)
        await gate.acquire("x")                        # the one slot is taken
        gone = asyncio.ensure_future(gate.acquire("x"))
        kept = asyncio.ensure_future(gate.acquire("y"))
        await asyncio.sleep(0)
        assert gate.queued == 2
        gone.cancel()                                  # e.g. its handshake deadline
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert gate.queued == 1
        gate.release()
        await kept                                     # the slot went to y
        assert gate.busy == 1
        gate.release()
        return gate

    gate = asyncio.run(scene())
    assert gate.busy == 0 and gate.queued == 0


def test_a_waiter_cancelled_after_the_slot_was_handed_to_it_passes_the_slot_on():
    async def scene():
        gate = TurnGate(1)
        await gate.acquire("x")
        late = asyncio.ensure_future(gate.acquire("x"))
        other = asyncio.ensure_future(gate.acquire("y"))
        await asyncio.sleep(0)
        gate.release()                                 # handed to `late` ...
        late.cancel()                                  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await late
        await other                                    # so the slot went on to y
        gate.release()
        return gate

    gate = asyncio.run(scene())
    assert gate.busy == 0 and gate.queued == 0


@pytest.mark.parametrize("address, key", [
    ("127.0.0.5", "127.0.0.5"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),    # one /64: one client
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("not-an-address", "not-an-address"),
])
def test_a_client_is_its_ipv4_address_or_its_ipv6_network(address, key):
    assert client_key(address) == key


def test_slots_must_be_positive():
    with pytest.raises(ValueError):
        TurnGate(0)
