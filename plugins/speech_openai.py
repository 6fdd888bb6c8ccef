"""OpenAI's Realtime API (GA) as a speech model for media mode, μ-law passed through both ways.

The socket is opened by the official SDK's `client.realtime.connect()` (auth, base URL, organisation and
project headers, its handshake errors), but events are sent with `send_raw` and read with `recv_bytes`:
the SDK's typed send transform and typed event parse cost more than the rest of a call's audio path.
Events are encoded and decoded here with msgspec, keeping only the fields used.

The socket URL follows OPENAI_REALTIME_URL, else OPENAI_BASE_URL (shared with the LLM plugin), so a
compatible or local server works; the SDK turns http(s) into ws(s) and appends `/realtime?model=...`.

OPENAI_REALTIME_IDLE_TIMEOUT_MS (default 8000, 0 turns it off) is server VAD's `idle_timeout_ms`: when the
caller says nothing for that long after a reply has played, the server sends
`input_audio_buffer.timeout_triggered` (a CallerSilent: a miss in media mode) and speaks a reprompt of its
own. Only server VAD has it, and server VAD is what this plugin asks for.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from main import (
    CallerDone,
    CallerSilent,
    CallerSpeaking,
    ConfigError,
    Message,
    ProviderError,
    Register,
    ReplyDone,
    Settings,
    SpeechAudio,
    SpeechEvent,
    SpeechModel,
    SpeechSession,
    ToolCall,
    ToolSpec,
    Transcript,
    Usage,
    VendorSDK,
    hookimpl,
    log,
)

DEFAULT_MODEL = "gpt-realtime-2.1"  # current, with no announced shutdown
DEFAULT_URL = "https://api.openai.com/v1"
DEFAULT_TRANSCRIBER = (
    "gpt-realtime-whisper"  # billed per minute; whisper-1 and gpt-4o-*-transcribe have a shutdown date
)
OPEN_TIMEOUT = 10.0  # seconds for the handshake and session.updated
PCMU_BYTES_PER_MS = 8
# the vendor refuses this account or key: reconnecting cannot help (LiveKit's list, plus the session limit)
FATAL = {"invalid_api_key", "insufficient_quota", "account_deactivated", "billing_hard_limit_reached"}
RETRYABLE = {"session_expired"}  # a new session, seeded with the history, carries on
IDLE_TIMEOUT_MS = 8000  # the caller's silence after a reply that makes a miss (media mode's MAX_MISSES)


# -- client events (encoded as tagged structs: the tag is the event type)


class Append(msgspec.Struct, tag="input_audio_buffer.append", tag_field="type"):
    audio: bytes  # msgspec writes bytes as base64


class CreateItem(msgspec.Struct, tag="conversation.item.create", tag_field="type"):
    item: dict[str, Any]


class Truncate(msgspec.Struct, tag="conversation.item.truncate", tag_field="type"):
    item_id: str
    audio_end_ms: int
    content_index: int = 0


class DeleteItem(msgspec.Struct, tag="conversation.item.delete", tag_field="type"):
    item_id: str


class CreateResponse(msgspec.Struct, tag="response.create", tag_field="type"):
    pass


# -- server events: only the fields used


class ErrorDetail(msgspec.Struct):
    type: str = ""
    code: str | None = None
    message: str = ""
    param: str | None = None


class Format(msgspec.Struct):
    type: str = ""


class AudioSide(msgspec.Struct):
    format: Format = msgspec.field(default_factory=Format)


class AudioConfig(msgspec.Struct):
    input: AudioSide = msgspec.field(default_factory=AudioSide)
    output: AudioSide = msgspec.field(default_factory=AudioSide)


class SessionConfig(msgspec.Struct):
    audio: AudioConfig = msgspec.field(default_factory=AudioConfig)


class TranscriptionUsage(msgspec.Struct):
    type: str = ""
    seconds: float = 0.0


class Cached(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0


class InputDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0
    cached_tokens: int = 0
    cached_tokens_details: Cached | None = None


class OutputDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: InputDetails | None = None
    output_token_details: OutputDetails | None = None


class StatusDetails(msgspec.Struct):
    reason: str | None = None
    error: Any = None


class ResponseBody(msgspec.Struct):
    status: str = ""
    status_details: StatusDetails | None = None
    usage: ResponseUsage | None = None


class Error(msgspec.Struct, tag="error", tag_field="type"):
    error: ErrorDetail


class SessionUpdated(msgspec.Struct, tag="session.updated", tag_field="type"):
    session: SessionConfig


class SpeechStarted(msgspec.Struct, tag="input_audio_buffer.speech_started", tag_field="type"):
    item_id: str = ""
    audio_start_ms: int = 0


class SpeechStopped(msgspec.Struct, tag="input_audio_buffer.speech_stopped", tag_field="type"):
    item_id: str = ""
    audio_end_ms: int = 0


class TimeoutTriggered(msgspec.Struct, tag="input_audio_buffer.timeout_triggered", tag_field="type"):
    pass  # (its audio_start_ms, audio_end_ms and item_id are not needed: the silence is the news)


class InputTranscript(msgspec.Struct, tag="conversation.item.input_audio_transcription.completed", tag_field="type"):
    item_id: str
    transcript: str
    usage: TranscriptionUsage | None = None


class ResponseCreated(msgspec.Struct, tag="response.created", tag_field="type"):
    pass


class AudioDelta(msgspec.Struct, tag="response.output_audio.delta", tag_field="type"):
    item_id: str
    delta: bytes  # base64 on the wire, decoded by msgspec


class OutputTranscript(msgspec.Struct, tag="response.output_audio_transcript.done", tag_field="type"):
    item_id: str
    transcript: str


class FunctionCall(msgspec.Struct, tag="response.function_call_arguments.done", tag_field="type"):
    call_id: str
    name: str
    arguments: str


class ResponseDone(msgspec.Struct, tag="response.done", tag_field="type"):
    response: ResponseBody


class Head(msgspec.Struct):
    type: str = ""


Known = (
    Error
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | TimeoutTriggered
    | InputTranscript
    | ResponseCreated
    | AudioDelta
    | OutputTranscript
    | FunctionCall
    | ResponseDone
)
DECODER = msgspec.json.Decoder(Known)
HEAD = msgspec.json.Decoder(Head)
ENCODER = msgspec.json.Encoder()


class RealtimeError(Exception):
    """An `error` event from the server (the cause a ProviderError is chained from)."""


def decode(data: bytes) -> Known | None:
    """The event if the session uses its type; None for the rest (the server sends many it does not need)."""
    try:
        return DECODER.decode(data)
    except msgspec.ValidationError:
        HEAD.decode(data)  # not even an event: raises
        return None


def session_body(model: RealtimeModel, instructions: str, tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """The session.update payload (GA shape): μ-law both ways, server VAD, input transcription, tools.

    Server VAD, not semantic_vad: only server VAD has `idle_timeout_ms`, which media mode's misses need."""
    turn: dict[str, Any] = {
        "type": "server_vad",
        "threshold": model.threshold,
        "prefix_padding_ms": model.prefix_ms,
        "silence_duration_ms": model.silence_ms,
        "create_response": True,
        "interrupt_response": True,
    }
    if model.idle_ms:
        turn["idle_timeout_ms"] = model.idle_ms
    transcription: dict[str, Any] = {"model": model.transcriber}
    if model.language:
        transcription["language"] = model.language
    return {
        "type": "realtime",
        "model": model.model,
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "transcription": transcription, "turn_detection": turn},
            "output": {"format": {"type": "audio/pcmu"}, "voice": model.voice},
        },
        "tools": [
            {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}
            for t in tools
        ],
        "tool_choice": "auto",
    }


def history_items(history: Sequence[Message]) -> list[dict[str, Any]]:
    """The call so far as conversation items: what each side said, as text.

    Tool messages and the tool calls on assistant messages are left out: the caller heard only the spoken
    text, which already says what the tools did, and a function call without its live output is noise."""
    items = []
    for m in history:
        if m.role == "tool" or not m.content:
            continue
        part = "input_text" if m.role == "user" else "output_text"
        items.append({"type": "message", "role": m.role, "content": [{"type": part, "text": m.content}]})
    return items


class RealtimeModel(VendorSDK, SpeechModel):
    """OpenAI Realtime speech-to-speech: one WebSocket session per call stream."""

    name = "openai"
    package = "openai"
    audio_format = "pcmu"

    def __init__(self, settings: Settings) -> None:
        self.key = settings.require("OPENAI_API_KEY", "SPEECH_MODEL=openai")
        self.base_url = settings.get("OPENAI_BASE_URL", DEFAULT_URL).rstrip("/")
        # a full .../realtime URL is accepted too: the SDK appends /realtime itself
        self.socket_url = settings.get("OPENAI_REALTIME_URL").rstrip("/").removesuffix("/realtime")
        self.model = settings.get("OPENAI_REALTIME_MODEL", DEFAULT_MODEL)
        self.voice = settings.get("OPENAI_REALTIME_VOICE", "marin")
        self.transcriber = settings.get("OPENAI_REALTIME_TRANSCRIBE", DEFAULT_TRANSCRIBER)
        self.language = settings.language.split("-")[0].lower()  # ISO-639-1, as transcription wants
        self.threshold = settings.number("OPENAI_REALTIME_VAD_THRESHOLD", 0.5)
        if self.threshold > 1:
            raise ConfigError(f"OPENAI_REALTIME_VAD_THRESHOLD={self.threshold:g} is not valid: set it between 0 and 1")
        self.silence_ms = settings.number("OPENAI_REALTIME_VAD_SILENCE_MS", 500, unit="milliseconds")
        self.prefix_ms = settings.number("OPENAI_REALTIME_VAD_PREFIX_MS", 300, inclusive=True, unit="milliseconds")
        self.idle_ms = settings.number(
            "OPENAI_REALTIME_IDLE_TIMEOUT_MS", IDLE_TIMEOUT_MS, inclusive=True, unit="milliseconds"
        )
        self.organization = settings.get("OPENAI_ORG_ID") or None
        self.project = settings.get("OPENAI_PROJECT_ID") or None
        self.closed_errors: tuple[type[BaseException], ...] = (OSError,)
        super().__init__(f"SPEECH_MODEL={self.name}")

    async def connect(self, sdk: Any) -> Any:
        # the SDK's WebSocket transport; imported here, in the background, not when plugins load
        self.closed_errors = (importlib.import_module("websockets.exceptions").ConnectionClosed, OSError)
        return sdk.AsyncOpenAI(
            api_key=self.key,
            base_url=self.base_url,
            websocket_base_url=self.socket_url or None,
            organization=self.organization,
            project=self.project,
            max_retries=0,
        )

    async def open(self, *, instructions: str, tools: Sequence[ToolSpec], history: Sequence[Message]) -> SpeechSession:
        client = await self.ready()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                # the SDK's own reconnect stays off: a new socket has no conversation, so the core owns reconnects
                conn = await client.realtime.connect(model=self.model).enter()
        except Exception as e:
            raise self.failure(e) from e
        session = RealtimeSession(self, conn)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await session.start(instructions, tools, history)
        except BaseException as e:
            await session.close()
            if isinstance(e, ProviderError):
                raise
            raise self.failure(e) from e
        return session

    def failure(self, e: BaseException) -> ProviderError:
        """One ProviderError for a failed handshake or socket; retryable unless the key or account is refused."""
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:
            return ProviderError(
                f"{self.name} realtime refused the connection: HTTP {status}",
                provider=self.name,
                retryable=status in (408, 429) or status >= 500,
            )
        if isinstance(e, TimeoutError):
            return ProviderError(f"{self.name} realtime did not answer in time", provider=self.name, retryable=True)
        what = f"{type(e).__name__}: {e}"[:300]
        return ProviderError(f"{self.name} realtime connection failed: {what}", provider=self.name, retryable=True)


class RealtimeSession(SpeechSession):
    """One Realtime conversation: a writer task sends queued events, events() reads and maps the server's."""

    def __init__(self, model: RealtimeModel, conn: Any) -> None:
        self.model, self.conn = model, conn
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.writer = asyncio.create_task(self._write())
        self.received: dict[str, int] = {}  # audio bytes received per assistant item (what truncate may cut)
        self.spoken: dict[str, int] = {}  # caller item: where its speech started (ms of input audio)
        self.heard: dict[str, int] = {}  # caller item: how long the caller spoke (ms), for transcription usage
        self.transcribed_ms = 0  # transcription not yet reported in a ReplyDone
        self.responding = False
        self.respond_after = False  # a response.create waits for the current response to end
        self.errors: set[str] = set()  # non-fatal error codes logged already
        self.closed = False

    # -- sending: one writer, so send_audio never waits and events keep their order

    def _send(self, event: msgspec.Struct | dict[str, Any]) -> None:
        # a str is a text frame; bytes would go out as a binary frame
        self.outbox.put_nowait(ENCODER.encode(event).decode())

    async def _write(self) -> None:
        while True:
            data = await self.outbox.get()
            try:
                await self.conn.send_raw(data)
            except Exception as e:  # the socket is gone: events() reports it
                log.debug("realtime send failed", extra={"provider": self.model.name, "error": str(e)})
                return

    def send_audio(self, data: bytes) -> None:
        if not self.closed:
            self.outbox.put_nowait(ENCODER.encode(Append(audio=data)).decode())

    async def send_text(self, text: str) -> None:
        self._send(
            CreateItem(item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
        )
        self._respond()

    async def tool_result(self, call_id: str, output: str) -> None:
        self._send(CreateItem(item={"type": "function_call_output", "call_id": call_id, "output": output}))
        self._respond()

    def _respond(self) -> None:
        """Ask for a response now, or when the current one is done (a second one is an error)."""
        if self.responding:
            self.respond_after = True
        else:
            self._send(CreateResponse())

    async def truncate(self, item: str, heard_ms: int) -> None:
        # never past the audio the item really has (an error), never 0 ms (refused): delete it instead
        end = min(heard_ms, self.received.get(item, 0) // PCMU_BYTES_PER_MS)
        self._send(Truncate(item_id=item, audio_end_ms=end) if end > 0 else DeleteItem(item_id=item))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.cancel()
        await asyncio.gather(self.writer, return_exceptions=True)
        try:
            await self.conn.close()
        except Exception as e:  # closing a dead socket
            log.debug("realtime close failed", extra={"provider": self.model.name, "error": str(e)})

    # -- setup

    async def start(self, instructions: str, tools: Sequence[ToolSpec], history: Sequence[Message]) -> None:
        """Configure the session, seed the history, and wait until the server confirms the configuration."""
        self._send({"type": "session.update", "session": session_body(self.model, instructions, tools)})
        for item in history_items(history):
            self._send(CreateItem(item=item))
        while True:
            event = decode(await self.conn.recv_bytes())
            if isinstance(event, Error):
                raise self._error(event, during="setup")
            if isinstance(event, SessionUpdated):
                audio = event.session.audio
                if audio.input.format.type != "audio/pcmu" or audio.output.format.type != "audio/pcmu":
                    raise ProviderError(
                        f"{self.model.name} realtime did not take audio/pcmu (input {audio.input.format.type!r}, "
                        f"output {audio.output.format.type!r})",
                        provider=self.model.name,
                    )
                return

    def _error(self, event: Error, *, during: str = "") -> ProviderError:
        e = event.error
        cause = RealtimeError(f"{e.code or e.type}: {e.message}")
        message = f"{self.model.name} realtime error{' during ' + during if during else ''}: {e.code}: {e.message}"
        error = ProviderError(message[:500], provider=self.model.name, retryable=e.code in RETRYABLE)
        error.__cause__ = cause
        return error

    # -- events

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while True:
            try:
                data = await self.conn.recv_bytes()
            except self.model.closed_errors as e:
                if self.closed:
                    return
                raise ProviderError(
                    f"{self.model.name} realtime socket closed: {e}"[:500], provider=self.model.name, retryable=True
                ) from e
            try:
                event = decode(data)
            except msgspec.DecodeError:
                self._log_once("malformed", "not JSON")
                continue
            if isinstance(event, AudioDelta):
                self.received[event.item_id] = self.received.get(event.item_id, 0) + len(event.delta)
                yield SpeechAudio(event.item_id, event.delta)
            elif isinstance(event, SpeechStarted):
                self.spoken[event.item_id] = event.audio_start_ms
                yield CallerSpeaking()
            elif isinstance(event, SpeechStopped):
                self.heard[event.item_id] = event.audio_end_ms - self.spoken.pop(event.item_id, event.audio_end_ms)
                yield CallerDone()
            elif isinstance(event, TimeoutTriggered):  # the server answers it with a reprompt of its own
                yield CallerSilent()
            elif isinstance(event, InputTranscript):
                heard = self.heard.pop(event.item_id, 0)
                usage = event.usage
                self.transcribed_ms += round(usage.seconds * 1000) if usage and usage.type == "duration" else heard
                yield Transcript("user", event.item_id, event.transcript)
            elif isinstance(event, OutputTranscript):
                yield Transcript("assistant", event.item_id, event.transcript)
            elif isinstance(event, ResponseCreated):
                self.responding = True
            elif isinstance(event, FunctionCall):
                if (call := self._tool_call(event)) is not None:
                    yield call
            elif isinstance(event, ResponseDone):
                yield self._reply_done(event)
            elif isinstance(event, Error):
                code = event.error.code or ""
                if code in FATAL or code in RETRYABLE:
                    raise self._error(event)
                self._log_once(code or event.error.type, event.error.message)

    def _tool_call(self, event: FunctionCall) -> ToolCall | None:
        try:
            arguments = json.loads(event.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):  # tell the model, which can try again, rather than end the call
            self._send(
                CreateItem(
                    item={
                        "type": "function_call_output",
                        "call_id": event.call_id,
                        "output": "error: the arguments were not a JSON object",
                    }
                )
            )
            self.respond_after = True
            return None
        return ToolCall(id=event.call_id, name=event.name, arguments=arguments)

    def _reply_done(self, event: ResponseDone) -> ReplyDone:
        self.responding = False
        if self.respond_after:
            self.respond_after = False
            self._send(CreateResponse())
        body = event.response
        if body.status == "failed":
            self._log_once("response failed", str(body.status_details.error if body.status_details else ""))
        u = body.usage or ResponseUsage()
        given = u.input_token_details or InputDetails()
        cached = given.cached_tokens_details or Cached(text_tokens=given.cached_tokens)
        out = u.output_token_details or OutputDetails(text_tokens=u.output_tokens)
        usage = Usage(
            input_tokens=given.text_tokens,
            cached_input_tokens=cached.text_tokens,
            audio_input_tokens=given.audio_tokens,
            cached_audio_input_tokens=cached.audio_tokens,
            output_tokens=out.text_tokens,
            audio_output_tokens=out.audio_tokens,
            transcription_ms=self.transcribed_ms,
        )
        self.transcribed_ms = 0
        return ReplyDone(usage, interrupted=body.status == "cancelled")

    def _log_once(self, code: str, message: str) -> None:
        if code not in self.errors:
            self.errors.add(code)
            log.warning(
                "realtime error ignored", extra={"provider": self.model.name, "code": code, "error": message[:300]}
            )


@hookimpl
def register_speech_models(register: Register) -> None:
    register("openai", RealtimeModel)
