"""OpenAI chat completions, streamed, on the official `openai` SDK; any OpenAI-compatible server works too.

OPENAI_BASE_URL points it at Groq, Together, Ollama, vLLM or a proxy. The SDK is imported in the
background when the app opens (never by the factory), so startup does not wait for it; the SDK's
own retries are off because retries, timeouts and fallback belong to the core's LLM chain.

A turn goes through the SDK client (auth, base URL, organisation and project headers, the HTTP
pool, timeouts, status errors as the SDK's types) but not through its typed request transform or
its typed chunks: those walk the whole history on every request and build an object per streamed
chunk. The body is encoded here, and the server-sent events are decoded into the few fields used.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec

from main import (
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

DEFAULT_MODEL = "gpt-5.4-mini"
DEFAULT_URL = "https://api.openai.com/v1"


class FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class Choice(msgspec.Struct):
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None


class ChunkUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Chunk(msgspec.Struct):
    """The fields of a streamed chat.completion.chunk that a turn uses (or an in-stream error)."""

    choices: list[Choice] = []
    usage: ChunkUsage | None = None
    error: Any = None


CHUNK = msgspec.json.Decoder(Chunk)
ENCODER = msgspec.json.Encoder()


def decode_chunk(data: bytes) -> Chunk:
    """One event's data as a Chunk."""
    try:
        return CHUNK.decode(data)
    except msgspec.DecodeError:
        json.loads(data)  # not JSON at all: raise the standard library's JSONDecodeError, as the SDK did
        raise  # JSON of the wrong shape


def openai_messages(messages: Sequence[Message], system: str) -> list[dict[str, Any]]:
    """The history in chat-completions form: system first, tool calls and tool results as the API wants them."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        elif m.role == "assistant" and m.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    "content": m.content or None,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                        }
                        for c in m.tool_calls
                    ],
                }
            )
        elif m.content:
            out.append({"role": m.role, "content": m.content})
    return out


class OpenAIProvider(VendorSDK, LLMProvider):
    """Streams replies from /chat/completions: text tokens, then tool calls, then usage."""

    name = "openai"
    package = "openai"
    warms = True  # warm() opens the connection as each call begins

    def __init__(self, settings: Settings) -> None:
        self.key = settings.require("OPENAI_API_KEY", "LLM_PROVIDER=openai")
        self.model = settings.get("OPENAI_MODEL", DEFAULT_MODEL)
        self.base_url = settings.get("OPENAI_BASE_URL", DEFAULT_URL).rstrip("/")
        self.max_tokens = settings.number("OPENAI_MAX_TOKENS", 400)
        # the default model answers at once with reasoning "none"; other models keep their own default
        self.effort = settings.get("OPENAI_REASONING_EFFORT", "" if settings.get("OPENAI_MODEL") else "none")
        self.organization = settings.get("OPENAI_ORG_ID") or None
        self.project = settings.get("OPENAI_PROJECT_ID") or None
        self.timeout = settings.llm_total_timeout
        self.raw: Any = None
        self.timeouts: type[Exception] = TimeoutError
        self.request_errors: type[Exception] = OSError
        super().__init__(f"LLM_PROVIDER={self.name}")

    # -- lifecycle: the SDK's import (~0.4 s) happens in the background (main.VendorSDK)

    async def connect(self, sdk: Any) -> Any:
        http = self.http_client(self.timeout)
        httpx2 = importlib.import_module("httpx2")
        self.raw = httpx2.Response  # as cast_to, the SDK hands back the response unread
        self.timeouts, self.request_errors = httpx2.TimeoutException, httpx2.RequestError
        return sdk.AsyncOpenAI(
            api_key=self.key,
            base_url=self.base_url,
            organization=self.organization,
            project=self.project,
            max_retries=0,
            http_client=http,
        )

    async def warm(self) -> None:
        """Open the HTTPS connection (DNS, TCP, TLS) with a cheap authenticated request, ahead of the first turn."""
        try:
            client = await self.ready()
            await client.models.list()
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
        calls: dict[int, dict[str, str]] = {}
        usage, finished = None, False
        try:
            # the SDK's own request path (auth and organisation headers, timeouts, status errors as its
            # types) with a body encoded here, handing back the response unread: see the module docstring
            response = await client.post(
                "/chat/completions",
                cast_to=self.raw,
                content=body,
                stream=True,
                options={"security": {"bearer_auth": True}},
            )
            events = self._events(response)
            try:
                async for data in events:
                    chunk = decode_chunk(data)
                    if chunk.error:
                        raise self._stream_error(chunk.error, response)
                    if chunk.usage is not None:
                        usage = Usage(
                            input_tokens=chunk.usage.prompt_tokens or 0,
                            output_tokens=chunk.usage.completion_tokens or 0,
                        )
                    for choice in chunk.choices:
                        delta = choice.delta
                        if delta.content:
                            yield delta.content
                        for part in delta.tool_calls or ():
                            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                            call["id"] = part.id or call["id"]
                            if part.function is not None:
                                call["name"] = part.function.name or call["name"]
                                call["arguments"] += part.function.arguments or ""
                        if choice.finish_reason:
                            finished = True
                            for call in (calls.pop(i) for i in sorted(calls)):
                                yield self._tool_call(call)
            finally:
                await events.aclose()
                await response.aclose()
        except ProviderError:
            raise
        except Exception as e:
            raise self._failure(e) from e
        if not finished:
            raise ProviderError(
                f"{self.name} reply stream ended before the model finished", provider=self.name, retryable=True
            )
        yield usage or Usage()

    def body(self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()) -> dict[str, Any]:
        """The request body: the arguments the SDK's typed `chat.completions.create` would take."""
        # OpenAI's own models want max_completion_tokens; compatible servers know max_tokens
        limit = "max_completion_tokens" if self.base_url == DEFAULT_URL else "max_tokens"
        params: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(messages, system),
            "stream": True,
            "stream_options": {"include_usage": True},
            limit: self.max_tokens,
        }
        if self.effort:
            params["reasoning_effort"] = self.effort
        if tools:
            params["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in tools
            ]
        return params

    async def _events(self, response: Any) -> AsyncGenerator[bytes]:
        """The events' data up to [DONE], with transport errors raised as the SDK's own streams raise them."""
        async with contextlib.aclosing(sse_events(response)) as events:
            try:
                async for _, data in events:
                    if not data:  # (an event with no data)
                        continue
                    if data.startswith(b"[DONE]"):
                        break
                    yield data
            except self.timeouts as e:
                raise self.sdk.APITimeoutError(request=response.request) from e
            except self.request_errors as e:
                raise self.sdk.APIConnectionError(request=response.request) from e
            # read the rest of the body, briefly, so that HTTP/1.1 can reuse the connection (as the SDK does)
            with contextlib.suppress(Exception):  # the reply is complete: cleanup must not fail it
                async with asyncio.timeout(0.1):
                    async for _ in events:
                        pass

    def _stream_error(self, error: Any, response: Any) -> Exception:
        """The SDK's APIError for an error event inside the stream."""
        message = error.get("message") if isinstance(error, dict) else None
        if not message or not isinstance(message, str):
            message = "An error occurred during streaming"
        return self.sdk.APIError(message, response.request, body=error)

    def _tool_call(self, call: dict[str, str]) -> ToolCall:
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except ValueError as e:
            raise ProviderError(f"tool call {call['name']!r} has malformed arguments", provider=self.name) from e
        if not isinstance(arguments, dict) or not call["name"]:
            raise ProviderError(f"malformed tool call {call['name']!r}", provider=self.name)
        return ToolCall(id=call["id"], name=call["name"], arguments=arguments)

    def _failure(self, e: BaseException) -> ProviderError:
        """One ProviderError for any vendor failure; retryable for 429, 5xx, connection errors and timeouts."""
        sdk, retryable = self.sdk, False
        if sdk is not None and isinstance(e, sdk.APIStatusError):
            status = e.status_code
            retryable = status in (408, 409, 429) or status >= 500
            what = f"HTTP {status}: {e.message}"
        elif sdk is not None and isinstance(e, sdk.APITimeoutError):
            what, retryable = "request timed out", True
        elif (sdk is not None and isinstance(e, sdk.APIConnectionError)) or isinstance(e, self.errors):
            cause = e.__cause__ or e
            what, retryable = f"connection failed: {type(cause).__name__}: {cause}", True
        elif sdk is not None and isinstance(e, sdk.APIError):  # an error event inside the stream
            what, retryable = f"error in the stream: {e.message}", True
        else:
            what = f"malformed reply: {type(e).__name__}: {e}"
        return ProviderError(f"{self.name} {what}"[:500], provider=self.name, retryable=retryable)


@hookimpl
def register_llm_providers(register: Register) -> None:
    register("openai", OpenAIProvider)
