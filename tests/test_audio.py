"""Hosted audio: each text voiced once, served at unguessable /audio keys by any replica, <Say> when too slow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import BASE, GATHER, Scripted, Twilio, fetch, openai_env, played, plays, plugin, running, tree, twiml
from fake_tts import FakeTTS, fake_tts
from test_session_contract import BACKENDS, backend_env

import main


@pytest.fixture
def fake() -> Iterator[FakeTTS]:
    with fake_tts("openai") as f:
        yield f


# ----------------------------------------------------------------------------- voiced once


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


async def test_a_slow_vendor_falls_back_in_time_and_its_audio_serves_the_next_call(fake: FakeTTS) -> None:
    fake.delay = 0.6
    app = main.create_app(openai_env(fake, TTS_TIMEOUT="0.2", GREETING="Hi."))
    async with running(app) as client:
        first = await Twilio(client).call()
        await asyncio.sleep(0.8)
        second = await Twilio(client).call()
    assert tree(first.content) == twiml(
        lambda r: r.gather(**GATHER).say("Hi.", voice="Polly.Joanna-Neural", language="en-US")
    )
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


# ----------------------------------------------------------------------------- served by any replica


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
    build = lambda: main.select(main.plugin_manager(), "session", [settings.session_backend], settings)[0]  # noqa: E731
    first = build()
    second = first if request.param == "memory" else build()
    for backend in {id(first): first, id(second): second}.values():
        await backend.aopen()
    yield Shared(first), Shared(second)
    for backend in {id(first): first, id(second): second}.values():
        await backend.aclose()


async def test_a_second_replica_serves_the_audio_and_reuses_the_greeting(fake: FakeTTS, stores: Any) -> None:
    model = Scripted("scripted", ["One sentence only."])
    apps = [
        main.create_app(
            openai_env(fake, LLM_PROVIDER="scripted", SESSION_BACKEND="shared", GREETING="Hi."),
            plugins=[plugin(llm=[model], session={"shared": store})],
        )
        for store in stores
    ]
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
    app = main.create_app(
        openai_env(fake, LLM_PROVIDER="scripted", BLOB_CACHE_BYTES="6000", GREETING="Hi."),
        plugins=[plugin(llm=[model])],
    )
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
    apps = [
        main.create_app(openai_env(fake, GREETING="Hi.")),
        main.create_app(openai_env(fake, GREETING="Hi.")),
        main.create_app(openai_env(fake, GREETING="Hi.") | {"TWILIO_AUTH_TOKEN": other}),
    ]
    urls = []
    for app in apps:
        async with running(app) as client:
            token = app.state.settings.twilio_auth_token
            urls.append(plays((await Twilio(client, token=token).call()).content)[0])
            if len(urls) == 1:
                key = urls[0].rsplit("/", 1)[1]
                answers = {
                    path: await client.request(method, path)
                    for method, path in [
                        ("GET", "/audio/" + "0" * 32 + ".mp3"),
                        ("GET", "/audio/" + key[:-4] + ".wav"),
                        ("GET", "/audio/zzz.mp3"),
                        ("GET", "/audio/" + key[:-4]),
                        ("GET", "/audio/" + key[:-4] + ".ogg"),
                        ("GET", "/audio/" + key.upper()),
                        ("GET", "/audio/" + key + "/more"),
                        ("POST", "/audio/" + key),
                    ]
                }
                head = await client.head("/audio/" + key)
    assert [a.status_code for a in answers.values()] == [404, 404, 400, 400, 400, 400, 400, 405]
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(fake.calls[0].audio)))
    assert urls[0] == urls[1] != urls[2]
