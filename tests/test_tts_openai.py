"""OpenAI voices through the real openai SDK against a fake speech endpoint (hosted audio itself: test_audio.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from conftest import (
    GATHER,
    ROOT,
    TOKEN,
    Captured,
    Scripted,
    Twilio,
    env,
    fetch,
    openai_env,
    played,
    plays,
    plugin,
    redirect_of,
    running,
    server,
    tree,
    twiml,
)
from fake_tts import KEY, FakeTTS, fake_tts

import main
import observe
import webhooks
from plugins.tts_openai import OpenAIVoice


@pytest.fixture
def fake() -> Iterator[FakeTTS]:
    with fake_tts("openai") as f:
        yield f


def continuing(*urls: str, next_url: str) -> tuple[Any, ...]:
    """<Play>… then the <Redirect> to the next part of the reply."""

    def build(r: Any) -> None:
        for url in urls:
            r.play(url)
        r.redirect(next_url, method="POST")

    assert next_url.startswith("/continue?n=")
    return twiml(build)


async def test_the_greeting_is_played_from_the_audio_the_vendor_sent(fake: FakeTTS) -> None:
    app = main.create_app(openai_env(fake))
    async with running(app) as client:
        answer = await Twilio(client).call()
        [url] = plays(answer.content)
        got = await fetch(client, url)
    assert tree(answer.content) == played(url)
    assert url.endswith(".mp3")
    assert (got.status_code, got.headers["content-type"], got.content) == (200, "audio/mpeg", fake.calls[0].audio)
    [call] = fake.calls
    assert call.path == "/v1/audio/speech" and call.headers["authorization"] == f"Bearer {KEY}"
    assert call.body == {
        "model": "gpt-4o-mini-tts",
        "input": app.state.settings.greeting,
        "voice": "alloy",
        "response_format": "mp3",
    }


async def test_model_voice_format_and_instructions_reach_the_vendor(fake: FakeTTS) -> None:
    app = main.create_app(
        openai_env(
            fake,
            OPENAI_TTS_MODEL="tts-1-hd",
            OPENAI_TTS_VOICE="voice_1234",
            OPENAI_TTS_FORMAT="wav",
            OPENAI_TTS_INSTRUCTIONS="Speak warmly.",
            GREETING="Hi.",
        )
    )
    async with running(app) as client:
        [url] = plays((await Twilio(client).call()).content)
        got = await fetch(client, url)
    assert url.endswith(".wav") and got.headers["content-type"] == "audio/wav" and got.content == fake.audio_of("Hi.")
    assert fake.calls[0].body == {
        "model": "tts-1-hd",
        "input": "Hi.",
        "voice": {"id": "voice_1234"},
        "response_format": "wav",
        "instructions": "Speak warmly.",
    }


class Timed(Scripted):
    """A scripted model that notes when it wrote its last token."""

    finished = 0.0

    async def stream(self, messages: Any, *, system: str, tools: Any = ()) -> AsyncIterator[Any]:
        async for event in super().stream(messages, system=system, tools=tools):
            yield event
        self.finished = asyncio.get_running_loop().time()


async def test_each_sentence_is_voiced_while_the_model_still_writes_and_history_keeps_the_text(fake: FakeTTS) -> None:
    reply = "First sentence here. Then a second one. And the third."
    model = Timed("timed", [reply, "Fine."], gap=0.03)
    app = main.create_app(openai_env(fake, LLM_PROVIDER="timed", GREETING="Hi."), plugins=[plugin(llm=[model])])
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        docs = await twilio.follow(await twilio.say("hello"))
        urls = [plays(d.content) for d in docs]
        bodies = [(await fetch(client, u)).content for doc in urls for u in doc]
        await twilio.say("thanks")
    sentences = ["First sentence here.", "Then a second one.", "And the third."]
    assert fake.texts()[1:-1] == sentences
    assert bodies == [fake.audio_of(s) for s in sentences]
    assert fake.calls[1].at < model.finished  # the first sentence went to the vendor before the model finished
    for doc, doc_urls in zip(docs[:-1], urls[:-1], strict=True):
        assert tree(doc.content) == continuing(*doc_urls, next_url=redirect_of(doc.content) or "")
    assert tree(docs[-1].content) == played(*urls[-1])
    assert model.calls[1][-2] == main.Message(role="assistant", content=reply)


async def test_a_vendor_500_falls_back_to_say_logged_with_the_call_and_counted(fake: FakeTTS, logs: Captured) -> None:
    fake.status = 500
    before = observe.audio_counts["fallback"]
    app = main.create_app(openai_env(fake, FALLBACK_SAY_VOICE="Polly.Amy-Neural", LANGUAGE="en-GB", GREETING="Hi."))
    gather = dict(GATHER, language="en-GB")
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.call()
        reply = await twilio.say("hello there")
        fake.status = 200
        again = await Twilio(client).call()
    assert tree(answer.content) == twiml(
        lambda r: r.gather(**gather).say("Hi.", voice="Polly.Amy-Neural", language="en-GB")
    )
    assert tree(reply.content) == twiml(
        lambda r: r.gather(**gather).say("You said: hello there.", voice="Polly.Amy-Neural", language="en-GB")
    )
    assert tree(again.content) == played(*plays(again.content), gather=gather)  # the greeting is not stuck on <Say>
    failures = [line for line in logs.lines if line.startswith("warning voice failed")]
    assert len(failures) == 2 == observe.audio_counts["fallback"] - before
    assert all(
        "voice=openai error=ProviderError: OpenAI speech failed" in f and f" call={twilio.call_sid}" in f
        for f in failures
    )
    assert fake.texts() == ["Hi.", "Hi.", "You said: hello there.", "You said: hello there.", "Hi."]  # one SDK retry


def test_config_errors_name_what_to_set() -> None:
    with pytest.raises(main.ConfigError, match="OPENAI_API_KEY is not set; TTS_VOICE=openai needs it"):
        main.create_app(env(TTS_VOICE="openai"))
    with pytest.raises(main.ConfigError, match="OPENAI_TTS_FORMAT='ogg' is not playable by Twilio; use mp3 or wav"):
        main.create_app(env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, OPENAI_TTS_FORMAT="ogg"))
    with pytest.raises(main.ConfigError, match=r"FALLBACK_SAY_VOICE='Joanna' is not .*; did you mean 'Polly.Joanna'\?"):
        main.create_app(env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, FALLBACK_SAY_VOICE="Joanna"))
    with pytest.raises(
        main.ConfigError, match="TTS_TIMEOUT='soon' is not valid: set it to a number of seconds above 0"
    ):
        main.create_app(env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, TTS_TIMEOUT="soon"))


def test_the_sdk_is_imported_only_when_the_voice_opens() -> None:
    code = (
        "import sys, main; s = main.load_settings({'TWILIO_AUTH_TOKEN': 't', 'TTS_VOICE': 'openai', "
        "'OPENAI_API_KEY': 'k'}); main.select(main.plugin_manager(), 'tts', ['openai'], s); "
        "print('openai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_relay_mode_gets_a_documented_amazon_voice(logs: Captured) -> None:
    observe.setup_logging(main.load_settings(env()))  # as create_app does: info lines are logged
    voice = OpenAIVoice(main.load_settings(env(OPENAI_API_KEY=KEY)))
    assert voice.relay_attrs() == voice.relay_attrs() == {"ttsProvider": "Amazon", "voice": "Joanna-Neural"}
    assert [line for line in logs.lines if "ConversationRelay" in line] == [
        "info OpenAI voices are not available in ConversationRelay; relay mode speaks with an Amazon voice "
        "relay_voice=Joanna-Neural"
    ]


def test_a_real_process_plays_and_serves_the_audio(fake: FakeTTS) -> None:
    extra = {
        "TTS_VOICE": "openai",
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": fake.url + "/v1",
        "GREETING": "Hi.",
        "PUBLIC_URL": "",
    }
    with server(extra) as (base, _proc, _log):
        params = {"CallSid": "CA" + "1" * 32, "From": "+15005550006", "To": "+15005550001"}
        signature = webhooks.twilio_signature(TOKEN, base + "/voice", list(params.items()))
        answer = httpx.post(base + "/voice", data=params, headers={"x-twilio-signature": signature})
        url = ET.fromstring(answer.content).find("Gather/Play").text or ""  # type: ignore[union-attr]
        got = httpx.get(url)
    assert url.startswith(base + "/audio/") and got.content == fake.audio_of("Hi.")
    assert got.headers["content-type"] == "audio/mpeg"
