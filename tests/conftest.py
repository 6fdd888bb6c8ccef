"""Shared test helpers: a signed Twilio stand-in for the test client, TwiML as comparable trees,
scripted in-process models, hosted audio from the fake OpenAI voice, and real server processes
started with the Procfile's command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from twilio.twiml.voice_response import VoiceResponse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fake_llm import fake_llm  # noqa: E402,F401  (the fake OpenAI/Anthropic server fixture, for every test module)
from fake_realtime import fake_realtime  # noqa: E402,F401  (the fake OpenAI Realtime server fixture)
from fake_tts import KEY, FakeTTS  # noqa: E402

import main  # noqa: E402
import observe  # noqa: E402
import phone  # noqa: E402
import webhooks  # noqa: E402
from main import LLMProvider, Message, ProviderError, hookimpl  # noqa: E402

TOKEN = "made-up-test-token-0123456789abcdef"
BASE = "http://testserver.local"
GATHER = dict(
    input="speech",
    speech_timeout="auto",
    action_on_empty_result=True,
    action="/process-speech",
    method="POST",
    language="en-US",
)
VOICE = dict(voice="Polly.Joanna-Neural", language="en-US")
GREETING = "Hello! You are talking to switchboard. How can I help?"
AUDIO_URL = re.compile(re.escape(BASE) + r"/audio/[0-9a-f]{32}\.(mp3|wav)")


def env(**overrides: str) -> dict[str, str]:
    """A test environment: made-up token, offline defaults, overrides by env var name."""
    return {"TWILIO_AUTH_TOKEN": TOKEN, **overrides}


def new_call_sid() -> str:
    return "CA" + secrets.token_hex(16)


# -- TwiML as trees


def tree(xml: str | bytes) -> tuple[Any, ...]:
    """A TwiML document as nested (tag, attributes, text, children) tuples, for whole-structure asserts."""

    def node(el: ET.Element) -> tuple[Any, ...]:
        return (el.tag, dict(el.attrib), (el.text or "").strip(), tuple(node(c) for c in el))

    return node(ET.fromstring(xml))


def twiml(build: Callable[[VoiceResponse], Any]) -> tuple[Any, ...]:
    """The expected tree, built with the twilio package's VoiceResponse as an independent oracle."""
    response = VoiceResponse()
    build(response)
    return tree(str(response))


def listening(*texts: str, voice: dict[str, str] | None = None) -> tuple[Any, ...]:
    """<Response><Say>…</Say>…<Gather><Say>last</Say></Gather></Response>."""
    attrs = VOICE if voice is None else voice

    def build(r: VoiceResponse) -> None:
        for text in texts[:-1]:
            r.say(text, **attrs)
        g = r.gather(**GATHER)
        if texts:
            g.say(texts[-1], **attrs)

    return twiml(build)


def continuing(*texts: str, url: str) -> tuple[Any, ...]:
    """Speech followed by a <Redirect> to the continuation."""

    def build(r: VoiceResponse) -> None:
        for text in texts:
            r.say(text, **VOICE)
        r.redirect(url, method="POST")

    return twiml(build)


def says(xml: str | bytes) -> list[str]:
    """Every <Say> text in document order."""
    return [el.text or "" for el in ET.fromstring(xml).iter("Say")]


def redirect_of(xml: str | bytes) -> str | None:
    el = ET.fromstring(xml).find("Redirect")
    return None if el is None else (el.text or "")


def voice_attrs(app: Litestar) -> dict[str, str]:
    """The selected voice's ConversationRelay attributes (the TTS plugin's part of the document)."""
    return app.state.calls.voice.relay_attrs()


def connect_doc(
    url: str, *, greeting: str = GREETING, action: str = "/relay-action", attempt: str = "1", **voice: str
) -> tuple[Any, ...]:
    """The expected document, built with the twilio package's VoiceResponse."""

    def build(r: VoiceResponse) -> None:
        relay_noun = r.connect(action=action).conversation_relay(
            url=url, welcome_greeting=greeting, language="en-US", interruptible="any", dtmf_detection=True, **voice
        )
        relay_noun.parameter(name="attempt", value=attempt)

    return twiml(build)


def plays(xml: bytes) -> list[str]:
    """Every <Play> URL of a document, in order."""
    urls = [el.text or "" for el in ET.fromstring(xml).iter("Play")]
    assert all(AUDIO_URL.fullmatch(u) for u in urls), urls
    return urls


def played(*urls: str, gather: dict[str, Any] = GATHER) -> tuple[Any, ...]:
    """<Play>…<Gather><Play>last</Play></Gather>, built with the twilio package."""

    def build(r: Any) -> None:
        for url in urls[:-1]:
            r.play(url)
        r.gather(**gather).play(urls[-1])

    return twiml(build)


# -- the Twilio stand-in


class Twilio:
    """Signs and posts webhooks the way Twilio does, against an AsyncTestClient."""

    def __init__(
        self,
        client: AsyncTestClient[Litestar] | httpx.AsyncClient,
        *,
        token: str = TOKEN,
        call_sid: str | None = None,
        base: str = BASE,
    ) -> None:
        self.client = client
        self.token = token
        self.base = base  # the base URL Twilio calls (and signs), e.g. PUBLIC_URL
        self.call_sid = call_sid or new_call_sid()
        self.params = {
            "AccountSid": "AC" + "0" * 32,
            "CallSid": self.call_sid,
            "From": "+15005550006",
            "To": "+15005550001",
            "Direction": "inbound",
            "CallStatus": "in-progress",
        }

    async def post(self, path: str, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
        data = self.params | params
        signature = webhooks.twilio_signature(self.token, self.base + path, list(data.items()))
        return await self.client.post(
            path,
            content=urlencode(data),
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "x-twilio-signature": signature,
                **(headers or {}),
            },
        )

    async def call(self) -> httpx.Response:
        return await self.post("/voice", CallStatus="ringing")

    async def say(self, text: str, confidence: str = "0.9") -> httpx.Response:
        return await self.post("/process-speech", SpeechResult=text, Confidence=confidence)

    async def follow(self, response: httpx.Response) -> list[httpx.Response]:
        """Follow <Redirect>s until a document listens or ends; return every document."""
        docs = [response]
        while (url := redirect_of(docs[-1].content)) is not None:
            docs.append(await self.post(url))
        return docs

    async def turn(self, text: str) -> list[str]:
        """Say something and return everything the agent speaks in reply."""
        docs = await self.follow(await self.say(text))
        return [t for d in docs for t in says(d.content)]


@contextlib.asynccontextmanager
async def running(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The app with its lifespan, behind Litestar's AsyncTestClient (one request at a time)."""
    async with AsyncTestClient(app) as client:
        yield client


@contextlib.asynccontextmanager
async def concurrent(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan in this event loop, taking concurrent requests like a real server.

    (AsyncTestClient runs the app behind a blocking portal, so it serialises requests.)"""
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as client:
        yield client


# -- scripted models, registered as plugins


class Scripted(LLMProvider):
    """An in-process model: answers from a script, with controllable delays, and records its inputs."""

    def __init__(
        self,
        name: str = "scripted",
        replies: Sequence[str] = ("Hello there.",),
        *,
        ttft: float = 0.0,
        gap: float = 0.0,
        fail: Exception | None = None,
        stall_after: int | None = None,
    ) -> None:
        self.name = name
        self.replies = list(replies)
        self.ttft, self.gap, self.fail, self.stall_after = ttft, gap, fail, stall_after
        self.calls: list[list[Message]] = []
        self.closed = 0

    async def stream(
        self, messages: Sequence[Message], *, system: str, tools: Sequence[Any] = ()
    ) -> AsyncIterator[Any]:
        self.calls.append(list(messages))
        reply = self.replies[min(len(self.calls), len(self.replies)) - 1]
        try:
            await asyncio.sleep(self.ttft)
            if self.fail is not None:
                raise self.fail
            for i, word in enumerate(reply.split(" ")):
                if i == self.stall_after:
                    await asyncio.Event().wait()  # a model that stops mid-reply and never recovers
                yield word if i == 0 else " " + word
                await asyncio.sleep(self.gap)
        finally:
            self.closed += 1


def words(reply: str) -> list[str]:
    """How Scripted cuts a reply into tokens."""
    return [w if i == 0 else " " + w for i, w in enumerate(reply.split(" "))]


def plugin(**providers: Any) -> object:
    """A plugin object registering ready-made objects: llm=..., tts=..., session=... by their names."""

    class Plugin:
        @hookimpl
        def register_llm_providers(self, register: Any) -> None:
            for obj in providers.get("llm", []):
                register(obj.name, lambda settings, obj=obj: obj)

        @hookimpl
        def register_tts_voices(self, register: Any) -> None:
            for name, obj in providers.get("tts", {}).items():
                register(name, lambda settings, obj=obj: obj)

        @hookimpl
        def register_session_backends(self, register: Any) -> None:
            for name, obj in providers.get("session", {}).items():
                register(name, lambda settings, obj=obj: obj)

    return Plugin()


def scripted_app(model: Scripted, **overrides: str) -> Litestar:
    return main.create_app(env(LLM_PROVIDER=model.name, **overrides), plugins=[plugin(llm=[model])])


# -- hosted audio, from the OpenAI voice against its fake speech endpoint (fake_tts)


def openai_env(fake: FakeTTS, **extra: str) -> dict[str, str]:
    return env(TTS_VOICE="openai", OPENAI_API_KEY=KEY, OPENAI_BASE_URL=fake.url + "/v1", **extra)


async def fetch(client: Any, url: str) -> httpx.Response:
    return await client.get(url.removeprefix(BASE))


# -- logs


class Captured(logging.Handler):
    """Collects switchboard's formatted log lines."""

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__()
        self.setFormatter(observe.LogFormatter(json_lines))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[Captured]:
    """Every line switchboard logs during the test (attached after create_app configures logging)."""
    handler = Captured()
    logger = logging.getLogger("switchboard")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# -- real server processes


@contextlib.contextmanager
def server(
    extra_env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A real agent process started with the Procfile's command; yields (base URL, process, log path)."""
    port = port or phone.free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"switchboard-test-{port}.log"
    proc = phone.start_local(port, TOKEN, extra_env or {}, log_path)
    try:
        yield f"http://127.0.0.1:{port}", proc, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the shared Valkey/Redis server (never flushed: other runs use it at the same time)

VALKEY_URL = os.environ.get("TEST_VALKEY_URL", "redis://127.0.0.1:6379/0")
VALKEY_PREFIX = "sbtest-" + secrets.token_hex(4)  # every key this run writes starts with it


@pytest.fixture(scope="session", autouse=True)
def _delete_this_runs_valkey_keys() -> Iterator[None]:
    """When the run ends, delete its keys (and only its keys) from the shared server."""
    yield
    import valkey

    with contextlib.suppress(valkey.ConnectionError), valkey.Valkey.from_url(VALKEY_URL) as client:
        for key in client.scan_iter(match=f"{VALKEY_PREFIX}*", count=1000):
            client.unlink(key)


# -- a three-node Valkey Cluster of this run's own (started by the first test that needs it)

_cluster: list[Any] = []


def shared_cluster() -> Any:
    """The run's cluster (tests/valkey_cluster.py), started once on first use and stopped when the run ends."""
    if not _cluster:
        import tempfile

        from valkey_cluster import Cluster

        cluster = Cluster(Path(tempfile.mkdtemp(prefix="sb-cluster-")))
        _cluster.append(cluster)
        cluster.start()
    return _cluster[0]


@pytest.fixture(scope="session", autouse=True)
def _stop_the_cluster() -> Iterator[None]:
    yield
    for cluster in _cluster:
        cluster.stop()


__all__ = ["ProviderError", "Scripted"]
