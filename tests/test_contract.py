"""The contract: settings read once from the environment, their checks, and the variables plugins require."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import env

import main


def test_railway_public_domain_is_the_default_public_url() -> None:
    settings = main.load_settings({"RAILWAY_PUBLIC_DOMAIN": "sb-production.up.railway.app"})
    assert settings.public_url == "https://sb-production.up.railway.app"
    assert (
        main.load_settings({"RAILWAY_PUBLIC_DOMAIN": "x.app", "PUBLIC_URL": "https://mine.example"}).public_url
        == "https://mine.example"
    )


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(main.ConfigError, match="MIN_CONFIDENCE='lots' is not valid"):
        main.load_settings({"MIN_CONFIDENCE": "lots"})
    with pytest.raises(main.ConfigError, match="MIN_CONFIDENCE=2.0 must be between 0 and 1"):
        main.load_settings({"MIN_CONFIDENCE": "2"})
    with pytest.raises(main.ConfigError, match="^MODE='webhook' is not valid: use one of gather, relay, media$"):
        main.create_app(env(MODE="webhook"))  # checked against main.modes, where a new mode is one entry


def test_settings_are_read_once_and_never_print_secrets() -> None:
    settings = main.load_settings(
        {
            "TWILIO_AUTH_TOKEN": "sekrit-token",
            "LLM_PROVIDER": "anthropic, openai",
            "OPENAI_API_KEY": "sk-sekrit",
            "MAX_TURNS": "4",
            "REDIS_URL": "redis://r:6379",
        }
    )
    assert (settings.llm_provider, settings.max_turns, settings.valkey_url) == (
        ("anthropic", "openai"),
        4,
        "redis://r:6379",
    )
    assert settings.get("OPENAI_API_KEY") == "sk-sekrit"
    assert "sekrit" not in repr(settings) and "sekrit" not in str(settings)


def test_a_missing_vendor_key_names_the_variable_to_set() -> None:
    class NeedsKey:
        @main.hookimpl
        def register_llm_providers(self, register: Any) -> None:
            register("keyed", lambda settings: settings.require("KEYED_API_KEY", "LLM_PROVIDER=keyed"))

    with pytest.raises(main.ConfigError, match="KEYED_API_KEY is not set; LLM_PROVIDER=keyed needs it"):
        main.create_app(env(LLM_PROVIDER="keyed"), plugins=[NeedsKey()])


class Body:
    """A response whose body arrives in the given reads."""

    def __init__(self, *reads: bytes) -> None:
        self.reads = reads

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read


@pytest.mark.parametrize(
    "wire, expected",
    [
        (  # OpenAI's shape: data only, a comment, data over two lines, CR line ends, [DONE], a cut last event
            b'data: {"a": 1}\r\n\r\n: a comment\ndata: {"b":\ndata: 2}\n\nevent: x\r\rdata:[DONE]\n\ndata: cut',
            [(b"", b'{"a": 1}'), (b"", b'{"b":\n2}'), (b"x", b""), (b"", b"[DONE]")],
        ),
        (  # Anthropic's shape: named events
            b'event: ping\r\ndata: {}\r\n\r\n: a comment\nevent:a\ndata: {"b":\ndata: 2}\n\nevent: x\r\rdata: cut',
            [(b"ping", b"{}"), (b"a", b'{"b":\n2}'), (b"x", b"")],
        ),
    ],
)
async def test_server_sent_events_are_split_on_blank_lines_across_reads_and_line_ends(
    wire: bytes, expected: list[tuple[bytes, bytes]]
) -> None:
    for reads in ([wire], [wire[i : i + 1] for i in range(len(wire))]):  # whole, and a byte at a time
        assert [e async for e in main.sse_events(Body(*reads))] == expected
