"""A fake LLM vendor on 127.0.0.1 that speaks OpenAI chat completions and Anthropic messages.

It serves the real wire formats the official SDKs parse (JSON, and SSE when the request says
`"stream": true`), scripted per request, and records everything it receives:

    with FakeLLM() as fake:                          # or the `fake_llm` fixture (registered in conftest)
        fake.script(Reply("Hello there. How can I help?", ttft=0.2, gap=0.01),
                    Reply(status=429, retry_after="1"))
        app = main.create_app(env(LLM_PROVIDER="openai", **fake.env("openai")))
        ...
        fake.posts[-1].body["messages"]              # what the model was sent (system, history, tools)
        fake.posts[-1].closed_early                  # the client hung up before the reply was complete
        await fake.until(lambda: fake.posts and fake.posts[-1].closed_early)

`fake.requests` is every request in order (warm-up GETs included), `fake.posts` only the model calls.

Routes: POST /v1/chat/completions (OpenAI), POST /v1/messages (Anthropic), GET /v1/models (both;
what `warm()` calls). `fake.env("openai")` / `fake.env("anthropic")` give the plugin's env vars
(base URL and a made-up key). Requests without the vendor's auth header get the vendor's 401; an
Anthropic history that does not alternate or start with a user turn gets the real 400.

Each POST takes the next scripted item: a `Reply`, or a callable `(FakeRequest) -> Reply` for
replies that depend on what was sent. When the script is empty, `fake.default` answers.
A `Reply` controls: the text (split into word tokens, or exact `tokens`), `tool_calls`
(main.ToolCall, streamed as OpenAI `tool_calls` deltas or Anthropic `tool_use` blocks with
`input_json_delta`), `ttft` (seconds before the first token; before the status line for errors),
`gap` (seconds between tokens), `status` (429/500/529/... with the vendor's error body and an
optional `retry_after` header), and what goes wrong mid-stream after n tokens: `cut_after` (the
TCP connection drops), `end_after` (the body ends cleanly but without the final events),
`malformed_after` (a chunk that is not JSON), `error_after` (the vendor's in-stream error event),
`stall_after` (nothing more is sent until the client gives up). Usage is counted in words unless
`input_tokens`/`output_tokens` are given.

The server runs in its own thread and event loop, so it serves the app under test whichever loop or
thread that runs in (AsyncTestClient's portal, a real server process, the test's own loop).
`fake.connections` counts TCP connections accepted (a warmed connection is reused by the first turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from main import ToolCall

OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    529: "Overloaded",
}


@dataclass
class Reply:
    """What the fake model answers to one request (see the module docstring)."""

    text: str = "Hello from the fake model."
    tokens: Sequence[str] | None = None
    tool_calls: Sequence[ToolCall] = ()
    ttft: float = 0.0
    gap: float = 0.0
    status: int = 200
    retry_after: str | None = None
    message: str = ""
    cut_after: int | None = None
    end_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    stall_after: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish: str | None = None

    def token_list(self) -> list[str]:
        if self.tokens is not None:
            return list(self.tokens)
        words = self.text.split(" ") if self.text else []
        return [w if i == 0 else " " + w for i, w in enumerate(words)]


@dataclass
class FakeRequest:
    """One request the fake received, and what became of it."""

    vendor: str
    method: str
    path: str
    headers: dict[str, str] = field(repr=False)
    body: Any = field(repr=False)
    reply: Reply | None = field(default=None, repr=False)
    completed: bool = False  # the whole response was sent
    closed_early: bool = False  # the client closed the connection before the response was complete
    started: float = field(default_factory=time.monotonic, repr=False)
    sent_at: list[float] = field(default_factory=list, repr=False)  # perf_counter() as each token left

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list((self.body or {}).get("messages", []))


class FakeLLM:
    """A scripted OpenAI + Anthropic server on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, *, model: str = "fake-model") -> None:
        self.model = model
        self.default = Reply()
        self.replies: list[Reply | Callable[[FakeRequest], Reply]] = []
        self.requests: list[FakeRequest] = []
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the test-facing API

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_url(self) -> str:
        return self.url

    def env(self, vendor: str, **extra: str) -> dict[str, str]:
        """The env vars that point a plugin at this server, with a made-up key."""
        prefix = {"openai": "OPENAI", "anthropic": "ANTHROPIC"}[vendor]
        base = self.openai_url if vendor == "openai" else self.anthropic_url
        return {f"{prefix}_BASE_URL": base, f"{prefix}_API_KEY": f"made-up-{vendor}-key", **extra}

    def script(self, *replies: Reply | Callable[[FakeRequest], Reply]) -> FakeLLM:
        """Queue replies for the next requests, in order."""
        self.replies.extend(replies)
        return self

    @property
    def posts(self) -> list[FakeRequest]:
        """The model requests (POSTs), without warm-up GETs."""
        return [r for r in self.requests if r.method == "POST"]

    async def until(self, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        """Wait (without blocking the loop) until predicate() is true; fail after timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s; requests: {self.requests}")
            await asyncio.sleep(0.01)

    # -- lifecycle

    def __enter__(self) -> FakeLLM:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-llm", daemon=True)
        self._thread.start()
        if not started.wait(5):
            raise RuntimeError("the fake LLM server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()  # each handler sees the connection end and returns
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=5)
            for task in stuck:
                task.cancel()
        await self._server.wait_closed()

    # -- HTTP/1.1

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                body = json.loads(raw) if raw else None
                anthropic = path.startswith("/v1/messages") or "anthropic-version" in headers
                vendor = "anthropic" if anthropic else "openai"
                request = FakeRequest(vendor=vendor, method=method, path=path.split("?")[0], headers=headers, body=body)
                self.requests.append(request)
                if not await self._respond(request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # the client left, or the server is shutting down
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send_json(
        self, writer: asyncio.StreamWriter, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> bool:
        data = json.dumps(payload).encode()
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(data)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return True

    async def _respond(self, request: FakeRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open."""
        vendor, path = request.vendor, request.path
        if request.method == "GET" and path == "/v1/models":
            request.completed = True
            if not self._authorized(request):
                return await self._error(writer, request, Reply(status=401, message="invalid key"))
            return await self._send_json(
                writer,
                200,
                {
                    "object": "list",
                    "has_more": False,
                    "first_id": self.model,
                    "last_id": self.model,
                    "data": [
                        {
                            "id": self.model,
                            "object": "model",
                            "created": 0,
                            "owned_by": "fake",
                            "type": "model",
                            "display_name": "Fake model",
                            "created_at": "2025-01-01T00:00:00Z",
                        }
                    ],
                },
            )
        if request.method != "POST" or path not in ("/v1/chat/completions", "/v1/messages"):
            request.completed = True
            return await self._error(writer, request, Reply(status=404, message=f"no route {request.method} {path}"))
        item = self.replies.pop(0) if self.replies else self.default
        reply = request.reply = item(request) if callable(item) else item
        if not self._authorized(request):
            request.completed = True
            return await self._error(writer, request, Reply(status=401, message="invalid API key"))
        if invalid := self._invalid(request):
            request.completed = True
            return await self._error(writer, request, Reply(status=400, message=invalid))
        if reply.status != 200:
            await asyncio.sleep(reply.ttft)
            request.completed = True
            return await self._error(writer, request, reply)
        if not (request.body or {}).get("stream"):
            await asyncio.sleep(reply.ttft)
            request.completed = True
            whole = self._openai_whole if vendor == "openai" else self._anthropic_whole
            return await self._send_json(writer, 200, whole(request, reply))
        return await self._stream(request, reply, reader, writer)

    @staticmethod
    def _authorized(request: FakeRequest) -> bool:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        key = bearer if bearer != request.headers.get("authorization", "") else ""
        if request.vendor == "anthropic":  # the SDK sends a Bearer token; x-api-key is the documented header
            return bool(key or request.headers.get("x-api-key")) and "anthropic-version" in request.headers
        return bool(key)

    @staticmethod
    def _invalid(request: FakeRequest) -> str:
        """The Anthropic API's own checks on the history (the OpenAI API is lenient about roles)."""
        body = request.body or {}
        if not body.get("model") or not body.get("messages"):
            return "model and messages are required"
        if request.vendor != "anthropic":
            return ""
        if not body.get("max_tokens"):
            return "max_tokens: Field required"
        roles = [m.get("role") for m in body["messages"]]
        if roles[0] != "user":
            return 'messages: first message must use the "user" role'
        if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
            return 'messages: roles must alternate between "user" and "assistant"'
        for m in body["messages"]:
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            if not blocks or any(b.get("type") == "text" and not b.get("text") for b in blocks):
                return "messages: text content blocks must be non-empty"
        return ""

    async def _error(self, writer: asyncio.StreamWriter, request: FakeRequest, reply: Reply) -> bool:
        status = reply.status
        message = reply.message or f"fake error {status}"
        headers = {"retry-after": reply.retry_after} if reply.retry_after else {}
        if request.vendor == "anthropic":
            kind = ANTHROPIC_ERRORS.get(status, "api_error")
            payload: dict[str, Any] = {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": "req_fake" + secrets.token_hex(6),
            }
            headers["request-id"] = payload["request_id"]
        else:
            kind, code = OPENAI_ERRORS.get(status, ("server_error", None))
            payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
            headers["x-request-id"] = "req_" + secrets.token_hex(8)
        return await self._send_json(writer, status, payload, headers)

    # -- usage

    def _usage(self, request: FakeRequest, reply: Reply, tokens: list[str]) -> tuple[int, int]:
        body = request.body or {}
        words = sum(len(json.dumps(m.get("content", "")).split()) for m in body.get("messages", []))
        words += len(str(body.get("system", "")).split())
        inp = reply.input_tokens if reply.input_tokens is not None else words
        out = reply.output_tokens if reply.output_tokens is not None else len(tokens) + 8 * len(reply.tool_calls)
        return inp, out

    # -- whole (non-streamed) replies

    def _openai_whole(self, request: FakeRequest, reply: Reply) -> dict[str, Any]:
        tokens = reply.token_list()
        inp, out = self._usage(request, reply, tokens)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens) or None, "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in reply.tool_calls
            ]
        finish = reply.finish or ("tool_calls" if reply.tool_calls else "stop")
        return {
            "id": "chatcmpl-" + secrets.token_hex(8),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
        }

    def _anthropic_whole(self, request: FakeRequest, reply: Reply) -> dict[str, Any]:
        tokens = reply.token_list()
        inp, out = self._usage(request, reply, tokens)
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(tokens)}] if tokens else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in reply.tool_calls]
        return {
            "id": "msg_" + secrets.token_hex(8),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reply.finish or ("tool_use" if reply.tool_calls else "end_turn"),
            "stop_sequence": None,
            "usage": {"input_tokens": inp, "output_tokens": out},
        }

    # -- streamed replies: (events before the first token, one event per token, closing events)

    def _openai_events(self, request: FakeRequest, reply: Reply) -> tuple[list[bytes], list[bytes], list[bytes]]:
        cid, created = "chatcmpl-" + secrets.token_hex(8), int(time.time())
        with_usage = bool(((request.body or {}).get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, choices: bool = True) -> bytes:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if with_usage:
                payload["usage"] = None
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        tokens = reply.token_list()
        per_token = [chunk({"content": t}) for t in tokens]
        for k, call in enumerate(reply.tool_calls):
            args = json.dumps(call.arguments)
            per_token.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": k,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            per_token += [
                chunk({"tool_calls": [{"index": k, "function": {"arguments": args[i : i + 7]}}]})
                for i in range(0, len(args), 7)
            ]
        closing = [chunk({}, reply.finish or ("tool_calls" if reply.tool_calls else "stop"))]
        if with_usage:
            inp, out = self._usage(request, reply, tokens)
            usage = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
            }
            closing.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
        closing.append(b"data: [DONE]\n\n")
        role = chunk({"role": "assistant", "content": "", "refusal": None})
        return [role], per_token, closing

    def _anthropic_events(self, request: FakeRequest, reply: Reply) -> tuple[list[bytes], list[bytes], list[bytes]]:
        def event(kind: str, payload: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

        tokens = reply.token_list()
        inp, out = self._usage(request, reply, tokens)
        start = event(
            "message_start",
            {
                "message": {
                    "id": "msg_" + secrets.token_hex(8),
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": inp,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 1,
                    },
                }
            },
        )
        per_token: list[bytes] = []
        index = 0
        if tokens:
            per_token.append(
                event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                + event("ping", {})
                + event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": tokens[0]}})
            )
            per_token += [
                event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}})
                for t in tokens[1:]
            ]
            per_token[-1] += event("content_block_stop", {"index": 0})
            index = 1
        for call in reply.tool_calls:
            args = json.dumps(call.arguments)
            per_token.append(
                event(
                    "content_block_start",
                    {
                        "index": index,
                        "content_block": {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                    },
                )
                + event(
                    "content_block_delta", {"index": index, "delta": {"type": "input_json_delta", "partial_json": ""}}
                )
            )
            per_token += [
                event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "input_json_delta", "partial_json": args[i : i + 7]}},
                )
                for i in range(0, len(args), 7)
            ]
            per_token[-1] += event("content_block_stop", {"index": index})
            index += 1
        stop = reply.finish or ("tool_use" if reply.tool_calls else "end_turn")
        closing = [
            event(
                "message_delta",
                {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": out}},
            ),
            event("message_stop", {}),
        ]
        return [start], per_token, closing

    def _stream_error(self, request: FakeRequest, reply: Reply) -> bytes:
        message = reply.message or "Overloaded"
        if request.vendor == "anthropic":
            payload = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
            return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
        payload = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    async def _stream(
        self, request: FakeRequest, reply: Reply, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        events = self._openai_events if request.vendor == "openai" else self._anthropic_events
        before, per_token, closing = events(request, reply)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        hangup = asyncio.ensure_future(reader.read(1))  # the client sends nothing more until it hangs up

        async def wait(seconds: float) -> bool:
            """Sleep, unless the client hangs up first; return whether it is still there."""
            if seconds > 0 and not hangup.done():
                await asyncio.wait({hangup}, timeout=seconds)
            return not hangup.done()

        async def send(data: bytes) -> bool:
            if hangup.done():
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                await writer.drain()
            except ConnectionError:
                return False
            return True

        try:
            await writer.drain()
            if not await wait(reply.ttft) or not await send(b"".join(before)):
                request.closed_early = True
                return False
            for i in range(len(per_token) + 1):
                if i == reply.cut_after:
                    return False  # the connection drops without the end of the chunked body
                if i == reply.end_after:  # a clean end of the body, without the closing events
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    request.completed = True
                    return True
                if i == reply.malformed_after:
                    await send(
                        b'data: {"choices": [{"delta": \n\n'
                        if request.vendor == "openai"
                        else b'event: content_block_delta\ndata: {"type": "content_blo\n\n'
                    )
                if i == reply.error_after:
                    await send(self._stream_error(request, reply))
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    request.completed = True
                    return True
                if i == reply.stall_after:
                    await wait(3600)
                    request.closed_early = True
                    return False
                if i == len(per_token):
                    break
                if (i and not await wait(reply.gap)) or not await send(per_token[i]):
                    request.closed_early = True
                    return False
                request.sent_at.append(time.perf_counter())
            if not await send(b"".join(closing)):
                request.closed_early = True
                return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            request.completed = True
            return True
        finally:
            hangup.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await hangup


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """A running FakeLLM for one test."""
    with FakeLLM() as fake:
        yield fake
