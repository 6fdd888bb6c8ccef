"""Media Streams mode: Twilio sends the caller's audio over a WebSocket, a speech model answers with audio.

`/voice` (MODE=media, or `?mode=media` on a number's voice URL) speaks the greeting in the call's TTS
voice, then `<Connect action="/media-action"><Stream url="wss://host/media">`. Twilio opens `WS /media`
(a signed upgrade) and sends `connected`, `start`, then 20 ms `media` frames; the speech model (SPEECH_MODEL)
hears them and answers with audio, sent back in whole 20 ms frames with a `mark` after each message.
When the caller speaks over a reply, Twilio's buffer is cleared and the model's reply is truncated at
the audio the caller heard, counted from mark echoes (echoes a `clear` flushes are not "heard").

Both sides' transcripts go into the session's history turn by turn, so when a socket drops, the action
URL answers a fresh `<Connect>` and the call carries on, on any replica, with a new model session seeded
from that history. Before closing a socket on purpose we store why (hang-up, transfer, reconnect,
failure, silence), and the action URL answers `<Hangup/>`, `<Dial>`, a new `<Connect>`, the apology or
the goodbye.

The model's idle timeouts (CallerSilent) are misses, as Gather's empty speech is: the model may reprompt
in its own voice, and MAX_MISSES in a row close the socket, so the action URL says GOODBYE in the call's
voice, then hangs up. Fixed phrases are never left to the model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any

import msgspec
from litestar import asgi

import pcm
from calls import Calls, Keypad, end_of_turn, new_turn_id
from contract import (
    TERMINAL_STATUSES,
    CallerDone,
    CallerSilent,
    CallerSpeaking,
    CallInfo,
    ConfigError,
    Message,
    ProviderError,
    ReplyDone,
    Segment,
    Session,
    SpeechAudio,
    SpeechSession,
    ToolCall,
    Transcript,
    Turn,
    TurnRecord,
    TwilioForm,
    Usage,
    log,
)
from observe import speech_key
from twiml import document, esc, hang_up_after, verb
from webhooks import CALL_SID, Gate, Receive, Scope, Send, socket_url, webhook

STREAM_PATH, ACTION_PATH, STATUS_PATH = "/media", "/media-action", "/media-status"
START_WAIT = 10.0  # seconds Twilio has to send `start` after the upgrade
MAX_FAILURES = 3  # streams (or model sessions) in a row that failed within QUICK_FAILURE seconds
QUICK_FAILURE = 30.0
DTMF_WAIT = 1.5  # seconds of keypad quiet that end a number
GOODBYE_WAIT = 2.0  # seconds the last mark may take beyond the audio still to play
GOODBYE_LIMIT = 15.0  # seconds from a hang-up or transfer tool to the socket's close, whatever the model does
EARLY_LIMIT = 10 * pcm.RATE  # bytes of the caller's audio kept while a model session opens (10 s)
UNHEARD = "(audio)"  # history text for speech without a transcript (a model like parrot)
SILENT = "(silence)"  # history text for a turn the caller let pass (the model's idle timeout, then its reprompt)


# ----------------------------------------------------------------------------- Twilio's messages


class Start(msgspec.Struct, kw_only=True, rename="camel"):
    call_sid: str = ""
    stream_sid: str = ""
    custom_parameters: dict[str, Any] = {}


class Media(msgspec.Struct):
    payload: str = ""


class Named(msgspec.Struct):
    name: str = ""


class Digit(msgspec.Struct):
    digit: str = ""


class Inbound(msgspec.Struct, gc=False):
    """Any message Twilio sends on a media socket; `event` says which field is set."""

    event: str = ""
    media: Media | None = None
    mark: Named | None = None
    start: Start | None = None
    dtmf: Digit | None = None


inbound = msgspec.json.Decoder(Inbound)


# ----------------------------------------------------------------------------- one exchange


class Exchange:
    """One caller turn and the model's reply: what was said, sent and heard, and what it cost."""

    def __init__(self) -> None:
        self.started = time.time()
        self.user: list[str] = []
        self.items: list[str] = []  # the reply's items, in the order their audio was sent
        self.sent: dict[str, int] = {}  # bytes of each item handed to Twilio
        self.heard: dict[str, int] = {}  # bytes of each item Twilio says it played
        self.text: dict[str, str] = {}  # each item's transcript
        self.done = False  # the model finished the reply
        self.silent = False  # the caller said nothing: the reply is the model's reprompt
        self.first_audio: float | None = None  # seconds from the end of the caller's speech to the first frame sent

    def said(self) -> tuple[str, bool]:
        """What the caller heard of the reply (a transcript cut in proportion to the audio), and if all of it."""
        parts, whole = [], True
        for item in self.items:
            sent, heard = self.sent.get(item, 0), self.heard.get(item, 0)
            text = self.text.get(item) or UNHEARD
            if heard < sent:
                whole = False
                if not heard:
                    text = ""
                elif text != UNHEARD:
                    words = text.split()
                    text = " ".join(words[: round(len(words) * heard / sent)])
            if text:
                parts.append(text)
        return " ".join(parts), whole and self.done


# ----------------------------------------------------------------------------- one socket


class Bridge:
    """One media socket: Twilio's audio to the speech model and back, marks, barge-in, tools, digits.

    The browser phone (browser.py) runs the same bridge for a page: it overrides the three hooks below."""

    def __init__(self, media: MediaMode, send: Send) -> None:
        self.media, self.calls, self.settings = media, media.calls, media.settings
        self.send = send
        self.sid = self.stream = ""
        self.call = CallInfo(call_sid="")
        self.model: SpeechSession | None = None
        self.pcm16 = media.model.audio_format == "pcm16"
        self.turn: Exchange | None = None
        self.marks: dict[str, tuple[str, int]] = {}  # mark name -> (item, bytes), until echoed or cleared
        self.count = 0
        self.rest: dict[str, bytearray] = {}  # each item's audio short of a whole frame
        self.replies = 0  # replies the model finished
        self.end_at = 0  # with a hang-up or transfer pending: the reply whose end closes the socket
        self.ending = ""
        self.superseded = False
        self.unbilled = Usage()
        self.keypad = Keypad(DTMF_WAIT, self._keyed)
        self.deadline: asyncio.Task[None] | None = None  # GOODBYE_LIMIT after a hang-up or transfer tool
        self.heard_end: float | None = None  # when the caller stopped speaking, until the answer's first audio
        self.lock = asyncio.Lock()  # one history write at a time
        self.done = asyncio.Event()  # the socket should close
        self.history: list[Message] = []
        self.early = bytearray()  # the caller's audio from before the model session was open
        self.muted = False
        self.misses = 0  # the model's idle timeouts in a row, since the caller last spoke or pressed a key
        self.reprompt = False  # the model's next reply answers an idle timeout (the caller said nothing since)

    # -- hooks for a peer that is not Twilio (the browser phone)

    def accepts(self, start: Start) -> bool:
        """Whether this `start` names a call this socket may serve: a Twilio call here."""
        return CALL_SID.fullmatch(start.call_sid) is not None

    async def turn_closed(self, record: TurnRecord, session: Session) -> None:
        """A turn went into history (its record is what the call recorders get)."""

    async def closing(self) -> None:
        """We are about to close the socket (Twilio requests the action URL after it closes)."""

    # -- the socket

    async def run(self, receive: Receive) -> None:
        """Read Twilio's messages until the socket closes (or we close it)."""
        model_task: asyncio.Task[None] | None = None
        try:
            try:
                async with asyncio.timeout(START_WAIT):
                    while not self.sid and not self.done.is_set():
                        message = await receive()
                        if message["type"] == "websocket.disconnect":
                            return
                        if (m := self._decode(message)) is not None and m.event == "start" and m.start:
                            await self._start(m.start)
            except TimeoutError:
                log.warning("media start never came", extra={"route": STREAM_PATH})
                return
            except Exception:  # the backend is down: close, so Twilio calls the action URL (which retries)
                log.exception("media start failed", extra={"call": self.sid, "route": STREAM_PATH})
                self.sid = ""
                return
            if not self.sid:
                return
            model_task = asyncio.create_task(self._listen())
            reader = asyncio.create_task(self._read(receive))
            closer = asyncio.create_task(self.done.wait())
            await asyncio.wait([reader, closer], return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, closer):
                task.cancel()
        finally:
            if model_task is not None:
                model_task.cancel()
                await asyncio.gather(model_task, return_exceptions=True)
            self.keypad.cancel()
            if self.deadline is not None:  # (a pending deadline would hold up the shutdown drain)
                self.deadline.cancel()
            if self.model is not None:
                with contextlib.suppress(Exception):
                    await self.model.close()
            if self.sid and not self.superseded:
                await self._finish_turn()
            with contextlib.suppress(Exception):
                await self.closing()
            await self._close()

    async def _read(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if (m := self._decode(message)) is None:
                continue
            if m.event == "media" and m.media is not None:
                self._heard_audio(m.media.payload)
            elif m.event == "mark" and m.mark is not None:
                await self._echoed(m.mark.name)
            elif m.event == "dtmf" and m.dtmf is not None and (digits := self.keypad.press(m.dtmf.digit)):
                await self._keyed(digits)
            elif m.event == "stop":
                await self._finish_turn()
                await self.calls.end_call(self.sid, "completed")  # the call (or its stream) is over
                self.sid = ""
                return
            elif m.event not in ("connected", "start"):
                log.info("media message ignored", extra={"call": self.sid, "type": m.event[:40]})

    def _decode(self, message: dict[str, Any]) -> Inbound | None:
        raw = message.get("text") or message.get("bytes") or b""
        try:
            return inbound.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("unreadable media message", extra={"call": self.sid, "error": str(e)[:200]})
            return None

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send({"type": "websocket.close", "code": 1000})

    async def _send(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    # -- the call

    async def _start(self, start: Start) -> None:
        if not self.accepts(start):
            log.warning("media start without a valid callSid", extra={"route": STREAM_PATH})
            self.done.set()
            return
        self.sid, self.stream = start.call_sid, start.stream_sid
        async with self.lock:
            snap = await self.calls.begin(self.sid)
            session = snap.session or self.calls.new_session(self.sid)
            previous, session.stream, session.ending = session.stream, self.stream, ""
            session.streams = [*session.streams[-(MAX_FAILURES - 1) :], time.time()]
            self.calls.close_turn(session, [])  # a turn left open by a lost socket keeps its question
            await self.calls.commit(
                self.sid, snap.token, session, turn_changed=True, cancel=previous if previous != self.stream else ""
            )
        self.call = CallInfo(call_sid=self.sid, caller=session.caller, to=session.to)
        self.media.live[self.stream] = self
        attempt = str(start.custom_parameters.get("attempt", "1"))[:8]
        log.info(
            "media connected",
            extra={
                "call": self.sid,
                "attempt": attempt,
                "history": len(session.history),
                "took_over": bool(previous and previous != self.stream),
            },
        )
        self.history = session.history

    async def _listen(self) -> None:
        """Run model sessions for this stream: a new one (from the stored history) when one fails or ends."""
        failures: list[float] = []
        history = self.history
        while not self.done.is_set():
            try:
                self.model = await self.media.model.open(
                    instructions=self.settings.system_prompt, tools=self.calls.tool_specs, history=history
                )
                if self.early:  # what the caller said while the session opened
                    self.model.send_audio(bytes(self.early))
                    self.early.clear()
                async for event in self.model.events():
                    await self._event(event)
                raise ProviderError("the speech model ended its session", provider=self.media.model.name)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the model failed: a short pause, then a new session that knows the call
                bug = not isinstance(e, ProviderError)
                log.error(
                    "speech model failed",
                    extra={"call": self.sid, "provider": self.media.model.name, "error": str(e) or repr(e)},
                    exc_info=bug,
                )
                self.calls.obs.provider_error(self.media.model.name)
                failures = [t for t in failures if time.monotonic() - t < QUICK_FAILURE] + [time.monotonic()]
                if len(failures) >= MAX_FAILURES:
                    return await self._end("failed")
                if self.model is not None:
                    with contextlib.suppress(Exception):
                        await self.model.close()
                self.model = None
                await self._finish_turn()
                snap = await self.calls.begin(self.sid)
                await self.calls.release(self.sid, snap.token)
                history = snap.session.history if snap.session is not None else []
                self.calls.obs.media_reconnects.inc()

    # -- the model's events

    async def _event(self, event: Any) -> None:
        if isinstance(event, SpeechAudio):
            if not self.muted:
                await self._play(event.item, pcm.pcm16_to_ulaw(event.data) if self.pcm16 else event.data)
        elif isinstance(event, CallerSpeaking):
            self._heard_caller()
            await self._barge_in()
        elif isinstance(event, CallerDone):
            self._heard_caller()
            self.heard_end, self.muted = time.monotonic(), False
            self.turn = self.turn or Exchange()
        elif isinstance(event, CallerSilent):
            await self._silent()
        elif isinstance(event, Transcript):
            if event.role == "user":
                if event.text:  # (a silent stretch the model committed has an empty one)
                    self._heard_caller()
                    self.turn = self.turn or Exchange()
                    self.turn.user.append(event.text)
            elif self.turn is not None:
                self.turn.text[event.item] = event.text
        elif isinstance(event, ReplyDone):
            self.unbilled += event.usage
            self.replies += 1
            if not event.interrupted:  # (an interrupted reply's turn closed at the barge-in)
                await self._reply_done()
        elif isinstance(event, ToolCall):
            await self._tool(event)

    async def _play(self, item: str, data: bytes) -> None:
        """Send a reply's audio in whole 20 ms frames, with a mark after each message."""
        if self.turn is None:
            self.turn = Exchange()
            self.turn.silent, self.reprompt = self.reprompt, False
        turn = self.turn
        if item not in turn.sent:
            turn.items.append(item)
            turn.sent[item] = 0
        rest = self.rest.setdefault(item, bytearray())
        rest += data
        whole = len(rest) - len(rest) % pcm.FRAME
        if whole:
            await self._frames(item, bytes(rest[:whole]))
            del rest[:whole]

    async def _frames(self, item: str, data: bytes) -> None:
        assert self.turn is not None
        self.turn.sent[item] = self.turn.sent.get(item, 0) + len(data)
        self.count += 1
        name = f"m{self.count}"
        self.marks[name] = (item, len(data))
        payload = base64.b64encode(data).decode()
        await self._send(f'{{"event":"media","streamSid":"{self.stream}","media":{{"payload":"{payload}"}}}}')
        await self._send(f'{{"event":"mark","streamSid":"{self.stream}","mark":{{"name":"{name}"}}}}')
        self.calls.obs.media_audio_out.inc(len(data) / pcm.RATE)
        if self.heard_end is not None:
            self.turn.first_audio = time.monotonic() - self.heard_end
            self.calls.obs.media_first_audio.observe(self.turn.first_audio)
            self.heard_end = None

    async def _reply_done(self) -> None:
        """The model's reply is complete: send its last short frame, then close the turn once it has played."""
        for item, rest in list(self.rest.items()):
            if rest:
                await self._frames(item, pcm.pad(bytes(rest)))
        self.rest.clear()
        self.count += 1
        name = f"end{self.count}"  # echoed once everything before it has played
        self.marks[name] = ("", 0)
        await self._send(f'{{"event":"mark","streamSid":"{self.stream}","mark":{{"name":"{name}"}}}}')
        if self.turn is not None:
            self.turn.done = True
        if self.end_at and self.replies >= self.end_at:  # the goodbye after a hang-up or transfer tool
            self.end_at = 0
            self.calls.background(self._end_after_goodbye(name))

    async def _echoed(self, name: str) -> None:
        """Twilio played the audio before this mark (a mark flushed by `clear` is no longer ours)."""
        if (mark := self.marks.pop(name, None)) is None:
            return
        item, size = mark
        turn = self.turn
        if item and turn is not None and item in turn.sent:
            turn.heard[item] = turn.heard.get(item, 0) + size
        elif not item and turn is not None and turn.done and not self._playing():
            await self._finish_turn()

    def _playing(self) -> bool:
        return any(item for item, _ in self.marks.values())

    async def _barge_in(self) -> None:
        """The caller speaks over the reply: stop the audio and cut the model's reply at what was heard."""
        for _ in range(3):  # let the reader take the mark echoes already received: they were played
            await asyncio.sleep(0)
        turn = self.turn
        if turn is None or not self._playing():
            return
        await self._send(f'{{"event":"clear","streamSid":"{self.stream}"}}')
        self.marks.clear()  # what Twilio echoes now was flushed, not played
        self.rest.clear()
        self.muted = True  # the interrupted reply's audio still on its way is not played, until the caller is done
        self.calls.obs.media_interruptions.inc()
        if self.model is not None:
            for item in turn.items:
                if (heard := turn.heard.get(item, 0)) < turn.sent[item]:
                    await self.model.truncate(item, pcm.milliseconds(bytes(heard)) if heard else 0)
        log.info("media interrupted", extra={"call": self.sid, "heard_ms": sum(turn.heard.values()) // 8})
        await self._finish_turn()

    async def _finish_turn(self) -> None:
        """Move the current exchange into the session's history with what the caller heard."""
        turn, self.turn = self.turn, None
        if turn is None or not self.sid:
            return
        said, whole = turn.said()
        usage, self.unbilled = self.unbilled, Usage()
        user = " ".join(turn.user) or (SILENT if turn.silent else UNHEARD)
        served = [Segment(text=said)] if said else []
        try:
            async with self.lock:
                snap = await self.calls.begin(self.sid)
                if (session := snap.session) is None or session.stream != self.stream:  # ended, or taken over
                    await self.calls.release(self.sid, snap.token)
                    return
                session.current = Turn(id=new_turn_id(), user=user, keys=[], started=turn.started)
                session.turns += 1
                self.calls.obs.turn_timed(self.sid, session.turns, first_audio=turn.first_audio)
                end = end_of_turn(speech_key(self.media.model.name), usage)  # priced at the model's rates
                record = self.calls.close_turn(session, [*served, end], interrupted=not whole)
                await self.calls.commit(self.sid, snap.token, session, turn_changed=True)
        except Exception as e:  # the caller heard the reply; only its place in history is lost
            log.error("turn not stored", extra={"call": self.sid, "error": str(e) or repr(e)})
            return
        if record is not None:
            await self.turn_closed(record, session)

    # -- misses

    def _heard_caller(self) -> None:
        """The caller spoke or pressed a key: the misses start again."""
        self.misses, self.reprompt = 0, False
        if self.turn is not None:  # (a reprompt whose last mark is still on its way: the caller's words join it)
            self.turn.silent = False

    async def _silent(self) -> None:
        """The model's idle timeout ran out: a miss. The model may reprompt; at MAX_MISSES in a row the socket
        closes and the action URL says the goodbye in the call's voice, as Gather mode does."""
        self.misses += 1
        self.reprompt = True
        log.info("caller silent", extra={"call": self.sid, "misses": self.misses})
        if self.misses >= self.settings.max_misses and not self.done.is_set():
            self.muted = True  # the reprompt the model starts now is not played: the goodbye is the last word
            await self._end("goodbye")

    # -- tools, digits, ending

    async def _tool(self, request: ToolCall) -> None:
        result = await self.calls.run_tool(request, self.call)
        if result.action is not None:  # the socket closes after the goodbye: the reply after this tool's output
            action = result.action
            self.ending = "hangup" if action.kind == "hangup" else f"dial:{action.number}|{action.caller_id}"
            self.end_at = self.replies + 2  # (this reply, which called the tool, ends first)
            self.deadline = self.deadline or self.calls.background(self._end_later(GOODBYE_LIMIT))
        if self.model is not None:
            await self.model.tool_result(request.id, result.content)

    async def _end_after_goodbye(self, mark: str) -> None:
        """Close the socket once the goodbye has played (its mark echoed), or after a bounded wait."""
        unplayed = sum(size for _, size in self.marks.values()) / pcm.RATE
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(unplayed + GOODBYE_WAIT):
                while mark in self.marks:
                    await asyncio.sleep(0.02)
        await self._end(self.ending)

    async def _end_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not self.done.is_set():
            await self._end(self.ending)

    async def _end(self, why: str) -> None:
        """Store why we close the socket (Twilio's action request may not say), then close it."""
        await self._finish_turn()
        async with self.lock:
            snap = await self.calls.begin(self.sid)
            if snap.session is not None and snap.session.stream == self.stream:
                snap.session.ending = why
                await self.calls.commit(self.sid, snap.token, snap.session)
            else:
                await self.calls.release(self.sid, snap.token)
        self.done.set()

    def _heard_audio(self, payload: str) -> None:
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            log.warning("media frame is not base64", extra={"call": self.sid})
            return
        self.calls.obs.media_audio_in.inc(len(data) / pcm.RATE)
        if self.pcm16:
            data = pcm.ulaw_to_pcm16(data)
        if self.model is not None:
            self.model.send_audio(data)
        else:  # the model session is (re)opening: keep the caller's words for it, up to EARLY_LIMIT
            self.early += data
            del self.early[: -EARLY_LIMIT * (2 if self.pcm16 else 1)]

    async def _keyed(self, digits: str) -> None:
        self._heard_caller()
        if self.model is not None:
            log.info("media digits", extra={"call": self.sid, "count": len(digits)})
            self.turn = self.turn or Exchange()
            self.turn.user.append(f"(pressed {' '.join(digits)})")
            await self.model.send_text(f"(The caller pressed {' '.join(digits)} on the keypad.)")

    async def hand_over(self) -> None:
        """This replica is going away: let the reply being played finish (bounded), then ask for a reconnect."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.drain_seconds):
                while self._playing():
                    await asyncio.sleep(0.05)
        await self._end("reconnect")


# ----------------------------------------------------------------------------- the routes


class MediaMode:
    """Media Streams mode: the <Connect><Stream> document, the media socket and its action callback."""

    def __init__(self, calls: Calls) -> None:
        self.calls, self.settings, self.model = calls, calls.settings, calls.speech
        model = calls.speech
        self.live: dict[str, Bridge] = {}  # stream id -> its socket on this replica
        self.gate: Gate | None = None
        calls.on_drain(self.drain)
        calls.backend.on_cancel(self._taken_over)
        if model.audio_format not in ("pcmu", "pcm16"):
            raise ConfigError(
                f"SPEECH_MODEL={model.name} speaks {model.audio_format!r}; the core converts only "
                "pcmu (8 kHz μ-law) and pcm16 (8 kHz)"
            )

    def _taken_over(self, stream: str) -> None:
        """Another `start` for this call (on any replica) took it over: close ours without writing."""
        if (bridge := self.live.pop(stream, None)) is not None:
            bridge.superseded = True
            bridge.done.set()

    async def drain(self) -> None:
        """This replica is going away: each socket finishes its reply, then asks Twilio to reconnect."""
        if self.live:
            log.info("media draining", extra={"sockets": len(self.live)})
            await asyncio.gather(*(b.hand_over() for b in list(self.live.values())), return_exceptions=True)

    def routes(self, gate: Gate) -> list[Any]:
        """`/media-action`, `/media-status` (signed webhooks) and `WS /media` (a signed upgrade)."""
        self.gate = gate

        async def status(form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
            if form.stream_event == "stream-error":
                log.warning("media stream failed", extra={"call": form.call_sid, "error": form.stream_error[:300]})
            else:
                log.info("media stream", extra={"call": form.call_sid, "event": form.stream_event[:40]})
            return document("")

        @asgi(STREAM_PATH, copy_scope=False, name=STREAM_PATH)
        async def socket(scope: Scope, receive: Receive, send: Send) -> None:
            if not await gate.upgrade(scope, receive, send, STREAM_PATH):
                return
            bridge = Bridge(self, send)
            try:
                await bridge.run(receive)
            finally:
                if self.live.get(bridge.stream) is bridge:
                    del self.live[bridge.stream]

        return [webhook(ACTION_PATH, gate, self.action), webhook(STATUS_PATH, gate, status), socket]

    def connect(self, base_url: str, *, attempt: int) -> str:
        """<Connect action><Stream url=wss://…/media statusCallback><Parameter/></Stream></Connect>."""
        url = socket_url(base_url, STREAM_PATH)
        return (
            f'<Connect action="{ACTION_PATH}"><Stream url="{esc(url)}" statusCallback="{STATUS_PATH}">'
            f'<Parameter name="attempt" value="{attempt}"/></Stream></Connect>'
        )

    async def voice(self, form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        """An incoming call (MODE=media, or ?mode=media): the greeting in the call's voice, then the stream."""
        await self.calls.open_call(form)
        greeting = verb(await self.calls.phrase(self.settings.greeting, base_url))
        return document(greeting + self.connect(base_url, attempt=1))

    async def action(self, form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        """The <Connect action> callback: hang up, say goodbye, transfer, apologise, or open a new stream."""
        sid = form.call_sid
        if form.call_status in TERMINAL_STATUSES:
            await self.calls.end_call(sid, form.call_status)
            return document("")
        what, number, caller_id, attempt = await self.conclude(sid)
        if what == "hangup":
            return document("<Hangup/>")
        if what == "goodbye":  # the caller stayed silent MAX_MISSES times in a row
            return hang_up_after(await self.calls.phrase(self.settings.goodbye, base_url))
        if what == "dial":
            notice = verb(await self.calls.phrase(self.settings.transferring, base_url))  # in the call's voice
            return document(notice + verb(Segment(kind="dial", number=number, caller_id=caller_id)))
        if what == "failed":
            apology = verb(await self.calls.phrase(self.settings.apology, base_url))
            return document(apology + (f"<Dial>{esc(number)}</Dial>" if number else "<Hangup/>"))
        return document(self.connect(base_url, attempt=attempt))

    async def conclude(self, sid: str) -> tuple[str, str, str, int]:
        """A stream closed: read (and clear) why, end the call if it is over, and say what comes next:
        ("hangup" | "goodbye" | "dial" | "failed" | "reconnect", number to dial, its caller ID, the next stream's
        attempt)."""
        snap = await self.calls.begin(sid)
        session = snap.session
        why, streams = (session.ending, session.streams) if session is not None else ("", [])
        if session is not None:
            session.ending = ""
            await self.calls.commit(sid, snap.token, session)
        else:
            await self.calls.release(sid, snap.token)
        if why in ("hangup", "goodbye"):
            await self.calls.end_call(sid, "completed")
            return why, "", "", 0
        if why.startswith("dial:"):
            number, _, caller_id = why[5:].partition("|")
            await self.calls.end_call(sid, "handoff")
            return "dial", number, caller_id, 0
        failing = len(streams) >= MAX_FAILURES and streams[-1] - streams[-MAX_FAILURES] < QUICK_FAILURE
        if why == "failed" or (not why and failing):
            log.warning("media stream failed", extra={"call": sid, "streams": len(streams), "why": why or "dropped"})
            await self.calls.end_call(sid, "failed")
            return "failed", self.settings.fallback_number, "", 0
        log.info("media reconnecting", extra={"call": sid, "why": why or "dropped"})
        return "reconnect", "", "", len(streams) + 1
