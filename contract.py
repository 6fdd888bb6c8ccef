"""The contract: settings, the structs every module shares, errors, plugin protocols and hookspecs.

It imports no project module. Everything above it in the layering (DESIGN.md) builds on these names;
`main` re-exports them, so plugins write `from main import hookimpl, Settings, ...`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import pluggy

N = TypeVar("N", int, float)

VERSION = "0.1.0"
log = logging.getLogger("switchboard")

SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a phone call. Everything you write is spoken aloud by a "
    "text-to-speech voice, so answer in short, natural spoken sentences. Never use markdown, lists, "
    "headings, emoji or URLs. Keep answers brief unless the caller asks for detail."
)


# ----------------------------------------------------------------------------- settings


class ConfigError(Exception):
    """A setting is missing or wrong; the message says what to set."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting, read once from the environment; each field is the env var in lower case."""

    public_url: str = ""
    twilio_auth_token: str = ""
    allow_unsigned: bool = False
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    mode: str = "gather"  # a name in main.modes, checked when the app is built
    llm_provider: tuple[str, ...] = ("echo",)
    tts_voice: str = "say"
    session_backend: str = "memory"
    tools: tuple[str, ...] = ("end_call", "transfer_call")
    call_recorders: tuple[str, ...] = ("log",)
    speech_model: str = "parrot"
    valkey_url: str = ""
    system_prompt: str = SYSTEM_PROMPT
    greeting: str = "Hello! You are talking to switchboard. How can I help?"
    language: str = "en-US"
    min_confidence: float = 0.5
    max_turns: int = 10
    max_misses: int = 3
    session_ttl: float = 1800.0
    debounce_ms: int = 500
    stream_replies: bool = True
    first_audio_deadline: float = 3.0
    continue_wait: float = 4.0
    llm_first_token_timeout: float = 4.0
    llm_total_timeout: float = 25.0
    llm_retries: int = 1
    max_reply_chars: int = 1500
    max_speech_chars: int = 1000
    max_body_bytes: int = 65536
    filler: str = "One moment."
    reprompt: str = "Sorry, I didn't hear anything. What can I do for you?"
    low_confidence: str = "Sorry, could you repeat that?"
    goodbye: str = "I still can't hear you, so I'll hang up now. Goodbye!"
    apology: str = "Sorry, I'm having trouble answering right now."
    farewell: str = "Thank you for calling. Goodbye!"
    transferring: str = "Please hold while I transfer your call."
    fallback_number: str = ""
    browser_phone_token: str = ""  # enables GET /phone (browser.py); empty: 404
    browser_phone_max_calls: int = 2  # browser calls at once, per replica
    browser_phone_max_minutes: float = 10.0
    drain_seconds: float = 15.0
    web_concurrency: int = 1
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    env: dict[str, str] = msgspec.field(default_factory=dict)

    def __repr__(self) -> str:  # the auth token and vendor keys in `env` never reach a log
        return f"Settings(mode={self.mode!r}, llm={self.llm_provider!r}, tts={self.tts_voice!r})"

    def get(self, name: str, default: str = "") -> str:
        """Read a plugin's own variable (e.g. OPENAI_MODEL); empty counts as unset."""
        return self.env.get(name) or default

    def require(self, name: str, needed_for: str) -> str:
        """Read a variable a selected plugin cannot work without, or say what to set."""
        if value := self.env.get(name):
            return value
        raise ConfigError(f"{name} is not set; {needed_for} needs it. Set {name}, or choose another plugin.")

    def number(self, name: str, default: N, *, minimum: float = 0, inclusive: bool = False, unit: str = "") -> N:
        """Read a plugin's numeric variable, whole when `default` is an int, above `minimum` (or at it when
        `inclusive`); anything else is a ConfigError that says what to set."""
        raw = self.get(name, str(default))
        try:
            value = type(default)(raw)
        except ValueError:
            value = None
        if value is None or not (value >= minimum if inclusive else value > minimum):  # (NaN fails both)
            what = f"{'a whole' if isinstance(default, int) else 'a'} number{f' of {unit}' if unit else ''}"
            raise ConfigError(
                f"{name}={raw!r} is not valid: set it to {what} {'at least' if inclusive else 'above'} {minimum:g}"
            )
        return value


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build Settings from env vars, turning bad values into a sentence that names the variable."""
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        value = environ.get(field.name.upper(), "").strip()
        if field.name != "env" and value:
            is_list = field.name in ("llm_provider", "trusted_proxies", "tools", "call_recorders")
            raw[field.name] = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
    if "public_url" not in raw and environ.get("RAILWAY_PUBLIC_DOMAIN"):
        raw["public_url"] = "https://" + environ["RAILWAY_PUBLIC_DOMAIN"]
    if "valkey_url" not in raw and environ.get("REDIS_URL"):
        raw["valkey_url"] = environ["REDIS_URL"]
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        name = m.group(1) if (m := re.search(r"\$\.(\w+)", str(e))) else "?"
        raise ConfigError(f"{name.upper()}={raw.get(name)!r} is not valid: {str(e).split(' - ')[0]}") from None
    if not 0.0 <= settings.min_confidence <= 1.0:
        raise ConfigError(f"MIN_CONFIDENCE={settings.min_confidence} must be between 0 and 1")
    return msgspec.structs.replace(settings, env=dict(environ))


# ----------------------------------------------------------------------------- structs


class ToolCall(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    """The model asks to run a tool."""

    id: str
    name: str
    arguments: dict[str, Any]


class Message(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True):
    """One turn of the conversation as the model sees it; a tool's result is a "tool" message."""

    role: Literal["user", "assistant", "tool"]
    content: str
    interrupted: bool = False
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the tools the model asked for
    tool_call_id: str = ""  # tool: the call this result answers


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A tool the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})


class Usage(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True):
    """What a model used for one reply: text tokens, and for speech models audio tokens and transcription.

    Cached tokens are the part of the input the vendor served from its cache (billed lower); every field
    has a default, so sessions stored before a field existed still decode."""

    input_tokens: int = 0  # text
    output_tokens: int = 0
    cached_input_tokens: int = 0  # of input_tokens
    audio_input_tokens: int = 0
    cached_audio_input_tokens: int = 0  # of audio_input_tokens
    audio_output_tokens: int = 0
    transcription_ms: int = 0  # of the caller's audio, by a separate speech-to-text model

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f: getattr(self, f) + getattr(other, f) for f in self.__struct_fields__})


Event = str | ToolCall | Usage  # what LLMProvider.stream yields: text tokens, tool calls, usage


class Segment(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True):
    """One piece of a reply document: spoken text (<Say> or <Play>), a pause, an action, or the end."""

    kind: Literal["speech", "filler", "pause", "hangup", "dial", "end"] = "speech"
    text: str = ""
    voice: str = ""
    language: str = ""
    url: str = ""
    number: str = ""  # on "dial": where to, and the caller ID the person called sees
    caller_id: str = ""
    provider: str = ""  # on "end": which provider served the turn, and its usage (Usage's fields)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    audio_input_tokens: int = 0
    cached_audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    transcription_ms: int = 0

    taken_over: bool = False  # made by a generation that took an orphaned turn over

    @property
    def usage(self) -> Usage:
        """On an "end": the turn's usage."""
        return Usage(**{f: getattr(self, f) for f in Usage.__struct_fields__})


class CallInfo(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    """The call a tool acts on."""

    call_sid: str
    caller: str = ""
    to: str = ""


class ToolResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a tool tells the model, and how the call goes on after the reply (a "hangup" or "dial" Segment)."""

    content: str
    action: Segment | None = None


class Turn(msgspec.Struct, gc=False, kw_only=True):
    """The caller turn being answered: its text, the speech keys it answers, when it began."""

    id: str
    user: str
    keys: list[str]
    started: float


class Session(msgspec.Struct, gc=False, kw_only=True):
    """Everything switchboard keeps about one call."""

    call_sid: str
    caller: str = ""
    to: str = ""
    started: float = 0.0
    turns: int = 0
    misses: int = 0
    history: list[Message] = []
    current: Turn | None = None
    providers: list[str] = []
    usage: dict[str, Usage] = {}
    stream: str = ""  # media mode: the live stream's id (a second `start` takes the call over)
    streams: list[float] = []  # media mode: when its recent streams started (for the retry limit)
    ending: str = ""  # media mode: why we closed the stream ("hangup", "goodbye", "dial:…", "reconnect", "failed")
    channel: str = "phone"  # "browser": a call from the browser phone (browser.py), no phone network involved


class TurnRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A finished turn, for call recorders: what was heard and sent, who answered, how fast, at what cost."""

    call_sid: str
    turn: int
    turn_id: str
    started: float  # epoch seconds: when the caller's speech arrived
    speech: str
    reply: str  # what the caller was actually sent
    interrupted: bool = False
    provider: str = ""
    first_token_ms: float | None = None  # None when another replica generated the turn
    first_audio_ms: float | None = None
    reply_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # Usage's detail: cached and audio tokens, transcription
    audio_input_tokens: int = 0
    cached_audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    transcription_ms: int = 0
    cost: float = 0.0  # US dollars
    taken_over: bool = False  # its generating replica died and another one finished the reply


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A finished call, for call recorders; `caller` is the full number (mask it before logging)."""

    call_sid: str
    caller: str
    to: str
    started: float
    ended: float
    outcome: str
    turns: int
    channel: str = "phone"  # or "browser" (the browser phone: no per-minute phone price)
    providers: list[str] = []
    usage: dict[str, Usage] = {}
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # Usage's detail: cached and audio tokens, transcription
    audio_input_tokens: int = 0
    cached_audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    transcription_ms: int = 0
    llm_cost: float = 0.0
    phone_cost: float = 0.0
    cost: float = 0.0  # US dollars: llm_cost + phone_cost


class Snapshot(msgspec.Struct, gc=False, kw_only=True):
    """What begin() read under the call's lock."""

    token: str
    session: Session | None
    served: list[Segment]  # segments of the current turn already handed to Twilio
    replies: dict[str, tuple[str, list[Segment]]]  # stored (turn, segments) for the keys asked about


class Lease(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    """What a replica holds while it works on a call: the transition lock (token), or a turn's generation
    (turn and fence, the generation number that take_over() raises)."""

    call_sid: str
    token: str = ""
    turn: str = ""
    fence: int = 0


class Takeover(msgspec.Struct, gc=False, kw_only=True):
    """What take_over() hands the new holder of an orphaned turn: its fence, the session, what Twilio got."""

    fence: int
    session: Session
    served: list[Segment]


class TwilioForm(msgspec.Struct, gc=False, kw_only=True, rename="pascal"):
    """The Twilio request fields switchboard reads, mapped once from PascalCase."""

    call_sid: str = ""
    caller: str = msgspec.field(default="", name="From")
    to: str = ""
    call_status: str = ""
    speech_result: str = ""
    confidence: float | None = None
    error_code: str = ""
    error_url: str = ""
    session_status: str = ""  # the <Connect action> callback after a ConversationRelay (relay.py)
    session_duration: str = ""
    handoff_data: str = ""
    stream_event: str = ""  # the <Stream statusCallback> (media.py)
    stream_error: str = ""


TERMINAL_STATUSES = ("completed", "busy", "failed", "no-answer", "canceled")  # CallStatus values that end a call
segment_encoder = msgspec.msgpack.Encoder()
segment_decoder = msgspec.msgpack.Decoder(Segment)
session_decoder = msgspec.msgpack.Decoder(Session)
END = Segment(kind="end")


# ----------------------------------------------------------------------------- protocols and errors


class ProviderError(Exception):
    """A vendor failed at run time; always raised `from` the vendor's own error."""

    def __init__(self, message: str, *, provider: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.provider = provider
        self.retryable = retryable


class BackendError(Exception):
    """The session backend cannot be reached or answered nonsense.

    reported: the backend has logged this failure already (an outage is logged once, not per request)."""

    def __init__(self, message: str, *, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


SUPERSEDED, BUSY, ORPHANED = "superseded", "busy", "orphaned"

# Leases (bench/README.md, "Leases", has the measurements behind these): a holder renews every RENEW_EVERY,
# so it keeps its lease through an event-loop stall of up to LEASE_SECONDS - RENEW_EVERY - a round trip;
# a dead holder's lease runs out LEASE_SECONDS after its last renewal.
LEASE_SECONDS = 2.5
RENEW_EVERY = 0.25


class Plugin(Protocol):
    """Lifecycle every plugin-built object may use; the lifespan calls these."""

    async def aopen(self) -> None:
        """Open clients and pools."""
        return None

    async def aclose(self) -> None:
        """Close clients and pools."""
        return None


class VendorSDK:
    """For plugins on a vendor SDK: it is imported in a thread when the app opens (startup never waits
    for its import), and every use awaits the client it builds (`connect`)."""

    package = ""  # the SDK's import name
    name = ""  # the plugin's name, for errors

    def __init__(self, needed_for: str) -> None:
        if importlib.util.find_spec(self.package) is None:  # finds the package without importing it
            raise ConfigError(f"{needed_for} needs the {self.package} package: pip install -r requirements.txt")
        self.sdk: Any = None
        self.client: Any = None
        self.loading: asyncio.Task[None] | None = None
        self.errors: tuple[type[BaseException], ...] = ()  # the HTTP client's transport errors, once loaded

    async def connect(self, sdk: Any) -> Any:
        """The vendor client, built from the imported SDK module."""
        raise NotImplementedError

    def http_client(self, timeout: float) -> Any:
        """The SDKs' HTTP client (httpx2), kept alive long enough that a warmed connection outlives the greeting."""
        httpx2 = importlib.import_module("httpx2")
        self.errors = (httpx2.TransportError, httpx2.TimeoutException)
        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=60.0)
        return httpx2.AsyncClient(timeout=httpx2.Timeout(timeout, connect=5.0), follow_redirects=True, limits=limits)

    async def aopen(self) -> None:
        if self.loading is None:
            self.loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        self.sdk = await asyncio.to_thread(importlib.import_module, self.package)
        self.client = await self.connect(self.sdk)

    async def ready(self) -> Any:
        """The client, once loaded; ProviderError if the SDK could not start."""
        await self.aopen()
        assert self.loading is not None
        try:
            await asyncio.shield(self.loading)  # a caller's timeout must not cancel the shared start-up
        except Exception as e:
            raise ProviderError(f"the {self.package} SDK could not start: {e}", provider=self.name) from e
        return self.client

    async def aclose(self) -> None:
        if self.loading is not None:
            self.loading.cancel()
            await asyncio.gather(self.loading, return_exceptions=True)
        if self.client is not None:
            await self.client.close()


async def sse_events(response: Any) -> AsyncGenerator[tuple[bytes, bytes]]:
    """Each server-sent event in a response body as (event name, data), as the SSE spec splits them, in bytes."""
    # split in bytes rather than through httpx's text and line decoders, which cost more than the JSON
    rest = b""
    async for chunk in response.aiter_bytes():
        rest += chunk
        if b"\r" in rest:  # CRLF or CR line ends; a CR at the end may be the first half of a CRLF
            held = b"\r" if rest.endswith(b"\r") else b""
            rest = rest.removesuffix(held).replace(b"\r\n", b"\n").replace(b"\r", b"\n") + held
        *events, rest = rest.split(b"\n\n")  # a blank line ends an event
        for event in events:
            name, data = b"", []
            for line in event.split(b"\n"):
                field, _, value = line.partition(b":")  # a line starting with ":" is a comment
                if field == b"data":
                    data.append(value.removeprefix(b" "))
                elif field == b"event":
                    name = value.removeprefix(b" ")
            if name or data:
                yield name, b"\n".join(data)


class LLMProvider(Plugin, Protocol):
    """A language model: streams a reply as text tokens (plus tool calls and usage)."""

    name: str
    model: str = ""  # the vendor's model name, which prices its tokens ("" when it has none)
    warms: bool = False  # warm() does something: it then runs in the background as each call begins

    def stream(
        self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()
    ) -> AsyncGenerator[Event]:
        """Yield the reply (text tokens, then any ToolCalls and a Usage); raise ProviderError on failure."""
        ...

    async def warm(self) -> None:
        """Open the vendor connection ahead of the first turn."""


class TTSVoice(Plugin, Protocol):
    """A voice: turns a sentence into a speech Segment (a <Say> or a <Play> of hosted audio)."""

    synthesizes: bool = False  # an AudioVoice (the core hosts its audio) rather than a TTSVoice
    instant: bool = False  # render() never waits (a <Say>): a reply's sentences are rendered inline
    hosts_audio: bool = False  # render() may stand a <Say> in for audio that failed: a fixed phrase is retried

    async def render(self, text: str, *, base_url: str) -> Segment:
        """Return a speech segment for text; base_url is the public URL for hosted audio."""
        ...

    def relay_attrs(self) -> dict[str, str]:
        """ConversationRelay attributes (ttsProvider, voice) for this voice."""
        return {}


class AudioVoice(Plugin, Protocol):
    """A voice that synthesises audio; the core hosts it at /audio/{key} and speaks it with <Play> (audio.py)."""

    synthesizes: bool = True

    settings_key: str  # everything besides the text that changes the audio: vendor, model, voice, format

    async def synthesize(self, text: str) -> tuple[bytes, str]:
        """Audio for text and its content type (audio/mpeg or audio/wav); raise ProviderError on failure."""
        ...

    def relay_attrs(self) -> dict[str, str]:
        """ConversationRelay attributes (ttsProvider, voice) for this voice."""
        return {}


class Tool(Plugin, Protocol):
    """Something the model can do during a call: hang up, transfer, look something up."""

    spec: ToolSpec

    async def run(self, arguments: dict[str, Any], call: CallInfo) -> ToolResult:
        """Do it; raise on failure (the model is told it failed, the caller never hears a traceback)."""
        ...


class SessionBackend(Plugin, Protocol):
    """Where calls live. Every method is atomic, so any replica can serve any request of any call."""

    async def ping(self) -> None:
        """Raise BackendError when the backend cannot be reached."""

    async def lock(self, call_sid: str, ttl: float) -> str | None:
        """Take the call's lock: an owner token, or None when someone else holds it."""
        ...

    async def unlock(self, call_sid: str, token: str) -> bool:
        """Release the lock only if `token` still owns it."""
        ...

    async def begin(self, call_sid: str, keys: Sequence[str], ttl: float) -> Snapshot | None:
        """Lock the call for LEASE_SECONDS and read its session, served segments and stored replies; None if busy."""
        ...

    async def create(self, call_sid: str, session: Session, ttl: float) -> bool:
        """Store a new call's session unless the call has one already (a retried /voice); True when stored.

        This default takes the lock like any transition; a backend can do it in one step without it."""
        snap = await begin_when_free(self, call_sid, (), ttl)
        if snap.session is not None:
            await self.unlock(call_sid, snap.token)
            return False
        return await self.commit(call_sid, snap.token, session)

    async def commit(
        self, call_sid: str, token: str, session: Session | None, *, turn_changed: bool = False, cancel: str = ""
    ) -> bool:
        """Write the session (None deletes the call) and unlock, if `token` still owns the lock.

        turn_changed: session.current is a new turn (or none): it becomes the current turn and
        the served segments are cleared; the committer holds the new turn's generation lease, fence 1,
        for LEASE_SECONDS. cancel: a turn id every replica must stop generating."""
        ...

    async def push(self, call_sid: str, turn: str, segments: Sequence[Segment], *, fence: int = 1) -> bool:
        """Queue a turn's segments for a continuation; False when the turn is no longer current or its
        generation `fence` was taken over."""
        ...

    async def serve(
        self,
        call_sid: str,
        turn: str,
        keys: Sequence[str],
        segments: Sequence[Segment] | None = None,
        *,
        fence: int = 1,
    ) -> list[Segment] | str:
        """Hand segments to Twilio: the given ones (from generation `fence`), or all queued; store them under keys.

        Returns SUPERSEDED when the turn is not current or given segments come from a generation taken over,
        BUSY while the call is locked, ORPHANED when nothing is queued, the reply is unfinished and its
        generation's lease has run out."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend a lease held by its holder to LEASE_SECONDS from now; False when the holder lost it.

        A generation lease that ran out is renewed as long as nobody took the turn over. Every backend must
        implement it: a lease that is never renewed runs out under a live holder."""
        raise NotImplementedError(f"{type(self).__name__} must implement renew() (leases, contract.py)")

    async def take_over(self, call_sid: str, turn: str) -> Takeover | None:
        """Take the turn's generation if its lease ran out: raise the fence, drop what the old one queued but
        nobody served, hold the lease for LEASE_SECONDS. None when the turn is not current, its reply is
        complete or its generation is alive. Every backend must implement it (see renew)."""
        raise NotImplementedError(f"{type(self).__name__} must implement take_over() (leases, contract.py)")

    async def wait(self, call_sid: str, turn: str, timeout: float) -> None:
        """Return when the turn's queue has segments, or after timeout."""

    async def reply(self, call_sid: str, key: str) -> tuple[str, list[Segment]] | None:
        """A stored reply (for a retried webhook) with the turn it belongs to, or None."""
        ...

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """Call back with a turn id whenever any replica cancels that turn."""

    async def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        """Keep bytes (synthesised audio) for `ttl` seconds where every replica can read them."""

    async def get_blob(self, key: str) -> bytes | None:
        """Bytes stored by put_blob, or None when absent or expired."""
        ...


async def begin_when_free(backend: SessionBackend, call_sid: str, keys: Sequence[str], ttl: float) -> Snapshot:
    """begin(), waiting while another transition holds the call's lock (each try is one round trip).

    A dead holder's lock runs out within a lease, so waiting longer than two means a live holder keeps it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * LEASE_SECONDS + 0.5
    while (snap := await backend.begin(call_sid, keys, ttl)) is None:
        if loop.time() > deadline:
            raise BackendError(f"call {call_sid} stayed locked")
        await asyncio.sleep(0.005)
    return snap


class SpeechAudio(msgspec.Struct, gc=False, frozen=True, tag=True):
    """Audio the model speaks, part of its reply item `item` (in the model's declared audio format)."""

    item: str
    data: bytes


class CallerSpeaking(msgspec.Struct, gc=False, frozen=True, tag=True):
    """The model heard the caller start speaking (over its own reply: a barge-in)."""


class CallerDone(msgspec.Struct, gc=False, frozen=True, tag=True):
    """The model heard the caller stop speaking: the end of the caller's turn."""


class CallerSilent(msgspec.Struct, gc=False, frozen=True, tag=True):
    """The model's idle timeout ran out: the caller said nothing for that long after its last reply had played
    (or since the session opened). A reply that follows is the model's own reprompt."""


class Transcript(msgspec.Struct, gc=False, frozen=True, tag=True):
    """The final text of an item: what the caller said ("user"), or what the model's audio says."""

    role: Literal["user", "assistant"]
    item: str
    text: str


class ReplyDone(msgspec.Struct, gc=False, frozen=True, tag=True):
    """The model finished (or abandoned) a reply; its usage, and whether it was cut off."""

    usage: Usage = Usage()
    interrupted: bool = False


SpeechEvent = SpeechAudio | CallerSpeaking | CallerDone | CallerSilent | Transcript | ReplyDone | ToolCall


class SpeechSession(Protocol):
    """One conversation with a speech model: audio in; audio, transcripts, turns and tool calls out."""

    def send_audio(self, data: bytes) -> None:
        """Queue the caller's audio (the model's format); never waits."""

    async def send_text(self, text: str) -> None:
        """Tell the model something the caller did not say aloud (keypad digits), and ask it to answer."""

    async def tool_result(self, call_id: str, output: str) -> None:
        """Give the model a tool's output and let it carry on."""

    async def truncate(self, item: str, heard_ms: int) -> None:
        """The caller heard only the first `heard_ms` of the reply item `item`: forget the rest."""

    def events(self) -> AsyncIterator[SpeechEvent]:
        """The model's events; ends when the session is over, raises ProviderError when it failed.

        A model with an idle timeout yields CallerSilent each time it runs out (media mode counts these as
        misses: MAX_MISSES in a row end the call with GOODBYE); one without never does."""
        ...

    async def close(self) -> None:
        """End the session."""


class SpeechModel(Plugin, Protocol):
    """A speech-to-speech model (media mode): opens a conversation per call stream."""

    name: str
    model: str = ""  # the vendor's model name, which prices its usage
    audio_format: str = "pcmu"  # what send_audio takes and SpeechAudio carries: "pcmu" (8 kHz μ-law) or "pcm16"

    async def open(self, *, instructions: str, tools: Sequence[ToolSpec], history: Sequence[Message]) -> SpeechSession:
        """Start a conversation that knows the call so far; raise ProviderError on failure."""
        ...


class CallRecorder(Plugin, Protocol):
    """Keeps call records. Both methods run inside a call's request: never block (queue slow work)."""

    dropped: int = 0  # records given up on (backend down, queue full), published as a counter

    def turn_finished(self, record: TurnRecord) -> None:
        """A turn is over (answered, interrupted or abandoned)."""

    def call_finished(self, record: CallRecord) -> None:
        """A call is over; its turns were reported before."""


# ----------------------------------------------------------------------------- hookspecs

hookspec = pluggy.HookspecMarker("switchboard")
hookimpl = pluggy.HookimplMarker("switchboard")
Register = Callable[[str, Callable[[Settings], Any]], None]


class Hookspecs:
    """The hooks a switchboard plugin can implement; each runs once at startup."""

    @hookspec
    def register_llm_providers(self, register: Register) -> None:
        """Register LLM provider factories: register("openai", OpenAIProvider)."""

    @hookspec
    def register_tts_voices(self, register: Register) -> None:
        """Register TTS voice factories: register("say", SayVoice)."""

    @hookspec
    def register_session_backends(self, register: Register) -> None:
        """Register session backend factories: register("valkey", ValkeyBackend)."""

    @hookspec
    def register_tools(self, register: Register) -> None:
        """Register tool factories: register("end_call", EndCall); a factory may return None to offer nothing."""

    @hookspec
    def register_call_recorders(self, register: Register) -> None:
        """Register call recorder factories: register("postgres", PostgresRecorder)."""

    @hookspec
    def register_speech_models(self, register: Register) -> None:
        """Register speech-to-speech model factories (media mode): register("openai", RealtimeModel)."""


KINDS = {  # kind: (hook, env var)
    "llm": ("register_llm_providers", "LLM_PROVIDER"),
    "tts": ("register_tts_voices", "TTS_VOICE"),
    "session": ("register_session_backends", "SESSION_BACKEND"),
    "tool": ("register_tools", "TOOLS"),
    "recorder": ("register_call_recorders", "CALL_RECORDERS"),
    "speech": ("register_speech_models", "SPEECH_MODEL"),
}


# ----------------------------------------------------------------------------- Twilio names


_SAY_VOICE = (
    r"man|woman|alice|Polly\.[^\W\d_]+(?:-Neural|-Generative)?"
    r"|Google\.[a-z]{2,3}-[A-Za-z]{2}-(?:(?:Standard|Wavenet|Neural2)-[A-Z]|Chirp3-HD-[A-Z][a-z]+)"
)


def say_voice(var: str, name: str) -> str:
    """A Twilio <Say> voice name of the right shape (Twilio knows which exist), or a fix-it ConfigError."""
    if re.fullmatch(_SAY_VOICE, name):
        return name
    hint = next(
        (f"; did you mean {n!r}?" for n in (f"Polly.{name}", f"Google.{name}") if re.fullmatch(_SAY_VOICE, n)),
        "; voice names are case-sensitive" if re.fullmatch(_SAY_VOICE, name, re.IGNORECASE) else "",
    )
    raise ConfigError(
        f"{var}={name!r} is not a Twilio <Say> voice name{hint}. Use man, woman, alice, Polly.<Name> with "
        "an optional -Neural or -Generative (e.g. Polly.Joanna-Neural), Google.<ll-CC>-<Standard|Wavenet|Neural2>-"
        "<letter> (e.g. Google.en-US-Neural2-F) or Google.<ll-CC>-Chirp3-HD-<Name> (e.g. "
        "Google.en-US-Chirp3-HD-Aoede); see https://www.twilio.com/docs/voice/twiml/say/text-speech"
    )


def mask(number: str) -> str:
    """A phone number fit for a log line: only its last four digits."""
    return f"…{number[-4:]}" if len(number) > 4 else "…"
