"""The speech model contract: every SPEECH_MODEL goes through the same assertions (open, a turn, truncate, close),
and through media mode's misses: a caller who stays silent gets the goodbye after MAX_MISSES idle timeouts."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncIterator

import pytest
from conftest import VOICE, Captured, Twilio, concurrent, env, tree, twiml
from fake_realtime import FakeRealtime, Response, Utterance
from litestar import Litestar
from test_media import burst, media_call, media_messages, session_of, until

import main
import pcm
import phone

MODELS = ["parrot", "openai"]  # every registered speech model; a new plugin joins here
HISTORY = [main.Message(role="user", content="Hi."), main.Message(role="assistant", content="Hello! How can I help?")]


def tone(ms: int) -> bytes:
    """A 300 Hz burst, loud enough for any VAD, as μ-law."""
    samples = (int(9000 * math.sin(2 * math.pi * 300 * n / 8000)) for n in range(ms * 8))
    return pcm.pcm16_to_ulaw(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))


def silence(ms: int) -> bytes:
    return bytes([pcm.SILENCE]) * (ms * 8)


UTTERANCE = silence(200) + tone(600) + silence(1000)  # the caller says something, then waits


@pytest.fixture(params=MODELS)
async def model(request: pytest.FixtureRequest, fake_realtime: FakeRealtime) -> AsyncIterator[main.SpeechModel]:
    """The model built as the app builds it: plugins loaded, register_speech_models called, one selected."""
    extra = {}
    if request.param == "openai":
        extra = fake_realtime.env()
        fake_realtime.hear(Utterance(start_ms=200, end_ms=800, transcript="hello there"))
        fake_realtime.script(Response("Hello there.", audio_ms=400))
    settings = main.load_settings(env(**{**extra, "SPEECH_MODEL": request.param}))
    [speech] = main.select(main.plugin_manager(), "speech", [settings.speech_model], settings)
    await speech.aopen()
    yield speech
    await speech.aclose()


def test_register_speech_models_offers_every_model_in_this_suite() -> None:
    assert set(MODELS) <= set(main.registered(main.plugin_manager(), "speech"))


async def test_a_turn_is_speaking_done_audio_then_the_reply_and_truncate_and_close_are_accepted(
    model: main.SpeechModel,
) -> None:
    session = await model.open(instructions="Be brief.", tools=(), history=HISTORY)
    for at in range(0, len(UTTERANCE), pcm.FRAME):
        session.send_audio(UTTERANCE[at : at + pcm.FRAME])
    events: list[main.SpeechEvent] = []
    async with asyncio.timeout(5):
        async for event in session.events():
            events.append(event)
            if isinstance(event, main.ReplyDone):
                break
    kinds = [type(e).__name__ for e in events if not isinstance(e, main.Transcript)]
    first_audio = kinds.index("SpeechAudio")
    assert kinds[:2] == ["CallerSpeaking", "CallerDone"] and first_audio == 2
    assert set(kinds[first_audio:-1]) == {"SpeechAudio"} and kinds[-1] == "ReplyDone"
    audio = [e for e in events if isinstance(e, main.SpeechAudio)]
    assert len({a.item for a in audio}) == 1 and model.audio_format == "pcmu"
    assert sum(len(a.data) for a in audio) >= 8 * 100
    done = events[-1]
    assert isinstance(done, main.ReplyDone) and not done.interrupted
    await session.truncate(audio[0].item, 100)  # the caller heard 100 ms of it
    await session.close()
    async with asyncio.timeout(5):
        rest = [e async for e in session.events()]  # a closed session's events end
    assert not [e for e in rest if isinstance(e, main.SpeechAudio | main.CallerSpeaking)]


# -- a media call with each model: the caller's silence, counted in misses

IDLE_MS = 400  # each model's idle timeout in these calls (8 s by default)
REPROMPT_MS = 200  # what a model plays after an idle timeout: the parrot's tone, the fake's "Are you still there?"


@pytest.fixture(params=MODELS)
def media_env(request: pytest.FixtureRequest, fake_realtime: FakeRealtime) -> dict[str, str]:
    """Media mode with each model, its idle timeout short (the fake answers every turn in REPROMPT_MS)."""
    if request.param == "openai":
        fake_realtime.default = Response("Are you still there?", audio_ms=REPROMPT_MS)
        return env(MODE="media", OPENAI_REALTIME_IDLE_TIMEOUT_MS=str(IDLE_MS), **fake_realtime.env())
    return env(MODE="media", SPEECH_MODEL="parrot", PARROT_IDLE_MS=str(IDLE_MS))


class Outcomes(main.CallRecorder):
    """A call recorder keeping each finished call's outcome."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def call_finished(self, record: main.CallRecord) -> None:
        self.outcomes.append(record.outcome)


async def model_open(app: Litestar, player: phone.MediaPlayer) -> None:
    """Wait for the stream's model session, so the caller's audio reaches it frame by frame as it comes."""
    await until(lambda: (b := app.state.modes["media"].live.get(player.stream_sid)) is not None and b.model)


def misses(logs: Captured) -> list[int]:
    return [r.misses for r in logs.records if r.getMessage() == "caller silent"]  # type: ignore[attr-defined]


def sent_ms(player: phone.MediaPlayer) -> int:
    """Milliseconds of the model's audio sent to the caller."""
    return sum(len(base64.b64decode(m["media"]["payload"])) for m in media_messages(player)) // 8


async def test_a_silent_caller_hears_max_misses_minus_one_reprompts_then_the_goodbye_and_the_call_ends(
    media_env: dict[str, str], logs: Captured
) -> None:
    app = main.create_app(media_env)
    recorder = Outcomes()
    app.state.calls.obs.recorders.append(recorder)
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await model_open(app, player)
            await player.audio(silence(3 * IDLE_MS + 2 * REPROMPT_MS + 400))  # the third timeout, and then some
            await asyncio.wait_for(socket.closed.wait(), 10)
            session = session_of(app, twilio.call_sid)
            assert session is not None and session.ending == "goodbye"
            assert session.history[0] == main.Message(role="user", content="(silence)")
        after = await twilio.post("/media-action", CallStatus="in-progress")
        assert (await twilio.post("/status", CallStatus="completed")).status_code == 200
    assert misses(logs) == [1, 2, 3]
    assert sent_ms(player) == 2 * REPROMPT_MS  # two reprompts; the model's third was cut for the goodbye
    assert tree(after.content) == twiml(lambda r: (r.say(main.Settings().goodbye, **VOICE), r.hangup()))
    assert recorder.outcomes == ["completed"] and session_of(app, twilio.call_sid) is None


async def test_the_caller_speaking_between_idle_timeouts_starts_the_misses_again(
    media_env: dict[str, str], fake_realtime: FakeRealtime, logs: Captured
) -> None:
    # every model answers in REPROMPT_MS and waits IDLE_MS after it: timeouts at 400, 1000, 1600 ms of silence
    phases = [silence(1300), burst(200), silence(2000)]  # two misses, speech, two misses
    fake_realtime.hear(Utterance(start_ms=1300, end_ms=1500))  # (the parrot hears the burst itself)
    app = main.create_app(media_env)
    async with concurrent(app) as client:
        twilio = Twilio(client)
        async with media_call(app, twilio) as (socket, player):
            await model_open(app, player)
            await player.audio(b"".join(phases))
            await until(lambda: len(misses(logs)) == 4 or socket.closed.is_set())
            assert misses(logs) == [1, 2, 1, 2] and not socket.closed.is_set()  # four, but not three in a row
            await player.audio(silence(600))  # the third in a row
            await asyncio.wait_for(socket.closed.wait(), 10)
        after = await twilio.post("/media-action", CallStatus="in-progress")
    assert misses(logs) == [1, 2, 1, 2, 3]
    assert sent_ms(player) == 5 * REPROMPT_MS  # four reprompts and the answer to the caller
    assert tree(after.content) == twiml(lambda r: (r.say(main.Settings().goodbye, **VOICE), r.hangup()))
