"""The memory backend: bounded by its sweeper (the contract suite covers the rest)."""

from __future__ import annotations

import asyncio
import time

from conftest import Twilio, concurrent, env, running

import main
from plugins.session_memory import MemoryBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_many_calls_are_swept_once_the_clock_passes_the_ttl() -> None:
    clock = Clock()
    backend = MemoryBackend(main.load_settings(env(SESSION_TTL="1800")), clock=clock)
    for n in range(10_000):
        sid = f"CA{n:032x}"
        snap = await backend.begin(sid, [], 1800)
        await backend.commit(sid, snap.token, main.Session(call_sid=sid, started=time.time()))
    clock.now += 1000
    recent = await backend.begin("CAlive", [], 1800)
    await backend.commit("CAlive", recent.token, main.Session(call_sid="CAlive"))
    assert backend.sweep() == 0
    clock.now += 900
    assert backend.sweep() == 10_000
    assert list(backend.calls) == ["CAlive"]


async def test_the_sweeper_runs_by_itself() -> None:
    backend = MemoryBackend(main.load_settings(env(SESSION_TTL="0.4")))
    await backend.aopen()
    try:
        snap = await backend.begin("CA1", [], 0.4)
        await backend.commit("CA1", snap.token, main.Session(call_sid="CA1"))
        assert "CA1" in backend.calls
        await asyncio.sleep(0.7)
        assert backend.calls == {}
    finally:
        await backend.aclose()


async def test_replies_are_kept_only_for_the_current_and_previous_turn() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        for text in ["one", "two", "three"]:
            await twilio.say(text)
    call = app.state.calls.backend.calls[twilio.call_sid]
    kept = {seg.text for stored in call.replies.values() for seg in stored.segments if seg.text}
    assert kept == {"You said: two.", "You said: three."}
    assert len(call.replies) == 4  # per turn: its speech key and its first document


async def test_the_blob_cache_stays_within_its_byte_bound() -> None:
    backend = MemoryBackend(main.load_settings(env(BLOB_CACHE_BYTES="1000")))
    for n in range(10):
        await backend.put_blob(f"k{n}", bytes(300), 60)
    assert backend.blob_bytes <= 1000 and sum(len(v) for _, v in backend.blobs.values()) == backend.blob_bytes
    assert [k for k in backend.blobs] == ["k7", "k8", "k9"]
    assert await backend.get_blob("k0") is None and await backend.get_blob("k9") == bytes(300)
    await backend.put_blob("huge", bytes(5000), 60)
    assert await backend.get_blob("huge") is None


async def test_open_calls_give_the_cyclic_gc_nothing_to_scan() -> None:
    """Calls in progress (sessions, stored replies, turn timings, the log recorder's sums) hold no GC-tracked
    objects: a full collection's pause stays flat however many calls a replica holds (bench/webhook.py p99)."""
    import gc

    app = main.create_app(env())
    others = main.log.handlers[:]  # only switchboard's own handler, as in production (pytest's keeps records)
    main.log.handlers[:] = [h for h in others if h.get_name() == "switchboard"]
    try:
        async with concurrent(app) as client:
            calls = [Twilio(client) for _ in range(300)]
            for twilio in calls:
                await twilio.call()
            gc.collect()
            old = gc.get_objects()  # (held, so no new object can reuse an old one's id)
            before = {id(o) for o in old}
            for turn in range(2):
                for n, twilio in enumerate(calls):
                    assert (await twilio.say(f"question {turn} {n}")).status_code == 200
            backend, obs = app.state.calls.backend, app.state.calls.obs
            assert len(backend.calls) == 300 and len(obs.latencies) == 300  # held: the last turns are still open
            gc.collect()
            gc.collect()
            new = [o for o in gc.get_objects() if id(o) not in before]
    finally:
        main.log.handlers[:] = others
    assert len(new) < 100  # 600 turns of 300 calls: not one tracked object each
