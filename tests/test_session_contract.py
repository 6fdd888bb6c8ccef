"""The session-backend contract: every backend passes the same assertions."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from conftest import VALKEY_PREFIX, VALKEY_URL, Scripted, Twilio, env, plugin, running, shared_cluster

import main

BACKENDS = ["memory", "valkey", "cluster"]  # cluster: the valkey backend on a three-node Valkey Cluster


def backend_env(name: str, **extra: str) -> dict[str, str]:
    if name == "valkey":  # the shared server, under this run's prefix (conftest deletes its keys at the end)
        extra = {"VALKEY_URL": VALKEY_URL, "VALKEY_PREFIX": VALKEY_PREFIX, **extra}
    elif name == "cluster":  # the run's own cluster; VALKEY_URL names one node, the backend finds the others
        extra = {"VALKEY_URL": shared_cluster().url, "VALKEY_PREFIX": VALKEY_PREFIX, **extra}
        name = "valkey"
    return env(SESSION_BACKEND=name, **extra)


@pytest.fixture(params=BACKENDS)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """Build opened backends by name (closed after the test)."""
    opened: list[main.SessionBackend] = []

    async def build(**extra: str) -> main.SessionBackend:
        settings = main.load_settings(backend_env(request.param, **extra))
        backend = main.select(main.plugin_manager(), "session", [settings.session_backend], settings)[0]
        await backend.aopen()
        opened.append(backend)
        return backend

    yield build
    for backend in opened:
        await backend.aclose()


def sid() -> str:
    return "CA" + secrets.token_hex(16)


def session(call_sid: str, turn: str = "") -> main.Session:
    current = main.Turn(id=turn, user="hi", keys=["k"], started=time.time()) if turn else None
    return main.Session(call_sid=call_sid, started=time.time(), current=current)


SAY = [main.Segment(text="One."), main.Segment(text="Two.")]


async def test_lock_is_exclusive_and_only_its_owner_releases_it(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    token = await backend.lock(call, 5)
    assert token is not None
    assert await backend.lock(call, 5) is None
    assert await backend.unlock(call, "not-the-owner") is False
    assert await backend.lock(call, 5) is None
    assert await backend.unlock(call, token) is True
    assert await backend.lock(call, 5) is not None


async def test_lock_expires_so_a_crashed_owner_never_blocks_a_call(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    stale = await backend.lock(call, 0.2)
    await asyncio.sleep(0.3)
    fresh = await backend.lock(call, 5)
    assert fresh is not None and fresh != stale
    assert await backend.unlock(call, stale) is False  # the old owner cannot release the new lock
    assert await backend.lock(call, 5) is None


async def test_begin_locks_and_commit_writes_then_unlocks(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    snap = await backend.begin(call, [], 60)
    assert (snap.session, snap.served, snap.replies) == (None, [], {})
    assert await backend.begin(call, [], 60) is None  # locked until the commit
    written = session(call)
    written.history.append(main.Message(role="user", content="hello"))
    assert await backend.commit(call, snap.token, written) is True
    again = await backend.begin(call, [], 60)
    assert again.session == written
    assert await backend.commit(call, "stolen-token", session(call)) is False
    assert await backend.unlock(call, again.token) is True
    assert (await backend.begin(call, [], 60)).session == written


@pytest.mark.parametrize("way", ["own", "default"])
async def test_create_stores_a_new_call_once_and_never_overwrites_one(make, way: str) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    create = backend.create if way == "own" else lambda *a: main.SessionBackend.create(backend, *a)  # the protocol's
    results = await asyncio.gather(*(create(call, session(call), 0.6) for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]  # duplicates of one /voice, at once: one stores it
    snap = await backend.begin(call, [], 0.6)
    assert snap.session is not None and snap.session.call_sid == call and snap.session.turns == 0
    snap.session.turns = 3
    assert await backend.commit(call, snap.token, snap.session)
    assert await create(call, session(call), 0.6) is False  # a late retry keeps the call as it is
    assert (await backend.begin(call, [], 0.6)).session.turns == 3
    other = sid()
    assert await create(other, session(other), 0.3) is True
    await asyncio.sleep(0.45)
    if way == "own":  # created with the TTL given: gone once it passes
        snap = await backend.begin(other, [], 60)
        assert snap is not None and snap.session is None


async def test_sessions_expire_after_the_ttl_of_inactivity(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(SESSION_TTL="1"), sid()
    snap = await backend.begin(call, [], 1)
    await backend.commit(call, snap.token, session(call))
    await asyncio.sleep(0.6)
    touched = await backend.begin(call, [], 1)  # activity slides the expiry
    assert touched.session is not None
    await backend.commit(call, touched.token, touched.session)
    await asyncio.sleep(0.6)
    assert (still := await backend.begin(call, [], 1)).session is not None
    await backend.unlock(call, still.token)
    await asyncio.sleep(1.3)
    assert (await backend.begin(call, [], 1)).session is None


async def test_served_replies_are_stored_for_retries_and_marked_served(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t1"), turn_changed=True)
    assert await backend.serve(call, "t1", ["speech-key", "t1:0"], SAY) == SAY
    assert await backend.reply(call, "speech-key") == ("t1", SAY)
    assert await backend.reply(call, "t1:0") == ("t1", SAY)
    assert await backend.reply(call, "other") is None
    snap = await backend.begin(call, ["speech-key", "other"], 60)
    assert snap.served == SAY and snap.replies == {"speech-key": ("t1", SAY)}
    assert await backend.serve(call, "t1", ["t1:1"], SAY) == main.BUSY  # the call is locked
    await backend.unlock(call, snap.token)
    assert await backend.serve(call, "t0", ["t0:1"], SAY) == main.SUPERSEDED


async def test_pushed_segments_are_served_once_in_order(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t1"), turn_changed=True)
    assert await backend.serve(call, "t1", ["t1:1"]) == []
    assert await backend.push(call, "t1", SAY[:1]) is True
    assert await backend.push(call, "t1", [SAY[1], main.END]) is True
    assert await backend.serve(call, "t1", ["t1:1"]) == [*SAY, main.END]
    assert await backend.serve(call, "t1", ["t1:2"]) == []
    assert await backend.push(call, "t0", SAY) is False  # not the current turn
    snap = await backend.begin(call, [], 60)
    assert snap.served == [*SAY, main.END]
    new = session(call, "t2")
    await backend.commit(call, snap.token, new, turn_changed=True)
    assert (await backend.begin(call, [], 60)).served == []  # a new turn starts with nothing served


async def test_wait_returns_as_soon_as_a_segment_is_pushed(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t1"), turn_changed=True)
    t0 = time.monotonic()
    pusher = asyncio.create_task(asyncio.sleep(0.2))
    pusher.add_done_callback(lambda _: asyncio.ensure_future(backend.push(call, "t1", SAY)))
    await backend.wait(call, "t1", 3.0)
    assert 0.15 < time.monotonic() - t0 < 1.5
    assert await backend.serve(call, "t1", ["t1:1"]) == SAY
    t0 = time.monotonic()
    await backend.wait(call, "t1", 0.3)  # nothing comes: returns at the timeout
    assert 0.25 < time.monotonic() - t0 < 1.5


async def test_concurrent_writers_never_lose_an_update(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()

    async def add(n: int) -> None:
        while (snap := await backend.begin(call, [], 60)) is None:
            await asyncio.sleep(0.001)
        current = snap.session or session(call)
        await asyncio.sleep(0)  # let the others try in between
        current.history.append(main.Message(role="user", content=str(n)))
        assert await backend.commit(call, snap.token, current)

    await asyncio.gather(*(add(n) for n in range(40)))
    final = await backend.begin(call, [], 60)
    assert sorted(int(m.content) for m in final.session.history) == list(range(40))


async def test_cancel_reaches_every_listener_and_delete_removes_the_call(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    heard: list[str] = []
    backend.on_cancel(heard.append)
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t1"), turn_changed=True)
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t2"), turn_changed=True, cancel="t1")
    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.01)
    assert heard == ["t1"]
    snap = await backend.begin(call, [], 60)
    assert await backend.commit(call, snap.token, None) is True
    assert (await backend.begin(call, [], 60)).session is None
    assert await backend.serve(call, "t2", ["t2:1"], SAY) == main.SUPERSEDED


async def test_ping_answers_when_the_backend_is_up(make) -> None:  # type: ignore[no-untyped-def]
    backend = await make()
    assert await backend.ping() is None


async def test_blobs_are_shared_and_expire(make) -> None:  # type: ignore[no-untyped-def]
    backend = await make()
    key = "audio-" + secrets.token_hex(8)
    assert await backend.get_blob(key) is None
    await backend.put_blob(key, b"\xff\xfbaudio-bytes", 0.5)
    assert await backend.get_blob(key) == b"\xff\xfbaudio-bytes"
    await asyncio.sleep(1.1)
    assert await backend.get_blob(key) is None


async def test_replies_of_the_previous_turn_survive_a_turn_change_older_ones_do_not(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t1"), turn_changed=True)
    await backend.serve(call, "t1", ["k1", "t1:0"], SAY)
    snap = await backend.begin(call, ["k1"], 60)
    assert snap.replies == {"k1": ("t1", SAY)}
    await backend.commit(call, snap.token, session(call, "t2"), turn_changed=True)
    await backend.serve(call, "t2", ["k2"], SAY[:1])
    assert await backend.reply(call, "k1") == ("t1", SAY)  # a late retry of the previous turn is still answered
    snap = await backend.begin(call, [], 60)
    await backend.commit(call, snap.token, session(call, "t3"), turn_changed=True)
    assert await backend.reply(call, "k1") is None and await backend.reply(call, "t1:0") is None
    assert await backend.reply(call, "k2") == ("t2", SAY[:1])


@pytest.mark.parametrize("name", BACKENDS)
async def test_a_call_through_the_app_keeps_a_bounded_history(name: str) -> None:
    model = Scripted(name="scripted", replies=[f"Answer {n}." for n in range(1, 6)])
    app = main.create_app(backend_env(name, LLM_PROVIDER="scripted", MAX_TURNS="2"), plugins=[plugin(llm=[model])])
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        for n in range(1, 6):
            assert await twilio.turn(f"question {n}") == [f"Answer {n}."]
        await twilio.post("/status", CallStatus="completed")
    sent = [(m.role, m.content) for m in model.calls[-1]]
    assert sent == [
        ("user", "question 3"),
        ("assistant", "Answer 3."),
        ("user", "question 4"),
        ("assistant", "Answer 4."),
        ("user", "question 5"),
    ]


# ----------------------------------------------------------------------------- leases and fencing

LEASE = main.LEASE_SECONDS


async def turn_begun(backend: main.SessionBackend, call: str, turn: str) -> main.Session:
    snap, written = await backend.begin(call, [], 60), session(call, turn)
    assert await backend.commit(call, snap.token, written, turn_changed=True)
    return written


async def test_the_transition_lock_is_a_lease_its_holder_keeps_by_renewing(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    held = await backend.begin(call, [], 60)
    for _ in range(3):  # held twice as long as a lease, renewed within each
        await asyncio.sleep(LEASE * 0.6)
        assert await backend.renew(main.Lease(call_sid=call, token=held.token)) is True
        assert await backend.begin(call, [], 60) is None
    written = session(call)
    assert await backend.commit(call, held.token, written) is True
    dead = await backend.begin(call, [], 60)  # a holder that dies: its lease runs out, the next one begins
    await asyncio.sleep(LEASE + 0.15)
    fresh = await backend.begin(call, [], 60)
    assert fresh is not None and fresh.session == written
    assert await backend.renew(main.Lease(call_sid=call, token=dead.token)) is False
    assert await backend.commit(call, dead.token, None) is False
    assert await backend.commit(call, fresh.token, fresh.session) is True


async def test_a_generation_that_stops_renewing_is_orphaned_and_taken_over_once(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    written = await turn_begun(backend, call, "t1")
    first = main.Lease(call_sid=call, turn="t1", fence=1)  # the committer holds the new turn's generation
    assert await backend.serve(call, "t1", ["k", "t1:0"], SAY[:1], fence=1) == SAY[:1]
    assert await backend.push(call, "t1", SAY[1:], fence=1) is True  # queued, never handed to Twilio
    await asyncio.sleep(LEASE * 0.6)
    assert await backend.renew(first) is True
    await asyncio.sleep(LEASE * 0.6)
    assert await backend.take_over(call, "t1") is None  # renewed: alive
    assert await backend.serve(call, "t1", ["t1:1"]) == SAY[1:]
    assert await backend.push(call, "t1", [main.Segment(text="Three.")], fence=1) is True
    await asyncio.sleep(LEASE + 0.15)  # the holder died: nothing renews its lease
    assert await backend.serve(call, "t1", ["t1:2"]) == [main.Segment(text="Three.")]  # what is queued still goes
    assert await backend.serve(call, "t1", ["t1:3"]) == main.ORPHANED
    taken = await asyncio.gather(*(backend.take_over(call, "t1") for _ in range(4)))
    won = [t for t in taken if t is not None]
    assert len(won) == 1  # exactly one generation is current
    assert (won[0].fence, won[0].session, won[0].served) == (2, written, [*SAY, main.Segment(text="Three.")])
    assert await backend.serve(call, "t1", ["t1:3"]) == []  # the new holder's lease is alive
    second = main.Lease(call_sid=call, turn="t1", fence=2)
    assert await backend.renew(second) is True


async def test_an_old_holder_is_fenced_off_after_a_takeover(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    await turn_begun(backend, call, "t1")
    await backend.serve(call, "t1", ["k", "t1:0"], SAY[:1], fence=1)
    await backend.push(call, "t1", SAY[1:], fence=1)
    await asyncio.sleep(LEASE + 0.15)  # the old holder stalls past its lease...
    taken = await backend.take_over(call, "t1")  # ...and another replica takes the turn over
    assert taken is not None and taken.fence == 2 and taken.served == SAY[:1]  # the unserved queue is dropped
    assert await backend.serve(call, "t1", ["t1:1"]) == []
    old = main.Lease(call_sid=call, turn="t1", fence=1)
    assert await backend.push(call, "t1", [main.Segment(text="Late.")], fence=1) is False
    assert await backend.push(call, "t1", [main.Segment(text="Late.")]) is False  # a holder that knows no fence
    assert await backend.serve(call, "t1", ["t1:1"], [main.Segment(text="Late.")], fence=1) == main.SUPERSEDED
    assert await backend.renew(old) is False
    assert await backend.push(call, "t1", [main.Segment(text="New."), main.END], fence=2) is True
    assert await backend.serve(call, "t1", ["t1:1"]) == [main.Segment(text="New."), main.END]
    snap = await backend.begin(call, [], 60)
    assert snap.served == [SAY[0], main.Segment(text="New."), main.END]


async def test_a_finished_or_replaced_turn_is_never_orphaned(make) -> None:  # type: ignore[no-untyped-def]
    backend, call = await make(), sid()
    await turn_begun(backend, call, "t1")
    await backend.serve(call, "t1", ["k", "t1:0"], [*SAY, main.END], fence=1)
    await asyncio.sleep(LEASE + 0.15)
    assert await backend.serve(call, "t1", ["t1:1"]) == []
    assert await backend.take_over(call, "t1") is None
    await turn_begun(backend, call, "t2")
    await asyncio.sleep(LEASE + 0.15)
    assert await backend.take_over(call, "t1") is None  # not the current turn
    assert await backend.renew(main.Lease(call_sid=call, turn="t1", fence=1)) is False
    assert await backend.serve(call, "t2", ["t2:1"]) == main.ORPHANED
    assert (await backend.take_over(call, "t2")).fence == 2
    assert await backend.take_over(sid(), "t1") is None  # no such call
