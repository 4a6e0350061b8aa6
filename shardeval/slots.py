"""A semaphore that hands free slots to the lowest priority first (one per engine)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

Waiter = asyncio.Future[None] | Callable[[], None]


class PrioritySlots:
    """A semaphore whose waiters get a free slot lowest priority first (FIFO among equals).

    Batches are handed the slots in order (priority = batch number, position), so a batch's
    requests go out together instead of every running batch getting a trickle. Batches then
    finish (and commit) in turn, and fewer of them hold unflushed results at any moment.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, Waiter]] = []
        """Heap of (priority as one int, arrival, waiter): int comparisons, a heap of
        thousands being popped for every answer."""
        self._order = itertools.count()

    def start_when_free(self, priority: tuple[int, int], start: Callable[[], None]) -> None:
        """Call ``start()`` holding a slot: at once if one is free, else when it is its turn.

        What a first attempt uses: no future and no waiting task exist for a request that is
        only queued, so queuing a batch of thousands costs a heap entry each.
        """
        if self._free > 0 and not self._waiters:
            self._free -= 1
            start()
        else:
            heapq.heappush(self._waiters, (_rank(priority), next(self._order), start))

    async def acquire(self, priority: tuple[int, int]) -> None:
        """Wait for a slot; lower ``priority`` waiters are served first."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (_rank(priority), next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            raise

    def try_acquire(self) -> bool:
        """Take a slot only if one is free and nobody waits (a batch chunk's extra slots)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the pool."""
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():  # else cancelled while waiting
                    waiter.set_result(None)
                    return
            else:
                waiter()
                return
        self._free += 1

    def drain(self) -> list[Callable[[], None]]:
        """Forget every waiter; return the queued starts that will now never be called."""
        waiters, self._waiters = self._waiters, []
        return [w for _, _, w in waiters if not isinstance(w, asyncio.Future)]


def _rank(priority: tuple[int, int]) -> int:
    """(batch, position) as one int with the same order (positions are below 2**32)."""
    batch, position = priority
    return (batch << 32) | position
