"""The speech model contract: every SPEECH_MODEL goes through the same assertions (open, a turn, truncate, close)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest
from conftest import env
from fake_realtime import FakeRealtime, Response, Utterance

import main
import pcm

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
