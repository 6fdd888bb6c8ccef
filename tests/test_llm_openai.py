"""The OpenAI provider, through the real `openai` SDK against the fake vendor server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from conftest import ROOT, Captured, Twilio, env, listening, running, says, tree
from fake_llm import FakeLLM, Reply

import main
from main import Message, ProviderError, ToolCall, ToolSpec, Usage
from plugins.llm_openai import OpenAIProvider

TRANSFER = ToolSpec(
    name="transfer_call",
    description="Transfer the caller to a person.",
    parameters={"type": "object", "properties": {"destination": {"type": "string"}}, "required": ["destination"]},
)


@contextlib.asynccontextmanager
async def opened(fake: FakeLLM, **extra: str) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(main.load_settings(env(LLM_PROVIDER="openai", **fake.env("openai", **extra))))
    await provider.aopen()
    try:
        yield provider
    finally:
        await provider.aclose()


async def collect(provider: OpenAIProvider, messages: list[Message], tools: tuple[ToolSpec, ...] = ()) -> list[Any]:
    return [e async for e in provider.stream(messages, system="Be brief.", tools=tools)]


def test_a_missing_key_says_what_to_set() -> None:
    with pytest.raises(main.ConfigError) as e:
        main.create_app(env(LLM_PROVIDER="openai"))
    assert str(e.value) == (
        "OPENAI_API_KEY is not set; LLM_PROVIDER=openai needs it. Set OPENAI_API_KEY, or choose another plugin."
    )
    with pytest.raises(main.ConfigError, match="OPENAI_MAX_TOKENS='lots' is not valid"):
        main.create_app(env(LLM_PROVIDER="openai", OPENAI_API_KEY="k", OPENAI_MAX_TOKENS="lots"))


def test_building_the_app_does_not_import_the_sdk() -> None:
    code = (
        "import sys, main; main.create_app({'TWILIO_AUTH_TOKEN': 't', 'LLM_PROVIDER': 'openai,anthropic', "
        "'OPENAI_API_KEY': 'k', 'ANTHROPIC_API_KEY': 'k'}); "
        "print(sorted({'openai', 'anthropic', 'httpx2'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_tokens_stream_in_order_then_tool_calls_then_usage(fake_llm: FakeLLM) -> None:
    call = ToolCall(id="call_7", name="transfer_call", arguments={"destination": "sales", "note": 'wants a "human"'})
    fake_llm.script(Reply("One moment, transferring you.", tool_calls=[call], input_tokens=42, output_tokens=17))
    async with opened(fake_llm) as provider:
        events = await collect(provider, [Message(role="user", content="transfer me")], tools=(TRANSFER,))
    assert events == ["One", " moment,", " transferring", " you.", call, Usage(input_tokens=42, output_tokens=17)]
    body = fake_llm.posts[0].body
    assert body == {
        "model": "gpt-5.4-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 400,
        "reasoning_effort": "none",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "transfer me"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "transfer_call",
                    "description": "Transfer the caller to a person.",
                    "parameters": TRANSFER.parameters,
                },
            }
        ],
    }
    assert fake_llm.posts[0].headers["authorization"] == "Bearer made-up-openai-key"


async def test_two_tool_calls_are_assembled_by_index(fake_llm: FakeLLM) -> None:
    calls = [
        ToolCall(id="call_a", name="lookup", arguments={"q": "hours"}),
        ToolCall(id="call_b", name="end_call", arguments={}),
    ]
    fake_llm.script(Reply(tokens=[], tool_calls=calls))
    async with opened(fake_llm, OPENAI_MODEL="llama3.2", OPENAI_MAX_TOKENS="120") as provider:
        events = await collect(provider, [Message(role="user", content="hi")])
    assert events[:2] == calls and isinstance(events[2], Usage)
    assert fake_llm.posts[0].body["model"] == "llama3.2" and fake_llm.posts[0].body["max_tokens"] == 120
    assert "reasoning_effort" not in fake_llm.posts[0].body  # a chosen model keeps its own default


async def test_history_with_tool_calls_and_results_is_sent_in_openai_form(fake_llm: FakeLLM) -> None:
    history = [
        Message(role="user", content="what are your hours"),
        Message(
            role="assistant",
            content="Let me check.",
            tool_calls=(ToolCall(id="c1", name="hours", arguments={"day": "mon"}),),
        ),
        Message(role="tool", content="9 to 5", tool_call_id="c1"),
        Message(role="assistant", content="We open at nine.", interrupted=True),
        Message(role="user", content="thanks"),
    ]
    async with opened(fake_llm) as provider:
        await collect(provider, history)
    assert fake_llm.posts[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what are your hours"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "hours", "arguments": '{"day": "mon"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "9 to 5"},
        {"role": "assistant", "content": "We open at nine."},
        {"role": "user", "content": "thanks"},
    ]


@pytest.mark.parametrize(
    ("reply", "spoken", "message", "retryable", "chained"),
    [
        (
            Reply(status=429, retry_after="2", message="Rate limit reached"),
            [],
            "openai HTTP 429: Error code: 429",
            True,
            "RateLimitError",
        ),
        (Reply(status=500), [], "openai HTTP 500", True, "InternalServerError"),
        (Reply(status=503), [], "openai HTTP 503", True, "InternalServerError"),
        (Reply(status=400, message="bad model"), [], "openai HTTP 400", False, "BadRequestError"),
        (
            Reply("One two three four.", cut_after=2),
            ["One", " two"],
            "openai connection failed: RemoteProtocolError",
            True,
            "APIConnectionError",
        ),
        (
            Reply("One two three four.", malformed_after=1),
            ["One"],
            "openai malformed reply: JSONDecodeError",
            False,
            "JSONDecodeError",
        ),
        (
            Reply("One two three four.", error_after=3),
            ["One", " two", " three"],
            "openai error in the stream: Overloaded",
            True,
            "APIError",
        ),
        (
            Reply("One two three four.", end_after=2),
            ["One", " two"],
            "openai reply stream ended before the model finished",
            True,
            "NoneType",
        ),
    ],
)
async def test_vendor_failures_become_provider_errors(
    fake_llm: FakeLLM, reply: Reply, spoken: list[str], message: str, retryable: bool, chained: str
) -> None:
    fake_llm.script(reply)
    got: list[Any] = []
    async with opened(fake_llm) as provider:
        with pytest.raises(ProviderError) as e:
            async for event in provider.stream([Message(role="user", content="hi")], system=""):
                got.append(event)
    assert got == spoken
    assert str(e.value).startswith(message), str(e.value)
    assert (e.value.provider, e.value.retryable) == ("openai", retryable)
    assert type(e.value.__cause__).__name__ == chained


async def test_an_unreachable_server_is_a_retryable_connection_error() -> None:
    with FakeLLM() as fake:
        settings = main.load_settings(env(**fake.env("openai")))
    provider = OpenAIProvider(settings)  # the fake has stopped: nothing listens on its port
    with pytest.raises(ProviderError, match="openai connection failed: ConnectError") as e:
        await collect(provider, [Message(role="user", content="hi")])
    await provider.aclose()
    assert e.value.retryable and type(e.value.__cause__).__name__ == "APIConnectionError"


async def test_warm_opens_the_connection_that_the_first_turn_reuses(fake_llm: FakeLLM) -> None:
    async with opened(fake_llm) as provider:
        assert fake_llm.connections == 0
        await provider.warm()
        assert fake_llm.connections == 1 and [r.path for r in fake_llm.requests] == ["/v1/models"]
        assert await collect(provider, [Message(role="user", content="hi")]) != []
    assert fake_llm.connections == 1  # the turn used the warm connection: no new DNS, TCP or TLS
    assert [(r.method, r.path) for r in fake_llm.requests] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]


async def test_warming_is_best_effort_and_says_why_it_failed(logs: Captured) -> None:
    with FakeLLM() as fake:
        settings = main.load_settings(env(**fake.env("openai")))
    provider = OpenAIProvider(settings)  # nothing listens on the port any more
    await provider.warm()
    await provider.aclose()
    [line] = logs.lines
    assert line.startswith(
        "warning provider warm-up failed provider=openai error=openai connection failed: ConnectError"
    )


async def test_closing_the_stream_early_closes_it_at_the_server(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("one two three four five six seven eight", gap=0.05))
    async with opened(fake_llm) as provider:
        events = provider.stream([Message(role="user", content="hi")], system="")
        assert [await anext(events), await anext(events)] == ["one", " two"]
        await events.aclose()
        await fake_llm.until(lambda: fake_llm.posts[0].closed_early)
    assert not fake_llm.posts[0].completed


async def test_a_whole_call_through_the_app_with_openai(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Reply("Sure. We are open from nine to five.", input_tokens=30, output_tokens=9),
        Reply("You are welcome!", input_tokens=50, output_tokens=4),
    )
    app = main.create_app(env(LLM_PROVIDER="openai", MAX_TURNS="1", **fake_llm.env("openai")))
    async with running(app) as client:
        twilio = Twilio(client)
        greeting = await twilio.call()
        await fake_llm.until(lambda: fake_llm.requests)  # the warm-up, in the background of /voice
        first = await twilio.follow(await twilio.say("When are you open?"))
        second = await twilio.follow(await twilio.say("Thanks"))
        sid = twilio.call_sid
        session = msgspec.msgpack.decode(app.state.calls.backend.calls[sid].session, type=main.Session)
    assert tree(greeting.content) == listening(app.state.settings.greeting)
    assert [t for d in first for t in says(d.content)] == ["Sure.", "We are open from nine to five."]
    assert tree(first[-1].content)[3][-1][0] == "Gather"  # the last part is spoken inside the next <Gather>
    assert tree(second[-1].content) == listening("You are welcome!")
    assert [(r.method, r.path) for r in fake_llm.requests] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
    ]
    assert fake_llm.posts[1].body["messages"] == [  # system + the last MAX_TURNS turns + the new one
        {"role": "system", "content": app.state.settings.system_prompt},
        {"role": "user", "content": "When are you open?"},
        {"role": "assistant", "content": "Sure. We are open from nine to five."},
        {"role": "user", "content": "Thanks"},
    ]
    assert session.providers == ["openai"]  # the first turn is closed; the second is still current
    assert session.usage == {"openai": Usage(input_tokens=30, output_tokens=9)}


HISTORY = [  # non-ASCII on every path: caller text, a tool call's arguments, a tool result, the reply
    Message(role="user", content="Grüße aus Köln — habt ihr heute geöffnet? 今日は営業していますか"),
    Message(
        role="assistant",
        content="Ich schaue nach …",
        tool_calls=(ToolCall(id="call_ü", name="hours", arguments={"tag": "Montag", "ort": "Köln ✓"}),),
    ),
    Message(role="tool", content="9–17 Uhr «geöffnet»", tool_call_id="call_ü"),
    Message(role="assistant", content="Ja, von neun bis siebzehn Uhr. 👋"),
    Message(role="user", content='Danke schön! "Bis später"\n\t\\ 😀'),
]


@pytest.mark.parametrize("tools", [(), (TRANSFER,)], ids=["without tools", "with tools"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "OPENAI_MODEL": "llama3.2",
            "OPENAI_MAX_TOKENS": "99",
            "OPENAI_ORG_ID": "org-1",
            "OPENAI_PROJECT_ID": "proj_1",
        },
    ],
    ids=["defaults", "chosen model, org and project"],
)
async def test_the_wire_request_is_the_one_the_sdks_typed_create_sends(
    fake_llm: FakeLLM, tools: tuple[ToolSpec, ...], settings: dict[str, str]
) -> None:
    async with opened(fake_llm, **settings) as provider:
        await collect(provider, HISTORY, tools=tools)
        client = await provider.ready()  # the oracle: the SDK's typed method, with the same arguments
        typed = await client.chat.completions.create(**provider.body(HISTORY, system="Be brief.", tools=tools))
        [chunk async for chunk in typed]
    ours, sdk = fake_llm.posts
    assert ours.body == sdk.body and ours.path == sdk.path == "/v1/chat/completions"
    assert ours.body["messages"][1]["content"] == HISTORY[0].content  # non-ASCII arrives as itself
    volatile = {"content-length"}  # the same JSON, spelt with other whitespace or escapes
    assert {k: v for k, v in ours.headers.items() if k not in volatile} == {
        k: v for k, v in sdk.headers.items() if k not in volatile
    }
    if settings:
        assert (ours.headers["openai-organization"], ours.headers["openai-project"]) == ("org-1", "proj_1")


@pytest.mark.parametrize(
    ("reply", "spoken"),
    [
        (Reply(status=503, ttft=2), []),  # no status line yet
        (Reply("One two three.", ttft=2), []),
        (Reply("One two three.", stall_after=2), ["One", " two"]),
    ],
    ids=["before the response", "before the first event", "in the middle of the stream"],
)
async def test_a_read_timeout_is_a_retryable_timeout(fake_llm: FakeLLM, reply: Reply, spoken: list[str]) -> None:
    fake_llm.script(reply)
    got: list[Any] = []
    async with opened(fake_llm, LLM_TOTAL_TIMEOUT="0.3") as provider:
        with pytest.raises(ProviderError) as e:
            async for event in provider.stream([Message(role="user", content="hi")], system=""):
                got.append(event)
    assert got == spoken
    assert (str(e.value), e.value.provider, e.value.retryable) == ("openai request timed out", "openai", True)
    assert type(e.value.__cause__).__name__ == "APITimeoutError"
    assert type(e.value.__cause__.__cause__).__name__ == "ReadTimeout"
