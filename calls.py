"""What every call mode shares: sessions, turns, fixed phrases, the LLM chain, tool rounds, drain on SIGTERM.

A mode (gather.py, relay.py, ...) opens and ends calls, begins and commits transitions of a call's
session, closes turns into history and asks the model for replies through `Calls`; the session
backend is the truth, so any replica serves any request of any call.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec

from contract import (
    END,
    RENEW_EVERY,
    CallInfo,
    Event,
    Lease,
    LLMProvider,
    Message,
    ProviderError,
    Segment,
    Session,
    SessionBackend,
    Settings,
    Snapshot,
    SpeechModel,
    Tool,
    ToolCall,
    ToolResult,
    ToolSpec,
    TTSVoice,
    TurnRecord,
    TwilioForm,
    Usage,
    begin_when_free,
    log,
)
from deadlines import within
from observe import Observer
from webhooks import Gate


def new_turn_id() -> str:
    """A turn id that carries its start time (ms, hex), so any replica can tell a turn's age."""
    return f"{int(time.time() * 1000):x}{random.getrandbits(32):08x}"  # unique, not secret: requests are signed


def turn_age(turn_id: str) -> float:
    """Seconds since the turn began."""
    try:
        return time.time() - int(turn_id[:-8], 16) / 1000
    except ValueError:
        return float("inf")


# ----------------------------------------------------------------------------- the LLM chain


def _why(e: Exception) -> str:
    """A provider's failure in a few words for the log."""
    if isinstance(e, TimeoutError):
        return "no first token in time"
    if isinstance(e, StopAsyncIteration):
        return "empty reply"
    return str(e) if isinstance(e, ProviderError) else f"{type(e).__name__}: {e}"


class LLMChain:
    """The selected providers in order: the next serves the turn when one fails before its first token."""

    def __init__(self, providers: Sequence[LLMProvider], settings: Settings, obs: Observer) -> None:
        self.providers = list(providers)
        self.settings = settings
        self.obs = obs

    async def stream(
        self, messages: Sequence[Message], *, call: str, served: list[str], tools: Sequence[ToolSpec] = ()
    ) -> AsyncGenerator[Event]:
        """Stream a reply; `served` receives the name of the provider that answered."""
        s, last = self.settings, None
        for provider in self.providers:
            for attempt in range(s.llm_retries + 1):
                events, t0 = None, time.perf_counter()
                try:
                    events = provider.stream(messages, system=s.system_prompt, tools=tools)
                    async with within(s.llm_first_token_timeout):  # no extra task, unlike wait_for
                        first = await anext(events)
                except Exception as e:  # a vendor failure, a stall, an empty reply or a plugin bug: try the next
                    if events is not None:
                        with contextlib.suppress(Exception):
                            await events.aclose()
                    last = e
                    self.obs.provider_error(provider.name)
                    extra = {"provider": provider.name, "call": call, "attempt": attempt + 1, "error": _why(e)}
                    log.warning("provider failed", extra=extra)
                    if isinstance(e, ProviderError) and e.retryable and attempt < s.llm_retries:
                        await asyncio.sleep(0.2 * 2**attempt + secrets.randbelow(100) / 1000)
                        continue
                    break
                served.append(provider.name)
                self.obs.first_token(
                    provider.name, time.perf_counter() - t0, fallback=provider is not self.providers[0]
                )
                try:
                    yield first
                    async for event in events:
                        yield event
                finally:
                    await events.aclose()
                return
        if not isinstance(last, (ProviderError, TimeoutError, StopAsyncIteration, type(None))):
            raise last  # a plugin bug is reported as one
        raise ProviderError("every LLM provider failed", provider="chain") from last


# ----------------------------------------------------------------------------- calls

MAX_TOOL_ROUNDS = 3  # tool calls in one turn before the model must just answer
TOOL_TIMEOUT = 5.0


def has_end(segments: Sequence[Segment]) -> bool:
    """Whether a turn's reply is complete."""
    return any(seg.kind == "end" for seg in segments)


def end_of_turn(provider: str, usage: Usage) -> Segment:
    """The segment that closes a turn's reply: which provider served it, and its usage."""
    return msgspec.structs.replace(END, provider=provider, **msgspec.structs.asdict(usage))


class Keypad:
    """A caller's key presses collected into one entry: ended by "#", by the 32nd key, or by a pause."""

    def __init__(self, wait: float, entered: Callable[[str], Awaitable[None]]) -> None:
        self.wait, self.entered = wait, entered  # entered: called with the entry a pause ended
        self.digits = ""
        self.timer: asyncio.Task[None] | None = None

    def press(self, digit: str) -> str:
        """Take one key (anything but 0-9 * # is ignored): the entry when this key ends it, else ""."""
        if len(digit) != 1 or digit not in "0123456789*#":
            return ""
        self.cancel()
        if digit != "#":
            self.digits += digit
        if digit == "#" or len(self.digits) >= 32:
            digits, self.digits = self.digits, ""
            return digits
        self.timer = asyncio.create_task(self._pause())
        return ""

    async def _pause(self) -> None:
        await asyncio.sleep(self.wait)
        self.timer = None  # (a key pressed while the entry is being answered must not cancel the answer)
        digits, self.digits = self.digits, ""
        if digits:
            await self.entered(digits)

    def cancel(self) -> None:
        """Stop waiting for a pause."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Mode(Protocol):
    """A call mode (main.modes): its answer to /voice, and its own routes."""

    async def voice(self, form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        """An incoming call in this mode: open it and answer Twilio's first request."""
        ...

    def routes(self, gate: Gate) -> list[Any]:
        """The mode's webhooks and sockets; `gate` reads their requests."""
        ...


class Calls:
    """The calls this replica serves, in every mode: sessions, turns, phrases, replies, background work.

    Public attributes a mode uses: settings, backend (the session backend), voice (the call's TTS voice),
    obs (metrics and records), speech (media mode's speech model), draining (SIGTERM arrived)."""

    def __init__(
        self,
        settings: Settings,
        llm: LLMChain,
        voice: TTSVoice,
        backend: SessionBackend,
        obs: Observer,
        tools: Sequence[Tool],
        speech: SpeechModel,
    ) -> None:
        self.settings, self.llm, self.voice, self.backend, self.obs = settings, llm, voice, backend, obs
        self.speech = speech  # media mode's model (SPEECH_MODEL)
        self.tools = {tool.spec.name: tool for tool in tools}
        self.tool_specs = tuple(tool.spec for tool in tools)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.drainers: list[Callable[[], Awaitable[None]]] = []  # run on SIGTERM before the server stops
        self.phrases: dict[tuple[str, str], Segment] = {}  # (text, base URL): fixed phrases, voiced once
        self.warm = [p for p in llm.providers[:1] if p.warms]
        self.leases: dict[Lease, tuple[float, Callable[[], None] | None]] = {}  # held: last renewed, on loss
        self.keeper: asyncio.Task[None] | None = None

    # -- the process

    def on_drain(self, drainer: Callable[[], Awaitable[None]]) -> None:
        """Run `drainer` on SIGTERM, before the server stops taking requests (e.g. sockets asked to move)."""
        self.drainers.append(drainer)

    def watch_for_sigterm(self) -> None:
        """Mark the calls draining on SIGTERM (Railway's redeploy), then let the server's handler stop it."""
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            return

        server: Any = getattr(previous, "__self__", None)  # uvicorn's Server, when it installed the handler
        loop = asyncio.get_running_loop()

        async def drain_then_stop() -> None:
            try:  # e.g. relay sockets are asked to reconnect elsewhere before the server closes them
                await asyncio.wait_for(asyncio.gather(*(d() for d in self.drainers)), self.settings.drain_seconds)
            except Exception:
                log.exception("draining failed")
            server.should_exit = True  # a graceful stop that ends in exit code 0, not a re-raised SIGTERM

        def on_sigterm(signum: int, frame: Any) -> None:
            self.draining = True
            log.info("SIGTERM: draining")
            if hasattr(server, "should_exit"):
                loop.call_soon_threadsafe(lambda: self.background(drain_then_stop()))
            else:
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    async def drain(self) -> None:
        """The server stops: let replies being generated finish (up to DRAIN_SECONDS), then cancel the rest."""
        self.draining = True
        if self.tasks:
            log.info("draining", extra={"replies": len(self.tasks), "seconds": self.settings.drain_seconds})
            await asyncio.wait(list(self.tasks), timeout=self.settings.drain_seconds)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.keeper is not None:
            self.keeper.cancel()
            await asyncio.gather(self.keeper, return_exceptions=True)
            self.keeper = None

    def background(self, coro: Any) -> asyncio.Task[Any]:
        """Run a task that must outlive the request that started it."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def phrase(self, text: str, base_url: str) -> Segment:
        """A fixed phrase in the selected voice, voiced once."""
        if (seg := self.phrases.get((text, base_url))) is None:
            seg = await self.voice.render(text, base_url=base_url)
            if seg.url or not self.voice.hosts_audio:  # a <Say> stand-in for failed audio: retry next time
                self.phrases[text, base_url] = seg
        return seg

    # -- leases: what this replica works on, renewed beside the requests

    def hold(self, lease: Lease, lost: Callable[[], None] | None = None) -> None:
        """Renew `lease` until let_go(); call `lost` if the backend says it was taken over meanwhile."""
        self.leases[lease] = (time.monotonic(), lost)
        if self.keeper is None or self.keeper.done():
            self.keeper = asyncio.create_task(self._renew_forever(), name="lease-keeper")

    def let_go(self, lease: Lease) -> None:
        """Stop renewing `lease` (its work is done; it runs out by itself unless released)."""
        self.leases.pop(lease, None)

    async def _renew_forever(self) -> None:
        """Every RENEW_EVERY, renew the leases held that long (a short transition is never renewed).

        How late each tick fires is how long the event loop stalled: the lease must outlast it."""
        loop = asyncio.get_running_loop()
        due = loop.time() + RENEW_EVERY
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            self.obs.renewal_tick(now - due)
            due = now + RENEW_EVERY
            mono = time.monotonic()
            stale = [(lease, lost) for lease, (at, lost) in self.leases.items() if mono - at >= RENEW_EVERY * 0.8]
            if not stale:
                continue
            results = await asyncio.gather(*(self.backend.renew(lease) for lease, _ in stale), return_exceptions=True)
            for (lease, lost), ok in zip(stale, results, strict=True):
                if lease not in self.leases:
                    continue
                if ok is True:
                    self.leases[lease] = (mono, lost)
                    self.obs.lease_renewed()
                elif ok is False:  # taken over (or the turn moved on): this holder must stop writing
                    del self.leases[lease]
                    self.obs.lease_lost()
                    log.warning("lease lost", extra={"call": lease.call_sid, "turn": lease.turn, "fence": lease.fence})
                    if lost is not None:
                        lost()
                # an exception is a backend outage (logged by the backend): keep the lease and try again

    # -- a call's session

    async def begin(self, call_sid: str, keys: Sequence[str] = ()) -> Snapshot:
        """Lock the call and read its session (and the stored replies for `keys`), waiting while it is busy."""
        snap = await begin_when_free(self.backend, call_sid, keys, self.settings.session_ttl)
        self.hold(Lease(call_sid=call_sid, token=snap.token))
        return snap

    async def commit(
        self, call_sid: str, token: str, session: Session | None, *, turn_changed: bool = False, cancel: str = ""
    ) -> bool:
        """Write the session begun with `token` (None deletes the call) and unlock it."""
        self.let_go(Lease(call_sid=call_sid, token=token))
        return await self.backend.commit(call_sid, token, session, turn_changed=turn_changed, cancel=cancel)

    async def release(self, call_sid: str, token: str) -> None:
        """Unlock a call begun with `token` without writing."""
        self.let_go(Lease(call_sid=call_sid, token=token))
        await self.backend.unlock(call_sid, token)

    def new_session(self, call_sid: str, caller: str = "", to: str = "") -> Session:
        """A session for a call this replica had not seen (its /voice went missing, or the call was ended)."""
        self.obs.call_started()
        return Session(call_sid=call_sid, caller=caller, to=to, started=time.time())

    def close_turn(
        self, session: Session, served: Sequence[Segment], *, interrupted: bool | None = None
    ) -> TurnRecord | None:
        """Move the current turn into history with what the caller was actually sent (interrupted: cut off,
        which a reply without its end segment is); return its record, as the call recorders get it."""
        turn, session.current = session.current, None
        if turn is None:
            return None
        said = " ".join(s.text for s in served if s.kind == "speech" and s.text)
        end = next((s for s in served if s.kind == "end"), None)
        session.history.append(Message(role="user", content=turn.user))
        if said:
            session.history.append(
                Message(role="assistant", content=said, interrupted=end is None if interrupted is None else interrupted)
            )
        if end is not None and end.provider:
            session.providers.append(end.provider)
            session.usage[end.provider] = session.usage.get(end.provider, Usage()) + end.usage
        del session.history[: -2 * self.settings.max_turns]
        return self.obs.turn_closed(
            session, turn, said, end, interrupted=interrupted, taken_over=any(s.taken_over for s in served)
        )

    async def open_call(self, form: TwilioForm, *, channel: str = "phone") -> None:
        """A call begins (/voice, any mode; or the browser phone's socket): store its session unless a retried
        /voice did; warm the model."""
        session = Session(call_sid=form.call_sid, caller=form.caller, to=form.to, started=time.time(), channel=channel)
        if await self.backend.create(form.call_sid, session, self.settings.session_ttl):
            self.obs.call_started()
        for provider in self.warm:
            self.background(provider.warm())

    async def end_call(self, call_sid: str, outcome: str) -> None:
        """End a call's session in any mode: its open turn into history, a reply still running stopped."""
        snap = await self.begin(call_sid)
        cancel = ""
        if (session := snap.session) is not None:
            if session.current is not None and not has_end(snap.served):
                cancel = session.current.id
            self.close_turn(session, snap.served)
            self.obs.call_ended(session, outcome)  # logs "call ended" with its cost, tells the recorders
        await self.commit(call_sid, snap.token, None, cancel=cancel)

    # -- replies

    async def reply(
        self, messages: Sequence[Message], *, call: CallInfo, served: list[str]
    ) -> AsyncGenerator[str | Usage | Segment]:
        """The model's reply with its tool calls run: text tokens and usage, then a tool's action (hang up, dial).

        Text the model writes before a tool call is kept: a newline after it completes its sentence."""
        history, action = list(messages), None
        for round_ in range(MAX_TOOL_ROUNDS + 1):  # the model may call tools, then carries on
            calls: list[ToolCall] = []
            text: list[str] = []
            offered = self.tool_specs if round_ < MAX_TOOL_ROUNDS else ()
            async for event in self.llm.stream(history, call=call.call_sid, served=served, tools=offered):
                if isinstance(event, ToolCall):
                    calls.append(event)
                    continue
                if isinstance(event, str):
                    text.append(event)
                yield event
            if not calls:
                break
            if text:
                yield "\n"
            results = [await self.run_tool(c, call) for c in calls]
            action = action or next((r.action for r in results if r.action is not None), None)
            history.append(Message(role="assistant", content="".join(text), tool_calls=tuple(calls)))
            history += [
                Message(role="tool", content=r.content, tool_call_id=c.id) for c, r in zip(calls, results, strict=True)
            ]
        if action is not None:
            yield action

    async def run_tool(self, request: ToolCall, call: CallInfo) -> ToolResult:
        """Run a tool the model asked for; a failure becomes a result that tells the model so."""
        try:
            if (tool := self.tools.get(request.name)) is None:
                raise LookupError(f"there is no tool named {request.name!r}")
            async with asyncio.timeout(TOOL_TIMEOUT):
                result = await tool.run(request.arguments, call)
        except Exception as e:  # a tool's failure is the model's to explain, never the caller's traceback
            log.warning(
                "tool failed", extra={"call": call.call_sid, "tool": request.name, "error": f"{type(e).__name__}: {e}"}
            )
            return ToolResult(content=f"The {request.name} tool failed ({e}). Tell the caller briefly and carry on.")
        log.info("tool called", extra={"call": call.call_sid, "tool": request.name})
        return result
