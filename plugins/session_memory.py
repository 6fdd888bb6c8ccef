"""The default session backend: calls live in this process, expire after SESSION_TTL, and are swept."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec

from main import (
    BUSY,
    LEASE_SECONDS,
    ORPHANED,
    SUPERSEDED,
    Lease,
    Register,
    Segment,
    Session,
    SessionBackend,
    Settings,
    Snapshot,
    Takeover,
    hookimpl,
)

session_encoder = msgspec.msgpack.Encoder()
session_decoder = msgspec.msgpack.Decoder(Session)


class Stored(msgspec.Struct, gc=False):
    """A reply kept for retries: the turn it answered and the segments sent."""

    turn: str
    segments: tuple[Segment, ...]


class Call(msgspec.Struct, gc=False):
    """One call's state, with the same parts the Valkey backend keeps under its keys.

    Not tracked by the cyclic GC, and its containers exist only once used: a server holding many
    idle calls keeps its collections short."""

    session: bytes | None = None
    current: str = ""
    lock: str = ""
    lock_until: float = 0.0
    fence: int = 0  # the current turn's generation, and when its lease runs out
    lease_until: float = 0.0
    served: tuple[Segment, ...] = ()
    queues: dict[str, list[Segment]] | None = None
    replies: dict[str, Stored] | None = None  # holding untracked values, the dict stays untracked too
    expires: float = 0.0
    pushed: asyncio.Event | None = None  # made when someone waits


def _ended(served: Sequence[Segment]) -> bool:
    return any(seg.kind == "end" for seg in served)


class MemoryBackend(SessionBackend):
    """Sessions in a dict: one process only, which create_app enforces."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = settings.session_ttl
        self.clock = clock
        self.calls: dict[str, Call] = {}
        self.tokens = itertools.count(1)
        self.cancel_callbacks: list[Callable[[str], None]] = []
        self.sweeper: asyncio.Task[None] | None = None
        self.blobs: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.blob_bytes, self.blob_limit = 0, settings.number("BLOB_CACHE_BYTES", 32 * 1024 * 1024, inclusive=True)

    async def aopen(self) -> None:
        self.sweeper = asyncio.create_task(self._sweep_forever())

    async def aclose(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.ttl / 4))
            self.sweep()

    def sweep(self) -> int:
        """Drop calls idle for longer than SESSION_TTL; return how many."""
        now = self.clock()
        expired = [sid for sid, call in self.calls.items() if call.expires <= now]
        for sid in expired:
            del self.calls[sid]
        return len(expired)

    def _call(self, sid: str, ttl: float | None = None) -> Call:
        call = self.calls.get(sid)
        now = self.clock()
        if call is None or call.expires <= now:
            call = self.calls[sid] = Call()
        call.expires = now + (ttl or self.ttl)
        return call

    async def ping(self) -> None:
        return None

    async def lock(self, call_sid: str, ttl: float) -> str | None:
        call, now = self._call(call_sid), self.clock()
        if call.lock and call.lock_until > now:
            return None
        call.lock, call.lock_until = f"{next(self.tokens):x}", now + ttl  # owners in one process: a counter
        return call.lock

    async def unlock(self, call_sid: str, token: str) -> bool:
        call = self.calls.get(call_sid)
        if call is None or call.lock != token or call.lock_until <= self.clock():
            return False
        call.lock = ""
        return True

    async def begin(self, call_sid: str, keys: Sequence[str], ttl: float) -> Snapshot | None:
        token = await self.lock(call_sid, LEASE_SECONDS)
        if token is None:
            return None
        call = self._call(call_sid, ttl)
        session = session_decoder.decode(call.session) if call.session is not None else None
        stored = call.replies or {}
        replies = {k: (stored[k].turn, list(stored[k].segments)) for k in keys if k in stored}
        return Snapshot(token=token, session=session, served=list(call.served), replies=replies)

    async def create(self, call_sid: str, session: Session, ttl: float) -> bool:
        call = self._call(call_sid, ttl)
        if call.session is not None:
            return False
        call.session = session_encoder.encode(session)
        return True

    async def commit(
        self, call_sid: str, token: str, session: Session | None, *, turn_changed: bool = False, cancel: str = ""
    ) -> bool:
        call = self.calls.get(call_sid)
        if call is None or call.lock != token or call.lock_until <= self.clock():
            return False
        if session is None:
            del self.calls[call_sid]
        else:
            call.session = session_encoder.encode(session)
            if turn_changed:  # keep the replies of the turn just finished, for late retries
                call.replies = (
                    {k: v for k, v in call.replies.items() if v.turn == call.current} if call.replies else None
                )
                call.current = session.current.id if session.current else ""
                call.served, call.queues = (), None
                call.fence = 1 if session.current else 0  # the committer generates the new turn
                call.lease_until = self.clock() + LEASE_SECONDS
            call.lock = ""
        if cancel:
            for callback in self.cancel_callbacks:
                callback(cancel)
        return True

    async def push(self, call_sid: str, turn: str, segments: Sequence[Segment], *, fence: int = 1) -> bool:
        call = self.calls.get(call_sid)
        if call is None or call.current != turn or call.fence != fence:
            return False
        if call.queues is None:
            call.queues = {}
        call.queues.setdefault(turn, []).extend(segments)
        if call.pushed is not None:
            call.pushed.set()
            call.pushed = None
        return True

    async def serve(
        self,
        call_sid: str,
        turn: str,
        keys: Sequence[str],
        segments: Sequence[Segment] | None = None,
        *,
        fence: int = 1,
    ) -> list[Segment] | str:
        call = self.calls.get(call_sid)
        if call is None or call.current != turn or (segments is not None and call.fence != fence):
            return SUPERSEDED
        now = self.clock()
        if call.lock and call.lock_until > now:
            return BUSY
        taken = list(segments) if segments is not None else (call.queues or {}).pop(turn, [])
        if not taken and segments is None and call.lease_until <= now and not _ended(call.served):
            return ORPHANED
        if taken:
            kept = tuple(taken)
            call.served += kept
            if call.replies is None:
                call.replies = {}
            stored = Stored(turn, kept)
            for key in keys:
                call.replies[key] = stored
        return taken

    async def renew(self, lease: Lease) -> bool:
        call, now = self.calls.get(lease.call_sid), self.clock()
        if call is None:
            return False
        if lease.token:
            if call.lock != lease.token or call.lock_until <= now:
                return False
            call.lock_until = now + LEASE_SECONDS
        else:
            if call.current != lease.turn or call.fence != lease.fence:
                return False
            call.lease_until = now + LEASE_SECONDS
        return True

    async def take_over(self, call_sid: str, turn: str) -> Takeover | None:
        call, now = self.calls.get(call_sid), self.clock()
        if call is None or call.session is None or call.current != turn:
            return None
        if call.lease_until > now or _ended(call.served):
            return None
        call.fence, call.lease_until = max(call.fence, 1) + 1, now + LEASE_SECONDS
        call.queues = None  # queued by the dead generation, never handed to Twilio: the new one says it again
        return Takeover(fence=call.fence, session=session_decoder.decode(call.session), served=list(call.served))

    async def wait(self, call_sid: str, turn: str, timeout: float) -> None:
        call = self.calls.get(call_sid)
        if call is None or (call.queues or {}).get(turn):
            return
        if call.pushed is None:
            call.pushed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(call.pushed.wait(), timeout)

    async def reply(self, call_sid: str, key: str) -> tuple[str, list[Segment]] | None:
        call = self.calls.get(call_sid)
        stored = (call.replies or {}).get(key) if call is not None else None
        return (stored.turn, list(stored.segments)) if stored is not None else None

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        self.cancel_callbacks.append(callback)

    async def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        if key in self.blobs:
            self.blob_bytes -= len(self.blobs.pop(key)[1])
        if len(data) > self.blob_limit:
            return
        self.blobs[key] = (self.clock() + ttl, data)
        self.blob_bytes += len(data)
        while self.blob_bytes > self.blob_limit:  # least recently used first
            self.blob_bytes -= len(self.blobs.popitem(last=False)[1][1])

    async def get_blob(self, key: str) -> bytes | None:
        entry = self.blobs.get(key)
        if entry is None or entry[0] <= self.clock():
            return None
        self.blobs.move_to_end(key)
        return entry[1]


@hookimpl
def register_session_backends(register: Register) -> None:
    register("memory", MemoryBackend)
