"""A fake OpenAI Realtime server on 127.0.0.1 that speaks the GA protocol strictly, scripted like fake_llm.

    with FakeRealtime() as fake:                     # or the `fake_realtime` fixture
        fake.hear(Utterance(start_ms=200, end_ms=800, transcript="what time is it"))
        fake.script(Response("It is noon.", audio_ms=600), Response(tool_calls=[ToolCall(...)]))
        model = RealtimeModel(settings(**fake.env()))
        ...
        fake.events                                  # every client event, in order, over every connection
        fake.connections[-1].items                   # the conversation as the server keeps it
        await fake.until(lambda: fake.of_type("response.create"))

Handshake: `GET /v1/realtime?model=...` needs `Authorization: Bearer ...`; an `OpenAI-Beta` header (a
beta client) is refused with 400, `fake.refuse = 429` refuses the next upgrades with that status, and
`fake.bad_key` gets the `invalid_api_key` error and a close. On open the server sends `session.created`.

Every client event is checked against the GA shapes: an unknown event type or field, a beta field
(`session.input_audio_format`, `modalities`, assistant content `text`, ...) gets the real `error`
event (`unknown_parameter`, `invalid_value`, `missing_required_parameter`) naming the parameter.

Caller speech is scripted by the duration of the audio appended (8 bytes of pcmu = 1 ms), as server
VAD would find it: each `Utterance` in `fake.utterances` (times counted from the connection's first
append) gives `speech_started` at `start_ms` (minus the prefix padding), `speech_stopped` once the
session's silence duration has passed after `end_ms`, then `committed`, the user item, and its input
transcription (with usage) when transcription is on; then, with `create_response`, a response.
Speech starting during a response with `interrupt_response` cancels it (`turn_detected`). With server VAD
and `idle_timeout_ms`, that much appended audio without speech after a response's audio has played (or
from the start) gives `input_audio_buffer.timeout_triggered{audio_start_ms, audio_end_ms, item_id}`,
the empty user item committed, and a response: the model's reprompt (the next scripted one).

Each response (automatic, or on `response.create`) takes the next scripted `Response`, else
`fake.default`. A `Response` controls the spoken transcript (word deltas), the audio (`audio_ms`
of μ-law in `chunk_ms` deltas, `gap` seconds apart, after `ttft`; `items` > 1 splits it over several
assistant items), `tool_calls` (function_call items, after the audio), the usage reported, and
faults after n audio deltas: `stall_after` (nothing more until cancelled), `close_after` (the socket
drops: `close_code` 1006 aborts the TCP connection, others close with that code).

`conversation.item.truncate` answers `truncated`, or the real errors: past the item's audio,
"Audio content of Xms is already shorter than Yms" and then a truncate clamped to X; 0 ms or a
non-audio item, `unsupported_content_type`. `max_seconds` ends each session like the real 60 minute
limit: the `session_expired` error, then close 1001.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.http11 import Response as HTTPResponse

from main import ToolCall

# -- the GA shapes: a dict names the fields allowed under a key, None any value
FORMAT = {"type": None, "rate": None}
TURN = {
    "type": None,
    "threshold": None,
    "prefix_padding_ms": None,
    "silence_duration_ms": None,
    "create_response": None,
    "interrupt_response": None,
    "idle_timeout_ms": None,
    "eagerness": None,
}
TURN_TYPES = {  # each turn detection type's own fields (idle_timeout_ms is server VAD's alone)
    "server_vad": set(TURN) - {"eagerness"},
    "semantic_vad": {"type", "eagerness", "create_response", "interrupt_response"},
}
SESSION = {
    "type": None,
    "model": None,
    "instructions": None,
    "output_modalities": None,
    "tools": None,
    "tool_choice": None,
    "max_output_tokens": None,
    "truncation": None,
    "tracing": None,
    "include": None,
    "prompt": None,
    "reasoning": None,
    "parallel_tool_calls": None,
    "audio": {
        "input": {
            "format": FORMAT,
            "transcription": {
                "model": None,
                "language": None,
                "prompt": None,
                "delay": None,
                "keywords": None,
                "languages": None,
            },
            "noise_reduction": {"type": None, "strength": None},
            "turn_detection": TURN,
        },
        "output": {"format": FORMAT, "voice": None, "speed": None},
    },
}
RESPONSE = {
    "instructions": None,
    "output_modalities": None,
    "conversation": None,
    "metadata": None,
    "tools": None,
    "tool_choice": None,
    "max_output_tokens": None,
    "audio": None,
    "input": None,
    "prompt": None,
}
EVENTS: dict[str, dict[str, Any]] = {  # client event type: its fields
    "session.update": {"session": SESSION},
    "input_audio_buffer.append": {"audio": None},
    "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {},
    "conversation.item.create": {"previous_item_id": None, "item": None},
    "conversation.item.retrieve": {"item_id": None},
    "conversation.item.truncate": {"item_id": None, "content_index": None, "audio_end_ms": None},
    "conversation.item.delete": {"item_id": None},
    "response.create": {"response": RESPONSE},
    "response.cancel": {"response_id": None},
}
ITEM_FIELDS = {
    "message": {"id", "type", "object", "status", "role", "content"},
    "function_call": {"id", "type", "object", "status", "call_id", "name", "arguments"},
    "function_call_output": {"id", "type", "object", "status", "call_id", "output"},
}
CONTENT = {
    "user": {"input_text", "input_audio", "input_image"},
    "system": {"input_text"},
    "assistant": {"output_text", "output_audio"},
}
FORMATS = {"audio/pcm": 48, "audio/pcmu": 8, "audio/pcma": 8}  # bytes per ms (audio/pcm is 24 kHz 16-bit only)
VOICES = {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}


class Invalid(Exception):
    """A client event the real server would refuse: its error code, parameter and message."""

    def __init__(self, code: str, param: str | None, message: str) -> None:
        super().__init__(message)
        self.code, self.param, self.message = code, param, message


def check_fields(value: Any, shape: dict[str, Any], path: str) -> None:
    """Refuse fields the GA API does not know, naming the first one as the API does."""
    if not isinstance(value, dict):
        raise Invalid("invalid_type", path, f"Invalid type for '{path}': expected an object.")
    for key in value:
        name = f"{path}.{key}" if path else key
        if key not in shape:
            raise Invalid("unknown_parameter", name, f"Unknown parameter: '{name}'.")
        if isinstance(sub := shape[key], dict) and value[key] is not None:
            check_fields(value[key], sub, name)


def check_session(session: dict[str, Any]) -> None:
    """The GA session.update rules the bridge relies on."""
    check_fields(session, SESSION, "session")
    if session.get("type") is None:
        raise Invalid("missing_required_parameter", "session.type", "Missing required parameter: 'session.type'.")
    if session["type"] != "realtime":
        raise Invalid("invalid_value", "session.type", f"Invalid value: '{session['type']}'.")
    modalities = session.get("output_modalities")
    if modalities is not None and modalities not in (["audio"], ["text"]):
        raise Invalid("invalid_value", "session.output_modalities", "output_modalities must be ['audio'] or ['text'].")
    audio = session.get("audio") or {}
    for side in ("input", "output"):
        fmt = (audio.get(side) or {}).get("format")
        if fmt is not None:
            if fmt.get("type") not in FORMATS:
                raise Invalid(
                    "invalid_value",
                    f"session.audio.{side}.format.type",
                    f"Invalid value: '{fmt.get('type')}'. Supported values are: {', '.join(FORMATS)}.",
                )
            if fmt["type"] == "audio/pcm" and fmt.get("rate", 24000) != 24000:
                raise Invalid("invalid_value", f"session.audio.{side}.format.rate", "Only 24000 is supported.")
    voice = (audio.get("output") or {}).get("voice")
    if voice is not None and not (voice in VOICES or isinstance(voice, dict)):
        raise Invalid("invalid_value", "session.audio.output.voice", f"Invalid value: '{voice}'.")
    turn = (audio.get("input") or {}).get("turn_detection")
    if turn is not None:
        if turn.get("type") not in TURN_TYPES:
            raise Invalid("invalid_value", "session.audio.input.turn_detection.type", "Invalid turn detection type.")
        for key in turn:
            if key not in TURN_TYPES[turn["type"]]:
                name = f"session.audio.input.turn_detection.{key}"
                raise Invalid("unknown_parameter", name, f"Unknown parameter: '{name}'.")
    for i, tool in enumerate(session.get("tools") or []):
        check_fields(tool, {"type": None, "name": None, "description": None, "parameters": None}, f"session.tools[{i}]")
        if tool.get("type") != "function" or not tool.get("name"):
            raise Invalid("invalid_value", f"session.tools[{i}]", "A tool needs type 'function' and a name.")


def check_item(item: Any) -> None:
    """A conversation item in GA form (assistant text is `output_text`, not beta's `text`)."""
    if not isinstance(item, dict) or item.get("type") not in ITEM_FIELDS:
        raise Invalid("invalid_value", "item.type", f"Invalid value: '{(item or {}).get('type')}'.")
    for key in item:
        if key not in ITEM_FIELDS[item["type"]]:
            raise Invalid("unknown_parameter", f"item.{key}", f"Unknown parameter: 'item.{key}'.")
    if item["type"] == "message":
        role = item.get("role")
        if role not in CONTENT:
            raise Invalid("invalid_value", "item.role", f"Invalid value: '{role}'.")
        for i, part in enumerate(item.get("content") or []):
            if part.get("type") not in CONTENT[role]:
                raise Invalid(
                    "invalid_value",
                    f"item.content[{i}].type",
                    f"Invalid value: '{part.get('type')}'. Supported values are: {', '.join(sorted(CONTENT[role]))}.",
                )


@dataclass
class Utterance:
    """The caller speaking from start_ms to end_ms of the appended audio, and what they said."""

    start_ms: int
    end_ms: int
    transcript: str = "hello"
    transcript_delay: float = 0.0  # seconds the transcription takes (it may arrive after the response)


@dataclass
class Response:
    """What the fake model answers with, for one response (see the module docstring)."""

    transcript: str = "Hello from the fake model."
    audio_ms: int = 400
    chunk_ms: int = 100
    gap: float = 0.0
    ttft: float = 0.0
    items: int = 1
    tool_calls: Sequence[ToolCall] = ()
    stall_after: int | None = None
    close_after: int | None = None
    close_code: int = 1006
    input_text_tokens: int = 120
    cached_text_tokens: int = 0
    input_audio_tokens: int = 40
    cached_audio_tokens: int = 0
    output_text_tokens: int | None = None  # default: the transcript's words
    output_audio_tokens: int | None = None  # default: 20 per second of audio


@dataclass
class Connection:
    """One client's socket: what it sent and what the server made of it."""

    path: str
    headers: dict[str, str] = field(repr=False)
    model: str = ""
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)
    binary_frames: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list, repr=False)  # server events, in order
    session: dict[str, Any] = field(default_factory=dict, repr=False)
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)
    audio_bytes: int = 0  # appended since the connection opened
    close_code: int | None = None

    def item(self, item_id: str) -> dict[str, Any] | None:
        return next((i for i in self.items if i.get("id") == item_id), None)


@dataclass
class Active:
    """The response being generated."""

    id: str
    task: asyncio.Task[None] | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    audio_ms: int = 0  # generated so far
    done: bool = False
    started_ms: int = 0  # the appended audio when it began


def default_session(model: str) -> dict[str, Any]:
    """The session the real server starts with (24 kHz PCM both ways)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_fake",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "You are a helpful assistant.",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time()) + 3600,
        "include": None,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 200,
                    "idle_timeout_ms": None,
                    "create_response": True,
                    "interrupt_response": True,
                },
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
        },
    }


WHOLE = {"format", "turn_detection", "transcription", "noise_reduction", "tools", "voice"}  # replaced, not merged


def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in WHOLE:
            merge(into[key], value)
        else:
            into[key] = value


class FakeRealtime:
    """A scripted OpenAI Realtime (GA) server on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, *, max_seconds: float = 0.0, refuse_beta: bool = True) -> None:
        self.default = Response()
        self.responses: list[Response | Callable[[Connection], Response]] = []
        self.utterances: list[Utterance] = []
        self.connections: list[Connection] = []
        self.max_seconds = max_seconds
        self.refuse_beta = refuse_beta
        self.refuse = 0  # an HTTP status for the next upgrades (401, 429, ...)
        self.bad_key = "sk-bad-key"
        self.port = 0
        self._ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None

    # -- the test-facing API

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def env(self, **extra: str) -> dict[str, str]:
        """The env vars that point the speech plugin at this server, with a made-up key."""
        return {"SPEECH_MODEL": "openai", "OPENAI_BASE_URL": self.url, "OPENAI_API_KEY": "made-up-openai-key", **extra}

    def script(self, *responses: Response | Callable[[Connection], Response]) -> FakeRealtime:
        """Queue the next responses, in order."""
        self.responses.extend(responses)
        return self

    def hear(self, *utterances: Utterance) -> FakeRealtime:
        """Queue what the caller says, in appended-audio time of the next connection."""
        self.utterances.extend(utterances)
        return self

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every client event over every connection, in order (appends included)."""
        return [e for c in self.connections for e in c.events]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    async def until(self, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        """Wait (without blocking the loop) until predicate() is true; fail after timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s; events: {self.events[-10:]}")
            await asyncio.sleep(0.005)

    # -- lifecycle

    def __enter__(self) -> FakeRealtime:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(self._serve())
            self.port = next(iter(self._server.sockets)).getsockname()[1]
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-realtime", daemon=True)
        self._thread.start()
        if not started.wait(5):
            raise RuntimeError("the fake Realtime server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _serve(self) -> Server:
        return await serve(
            self._session, "127.0.0.1", 0, process_request=self._handshake, compression=None, max_size=None
        )

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _handshake(self, ws: ServerConnection, request: Request) -> HTTPResponse | None:
        def refuse(status: int, code: str, message: str) -> HTTPResponse:
            body = {"error": {"type": "invalid_request_error", "code": code, "message": message, "param": None}}
            return ws.respond(HTTPStatus(status), json.dumps(body))

        if not request.path.startswith("/v1/realtime"):
            return refuse(404, "not_found", f"Invalid URL (GET {request.path})")
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return refuse(401, "missing_api_key", "You didn't provide an API key.")
        if self.refuse_beta and "OpenAI-Beta" in request.headers:
            return refuse(
                400,
                "beta_not_supported",
                "The OpenAI-Beta header selects the beta protocol; this server speaks only the GA Realtime API.",
            )
        if self.refuse:
            return refuse(self.refuse, "refused", f"fake refusal {self.refuse}")
        return None

    # -- one connection

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids:04d}"

    async def _session(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        query = dict(p.split("=", 1) for p in request.path.partition("?")[2].split("&") if "=" in p)
        conn = Connection(
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.raw_items()},
            model=query.get("model", ""),
        )
        conn.session = default_session(conn.model)
        self.connections.append(conn)
        state = _State(self, ws, conn)
        expiry = asyncio.get_running_loop().call_later(self.max_seconds, state.expire) if self.max_seconds else None
        try:
            if conn.headers.get("authorization") == f"Bearer {self.bad_key}":
                await state.error("invalid_api_key", None, "Incorrect API key provided.", kind="invalid_request_error")
                await ws.close(1008, "invalid_api_key")
                return
            await state.send("session.created", session=conn.session)
            async for frame in ws:
                if isinstance(frame, bytes):
                    conn.binary_frames += 1
                await state.handle(frame)
        except ConnectionClosed:
            pass
        finally:
            if expiry is not None:
                expiry.cancel()
            await state.stop()
            conn.close_code = ws.close_code


class _State:
    """What the server keeps for one connection while it runs."""

    def __init__(self, fake: FakeRealtime, ws: ServerConnection, conn: Connection) -> None:
        self.fake, self.ws, self.conn = fake, ws, conn
        self.response: Active | None = None
        self.speaking: tuple[Utterance, str] | None = None  # the utterance in progress and its item id
        self.idle_from = 0  # appended audio (ms) from which the caller's silence counts towards idle_timeout_ms
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def per_ms(self) -> int:
        return FORMATS[self.conn.session["audio"]["input"]["format"]["type"]]

    async def send(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "event_id": self.fake._id("event"), **fields}
        self.conn.sent.append(event)
        await self.ws.send(json.dumps(event))

    async def error(
        self,
        code: str | None,
        param: str | None,
        message: str,
        *,
        event_id: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        await self.send(
            "error", error={"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
        )

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def expire(self) -> None:
        async def end() -> None:
            await self.error("session_expired", None, "Your session hit the maximum duration of 60 minutes.")
            await self.ws.close(1001, "Your session hit the maximum duration of 60 minutes.")

        self.spawn(end())

    # -- client events

    async def handle(self, frame: str | bytes) -> None:
        try:
            event = json.loads(frame)
        except ValueError:
            await self.error("invalid_json", None, "The server could not parse the event as JSON.")
            return
        self.conn.events.append(event)
        client_id = event.get("event_id") if isinstance(event, dict) else None
        try:
            kind = event.get("type") if isinstance(event, dict) else None
            if kind not in EVENTS:
                raise Invalid(
                    "invalid_value", "type", f"Invalid value: '{kind}'. Supported values are: {', '.join(EVENTS)}."
                )
            check_fields({k: v for k, v in event.items() if k not in ("type", "event_id")}, EVENTS[kind], "")
            await getattr(self, "on_" + kind.replace(".", "_"))(event)
        except Invalid as e:
            await self.error(e.code, e.param, e.message, event_id=client_id)

    async def on_session_update(self, event: dict[str, Any]) -> None:
        update = event["session"]
        check_session(update)
        merge(self.conn.session, update)
        await self.send("session.updated", session=self.conn.session)

    async def on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        try:
            audio = base64.b64decode(event.get("audio", ""), validate=True)
        except (binascii.Error, ValueError):
            raise Invalid("invalid_value", "audio", "Invalid 'audio'. Expected base64-encoded audio bytes.") from None
        self.conn.audio_bytes += len(audio)
        await self.vad()

    async def on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        await self.commit(self.fake._id("item"), "", event)

    async def on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        await self.send("input_audio_buffer.cleared")

    async def on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = dict(event["item"])
        check_item(item)
        if item["type"] == "function_call_output" and not any(
            i.get("type") == "function_call" and i.get("call_id") == item.get("call_id") for i in self.conn.items
        ):
            raise Invalid("fake_unknown_call_id", "item.call_id", f"No function call {item.get('call_id')!r}.")
        item.setdefault("id", self.fake._id("item"))
        item.setdefault("object", "realtime.item")
        item.setdefault("status", "completed")
        await self.add(item, event.get("previous_item_id"))

    async def on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self.conn.item(event["item_id"])
        if item is None:
            raise Invalid("item_not_found", "item_id", f"Item with item_id not found: {event['item_id']}")
        await self.send("conversation.item.retrieved", item=item)

    async def on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        item = self.conn.item(event["item_id"])
        if item is None:
            raise Invalid("item_not_found", "item_id", f"Item with item_id not found: {event['item_id']}")
        self.conn.items.remove(item)
        await self.send("conversation.item.deleted", item_id=item["id"])

    async def on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        item = self.conn.item(event["item_id"])
        end = event.get("audio_end_ms")
        if item is None:
            raise Invalid("item_not_found", "item_id", f"Item with item_id not found: {event['item_id']}")
        if item.get("role") != "assistant" or "audio_ms" not in item or not end:
            raise Invalid("unsupported_content_type", None, "Only model output audio messages can be truncated")
        if end > item["audio_ms"]:
            # the real server reports the overshoot (without the client's event id), then truncates at the end
            await self.error(None, None, f"Audio content of {item['audio_ms']}ms is already shorter than {end}ms")
            end = item["audio_ms"]
        item["audio_ms"] = end
        for part in item.get("content", []):
            part["transcript"] = ""  # the server drops the text the caller did not hear
        await self.send(
            "conversation.item.truncated",
            item_id=item["id"],
            content_index=event.get("content_index", 0),
            audio_end_ms=end,
        )

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.response is not None:
            raise Invalid(
                "conversation_already_has_active_response",
                None,
                f"Conversation already has an active response in progress: {self.response.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self.start_response()

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        if self.response is None:
            raise Invalid("response_cancel_not_active", None, "Cancellation failed: no active response found")
        await self.cancel("client_cancelled")

    # -- input: scripted server VAD

    async def vad(self) -> None:
        now = self.conn.audio_bytes // self.per_ms
        turn = self.conn.session["audio"]["input"]["turn_detection"] or {}
        if self.speaking is None and self.fake.utterances and now >= self.fake.utterances[0].start_ms:
            utterance = self.fake.utterances.pop(0)
            self.speaking = (utterance, self.fake._id("item"))
            start = max(0, utterance.start_ms - turn.get("prefix_padding_ms", 300))
            await self.send("input_audio_buffer.speech_started", audio_start_ms=start, item_id=self.speaking[1])
            if self.response is not None and turn.get("interrupt_response", True):
                await self.cancel("turn_detected")
        if self.speaking is not None:
            utterance, item_id = self.speaking
            stopped = utterance.end_ms + turn.get("silence_duration_ms", 200)
            if now >= stopped:
                self.speaking, self.idle_from = None, stopped
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=stopped, item_id=item_id)
                await self.commit(item_id, utterance.transcript, None, utterance)
                if turn.get("create_response", True) and self.response is None:
                    self.start_response()
        idle = turn.get("idle_timeout_ms") if turn.get("type") == "server_vad" else None
        if idle and self.speaking is None and self.response is None and now - self.idle_from >= idle:
            # the silent stretch is committed as an (empty) user item and answered: the model's reprompt
            item_id, start, self.idle_from = self.fake._id("item"), self.idle_from, now
            await self.send(
                "input_audio_buffer.timeout_triggered", audio_start_ms=start, audio_end_ms=now, item_id=item_id
            )
            await self.commit(item_id, "", None)
            self.start_response()

    async def commit(
        self, item_id: str, transcript: str, event: dict[str, Any] | None, utterance: Utterance | None = None
    ) -> None:
        previous = self.conn.items[-1]["id"] if self.conn.items else None
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = {
            "id": item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self.add(item, None)
        transcription = self.conn.session["audio"]["input"].get("transcription")
        if transcription and utterance is not None:
            self.spawn(self.transcribe(item, utterance, transcription.get("model", "")))

    async def transcribe(self, item: dict[str, Any], utterance: Utterance, model: str) -> None:
        await asyncio.sleep(utterance.transcript_delay)
        seconds = (utterance.end_ms - utterance.start_ms) / 1000
        usage: dict[str, Any] = (
            {"type": "duration", "seconds": seconds}
            if "whisper" in model
            else {
                "type": "tokens",
                "input_tokens": int(seconds * 10),
                "output_tokens": len(utterance.transcript.split()),
                "total_tokens": int(seconds * 10) + len(utterance.transcript.split()),
                "input_token_details": {"text_tokens": 0, "audio_tokens": int(seconds * 10)},
            }
        )
        item["content"][0]["transcript"] = utterance.transcript
        await self.send(
            "conversation.item.input_audio_transcription.delta",
            item_id=item["id"],
            content_index=0,
            delta=utterance.transcript,
        )
        await self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=item["id"],
            content_index=0,
            transcript=utterance.transcript,
            usage=usage,
        )

    async def add(self, item: dict[str, Any], previous: str | None) -> None:
        if previous is None:
            self.conn.items.append(item)
        elif previous == "root":
            self.conn.items.insert(0, item)
        else:
            at = next((n for n, i in enumerate(self.conn.items) if i["id"] == previous), None)
            if at is None:
                raise Invalid("item_not_found", "previous_item_id", f"Previous item not found: {previous}")
            self.conn.items.insert(at + 1, item)
        shown = {k: v for k, v in item.items() if k != "audio_ms"}
        before = self.conn.items[self.conn.items.index(item) - 1]["id"] if self.conn.items.index(item) else None
        await self.send("conversation.item.added", previous_item_id=before, item=shown)
        await self.send("conversation.item.done", previous_item_id=before, item=shown)

    # -- responses

    def start_response(self) -> None:
        script = self.fake.responses.pop(0) if self.fake.responses else self.fake.default
        reply = script(self.conn) if callable(script) else script
        self.response = Active(id=self.fake._id("resp"), started_ms=self.conn.audio_bytes // self.per_ms)
        self.response.task = self.spawn(self.respond(self.response, reply))

    async def respond(self, active: Active, reply: Response) -> None:
        rid = active.id
        await self.send(
            "response.created",
            response={"id": rid, "object": "realtime.response", "status": "in_progress", "output": [], "usage": None},
        )
        await self.send(
            "rate_limits.updated",
            rate_limits=[
                {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
                {"name": "tokens", "limit": 400000, "remaining": 399000, "reset_seconds": 0.15},
            ],
        )
        await asyncio.sleep(reply.ttft)
        words = reply.transcript.split(" ") if reply.transcript else []
        chunk = reply.chunk_ms * self.per_ms_out
        total = reply.audio_ms * self.per_ms_out
        chunks = [bytes((i + j) % 256 for j in range(min(chunk, total - i))) for i in range(0, total, chunk)]
        per_item = -(-len(chunks) // reply.items) if chunks else 0
        sent = 0
        for n in range(reply.items if chunks else 0):
            mine = chunks[n * per_item : (n + 1) * per_item]
            said = words[n * len(words) // reply.items : (n + 1) * len(words) // reply.items]
            if not mine:
                break
            item = {
                "id": self.fake._id("item"),
                "type": "message",
                "object": "realtime.item",
                "status": "in_progress",
                "role": "assistant",
                "content": [{"type": "output_audio", "transcript": ""}],
                "audio_ms": 0,
            }
            active.output.append(item)
            index = len(active.output) - 1
            await self.send(
                "response.output_item.added",
                response_id=rid,
                output_index=index,
                item={k: v for k, v in item.items() if k != "audio_ms"} | {"content": []},
            )
            self.conn.items.append(item)
            await self.send(
                "conversation.item.added",
                previous_item_id=None,
                item={k: v for k, v in item.items() if k != "audio_ms"} | {"content": []},
            )
            where = {"response_id": rid, "item_id": item["id"], "output_index": index, "content_index": 0}
            await self.send("response.content_part.added", **where, part={"type": "audio", "transcript": ""})
            for k, data in enumerate(mine):
                if reply.close_after is not None and sent == reply.close_after:
                    await self.drop(reply.close_code)
                if reply.stall_after is not None and sent == reply.stall_after:
                    await asyncio.sleep(3600)
                if sent:
                    await asyncio.sleep(reply.gap)
                item["audio_ms"] += len(data) // self.per_ms_out
                active.audio_ms += len(data) // self.per_ms_out
                await self.send("response.output_audio.delta", **where, delta=base64.b64encode(data).decode())
                if k < len(said):
                    await self.send(
                        "response.output_audio_transcript.delta", **where, delta=said[k] if k == 0 else " " + said[k]
                    )
                sent += 1
            text = " ".join(said)
            if len(said) > len(mine):
                await self.send(
                    "response.output_audio_transcript.delta", **where, delta=" " + " ".join(said[len(mine) :])
                )
            item["content"][0]["transcript"] = text
            item["status"] = "completed"
            shown = {k: v for k, v in item.items() if k != "audio_ms"}
            await self.send("response.output_audio.done", **where)
            await self.send("response.output_audio_transcript.done", **where, transcript=text)
            await self.send("response.content_part.done", **where, part={"type": "audio", "transcript": text})
            await self.send("response.output_item.done", response_id=rid, output_index=index, item=shown)
            await self.send("conversation.item.done", previous_item_id=None, item=shown)
        for call in reply.tool_calls:
            arguments = json.dumps(call.arguments)
            item = {
                "id": self.fake._id("item"),
                "type": "function_call",
                "object": "realtime.item",
                "status": "completed",
                "name": call.name,
                "call_id": call.id,
                "arguments": arguments,
            }
            active.output.append(item)
            index = len(active.output) - 1
            self.conn.items.append(item)
            await self.send(
                "response.output_item.added",
                response_id=rid,
                output_index=index,
                item=item | {"status": "in_progress", "arguments": ""},
            )
            await self.send(
                "conversation.item.added", previous_item_id=None, item=item | {"status": "in_progress", "arguments": ""}
            )
            await self.send(
                "response.function_call_arguments.delta",
                response_id=rid,
                item_id=item["id"],
                output_index=index,
                call_id=call.id,
                delta=arguments,
            )
            await self.send(
                "response.function_call_arguments.done",
                response_id=rid,
                item_id=item["id"],
                output_index=index,
                call_id=call.id,
                name=call.name,
                arguments=arguments,
            )
            await self.send("response.output_item.done", response_id=rid, output_index=index, item=item)
            await self.send("conversation.item.done", previous_item_id=None, item=item)
        await self.finish(active, reply, "completed", None)

    @property
    def per_ms_out(self) -> int:
        return FORMATS[self.conn.session["audio"]["output"]["format"]["type"]]

    async def drop(self, code: int) -> None:
        if code == 1006:
            assert self.ws.transport is not None
            self.ws.transport.abort()
        else:
            await self.ws.close(code, "fake fault")
        await asyncio.sleep(3600)

    async def cancel(self, reason: str) -> None:
        active = self.response
        assert active is not None and active.task is not None
        active.task.cancel()
        await asyncio.gather(active.task, return_exceptions=True)
        for item in active.output:
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
        await self.finish(active, None, "cancelled", reason)

    async def finish(self, active: Active, reply: Response | None, status: str, reason: str | None) -> None:
        if active.done:
            return
        active.done = True
        self.response = None
        # the idle timeout counts from when the reply's audio has played (response.done plus its playback);
        # this server makes a reply at once, so that is where it began plus its audio
        self.idle_from = max(self.idle_from, active.started_ms + active.audio_ms)
        reply = reply or Response()
        said = sum(
            len(str(i.get("content", [{}])[0].get("transcript", "")).split())
            for i in active.output
            if i.get("type") == "message"
        )
        text_out = reply.output_text_tokens if reply.output_text_tokens is not None else said
        audio_out = reply.output_audio_tokens if reply.output_audio_tokens is not None else active.audio_ms // 50
        text_in, audio_in = reply.input_text_tokens, reply.input_audio_tokens
        usage = {
            "total_tokens": text_in + audio_in + text_out + audio_out,
            "input_tokens": text_in + audio_in,
            "output_tokens": text_out + audio_out,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": reply.cached_text_tokens + reply.cached_audio_tokens,
                "cached_tokens_details": {
                    "text_tokens": reply.cached_text_tokens,
                    "audio_tokens": reply.cached_audio_tokens,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }
        details = {"type": status, "reason": reason} if status == "cancelled" else None
        output = [{k: v for k, v in i.items() if k != "audio_ms"} for i in active.output]
        await self.send(
            "response.done",
            response={
                "id": active.id,
                "object": "realtime.response",
                "status": status,
                "status_details": details,
                "output": output,
                "conversation_id": "conv_fake",
                "output_modalities": ["audio"],
                "max_output_tokens": "inf",
                "usage": usage,
            },
        )


@pytest.fixture
def fake_realtime() -> Iterator[FakeRealtime]:
    """A running FakeRealtime for one test."""
    with FakeRealtime() as fake:
        yield fake
