"""ConversationRelay mode: Twilio listens and speaks, switchboard exchanges text with it over a WebSocket.

`/voice` (MODE=relay, or `?mode=relay` on a number's webhook URL) answers
`<Connect action="/relay-action"><ConversationRelay url="wss://host/relay" .../></Connect>`. Twilio
opens `WS /relay` (a signed upgrade), sends `setup`, then the caller's words as `prompt`s; the model's
tokens go back as `text` messages the moment they exist. An `interrupt` cancels the reply and trims
the stored turn to what the caller heard. Calls live in the session backend, so when a socket drops,
the `<Connect action>` callback can reconnect the call on any replica and carry on with its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import msgspec
from litestar import asgi

from calls import Calls, Keypad, end_of_turn, new_turn_id
from contract import (
    END,
    TERMINAL_STATUSES,
    CallInfo,
    ConfigError,
    Message,
    ProviderError,
    Segment,
    Turn,
    TwilioForm,
    Usage,
    log,
)
from speech import TokenCleaner
from twiml import document, esc, verb
from webhooks import CALL_SID, Gate, Receive, Scope, Send, socket_url, webhook

RELAY_PATH, ACTION_PATH = "/relay", "/relay-action"
QUEUE = 32  # messages waiting for a slow socket before tokens coalesce
SETUP_WAIT = 10.0  # seconds Twilio has to send `setup` after the upgrade
MAX_RETRIES = 3  # reconnects in a row of sessions that failed within QUICK_FAILURE seconds
QUICK_FAILURE = 30.0
HANDOFF = "live-agent-handoff"
RECONNECT = "reconnect"  # handoff reason when this replica is going away: the callback opens a new socket
INTERRUPTIBLE = ("any", "speech", "dtmf", "none", "true", "false")


# ----------------------------------------------------------------------------- messages


class Inbound(msgspec.Struct, kw_only=True, rename="camel"):
    """Any message Twilio sends on the socket; `type` says which fields matter."""

    type: str = ""
    call_sid: str = ""
    caller: str = msgspec.field(default="", name="from")
    to: str = ""
    custom_parameters: dict[str, Any] = {}
    voice_prompt: str = ""
    last: bool = True
    utterance_until_interrupt: str = ""
    duration_until_interrupt_ms: int | float | str | None = None
    digit: str = ""
    description: str = ""
    name: str = ""


class Text(msgspec.Struct, tag_field="type", tag="text"):
    """A piece of the reply for Twilio to speak; `last` closes the talk cycle."""

    token: str
    last: bool = False


class End(msgspec.Struct, tag_field="type", tag="end", rename="camel", omit_defaults=True):
    """End the session; Twilio passes handoffData (a JSON string) to the <Connect action> URL."""

    handoff_data: str = ""


inbound = msgspec.json.Decoder(Inbound, strict=False)
outbound = msgspec.json.Encoder()


def milliseconds(value: int | float | str | None) -> float | None:
    """durationUntilInterruptMs as Twilio sends it: an int, a float or a numeric string."""
    try:
        return float(value) if value is not None and value != "" else None
    except ValueError:
        return None


def merge_prompt(partial: str, text: str) -> str:
    """Join a final prompt to earlier partial ones (whether Twilio sends them cumulative or as pieces)."""
    if not partial or text.startswith(partial):
        return text
    return f"{partial} {text}" if text else partial


# ----------------------------------------------------------------------------- the outbox


class Outbox:
    """Messages on their way to Twilio. Bounded: when the socket falls behind, text tokens coalesce."""

    def __init__(self, limit: int = QUEUE) -> None:
        self.items: deque[Text | End] = deque()
        self.limit = limit
        self.ready = asyncio.Event()
        self.coalesced = 0

    def text(self, token: str) -> None:
        """Queue a token, or append it to the last queued one when the queue is full."""
        tail = self.items[-1] if self.items else None
        if len(self.items) >= self.limit and isinstance(tail, Text) and not tail.last:
            tail.token += token
            self.coalesced += 1
        else:
            self.items.append(Text(token))
        self.ready.set()

    def finish(self) -> None:
        """Close the talk cycle: mark the last queued token, or send an empty last one."""
        tail = self.items[-1] if self.items else None
        if isinstance(tail, Text) and not tail.last:
            tail.last = True
        else:
            self.items.append(Text("", last=True))
        self.ready.set()

    def end(self, handoff: dict[str, str] | None = None) -> None:
        """Queue the end of the session."""
        self.items.append(End(handoff_data=outbound.encode(handoff).decode() if handoff else ""))
        self.ready.set()

    def clear(self) -> None:
        """Drop what has not left yet (the caller interrupted it)."""
        self.items.clear()

    async def next(self) -> Text | End:
        """The next message to send."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


# ----------------------------------------------------------------------------- one socket


class Conversation:
    """One ConversationRelay socket: the call's turns, streamed replies, interruptions and digits."""

    def __init__(self, relay: Relay, send: Send) -> None:
        self.relay, self.calls, self.settings = relay, relay.calls, relay.settings
        self.send = send
        self.sid = ""
        self.call = CallInfo(call_sid="")
        self.outbox = Outbox()
        self.reply: asyncio.Task[None] | None = None
        self.turn = ""  # the latest turn's id
        self.closed_turn = ""  # the latest turn already moved into history
        self.sent: list[str] = []  # what the latest turn has sent so far
        self.gap = False  # the next text needs a space before it (after a filler)
        self.partial = ""
        self.keypad = Keypad(relay.dtmf_wait, self._paused)
        self.lock = asyncio.Lock()  # one backend transition at a time per socket
        self.ended = False
        self.started = time.monotonic()
        self.turns = 0

    # -- the socket

    async def run(self, receive: Receive) -> None:
        """Read Twilio's messages until the socket closes."""
        writer = asyncio.create_task(self._write())
        code: Any = None
        try:
            try:
                async with asyncio.timeout(SETUP_WAIT):
                    while not self.sid:
                        message = await receive()
                        if message["type"] == "websocket.disconnect":
                            return
                        if (m := self._decode(message)) is not None:
                            await self._setup(m)
            except TimeoutError:
                log.warning("relay setup never came", extra={"route": RELAY_PATH})
                with contextlib.suppress(Exception):
                    await self.send({"type": "websocket.close", "code": 1008})
                return
            except Exception:  # the backend is down: close, so Twilio calls the action URL (which retries)
                log.exception("relay setup failed", extra={"call": self.sid, "route": RELAY_PATH})
                with contextlib.suppress(Exception):
                    await self.send({"type": "websocket.close", "code": 1011})
                return
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    code = message.get("code")
                    break
                if (m := self._decode(message)) is not None:
                    await self._handle(m)
        finally:
            await self._hang_up()
            writer.cancel()
            await asyncio.wait([writer])
            if self.sid:
                seconds = round(time.monotonic() - self.started, 1)
                log.info(
                    "relay closed",
                    extra={
                        "call": self.sid,
                        "code": code,
                        "turns": self.turns,
                        "seconds": seconds,
                        "coalesced": self.outbox.coalesced,
                    },
                )

    async def hand_over(self) -> None:
        """Finish the reply being spoken (within DRAIN_SECONDS), then end the session with a reconnect."""
        if self.reply is not None and not self.reply.done():
            await asyncio.wait([self.reply], timeout=self.settings.drain_seconds)
        if not self.ended and self.sid:
            self.ended = True
            self.outbox.end({"reasonCode": RECONNECT, "reason": "this server is restarting"})
            while self.outbox.items:  # until the writer has sent it
                await asyncio.sleep(0.01)

    async def _write(self) -> None:
        send = self.send
        try:
            while True:
                await send({"type": "websocket.send", "text": outbound.encode(await self.outbox.next()).decode()})
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket is gone; the receive loop sees the disconnect
            return

    def _decode(self, message: dict[str, Any]) -> Inbound | None:
        raw = message.get("text")
        if raw is None:
            raw = (message.get("bytes") or b"").decode("utf-8", "replace")
        try:
            return inbound.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("unreadable relay message", extra={"call": self.sid, "error": str(e)})
            return None

    async def _setup(self, m: Inbound) -> None:
        if m.type != "setup":
            log.warning("relay message before setup ignored", extra={"type": m.type})
            return
        if not CALL_SID.fullmatch(m.call_sid):
            log.warning("relay setup without a valid callSid", extra={"route": RELAY_PATH})
            return
        self.sid = m.call_sid
        self.call = CallInfo(call_sid=m.call_sid, caller=m.caller, to=m.to)
        async with self.lock:
            snap = await self.calls.begin(self.sid)
            session = snap.session or self.calls.new_session(self.sid, m.caller, m.to)
            stale = session.current is not None
            self.calls.close_turn(session, [])  # a turn left open by a lost socket keeps its question
            await self.calls.commit(self.sid, snap.token, session, turn_changed=stale)
        attempt = str(m.custom_parameters.get("attempt", "1"))
        log.info("relay connected", extra={"call": self.sid, "attempt": attempt, "history": len(session.history)})

    async def _handle(self, m: Inbound) -> None:
        try:
            if m.type == "prompt":
                await self._prompt(m)
            elif m.type == "interrupt":
                await self._interrupt(m)
            elif m.type == "dtmf":
                if digits := self.keypad.press(m.digit):
                    await self._keyed(digits)
            elif m.type == "error":
                log.warning("twilio relay error", extra={"call": self.sid, "error": m.description})
            elif m.type == "info":
                log.debug("relay info", extra={"call": self.sid, "name": m.name})
            else:
                log.debug("relay message ignored", extra={"call": self.sid, "type": m.type})
        except Exception:  # the backend or a plugin failed: say so rather than go quiet
            self._apologise(m.type)

    def _apologise(self, what: str) -> None:
        log.exception("relay message failed", extra={"call": self.sid, "type": what})
        self.outbox.text(self.settings.apology)
        self.outbox.finish()

    # -- what Twilio tells us

    async def _prompt(self, m: Inbound) -> None:
        if not m.last:
            self.partial = merge_prompt(self.partial, m.voice_prompt)
            return
        text = " ".join(merge_prompt(self.partial, m.voice_prompt).split())[: self.settings.max_speech_chars]
        self.partial = ""
        if text:
            await self._answer(text)

    async def _paused(self, digits: str) -> None:
        try:  # (a task of its own: a failure is said here)
            await self._keyed(digits)
        except Exception:
            self._apologise("dtmf")

    async def _keyed(self, digits: str) -> None:
        log.info("relay digits", extra={"call": self.sid, "count": len(digits)})
        await self._answer(f"(The caller pressed {' '.join(digits)} on the keypad.)")

    async def _interrupt(self, m: Inbound) -> None:
        heard = " ".join(m.utterance_until_interrupt.split())
        running = await self._cancel()
        self.outbox.clear()
        turn, self.turn = self.turn, ""  # the talk cycle is over: a second interrupt has nothing to trim
        trimmed = await self._trim(turn, heard) if turn else False
        log.info(
            "relay interrupted",
            extra={
                "call": self.sid,
                "turn": self.turns,
                "generating": running,
                "trimmed": trimmed,
                "heard_chars": len(heard),
                "after_ms": milliseconds(m.duration_until_interrupt_ms),
            },
        )

    # -- turns

    async def _answer(self, text: str) -> None:
        """A new caller turn: stop any reply still running, open the turn, stream the model's answer."""
        if self.ended:
            return
        if await self._cancel():
            await self._record(self.turn, "".join(self.sent).strip(), complete=False)
        turn = Turn(id=new_turn_id(), user=text, keys=[], started=time.time())
        async with self.lock:
            snap = await self.calls.begin(self.sid)
            session = snap.session or self.calls.new_session(self.sid)
            self.calls.close_turn(session, [])
            session.current, session.turns, session.misses = turn, session.turns + 1, 0
            await self.calls.commit(self.sid, snap.token, session, turn_changed=True)
        self.turn, self.sent, self.gap, self.turns = turn.id, [], False, session.turns
        messages = [*session.history, Message(role="user", content=text)]
        self.reply = self.calls.background(self._generate(turn, messages, session.turns))

    def _say(self, text: str) -> None:
        if self.gap and text and not text[0].isspace():
            text = " " + text
        self.gap = False
        self.sent.append(text)
        self.outbox.text(text)

    def _filler(self, turn: str) -> None:
        if self.turn == turn and not self.sent:
            self._say(self.settings.filler)
            self.gap = True

    async def _generate(self, turn: Turn, messages: list[Message], number: int) -> None:
        """Stream the model's reply to the socket token by token; on failure, apologise (and hand off)."""
        s, sid = self.settings, self.sid
        served: list[str] = []
        usage, cleaner, spoken, handoff = Usage(), TokenCleaner(), 0, False
        action: Segment | None = None  # a tool's hang-up or transfer, after the reply
        t0, first = time.monotonic(), None
        filler = asyncio.get_running_loop().call_later(s.first_audio_deadline, self._filler, turn.id)
        try:
            async with asyncio.timeout(s.llm_total_timeout):
                async with contextlib.aclosing(self.calls.reply(messages, call=self.call, served=served)) as events:
                    async for event in events:
                        if isinstance(event, Segment):
                            action = event
                        elif isinstance(event, Usage):
                            usage += event
                        elif isinstance(event, str) and (text := cleaner.feed(event)):
                            if spoken + len(text) > s.max_reply_chars:  # MAX_REPLY_CHARS: stop before, not after
                                break
                            if first is None:
                                filler.cancel()
                                first = time.monotonic()
                            self._say(text)
                            spoken += len(text)
                    else:
                        if (text := cleaner.flush()) and spoken + len(text) <= s.max_reply_chars:
                            self._say(text)
                            spoken += len(text)
                if not spoken and action is not None:
                    self._say(s.farewell if action.kind == "hangup" else s.transferring)
                elif not spoken:
                    raise ProviderError("the model said nothing speakable", provider=(served or ["?"])[-1])
        except Exception as e:  # a vendor failure, a timeout or a plugin bug: the caller hears an apology
            filler.cancel()
            what = {TimeoutError: "reply timed out", ProviderError: "provider error"}.get(type(e), "generation failed")
            bug = not isinstance(e, (ProviderError, TimeoutError))
            log.error(
                what,
                extra={
                    "call": sid,
                    "turn": number,
                    "provider": served[-1] if served else "none",
                    "error": str(e) or repr(e),
                },
                exc_info=bug,
            )
            self.gap = bool(self.sent)
            self._say(s.apology)
            handoff = bool(s.fallback_number)
        finally:
            filler.cancel()
        self.outbox.finish()
        if handoff:
            self.ended = True
            self.outbox.end({"reasonCode": HANDOFF, "reason": "the assistant could not answer"})
        elif action is not None:  # end_call: a plain end, then <Hangup/>; transfer_call: a handoff, then <Dial>
            self.ended = True
            self.outbox.end(
                {
                    "reasonCode": HANDOFF,
                    "reason": "the caller asked for a person",
                    "number": action.number,
                    "callerId": action.caller_id,
                }
                if action.kind == "dial"
                else None
            )
        provider = served[-1] if served else ""
        end = end_of_turn(provider, usage)
        try:
            await asyncio.shield(self._record(turn.id, "".join(self.sent).strip(), complete=True, end=end))
        except Exception as e:  # the caller heard the reply; only its place in history is lost
            log.error("turn not stored", extra={"call": sid, "turn": number, "error": str(e) or repr(e)})
        ms = round((time.monotonic() - t0) * 1000)
        ttft = round((first - t0) * 1000) if first is not None else None
        log.info(
            "turn generated",
            extra={
                "call": sid,
                "turn": number,
                "provider": provider,
                "chars": spoken,
                "ms": ms,
                "first_token_ms": ttft,
                "handoff": handoff,
            },
        )

    async def _cancel(self) -> bool:
        """Stop the reply being generated (its model stream is closed); True if one was running."""
        task, self.reply = self.reply, None
        if task is None or task.done():
            return False
        task.cancel()
        await asyncio.wait([task])
        return True

    async def _record(self, turn_id: str, said: str, *, complete: bool, end: Segment = END) -> None:
        """Move the turn into history with what was sent (complete) or what was cut off."""
        async with self.lock:
            snap = await self.calls.begin(self.sid)
            session = snap.session
            if session is None or session.current is None or session.current.id != turn_id:
                await self.calls.release(self.sid, snap.token)
                return
            segments = [Segment(text=said)] if said else []
            self.calls.close_turn(session, [*segments, end] if complete else segments)
            await self.calls.commit(self.sid, snap.token, session, turn_changed=True)
            self.closed_turn = turn_id

    async def _trim(self, turn_id: str, heard: str) -> bool:
        """Keep only what the caller heard of the turn's reply, marked as interrupted."""
        async with self.lock:
            snap = await self.calls.begin(self.sid)
            session = snap.session
            if session is None:
                await self.calls.release(self.sid, snap.token)
                return False
            current = session.current is not None and session.current.id == turn_id
            if current:
                self.calls.close_turn(session, [Segment(text=heard)] if heard else [])
                self.closed_turn = turn_id
            elif self.closed_turn == turn_id and session.history and session.history[-1].role == "assistant":
                if heard:
                    session.history[-1] = Message(role="assistant", content=heard, interrupted=True)
                else:
                    session.history.pop()
            else:
                await self.calls.release(self.sid, snap.token)
                return False
            await self.calls.commit(self.sid, snap.token, session, turn_changed=current)
            return True

    async def _hang_up(self) -> None:
        """The socket closed: stop everything; a reply cut off keeps what was sent, marked interrupted."""
        self.keypad.cancel()
        if await self._cancel() and self.sid:
            with contextlib.suppress(Exception):
                await self._record(self.turn, "".join(self.sent).strip(), complete=False)


# ----------------------------------------------------------------------------- the routes


class Relay:
    """ConversationRelay mode: the <Connect> document, the WebSocket and the <Connect action> callback."""

    def __init__(self, calls: Calls) -> None:
        self.calls, self.settings = calls, calls.settings
        settings = calls.settings
        self.interruptible = settings.get("RELAY_INTERRUPTIBLE", "any").lower()
        if self.interruptible not in INTERRUPTIBLE:
            raise ConfigError(
                f"RELAY_INTERRUPTIBLE={self.interruptible!r} is not valid: use one of {', '.join(INTERRUPTIBLE)}"
            )
        self.dtmf_wait = settings.number("RELAY_DTMF_WAIT", 1.5, inclusive=True, unit="seconds")
        self.reconnect_greeting = settings.get("RELAY_RECONNECT_GREETING", "Sorry, we were cut off. Please go on.")
        self.attrs = ""  # the voice's attributes, rendered once the voice is open
        self.gate: Gate | None = None
        self.open: set[Conversation] = set()
        calls.on_drain(self.drain)

    async def drain(self) -> None:
        """This replica is going away: let each socket finish its reply, then ask Twilio to reconnect."""
        if self.open:
            log.info("relay draining", extra={"sockets": len(self.open)})
            await asyncio.gather(*(c.hand_over() for c in list(self.open)), return_exceptions=True)

    def routes(self, gate: Gate) -> list[Any]:
        """`/relay-action` (a signed webhook) and `WS /relay` (a signed upgrade)."""
        self.gate = gate

        @asgi(RELAY_PATH, copy_scope=False, name=RELAY_PATH)
        async def socket(scope: Scope, receive: Receive, send: Send) -> None:
            await self.socket(scope, receive, send)

        return [webhook(ACTION_PATH, gate, self.action), socket]

    def connect(self, base_url: str, *, attempt: int, retries: int = 0, greeting: str = "") -> bytes:
        """<Connect action><ConversationRelay url=wss://…/relay …><Parameter/></ConversationRelay></Connect>."""
        if not self.attrs:
            s = self.settings
            attrs = {"language": s.language, "interruptible": self.interruptible, "dtmfDetection": "true"}
            attrs |= self.calls.voice.relay_attrs()
            self.attrs = "".join(f' {k}="{esc(str(v))}"' for k, v in attrs.items())
        url = socket_url(base_url, RELAY_PATH)
        action = ACTION_PATH + (f"?retries={retries}" if retries else "")
        welcome = f' welcomeGreeting="{esc(greeting)}"' if greeting else ""
        return document(
            f'<Connect action="{esc(action)}"><ConversationRelay url="{esc(url)}"{welcome}{self.attrs}>'
            f'<Parameter name="attempt" value="{attempt}"/></ConversationRelay></Connect>'
        )

    async def voice(self, form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        """An incoming call (MODE=relay, or ?mode=relay on the number's voice URL): a ConversationRelay."""
        await self.calls.open_call(form)
        return self.connect(base_url, attempt=1, greeting=self.settings.greeting)

    async def action(self, form: TwilioForm, base_url: str, query: dict[str, str]) -> bytes:
        """The <Connect action> callback: hand off, end the call's session, or reconnect the socket."""
        sid, status = form.call_sid, form.session_status
        try:
            handoff = msgspec.json.decode(form.handoff_data) if form.handoff_data else {}
        except msgspec.DecodeError:
            handoff = {}
        handoff = handoff if isinstance(handoff, dict) else {}
        if handoff.get("reasonCode") == RECONNECT:  # the replica that ended the session is restarting
            log.info("relay reconnecting", extra={"call": sid, "reason": "server restart"})
            return self.connect(base_url, attempt=1)
        if handoff.get("reasonCode") == HANDOFF:
            number = str(handoff.get("number") or self.settings.fallback_number)
            await self.calls.end_call(sid, "handoff")
            if number:
                return document(verb(Segment(kind="dial", number=number, caller_id=str(handoff.get("callerId") or ""))))
            return document(f"{verb(await self.calls.phrase(self.settings.apology, base_url))}<Hangup/>")
        if form.call_status in TERMINAL_STATUSES or status == "completed":
            await self.calls.end_call(sid, form.call_status if form.call_status in TERMINAL_STATUSES else "completed")
            return document("")
        if status == "ended":  # we ended the session without asking for a person
            await self.calls.end_call(sid, "ended")
            return document("<Hangup/>")
        try:
            quick = float(form.session_duration or 0) < QUICK_FAILURE
        except ValueError:
            quick = True
        previous = query.get("retries", "")  # our own count, from the action URL we wrote: ASCII digits
        count = int(previous) if previous.isascii() and previous.isdigit() and len(previous) < 4 else 0
        retries = count + 1 if quick else 1
        log.warning(
            "relay session failed",
            extra={"call": sid, "status": status or "?", "error": form.error_code, "retries": retries},
        )
        if retries > MAX_RETRIES:
            await self.calls.end_call(sid, "failed")
            apology = verb(await self.calls.phrase(self.settings.apology, base_url))
            number = self.settings.fallback_number
            return document(apology + (f"<Dial>{esc(number)}</Dial>" if number else "<Hangup/>"))
        return self.connect(base_url, attempt=retries + 1, retries=retries, greeting=self.reconnect_greeting)

    async def socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """WS /relay: check the upgrade's signature, then run the conversation."""
        assert self.gate is not None
        if not await self.gate.upgrade(scope, receive, send, RELAY_PATH):
            return
        conversation = Conversation(self, send)
        self.open.add(conversation)
        try:
            await conversation.run(receive)
        finally:
            self.open.discard(conversation)
