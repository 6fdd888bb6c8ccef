"""The Gather-mode turn engine: a model's token stream becomes sentences, documents and history.

One turn: /process-speech starts a generation on this replica and answers with its first sentence;
the rest is queued in the session backend for /continue, which any replica can serve. Also here:
the LLM chain (fallback, timeouts, retries) and the text-to-speech hygiene, shared with relay mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import secrets
import signal
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from main import (
    BUSY,
    END,
    SUPERSEDED,
    TERMINAL_STATUSES,
    BackendError,
    CallInfo,
    Event,
    LLMProvider,
    Message,
    ProviderError,
    Segment,
    Session,
    SessionBackend,
    Settings,
    Snapshot,
    Tool,
    ToolCall,
    ToolResult,
    ToolSpec,
    TTSVoice,
    Turn,
    TwilioForm,
    Usage,
    begin_when_free,
    log,
)
from twiml import _NOT_XML, document, gather_tag, render
from webhooks import note, within

if TYPE_CHECKING:
    from observe import Observer

# ----------------------------------------------------------------------------- speech text

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no approx dept est fig inc ltd co mt ft jan feb mar apr jun "
    "jul aug sep sept oct nov dec a.m p.m u.s".split()
)
_ENDS_AND_CLOSERS = ".!?…\"')]”’"
_CANDIDATE = re.compile("[.!?…\n]")
_ALNUM = re.compile(r"[^\W_]")  # what str.isalnum() accepts (checked for every code point)


class Segmenter:
    """Cuts a token stream into speakable sentences as soon as each sentence is known to be complete."""

    def __init__(self, max_len: int = 240) -> None:
        self.buf = ""
        self.pos = 0  # everything before pos is known not to end a sentence
        self.max_len = max_len

    def feed(self, token: str) -> list[str]:
        """Add a token; return the sentences it completed."""
        settled = self.pos == len(self.buf)  # nothing before this token waits on what comes next
        self.buf += token
        if settled and len(self.buf) <= self.max_len and not _CANDIDATE.search(token):  # most tokens: no end here
            self.pos = len(self.buf)
            return []
        out: list[str] = []
        while (cut := self._boundary()) is not None:
            sentence, self.buf, self.pos = self.buf[:cut].strip(), self.buf[cut:].lstrip(), 0
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        """The rest, at the end of the stream."""
        rest, self.buf, self.pos = self.buf.strip(), "", 0
        return [rest] if rest else []

    def _boundary(self) -> int | None:
        buf, n = self.buf, len(self.buf)
        for m in _CANDIDATE.finditer(buf, self.pos):
            i = m.start()
            ch = buf[i]
            if ch == "\n":
                if buf[:i].strip():
                    return i
                continue
            j = i + 1
            while j < n and buf[j] in _ENDS_AND_CLOSERS:
                j += 1
            k = j
            while k < n and buf[k] in " \t":
                k += 1
            if k == n:  # nothing after it yet: the next token decides ("Dr." or an end), and a reply
                self.pos = i  # that ends here stays whole, in one document with its end
                break
            if k == j:  # no space after it ("3.5", "e.g")
                continue
            if ch in ".…" and (buf[k].islower() or (ch == "." and self._abbreviation(buf[:i]))):
                continue
            return j
        else:
            self.pos = n
        if n > self.max_len:  # a long run without punctuation: cut at a pause or a space
            window = buf[: self.max_len]
            cut = max(window.rfind(", "), window.rfind("; "), window.rfind(": "))
            cut = cut + 1 if cut > self.max_len // 3 else window.rfind(" ")
            return cut if cut > 0 else self.max_len
        return None

    @staticmethod
    def _abbreviation(before: str) -> bool:
        word = before.rsplit(None, 1)[-1].lower() if before.strip() else ""
        return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"(?:https?://|www\.)\S+")
_MD_MARKS = re.compile(r"(\*\*|__|\*|`+|~~|^#+\s*|^\s*(?:[-*+•]|\d+[.)])\s+|^>\s*)", re.MULTILINE)


_MARKUP_HINTS = re.compile(r"[*_`#\[~>]|https?://|www\.|^\s*(?:[-+•]|\d+[.)])\s", re.MULTILINE)


def speakable(text: str) -> str:
    """Strip what a voice should not read: markdown, URLs, emoji."""
    if text.isascii() and not _MARKUP_HINTS.search(text):  # the common case: plain prose
        return " ".join(text.split())
    text = _URL.sub("", _MD_LINK.sub(r"\1", text))
    text = _MD_MARKS.sub("", text)
    text = "".join(c for c in text if unicodedata.category(c) not in ("So", "Cs", "Co") and c != "\ufe0f")
    return " ".join(text.split())


def clip(text: str, room: int) -> str:
    """Shorten text to at most `room` characters, at a word boundary, ending it with a full stop."""
    if len(text) <= room:
        return text
    cut = text[: max(room - 1, 0)].rpartition(" ")[0].rstrip(",;: ")
    return cut + "." if cut else ""


def speech_key(text: str) -> str:
    """A short stable key for a SpeechResult (retries of one webhook share it)."""
    return hashlib.blake2b(text.encode(), digest_size=9).hexdigest()


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
    ) -> AsyncIterator[Event]:
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
                self.obs.first_token(provider.name, time.perf_counter() - t0, fallback=provider is not self.providers[0])
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


# ----------------------------------------------------------------------------- the turn engine

MAX_TOOL_ROUNDS = 3  # tool calls in one turn before the model must just answer
TOOL_TIMEOUT = 5.0


def has_end(segments: Sequence[Segment]) -> bool:
    """Whether a turn's reply is complete."""
    return any(seg.kind == "end" for seg in segments)


class TurnRun:
    """A reply being generated on this replica; its first document goes to the request that began it."""

    def __init__(self, call: CallInfo, turn: Turn) -> None:
        self.call, self.call_sid, self.turn = call, call.call_sid, turn
        self.ready: list[Segment] = []
        self.taken = self.superseded = False
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def first(self, timeout: float, *, whole: bool = False) -> list[Segment]:
        """Wait until the first sentence (or, with `whole`, the end) exists, at most `timeout`; take what is ready."""

        def ready() -> bool:
            return bool(has_end(self.ready) if whole else self.ready) or self.superseded

        if not ready():
            await asyncio.sleep(0)  # let the generation start: a model that answers at once needs no timer
        if not ready():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while not ready():
                        self.changed.clear()
                        await self.changed.wait()
        self.taken = True
        segments, self.ready = self.ready, []
        return segments

    async def emit(self, segments: list[Segment], backend: SessionBackend) -> bool:
        """Hand segments to the first document while it is open, else queue them for a continuation."""
        if not self.taken:
            self.ready.extend(segments)
            self.changed.set()
            return True
        try:
            return await backend.push(self.call_sid, self.turn.id, segments)
        except BackendError:  # the backend is down (it logs that once): stop here; /continue apologises meanwhile
            return False


class Engine:
    """Runs calls: sessions, turns, streamed replies and the documents that carry them."""

    def __init__(
        self, settings: Settings, llm: LLMChain, voice: TTSVoice, backend: SessionBackend, obs: Observer,
        tools: Sequence[Tool] = (),
    ) -> None:
        self.settings, self.llm, self.tts, self.backend, self.obs = settings, llm, voice, backend, obs
        self.tools = {tool.spec.name: tool for tool in tools}
        self.tool_specs = tuple(tool.spec for tool in tools)
        self.gather = gather_tag(settings)
        self.runs: dict[str, TurnRun] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.drainers: list[Callable[[], Awaitable[None]]] = []  # run on SIGTERM before the server stops
        self.phrases: dict[tuple[str, str], Segment] = {}  # (text, base URL): fixed phrases, voiced once
        self.docs: dict[tuple[str, str], bytes] = {}
        self.warm = [p for p in llm.providers[:1] if getattr(type(p), "warm", LLMProvider.warm) is not LLMProvider.warm]
        backend.on_cancel(self._cancelled)

    def watch_for_sigterm(self) -> None:
        """Mark the engine draining on SIGTERM (Railway's redeploy), then let the server's handler stop it."""
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            return

        server = getattr(previous, "__self__", None)  # uvicorn's Server, when it installed the handler
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

    def background(self, coro: Any) -> asyncio.Task[Any]:
        """Run a task that must outlive the request that started it."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def phrase(self, text: str, base_url: str) -> Segment:
        """A fixed phrase in the selected voice, voiced once."""
        if (seg := self.phrases.get((text, base_url))) is None:
            seg = await self.tts.render(text, base_url=base_url)
            if seg.url or not getattr(self.tts, "hosts_audio", False):  # a <Say> stand-in for failed audio: retry
                self.phrases[text, base_url] = seg
        return seg

    def listen(self, *segments: Segment) -> bytes:
        """Speak, then listen for the caller."""
        return render([*segments, END], gather=self.gather)

    async def listen_phrase(self, text: str, base_url: str) -> bytes:
        """A fixed phrase, then listen: the same document every time, so built once."""
        if (doc := self.docs.get((text, base_url))) is None:
            doc = self.listen(await self.phrase(text, base_url))
            if (text, base_url) in self.phrases:  # not a stand-in for audio that failed
                self.docs[text, base_url] = doc
        return doc

    def answer(self, turn: str, n: int, segments: Sequence[Segment]) -> bytes:
        """Document n of a turn's reply."""
        return render(segments, gather=self.gather, next_url=f"/continue?n={n + 1}&turn={turn}")

    async def _begin(self, call_sid: str, keys: Sequence[str] = ()) -> Snapshot:
        return await begin_when_free(self.backend, call_sid, keys, self.settings.session_ttl)

    def _close_turn(self, session: Session, served: Sequence[Segment]) -> None:
        """Move the current turn into history with what the caller was actually sent."""
        turn, session.current = session.current, None
        if turn is None:
            return
        said = " ".join(s.text for s in served if s.kind == "speech" and s.text)
        end = next((s for s in served if s.kind == "end"), None)
        session.history.append(Message(role="user", content=turn.user))
        if said:
            session.history.append(Message(role="assistant", content=said, interrupted=end is None))
        if end is not None and end.provider:
            session.providers.append(end.provider)
            old = session.usage.get(end.provider, Usage())
            session.usage[end.provider] = Usage(
                input_tokens=old.input_tokens + end.input_tokens, output_tokens=old.output_tokens + end.output_tokens
            )
        del session.history[: -2 * self.settings.max_turns]
        self.obs.turn_closed(session, turn, said, end)

    def _new_session(self, call_sid: str, caller: str = "", to: str = "") -> Session:
        self.obs.call_started()
        return Session(call_sid=call_sid, caller=caller, to=to, started=time.time())

    # -- webhooks

    async def open_call(self, form: TwilioForm) -> None:
        """A call begins (/voice, either mode): store its session unless a retried /voice did; warm the model."""
        session = Session(call_sid=form.call_sid, caller=form.caller, to=form.to, started=time.time())
        if await self.backend.create(form.call_sid, session, self.settings.session_ttl):
            self.obs.call_started()
        for provider in self.warm:
            self.background(provider.warm())

    async def voice(self, form: TwilioForm, base_url: str) -> bytes:
        """An incoming call: create the session, greet inside a <Gather>."""
        await self.open_call(form)
        return await self.listen_phrase(self.settings.greeting, base_url)

    async def speech(self, form: TwilioForm, base_url: str) -> bytes:
        """The caller said something: answer it, streamed, once per distinct speech."""
        s, sid = self.settings, form.call_sid
        text = " ".join(_NOT_XML.sub("", form.speech_result).split())[: s.max_speech_chars]
        if not text or (form.confidence is not None and form.confidence < s.min_confidence):
            return await self._miss(form, base_url, heard=bool(text))
        key = speech_key(text)
        snap = await self._begin(sid, [key])
        if (stored := snap.replies.get(key)) is not None:  # a retry of an answered webhook
            await self.backend.unlock(sid, snap.token)
            return self.answer(stored[0], 0, stored[1])
        session = snap.session or self._new_session(form.call_sid, form.caller, form.to)
        turn, cancel = session.current, ""
        if turn is not None and key in turn.keys:  # a retry while the first delivery is still answering
            await self.backend.unlock(sid, snap.token)
            return await self._await_reply(sid, key, base_url)
        user, keys = text, [key]
        if turn is not None and not has_end(snap.served):
            cancel = turn.id  # still generating or speaking: merge with it, or barge in
            if not snap.served and time.time() - turn.started < s.debounce_ms / 1000:
                user, keys, session.current = f"{turn.user} {text}", [*turn.keys, key], None
        self._close_turn(session, snap.served)
        session.current = Turn(id=new_turn_id(), user=user, keys=keys, started=time.time())
        session.misses, session.turns = 0, session.turns + 1
        await self.backend.commit(sid, snap.token, session, turn_changed=True, cancel=cancel)
        if cancel:
            log.info("turn superseded", extra={"call": sid, "turn": session.turns, "merged": len(keys) > 1})
        note(turn=session.turns)
        run = TurnRun(CallInfo(call_sid=sid, caller=session.caller, to=session.to), session.current)
        messages = [*session.history, Message(role="user", content=user)]
        self.runs[run.turn.id] = run
        run.task = self.background(self._generate(run, messages, base_url, session.turns))
        run.task.add_done_callback(lambda _: self.runs.pop(run.turn.id, None))
        return await self._first_document(run, base_url)

    async def _miss(self, form: TwilioForm, base_url: str, *, heard: bool) -> bytes:
        """Silence or low confidence: reprompt without the model; hang up after too many in a row."""
        snap = await self._begin(form.call_sid)
        session = snap.session or self._new_session(form.call_sid, form.caller, form.to)
        closed = has_end(snap.served)
        if closed:
            self._close_turn(session, snap.served)
        session.misses += 1
        await self.backend.commit(form.call_sid, snap.token, session, turn_changed=closed)
        log.info("no usable speech", extra={"call": form.call_sid, "misses": session.misses, "heard": heard})
        if session.misses >= self.settings.max_misses:
            goodbye = await self.phrase(self.settings.goodbye, base_url)
            return render([goodbye, Segment(kind="hangup"), END], gather="")
        return await self.listen_phrase(self.settings.low_confidence if heard else self.settings.reprompt, base_url)

    async def continuation(self, form: TwilioForm, turn: str, n: int, base_url: str) -> bytes:
        """The next part of a turn's reply, from whichever replica generates it."""
        sid, key = form.call_sid, f"{turn}:{n}"
        if (stored := await self.backend.reply(sid, key)) is not None:
            return self.answer(turn, n, stored[1])
        deadline = time.monotonic() + self.settings.continue_wait
        while (left := deadline - time.monotonic()) > 0:
            got = await self.backend.serve(sid, turn, [key])
            if got == SUPERSEDED:
                return self.listen()
            if got == BUSY:
                await asyncio.sleep(0.005)
            elif got:
                return self.answer(turn, n, got)
            elif turn_age(turn) > self.settings.llm_total_timeout + 5:  # the replica generating it is gone
                got = await self.backend.serve(sid, turn, [key], [await self.phrase(self.settings.apology, base_url), END])
                return self.listen() if isinstance(got, str) else self.answer(turn, n, got)
            else:
                await self.backend.wait(sid, turn, left)
        return document(f'<Pause length="1"/><Redirect method="POST">/continue?n={n}&amp;turn={turn}</Redirect>')

    async def status(self, form: TwilioForm) -> bytes:
        """Twilio's status callback: a finished call ends its session at once."""
        if form.call_status in TERMINAL_STATUSES:
            await self.end_call(form.call_sid, form.call_status)
        return document("")

    async def end_call(self, call_sid: str, outcome: str) -> None:
        """End a call's session in either mode: its open turn into history, a reply still running stopped."""
        snap = await self._begin(call_sid)
        cancel = ""
        if (session := snap.session) is not None:
            if session.current is not None and not has_end(snap.served):
                cancel = session.current.id
            self._close_turn(session, snap.served)
            self.obs.call_ended(session, outcome)  # logs "call ended" with its cost, tells the recorders
        await self.backend.commit(call_sid, snap.token, None, cancel=cancel)

    async def handle_error(self, form: TwilioForm, base_url: str) -> bytes:
        """Twilio's fallback URL: apologise and listen again."""
        log.warning("twilio reported an error", extra={"call": form.call_sid, "error": form.error_code})
        return await self.listen_phrase(self.settings.apology, base_url)

    # -- streamed generation

    def _cancelled(self, turn_id: str) -> None:
        if (run := self.runs.get(turn_id)) is not None:
            run.superseded = True
            run.changed.set()
            if run.task is not None:
                run.task.cancel()

    async def _first_document(self, run: TurnRun, base_url: str) -> bytes:
        """Answer with the first sentence as soon as it exists, or a filler at the deadline."""
        sid, turn = run.call_sid, run.turn
        segments = await run.first(self.settings.first_audio_deadline, whole=not self.settings.stream_replies)
        if not segments and not run.superseded:
            segments = [await self.phrase(self.settings.filler, base_url)]
        for _ in range(400):
            if run.superseded:
                break
            got = await self.backend.serve(sid, turn.id, [*turn.keys, f"{turn.id}:0"], segments)
            if got == SUPERSEDED:
                break
            if got != BUSY:
                return self.answer(turn.id, 0, segments)
            await asyncio.sleep(0.005)
        else:
            raise BackendError(f"call {sid} stayed locked")
        return await self._await_reply(sid, turn.keys[-1], base_url)  # merged into a newer turn

    async def _await_reply(self, sid: str, key: str, base_url: str) -> bytes:
        """Wait for the document another request is producing for the same speech."""
        deadline = time.monotonic() + self.settings.first_audio_deadline + 2
        while time.monotonic() < deadline:
            if (stored := await self.backend.reply(sid, key)) is not None:
                return self.answer(stored[0], 0, stored[1])
            await asyncio.sleep(0.02)
        return await self.listen_phrase(self.settings.apology, base_url)

    async def _generate(self, run: TurnRun, messages: list[Message], base_url: str, number: int) -> None:
        """Stream the model's reply into sentences, voice each as soon as it exists, emit them in order.

        An instant voice (<Say>) is rendered inline; a voice that synthesises audio renders every
        sentence in its own task, in parallel with the model still writing, and an emitter task
        hands them on in order."""
        s, sid = self.settings, run.call_sid
        instant = getattr(self.tts, "instant", False)
        pending: list[asyncio.Task[Segment] | Segment] = []
        more = asyncio.Event() if not instant else None
        emitter = None if more is None else asyncio.create_task(self._emit_in_order(run, pending, more))
        served: list[str] = []
        usage = Usage()
        action: Segment | None = None  # a tool's hangup or dial, after the reply
        spoken, full, named, t0 = 0, False, False, time.monotonic()

        async def say(sentences: list[str], tail: Sequence[Segment] = ()) -> None:
            nonlocal spoken
            texts = []
            nonlocal full
            for sentence in sentences:  # spoken counts the reply's characters, sentences joined by spaces
                if not _ALNUM.search(sentence):  # a stray closing quote or dash: nothing to say
                    continue
                whole = speakable(sentence)
                text = "" if full else clip(whole, s.max_reply_chars - spoken - bool(spoken))
                full = full or text != whole
                if text:
                    spoken += len(text) + bool(spoken)
                    texts.append(text)
            if more is not None:
                pending.extend(asyncio.create_task(self.tts.render(t, base_url=base_url)) for t in texts)
                pending.extend(tail)
                more.set()
            elif texts or tail:
                batch = [await self.tts.render(t, base_url=base_url) for t in texts]
                if not await run.emit([*batch, *tail], self.backend):
                    raise asyncio.CancelledError  # superseded on another replica

        try:
            try:
                async with within(s.llm_total_timeout):
                    segmenter = Segmenter()
                    async for event in self.reply(messages, call=run.call, served=served):
                        if not named and served:  # the first document's log line names the provider
                            named = True
                            note(provider=served[-1])
                        if isinstance(event, str):
                            if sentences := segmenter.feed(event):
                                await say(sentences)
                        elif isinstance(event, Usage):
                            usage = Usage(input_tokens=usage.input_tokens + event.input_tokens,
                                          output_tokens=usage.output_tokens + event.output_tokens)
                        else:
                            action = event
                        if full:  # MAX_REPLY_CHARS reached: stop the model
                            break
                    rest = segmenter.flush()
                    if not spoken and not any(speakable(r) for r in rest):
                        if action is None:
                            raise ProviderError("the model said nothing speakable", provider=(served or ["?"])[-1])
                        rest = [s.farewell if action.kind == "hangup" else s.transferring]
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a vendor failure, a timeout or a plugin bug: the caller hears an apology
                what = {TimeoutError: "reply timed out", ProviderError: "provider error"}.get(type(e), "generation failed")
                provider = served[-1] if served else "none"
                self.obs.turn_failed(what, provider)
                log.error(what, extra={"call": sid, "turn": number, "provider": provider, "error": str(e) or repr(e)},
                          exc_info=not isinstance(e, (ProviderError, TimeoutError)))
                rest = []
                apology = [await self.phrase(s.apology, base_url)]
                if s.fallback_number:
                    apology.append(Segment(kind="dial", number=s.fallback_number))
            else:
                apology = [action] if action is not None else []
            provider = served[-1] if served else ""
            self.obs.turn_generated(provider, usage, time.monotonic() - t0)  # before the end can be served
            end = msgspec.structs.replace(END, provider=provider, **msgspec.structs.asdict(usage))
            await say(rest, [*apology, end])
            if emitter is not None:
                await emitter
        except asyncio.CancelledError:
            if emitter is not None:
                emitter.cancel()
            raise
        if run.taken:  # the reply outlived its first document, whose log line could not tell this
            ms = round((time.monotonic() - t0) * 1000)
            log.info("turn generated", extra={"call": sid, "turn": number, "provider": provider, "chars": spoken, "ms": ms})

    async def reply(
        self, messages: Sequence[Message], *, call: CallInfo, served: list[str]
    ) -> AsyncIterator[str | Usage | Segment]:
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
            results = [await self._run_tool(c, call) for c in calls]
            action = action or next((r.action for r in results if r.action is not None), None)
            history.append(Message(role="assistant", content="".join(text), tool_calls=tuple(calls)))
            history += [Message(role="tool", content=r.content, tool_call_id=c.id) for c, r in zip(calls, results)]
        if action is not None:
            yield action

    async def _run_tool(self, request: ToolCall, call: CallInfo) -> ToolResult:
        """Run a tool the model asked for; a failure becomes a result that tells the model so."""
        try:
            if (tool := self.tools.get(request.name)) is None:
                raise LookupError(f"there is no tool named {request.name!r}")
            async with asyncio.timeout(TOOL_TIMEOUT):
                result = await tool.run(request.arguments, call)
        except Exception as e:  # a tool's failure is the model's to explain, never the caller's traceback
            log.warning("tool failed", extra={"call": call.call_sid, "tool": request.name, "error": f"{type(e).__name__}: {e}"})
            return ToolResult(content=f"The {request.name} tool failed ({e}). Tell the caller briefly and carry on.")
        log.info("tool called", extra={"call": call.call_sid, "tool": request.name})
        return result

    async def _emit_in_order(self, run: TurnRun, pending: list[Any], more: asyncio.Event) -> None:
        """Emit voiced sentences in order, batching whatever is already done (the end included)."""
        while True:
            while not pending:
                more.clear()
                await more.wait()
            item = pending.pop(0)
            batch = [await item if isinstance(item, asyncio.Task) else item]
            while pending and (isinstance(pending[0], Segment) or pending[0].done()):
                nxt = pending.pop(0)
                batch.append(nxt if isinstance(nxt, Segment) else nxt.result())
            if not await run.emit(batch, self.backend):
                if run.task is not None:
                    run.task.cancel()
                return
            if has_end(batch):
                return
