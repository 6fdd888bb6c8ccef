"""ElevenLabs voices over httpx against a fake text-to-speech endpoint speaking ElevenLabs' wire format."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import BASE, GATHER, Captured, Scripted, Twilio, env, plugin, redirect_of, running, tree, twiml
from fake_tts import KEY, FakeTTS, fake_tts

import main
import observe
from plugins.tts_elevenlabs import ElevenLabsVoice


@pytest.fixture
def fake() -> Iterator[FakeTTS]:
    with fake_tts("elevenlabs") as f:
        yield f


def eleven_env(fake: FakeTTS, **extra: str) -> dict[str, str]:
    return env(TTS_VOICE="elevenlabs", ELEVENLABS_API_KEY=KEY, ELEVENLABS_BASE_URL=fake.url, GREETING="Hi.", **extra)


def play_url(xml: bytes) -> str:
    return ET.fromstring(xml).find("Gather/Play").text or ""  # type: ignore[union-attr]


async def test_the_greeting_is_played_from_the_exact_bytes_elevenlabs_sent(fake: FakeTTS) -> None:
    app = main.create_app(eleven_env(fake))
    async with running(app) as client:
        answer = await Twilio(client).call()
        url = play_url(answer.content)
        got = await client.get(url.removeprefix(BASE))
    assert tree(answer.content) == twiml(lambda r: r.gather(**GATHER).play(url))
    assert url.startswith(BASE + "/audio/") and url.endswith(".mp3")
    assert (got.status_code, got.headers["content-type"], got.content) == (200, "audio/mpeg", fake.audio_of("Hi."))
    [call] = fake.calls
    assert (call.path, call.query) == ("/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb", {"output_format": ["mp3_22050_32"]})
    assert call.headers["xi-api-key"] == KEY and call.headers["accept"] == "audio/mpeg"
    assert call.body == {"text": "Hi.", "model_id": "eleven_flash_v2_5"}


async def test_voice_model_and_a_wav_format_are_configurable(fake: FakeTTS) -> None:
    app = main.create_app(
        eleven_env(
            fake,
            ELEVENLABS_VOICE_ID="21m00Tcm4TlvDq8ikWAM",
            ELEVENLABS_MODEL="eleven_turbo_v2_5",
            ELEVENLABS_OUTPUT_FORMAT="wav_8000",
        )
    )
    async with running(app) as client:
        url = play_url((await Twilio(client).call()).content)
        got = await client.get(url.removeprefix(BASE))
    assert url.endswith(".wav") and got.headers["content-type"] == "audio/wav" and got.content == fake.audio_of("Hi.")
    assert got.content.startswith(b"RIFF")
    assert fake.calls[0].path == "/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM"
    assert fake.calls[0].query == {"output_format": ["wav_8000"]}
    assert fake.calls[0].body["model_id"] == "eleven_turbo_v2_5"


async def test_a_reply_is_voiced_sentence_by_sentence(fake: FakeTTS) -> None:
    model = Scripted("scripted", ["Good morning. How are you?"])
    app = main.create_app(eleven_env(fake, LLM_PROVIDER="scripted"), plugins=[plugin(llm=[model])])
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        docs = await twilio.follow(await twilio.say("hello"))
        urls = [[el.text or "" for el in ET.fromstring(d.content).iter("Play")] for d in docs]
        bodies = [(await client.get(u.removeprefix(BASE))).content for doc in urls for u in doc]
    assert bodies == [fake.audio_of("Good morning."), fake.audio_of("How are you?")]

    def expected(doc: httpx.Response, doc_urls: list[str], last: bool) -> tuple[Any, ...]:
        def build(r: Any) -> None:
            for u in doc_urls[:-1] if last else doc_urls:
                r.play(u)
            r.gather(**GATHER).play(doc_urls[-1]) if last else r.redirect(redirect_of(doc.content) or "", method="POST")

        return twiml(build)

    assert [tree(d.content) for d in docs] == [expected(d, u, d is docs[-1]) for d, u in zip(docs, urls, strict=True)]


@pytest.mark.parametrize(
    ("status", "key", "asked", "message"),
    [
        (500, KEY, 2, "The server had an error while processing your request."),  # worth one retry
        (401, "not-the-key", 1, "Invalid API key"),  # not worth any
    ],
)
async def test_a_failing_vendor_falls_back_to_say(
    fake: FakeTTS, logs: Captured, status: int, key: str, asked: int, message: str
) -> None:
    fake.status = 500 if status == 500 else 200
    before = observe.audio_counts["fallback"]
    app = main.create_app(eleven_env(fake, FALLBACK_SAY_VOICE="Google.en-US-Neural2-F") | {"ELEVENLABS_API_KEY": key})
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.call()
    assert tree(answer.content) == twiml(
        lambda r: r.gather(**GATHER).say("Hi.", voice="Google.en-US-Neural2-F", language="en-US")
    )
    assert len(fake.calls) == asked
    assert [line for line in logs.lines if line.startswith("warning voice failed")] == [
        f"warning voice failed, speaking with FALLBACK_SAY_VOICE voice=elevenlabs "
        f"error=ProviderError: ElevenLabs answered {status}: {message} call={twilio.call_sid}"
    ]
    assert observe.audio_counts["fallback"] == before + 1
    assert key not in "\n".join(logs.lines)


async def test_an_unreachable_vendor_falls_back_to_say(logs: Captured) -> None:
    with fake_tts("elevenlabs") as gone:
        url = gone.url
    app = main.create_app(env(TTS_VOICE="elevenlabs", ELEVENLABS_API_KEY=KEY, ELEVENLABS_BASE_URL=url, GREETING="Hi."))
    async with running(app) as client:
        answer = await Twilio(client).call()
    assert tree(answer.content) == twiml(
        lambda r: r.gather(**GATHER).say("Hi.", voice="Polly.Joanna-Neural", language="en-US")
    )
    assert any("error=ProviderError: ElevenLabs unreachable: ConnectError" in line for line in logs.lines)


async def test_the_stream_endpoint_speaks_the_same_wire_format(fake: FakeTTS) -> None:
    async with httpx.AsyncClient(base_url=fake.url, headers={"xi-api-key": KEY}) as client:
        got = await client.post(
            "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream",
            params={"output_format": "mp3_22050_32"},
            json={"text": "Hello.", "model_id": "eleven_flash_v2_5"},
        )
    assert (got.status_code, got.headers["content-type"]) == (200, "audio/mpeg")
    assert got.headers["transfer-encoding"] == "chunked"
    assert got.content == fake.audio_of("Hello.")


def test_relay_mode_uses_the_same_elevenlabs_voice() -> None:
    voice = ElevenLabsVoice(main.load_settings(env(ELEVENLABS_API_KEY=KEY, ELEVENLABS_VOICE_ID="UgBBYS2sOqTuMpoF3BR0")))
    assert voice.relay_attrs() == {"ttsProvider": "ElevenLabs", "voice": "UgBBYS2sOqTuMpoF3BR0"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "ELEVENLABS_API_KEY is not set; TTS_VOICE=elevenlabs needs it"),
        (
            {"ELEVENLABS_API_KEY": KEY, "ELEVENLABS_VOICE_ID": "../voices"},
            "ELEVENLABS_VOICE_ID='../voices' is not a voice id",
        ),
        (
            {"ELEVENLABS_API_KEY": KEY, "ELEVENLABS_OUTPUT_FORMAT": "ulaw_8000"},
            "ELEVENLABS_OUTPUT_FORMAT='ulaw_8000' is not playable by Twilio; use an mp3_\\* or wav_\\* format",
        ),
    ],
)
def test_config_errors_name_what_to_set(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(main.ConfigError, match=message):
        main.create_app(env(TTS_VOICE="elevenlabs", **extra))
