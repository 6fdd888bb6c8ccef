"""Media Streams mode (media.py): the <Connect><Stream> document, the media socket, barge-in, tools, reconnects."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import secrets
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import msgspec
import websockets
from conftest import TOKEN, VALKEY_URL, Captured, Twilio, concurrent, env, new_call_sid, server, tree, twiml
from fake_realtime import FakeRealtime, Response, Utterance
from litestar import Litestar
from test_relay import webhook_post

import main
import pcm
import phone
import webhooks
from main import (
    CallerDone,
    CallerSilent,
    CallerSpeaking,
    Message,
    ProviderError,
    ReplyDone,
    SpeechAudio,
    SpeechEvent,
    SpeechModel,
    SpeechSession,
    ToolCall,
    ToolSpec,
    Transcript,
    Usage,
    hookimpl,
)
from plugins.speech_parrot import Parrot, ParrotSession

WS_URL = "ws://testserver.local/media"
GREETING = "Hello! You are talking to switchboard. How can I help?"
SPEED = 8.0  # the simulated phone line plays audio this many times faster than real time


def burst(ms: int, hz: float = 300.0) -> bytes:
    """Speech-like audio: a loud tone, as μ-law."""
    return pcm.pcm16_to_ulaw(
        b"".join(
            int(9000 * math.sin(2 * math.pi * hz * n / 8000)).to_bytes(2, "little", signed=True) for n in range(ms * 8)
        )
    )


def silence(ms: int) -> bytes:
    return bytes([pcm.SILENCE]) * (ms * 8)


class Socket:
    """A WebSocket to the app in this event loop, through raw ASGI messages (as uvicorn drives it)."""

    def __init__(
        self, app: Litestar, headers: dict[str, str], *, path: str = "/media", subprotocols: Sequence[str] = ()
    ) -> None:
        self.app = app
        self.texts: list[str] = []  # everything the app sent, in order
        self.subprotocol: str | None = None
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.player: phone.MediaPlayer | None = None
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
            "subprotocols": list(subprotocols),
            "state": {},
            "headers": [(b"host", b"testserver.local")] + [(k.encode(), v.encode()) for k, v in headers.items()],
            "extensions": {},
        }
        self.accepted = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> bool:
        async def receive() -> dict[str, Any]:
            return await self.to_app.get()

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind in ("websocket.accept", "websocket.close") and not self.accepted.done():
                self.subprotocol = message.get("subprotocol")
                self.accepted.set_result(kind == "websocket.accept")
            if kind == "websocket.send":
                self.texts.append(message["text"])
            if kind == "websocket.send" and self.player is not None:
                await self.player.received(message["text"])
            elif kind == "websocket.close":
                self.close_code = message.get("code")
                self.closed.set()

        self.task = asyncio.create_task(self.app(self.scope, receive, send))  # type: ignore[arg-type]
        await self.to_app.put({"type": "websocket.connect"})
        return await asyncio.wait_for(self.accepted, 5)

    async def send(self, text: str) -> None:
        if not self.closed.is_set():
            await self.to_app.put({"type": "websocket.receive", "text": text})

    async def disconnect(self) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": 1006})
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


def signed(token: str = TOKEN) -> dict[str, str]:
    return {"x-twilio-signature": webhooks.twilio_signature(token, WS_URL, [])}


@contextlib.asynccontextmanager
async def media_call(
    app: Litestar, twilio: Twilio, *, answer: bool = True
) -> AsyncIterator[tuple[Socket, phone.MediaPlayer]]:
    """A call answered in media mode, its stream open and started, Twilio's player running."""
    if answer:
        response = await twilio.post("/voice?mode=media", CallStatus="ringing")
        assert response.status_code == 200, response.text
    socket = Socket(app, signed())
    assert await socket.open()
    player = socket.player = phone.MediaPlayer(socket.send, "MZ" + secrets.token_hex(16), speed=SPEED)
    await player.start(twilio.call_sid)
    try:
        yield socket, player
    finally:
        player.close()
        if socket.task is not None and not socket.task.done():
            await socket.disconnect()


def session_of(app: Litestar, call_sid: str) -> main.Session | None:
    call = app.state.calls.backend.calls.get(call_sid)
    return None if call is None or call.session is None else msgspec.msgpack.decode(call.session, type=main.Session)


async def until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def media_messages(player: phone.MediaPlayer) -> list[dict[str, Any]]:
    return [m for m in player.messages if m["event"] == "media"]


# -- the document


async def test_voice_greets_in_the_calls_voice_then_connects_the_stream() -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app) as client:
        answer = await Twilio(client).post("/voice", CallStatus="ringing")

    def build(r: Any) -> None:
        r.say(GREETING, voice="Polly.Joanna-Neural", language="en-US")
        stream = r.connect(action="/media-action").stream(url=WS_URL, status_callback="/media-status")
        stream.parameter(name="attempt", value="1")

    assert tree(answer.content) == twiml(build)


async def test_a_number_chooses_media_mode_on_its_voice_url() -> None:
    app = main.create_app(env())  # MODE=gather for the deployment
    async with concurrent(app) as client:
        answer = await Twilio(client).post("/voice?mode=media", CallStatus="ringing")
    assert [el[0] for el in tree(answer.content)[3]] == ["Say", "Connect"]


async def test_unsigned_or_wrongly_signed_upgrades_never_open(logs: Captured) -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app):
        for headers in ({}, signed("another-token-0123456789"), {"x-twilio-signature": "nonsense"}):
            socket = Socket(app, headers)
            assert await socket.open() is False
            await asyncio.wait_for(socket.task, 5)  # type: ignore[arg-type]
    refusals = [line for line in logs.lines if "route=/media" in line]
    assert len(refusals) == 3 and all(line.startswith("warning") for line in refusals)
    assert all(f"checked_url={WS_URL}" in line for line in refusals)


# -- turns with the parrot model


async def test_a_turn_comes_back_in_whole_frames_with_a_mark_after_each_and_lands_in_history() -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            said = burst(400)
            await player.audio(silence(100) + said + silence(700))
            await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns == 1)
            sent = player.messages
            kinds = [m["event"] for m in sent]
            assert kinds[0::2][:-1] == ["media"] * (len(kinds) // 2) and kinds[1::2] == ["mark"] * (len(kinds) // 2)
            frames = [base64.b64decode(m["media"]["payload"]) for m in media_messages(player)]
            audio = b"".join(frames)
            assert frames and all(len(f) % pcm.FRAME == 0 for f in frames)
            assert audio[: len(said)] == said  # the parrot played the utterance back, padded to whole frames
            assert bytes(player.played) == audio
            session = session_of(app, twilio.call_sid)
            assert session is not None
            assert session.history == [
                Message(role="user", content="(audio)"),
                Message(role="assistant", content="(audio)"),
            ]
            assert {m["streamSid"] for m in sent} == {player.stream_sid}


class Recording(Parrot):
    """The parrot, keeping each session it opens and the history it was given."""

    sessions: list[tuple[ParrotSession, list[Message]]] = []

    async def open(self, *, instructions: str, tools: Sequence[ToolSpec], history: Sequence[Message]) -> ParrotSession:
        session = await super().open(instructions=instructions, tools=tools, history=history)
        Recording.sessions.append((session, list(history)))
        return session


class RecordingPlugin:
    @hookimpl
    def register_speech_models(self, register: Any) -> None:
        register("recording", Recording)


async def test_barge_in_clears_twilio_and_truncates_at_the_audio_the_marks_say_was_heard() -> None:
    Recording.sessions = []
    app = main.create_app(env(MODE="media", SPEECH_MODEL="recording"), plugins=[RecordingPlugin()])
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            player.speed = 1.0  # real time, so the caller can speak over a reply being played
            await player.audio(burst(1500) + silence(600))
            await until(lambda: len(player.played) >= 400 * 8)  # half a second of the reply heard
            await player.audio(burst(300), realtime=True)
            await until(lambda: player.clears == 1)
            await until(lambda: bool(Recording.sessions[0][0].truncated))
            heard = player.heard_at_clears[0]
            session = session_of(app, twilio.call_sid)
            assert session is not None and session.history[-1] == Message(
                role="assistant", content="(audio)", interrupted=True
            )
    truncated = Recording.sessions[0][0].truncated
    assert len(truncated) == 1 and truncated[0][0] == "parrot_1"
    assert truncated[0][1] == heard // 8 > 0


async def test_keypad_digits_reach_the_model_as_text_and_it_answers() -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            for digit in "42#":
                await player.digit(digit)
            await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns == 1)
            session = session_of(app, twilio.call_sid)
            assert session is not None
            assert session.history == [
                Message(role="user", content="(pressed 4 2)"),
                Message(role="assistant", content="(audio)"),
            ]
            assert len(player.played) == 2 * 150 * 8  # the parrot's answer: a tone per digit


async def test_a_dropped_socket_reconnects_through_the_action_url_with_the_history_replayed() -> None:
    Recording.sessions = []
    app = main.create_app(env(MODE="media", SPEECH_MODEL="recording"), plugins=[RecordingPlugin()])
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await player.audio(burst(300) + silence(700))
            await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns == 1)
            await socket.disconnect()  # a deploy, a crash, the network
        again = await twilio.post("/media-action", CallStatus="in-progress")

        def build(r: Any) -> None:
            stream = r.connect(action="/media-action").stream(url=WS_URL, status_callback="/media-status")
            stream.parameter(name="attempt", value="2")

        assert tree(again.content) == twiml(build)
        async with media_call(app, twilio, answer=False):
            await until(lambda: len(Recording.sessions) == 2)
    stored = [Message(role="user", content="(audio)"), Message(role="assistant", content="(audio)")]
    assert [history for _, history in Recording.sessions] == [[], stored]


async def test_a_second_start_takes_the_call_over_and_the_old_socket_closes_without_writing() -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (old, old_player):
            async with media_call(app, twilio, answer=False) as (new, new_player):
                await asyncio.wait_for(old.closed.wait(), 5)
                session = session_of(app, twilio.call_sid)
                assert session is not None and session.stream == new_player.stream_sid
                await new_player.audio(burst(300) + silence(700))
                await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns == 1)
                assert old_player.messages == []


async def test_stop_ends_the_call_once_and_status_after_it_records_nothing_more() -> None:
    app = main.create_app(env(MODE="media"))
    ended: list[str] = []
    async with concurrent(app) as client:
        twilio = Twilio(client)
        app.state.calls.obs.recorders.append(
            type(
                "R",
                (main.CallRecorder,),
                {"turn_finished": lambda self, r: None, "call_finished": lambda self, r: ended.append(r.outcome)},
            )()
        )
        async with media_call(app, twilio) as (socket, player):
            await player.stop(twilio.call_sid)
            await asyncio.wait_for(socket.closed.wait(), 5)
        assert (await twilio.post("/status", CallStatus="completed")).status_code == 200
    assert ended == ["completed"] and session_of(app, twilio.call_sid) is None


async def test_malformed_and_unknown_frames_are_logged_and_ignored(logs: Captured) -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            for text in (
                "{not json",
                '{"event": 7}',
                '{"event": "wobble"}',
                '{"event":"media","media":{"payload":"!!"}}',
            ):
                await socket.send(text)
            await player.audio(burst(300) + silence(700))
            await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns == 1)
    problems = [line for line in logs.lines if "media" in line and line.startswith(("warning", "info media message"))]
    assert len(problems) == 4, problems


# -- a scripted model: tools, failures


class Script:
    """What the scripted model does: a list of event lists, one per answer, or an exception to fail with."""

    answers: list[list[SpeechEvent] | BaseException] = []
    results: list[tuple[str, str]] = []
    opened = 0


class ScriptedSession(SpeechSession):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[SpeechEvent | BaseException | None] = asyncio.Queue()
        self.heard = 0

    def send_audio(self, data: bytes) -> None:
        self.heard += len(data)
        if self.heard >= 160 * 10:  # the caller spoke: the next scripted answer
            self.heard = -(10**9)
            self._answer()

    def _answer(self) -> None:
        answer = Script.answers.pop(0) if Script.answers else []
        for event in answer if isinstance(answer, list) else [answer]:
            self.queue.put_nowait(event)

    async def send_text(self, text: str) -> None:
        self._answer()

    async def tool_result(self, call_id: str, output: str) -> None:
        Script.results.append((call_id, output))
        self._answer()

    async def truncate(self, item: str, heard_ms: int) -> None:
        return None

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self.queue.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event

    async def close(self) -> None:
        self.queue.put_nowait(None)


class ScriptedModel(SpeechModel):
    name = "scripted"

    def __init__(self, settings: main.Settings) -> None:
        pass

    async def open(
        self, *, instructions: str, tools: Sequence[ToolSpec], history: Sequence[Message]
    ) -> ScriptedSession:
        Script.opened += 1
        return ScriptedSession()


class ScriptedPlugin:
    @hookimpl
    def register_speech_models(self, register: Any) -> None:
        register("scripted", ScriptedModel)


def spoken(item: str, text: str, ms: int = 200) -> list[SpeechEvent]:
    return [SpeechAudio(item=item, data=burst(ms)), Transcript(role="assistant", item=item, text=text)]


async def test_hang_up_waits_for_the_goodbye_to_play_then_the_action_url_hangs_up() -> None:
    Script.answers = [
        [
            CallerSpeaking(),
            CallerDone(),
            Transcript(role="user", item="u1", text="Bye now."),
            ToolCall(id="call_1", name="end_call", arguments={}),
            ReplyDone(usage=Usage(input_tokens=10)),
        ],
        [*spoken("a2", "Goodbye!", 300), ReplyDone(usage=Usage(audio_output_tokens=30))],
    ]
    Script.results = []
    app = main.create_app(env(MODE="media", SPEECH_MODEL="scripted"), plugins=[ScriptedPlugin()])
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await player.audio(burst(300))
            await asyncio.wait_for(socket.closed.wait(), 10)
            assert len(player.played) == 300 * 8  # the goodbye played whole before the socket closed
            session = session_of(app, twilio.call_sid)
            assert session is not None and session.ending == "hangup"
            assert session.history[-2:] == [
                Message(role="user", content="Bye now."),
                Message(role="assistant", content="Goodbye!"),
            ]
            assert session.usage == {"speech:scripted": Usage(input_tokens=10, audio_output_tokens=30)}
        after = await twilio.post("/media-action", CallStatus="in-progress")
    assert tree(after.content) == twiml(lambda r: r.hangup())
    assert Script.results and Script.results[0][0] == "call_1"
    assert session_of(app, twilio.call_sid) is None


async def test_keys_and_words_start_the_misses_again_and_an_empty_transcript_does_not(logs: Captured) -> None:
    silent = CallerSilent()
    Script.answers = [
        [silent, silent],  # two misses; then the caller presses a key, and the model answers it with:
        [silent, silent, Transcript(role="user", item="u1", text="Hello?"), silent, silent]
        + [Transcript(role="user", item="u2", text=""), silent],  # (a silent stretch's empty transcript)
    ]
    app = main.create_app(env(MODE="media", SPEECH_MODEL="scripted"), plugins=[ScriptedPlugin()])

    def misses() -> list[str]:
        return [line.split("misses=")[1].split()[0] for line in logs.lines if line.startswith("info caller silent")]

    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await player.audio(burst(300))
            await until(lambda: len(misses()) == 2)
            await player.digit("1")
            await player.digit("#")
            await asyncio.wait_for(socket.closed.wait(), 10)
            session = session_of(app, twilio.call_sid)
            assert session is not None and session.ending == "goodbye"
    assert misses() == ["1", "2", "1", "2", "1", "2", "3"]


async def test_a_failing_model_gets_new_sessions_then_the_caller_hears_the_apology_and_the_fallback() -> None:
    Script.answers = [ProviderError("boom", provider="scripted")] * 3
    Script.opened = 0
    app = main.create_app(
        env(MODE="media", SPEECH_MODEL="scripted", FALLBACK_NUMBER="+15005550009"), plugins=[ScriptedPlugin()]
    )
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            for _ in range(3):
                await player.audio(burst(300), realtime=False)
                await asyncio.sleep(0.05)
            await asyncio.wait_for(socket.closed.wait(), 10)
        after = await twilio.post("/media-action", CallStatus="in-progress")

    def build(r: Any) -> None:
        r.say("Sorry, I'm having trouble answering right now.", voice="Polly.Joanna-Neural", language="en-US")
        r.dial("+15005550009")

    assert tree(after.content) == twiml(build)
    assert Script.opened == 3


async def test_draining_lets_the_reply_play_then_asks_twilio_to_reconnect() -> None:
    app = main.create_app(env(MODE="media"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            player.speed = 1.0
            await player.audio(burst(600) + silence(600))
            await until(lambda: len(player.played) > 0)  # the reply is playing
            await app.state.modes["media"].drain()  # what SIGTERM runs
            await asyncio.wait_for(socket.closed.wait(), 5)
            assert len(player.played) == 600 * 8  # the whole reply played before the socket closed
            session = session_of(app, twilio.call_sid)
            assert session is not None and session.ending == "reconnect" and session.turns == 1
        again = await twilio.post("/media-action", CallStatus="in-progress")
    assert [el[0] for el in tree(again.content)[3]] == ["Connect"]


async def test_a_crashed_replicas_call_continues_on_another_process_with_its_history_replayed() -> None:
    prefix = "sb-media-test-" + secrets.token_hex(6)
    shared = {"SESSION_BACKEND": "valkey", "VALKEY_URL": VALKEY_URL, "VALKEY_PREFIX": prefix, "MODE": "media"}
    call_sid = new_call_sid()

    async def stream(url: str, attempt: str) -> phone.MediaPlayer:
        """One stream: an utterance, its echo played back, then the socket drops."""
        async with websockets.connect(url, additional_headers=signed_for(url)) as ws:
            player = phone.MediaPlayer(ws.send, "MZ" + secrets.token_hex(16), speed=SPEED)
            reader = asyncio.create_task(read_into(ws, player))
            await player.start(call_sid, attempt=attempt)
            await player.audio(burst(300) + silence(700))
            await until(lambda: len(player.played) >= 300 * 8)
            await asyncio.sleep(0.3)  # the turn's last mark echoed: it is stored
            reader.cancel()
            player.close()
            return player

    with server(shared) as (base_a, proc_a, _), server(shared) as (base_b, _proc_b, log_b):
        async with httpx.AsyncClient() as client:
            answer = await webhook_post(client, base_a + "/voice?mode=media", call_sid, CallStatus="ringing")
            url_a = ET.fromstring(answer.content).find("Connect/Stream").get("url")  # type: ignore[union-attr]
            await stream(url_a, "1")
            proc_a.kill()  # the replica dies; Twilio calls the action URL, the load balancer picks the other
            again = await webhook_post(client, base_b + "/media-action", call_sid)
            url_b = ET.fromstring(again.content).find("Connect/Stream").get("url")  # type: ignore[union-attr]
            assert url_b == base_b.replace("http://", "ws://") + "/media"
            await stream(url_b, "2")
    text = log_b.read_text()
    assert f"media connected call={call_sid} attempt=2 history=2" in text  # the first turn, both sides


def signed_for(url: str) -> dict[str, str]:
    return {"x-twilio-signature": webhooks.twilio_signature(TOKEN, url, [])}


async def read_into(ws: Any, player: phone.MediaPlayer) -> None:
    async for message in ws:
        await player.received(message)


async def test_a_transfer_says_so_in_the_calls_voice_then_dials() -> None:
    Script.answers = [
        [CallerSpeaking(), CallerDone(), ToolCall(id="t1", name="transfer_call", arguments={}), ReplyDone()],
        [*spoken("a2", "Connecting you now.", 200), ReplyDone()],
    ]
    app = main.create_app(
        env(MODE="media", SPEECH_MODEL="scripted", TRANSFER_NUMBER="+15005550009"), plugins=[ScriptedPlugin()]
    )
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await player.audio(burst(300))
            await asyncio.wait_for(socket.closed.wait(), 10)
        after = await twilio.post("/media-action", CallStatus="in-progress")

    def build(r: Any) -> None:
        r.say("Please hold while I transfer your call.", voice="Polly.Joanna-Neural", language="en-US")
        r.dial("+15005550009", caller_id="+15005550006")

    assert tree(after.content) == twiml(build)


# -- the OpenAI Realtime model, end to end (its fake server speaks the GA protocol strictly)


async def test_a_realtime_call_stores_both_transcripts_and_prices_them_at_the_speech_rates(
    fake_realtime: FakeRealtime,
) -> None:
    fake_realtime.hear(Utterance(start_ms=100, end_ms=500, transcript="what time is it"))
    fake_realtime.script(Response("It is noon.", audio_ms=300, chunk_ms=100))
    app = main.create_app(env(MODE="media", **fake_realtime.env()))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await player.audio(burst(500) + silence(1000))
            await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns == 1)
            session = session_of(app, twilio.call_sid)
            assert session is not None
            assert session.history == [
                Message(role="user", content="what time is it"),
                Message(role="assistant", content="It is noon."),
            ]
            assert len(player.played) == 300 * 8
            assert list(session.usage) == ["speech:openai"] and session.usage["speech:openai"].audio_output_tokens > 0
        cost = app.state.calls.obs.prices.cost("speech:openai", session.usage["speech:openai"])
    assert cost > 0


async def test_a_realtime_barge_in_truncates_at_the_audio_twilio_played(fake_realtime: FakeRealtime) -> None:
    fake_realtime.hear(
        Utterance(start_ms=100, end_ms=500, transcript="tell me a story"),
        Utterance(start_ms=2100, end_ms=2400, transcript="stop"),
    )
    fake_realtime.script(
        Response("Once upon a time there was a very long story about a phone.", audio_ms=3000, chunk_ms=100),
        Response("Okay.", audio_ms=200),
    )
    app = main.create_app(env(MODE="media", **fake_realtime.env()))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            player.speed = 1.0
            await player.audio(burst(500) + silence(1300) + burst(600) + silence(900))
            await until(lambda: player.clears == 1)
            await until(lambda: bool(fake_realtime.of_type("conversation.item.truncate")))
            heard = player.heard_at_clears[0]
            await until(lambda: (s := session_of(app, twilio.call_sid)) is not None and s.turns >= 1)
            session = session_of(app, twilio.call_sid)
    truncate = fake_realtime.of_type("conversation.item.truncate")[0]
    assert truncate["audio_end_ms"] == heard // 8 > 0
    story = "Once upon a time there was a very long story about a phone.".split()
    assert session is not None and session.history[:2] == [
        Message(role="user", content="tell me a story"),
        Message(role="assistant", content=" ".join(story[: round(len(story) * heard / 24000)]), interrupted=True),
    ], session.history
