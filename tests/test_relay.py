"""ConversationRelay mode: the <Connect> document, the signed socket, streamed tokens, interruptions,
digits, degraded mode, reconnection (in one process and across processes) and the dev phone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
import pytest
import websockets
from conftest import (
    BASE,
    GATHER,
    GREETING,
    TOKEN,
    VOICE,
    Captured,
    ProviderError,
    Scripted,
    Twilio,
    concurrent,
    connect_doc,
    env,
    new_call_sid,
    plugin,
    running,
    scripted_app,
    server,
    tree,
    twiml,
    voice_attrs,
    words,
)
from litestar import Litestar
from twilio.twiml.voice_response import VoiceResponse

import main
import phone
import relay
import webhooks

ROOT = Path(__file__).resolve().parent.parent
WS_URL = BASE.replace("http://", "ws://") + "/relay"


# ----------------------------------------------------------------------------- Twilio's side of the socket


def setup_message(call_sid: str, **custom: str) -> dict[str, Any]:
    """The `setup` message as Twilio's documentation shows it."""
    return {
        "type": "setup",
        "sessionId": "VX" + secrets.token_hex(16),
        "accountSid": "AC" + "0" * 32,
        "parentCallSid": "",
        "callSid": call_sid,
        "from": "+15005550006",
        "to": "+15005550001",
        "forwardedFrom": "+15005550002",
        "callType": "PSTN",
        "callerName": "",
        "direction": "inbound",
        "callStatus": "RINGING",
        "customParameters": custom or {"attempt": "1"},
    }


def prompt(text: str, *, last: bool = True) -> dict[str, Any]:
    return {"type": "prompt", "voicePrompt": text, "lang": "en-US", "last": last}


def interrupt(heard: str, ms: Any = 460) -> dict[str, Any]:
    return {"type": "interrupt", "utteranceUntilInterrupt": heard, "durationUntilInterruptMs": ms}


def dtmf(digit: str) -> dict[str, Any]:
    return {"type": "dtmf", "digit": digit}


class Peer:
    """Twilio's side of a ConversationRelay socket; subclasses carry the frames."""

    received: list[tuple[float, dict[str, Any]]]  # (monotonic time, message) of everything received

    async def send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raise NotImplementedError

    async def reply(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every message up to the end of the talk cycle (a text with last=true, or an end)."""
        got: list[dict[str, Any]] = []
        while not got or not (got[-1].get("last") or got[-1]["type"] == "end"):
            got.append(await self.recv(timeout))
        if got[-1]["type"] == "text":  # an `end` may follow the last text at once
            with contextlib.suppress(TimeoutError):
                got.append(await self.recv(0.05))
        return got

    async def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever arrives within `seconds`."""
        got: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(await self.recv(seconds))
        return got


def text_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["token"] for m in messages if m["type"] == "text")


class AsgiPeer(Peer):
    """Drives the app's WS /relay in this event loop through raw ASGI messages (like uvicorn does)."""

    def __init__(
        self, app: Litestar, headers: dict[str, str], *, send_delay: float = 0.0, path: str = "/relay"
    ) -> None:
        self.app, self.send_delay = app, send_delay
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received = []
        self.accepted: bool | None = None
        self.scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": ("testserver.local", 80),
            "client": ("127.0.0.1", 50000),
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "subprotocols": [],
            "state": {},
            "headers": [(b"host", b"testserver.local")]
            + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "extensions": {},
        }
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> bool:
        async def receive() -> dict[str, Any]:
            return await self.to_app.get()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.send":
                if self.send_delay:
                    await asyncio.sleep(self.send_delay)  # a slow network: send() blocks like a full buffer
                self.received.append((time.monotonic(), json.loads(message["text"])))
            await self.from_app.put(message)

        self.task = asyncio.create_task(self.app(self.scope, receive, send))  # type: ignore[arg-type]
        await self.to_app.put({"type": "websocket.connect"})
        first = await asyncio.wait_for(self.from_app.get(), 5)
        self.accepted = first["type"] == "websocket.accept"
        return self.accepted

    async def send(self, message: dict[str, Any]) -> None:
        await self.to_app.put({"type": "websocket.receive", "text": json.dumps(message)})

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(self.from_app.get(), timeout)
            if message["type"] == "websocket.send":
                return json.loads(message["text"])
            if message["type"] == "websocket.close":
                raise ConnectionError(f"closed by the app: {message.get('code')}")

    async def close(self, code: int = 1000) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": code})
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


class WsPeer(Peer):
    """Twilio's side over a real WebSocket (the `websockets` client) to a real server process."""

    def __init__(self, connection: Any) -> None:
        self.ws = connection
        self.received = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.received.append((time.monotonic(), message))
        return message


def signed(url: str, token: str = TOKEN) -> dict[str, str]:
    return {"x-twilio-signature": webhooks.twilio_signature(token, url, [])}


@contextlib.asynccontextmanager
async def relay_call(
    app: Litestar, call_sid: str | None = None, **custom: str
) -> AsyncIterator[tuple[AsgiPeer, Twilio]]:
    """The app running; a call answered in relay mode; its socket open and set up."""
    async with concurrent(app) as client:
        twilio = Twilio(client, call_sid=call_sid)
        answer = await twilio.post("/voice?mode=relay", CallStatus="ringing")
        assert answer.status_code == 200, answer.text
        peer = AsgiPeer(app, signed(WS_URL))
        assert await peer.open()
        await peer.send(setup_message(twilio.call_sid, **custom))
        try:
            yield peer, twilio
        finally:
            if peer.task is not None and not peer.task.done():
                await peer.close()


def session_of(app: Litestar, call_sid: str) -> main.Session | None:
    call = app.state.calls.backend.calls.get(call_sid)
    return None if call is None or call.session is None else msgspec.msgpack.decode(call.session, type=main.Session)


def texts(*tokens: str, last_empty: bool = True) -> list[dict[str, Any]]:
    """The text messages of a reply streamed token by token."""
    out = [{"type": "text", "token": t, "last": False} for t in tokens]
    if last_empty:
        out.append({"type": "text", "token": "", "last": True})
    else:
        out[-1]["last"] = True
    return out


def streamed(got: list[dict[str, Any]]) -> list[str]:
    """The tokens of one talk cycle, checking that only the last message says last (it may be empty)."""
    assert all(m["type"] == "text" for m in got)
    assert [m["last"] for m in got] == [False] * (len(got) - 1) + [True]
    return [m["token"] for m in got if m["token"]]


# ----------------------------------------------------------------------------- smoke


async def test_a_relay_call_streams_the_reply_token_by_token() -> None:
    reply = "Hello there, how are you today?"
    model = Scripted(replies=[reply], gap=0.03)
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hi"))
        got = await peer.reply()
    assert got == texts(*words(reply))


# ----------------------------------------------------------------------------- the <Connect> document


async def test_voice_in_relay_mode_answers_connect_conversation_relay() -> None:
    app = main.create_app(env(MODE="relay"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        answer = await twilio.call()
    assert answer.headers["content-type"] == "text/xml"
    assert tree(answer.content) == connect_doc("ws://testserver.local/relay", **voice_attrs(app))
    assert session_of(app, twilio.call_sid) is not None  # the session exists before the socket opens


async def test_the_socket_url_is_the_public_wss_url_and_the_voice_supplies_its_attributes() -> None:
    class RelayVoice(main.TTSVoice):
        async def render(self, text: str, *, base_url: str) -> main.Segment:
            return main.Segment(text=text)

        def relay_attrs(self) -> dict[str, str]:
            return {"ttsProvider": "ElevenLabs", "voice": "UgBBYS2sOqTuMpoF3BR0"}

    for extra, headers in [
        ({"PUBLIC_URL": "https://agent.example.com"}, {}),
        ({}, {"x-forwarded-proto": "https", "x-forwarded-host": "agent.example.com"}),
    ]:
        app = main.create_app(
            env(MODE="relay", TTS_VOICE="eleven", **extra), plugins=[plugin(tts={"eleven": RelayVoice()})]
        )
        async with concurrent(app) as client:
            data = {"CallSid": new_call_sid(), "From": "+15005550006"}
            signature = webhooks.twilio_signature(TOKEN, "https://agent.example.com/voice?x=1", list(data.items()))
            answer = await client.post(
                "/voice?x=1",
                content=urlencode(data),
                headers={
                    "content-type": "application/x-www-form-urlencoded",
                    "x-twilio-signature": signature,
                    **headers,
                },
            )
        expected = connect_doc("wss://agent.example.com/relay", tts_provider="ElevenLabs", voice="UgBBYS2sOqTuMpoF3BR0")
        assert tree(answer.content) == expected, extra or headers


async def test_mode_is_overridable_per_number_on_the_voice_url() -> None:
    gather_app = main.create_app(env())
    relay_app = main.create_app(env(MODE="relay"))
    async with concurrent(gather_app) as g, concurrent(relay_app) as r:
        default_gather = await Twilio(g).post("/voice")
        relay_number = await Twilio(g).post("/voice?mode=relay")
        default_relay = await Twilio(r).post("/voice")
        gather_number = await Twilio(r).post("/voice?mode=gather")
        bogus = await Twilio(g).post("/voice?mode=webhook")
    greeting = twiml(lambda resp: resp.gather(**GATHER).say(GREETING, **VOICE))
    assert tree(default_gather.content) == tree(gather_number.content) == greeting
    expected = connect_doc("ws://testserver.local/relay", **voice_attrs(relay_app))
    assert tree(relay_number.content) == tree(default_relay.content) == expected
    assert (bogus.status_code, bogus.text) == (
        400,
        "400 mode='webhook' on the voice URL must be gather, relay or media\n",
    )


def test_relay_settings_are_checked_at_startup() -> None:
    with pytest.raises(main.ConfigError, match="RELAY_INTERRUPTIBLE='sometimes' is not valid"):
        main.create_app(env(RELAY_INTERRUPTIBLE="sometimes"))
    with pytest.raises(
        main.ConfigError, match="RELAY_DTMF_WAIT=.* is not valid: set it to a number of seconds at least 0"
    ):
        main.create_app(env(RELAY_DTMF_WAIT="soon"))


async def test_interruptible_is_configurable() -> None:
    app = main.create_app(env(MODE="relay", RELAY_INTERRUPTIBLE="speech"))
    async with concurrent(app) as client:
        answer = await Twilio(client).call()
    relay_noun = tree(answer.content)[3][0][3][0]
    assert relay_noun[0] == "ConversationRelay" and relay_noun[1]["interruptible"] == "speech"


# ----------------------------------------------------------------------------- streaming


async def test_tokens_leave_as_the_model_writes_them_in_order_untrimmed_the_last_flagged() -> None:
    reply = "Sure thing, here is   a spaced reply."
    model = Scripted(replies=[reply], gap=0.05)
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hi"))
        got = await peer.reply()
        times = [t for t, m in peer.received if m["token"]]
    tokens = words(reply)  # " " tokens inside the reply are whitespace runs: they collapse into the next word
    assert got == texts("Sure", " thing,", " here", " is", " a", " spaced", " reply.")
    assert "".join(tokens).split() == text_of(got).split()
    assert times[-1] - times[0] >= 0.05 * (len(tokens) - 2)  # streamed as written, not buffered
    session = session_of(app, twilio.call_sid)
    assert session is not None and session.history == [
        main.Message(role="user", content="hi"),
        main.Message(role="assistant", content="Sure thing, here is a spaced reply."),
    ]
    assert session.current is None and session.providers == ["scripted"]


async def test_markdown_is_cleaned_token_by_token_without_breaking_words() -> None:
    model = Scripted(replies=["**Sure**, see [the docs](https://example.com/x) or https://x.example now 🎉"], gap=0.0)
    app = scripted_app(model)
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("help"))
        got = await peer.reply()
    assert text_of(got) == "Sure, see the docs or now"
    assert got[-1]["last"] is True


async def test_history_the_model_sees_is_bounded_by_max_turns() -> None:
    model = Scripted(replies=["First answer.", "Second answer.", "Third answer.", "Fourth answer."])
    app = scripted_app(model, MAX_TURNS="2")
    async with relay_call(app) as (peer, _):
        for text in ["one", "two", "three", "four"]:
            await peer.send(prompt(text))
            await peer.reply()
    sent = [(m.role, m.content) for m in model.calls[-1]]
    assert sent == [
        ("user", "two"),
        ("assistant", "Second answer."),
        ("user", "three"),
        ("assistant", "Third answer."),
        ("user", "four"),
    ]


async def test_partial_prompts_are_answered_once_when_the_caller_finishes() -> None:
    model = Scripted(replies=["A table for two, done."])
    app = scripted_app(model)
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("I would like", last=False))
        await peer.send(prompt("I would like a table", last=False))
        assert await peer.quiet(0.1) == []
        await peer.send(prompt("I would like a table for two"))
        await peer.reply()
        await peer.send(prompt("for", last=False))  # fragments rather than cumulative text
        await peer.send(prompt("tonight"))
        await peer.reply()
    assert [m.content for m in model.calls[0]] == ["I would like a table for two"]
    assert model.calls[1][-1].content == "for tonight"


async def test_info_error_unknown_and_malformed_messages_do_not_disturb_the_call(logs: Captured) -> None:
    model = Scripted(replies=["Still here."])
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send({"type": "info", "name": "agentSpeaking", "value": "on", "ts": 1752091234567})
        await peer.send({"type": "error", "description": 'Invalid message received: { "foo" : "bar" }'})
        await peer.send({"type": "somethingNew", "payload": [1, 2]})
        await peer.to_app.put({"type": "websocket.receive", "text": "{not json"})
        await peer.send({"type": "prompt", "voicePrompt": ["not", "text"]})
        await peer.send(prompt("are you there"))
        got = await peer.reply()
    assert text_of(got) == "Still here."
    assert [m.content for m in model.calls[0]] == ["are you there"]
    sid = twilio.call_sid
    assert any(line.startswith(f"warning twilio relay error call={sid} error=Invalid message") for line in logs.lines)
    assert sum(line.startswith(f"warning unreadable relay message call={sid}") for line in logs.lines) == 2


# ----------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("ms", [460, 460.5, "460"])
async def test_an_interrupt_cancels_the_reply_and_the_model_later_knows_only_what_was_heard(ms: Any) -> None:
    model = Scripted(replies=["Life is a complex set of things we all share.", "Sure."], gap=0.1)
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("tell me about life"))
        first = [await peer.recv() for _ in range(3)]
        await peer.send(interrupt("Life is a", ms))
        late = await peer.quiet(0.35)  # at most a token already on its way; no more, and no last flag
        await peer.send(prompt("go on"))
        await peer.reply()
    assert text_of(first) == "Life is a"
    assert len(late) <= 1 and not any(m.get("last") for m in late)
    assert model.closed == 2  # the interrupted stream was closed, then the second reply's
    assert [(m.role, m.content, m.interrupted) for m in model.calls[1]] == [
        ("user", "tell me about life", False),
        ("assistant", "Life is a", True),
        ("user", "go on", False),
    ]


async def test_an_interrupt_after_the_reply_was_written_trims_the_stored_turn() -> None:
    model = Scripted(replies=["One two three four five six.", "Okay."])
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("count"))
        await peer.reply()  # all written; Twilio is still speaking it
        await peer.send(interrupt("One two three"))
        await peer.quiet(0.05)
        session = session_of(app, twilio.call_sid)
        await peer.send(interrupt(""))  # a second interrupt: nothing more to trim
        await peer.send(prompt("stop"))
        await peer.reply()
    assert session is not None and session.history[-1] == main.Message(
        role="assistant", content="One two three", interrupted=True
    )
    assert [(m.role, m.content) for m in model.calls[1]] == [
        ("user", "count"),
        ("assistant", "One two three"),
        ("user", "stop"),
    ]


async def test_an_interrupt_before_anything_was_heard_drops_the_reply_from_history() -> None:
    model = Scripted(replies=["Never heard.", "Fine."], ttft=0.3)
    app = scripted_app(model)
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("question"))
        await asyncio.sleep(0.05)
        await peer.send(interrupt("", 0))
        assert await peer.quiet(0.4) == []
        await peer.send(prompt("another"))
        await peer.reply()
    assert [(m.role, m.content) for m in model.calls[1]] == [("user", "question"), ("user", "another")]
    assert model.closed == 2


async def test_speech_during_a_reply_starts_a_new_turn_and_keeps_what_was_sent() -> None:
    model = Scripted(replies=["This is a long answer that goes on.", "New answer."], gap=0.1)
    app = scripted_app(model)
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("first"))
        await peer.recv()
        await peer.recv()
        await peer.send(prompt("second"))  # interruptible="none": no interrupt came first
        got = await peer.reply()
    assert text_of(got).endswith("New answer.")
    assert [(m.role, m.content, m.interrupted) for m in model.calls[1]] == [
        ("user", "first", False),
        ("assistant", "This is", True),
        ("user", "second", False),
    ]


# ----------------------------------------------------------------------------- digits


async def test_digits_are_answered_as_one_turn_at_the_pound_key_or_after_a_pause() -> None:
    model = Scripted(replies=["Got it.", "Thanks."])
    app = scripted_app(model, RELAY_DTMF_WAIT="0.2")
    async with relay_call(app) as (peer, _):
        for digit in "12#":
            await peer.send(dtmf(digit))
        first = await peer.reply()
        await peer.send(dtmf("4"))
        await peer.send(dtmf("x"))  # not a key: ignored
        await peer.send(dtmf("*"))
        t0 = time.monotonic()
        second = await peer.reply()
        waited = time.monotonic() - t0
    assert (text_of(first), text_of(second)) == ("Got it.", "Thanks.")
    assert model.calls[0][-1].content == "(The caller pressed 1 2 on the keypad.)"
    assert model.calls[1][-1].content == "(The caller pressed 4 * on the keypad.)"
    assert 0.2 <= waited < 1.0


# ----------------------------------------------------------------------------- signed upgrades


@pytest.mark.parametrize(
    "headers",
    [
        {},  # missing
        {"x-twilio-signature": "WRONG_SIGNATURE"},
        signed(WS_URL, token="not-the-token"),
        signed("http://testserver.local/relay"),  # the https/http URL instead of wss/ws
        signed("wss://testserver.local/relay"),  # the wrong scheme for a plain ws connection
        signed(WS_URL + "?extra=1"),
    ],
)
async def test_an_unsigned_or_badly_signed_upgrade_is_refused_before_accept(
    headers: dict[str, str], logs: Captured
) -> None:
    model = Scripted()
    app = scripted_app(model)
    async with concurrent(app):
        peer = AsgiPeer(app, headers)
        accepted = await peer.open()
        await asyncio.wait_for(peer.task, 5)  # type: ignore[arg-type]
    assert accepted is False and model.calls == []
    line = next(line for line in logs.lines if "relay" in line and "signature" in line.lower())
    assert "checked_url=ws://testserver.local/relay" in line and "PUBLIC_URL" in line
    assert TOKEN not in "\n".join(logs.lines)


async def test_the_upgrade_is_checked_against_the_public_wss_url() -> None:
    app = main.create_app(env(PUBLIC_URL="https://agent.example.com"))
    async with concurrent(app):
        good = AsgiPeer(app, signed("wss://agent.example.com/relay"))
        with_port = AsgiPeer(app, signed("wss://agent.example.com:443/relay"))
        plain = AsgiPeer(app, signed("https://agent.example.com/relay"))
        results = [await good.open(), await with_port.open(), await plain.open()]
        await good.close()
        await with_port.close()
    assert results == [True, True, False]


async def test_plain_http_on_the_socket_route_is_told_to_upgrade() -> None:
    app = main.create_app(env())
    async with concurrent(app) as client:
        response = await client.get("/relay")
    assert (response.status_code, response.text) == (426, "426 this route takes WebSocket upgrades only\n")


async def test_a_socket_that_never_sends_setup_is_closed(monkeypatch: pytest.MonkeyPatch, logs: Captured) -> None:
    monkeypatch.setattr(relay, "SETUP_WAIT", 0.2)
    app = main.create_app(env())
    async with concurrent(app):
        peer = AsgiPeer(app, signed(WS_URL))
        assert await peer.open()
        await peer.send(prompt("hello?"))  # before setup: ignored
        await peer.send(setup_message("not a call sid!"))
        with pytest.raises(ConnectionError, match="closed by the app: 1008"):
            await peer.recv(2)
        await peer.close()
    assert any(line.startswith("warning relay setup never came") for line in logs.lines)


# ----------------------------------------------------------------------------- degraded mode


async def test_a_stalled_model_gets_a_filler_then_the_apology_in_time() -> None:
    model = Scripted(replies=["Too late."], ttft=10)
    app = scripted_app(model, FIRST_AUDIO_DEADLINE="0.15", LLM_FIRST_TOKEN_TIMEOUT="0.4")
    settings = app.state.settings
    async with relay_call(app) as (peer, twilio):
        t0 = time.monotonic()
        await peer.send(prompt("hello"))
        got = await peer.reply(timeout=3)
        times = [t - t0 for t, _ in peer.received]
    assert got == texts(settings.filler, " " + settings.apology, last_empty=False)
    assert 0.15 <= times[0] < 0.35 and 0.4 <= times[1] < 0.7
    assert model.closed == 1  # the stalled stream was closed
    session = session_of(app, twilio.call_sid)
    assert session is not None and session.history[-1].content == f"{settings.filler} {settings.apology}"


async def test_a_reply_that_outlives_the_total_timeout_ends_with_the_apology() -> None:
    model = Scripted(replies=["Slow words never end"], gap=5)
    app = scripted_app(model, LLM_TOTAL_TIMEOUT="0.3")
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("hello"))
        got = await peer.reply(timeout=2)
    assert got == texts("Slow", " " + app.state.settings.apology, last_empty=False)
    assert model.closed == 1


async def test_the_next_provider_answers_when_the_first_fails() -> None:
    broken = Scripted("broken", fail=ProviderError("vendor down", provider="broken"))
    good = Scripted("good", replies=["From the backup."])
    app = main.create_app(env(LLM_PROVIDER="broken,good"), plugins=[plugin(llm=[broken, good])])
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hello"))
        got = await peer.reply()
    assert text_of(got) == "From the backup."
    session = session_of(app, twilio.call_sid)
    assert session is not None and session.providers == ["good"]


async def test_a_provider_failure_apologises_then_ends_with_a_handoff_that_dials_the_fallback(logs: Captured) -> None:
    model = Scripted(fail=ProviderError("vendor down", provider="scripted"))
    app = scripted_app(model, FALLBACK_NUMBER="+15005550009")
    apology = app.state.settings.apology
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hello"))
        got = await peer.reply()
        await peer.send(prompt("hello again"))  # after `end`, nothing more is answered
        assert await peer.quiet(0.1) == []
        handoff = got[-1]["handoffData"]
        callback = await twilio.post("/relay-action", SessionStatus="ended", SessionDuration="3", HandoffData=handoff)
    assert got == [
        {"type": "text", "token": apology, "last": True},
        {"type": "end", "handoffData": '{"reasonCode":"live-agent-handoff","reason":"the assistant could not answer"}'},
    ]
    assert tree(callback.content) == twiml(lambda r: r.dial("+15005550009"))
    assert session_of(app, twilio.call_sid) is None and len(model.calls) == 1
    assert any(line.startswith(f"info call ended call={twilio.call_sid} outcome=handoff") for line in logs.lines)


async def test_without_a_fallback_number_a_failure_apologises_and_keeps_listening() -> None:
    model = Scripted(replies=["", "Back again."])
    app = scripted_app(model)
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("hello"))
        first = await peer.reply()
        await peer.send(prompt("hello again"))
        second = await peer.reply()
    assert first == texts(app.state.settings.apology, last_empty=False)
    assert text_of(second) == "Back again."


# ----------------------------------------------------------------------------- the <Connect action> callback


async def test_the_callback_ends_the_session_when_the_caller_hangs_up(logs: Captured) -> None:
    model = Scripted(replies=["Bye."])
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("bye"))
        await peer.reply()
        await peer.close()
        callback = await twilio.post(
            "/relay-action", CallStatus="completed", SessionStatus="completed", SessionDuration="9"
        )
    assert tree(callback.content) == twiml(lambda r: None)
    assert session_of(app, twilio.call_sid) is None
    assert any(
        line.startswith(f"info call ended call={twilio.call_sid} outcome=completed turns=1") for line in logs.lines
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"SessionStatus": "ended", "HandoffData": '{"reasonCode":"live-agent-handoff","number":"+15005550010"}'},
            lambda r: r.dial("+15005550010"),
        ),
        (
            {"SessionStatus": "ended", "HandoffData": '{"reasonCode":"live-agent-handoff"}'},
            lambda r: (r.say("Sorry, I'm having trouble answering right now.", **VOICE), r.hangup()),
        ),
        ({"SessionStatus": "ended"}, lambda r: r.hangup()),
        ({"SessionStatus": "ended", "HandoffData": "not json"}, lambda r: r.hangup()),
        ({"SessionStatus": "completed", "CallStatus": "in-progress"}, lambda r: None),
        ({"CallStatus": "busy"}, lambda r: None),
    ],
)
async def test_callback_variants_end_the_session(params: dict[str, str], expected: Any) -> None:
    app = main.create_app(env(MODE="relay"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        callback = await twilio.post("/relay-action", **params)
    assert tree(callback.content) == twiml(expected)
    assert session_of(app, twilio.call_sid) is None


async def test_a_failed_session_reconnects_a_few_times_then_apologises() -> None:
    app = main.create_app(env(MODE="relay", FALLBACK_NUMBER="+15005550009"))
    lost = {
        "SessionStatus": "failed",
        "SessionDuration": "2",
        "ErrorCode": "39001",
        "ErrorMessage": "Network connection to WebSocket server failed.",
    }
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        first = await twilio.post("/relay-action", **lost)
        third = await twilio.post("/relay-action?retries=2", **lost)
        after_a_long_talk = await twilio.post("/relay-action?retries=3", **lost | {"SessionDuration": "300"})
        exists = session_of(app, twilio.call_sid) is not None
        gave_up = await twilio.post("/relay-action?retries=3", **lost)
    again = "Sorry, we were cut off. Please go on."
    url = "ws://testserver.local/relay"
    voice = voice_attrs(app)
    assert tree(first.content) == connect_doc(
        url, greeting=again, action="/relay-action?retries=1", attempt="2", **voice
    )
    assert tree(third.content) == connect_doc(
        url, greeting=again, action="/relay-action?retries=3", attempt="4", **voice
    )
    assert tree(after_a_long_talk.content) == tree(first.content)
    assert exists and session_of(app, twilio.call_sid) is None

    def apology_then_dial(r: VoiceResponse) -> None:
        r.say(app.state.settings.apology, **VOICE)
        r.dial("+15005550009")

    assert tree(gave_up.content) == twiml(apology_then_dial)


async def test_a_dropped_socket_reconnects_in_the_same_process_with_its_history() -> None:
    model = Scripted(
        replies=["Nice to meet you, Ada.", "This answer will be cut off by the drop.", "You are Ada."], gap=0.05
    )
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("my name is Ada"))
        await peer.reply()
        await peer.send(prompt("tell me a story"))
        await peer.recv()
        await peer.recv()
        await peer.close(1006)  # the network drops mid-reply
        callback = await twilio.post("/relay-action", SessionStatus="failed", SessionDuration="4", ErrorCode="39001")
        again = AsgiPeer(app, signed(WS_URL))
        assert await again.open()
        await again.send(setup_message(twilio.call_sid, attempt="2"))
        await again.send(prompt("who am I"))
        got = await again.reply()
        await again.close()
    assert tree(callback.content)[3][0][0] == "Connect"
    assert text_of(got) == "You are Ada."
    assert [(m.role, m.content, m.interrupted) for m in model.calls[-1]] == [
        ("user", "my name is Ada", False),
        ("assistant", "Nice to meet you, Ada.", False),
        ("user", "tell me a story", False),
        ("assistant", "This answer", True),
        ("user", "who am I", False),
    ]
    assert model.closed == 3


# ----------------------------------------------------------------------------- a slow socket


def test_the_outbox_is_bounded_and_coalesces_tokens_when_the_socket_falls_behind() -> None:
    box = relay.Outbox(limit=8)
    tokens = [f" w{i}" for i in range(10_000)]
    for token in tokens:
        box.text(token)
    box.finish()
    assert len(box.items) == 8 and box.coalesced == 10_000 - 8
    assert "".join(m.token for m in box.items) == "".join(tokens)  # type: ignore[union-attr]
    assert [m.last for m in box.items] == [False] * 7 + [True]  # type: ignore[union-attr]


async def test_a_slow_socket_gets_coalesced_tokens_not_a_growing_queue(logs: Captured) -> None:
    reply = " ".join(f"word{i}" for i in range(300))
    model = Scripted(replies=[reply], gap=0.0)
    app = scripted_app(model, MAX_REPLY_CHARS="5000")
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.post("/voice?mode=relay")
        peer = AsgiPeer(app, signed(WS_URL), send_delay=0.01)  # each send takes 10 ms
        assert await peer.open()
        await peer.send(setup_message(twilio.call_sid))
        await peer.send(prompt("talk a lot"))
        got = await peer.reply(timeout=10)
        await peer.close()
    assert text_of(got) == reply and got[-1]["last"] is True
    assert len(got) < 300 / 2  # far fewer messages than tokens
    closed = next(line for line in logs.lines if line.startswith("info relay closed"))
    assert int(closed.split("coalesced=")[1]) > 0


async def test_a_reply_stops_at_max_reply_chars_and_its_stream_is_closed() -> None:
    model = Scripted(replies=[" ".join(["blah"] * 100)])
    app = scripted_app(model, MAX_REPLY_CHARS="40")
    async with relay_call(app) as (peer, _):
        await peer.send(prompt("ramble"))
        got = await peer.reply()
    assert text_of(got) == " ".join(["blah"] * 8) and got[-1]["last"] is True
    assert model.closed == 1


# ----------------------------------------------------------------------------- logs


async def test_relay_logs_carry_the_call_sid_and_never_the_numbers_or_token(logs: Captured) -> None:
    model = Scripted(replies=["Hi.", "Cut"], gap=0.2)
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hello"))
        await peer.reply()
        await peer.send(prompt("again"))
        await peer.send(interrupt(""))
        await peer.send({"type": "error", "description": "oops"})
        await peer.close()
        await twilio.post("/relay-action", CallStatus="completed", SessionStatus="completed")
    sid = twilio.call_sid
    relay_lines = [line for line in logs.lines if not line.startswith(("info request ", "info switchboard "))]
    assert [line.split(" call=")[0] for line in relay_lines] == [
        "info relay connected",
        "info turn generated",
        "info relay interrupted",
        "warning twilio relay error",
        "info relay closed",
        "info call ended",
        "info call record",
    ]  # relay calls reach the recorders too
    assert all(f"call={sid}" in line for line in relay_lines)
    everything = "\n".join(logs.lines)
    assert TOKEN not in everything and "5005550006" not in everything and "5005550001" not in everything


# ----------------------------------------------------------------------------- real processes

RECALL = '''
import asyncio
from main import LLMProvider, ProviderError, hookimpl

class Recall(LLMProvider):
    """Repeats every caller turn it is shown, so a test can see the history a process holds."""
    name = "recall"
    def __init__(self, settings):
        self.gap = float(settings.get("RECALL_GAP", "0"))
        self.settings_fail = settings.get("RECALL_FAIL") == "1"
    async def stream(self, messages, *, system, tools=()):
        if self.settings_fail:
            raise ProviderError("recall is down", provider="recall")
        heard = " | ".join(m.content for m in messages if m.role == "user")
        for i, word in enumerate(f"I heard: {heard}.".split(" ")):
            yield word if i == 0 else " " + word
            await asyncio.sleep(self.gap)

@hookimpl
def register_llm_providers(register):
    register("recall", Recall)
'''


@pytest.fixture
def recall(tmp_path: Path) -> dict[str, str]:
    """Env for a server process whose model (an entry-point plugin) repeats the history it is given."""
    (tmp_path / "sb_recall.py").write_text(RECALL)
    dist = tmp_path / "sb_recall-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-recall\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nrecall = sb_recall\n")
    return {"PYTHONPATH": str(tmp_path), "LLM_PROVIDER": "recall"}


async def webhook_post(client: httpx.AsyncClient, url: str, call_sid: str, **params: str) -> httpx.Response:
    """A signed form POST to a real server, as Twilio sends it."""
    data = {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": call_sid,
        "From": "+15005550006",
        "To": "+15005550001",
        "CallStatus": "in-progress",
        **params,
    }
    signature = webhooks.twilio_signature(TOKEN, url, list(data.items()))
    return await client.post(url, data=data, headers={"x-twilio-signature": signature})


def relay_target(document: bytes, base: str) -> tuple[str, str]:
    """The socket URL and the action URL of a <Connect><ConversationRelay> document."""
    connect = __import__("xml.etree.ElementTree").etree.ElementTree.fromstring(document).find("Connect")
    assert connect is not None, document
    noun = connect.find("ConversationRelay")
    assert noun is not None
    return noun.get("url", ""), base + connect.get("action", "")


@contextlib.asynccontextmanager
async def ws_peer(url: str, call_sid: str, **custom: str) -> AsyncIterator[WsPeer]:
    async with websockets.connect(url, additional_headers=signed(url)) as ws:
        peer = WsPeer(ws)
        await peer.send(setup_message(call_sid, **custom))
        yield peer


async def test_the_procfile_server_takes_signed_relay_upgrades_and_streams() -> None:
    with server({"MODE": "relay"}) as (base, _proc, log_path):
        call_sid = new_call_sid()
        async with httpx.AsyncClient() as client:
            answer = await webhook_post(client, base + "/voice", call_sid, CallStatus="ringing")
            url, action = relay_target(answer.content, base)
            assert url == base.replace("http://", "ws://") + "/relay"
            async with ws_peer(url, call_sid) as peer:
                await peer.send(prompt("hello from a real socket"))
                got = await peer.reply()
                # the client offered permessage-deflate; tiny token frames are sent uncompressed
                assert peer.ws.response.headers.get("Sec-WebSocket-Extensions") is None
            for bad in [{}, signed(url, token="not-the-token"), signed(url.replace("ws://", "http://"))]:
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with websockets.connect(url, additional_headers=bad):
                        pass
                assert refused.value.response.status_code == 403
            callback = await webhook_post(client, action, call_sid, CallStatus="completed", SessionStatus="completed")
    assert streamed(got) == words("You said: hello from a real socket.")
    assert tree(callback.content) == twiml(lambda r: None)
    text = log_path.read_text()
    assert f"relay connected call={call_sid}" in text and f"call ended call={call_sid}" in text
    assert TOKEN not in text and "5005550006" not in text


async def test_a_call_reconnects_on_another_process_with_its_history(recall: dict[str, str]) -> None:
    prefix = "sb-relay-test-" + secrets.token_hex(6)
    shared = recall | {
        "SESSION_BACKEND": "valkey",
        "VALKEY_URL": "redis://127.0.0.1:6379/0",
        "VALKEY_PREFIX": prefix,
        "MODE": "relay",
        "RECALL_GAP": "0.05",
    }
    try:
        with server(shared) as (base_a, proc_a, _), server(shared) as (base_b, _proc_b, log_b):
            call_sid = new_call_sid()
            async with httpx.AsyncClient() as client:
                answer = await webhook_post(client, base_a + "/voice", call_sid, CallStatus="ringing")
                url_a, _ = relay_target(answer.content, base_a)
                async with ws_peer(url_a, call_sid) as peer:
                    await peer.send(prompt("my name is Ada"))
                    first = await peer.reply()
                    await peer.send(prompt("and I like tea"))
                    await peer.recv()
                    await peer.recv()
                    proc_a.terminate()  # the replica goes away mid-reply
                    proc_a.wait(15)
                # Twilio calls the <Connect action> URL; the load balancer picks the other replica
                callback = await webhook_post(
                    client,
                    base_b + "/relay-action",
                    call_sid,
                    SessionStatus="failed",
                    SessionDuration="3",
                    ErrorCode="39001",
                )
                url_b, _ = relay_target(callback.content, base_b)
                async with ws_peer(url_b, call_sid, attempt="2") as peer:
                    await peer.send(prompt("who am I"))
                    second = await peer.reply()
        assert text_of(first) == "I heard: my name is Ada."
        assert text_of(second) == "I heard: my name is Ada | and I like tea | who am I."
        assert f"relay connected call={call_sid} attempt=2 history=" in log_b.read_text()
    finally:
        import valkey

        store = valkey.Valkey.from_url("redis://127.0.0.1:6379/0")
        keys = list(store.scan_iter(f"{prefix}*"))
        if keys:
            store.delete(*keys)
        store.close()


async def test_the_dev_phone_drives_a_relay_call_in_the_terminal(recall: dict[str, str]) -> None:
    lines = iter(
        [
            ("hello from the dev phone", None),
            ("tell me more please", None),
            ("/interrupt", None),
            ("", None),
            ("12#", None),
            ("/bye", None),
        ]
    )
    printed: list[str] = []
    streamed: list[str] = []
    with server(recall | {"RECALL_GAP": "0.15"}) as (base, _proc, log_path):
        call = phone.Phone(
            base, TOKEN, out=printed.append, write=streamed.append, voice="/voice?mode=relay", typing=True
        )
        ended = await asyncio.to_thread(call.run, lines)
    assert ended == "completed"
    assert call.spoken == [
        GREETING,
        "I heard: hello from the dev phone.",
        "I heard: hello from the dev phone | tell me more please | (The caller pressed 1 2 on the keypad.).",
    ]
    interrupted = next(line for line in printed if "you interrupted after" in line)
    heard = interrupted.split("after: ")[1][1:-2]  # at least the first token; the model writes one per 150 ms
    assert heard and "I heard: hello from the dev phone | tell me more please.".startswith(heard)
    assert [path for path, _ in call.timings] == ["/voice?mode=relay", "/relay", "/relay-action", "/status"]
    assert "".join(streamed) == (  # in a terminal the reply overwrites the "you: " prompt, then shows it again
        f"\ragent: I heard: hello from the dev phone.\nyou: \ragent: {heard}\n"
        "\ragent: I heard: hello from the dev phone | tell me more please | (The caller pressed 1 2 on the keypad.).\n"
        "you: "
    )
    text = log_path.read_text()
    assert "relay interrupted" in text and "trimmed=True" in text and f"call ended call={call.call_sid}" in text


async def test_the_dev_phone_follows_a_handoff_to_the_connect_action_and_dials(recall: dict[str, str]) -> None:
    printed: list[str] = []

    def person() -> Any:
        yield "hello", None
        deadline = time.monotonic() + 10
        while not any("ended the session" in line for line in printed) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield "", None  # presses Enter, as the phone asks

    with server(recall | {"RECALL_FAIL": "1", "FALLBACK_NUMBER": "+15005550009", "MODE": "relay"}) as (base, _, _log):
        call = phone.Phone(base, TOKEN, out=printed.append, write=lambda _: None)
        ended = await asyncio.to_thread(call.run, person())
    assert ended == "completed"
    assert call.spoken == [GREETING, "Sorry, I'm having trouble answering right now."]
    assert "   (the agent ended the session, handing off; press Enter)" in printed
    assert "   (transferring the call to +15005550009)" in printed
    assert [path for path, _ in call.timings] == ["/voice", "/relay", "/relay-action", "/status"]


async def test_a_session_backend_outage_is_apologised_for_and_setup_failure_closes_the_socket(logs: Captured) -> None:
    from plugins.session_memory import MemoryBackend

    class Flaky(MemoryBackend):
        down = False

        async def begin(self, call_sid: str, keys: Any, ttl: float) -> Any:
            if self.down:
                raise main.BackendError("unreachable")
            return await super().begin(call_sid, keys, ttl)

    model = Scripted(replies=["Fine."])
    backend = Flaky(main.load_settings(env()))
    app = main.create_app(
        env(LLM_PROVIDER="scripted", SESSION_BACKEND="flaky"), plugins=[plugin(llm=[model], session={"flaky": backend})]
    )
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hello"))
        assert text_of(await peer.reply()) == "Fine."
        backend.down = True
        await peer.send(prompt("still there?"))
        got = await peer.reply()
        late = AsgiPeer(app, signed(WS_URL))
        assert await late.open()
        await late.send(setup_message(twilio.call_sid))
        with pytest.raises(ConnectionError, match="closed by the app: 1011"):
            await late.recv(3)
        await late.close()
    assert got == texts(app.state.settings.apology, last_empty=False)
    assert len(model.calls) == 1
    assert any(line.startswith(f"error relay message failed call={twilio.call_sid}") for line in logs.lines)
    assert any(line.startswith(f"error relay setup failed call={twilio.call_sid}") for line in logs.lines)


# ----------------------------------------------------------------------------- tools in relay mode


async def test_end_call_in_relay_mode_says_goodbye_then_ends_and_the_callback_hangs_up() -> None:
    app = main.create_app(env())
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("ok goodbye"))
        got = await peer.reply()
        callback = await twilio.post("/relay-action", SessionStatus="ended", SessionDuration="4")
    assert text_of(got[:-1]) == "Goodbye!"
    assert got[-1] == {"type": "end"}
    assert tree(callback.content) == twiml(lambda r: r.hangup())
    assert session_of(app, twilio.call_sid) is None


async def test_transfer_call_in_relay_mode_hands_off_and_the_callback_dials_with_caller_id() -> None:
    app = main.create_app(env(TRANSFER_NUMBER="+15005550009"))
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("can I talk to a person"))
        got = await peer.reply()
        handoff = got[-1]["handoffData"]
        callback = await twilio.post("/relay-action", SessionStatus="ended", SessionDuration="4", HandoffData=handoff)
    assert text_of(got[:-1]) == "Transferring you now."
    assert json.loads(handoff) == {
        "reasonCode": "live-agent-handoff",
        "reason": "the caller asked for a person",
        "number": "+15005550009",
        "callerId": setup_message(twilio.call_sid)["from"],
    }
    assert tree(callback.content) == twiml(
        lambda r: r.dial("+15005550009", caller_id=setup_message(twilio.call_sid)["from"])
    )


async def test_sigterm_lets_relay_replies_finish_then_asks_twilio_to_reconnect_elsewhere() -> None:
    with server({"MODE": "relay", "ECHO_TOKEN_MS": "60", "DRAIN_SECONDS": "5"}) as (base, proc, log_path):
        call_sid = new_call_sid()
        async with httpx.AsyncClient() as client:
            answer = await webhook_post(client, base + "/voice", call_sid, CallStatus="ringing")
            url, _ = relay_target(answer.content, base)
            async with ws_peer(url, call_sid) as peer:
                await peer.send(prompt("tell me about your opening hours please"))
                got = [await peer.recv()]
                proc.send_signal(signal.SIGTERM)  # mid-reply
                while got[-1]["type"] != "end":
                    got.append(await peer.recv())
        code = await asyncio.to_thread(proc.wait, 10)
    assert text_of(got[:-1]) == "You said: tell me about your opening hours please."  # the reply finished
    assert got[-2]["last"] is True
    assert json.loads(got[-1]["handoffData"]) == {"reasonCode": "reconnect", "reason": "this server is restarting"}
    assert code == 0 and "relay draining sockets=1" in log_path.read_text()
    other = main.create_app(env())  # Twilio calls the <Connect action> URL: another replica answers it
    async with running(other) as client:
        callback = await Twilio(client, call_sid=call_sid).post(
            "/relay-action", SessionStatus="ended", SessionDuration="3", HandoffData=got[-1]["handoffData"]
        )
    url_again, action_again = relay_target(callback.content, "")
    assert url_again == "ws://testserver.local/relay" and action_again == "/relay-action"
