"""TLS handshake work taken in turns (issue 9.3): at most so many handshake steps compute at once, and the
connections that wait are taken in turn per client address.

A TLS handshake is the costliest thing a client can make the container do without logging in (a
signature with the host key, a key exchange). The container computes each handshake step on its own
small thread pool, off the event loop that reads and writes the established connections (tlsstream.py),
and takes the steps through a :class:`TurnGate` with one slot per handshake thread: when hundreds of
clients connect at once (attackers cut off by a deadline reconnect together) they queue here, costing
nothing but a socket, and a flood from one address (or one IPv6 /64) gets one turn in N when N
addresses wait: it cannot starve the others. A slot is held only while a step computes (the step never
waits for the network), so a client that stalls mid-handshake holds nothing. Nobody is refused here;
the wait counts towards the handshake deadline."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections import OrderedDict, deque


def client_key(address: str) -> str:
    """The client a connection is counted against: its IPv4 address, or its IPv6 /64 (one site's network,
    where one host can take any number of addresses)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class TurnGate:
    """``async with gate.turn(key):`` at most ``slots`` holders at once; the waiting ones are let in round
    robin over their keys (client addresses), each key's in arrival order. One event loop's use only."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.busy = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()
        self.passed = 0            # turns given (the tests and the bench read these)
        self.waited = 0            # of which had to wait for a slot

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def turn(self, key: str):
        await self.acquire(key)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, key: str) -> None:
        if self.busy < self.slots and not self._waiting:
            self.busy += 1
            self.passed += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:      # the deadline passed (or the container stops) while waiting
            if fut.done() and not fut.cancelled():
                self.release()              # the slot was handed over meanwhile: pass it on
            else:
                queue = self._waiting.get(key)
                if queue is not None and fut in queue:
                    queue.remove(fut)
                    if not queue:
                        del self._waiting[key]
            raise

    def release(self) -> None:
        """Hand the slot to the next waiter, round robin over the keys; else free it."""
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)     # this address goes to the back of the round
            else:
                del self._waiting[key]
            if not fut.done():
                fut.set_result(None)               # the slot passes on: busy stays
                self.passed += 1
                self.waited += 1
                return
        self.busy -= 1
