"""Gather mode: Twilio transcribes the caller, switchboard answers each turn with TwiML.

One turn: /process-speech starts a generation on this replica and answers with its first sentence;
the rest is queued in the session backend for /continue, which any replica can serve. A retried
webhook gets the stored answer; /handle-error (Twilio's fallback URL) apologises and listens again.
The generating replica holds the turn's lease; when it dies, the next request for the turn takes it
over: the model is asked again and its reply carries on after the sentences Twilio already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from calls import Calls, end_of_turn, has_end, new_turn_id
from contract import (
    BUSY,
    END,
    LEASE_SECONDS,
    ORPHANED,
    SUPERSEDED,
    BackendError,
    CallInfo,
    Lease,
    Message,
    ProviderError,
    Segment,
    SessionBackend,
    Turn,
    TwilioForm,
    Usage,
    log,
)
from deadlines import within
from observe import note
from speech import Segmenter, clip, has_words, speakable
from twiml import NOT_XML, document, gather_tag, hang_up_after, render
from webhooks import Gate, Reject, webhook

_TURN = re.compile(r"[0-9a-f]{8,32}")
_N = re.compile(r"[0-9]{1,3}")  # ASCII digits only ("²".isdigit() is true, and int() refuses it)
MAX_GENERATIONS = 5  # a turn whose replicas keep dying (a reply that crashes them) gets the apology instead


def speech_key(text: str) -> str:
    """A short stable key for a SpeechResult (retries of one webhook share it)."""
    return hashlib.blake2b(text.encode(), digest_size=9).hexdigest()


class TurnRun:
    """A reply being generated on this replica; its first document goes to the request that began it."""

    def __init__(self, call: CallInfo, turn: Turn, *, fence: int = 1, skip: int = 0) -> None:
        self.call, self.call_sid, self.turn = call, call.call_sid, turn
        self.fence = fence  # the generation number this run holds the turn's lease with
        self.skip = skip  # sentences Twilio already has from the generation this one took over
        self.lease = Lease(call_sid=call.call_sid, turn=turn.id, fence=fence)
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
        if self.fence > 1:  # the turn's record says it was taken over
            segments = [msgspec.structs.replace(seg, taken_over=True) for seg in segments]
        if not self.taken:
            self.ready.extend(segments)
            self.changed.set()
            return True
        try:
            return await backend.push(self.call_sid, self.turn.id, segments, fence=self.fence)
        except BackendError:  # the backend is down (it logs that once): stop here; /continue apologises meanwhile
            return False


class Gather:
    """Gather mode: the greeting in a <Gather>, each caller turn answered sentence by sentence."""

    def __init__(self, calls: Calls) -> None:
        self.calls, self.settings, self.backend = calls, calls.settings, calls.backend
        self.gather = gather_tag(calls.settings)
        self.runs: dict[str, TurnRun] = {}
        self.docs: dict[tuple[str, str], bytes] = {}
        self.backend.on_cancel(self._cancelled)

    def routes(self, gate: Gate) -> list[Any]:
        """/process-speech (a caller turn), /continue (the rest of a reply), /handle-error (Twilio's fallback)."""

        async def continuation(form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
            turn, n = query.get("turn", ""), query.get("n", "")
            if not _TURN.fullmatch(turn) or not _N.fullmatch(n) or not 0 < int(n) < 1000:
                raise Reject(400, "bad continuation turn or n")
            return await self.continuation(form, turn, int(n), base_url)

        return [
            webhook("/process-speech", gate, lambda f, b, q: self.speech(f, b)),
            webhook("/continue", gate, continuation),
            webhook("/handle-error", gate, lambda f, b, q: self.handle_error(f, b)),
        ]

    def listen(self, *segments: Segment) -> bytes:
        """Speak, then listen for the caller."""
        return render([*segments, END], gather=self.gather)

    async def listen_phrase(self, text: str, base_url: str) -> bytes:
        """A fixed phrase, then listen: the same document every time, so built once."""
        if (doc := self.docs.get((text, base_url))) is None:
            doc = self.listen(await self.calls.phrase(text, base_url))
            if (text, base_url) in self.calls.phrases:  # not a stand-in for audio that failed
                self.docs[text, base_url] = doc
        return doc

    def answer(self, turn: str, n: int, segments: Sequence[Segment]) -> bytes:
        """Document n of a turn's reply."""
        return render(segments, gather=self.gather, next_url=f"/continue?n={n + 1}&turn={turn}")

    # -- webhooks

    async def voice(self, form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        """An incoming call: create the session, greet inside a <Gather>."""
        await self.calls.open_call(form)
        return await self.listen_phrase(self.settings.greeting, base_url)

    async def speech(self, form: TwilioForm, base_url: str) -> bytes:
        """The caller said something: answer it, streamed, once per distinct speech."""
        s, sid = self.settings, form.call_sid
        text = " ".join(NOT_XML.sub("", form.speech_result).split())[: s.max_speech_chars]
        if not text or (form.confidence is not None and form.confidence < s.min_confidence):
            return await self._miss(form, base_url, heard=bool(text))
        key = speech_key(text)
        snap = await self.calls.begin(sid, [key])
        if (stored := snap.replies.get(key)) is not None:  # a retry of an answered webhook
            await self.calls.release(sid, snap.token)
            return self.answer(stored[0], 0, stored[1])
        session = snap.session or self.calls.new_session(form.call_sid, form.caller, form.to)
        turn, cancel = session.current, ""
        if turn is not None and key in turn.keys:  # a retry while the first delivery is still answering (or died)
            await self.calls.release(sid, snap.token)
            return await self._await_reply(sid, key, base_url, turn.id)
        user, keys = text, [key]
        if turn is not None and not has_end(snap.served):
            cancel = turn.id  # still generating or speaking: merge with it, or barge in
            if not snap.served and time.time() - turn.started < s.debounce_ms / 1000:
                user, keys, session.current = f"{turn.user} {text}", [*turn.keys, key], None
        self.calls.close_turn(session, snap.served)
        session.current = Turn(id=new_turn_id(), user=user, keys=keys, started=time.time())
        session.misses, session.turns = 0, session.turns + 1
        await self.calls.commit(sid, snap.token, session, turn_changed=True, cancel=cancel)
        if cancel:
            log.info("turn superseded", extra={"call": sid, "turn": session.turns, "merged": len(keys) > 1})
        note(turn=session.turns)
        run = TurnRun(CallInfo(call_sid=sid, caller=session.caller, to=session.to), session.current)
        self._start(run, [*session.history, Message(role="user", content=user)], base_url, session.turns)
        return await self._first_document(run, base_url)

    def _start(self, run: TurnRun, messages: list[Message], base_url: str, number: int) -> None:
        """Generate the run's reply in the background, holding the turn's lease while it does."""
        self.runs[run.turn.id] = run
        self.calls.hold(run.lease, lambda: self._stop(run))
        run.task = self.calls.background(self._generate(run, messages, base_url, number))

        def done(_: object) -> None:
            self.calls.let_go(run.lease)
            if self.runs.get(run.turn.id) is run:
                del self.runs[run.turn.id]

        run.task.add_done_callback(done)

    async def _take_over(self, sid: str, turn_id: str, base_url: str, *, first: bool = False) -> TurnRun | None:
        """Take over a turn whose generating replica died: ask the model again from the stored history here.

        The new reply's first sentences, as many as Twilio already has, are skipped (not the dead one's queue:
        only what was served is known to have reached the caller). With `first`, this request answers the
        turn's first document when none was served."""
        got = await self.backend.take_over(sid, turn_id)
        if got is None or (turn := got.session.current) is None or turn.id != turn_id:
            return None
        session, filler = got.session, self.settings.filler
        skip = sum(1 for seg in got.served if seg.kind == "speech" and seg.text and seg.text != filler)
        log.warning("turn taken over", extra={"call": sid, "turn": session.turns, "fence": got.fence, "skip": skip})
        self.calls.obs.turn_taken_over()
        run = TurnRun(CallInfo(call_sid=sid, caller=session.caller, to=session.to), turn, fence=got.fence, skip=skip)
        run.taken = bool(got.served) or not first
        self._start(run, [*session.history, Message(role="user", content=turn.user)], base_url, session.turns)
        return run

    async def _miss(self, form: TwilioForm, base_url: str, *, heard: bool) -> bytes:
        """Silence or low confidence: reprompt without the model; hang up after too many in a row."""
        snap = await self.calls.begin(form.call_sid)
        session = snap.session or self.calls.new_session(form.call_sid, form.caller, form.to)
        closed = has_end(snap.served)
        if closed:
            self.calls.close_turn(session, snap.served)
        session.misses += 1
        await self.calls.commit(form.call_sid, snap.token, session, turn_changed=closed)
        log.info("no usable speech", extra={"call": form.call_sid, "misses": session.misses, "heard": heard})
        if session.misses >= self.settings.max_misses:
            return hang_up_after(await self.calls.phrase(self.settings.goodbye, base_url))
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
            elif got == ORPHANED:  # the replica generating it died: carry on here
                await self._take_over(sid, turn, base_url)
            elif isinstance(got, list) and got:
                return self.answer(turn, n, got)
            else:  # look again within a lease: a dead generator pushes nothing, so no wake-up comes
                await self.backend.wait(sid, turn, min(left, LEASE_SECONDS / 2))
        return document(f'<Pause length="1"/><Redirect method="POST">/continue?n={n}&amp;turn={turn}</Redirect>')

    async def handle_error(self, form: TwilioForm, base_url: str) -> bytes:
        """Twilio's fallback URL: apologise and listen again."""
        log.warning("twilio reported an error", extra={"call": form.call_sid, "error": form.error_code})
        return await self.listen_phrase(self.settings.apology, base_url)

    # -- streamed generation

    def _cancelled(self, turn_id: str) -> None:
        if (run := self.runs.get(turn_id)) is not None:
            self._stop(run)

    def _stop(self, run: TurnRun) -> None:
        """Stop a run: its turn was superseded, or another replica took its generation over."""
        run.superseded = True
        run.changed.set()
        if run.task is not None:
            run.task.cancel()

    async def _first_document(self, run: TurnRun, base_url: str) -> bytes:
        """Answer with the first sentence as soon as it exists, or a filler at the deadline."""
        sid, turn = run.call_sid, run.turn
        segments = await run.first(self.settings.first_audio_deadline, whole=not self.settings.stream_replies)
        if not segments and not run.superseded:
            segments = [await self.calls.phrase(self.settings.filler, base_url)]
        for _ in range(400):
            if run.superseded:
                break
            got = await self.backend.serve(sid, turn.id, [*turn.keys, f"{turn.id}:0"], segments, fence=run.fence)
            if got == SUPERSEDED:
                break
            if got != BUSY:
                return self.answer(turn.id, 0, segments)
            await asyncio.sleep(0.005)
        else:
            raise BackendError(f"call {sid} stayed locked")
        return await self._await_reply(sid, turn.keys[-1], base_url)  # merged into a newer turn

    async def _await_reply(self, sid: str, key: str, base_url: str, turn: str = "") -> bytes:
        """Wait for the document another request is producing for the same speech; if that request's
        replica died generating `turn`, take the turn over and answer it here."""
        deadline = time.monotonic() + self.settings.first_audio_deadline + 2 * LEASE_SECONDS + 1  # < 9.5 s budget
        while time.monotonic() < deadline:
            if (stored := await self.backend.reply(sid, key)) is not None:
                return self.answer(stored[0], 0, stored[1])
            if turn and (run := await self._take_over(sid, turn, base_url, first=True)) is not None:
                if not run.taken:
                    return await self._first_document(run, base_url)
            await asyncio.sleep(0.02)
        return await self.listen_phrase(self.settings.apology, base_url)

    async def _generate(self, run: TurnRun, messages: list[Message], base_url: str, number: int) -> None:
        """Stream the model's reply into sentences, voice each as soon as it exists, emit them in order.

        An instant voice (<Say>) is rendered inline; a voice that synthesises audio renders every
        sentence in its own task, in parallel with the model still writing, and an emitter task
        hands them on in order."""
        s, sid = self.settings, run.call_sid
        instant = self.calls.voice.instant
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
                if not has_words(sentence):  # a stray closing quote or dash: nothing to say
                    continue
                whole = speakable(sentence)
                text = "" if full else clip(whole, s.max_reply_chars - spoken - bool(spoken))
                full = full or text != whole
                if text:
                    spoken += len(text) + bool(spoken)
                    if run.skip:  # Twilio has it from the generation this one took over
                        run.skip -= 1
                        continue
                    texts.append(text)
            if more is not None:
                pending.extend(asyncio.create_task(self.calls.voice.render(t, base_url=base_url)) for t in texts)
                pending.extend(tail)
                more.set()
            elif texts or tail:
                batch = [await self.calls.voice.render(t, base_url=base_url) for t in texts]
                if not await run.emit([*batch, *tail], self.backend):
                    raise asyncio.CancelledError  # superseded on another replica

        try:
            try:
                if run.fence > MAX_GENERATIONS:
                    raise ProviderError(f"{run.fence - 1} replicas died generating this turn", provider="takeover")
                async with within(s.llm_total_timeout):
                    segmenter = Segmenter()
                    async for event in self.calls.reply(messages, call=run.call, served=served):
                        if not named and served:  # the first document's log line names the provider
                            named = True
                            note(provider=served[-1])
                        if isinstance(event, str):
                            if sentences := segmenter.feed(event):
                                await say(sentences)
                        elif isinstance(event, Usage):
                            usage += event
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
                what = {TimeoutError: "reply timed out", ProviderError: "provider error"}.get(
                    type(e), "generation failed"
                )
                provider = served[-1] if served else "none"
                self.calls.obs.turn_failed(what, provider)
                log.error(
                    what,
                    extra={"call": sid, "turn": number, "provider": provider, "error": str(e) or repr(e)},
                    exc_info=not isinstance(e, (ProviderError, TimeoutError)),
                )
                rest = []
                apology = [await self.calls.phrase(s.apology, base_url)]
                if s.fallback_number:
                    apology.append(Segment(kind="dial", number=s.fallback_number))
            else:
                apology = [action] if action is not None else []
            provider = served[-1] if served else ""
            self.calls.obs.turn_generated(provider, usage, time.monotonic() - t0)  # before the end can be served
            end = end_of_turn(provider, usage)
            await say(rest, [*apology, end])
            if emitter is not None:
                await emitter
        except asyncio.CancelledError:
            if emitter is not None:
                emitter.cancel()
            raise
        if run.taken:  # the reply outlived its first document, whose log line could not tell this
            ms = round((time.monotonic() - t0) * 1000)
            log.info(
                "turn generated", extra={"call": sid, "turn": number, "provider": provider, "chars": spoken, "ms": ms}
            )

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
