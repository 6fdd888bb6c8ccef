"""Observability: /metrics after scripted calls, METRICS_TOKEN, call context and secrets in log lines,
call records and their cost, Sentry through its real transport to a local collector."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import io
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import TOKEN, Captured, ProviderError, Scripted, Twilio, concurrent, env, listening, plugin, server, tree
from prometheus_client.parser import text_string_to_metric_families

import main
import observe
import phone

ROOT = Path(__file__).resolve().parent.parent
ROUTES = (
    "/voice",
    "/process-speech",
    "/continue",
    "/status",
    "/handle-error",
    "/relay-action",
    "/media-action",
    "/media-status",
)
CALLER = "+15005550006"


class Counted(Scripted):
    """A scripted model that also reports its usage, like the real providers do."""

    def __init__(
        self,
        name: str = "scripted",
        replies: Sequence[str] = ("Hello there.",),
        *,
        usage: tuple[int, int] = (100, 20),
        **kw: Any,
    ) -> None:
        super().__init__(name, replies, **kw)
        self.usage = usage

    async def stream(
        self, messages: Sequence[main.Message], *, system: str, tools: Sequence[Any] = ()
    ) -> AsyncIterator[Any]:
        async for event in super().stream(messages, system=system, tools=tools):
            yield event
        yield main.Usage(input_tokens=self.usage[0], output_tokens=self.usage[1])


class Memo(main.CallRecorder):
    """A call recorder that keeps what it is told."""

    def __init__(self) -> None:
        self.turns: list[main.TurnRecord] = []
        self.calls: list[main.CallRecord] = []

    def turn_finished(self, record: main.TurnRecord) -> None:
        self.turns.append(record)

    def call_finished(self, record: main.CallRecord) -> None:
        self.calls.append(record)


def recorders(**named: main.CallRecorder) -> object:
    class Plugin:
        @main.hookimpl
        def register_call_recorders(self, register: Any) -> None:
            for name, obj in named.items():
                register(name, lambda settings, obj=obj: obj)

    return Plugin()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every switchboard_* sample of a scrape, parsed by prometheus-client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("switchboard_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def histogram(
    name: str, labels: dict[str, str], count: int, value: float, buckets: Sequence[float]
) -> dict[Any, float]:
    """The bucket and count samples of a histogram holding `count` observations of `value`."""
    out = {}
    for le in [*buckets, float("inf")]:
        key = tuple(sorted({**labels, "le": "+Inf" if le == float("inf") else repr(float(le))}.items()))
        out[(f"{name}_bucket", key)] = float(count if value <= le else 0)
    out[(f"{name}_count", tuple(sorted(labels.items())))] = float(count)
    return out


def counters(name: str, label: str, values: dict[str, float]) -> dict[Any, float]:
    return {(f"{name}_total", ((label, k),)): float(v) for k, v in values.items()}


LAT, COST = observe.LATENCY_BUCKETS, observe.COST_BUCKETS


async def test_metrics_after_a_scripted_call_with_a_fallback() -> None:
    down = Scripted("down", fail=ProviderError("vendor down", provider="down"))
    model = Counted("scripted", ["Hello there. How can I help?"], ttft=0.3)
    memo = Memo()
    app = main.create_app(
        env(
            LLM_PROVIDER="down,scripted",
            LLM_RETRIES="0",
            CALL_RECORDERS="log,memo",
            PRICES='{"scripted": [1.0, 2.0]}',
            CALL_PRICE_PER_MINUTE="0.01",
        ),
        plugins=[plugin(llm=[down, model]), recorders(memo=memo)],
    )
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        assert await twilio.turn("hello") == ["Hello there.", "How can I help?"]  # /process-speech, /continue
        await Twilio(client, token="not-the-token").call()  # refused: a signature rejection
        await twilio.post("/status", CallStatus="completed")
        scrape = await client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    got = samples(scrape.text)
    sums = {k: got.pop(k) for k in list(got) if k[0].endswith("_sum")}
    request_buckets = {k: got.pop(k) for k in list(got) if k[0] == "switchboard_request_seconds_bucket"}
    # the turn's lease is renewed beside it as often as its 0.3 s model lets the keeper tick: timing, not a count
    renewals = got.pop(("switchboard_lease_renewals_total", ()))
    lag = got.pop(("switchboard_event_loop_lag_max_seconds", ()))
    assert renewals in (0.0, 1.0, 2.0) and 0 < lag < 1
    cost = (100 * 1.0 + 20 * 2.0) / 1e6
    # one observation each, at least the model's 0.3 s: its buckets follow from its sum
    first_token = sums[("switchboard_llm_first_token_seconds_sum", (("provider", "scripted"),))]
    first_audio = sums[("switchboard_first_audio_seconds_sum", ())]
    reply = sums[("switchboard_reply_seconds_sum", (("provider", "scripted"),))]
    assert 0.29 < first_token <= reply < 5 and 0.29 < first_audio < 5

    expected = {
        **{
            ("switchboard_request_seconds_count", (("route", r),)): float(n)
            for r, n in zip(ROUTES, (2, 1, 1, 1, 0, 0, 0, 0), strict=True)
        },
        **{
            ("switchboard_responses_total", (("route", r), ("status", "200"))): float(n)
            for r, n in zip(ROUTES, (1, 1, 1, 1, 0, 0, 0, 0), strict=True)
        },
        ("switchboard_responses_total", (("route", "/voice"), ("status", "403"))): 1.0,
        **counters("switchboard_signature_rejections", "route", {r: r == "/voice" for r in ROUTES}),
        ("switchboard_session_backend_errors_total", ()): 0.0,
        ("switchboard_leases_lost_total", ()): 0.0,
        ("switchboard_turns_taken_over_total", ()): 0.0,
        **histogram("switchboard_llm_first_token_seconds", {"provider": "down"}, 0, 0, LAT),
        **histogram("switchboard_llm_first_token_seconds", {"provider": "scripted"}, 1, first_token, LAT),
        **histogram("switchboard_first_audio_seconds", {}, 1, first_audio, LAT),
        **histogram("switchboard_reply_seconds", {"provider": "down"}, 0, 0, LAT),
        **histogram("switchboard_reply_seconds", {"provider": "scripted"}, 1, reply, LAT),
        ("switchboard_active_calls", ()): 0.0,
        ("switchboard_calls_started_total", ()): 1.0,
        **counters("switchboard_calls_ended", "outcome", {o: o == "completed" for o in main.TERMINAL_STATUSES}),
        **counters("switchboard_provider_errors", "provider", {"down": 1, "scripted": 0}),
        **counters("switchboard_provider_fallbacks", "provider", {"down": 0, "scripted": 1}),
        **{
            ("switchboard_llm_tokens_total", (("direction", d), ("provider", p))): float(n)
            for p, d, n in (
                ("down", "input", 0),
                ("down", "output", 0),
                ("scripted", "input", 100),
                ("scripted", "output", 20),
            )
        },
        **counters("switchboard_llm_cost_dollars", "provider", {"down": 0, "scripted": cost}),
        **histogram("switchboard_call_cost_dollars", {}, 1, cost + 0.01, COST),
        **counters("switchboard_call_records_dropped", "recorder", {"log": 0, "memo": 0}),
        # audio.py counts for the whole process (this call used <Say>, which never counts)
        ("switchboard_tts_fallbacks_total", ()): float(observe.audio_counts["fallback"]),
        **counters(
            "switchboard_tts_audio",
            "event",
            {e: observe.audio_counts[e] for e in ("synthesized", "reused", "served", "missing")},
        ),
        # media mode's series exist from the start (this was a Gather call)
        **counters("switchboard_media_audio_seconds", "direction", {"in": 0, "out": 0}),
        **histogram("switchboard_media_first_audio_seconds", {}, 0, 0, LAT),
        ("switchboard_media_interruptions_total", ()): 0.0,
        ("switchboard_media_reconnects_total", ()): 0.0,
        ("switchboard_browser_calls_total", ()): 0.0,
    }
    assert got == expected
    assert sums[("switchboard_call_cost_dollars_sum", ())] == pytest.approx(cost + 0.01)
    assert sums[("switchboard_request_seconds_sum", (("route", "/voice"),))] > 0
    voice_buckets = [v for (name, labels), v in request_buckets.items() if ("route", "/voice") in labels]
    assert voice_buckets == sorted(voice_buckets) and voice_buckets[-1] == 2.0


async def test_turn_failures_are_counted_by_reason_and_against_the_provider() -> None:
    class MidStream(Counted):
        async def stream(self, messages: Any, *, system: str, tools: Any = ()) -> AsyncIterator[Any]:
            yield "Half a"
            raise ProviderError("connection reset", provider=self.name)

    app = main.create_app(env(LLM_PROVIDER="flaky"), plugins=[plugin(llm=[MidStream("flaky")])])
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        answer = await twilio.say("hello")
        got = samples((await client.get("/metrics")).text)
    assert tree(answer.content) == listening(app.state.settings.apology)
    failures = {
        k: v for k, v in got.items() if k[0] in ("switchboard_turn_failures_total", "switchboard_provider_errors_total")
    }
    assert failures == {
        ("switchboard_turn_failures_total", (("reason", "provider error"),)): 1.0,
        ("switchboard_provider_errors_total", (("provider", "flaky"),)): 1.0,
    }


async def test_a_failing_voice_is_counted_as_a_tts_fallback() -> None:
    class Hoarse(main.AudioVoice):
        settings_key = "hoarse"

        async def synthesize(self, text: str) -> tuple[bytes, str]:
            raise ProviderError("vendor lost its voice", provider="hoarse")

    app = main.create_app(env(TTS_VOICE="hoarse", TTS_TIMEOUT="1"), plugins=[plugin(tts={"hoarse": Hoarse()})])
    async with concurrent(app) as client:
        before = samples((await client.get("/metrics")).text)
        twilio = Twilio(client)
        await twilio.call()  # the greeting falls back to <Say>
        assert await twilio.turn("hello") == ["You said: hello."]  # and so does the reply
        after = samples((await client.get("/metrics")).text)
    key = ("switchboard_tts_fallbacks_total", ())
    assert after[key] - before[key] == 2.0


async def test_metrics_token_is_required_when_set() -> None:
    app = main.create_app(env(METRICS_TOKEN="made-up-metrics-token"))
    open_app = main.create_app(env())
    async with concurrent(app) as client, concurrent(open_app) as open_client:
        missing = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"authorization": "Bearer made-up-metrics-tokeN"})
        right = await client.get("/metrics", headers={"authorization": "Bearer made-up-metrics-token"})
        posted = await client.post("/metrics", headers={"authorization": "Bearer made-up-metrics-token"})
        unprotected = await open_client.get("/metrics")
    assert (missing.status_code, missing.headers["www-authenticate"]) == (401, 'Bearer realm="metrics"')
    assert wrong.status_code == 401 and "switchboard_" not in wrong.text
    assert right.status_code == unprotected.status_code == 200
    assert posted.status_code == 405
    for response in (right, unprotected):
        names = {f.name for f in text_string_to_metric_families(response.text)}
        assert {"switchboard_active_calls", "switchboard_request_seconds", "process_resident_memory_bytes"} <= names


def test_each_app_has_its_own_registry() -> None:
    a, b = main.create_app(env()), main.create_app(env())
    a.state.calls.obs.started.inc()
    assert a.state.calls.obs.registry is not b.state.calls.obs.registry
    assert b.state.calls.obs.registry.get_sample_value("switchboard_calls_started_total") == 0.0
    assert a.state.calls.obs.registry.get_sample_value("switchboard_calls_started_total") == 1.0


# ----------------------------------------------------------------------------- records and cost


async def test_recorders_hear_every_turn_and_the_call_with_latency_tokens_and_cost() -> None:
    model = Counted("scripted", ["Hello there.", "One. Two. Three.", "Ok."], ttft=0.2, gap=0.3, usage=(1000, 500))
    memo = Memo()
    app = main.create_app(
        env(LLM_PROVIDER="scripted", CALL_RECORDERS="memo", PRICES='{"scripted": [2.0, 10.0]}'),
        plugins=[plugin(llm=[model]), recorders(memo=memo)],
    )
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        assert await twilio.turn("hi") == ["Hello there."]
        first = await twilio.say("count to three")  # answered with "One." and a redirect
        await twilio.say("stop")  # barge-in: turn 2 ends interrupted
        await twilio.post("/status", CallStatus="completed")
    assert tree(first.content)[3][0][2] == "One."
    turn_cost = (1000 * 2.0 + 500 * 10.0) / 1e6
    for record in memo.turns:
        assert record.started == pytest.approx(time.time(), abs=10)
    t1, t2, t3 = memo.turns
    # "Hello" after 0.2 s, " there." 0.3 s later, and the sentence is whole when the stream ends 0.3 s after that
    assert t1.first_token_ms is not None and t1.first_audio_ms is not None and t1.reply_ms is not None
    assert 195 <= t1.first_token_ms < 2000 and 795 <= t1.reply_ms <= t1.first_audio_ms < 5000
    assert t2.first_token_ms is not None and t2.reply_ms is None  # cancelled before it was complete
    blank = dict(started=0.0, first_token_ms=None, first_audio_ms=None, reply_ms=None)
    sid = twilio.call_sid
    assert [msgspec.structs.replace(t, **blank) for t in memo.turns] == [
        main.TurnRecord(
            call_sid=sid,
            turn=1,
            turn_id=t1.turn_id,
            started=0.0,
            speech="hi",
            reply="Hello there.",
            provider="scripted",
            input_tokens=1000,
            output_tokens=500,
            cost=round(turn_cost, 6),
        ),
        main.TurnRecord(
            call_sid=sid,
            turn=2,
            turn_id=t2.turn_id,
            started=0.0,
            speech="count to three",
            reply="One.",
            interrupted=True,
        ),
        main.TurnRecord(
            call_sid=sid,
            turn=3,
            turn_id=t3.turn_id,
            started=0.0,
            speech="stop",
            reply="Ok.",
            provider="scripted",
            input_tokens=1000,
            output_tokens=500,
            cost=round(turn_cost, 6),
        ),
    ]
    (call,) = memo.calls
    assert call.ended - call.started == pytest.approx(time.time() - call.started, abs=1)
    assert msgspec.structs.replace(call, started=0.0, ended=0.0) == main.CallRecord(
        call_sid=sid,
        caller=CALLER,
        to="+15005550001",
        started=0.0,
        ended=0.0,
        outcome="completed",
        turns=3,
        providers=["scripted"],
        usage={"scripted": main.Usage(input_tokens=2000, output_tokens=1000)},
        input_tokens=2000,
        output_tokens=1000,
        llm_cost=round(2 * turn_cost, 6),
        phone_cost=0.0,
        cost=round(2 * turn_cost, 6),
    )


class Modelled(Counted):
    model = "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize(
    ("prices", "provider", "expected"),
    [
        ("", Modelled("openai"), (0.15, 0.60)),  # the model's dated name, by its longest listed prefix
        ('{"gpt-4o-mini": [1, 2]}', Modelled("openai"), (1.0, 2.0)),  # PRICES beats the built-in list
        ('{"openai": [3, 4]}', Modelled("openai"), (3.0, 4.0)),  # by provider name
        ("", Counted("echo"), (0.0, 0.0)),
        ("", Counted("mystery"), None),
    ],
)
def test_prices_by_model_or_provider(prices: str, provider: Counted, expected: tuple[float, float] | None) -> None:
    got = observe.Prices(main.load_settings({"PRICES": prices}), [provider])
    assert got.rates == {provider.name: expected and observe.Rate(input=expected[0], output=expected[1])}


def test_the_shipped_providers_default_models_have_prices() -> None:
    app = main.create_app(
        env(LLM_PROVIDER="openai,anthropic", OPENAI_API_KEY="sk-made-up", ANTHROPIC_API_KEY="made-up")
    )
    assert app.state.calls.obs.prices.rates == {
        "openai": observe.Rate(input=0.75, output=4.50),
        "anthropic": observe.Rate(input=0.10, output=0.50),
        "speech:parrot": observe.Rate(),
    }  # the default speech model (media mode) is offline and free


def test_unknown_prices_cost_nothing_and_are_logged_once(logs: Captured) -> None:
    prices = observe.Prices(main.load_settings({}), [Counted("mystery")])
    assert prices.cost("mystery", main.Usage(input_tokens=10)) == 0.0
    assert prices.cost("mystery", main.Usage(audio_output_tokens=5)) == 0.0
    assert [line for line in logs.lines if "no price" in line] == [
        "warning no price for this provider's model; its cost counts as 0 (set PRICES) provider=mystery"
    ]


def test_phone_minutes_are_billed_per_started_minute() -> None:
    prices = observe.Prices(main.load_settings({"CALL_PRICE_PER_MINUTE": "0.0085"}), [])
    assert [prices.phone(s) for s in (0, 1, 60, 61, 125)] == pytest.approx([0.0, 0.0085, 0.0085, 0.017, 0.0255])


@pytest.mark.parametrize("value", ['{"gpt": 1}', "not json", '{"gpt": [1, "x"]}'])
def test_bad_prices_name_the_variable(value: str) -> None:
    with pytest.raises(main.ConfigError, match="PRICES or CALL_PRICE_PER_MINUTE is not valid"):
        main.create_app(env(PRICES=value))


def test_unknown_recorders_fail_with_the_list_of_what_exists() -> None:
    with pytest.raises(main.ConfigError, match="CALL_RECORDERS='disk' is not registered; available: log, postgres"):
        main.create_app(env(CALL_RECORDERS="log,disk"))


async def test_a_broken_recorder_never_breaks_a_call(logs: Captured) -> None:
    class Broken(Memo):
        def turn_finished(self, record: main.TurnRecord) -> None:
            raise RuntimeError("recorder bug")

        def call_finished(self, record: main.CallRecord) -> None:
            raise RuntimeError("recorder bug")

    app = main.create_app(env(CALL_RECORDERS="broken"), plugins=[recorders(broken=Broken())])
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        assert await twilio.turn("one") == ["You said: one."]
        assert await twilio.turn("two") == ["You said: two."]
        ended = await twilio.post("/status", CallStatus="completed")
    assert ended.status_code == 200 and twilio.call_sid not in app.state.calls.backend.calls
    assert len([line for line in logs.lines if line.startswith("error call recorder failed")]) == 3  # 2 turns, 1 call


# ----------------------------------------------------------------------------- log lines


async def settled(app: Any) -> None:
    """Wait until the engine's background generations have finished (and logged)."""
    for _ in range(500):
        if not app.state.calls.tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("generations still running")


@pytest.mark.parametrize("json_lines", [False, True])
async def test_log_lines_carry_the_call_and_turn_and_never_secrets_or_numbers(json_lines: bool) -> None:
    secrets = {
        "TWILIO_AUTH_TOKEN": TOKEN,
        "OPENAI_API_KEY": "sk-made-up-openai-key-123",
        "ANTHROPIC_API_KEY": "sk-ant-made-up-key-456",
        "METRICS_TOKEN": "made-up-metrics-token",
        "DATABASE_URL": f"postgresql://postgres:made-up-db-password@127.0.0.1:{phone.free_port()}/calls",
    }
    speech = "my card is 4111 and my number is plus one five zero zero"

    class Buggy(Counted):
        async def stream(self, messages: Any, *, system: str, tools: Any = ()) -> AsyncIterator[Any]:
            if len(self.calls) >= 1:
                raise RuntimeError("bug in a plugin")
            async for event in super().stream(messages, system=system, tools=tools):
                yield event

    model = Buggy("buggy", ["Sure thing."])
    app = main.create_app(
        {
            **env(
                LLM_PROVIDER="buggy",
                CALL_RECORDERS="log,postgres",
                CALLS_RETRIES="0",
                CALLS_TIMEOUT="0.2",
                LOG_FORMAT="json" if json_lines else "text",
            ),
            **secrets,
        },
        plugins=[plugin(llm=[model])],
    )
    handler = Captured(json_lines=json_lines)
    roots = [main.log, logging.getLogger()]  # switchboard's lines and every library's (psycopg's pool...)
    for logger in roots:
        logger.addHandler(handler)
    try:
        async with concurrent(app) as client:
            twilio = Twilio(client)
            await twilio.call()
            assert await twilio.turn(speech) == ["Sure thing."]
            await settled(app)
            assert await twilio.turn("and again") == [app.state.settings.apology]
            await settled(app)
            await twilio.post("/status", CallStatus="completed")
            await client.get("/metrics", headers={"authorization": "Bearer made-up-metrics-token"})
    finally:
        for logger in roots:
            logger.removeHandler(handler)
    everything = "\n".join(handler.lines)
    for secret in [*secrets.values(), "made-up-db-password", CALLER, CALLER[2:], "+15005550001", speech]:
        assert secret not in everything
    sid = twilio.call_sid
    about_the_call = [
        r
        for r in handler.records
        if r.name == "switchboard"
        and r.getMessage() not in ("switchboard ready", "switchboard stopped", "call records dropped")
    ]
    assert about_the_call and all(getattr(r, "call", None) == sid for r in about_the_call)
    turns = [(r.getMessage(), getattr(r, "turn", None)) for r in about_the_call if r.getMessage() != "request"]
    assert turns == [
        ("no price for this provider's model; its cost counts as 0 (set PRICES)", 1),
        ("provider failed", 2),
        ("generation failed", 2),
        ("call ended", None),
        ("call record", None),
    ]
    turn_of_requests = [(r.route, getattr(r, "turn", None)) for r in about_the_call if r.getMessage() == "request"]
    assert turn_of_requests == [("/voice", None), ("/process-speech", 1), ("/process-speech", 2), ("/status", None)]
    record = next(line for line in handler.lines if "call record" in line)
    if json_lines:
        assert msgspec.json.decode(record)["caller"] == "…0006"
    else:
        assert " caller=…0006 " in record


def test_switchboards_log_output_blanks_secrets_even_inside_library_messages_and_tracebacks() -> None:
    secrets = {
        "TWILIO_AUTH_TOKEN": TOKEN,
        "OPENAI_API_KEY": "sk-made-up-openai-key-123",
        "DATABASE_URL": "postgresql://app:made-up-db-password@db.internal:5432/calls",
        "LOG_FORMAT": "json",
    }
    main.create_app(secrets)
    handler = next(h for h in main.log.handlers if h.get_name() == "switchboard")
    try:
        raise RuntimeError("vendor said: bad key sk-made-up-openai-key-123")
    except RuntimeError:
        record = main.log.makeRecord(
            "switchboard",
            logging.ERROR,
            "x",
            1,
            "connect to %s failed",
            ("postgresql://app:made-up-db-password@db.internal:5432/calls",),
            sys.exc_info(),
            extra={"error": f"token {TOKEN}"},
        )
    line = msgspec.json.decode(handler.format(record))
    assert (line["msg"], line["error"]) == (
        "connect to postgresql://app:***@db.internal:5432/calls failed",
        "token ***",
    )
    assert line["exception"].endswith("RuntimeError: vendor said: bad key ***")
    assert observe.secrets_of(
        main.load_settings(
            {
                "SENTRY_DSN": "https://made-up-public-key@o1.ingest.example/42",
                "REDIS_URL": "redis://:made-up-redis@r:6379",
                "LANGUAGE": "en-US",
                "MAX_TURNS": "4",
                "KEY": "short",
                "PUBLIC_URL": "https://agent.example",
            }
        )
    ) == ["made-up-public-key", "made-up-redis"]


@pytest.mark.parametrize("json_lines", [False, True])
async def test_request_lines_skip_log_records_but_read_as_the_logging_call_would(json_lines: bool) -> None:
    app = main.create_app(env(LOG_FORMAT="json" if json_lines else "text"))
    handler = next(h for h in main.log.handlers if h.get_name() == "switchboard")
    out, made = io.StringIO(), []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(args[1])  # (name, level, ...)
        return factory(*args, **kwargs)

    previous, others = handler.setStream(out), main.log.handlers[:]
    main.log.handlers[:] = [handler]  # as in production (pytest's capture may have joined it)
    logging.setLogRecordFactory(counting)
    try:
        async with concurrent(app) as client:
            twilio = Twilio(client)
            await twilio.call()
            assert await twilio.turn("hello there") == ["You said: hello there."]
        fast = out.getvalue().splitlines()
        requests = [line for line in fast if "request" in line and "route=/" in line or '"msg":"request"' in line]
        assert len(requests) == 2 and not made.count(logging.INFO) - (len(fast) - len(requests))  # no record each
        fields = {"route": "/voice", "status": 200, "call": "CA1", "error": f'token {TOKEN} said <x> & "y"', "ms": 0.5}
        observe.request_line(dict(fields))
        main.log.info("request", extra=dict(fields))
    finally:
        logging.setLogRecordFactory(factory)
        handler.setStream(previous)
        main.log.handlers[:] = others
    by_record, direct = out.getvalue().splitlines()[-1], out.getvalue().splitlines()[-2]
    assert TOKEN not in direct and "token ***" in direct
    if json_lines:
        decoded = [msgspec.json.decode(line) for line in (direct, by_record)]
        assert decoded[0].pop("ts") == pytest.approx(decoded[1].pop("ts"), abs=5)
        assert decoded[0] == decoded[1] and list(decoded[0]) == ["level", "msg", *fields]
    else:
        assert (
            direct == by_record == 'info request route=/voice status=200 call=CA1 error=token *** said <x> & "y" ms=0.5'
        )


async def test_the_context_never_leaks_into_the_next_request(logs: Captured) -> None:
    app = main.create_app(env())
    async with concurrent(app) as client:  # ASGITransport runs every request in this one task
        twilio = Twilio(client)
        await twilio.call()
        await twilio.say("hello")
        await client.get("/health")
        await client.post(
            "/voice", content="CallSid=CA1", headers={"content-type": "application/x-www-form-urlencoded"}
        )
    assert observe.request_fields.get(None) is None
    refused = next(r for r in logs.records if r.getMessage() == "request" and r.status == 403)
    assert refused.call == "" and not hasattr(refused, "turn")


def test_json_logs_are_one_object_per_line() -> None:
    handler = Captured(json_lines=True)
    main.log.addHandler(handler)
    try:
        main.log.info("request", extra={"route": "/voice", "status": 200, "call": "CA1"})
    finally:
        main.log.removeHandler(handler)
    line = msgspec.json.decode(handler.lines[0])
    assert {k: line[k] for k in ("level", "msg", "route", "status", "call")} == {
        "level": "info",
        "msg": "request",
        "route": "/voice",
        "status": 200,
        "call": "CA1",
    }


# ----------------------------------------------------------------------------- Sentry


def test_sentry_is_not_imported_without_a_dsn() -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import main
        main.create_app({{"TWILIO_AUTH_TOKEN": "made-up"}})
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("sentry_sdk", "psycopg", "psycopg_pool")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


class Collector(http.server.ThreadingHTTPServer):
    """A stand-in for sentry.io: accepts envelopes on /api/<project>/envelope/ and keeps them."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, bytes]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.envelopes.append((self.path, body))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def events(self) -> list[dict[str, Any]]:
        """The event items of every envelope (header line, then item header/payload pairs)."""
        out = []
        for _, body in self.envelopes:
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    out.append(json.loads(payload))
        return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    thread = threading.Thread(target=c.serve_forever, daemon=True)
    thread.start()
    yield c
    c.shutdown()
    c.server_close()


def test_a_plugin_error_reaches_sentry_tagged_with_the_call_and_without_personal_data(
    collector: Collector, tmp_path: Path
) -> None:
    (tmp_path / "sb_boom.py").write_text(
        textwrap.dedent("""
        from main import LLMProvider, hookimpl

        class Boom(LLMProvider):
            name = "boom"
            def __init__(self, settings): pass
            async def stream(self, messages, *, system, tools=()):
                heard = messages[-1].content  # a local holding the caller's speech
                number = "+1" + "500" + "555" + "0006"  # (not spelled out: Sentry sends this source line)
                raise RuntimeError(f"bug in a plugin, caller {number}")
                yield heard

        @hookimpl
        def register_llm_providers(register):
            register("boom", Boom)
    """)
    )
    dist = tmp_path / "sb_boom-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-boom\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nboom = sb_boom\n")
    port = collector.server_address[1]
    dsn = f"http://made-up-public-key@127.0.0.1:{port}/42"
    speech = "my secret word is pineapple"
    with server({"SENTRY_DSN": dsn, "LLM_PROVIDER": "boom", "PYTHONPATH": str(tmp_path)}) as (base, _proc, log_path):
        call = phone.Phone(base, TOKEN, out=lambda _: None)
        call.post("/voice")
        answer = call.post("/process-speech", {"SpeechResult": speech, "Confidence": "0.9"})
        deadline = time.monotonic() + 15
        while not collector.events() and time.monotonic() < deadline:
            time.sleep(0.1)
        call.http.close()
    assert answer.status_code == 200 and "trouble answering" in answer.text
    (event,) = collector.events()
    assert {k: event["tags"][k] for k in ("call_sid", "turn")} == {"call_sid": call.call_sid, "turn": "1"}
    assert event["exception"]["values"][-1]["value"] == "bug in a plugin, caller …0006"
    assert event["logentry"]["message"] == "generation failed"
    assert all(path == "/api/42/envelope/" for path, _ in collector.envelopes)
    raw = b"\n".join(body for _, body in collector.envelopes).decode()
    for private in ("5005550006", "pineapple", TOKEN, "5005550001"):
        assert private not in raw
    logged = log_path.read_text()
    assert "sentry enabled" in logged and "made-up-public-key" not in logged


def test_the_scrubber_keeps_the_request_line_and_drops_bodies_users_and_numbers() -> None:
    event = {
        "request": {
            "method": "POST",
            "url": "https://agent.example/process-speech",
            "data": {"From": CALLER},
            "headers": {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": "sig",
                "Cookie": "a=b",
            },
            "cookies": {"a": "b"},
            "query_string": "n=1",
        },
        "user": {"ip_address": "203.0.113.9"},
        "message": f"call from {CALLER}",
        "breadcrumbs": {"values": [{"message": "caller +1 (500) 555-0006 said hi"}]},
        "exception": {"values": [{"type": "RuntimeError", "value": f"bad {CALLER}"}]},
    }
    token = observe.request_fields.set({"route": "/process-speech", "call": "CA123", "turn": 2})
    try:
        scrubbed = observe.before_send(event, {})
    finally:
        observe.request_fields.reset(token)
    assert scrubbed == {
        "request": {
            "method": "POST",
            "url": "https://agent.example/process-speech",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        "tags": {"call_sid": "CA123", "turn": "2"},
        "message": "call from …0006",
        "breadcrumbs": {"values": [{"message": "caller …0006 said hi"}]},
        "exception": {"values": [{"type": "RuntimeError", "value": "bad …0006"}]},
    }
