"""Anthropic messages, streamed, on the official `anthropic` SDK.

The system prompt goes in `system`; the history is reshaped to the API's rule (starts with a user
turn, roles alternate) by merging consecutive same-role turns. The SDK (about a second to import)
is loaded in the background when the app opens, never by the factory; its own retries are off
because retries, timeouts and fallback belong to the core's LLM chain.

A turn goes through the SDK client (auth and version headers, base URL, the HTTP pool, timeouts,
status errors as the SDK's types) but not through its request-data preparation or its typed
events: those walk the whole history on every request and build an object per streamed event.
The body is encoded here, and the server-sent events are decoded into the few fields used.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec

from main import (
    ConfigError,
    Event,
    LLMProvider,
    Message,
    ProviderError,
    Register,
    Settings,
    ToolCall,
    ToolSpec,
    Usage,
    VendorSDK,
    hookimpl,
    log,
    sse_events,
)

DEFAULT_MODEL = "claude-haiku-5-5"
DEFAULT_URL = "https://api.anthropic.com"
RETRYABLE_EVENTS = ("overloaded_error", "api_error", "rate_limit_error", "timeout_error")


class Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""


class Block(msgspec.Struct):
    type: str = ""
    id: str = ""
    name: str = ""


class EventUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class StartedMessage(msgspec.Struct):
    usage: EventUsage = msgspec.field(default_factory=EventUsage)


class StreamEvent(msgspec.Struct):
    """The fields of a streamed Messages API event that a turn uses."""

    type: str
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    content_block: Block = msgspec.field(default_factory=Block)
    message: StartedMessage = msgspec.field(default_factory=StartedMessage)
    usage: EventUsage = msgspec.field(default_factory=EventUsage)


EVENT = msgspec.json.Decoder(StreamEvent)
ENCODER = msgspec.json.Encoder()


def decode_event(data: bytes) -> StreamEvent:
    """One event's data as a StreamEvent."""
    try:
        return EVENT.decode(data)
    except msgspec.DecodeError:
        json.loads(data)  # not JSON at all: raise the standard library's JSONDecodeError, as the SDK did
        raise  # JSON of the wrong shape


def anthropic_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The history as the Messages API wants it: starts with a user turn, roles alternate, no empty text."""
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for m in messages:
        if m.role == "tool":
            blocks: list[dict[str, Any]]
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}]
        else:
            role = m.role
            blocks = [{"type": "text", "text": m.content}] if m.content.strip() else []
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in m.tool_calls]
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            last = turns[-1][1]
            if last[-1]["type"] == "text" and blocks[0]["type"] == "text":  # e.g. two caller turns after a barge-in
                last[-1] = {"type": "text", "text": last[-1]["text"] + "\n" + blocks.pop(0)["text"]}
            last.extend(blocks)
        elif turns or m.role == "user":  # the history must start with a caller's turn
            turns.append((role, blocks))
    return [
        {"role": role, "content": blocks[0]["text"] if len(blocks) == 1 and blocks[0]["type"] == "text" else blocks}
        for role, blocks in turns
    ]


class AnthropicProvider(VendorSDK, LLMProvider):
    """Streams replies from /v1/messages: text tokens, tool calls as their blocks end, then usage."""

    name = "anthropic"
    package = "anthropic"
    warms = True  # warm() opens the connection as each call begins

    def __init__(self, settings: Settings) -> None:
        self.key = settings.require("ANTHROPIC_API_KEY", "LLM_PROVIDER=anthropic")
        self.model = settings.get("ANTHROPIC_MODEL", DEFAULT_MODEL)
        self.base_url = settings.get("ANTHROPIC_BASE_URL", DEFAULT_URL).rstrip("/")
        self.max_tokens = settings.number("ANTHROPIC_MAX_TOKENS", 400)
        # the default model answers at once with thinking off; other models keep their own default
        self.thinking = settings.get("ANTHROPIC_THINKING", "" if settings.get("ANTHROPIC_MODEL") else "disabled")
        if self.thinking not in ("", "disabled", "adaptive"):
            raise ConfigError(
                f"ANTHROPIC_THINKING={self.thinking!r} is not valid: use disabled or adaptive, or leave it unset"
            )
        self.timeout = settings.llm_total_timeout
        self.raw: Any = None
        super().__init__(f"LLM_PROVIDER={self.name}")

    # -- lifecycle: the SDK's import (~1 s) happens in the background (main.VendorSDK)

    async def connect(self, sdk: Any) -> Any:
        http = self.http_client(self.timeout)
        self.raw = importlib.import_module("httpx2").Response  # as cast_to, the SDK hands back the response unread
        return sdk.AsyncAnthropic(api_key=self.key, base_url=self.base_url, max_retries=0, http_client=http)

    async def warm(self) -> None:
        """Open the HTTPS connection (DNS, TCP, TLS) with a cheap authenticated request, ahead of the first turn."""
        try:
            client = await self.ready()
            await client.models.list(limit=1)
        except Exception as e:  # warming is best effort; the first turn reports real failures
            if getattr(e, "status_code", None) in (404, 405):  # a compatible server without /models: still warm
                return
            why = e if isinstance(e, ProviderError) else self._failure(e)
            log.warning("provider warm-up failed", extra={"provider": self.name, "error": str(why)})

    # -- streaming

    async def stream(
        self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()
    ) -> AsyncGenerator[Event]:
        client = await self.ready()
        body = ENCODER.encode(self.body(messages, system=system, tools=tools))
        uses: dict[int, dict[str, str]] = {}
        input_tokens = output_tokens = 0
        stopped = False
        try:
            # the SDK's own request path (auth and version headers, timeouts, status errors as its types)
            # with a body encoded here, handing back the response unread: see the module docstring
            response = await client.post("/v1/messages", cast_to=self.raw, content=body, stream=True)
            events = sse_events(response)
            try:
                async for name, data in events:
                    if name in (b"", b"ping") or not data:  # what the SDK's stream skips
                        continue
                    if name == b"error":
                        raise self._stream_error(data, response)
                    event = decode_event(data)
                    kind = event.type
                    if kind == "content_block_delta":
                        delta = event.delta
                        if delta.type == "text_delta" and delta.text:
                            yield delta.text
                        elif delta.type == "input_json_delta" and event.index in uses:
                            uses[event.index]["json"] += delta.partial_json
                    elif kind == "content_block_start" and event.content_block.type == "tool_use":
                        block = event.content_block
                        uses[event.index] = {"id": block.id, "name": block.name, "json": ""}
                    elif kind == "content_block_stop" and event.index in uses:
                        yield self._tool_call(uses.pop(event.index))
                    elif kind == "message_start":
                        u = event.message.usage
                        input_tokens = (
                            (u.input_tokens or 0)
                            + (u.cache_creation_input_tokens or 0)
                            + (u.cache_read_input_tokens or 0)
                        )
                        output_tokens = u.output_tokens or 0
                    elif kind == "message_delta":
                        output_tokens = event.usage.output_tokens or output_tokens  # cumulative
                    elif kind == "message_stop":
                        stopped = True
            finally:
                await events.aclose()
                await response.aclose()
        except ProviderError:
            raise
        except Exception as e:
            raise self._failure(e) from e
        if not stopped:
            raise ProviderError(
                f"{self.name} reply stream ended before message_stop", provider=self.name, retryable=True
            )
        yield Usage(input_tokens=input_tokens, output_tokens=output_tokens)

    def body(self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()) -> dict[str, Any]:
        """The request body: the arguments the SDK's typed `messages.create` would take."""
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": anthropic_messages(messages),
            "stream": True,
        }
        if system:
            params["system"] = system
        if self.thinking:
            params["thinking"] = {"type": self.thinking}
        if tools:
            params["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
            ]
        return params

    def _stream_error(self, data: bytes, response: Any) -> Exception:
        """The SDK's status error (of the stream's status, 200) for an `error` event, as its own stream builds it."""
        try:
            body: Any = json.loads(data)
            message = f"{body}"
        except ValueError:
            body = message = data.decode(errors="replace")
        return self.sdk.APIStatusError(message, response=response, body=body)

    def _tool_call(self, use: dict[str, str]) -> ToolCall:
        try:
            arguments = json.loads(use["json"] or "{}")
        except ValueError as e:
            raise ProviderError(f"tool call {use['name']!r} has malformed input", provider=self.name) from e
        if not isinstance(arguments, dict):
            raise ProviderError(f"tool call {use['name']!r} has malformed input", provider=self.name)
        return ToolCall(id=use["id"], name=use["name"], arguments=arguments)

    def _failure(self, e: BaseException) -> ProviderError:
        """One ProviderError for any vendor failure; retryable for 429, 5xx/529, connection errors and timeouts."""
        sdk, retryable = self.sdk, False
        if sdk is not None and isinstance(e, sdk.APIStatusError):
            status, err = e.status_code, e.body.get("error") if isinstance(e.body, dict) else None
            kind, message = (err.get("type", ""), err.get("message", "")) if isinstance(err, dict) else ("", e.message)
            if status == 200:  # an `error` event inside the stream
                what, retryable = f"error in the stream: {kind}: {message}", kind in RETRYABLE_EVENTS
            else:
                retryable = status in (408, 409, 429) or status >= 500
                what = f"HTTP {status} {kind}: {message}"
        elif sdk is not None and isinstance(e, sdk.APITimeoutError):
            what, retryable = "request timed out", True
        elif (sdk is not None and isinstance(e, sdk.APIConnectionError)) or isinstance(e, self.errors):
            cause = e.__cause__ or e
            what, retryable = f"connection failed: {type(cause).__name__}: {cause}", True
        else:
            what = f"malformed reply: {type(e).__name__}: {e}"
        return ProviderError(f"{self.name} {what}"[:500], provider=self.name, retryable=retryable)


@hookimpl
def register_llm_providers(register: Register) -> None:
    register("anthropic", AnthropicProvider)
