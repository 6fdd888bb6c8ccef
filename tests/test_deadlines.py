"""The shared timer: `within` limits fire on time, nest, let other errors and cancels through, on any loop."""

from __future__ import annotations

import asyncio

import pytest

import deadlines


async def test_a_limit_fires_on_time_as_a_timeout_error_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.within(0.1):
            await asyncio.sleep(5)
    assert 0.1 <= loop.time() - t0 < 0.1 + 3 * deadlines.Clock.TICK
    async with deadlines.within(0.3):  # not early
        await asyncio.sleep(0.15)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_nested_limits_other_errors_and_outside_cancels_pass_through_and_the_clock_stops() -> None:
    async with deadlines.within(5):
        with pytest.raises(TimeoutError):
            async with deadlines.within(0.05):
                await asyncio.sleep(5)
        await asyncio.sleep(0.01)  # the outer block carries on
        with pytest.raises(KeyError):
            async with deadlines.within(5):
                raise KeyError("mine")

    async def sleeper() -> None:
        async with deadlines.within(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0.01)
    task.cancel()  # someone else's cancel stays a cancel
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(2 * deadlines.Clock.TICK)
    assert not deadlines._clock.limits and not deadlines._clock.armed


def test_limits_work_on_each_new_event_loop() -> None:
    async def late() -> bool:
        try:
            async with deadlines.within(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return True
        return False

    async def abandoned() -> None:  # a loop closed while a limit was open must not stall the next loop's
        async with deadlines.within(5):
            asyncio.get_running_loop().stop()
            await asyncio.sleep(5)

    loop = asyncio.new_event_loop()
    loop.create_task(abandoned())
    loop.run_forever()
    loop.close()
    assert asyncio.run(late()) and asyncio.run(late())
