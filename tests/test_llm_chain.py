"""The core's LLM chain with real providers: retries, first-token timeouts, fallback, degraded mode and usage,
driven through the app (signed like Twilio) with the OpenAI and Anthropic plugins against fake vendor servers."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec
import pytest
from conftest import (
    TOKEN,
    VOICE,
    Captured,
    Scripted,
    Twilio,
    env,
    listening,
    plugin,
    running,
    says,
    server,
    tree,
    twiml,
)
from fake_llm import FakeLLM, Reply

import main
import phone
from main import Usage


def session_of(app: Any, call_sid: str) -> main.Session:
    return msgspec.msgpack.decode(app.state.calls.backend.calls[call_sid].session, type=main.Session)


async def sdks_loaded(app: Any) -> None:
    """Wait until every provider has imported its SDK in the background (a fresh process takes about a second)."""
    for _ in range(500):
        if all(getattr(p, "client", True) is not None for p in app.state.calls.llm.providers):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the SDKs did not load")


def lines(logs: Captured, start: str) -> list[str]:
    return [line for line in logs.lines if line.startswith(start)]


async def test_a_stalled_first_token_falls_back_to_the_next_provider(fake_llm: FakeLLM, logs: Captured) -> None:
    with FakeLLM() as openai:
        fake_llm.script(Reply("Too late.", ttft=30), Reply("Anthropic is back."))
        openai.script(Reply("Hello from OpenAI.", input_tokens=12, output_tokens=4))
        app = main.create_app(
            env(
                LLM_PROVIDER="anthropic,openai",
                LLM_FIRST_TOKEN_TIMEOUT="0.5",
                **fake_llm.env("anthropic"),
                **openai.env("openai"),
            )
        )
        async with running(app) as client:
            twilio = Twilio(client)
            await twilio.call()
            await sdks_loaded(app)  # the 0.5 s first-token timeout must not include a cold SDK import
            answer = await twilio.say("hello")
            again = await twilio.say("are you there")
            session = session_of(app, twilio.call_sid)
        await fake_llm.until(lambda: fake_llm.posts[0].closed_early)  # the stalled stream was closed, not leaked
    assert tree(answer.content) == listening("Hello from OpenAI.")
    assert tree(again.content) == listening("Anthropic is back.")  # the chain starts from the first provider each turn
    sid = twilio.call_sid
    assert lines(logs, "warning provider failed") == [
        f"warning provider failed provider=anthropic call={sid} attempt=1 error=no first token in time turn=1"
    ]
    turns = lines(logs, "info request route=/process-speech")  # the request's one line names the provider
    assert [re.sub(r" ms=.*", "", line) for line in turns] == [
        f"info request route=/process-speech status=200 call={sid} turn=1 provider=openai",
        f"info request route=/process-speech status=200 call={sid} turn=2 provider=anthropic",
    ]
    assert session.providers == ["openai"] and session.usage == {"openai": Usage(input_tokens=12, output_tokens=4)}


@pytest.mark.parametrize(
    ("vendor", "status"), [("openai", 429), ("openai", 500), ("anthropic", 429), ("anthropic", 529)]
)
async def test_rate_limits_and_server_errors_are_retried_then_answered(
    fake_llm: FakeLLM, logs: Captured, vendor: str, status: int
) -> None:
    fake_llm.script(Reply(status=status, retry_after="1", message="try later"), Reply("Second time lucky."))
    app = main.create_app(env(LLM_PROVIDER=vendor, **fake_llm.env(vendor)))
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.say("hello")
    assert tree(answer.content) == listening("Second time lucky.")
    assert len(fake_llm.posts) == 2
    [failed] = lines(logs, "warning provider failed")
    assert failed.startswith(
        f"warning provider failed provider={vendor} call={twilio.call_sid} attempt=1 error={vendor} HTTP {status}"
    )


async def test_a_stream_cut_mid_reply_keeps_what_was_spoken_and_apologises(fake_llm: FakeLLM, logs: Captured) -> None:
    fake_llm.script(Reply("The first sentence is here. And then the line goes", cut_after=6))
    app = main.create_app(env(LLM_PROVIDER="openai", **fake_llm.env("openai")))
    async with running(app) as client:
        twilio = Twilio(client)
        docs = await twilio.follow(await twilio.say("tell me something"))
    apology = app.state.settings.apology
    assert [t for d in docs for t in says(d.content)] == ["The first sentence is here.", apology]
    assert tree(docs[-1].content)[3][-1] == listening(apology)[3][-1]  # the apology is spoken inside <Gather>
    assert len(fake_llm.posts) == 1  # never retried after the first token: nothing is said twice
    [error] = lines(logs, "error provider error")
    assert f"call={twilio.call_sid}" in error and "provider=openai" in error and "connection failed" in error


@pytest.mark.parametrize("fallback_number", ["", "+15005550009"])
async def test_when_every_provider_fails_the_caller_hears_an_apology(fake_llm: FakeLLM, fallback_number: str) -> None:
    with FakeLLM() as openai:
        fake_llm.default = Reply(status=529)
        openai.default = Reply(status=500)
        app = main.create_app(
            env(
                LLM_PROVIDER="anthropic,openai",
                FALLBACK_NUMBER=fallback_number,
                **fake_llm.env("anthropic"),
                **openai.env("openai"),
            )
        )
        async with running(app) as client:
            answer = await Twilio(client).say("hello")
    apology = app.state.settings.apology
    if fallback_number:

        def expected(r: Any) -> None:
            r.say(apology, **VOICE)
            r.dial(fallback_number)

        assert tree(answer.content) == twiml(expected)  # a person picks up
    else:
        assert tree(answer.content) == listening(apology)  # the agent keeps listening
    assert (len(fake_llm.posts), len(openai.posts)) == (2, 2)  # each provider: one try and one retry


async def test_a_plugin_bug_in_one_provider_falls_back_to_the_next(logs: Captured) -> None:
    class Broken(Scripted):
        def stream(self, messages: Any, *, system: str, tools: Any = ()) -> Any:
            raise RuntimeError("bug in a plugin")

    good = Scripted("good", replies=["Still here."])
    app = main.create_app(env(LLM_PROVIDER="broken,good"), plugins=[plugin(llm=[Broken("broken"), good])])
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.say("hello")
    assert tree(answer.content) == listening("Still here.")
    assert lines(logs, "warning provider failed") == [
        f"warning provider failed provider=broken call={twilio.call_sid} attempt=1 "
        "error=RuntimeError: bug in a plugin turn=1"
    ]


async def test_each_turn_records_its_provider_and_usage(fake_llm: FakeLLM) -> None:
    with FakeLLM() as openai:
        fake_llm.script(
            Reply("From Claude.", input_tokens=10, output_tokens=3),
            Reply(status=500),
            Reply("Claude again.", input_tokens=30, output_tokens=3),
        )
        openai.script(Reply("From GPT.", input_tokens=20, output_tokens=4))
        app = main.create_app(
            env(LLM_PROVIDER="anthropic,openai", LLM_RETRIES="0", **fake_llm.env("anthropic"), **openai.env("openai"))
        )
        async with running(app) as client:
            twilio = Twilio(client)
            spoken = [await twilio.turn(text) for text in ("one", "two", "three", "four")]
            session = session_of(app, twilio.call_sid)
    assert spoken[:3] == [["From Claude."], ["From GPT."], ["Claude again."]]
    assert session.providers == ["anthropic", "openai", "anthropic"]
    assert session.usage == {
        "anthropic": Usage(input_tokens=40, output_tokens=6),
        "openai": Usage(input_tokens=20, output_tokens=4),
    }


async def test_markdown_and_emoji_from_the_model_are_cleaned_before_speaking(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("**Sure!** Our menu:\n- Pizza 🍕\n- Pasta\nSee [the site](https://x.example) 😀"))
    app = main.create_app(env(LLM_PROVIDER="anthropic", **fake_llm.env("anthropic")))
    async with running(app) as client:
        twilio = Twilio(client)
        spoken = await twilio.turn("what do you have")
    assert spoken == ["Sure! Our menu:", "Pizza", "Pasta", "See the site"]


def test_the_dev_phone_talks_to_a_real_server_process_using_anthropic(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("Hi! I am the fake Claude. How can I help?"))
    extra = {"LLM_PROVIDER": "anthropic", "GREETING": "Hello caller.", **fake_llm.env("anthropic")}
    with server(extra) as (url, _, log_path):
        caller = phone.Phone(url, TOKEN, out=lambda line: None)
        outcome = caller.run(iter([("hello there", 0.9)]))
    assert outcome == "completed"
    assert caller.spoken == ["Hello caller.", "Hi!", "I am the fake Claude.", "How can I help?"]
    assert [(r.method, r.path) for r in fake_llm.requests] == [("GET", "/v1/models"), ("POST", "/v1/messages")]
    assert fake_llm.posts[0].body["messages"] == [{"role": "user", "content": "hello there"}]
    assert "provider=anthropic" in log_path.read_text()
