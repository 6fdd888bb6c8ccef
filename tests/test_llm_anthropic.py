"""The Anthropic provider, through the real `anthropic` SDK against the fake vendor server on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import env
from fake_llm import FakeLLM, Reply

import main
from main import Message, ProviderError, ToolCall, ToolSpec, Usage
from plugins.llm_anthropic import AnthropicProvider, anthropic_messages

END_CALL = ToolSpec(name="end_call", description="Hang up after saying goodbye.")


@contextlib.asynccontextmanager
async def opened(fake: FakeLLM, **extra: str) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider(main.load_settings(env(LLM_PROVIDER="anthropic", **fake.env("anthropic", **extra))))
    await provider.aopen()
    try:
        yield provider
    finally:
        await provider.aclose()


async def collect(provider: AnthropicProvider, messages: list[Message], tools: tuple[ToolSpec, ...] = ()) -> list[Any]:
    return [e async for e in provider.stream(messages, system="You are on a phone call.", tools=tools)]


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str, **kw: Any) -> Message:
    return Message(role="assistant", content=text, **kw)


def test_a_missing_key_says_what_to_set() -> None:
    with pytest.raises(main.ConfigError) as e:
        main.create_app(env(LLM_PROVIDER="anthropic"))
    assert str(e.value) == (
        "ANTHROPIC_API_KEY is not set; LLM_PROVIDER=anthropic needs it. "
        "Set ANTHROPIC_API_KEY, or choose another plugin."
    )
    with pytest.raises(main.ConfigError, match="ANTHROPIC_THINKING='off' is not valid: use disabled or adaptive"):
        main.create_app(env(LLM_PROVIDER="anthropic", ANTHROPIC_API_KEY="k", ANTHROPIC_THINKING="off"))


def test_history_is_merged_to_alternate_and_start_with_the_caller() -> None:
    history = [
        assistant("Hello! How can I help?"),  # trimmed history may start with the agent
        user("I'd like"),
        user("a table for two"),  # a barge-in left two caller turns in a row
        assistant(""),  # nothing was spoken before the barge-in
        assistant("For when?"),
        user("tonight"),
    ]
    assert anthropic_messages(history) == [
        {"role": "user", "content": "I'd like\na table for two"},
        {"role": "assistant", "content": "For when?"},
        {"role": "user", "content": "tonight"},
    ]


def test_tool_calls_and_results_become_tool_use_and_tool_result_blocks() -> None:
    call = ToolCall(id="toolu_1", name="hours", arguments={"day": "mon"})
    history = [
        user("hours?"),
        assistant("Checking.", tool_calls=(call,)),
        Message(role="tool", content="9 to 5", tool_call_id="toolu_1"),
        user("and sunday?"),
    ]
    assert anthropic_messages(history) == [
        {"role": "user", "content": "hours?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "hours", "input": {"day": "mon"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "9 to 5"},
                {"type": "text", "text": "and sunday?"},
            ],
        },
    ]


async def test_the_model_receives_system_alternating_history_and_streams_in_order(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("Table for two, tonight. Done!", input_tokens=120, output_tokens=9))
    history = [user("I'd like"), user("a table for two"), assistant(""), user("tonight")]
    async with opened(fake_llm) as provider:
        events = await collect(provider, history)
    assert events == ["Table", " for", " two,", " tonight.", " Done!", Usage(input_tokens=120, output_tokens=9)]
    assert fake_llm.posts[0].body == {  # the fake answers 400 like the real API if roles do not alternate
        "model": "claude-haiku-5-5",
        "max_tokens": 400,
        "stream": True,
        "system": "You are on a phone call.",
        "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "I'd like\na table for two\ntonight"}],
    }


async def test_tool_use_blocks_stream_as_tool_calls_after_the_text_before_them(fake_llm: FakeLLM) -> None:
    call = ToolCall(id="toolu_01A", name="end_call", arguments={"reason": 'caller said "bye"', "n": [1, 2]})
    fake_llm.script(Reply("Goodbye!", tool_calls=[call], input_tokens=10, output_tokens=12))
    async with opened(fake_llm, ANTHROPIC_MODEL="claude-sonnet-5-5", ANTHROPIC_MAX_TOKENS="250") as provider:
        events = await collect(provider, [user("that's all")], tools=(END_CALL,))
    assert events == ["Goodbye!", call, Usage(input_tokens=10, output_tokens=12)]
    body = fake_llm.posts[0].body
    assert body["tools"] == [
        {
            "name": "end_call",
            "description": "Hang up after saying goodbye.",
            "input_schema": {"type": "object", "properties": {}},
        }
    ]
    assert (body["model"], body["max_tokens"], "thinking" in body) == ("claude-sonnet-5-5", 250, False)


async def test_an_api_error_names_the_problem(fake_llm: FakeLLM) -> None:
    async with opened(fake_llm) as provider:
        with pytest.raises(ProviderError) as e:
            await collect(provider, [])  # an empty history is refused by the API, not papered over
    assert str(e.value).startswith("anthropic HTTP 400 invalid_request_error: model and messages are required")
    assert not e.value.retryable and type(e.value.__cause__).__name__ == "BadRequestError"


@pytest.mark.parametrize(
    ("reply", "spoken", "message", "retryable", "chained"),
    [
        (
            Reply(status=429, retry_after="3", message="Number of requests has exceeded your rate limit"),
            [],
            "anthropic HTTP 429 rate_limit_error: Number of requests",
            True,
            "RateLimitError",
        ),
        (
            Reply(status=529, message="Overloaded"),
            [],
            "anthropic HTTP 529 overloaded_error: Overloaded",
            True,
            "OverloadedError",
        ),
        (Reply(status=500), [], "anthropic HTTP 500 api_error", True, "InternalServerError"),
        (Reply(status=401), [], "anthropic HTTP 401 authentication_error", False, "AuthenticationError"),
        (
            Reply("One two three four.", cut_after=2),
            ["One", " two"],
            "anthropic connection failed: RemoteProtocolError",
            True,
            "RemoteProtocolError",
        ),
        (
            Reply("One two three four.", malformed_after=1),
            ["One"],
            "anthropic malformed reply: JSONDecodeError",
            False,
            "JSONDecodeError",
        ),
        (
            Reply("One two three four.", error_after=2),
            ["One", " two"],
            "anthropic error in the stream: overloaded_error",
            True,
            "APIStatusError",
        ),
        (
            Reply("One two three four.", end_after=3),
            ["One", " two", " three"],
            "anthropic reply stream ended before message_stop",
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
            async for event in provider.stream([user("hi")], system=""):
                got.append(event)
    assert got == spoken
    assert str(e.value).startswith(message), str(e.value)
    assert (e.value.provider, e.value.retryable) == ("anthropic", retryable)
    assert type(e.value.__cause__).__name__ == chained


async def test_warm_opens_the_connection_that_the_first_turn_reuses(fake_llm: FakeLLM) -> None:
    async with opened(fake_llm) as provider:
        await provider.warm()
        assert fake_llm.connections == 1 and [(r.method, r.path) for r in fake_llm.requests] == [("GET", "/v1/models")]
        await collect(provider, [user("hi")])
    assert fake_llm.connections == 1
    assert fake_llm.requests[0].headers["anthropic-version"] and fake_llm.requests[0].body is None


async def test_closing_the_stream_early_closes_it_at_the_server(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("one two three four five six seven eight", gap=0.05))
    async with opened(fake_llm) as provider:
        events = provider.stream([user("hi")], system="")
        assert await anext(events) == "one"
        await events.aclose()
        await fake_llm.until(lambda: fake_llm.posts[0].closed_early)


HISTORY = [  # non-ASCII on every path: caller text, tool use input, a tool result, the reply
    user("Grüße aus Köln — habt ihr heute geöffnet? 今日は営業していますか"),
    assistant("Ich schaue nach …", tool_calls=(ToolCall(id="toolu_ü", name="hours", arguments={"ort": "Köln ✓"}),)),
    Message(role="tool", content="9–17 Uhr «geöffnet»", tool_call_id="toolu_ü"),
    assistant("Ja, von neun bis siebzehn Uhr. 👋"),
    user('Danke schön! "Bis später"\n\t\\ 😀'),
]


@pytest.mark.parametrize("tools", [(), (END_CALL,)], ids=["without tools", "with tools"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"ANTHROPIC_MODEL": "claude-sonnet-5-5", "ANTHROPIC_MAX_TOKENS": "99", "ANTHROPIC_THINKING": "adaptive"}],
    ids=["defaults", "chosen model"],
)
async def test_the_wire_request_is_the_one_the_sdks_typed_create_sends(
    fake_llm: FakeLLM, tools: tuple[ToolSpec, ...], settings: dict[str, str]
) -> None:
    async with opened(fake_llm, **settings) as provider:
        await collect(provider, HISTORY, tools=tools)
        client = await provider.ready()  # the oracle: the SDK's typed method, with the same arguments
        body = provider.body(HISTORY, system="You are on a phone call.", tools=tools)
        [event async for event in await client.messages.create(**body)]
    ours, sdk = fake_llm.posts
    assert ours.body == sdk.body and ours.path == sdk.path == "/v1/messages"
    assert ours.body["messages"][0]["content"] == HISTORY[0].content  # non-ASCII arrives as itself
    volatile = {"content-length"}  # the same JSON, spelt with other whitespace or escapes
    assert {k: v for k, v in ours.headers.items() if k not in volatile} == {
        k: v for k, v in sdk.headers.items() if k not in volatile
    }


@pytest.mark.parametrize(
    ("reply", "spoken", "message", "chained"),
    [
        (Reply(status=529, ttft=2), [], "anthropic request timed out", "APITimeoutError"),  # no status line yet
        (Reply("One two three.", ttft=2), [], "anthropic connection failed: ReadTimeout", "ReadTimeout"),
        (
            Reply("One two three.", stall_after=2),
            ["One", " two"],
            "anthropic connection failed: ReadTimeout",
            "ReadTimeout",
        ),
    ],
    ids=["before the response", "before the first event", "in the middle of the stream"],
)
async def test_a_read_timeout_is_retryable(
    fake_llm: FakeLLM, reply: Reply, spoken: list[str], message: str, chained: str
) -> None:
    fake_llm.script(reply)
    got: list[Any] = []
    async with opened(fake_llm, LLM_TOTAL_TIMEOUT="0.3") as provider:
        with pytest.raises(ProviderError) as e:
            async for event in provider.stream([user("hi")], system=""):
                got.append(event)
    assert got == spoken
    assert str(e.value).startswith(message), str(e.value)
    assert (e.value.provider, e.value.retryable) == ("anthropic", True)
    assert type(e.value.__cause__).__name__ == chained
