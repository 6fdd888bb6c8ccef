"""The parrot speech model (plugins/speech_parrot.py): utterances found by loudness, played back."""

from __future__ import annotations

import asyncio
import math

import pytest
from conftest import env

import main
import pcm
from main import CallerDone, CallerSilent, CallerSpeaking, ReplyDone, SpeechAudio, SpeechEvent
from plugins.speech_parrot import NUDGE, PIECE, Parrot, ParrotSession, tone


def loud(ms: int) -> bytes:
    return pcm.pcm16_to_ulaw(
        b"".join(
            int(9000 * math.sin(2 * math.pi * 300 * n / 8000)).to_bytes(2, "little", signed=True) for n in range(ms * 8)
        )
    )


def quiet(ms: int) -> bytes:
    return bytes([pcm.SILENCE]) * (ms * 8)


async def opened(**settings: str) -> ParrotSession:
    parrot = Parrot(main.load_settings(env(**settings)))
    return await parrot.open(instructions="", tools=(), history=())


def pending(session: ParrotSession) -> list[SpeechEvent]:
    events: list[SpeechEvent] = []
    while not session.queue.empty():
        event = session.queue.get_nowait()
        assert event is not None
        events.append(event)
    return events


async def test_an_utterance_is_heard_then_played_back_whole() -> None:
    session = await opened()
    said = loud(460)
    session.send_audio(quiet(200) + said + quiet(500))
    events = pending(session)
    assert events[:2] == [CallerSpeaking(), CallerDone()] and events[-1] == ReplyDone()
    audio = [e for e in events if isinstance(e, SpeechAudio)]
    assert {e.item for e in audio} == {"parrot_1"} and all(len(e.data) <= 800 for e in audio)
    assert b"".join(e.data for e in audio) == said  # from its first loud frame to its last


async def test_silence_and_a_click_are_not_speech_and_audio_may_arrive_in_odd_pieces() -> None:
    session = await opened()
    session.send_audio(quiet(1000) + loud(20) + quiet(1000))  # one loud frame: a click
    assert pending(session) == []
    said = loud(300)
    stream = said + quiet(600)
    for n in range(0, len(stream), 37):  # pieces that are not whole frames
        session.send_audio(stream[n : n + 37])
    events = pending(session)
    assert b"".join(e.data for e in events if isinstance(e, SpeechAudio)) == said


async def test_a_long_utterance_is_cut_at_its_limit_and_settings_are_checked() -> None:
    session = await opened(PARROT_MAX_MS="400")
    session.send_audio(loud(1000))
    events = pending(session)
    assert events[:2] == [CallerSpeaking(), CallerDone()]
    replies = [
        sum(len(e.data) for e in events if isinstance(e, SpeechAudio) and e.item == item)
        for item in ("parrot_1", "parrot_2", "parrot_3")
    ]
    assert replies == [400 * 8, 400 * 8, 0]  # the rest goes on as a new utterance, not yet over
    with pytest.raises(main.ConfigError, match="PARROT_SILENCE_MS='soon' is not valid"):
        Parrot(main.load_settings(env(PARROT_SILENCE_MS="soon")))


async def test_digits_get_a_tone_each_and_events_end_when_the_session_closes() -> None:
    session = await opened()
    await session.send_text("(The caller pressed 1 2 # on the keypad.)")
    await session.truncate("parrot_1", 120)
    await session.close()
    events = [event async for event in session.events()]
    audio = b"".join(e.data for e in events if isinstance(e, SpeechAudio))
    assert audio == tone(600, 150) + tone(640, 150) + tone(680, 150) and events[-1] == ReplyDone()
    assert session.truncated == [("parrot_1", 120)]
    assert await asyncio.wait_for(session.tool_result("x", "{}"), 1) is None


def nudge(item: str) -> list[SpeechEvent]:
    """An idle timeout as the parrot reports it: CallerSilent, then its tone as a reply."""
    audio = [SpeechAudio(item=item, data=NUDGE[n : n + PIECE]) for n in range(0, len(NUDGE), PIECE)]
    return [CallerSilent(), *audio, ReplyDone()]


async def test_a_silent_caller_gets_an_idle_timeout_and_a_tone_then_another_once_the_tone_has_played() -> None:
    session = await opened(PARROT_IDLE_MS="300")
    session.send_audio(quiet(280))
    assert pending(session) == []
    session.send_audio(quiet(20))
    assert pending(session) == nudge("parrot_1") and len(NUDGE) == 200 * 8
    session.send_audio(quiet(480))  # the tone's 200 ms do not count
    assert pending(session) == []
    session.send_audio(quiet(20))
    assert pending(session) == nudge("parrot_2")


async def test_speech_and_keys_start_the_idle_time_again_and_zero_turns_it_off() -> None:
    session = await opened(PARROT_IDLE_MS="300")
    session.send_audio(quiet(260) + loud(300) + quiet(500))  # spoken just before the timeout
    events = pending(session)
    assert events[:2] == [CallerSpeaking(), CallerDone()] and CallerSilent() not in events
    session.send_audio(quiet(580))  # the 300 ms answer plays, then 280 ms of silence
    assert pending(session) == []
    await session.send_text("(The caller pressed 5 on the keypad.)")  # a 150 ms tone answers the key
    session.send_audio(quiet(440))
    assert [e for e in pending(session) if not isinstance(e, SpeechAudio)] == [ReplyDone()]
    session.send_audio(quiet(20))
    assert pending(session) == nudge("parrot_3")
    off = await opened(PARROT_IDLE_MS="0")
    off.send_audio(quiet(60_000))
    assert pending(off) == []
    with pytest.raises(main.ConfigError, match="PARROT_IDLE_MS='-1' is not valid"):
        Parrot(main.load_settings(env(PARROT_IDLE_MS="-1")))
