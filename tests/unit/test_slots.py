"""Free slots go to the lowest (batch, position) first, FIFO among equals."""

from __future__ import annotations

import asyncio

from shardeval.slots import PrioritySlots


def test_waiters_get_slots_lowest_batch_then_position_first() -> None:
    slots = PrioritySlots(1)
    started: list[str] = []
    slots.start_when_free((0, 0), lambda: started.append("first"))
    for name, priority in [
        ("b2p0", (2, 0)),
        ("b1p7", (1, 7)),
        ("b1p2", (1, 2)),
        ("b1p2-again", (1, 2)),
        ("b10p0", (10, 0)),
        ("b1p4294967295", (1, 2**32 - 1)),
    ]:
        slots.start_when_free(priority, lambda name=name: started.append(name))
    for _ in range(6):
        slots.release()
    assert started == [
        "first",
        "b1p2",
        "b1p2-again",
        "b1p7",
        "b1p4294967295",
        "b2p0",
        "b10p0",
    ]


def test_an_awaiting_retry_and_a_queued_start_share_one_order() -> None:
    async def scenario() -> list[str]:
        slots = PrioritySlots(1)
        order: list[str] = []
        slots.start_when_free((0, 0), lambda: order.append("holder"))

        async def retry() -> None:
            await slots.acquire((3, 1))
            order.append("retry (3, 1)")

        task = asyncio.create_task(retry())
        await asyncio.sleep(0)
        slots.start_when_free((5, 0), lambda: order.append("start (5, 0)"))
        slots.release()  # to the retry
        await task
        slots.release()  # to the start
        return order

    assert asyncio.run(scenario()) == ["holder", "retry (3, 1)", "start (5, 0)"]
