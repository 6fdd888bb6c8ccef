"""OpenAI voices through the real openai SDK against a fake speech endpoint, and the hosted audio they use."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from conftest import (
    BASE,
    GATHER,
    ROOT,
    TOKEN,
    Captured,
    Scripted,
    Twilio,
    env,
    plugin,
    redirect_of,
    running,
    server,
    tree,
    twiml,
)
from fake_tts import KEY, FakeTTS, fake_tts
from test_session_contract import BACKENDS, backend_env

import main
import observe
import webhooks
from plugins.tts_openai import OpenAIVoice

URL = re.compile(re.escape(BASE) + r"/audio/[0-9a-f]{32}\.(mp3|wav)")


@pytest.fixture
def fake() -> Iterator[FakeTTS]:
    with fake_tts("openai") as f:
        yield f


def openai_env(fake: FakeTTS, **extra: str) -> dict[str, str]:
    return env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, OPENAI_BASE_URL=fake.url + "/v1", **extra)


def plays(xml: bytes) -> list[str]:
    """Every <Play> URL of a document, in order."""
    urls = [el.text or "" for el in ET.fromstring(xml).iter("Play")]
    assert all(URL.fullmatch(u) for u in urls), urls
    return urls


def played(*urls: str, gather: dict[str, Any] = GATHER) -> tuple[Any, ...]:
    """<Play>…<Gather><Play>last</Play></Gather>, built with the twilio package."""

    def build(r: Any) -> None:
        for url in urls[:-1]:
            r.play(url)
        r.gather(**gather).play(urls[-1])

    return twiml(build)


def continuing(*urls: str, next_url: str) -> tuple[Any, ...]:
    """<Play>… then the <Redirect> to the next part of the reply."""

    def build(r: Any) -> None:
        for url in urls:
            r.play(url)
        r.redirect(next_url, method="POST")

    assert next_url.startswith("/continue?n=")
    return twiml(build)


async def fetch(client: Any, url: str) -> httpx.Response:
    return await client.get(url.removeprefix(BASE))


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
    assert call.body == {"model": "gpt-4o-mini-tts", "input": app.state.settings.greeting, "voice": "alloy",
                         "response_format": "mp3"}


async def test_model_voice_format_and_instructions_reach_the_vendor(fake: FakeTTS) -> None:
    app = main.create_app(openai_env(fake, OPENAI_TTS_MODEL="tts-1-hd", OPENAI_TTS_VOICE="voice_1234",
                                     OPENAI_TTS_FORMAT="wav", OPENAI_TTS_INSTRUCTIONS="Speak warmly.", GREETING="Hi."))
    async with running(app) as client:
        [url] = plays((await Twilio(client).call()).content)
        got = await fetch(client, url)
    assert url.endswith(".wav") and got.headers["content-type"] == "audio/wav" and got.content == fake.audio_of("Hi.")
    assert fake.calls[0].body == {"model": "tts-1-hd", "input": "Hi.", "voice": {"id": "voice_1234"},
                                  "response_format": "wav", "instructions": "Speak warmly."}


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
        lambda r: r.gather(**gather).say("Hi.", voice="Polly.Amy-Neural", language="en-GB"))
    assert tree(reply.content) == twiml(
        lambda r: r.gather(**gather).say("You said: hello there.", voice="Polly.Amy-Neural", language="en-GB"))
    assert tree(again.content) == played(*plays(again.content), gather=gather)  # the greeting is not stuck on <Say>
    failures = [line for line in logs.lines if line.startswith("warning voice failed")]
    assert len(failures) == 2 == observe.audio_counts["fallback"] - before
    assert all("voice=openai error=ProviderError: OpenAI speech failed" in f and f" call={twilio.call_sid}" in f
               for f in failures)
    assert fake.texts() == ["Hi.", "Hi.", "You said: hello there.", "You said: hello there.", "Hi."]  # one SDK retry


async def test_a_slow_vendor_falls_back_in_time_and_its_audio_serves_the_next_call(fake: FakeTTS) -> None:
    fake.delay = 0.6
    app = main.create_app(openai_env(fake, TTS_TIMEOUT="0.2", GREETING="Hi."))
    async with running(app) as client:
        first = await Twilio(client).call()
        await asyncio.sleep(0.8)
        second = await Twilio(client).call()
    assert tree(first.content) == twiml(
        lambda r: r.gather(**GATHER).say("Hi.", voice="Polly.Joanna-Neural", language="en-US"))
    assert tree(second.content) == played(*plays(second.content))
    assert fake.texts() == ["Hi."]


async def test_closing_the_app_cancels_syntheses_nobody_waits_for(fake: FakeTTS) -> None:
    fake.delay = 2.0
    app = main.create_app(openai_env(fake, TTS_TIMEOUT="0.1", GREETING="Hi."))
    voice = app.state.calls.voice
    async with running(app) as client:
        await Twilio(client).call()
        pending = list(voice.making.values())
    assert len(pending) == 1 and pending[0].cancelled() and voice.making == {}


async def test_fixed_phrases_hit_the_vendor_once(fake: FakeTTS) -> None:
    app = main.create_app(openai_env(fake, GREETING="Hi.", REPROMPT="Anyone there?"))
    async with running(app) as client:
        docs = []
        for _ in range(3):
            twilio = Twilio(client)
            docs += [await twilio.call(), await twilio.say(""), await twilio.say("")]
    assert sorted(fake.texts()) == ["Anyone there?", "Hi."]
    assert len({d.content for d in docs[0::3]}) == len({d.content for d in docs[1::3]}) == 1


async def test_concurrent_calls_voice_a_new_greeting_once(fake: FakeTTS) -> None:
    fake.delay = 0.1
    app = main.create_app(openai_env(fake, GREETING="Welcome."))
    async with app.lifespan():
        voice = app.state.calls.voice
        segments = await asyncio.gather(*(voice.render("Welcome.", base_url=BASE) for _ in range(10)))
    assert len({s.url for s in segments}) == 1 and fake.texts() == ["Welcome."]


class Shared:
    """One opened backend handed to several apps, as replicas share one store (the test opens and closes it)."""

    def __init__(self, inner: main.SessionBackend) -> None:
        self.inner = inner

    async def aopen(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(params=BACKENDS)
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    """Two handles on one session store: the same object in memory, two clients of a shared server otherwise."""
    settings = main.load_settings(backend_env(request.param))
    build = lambda: main.select(main.plugin_manager(), "session", [request.param], settings)[0]  # noqa: E731
    first = build()
    second = first if request.param == "memory" else build()
    for backend in {id(first): first, id(second): second}.values():
        await backend.aopen()
    yield Shared(first), Shared(second)
    for backend in {id(first): first, id(second): second}.values():
        await backend.aclose()


async def test_a_second_replica_serves_the_audio_and_reuses_the_greeting(fake: FakeTTS, stores: Any) -> None:
    model = Scripted("scripted", ["One sentence only."])
    apps = [main.create_app(openai_env(fake, LLM_PROVIDER="scripted", SESSION_BACKEND="shared", GREETING="Hi."),
                            plugins=[plugin(llm=[model], session={"shared": store})]) for store in stores]
    async with running(apps[0]) as one, running(apps[1]) as two:
        twilio = Twilio(one)
        greeting = await twilio.call()
        reply = await twilio.say("hello")
        [url] = plays(reply.content)
        from_two = await fetch(two, url)
        greeting_two = await Twilio(two).call()
    assert from_two.status_code == 200 and from_two.content == fake.audio_of("One sentence only.")
    assert greeting_two.content == greeting.content and fake.texts() == ["Hi.", "One sentence only."]


async def test_a_replica_voices_a_fixed_phrase_it_never_stored_on_demand(fake: FakeTTS) -> None:
    one, two = (main.create_app(openai_env(fake, GREETING="Hi.")) for _ in range(2))  # two separate memory stores
    async with running(one) as client_one, running(two) as client_two:
        [url] = plays((await Twilio(client_one).call()).content)
        got = await fetch(client_two, url)
    assert (got.status_code, got.content) == (200, fake.calls[1].audio) and fake.texts() == ["Hi.", "Hi."]


async def test_the_audio_cache_stays_within_its_bound_and_keeps_the_greeting(fake: FakeTTS) -> None:
    sentences = [f"Sentence number {n}." for n in range(12)]
    model = Scripted("scripted", [" ".join(sentences)])
    app = main.create_app(openai_env(fake, LLM_PROVIDER="scripted", BLOB_CACHE_BYTES="6000", GREETING="Hi."),
                          plugins=[plugin(llm=[model])])
    backend = app.state.calls.backend
    async with running(app) as client:
        twilio = Twilio(client)
        [greeting] = plays((await twilio.call()).content)
        docs = await twilio.follow(await twilio.say("count"))
        urls = [u for d in docs for u in plays(d.content)]
        got = [await fetch(client, u) for u in urls]
        greeting_again = await fetch(client, greeting)
    assert backend.blob_bytes <= 6000 and len(urls) == 12
    kept = [(g.content, fake.audio_of(s)) for g, s in zip(got, sentences, strict=True) if g.status_code == 200]
    assert 0 < len(kept) <= 4 and all(a == b for a, b in kept)  # at most 6000 bytes of 1.2 kB sentences
    assert {g.status_code for g in got} == {200, 404}
    assert greeting_again.status_code == 200 and greeting_again.content == fake.audio_of("Hi.")
    assert fake.texts().count("Hi.") == 1


async def test_audio_keys_are_validated_unguessable_and_the_same_on_every_replica(fake: FakeTTS) -> None:
    other = "another-made-up-token-fedcba987654"
    apps = [main.create_app(openai_env(fake, GREETING="Hi.")), main.create_app(openai_env(fake, GREETING="Hi.")),
            main.create_app(openai_env(fake, GREETING="Hi.") | {"TWILIO_AUTH_TOKEN": other})]
    urls = []
    for app in apps:
        async with running(app) as client:
            token = app.state.settings.twilio_auth_token
            urls.append(plays((await Twilio(client, token=token).call()).content)[0])
            if len(urls) == 1:
                key = urls[0].rsplit("/", 1)[1]
                answers = {path: await client.request(method, path) for method, path in [
                    ("GET", "/audio/" + "0" * 32 + ".mp3"), ("GET", "/audio/" + key[:-4] + ".wav"),
                    ("GET", "/audio/zzz.mp3"), ("GET", "/audio/" + key[:-4]), ("GET", "/audio/" + key[:-4] + ".ogg"),
                    ("GET", "/audio/" + key.upper()), ("GET", "/audio/" + key + "/more"), ("POST", "/audio/" + key)]}
                head = await client.head("/audio/" + key)
    assert [a.status_code for a in answers.values()] == [404, 404, 400, 400, 400, 400, 400, 405]
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(fake.calls[0].audio)))
    assert urls[0] == urls[1] != urls[2]


def test_config_errors_name_what_to_set() -> None:
    with pytest.raises(main.ConfigError, match="OPENAI_API_KEY is not set; TTS_VOICE=openai needs it"):
        main.create_app(env(TTS_VOICE="openai"))
    with pytest.raises(main.ConfigError, match="OPENAI_TTS_FORMAT='ogg' is not playable by Twilio; use mp3 or wav"):
        main.create_app(env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, OPENAI_TTS_FORMAT="ogg"))
    with pytest.raises(main.ConfigError, match=r"FALLBACK_SAY_VOICE='Joanna' is not .*; did you mean 'Polly.Joanna'\?"):
        main.create_app(env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, FALLBACK_SAY_VOICE="Joanna"))
    with pytest.raises(main.ConfigError, match="TTS_TIMEOUT='soon' is not valid: set it to a number of seconds above 0"):
        main.create_app(env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, TTS_TIMEOUT="soon"))


def test_the_sdk_is_imported_only_when_the_voice_opens() -> None:
    code = ("import sys, main; s = main.load_settings({'TWILIO_AUTH_TOKEN': 't', 'TTS_VOICE': 'openai', "
            "'OPENAI_API_KEY': 'k'}); main.select(main.plugin_manager(), 'tts', ['openai'], s); "
            "print('openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_relay_mode_gets_a_documented_amazon_voice(logs: Captured) -> None:
    observe.setup_logging(main.load_settings(env()))  # as create_app does: info lines are logged
    voice = OpenAIVoice(main.load_settings(env(OPENAI_API_KEY=KEY)))
    assert voice.relay_attrs() == voice.relay_attrs() == {"ttsProvider": "Amazon", "voice": "Joanna-Neural"}
    assert [line for line in logs.lines if "ConversationRelay" in line] == [
        "info OpenAI voices are not available in ConversationRelay; relay mode speaks with an Amazon voice "
        "relay_voice=Joanna-Neural"]


def test_a_real_process_plays_and_serves_the_audio(fake: FakeTTS) -> None:
    extra = {"TTS_VOICE": "openai", "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake.url + "/v1", "GREETING": "Hi.",
             "PUBLIC_URL": ""}
    with server(extra) as (base, _proc, _log):
        params = {"CallSid": "CA" + "1" * 32, "From": "+15005550006", "To": "+15005550001"}
        signature = webhooks.twilio_signature(TOKEN, base + "/voice", list(params.items()))
        answer = httpx.post(base + "/voice", data=params, headers={"x-twilio-signature": signature})
        url = ET.fromstring(answer.content).find("Gather/Play").text or ""  # type: ignore[union-attr]
        got = httpx.get(url)
    assert url.startswith(base + "/audio/") and got.content == fake.audio_of("Hi.")
    assert got.headers["content-type"] == "audio/mpeg"

