"""The shared timer: the limits every request and turn sets (`within`), on one clock per event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Limit:
    """One `async with within(seconds)` block: asyncio.timeout's rules, on its event loop's shared clock."""

    __slots__ = ("when", "task", "cancelling", "fired", "clock")

    def __init__(self, when: float) -> None:
        self.when, self.fired = when, False

    async def __aenter__(self) -> Limit:
        self.task = asyncio.current_task()
        self.cancelling = self.task.cancelling()  # type: ignore[union-attr]
        self.clock = _clock if _clock.loop is asyncio.get_running_loop() else Clock.start()
        self.clock.limits.add(self)
        if not self.clock.armed:
            self.clock.arm()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self.clock.limits.discard(self)
        if self.fired and self.task.uncancel() <= self.cancelling and kind is asyncio.CancelledError:  # type: ignore[union-attr]
            raise TimeoutError from error


class Clock:
    """The one timer of an event loop's limits: it ticks while any limit is open."""

    TICK = 0.05  # seconds: how late a limit may fire

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop, self.limits, self.armed = loop, set[Limit](), False

    @staticmethod
    def start() -> Clock:
        global _clock
        _clock = Clock(asyncio.get_running_loop())
        return _clock

    def arm(self) -> None:
        self.armed = True
        self.loop.call_later(self.TICK, self.tick)  # type: ignore[union-attr]

    def tick(self) -> None:
        self.armed = False
        now = time.monotonic()
        for limit in [limit for limit in self.limits if now >= limit.when]:
            limit.fired = True
            limit.task.cancel()  # type: ignore[union-attr]
            self.limits.discard(limit)
        if self.limits:
            self.arm()


_clock = Clock(None)


def within(seconds: float) -> Limit:
    """Like asyncio.timeout(seconds) for the limits every request and turn sets (the response budget, the
    model's first token and whole reply), which almost never fire: one timer ticks for all of them, where
    asyncio.timeout arms and cancels a timer of its own each time, a tenth of a cheap webhook's cost.
    A limit fires up to Clock.TICK late."""
    return Limit(time.monotonic() + seconds)
