"""Observability: Prometheus metrics, the call on every log line, Sentry, call records and what a call cost.

The modules above tell the Observer about a few moments (a request answered, a model's first token, a
reply generated, a turn closed, a call started or ended); everything about watching calls lives here.
Which call and turn a moment belongs to comes from `request_fields`, the context variable that carries
the request's log fields (its CallSid, and its turn once the turn begins) into the tasks the request starts.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily

from contract import (
    TERMINAL_STATUSES,
    VERSION,
    CallRecord,
    CallRecorder,
    ConfigError,
    LLMProvider,
    Segment,
    Session,
    Settings,
    SpeechModel,
    Turn,
    TurnRecord,
    Usage,
    log,
    mask,
)

EMPTY = Usage()
prometheus_client.disable_created_metrics()  # no `_created` twin for every series: half the scrape, nothing lost

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 25.0)
COST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# US dollars per million input and output tokens, by model name (longest prefix wins); list prices when
# written (Anthropic's for prompts under 100k tokens), so check them and override with
# PRICES={"model-or-provider": [input, output]}. The providers' defaults come first.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "echo": (0.0, 0.0),
    "gpt-5.4-mini": (0.75, 4.50),
    "gpt-5.4-nano": (0.20, 1.25),
    "claude-haiku-5-5": (0.10, 0.50),
    "claude-sonnet-5-5": (2.00, 10.00),
    "claude-opus-5-5": (4.00, 20.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "claude-3-haiku": (0.25, 1.25),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-opus-4-5": (5.00, 25.00),
}


class Rate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """US dollars per million tokens of each kind (cached tokens are part of the input), and per minute of
    the caller's audio transcribed."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # None: as input
    audio_input: float = 0.0
    cached_audio_input: float | None = None  # None: as audio_input
    audio_output: float = 0.0
    transcription_per_minute: float = 0.0

    def cost(self, u: Usage) -> float:
        """What one usage costs at these rates."""
        cached = self.input if self.cached_input is None else self.cached_input
        cached_audio = self.audio_input if self.cached_audio_input is None else self.cached_audio_input
        tokens = (
            (u.input_tokens - u.cached_input_tokens) * self.input
            + u.cached_input_tokens * cached
            + (u.audio_input_tokens - u.cached_audio_input_tokens) * self.audio_input
            + u.cached_audio_input_tokens * cached_audio
            + u.output_tokens * self.output
            + u.audio_output_tokens * self.audio_output
        )
        return tokens / 1_000_000 + u.transcription_ms / 60_000 * self.transcription_per_minute


# Speech models (media mode), by model name as above: OpenAI's list prices when written (model pages), with
# input transcription at gpt-realtime-whisper's per-minute price (the plugin's default transcriber).
SPEECH_PRICES: dict[str, Rate] = {
    "parrot": Rate(),  # offline: free
    "gpt-realtime-2": Rate(
        input=4.00,
        cached_input=0.40,
        output=24.00,
        audio_input=32.00,
        cached_audio_input=0.40,
        audio_output=64.00,
        transcription_per_minute=0.017,
    ),
    "gpt-realtime-2.1-mini": Rate(
        input=0.60,
        cached_input=0.06,
        output=2.40,
        audio_input=10.00,
        cached_audio_input=0.30,
        audio_output=20.00,
        transcription_per_minute=0.017,
    ),
}


# ----------------------------------------------------------------------------- log lines about a call

request_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("request_fields")
audio_counts: collections.Counter[str] = collections.Counter()  # hosted audio: synthesized, reused, fallback, ...


def note(**fields: Any) -> None:
    """Add fields to the current request's one log line (tasks started by the request share it)."""
    if (current := request_fields.get(None)) is not None:
        current.update(fields)


class CallContext(logging.Filter):
    """Adds the call's CallSid and turn number to every log line about a call that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (fields := request_fields.get(None)) is not None:
            if "call" not in record.__dict__ and (sid := fields.get("call")):
                record.call = sid
            if "turn" not in record.__dict__ and (turn := fields.get("turn")):
                record.turn = turn
        return True


def current_turn() -> tuple[str, int] | None:
    """(CallSid, turn number) of the turn this request or generation is about, if any."""
    fields = request_fields.get(None)
    return (fields["call"], fields["turn"]) if fields is not None and "turn" in fields else None


_SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)$")


def secrets_of(settings: Settings) -> list[str]:
    """Values no log line may show: tokens, keys and secrets, and the credentials inside URLs (DSNs)."""
    found = set()
    for name, value in settings.env.items():
        if _SECRET_NAME.search(name.upper()) and len(value) >= 8:
            found.add(value)
        if "://" in value:
            try:
                url = urlsplit(value)
                credentials = (url.password, url.username if name.upper().endswith("DSN") else None)
            except ValueError:
                continue
            found.update(c for c in credentials if c and len(c) >= 6)
    return sorted(found, key=len, reverse=True)


class Redacting(logging.Formatter):
    """Formats with switchboard's formatter, then blanks any secret a library's message let through."""

    def __init__(self, inner: logging.Formatter, secrets: Sequence[str]) -> None:
        super().__init__()
        self.inner, self.secrets = inner, secrets

    def format(self, record: logging.LogRecord) -> str:
        return self.blank(self.inner.format(record))

    def blank(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def install_log_hygiene(settings: Settings) -> None:
    """Every line about a call names it; no line shows a secret (create_app runs many times in tests)."""
    if not any(isinstance(f, CallContext) for f in log.filters):
        log.addFilter(CallContext())
    if secrets := secrets_of(settings):
        for handler in log.handlers:
            if (
                handler.get_name() == "switchboard"
                and handler.formatter
                and not isinstance(handler.formatter, Redacting)
            ):
                handler.setFormatter(Redacting(handler.formatter, secrets))


# ----------------------------------------------------------------------------- cost


def _lookup(table: Mapping[str, Any], name: str) -> Any:
    """The price of `name`, exactly or by its longest listed prefix (model names carry dates)."""
    if not name:
        return None
    if name in table:
        return table[name]
    keys = [k for k in table if name.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def speech_key(name: str) -> str:
    """Where a speech model's usage and rates are kept, apart from an LLM provider of the same name."""
    return f"speech:{name}"


def _rate(price: tuple[float, float] | Rate | None) -> Rate | None:
    return Rate(input=price[0], output=price[1]) if isinstance(price, tuple) else price


class Prices:
    """Turns tokens and minutes into US dollars."""

    def __init__(
        self, settings: Settings, providers: Sequence[LLMProvider], speech: Sequence[SpeechModel] = ()
    ) -> None:
        raw = settings.get("PRICES")
        try:
            user = msgspec.json.decode(raw, type=dict[str, tuple[float, float] | Rate]) if raw else {}
            self.per_minute = float(settings.get("CALL_PRICE_PER_MINUTE", "0"))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise ConfigError(
                f"PRICES or CALL_PRICE_PER_MINUTE is not valid ({e}); PRICES is JSON like "
                '{"gpt-4o-mini": [0.15, 0.6]} in dollars per million input and output tokens, or for a speech '
                'model {"gpt-realtime-2.1": {"input": 4, "cached_input": 0.4, "output": 24, "audio_input": 32, '
                '"cached_audio_input": 0.4, "audio_output": 64, "transcription_per_minute": 0.017}}'
            ) from None
        self.rates: dict[str, Rate | None] = {}
        for p in providers:
            model = p.model
            self.rates[p.name] = _rate(
                _lookup(user, model)
                or _lookup(user, p.name)
                or _lookup(DEFAULT_PRICES, model)
                or _lookup(DEFAULT_PRICES, p.name)
            )
        for s in speech:
            key = speech_key(s.name)
            self.rates[key] = _rate(
                _lookup(user, s.model)
                or _lookup(user, key)
                or _lookup(SPEECH_PRICES, s.model)
                or _lookup(SPEECH_PRICES, s.name)
            )
        self.unpriced: set[str] = set()

    def cost(self, provider: str, usage: Usage) -> float:
        """What a model's usage costs; unknown prices cost 0 and are logged once."""
        rate = self.rates.get(provider)
        if rate is None:
            if usage != EMPTY and provider not in self.unpriced:
                self.unpriced.add(provider)
                log.warning(
                    "no price for this provider's model; its cost counts as 0 (set PRICES)",
                    extra={"provider": provider},
                )
            return 0.0
        return rate.cost(usage)

    def phone(self, seconds: float) -> float:
        """What the call's minutes cost (Twilio bills each started minute)."""
        return math.ceil(max(seconds, 0) / 60) * self.per_minute


# ----------------------------------------------------------------------------- the observer


class Latency(msgspec.Struct, gc=False):
    """One turn's timings, kept on the replica that measured them until the turn is recorded.

    Untracked by the cyclic GC (it holds only numbers): thousands of open turns add nothing to a collection."""

    first_token: float | None = None
    first_audio: float | None = None
    reply: float | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class RecorderLosses:
    """Publishes the records each recorder had to drop (its `dropped` count) as a counter."""

    def __init__(self, recorders: Mapping[str, CallRecorder]) -> None:
        self.recorders = recorders

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "switchboard_call_records_dropped",
            "Call records a recorder gave up on (backend down, queue full).",
            labels=["recorder"],
        )
        for name, recorder in self.recorders.items():
            family.add_metric([name], float(recorder.dropped))
        yield family


class AudioCounts:
    """Publishes what hosted audio counted (audio.py reports to `audio_counts`): fallbacks and clips."""

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "switchboard_tts_fallbacks",
            "Sentences spoken with FALLBACK_SAY_VOICE because the voice failed.",
            value=audio_counts["fallback"],
        )
        family = CounterMetricFamily(
            "switchboard_tts_audio",
            "Hosted audio clips: synthesized, reused (from another replica), served to Twilio, missing.",
            labels=["event"],
        )
        for event in ("synthesized", "reused", "served", "missing"):
            family.add_metric([event], audio_counts[event])
        yield family


class ProviderMetrics:
    """One model provider's metric children, bound once."""

    __slots__ = ("first_token", "reply", "errors", "fallbacks", "tokens_in", "tokens_out", "cost")

    def __init__(self, obs: Observer, name: str) -> None:
        self.first_token, self.reply = obs.first_tokens.labels(name), obs.replies.labels(name)
        self.errors, self.fallbacks = obs.provider_errors.labels(name), obs.fallbacks.labels(name)
        self.tokens_in, self.tokens_out = obs.tokens.labels(name, "input"), obs.tokens.labels(name, "output")
        self.cost = obs.llm_cost.labels(name)


class Observer:
    """Metrics in a per-app registry, per-turn timings, cost, and the call recorders."""

    def __init__(
        self,
        settings: Settings,
        providers: Sequence[LLMProvider],
        recorders: Sequence[CallRecorder],
        speech: Sequence[SpeechModel] = (),
    ) -> None:
        install_log_hygiene(settings)
        self.settings = settings
        self.prices = Prices(settings, providers, speech)
        self.recorders = list(recorders)
        self.latencies: OrderedDict[tuple[str, int], Latency] = OrderedDict()
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(RecorderLosses(dict(zip(settings.call_recorders, self.recorders, strict=False))))  # (or "none")
        r.register(AudioCounts())
        route, provider = ["route"], ["provider"]
        self.request_seconds = Histogram("switchboard_request_seconds", "Webhook response time.", route, registry=r)
        self.responses = Counter(
            "switchboard_responses", "Webhook responses by status.", ["route", "status"], registry=r
        )
        self.rejections = Counter(
            "switchboard_signature_rejections",
            "Requests refused for a bad or missing X-Twilio-Signature.",
            route,
            registry=r,
        )
        self.backend_errors = Counter(
            "switchboard_session_backend_errors", "Requests the session backend failed.", registry=r
        )
        self.first_tokens = Histogram(
            "switchboard_llm_first_token_seconds",
            "A model's time to its first token.",
            provider,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_audio = Histogram(
            "switchboard_first_audio_seconds",
            "From /process-speech arriving to the first document of the reply leaving.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.replies = Histogram(
            "switchboard_reply_seconds",
            "A whole reply's generation time.",
            provider,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active = Gauge("switchboard_active_calls", "Calls in progress (sum over replicas).", registry=r)
        self.started = Counter("switchboard_calls_started", "Calls started.", registry=r)
        self.ended = Counter(
            "switchboard_calls_ended", "Calls ended, by Twilio's final CallStatus.", ["outcome"], registry=r
        )
        self.provider_errors = Counter("switchboard_provider_errors", "Failed model attempts.", provider, registry=r)
        self.fallbacks = Counter(
            "switchboard_provider_fallbacks",
            "Turns a fallback model served after an earlier one failed.",
            provider,
            registry=r,
        )
        self.failures = Counter("switchboard_turn_failures", "Turns answered with the apology.", ["reason"], registry=r)
        self.tokens = Counter("switchboard_llm_tokens", "Tokens used.", ["provider", "direction"], registry=r)
        self.llm_cost = Counter("switchboard_llm_cost_dollars", "What the models cost.", provider, registry=r)
        self.call_cost = Histogram(
            "switchboard_call_cost_dollars", "What a call cost (models and minutes).", buckets=COST_BUCKETS, registry=r
        )
        self.media_first_audio = Histogram(
            "switchboard_media_first_audio_seconds",
            "Media mode: from the end of the caller's speech to the answer's first audio sent to Twilio.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        audio = Counter(
            "switchboard_media_audio_seconds", "Media mode: seconds of audio, by direction.", ["direction"], registry=r
        )
        self.media_audio_in, self.media_audio_out = audio.labels("in"), audio.labels("out")
        self.media_interruptions = Counter(
            "switchboard_media_interruptions", "Media mode: replies the caller spoke over.", registry=r
        )
        self.media_reconnects = Counter(
            "switchboard_media_reconnects", "Media mode: new model sessions after one failed or ended.", registry=r
        )
        self.browser_calls = Counter(
            "switchboard_browser_calls",
            "Calls from the browser phone (their records and log lines say channel=browser).",
            registry=r,
        )
        self.renewals = Counter("switchboard_lease_renewals", "Leases renewed (transitions, generations).", registry=r)
        self.leases_lost = Counter(
            "switchboard_leases_lost", "Leases found taken over at renewal: that work stopped.", registry=r
        )
        self.takeovers = Counter(
            "switchboard_turns_taken_over", "Turns this replica took over from a dead one.", registry=r
        )
        self.loop_lag = Gauge(
            "switchboard_event_loop_lag_max_seconds",
            "The longest the event loop stalled a lease renewal since the start.",
            registry=r,
        )
        self.lag_max = 0.0
        self.outcomes = {status: self.ended.labels(status) for status in TERMINAL_STATUSES}
        self.by_provider: dict[str, ProviderMetrics] = {}
        for p in providers:
            self._provider(p.name)

    def _provider(self, name: str) -> ProviderMetrics:
        if (bound := self.by_provider.get(name)) is None:
            bound = self.by_provider[name] = ProviderMetrics(self, name)
        return bound

    def _latency(self, turn: tuple[str, int]) -> Latency:
        if (lat := self.latencies.get(turn)) is None:
            lat = self.latencies[turn] = Latency()
            if len(self.latencies) > 4096:  # turns closed elsewhere (another replica) are forgotten
                self.latencies.popitem(last=False)
        return lat

    # -- requests

    def route(self, path: str) -> Callable[[dict[str, Any]], None]:
        """What a webhook calls with its log fields when it has answered: its metrics, bound once."""
        latency, rejected = self.request_seconds.labels(path), self.rejections.labels(path)
        by_status: dict[int, Any] = {200: self.responses.labels(path, "200")}
        speech = path == "/process-speech"

        def answered(fields: dict[str, Any]) -> None:
            status, seconds = fields["status"], fields["ms"] / 1000
            latency.observe(seconds)
            if (counter := by_status.get(status)) is None:
                counter = by_status[status] = self.responses.labels(path, str(status))
            counter.inc()
            if status == 403:
                rejected.inc()
            elif speech and (turn := fields.get("turn")):  # this request began a turn: its first audio just left
                self.first_audio.observe(seconds)
                self._latency((fields["call"], turn)).first_audio = seconds

        return answered

    # -- leases

    def renewal_tick(self, late: float) -> None:
        """The lease keeper woke `late` seconds after it was due (an event-loop stall)."""
        if late > self.lag_max:
            self.lag_max = late
            self.loop_lag.set(late)

    def lease_renewed(self) -> None:
        """Count a lease this replica renewed."""
        self.renewals.inc()

    def lease_lost(self) -> None:
        """Count a lease found taken over when this replica renewed it."""
        self.leases_lost.inc()

    def turn_taken_over(self) -> None:
        """Count a turn this replica took over from a dead one."""
        self.takeovers.inc()

    # -- turns

    def first_token(self, provider: str, seconds: float, *, fallback: bool) -> None:
        """A model produced its first token (or event); `fallback`: an earlier model failed this turn."""
        bound = self._provider(provider)
        bound.first_token.observe(seconds)
        if fallback:
            bound.fallbacks.inc()
        if turn := current_turn():
            self._latency(turn).first_token = seconds

    def provider_error(self, provider: str) -> None:
        """A model attempt failed before its first token."""
        self._provider(provider).errors.inc()

    def turn_failed(self, reason: str, provider: str) -> None:
        """A turn ended in the apology; a model failing mid-reply counts against it too."""
        self.failures.labels(reason).inc()
        if reason == "provider error" and provider in self.prices.rates:
            self._provider(provider).errors.inc()

    def turn_generated(self, provider: str, usage: Usage, seconds: float) -> None:
        """A reply is complete: its time, tokens and their cost."""
        if turn := current_turn():
            self._latency(turn).reply = seconds
        if not provider:
            return
        bound = self._provider(provider)
        bound.reply.observe(seconds)
        bound.tokens_in.inc(usage.input_tokens)
        bound.tokens_out.inc(usage.output_tokens)
        bound.cost.inc(self.prices.cost(provider, usage))

    def turn_timed(self, call_sid: str, turn: int, *, first_audio: float | None) -> None:
        """A mode that measures a turn's first audio itself (media: end of speech to first frame) says so."""
        if first_audio is not None:
            self._latency((call_sid, turn)).first_audio = first_audio

    def turn_closed(
        self,
        session: Session,
        turn: Turn,
        said: str,
        end: Segment | None,
        *,
        interrupted: bool | None = None,
        taken_over: bool = False,
    ) -> TurnRecord:
        """A turn moved into history: tell the recorders what was heard, sent, how fast and at what cost
        (interrupted: cut off, which a reply without its end segment is unless the mode says)."""
        lat = self.latencies.pop((session.call_sid, session.turns), None) or Latency()
        provider = end.provider if end is not None else ""
        usage = end.usage if end is not None else EMPTY
        record = TurnRecord(
            call_sid=session.call_sid,
            turn=session.turns,
            turn_id=turn.id,
            started=turn.started,
            speech=turn.user,
            reply=said,
            interrupted=end is None if interrupted is None else interrupted,
            provider=provider,
            first_token_ms=_ms(lat.first_token),
            first_audio_ms=_ms(lat.first_audio),
            reply_ms=_ms(lat.reply),
            **msgspec.structs.asdict(usage),
            cost=round(self.prices.cost(provider, usage), 6),
            taken_over=taken_over,
        )
        for recorder in self.recorders:
            try:
                recorder.turn_finished(record)
            except Exception:  # a recorder's bug never breaks a call
                log.exception("call recorder failed", extra={"recorder": type(recorder).__name__})
        return record

    # -- calls

    def call_started(self) -> None:
        """A call this replica had not seen began."""
        self.started.inc()
        self.active.inc()

    def costs(self, session: Session, seconds: float) -> tuple[float, float]:
        """What a call has cost so far: (models, phone minutes); a browser call uses no phone network."""
        llm = sum(self.prices.cost(p, u) for p, u in session.usage.items())
        return llm, 0.0 if session.channel == "browser" else self.prices.phone(seconds)

    def call_ended(self, session: Session, outcome: str) -> None:
        """A call is over: log it with its cost, count it, tell the recorders."""
        now = time.time()
        seconds = now - session.started
        llm, phone = self.costs(session, seconds)
        total = sum(session.usage.values(), EMPTY)
        record = CallRecord(
            call_sid=session.call_sid,
            caller=session.caller,
            to=session.to,
            started=session.started,
            ended=now,
            outcome=outcome,
            turns=session.turns,
            channel=session.channel,
            providers=list(dict.fromkeys(session.providers)),
            usage=dict(session.usage),
            **msgspec.structs.asdict(total),
            llm_cost=round(llm, 6),
            phone_cost=round(phone, 6),
            cost=round(llm + phone, 6),
        )
        (self.outcomes.get(outcome) or self.ended.labels(outcome)).inc()
        self.active.dec()
        self.call_cost.observe(record.cost)
        log.info(
            "call ended",
            extra={
                "call": session.call_sid,
                "outcome": outcome,
                "turns": session.turns,
                "seconds": round(seconds, 1),
                "tokens": record.input_tokens + record.output_tokens,
                "cost_usd": record.cost,
                **({"channel": session.channel} if session.channel != "phone" else {}),
            },
        )
        for recorder in self.recorders:
            try:
                recorder.call_finished(record)
            except Exception:
                log.exception("call recorder failed", extra={"recorder": type(recorder).__name__})


# ----------------------------------------------------------------------------- Sentry

_PHONE = re.compile(r"\+?\d[\d ().-]{7,}\d")
_KEEP_HEADERS = frozenset({"content-type", "content-length", "user-agent", "host", "i-twilio-idempotency-token"})


def _scrub(value: Any) -> Any:
    """Mask anything that looks like a phone number, through dicts and lists."""
    if isinstance(value, str):
        return _PHONE.sub(lambda m: mask(re.sub(r"\D", "", m.group())), value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def before_send(event: Any, hint: dict[str, Any]) -> Any:
    """Tag the event with its call and turn; drop request bodies, users and phone numbers."""
    fields = request_fields.get(None) or {}
    tags = event.setdefault("tags", {})
    if sid := fields.get("call"):
        tags["call_sid"] = sid
    if turn := fields.get("turn"):
        tags["turn"] = str(turn)
    event.pop("user", None)
    if isinstance(request := event.get("request"), dict):
        headers = request.get("headers") or {}
        event["request"] = {
            "method": request.get("method"),
            "url": request.get("url"),
            "headers": {k: v for k, v in headers.items() if k.lower() in _KEEP_HEADERS},
        }
    for key in ("message", "logentry", "extra", "breadcrumbs"):
        if key in event:
            event[key] = _scrub(event[key])
    for exc in (event.get("exception") or {}).get("values", []):
        if isinstance(exc.get("value"), str):
            exc["value"] = _scrub(exc["value"])
    return event


def before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Breadcrumbs (earlier log lines) get the same masking."""
    return _scrub(crumb)


def start_sentry(settings: Settings) -> bool:
    """With SENTRY_DSN set, report errors to Sentry; without it, sentry_sdk is never imported."""
    dsn = settings.get("SENTRY_DSN")
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.litestar import LitestarIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        release=f"switchboard@{VERSION}",
        environment=settings.get("SENTRY_ENVIRONMENT") or settings.get("RAILWAY_ENVIRONMENT_NAME") or None,
        # Errors become events; warnings (not every request line) become breadcrumbs: this halves Sentry's
        # cost per request (bench/webhook_overhead.py). No per-request release-health sessions either.
        integrations=[LitestarIntegration(), LoggingIntegration(level=logging.WARNING, event_level=logging.ERROR)],
        auto_enabling_integrations=False,  # no patched vendor SDKs on the hot path, no prompts in events
        auto_session_tracking=False,
        # nothing personal (this SDK's successor to send_default_pii=False, which it deprecates): no users,
        # cookies, bodies (the form holds From and SpeechResult), query strings, prompts, or frame locals
        data_collection={
            "user_info": False,
            "cookies": {"mode": "off"},
            "http_bodies": [],
            "url_query_params": {"mode": "off"},
            "http_headers": {"request": {"mode": "allowlist", "terms": sorted(_KEEP_HEADERS)}},
            "gen_ai": {"inputs": False, "outputs": False},
            "database_query_data": False,
            "stack_frame_variables": False,
        },
        max_request_body_size="never",
        before_send=before_send,
        before_breadcrumb=before_breadcrumb,
    )
    log.info("sentry enabled", extra={"sentry_host": urlsplit(dsn).hostname or "?"})
    return True


# ----------------------------------------------------------------------------- logging


_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class LogFormatter(logging.Formatter):
    """One line per event: `level message key=value ...` or one JSON object."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return self.line(record.levelname.lower(), record.getMessage(), record.created, fields)

    def line(self, level: str, message: str, created: float, fields: Mapping[str, Any]) -> str:
        if self.json_lines:
            line = {"ts": round(created, 3), "level": level, "msg": message}
            return msgspec.json.encode({**line, **fields}, enc_hook=str).decode()
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if k != "exception")
        text = f"{level} {message} {extra}".rstrip()
        return text + ("\n" + fields["exception"] if "exception" in fields else "")


def request_line(fields: dict[str, Any]) -> None:
    """A webhook's one INFO line. While switchboard's own handler is the only one listening (as in production)
    it is formatted and written straight away, the same text the logging call makes, without building a
    LogRecord, which took a fifth of a cheap webhook's time; otherwise it goes through logging as usual."""
    handler = log.handlers[0] if len(log.handlers) == 1 else None
    formatter = redacting = getattr(handler, "formatter", None)
    if isinstance(redacting, Redacting):
        formatter = redacting.inner
    if (
        not isinstance(handler, logging.StreamHandler)
        or type(formatter) is not LogFormatter
        or handler.filters
        or handler.level > logging.INFO
        or log.disabled
        or not log.isEnabledFor(logging.INFO)
        or not all(type(f) is CallContext for f in log.filters)
    ):  # (it adds nothing a request line lacks)
        log.info("request", extra=fields)
        return
    text = formatter.line("info", "request", time.time(), fields)
    if isinstance(redacting, Redacting):
        text = redacting.blank(text)
    with handler.lock:  # type: ignore[union-attr]
        try:
            handler.stream.write(text + "\n")
            handler.flush()
        except Exception:  # as logging does: a failed write is reported, never raised into the request
            handler.handleError(log.makeRecord(log.name, logging.INFO, "", 0, "request", (), None, extra=fields))


def setup_logging(settings: Settings) -> None:
    """Log to stderr in the configured format."""
    # The logging docs' own optimisations: no caller frame, thread or process lookups per record.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(settings.log_format == "json"))
    handler.set_name("switchboard")
    log.handlers[:] = [h for h in log.handlers if h.get_name() != "switchboard"] + [handler]
    log.setLevel(settings.log_level.upper())
    log.propagate = False
