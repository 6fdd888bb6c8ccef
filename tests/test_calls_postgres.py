"""Call records in the real PostgreSQL at 127.0.0.1:5432, in a fresh database per test, and through an outage."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from conftest import Captured, Scripted, Twilio, concurrent, env, plugin
from prometheus_client.parser import text_string_to_metric_families

import main
from plugins.calls_postgres import SCHEMA as PostgresSchema

SERVER = "postgresql://postgres@127.0.0.1:5432"
DETAIL = (
    "cached_input_tokens",
    "audio_input_tokens",
    "cached_audio_input_tokens",
    "audio_output_tokens",
    "transcription_ms",
)


@pytest.fixture
def database() -> Iterator[str]:
    """A database of our own on the shared server, dropped afterwards."""
    name = "sb_test_" + secrets.token_hex(6)
    with psycopg.connect(SERVER + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(SERVER + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


class Metered(Scripted):
    async def stream(self, messages: Any, *, system: str, tools: Any = ()) -> Any:
        async for event in super().stream(messages, system=system, tools=tools):
            yield event
        yield main.Usage(input_tokens=200, output_tokens=50)


def app_for(url: str, model: Scripted, **overrides: str) -> Any:
    return main.create_app(
        env(
            LLM_PROVIDER=model.name,
            CALL_RECORDERS="postgres",
            DATABASE_URL=url,
            PRICES='{"scripted": [1, 4]}',
            **overrides,
        ),
        plugins=[plugin(llm=[model])],
    )


async def test_tables_are_created_on_first_start_and_rows_written_after_a_call(database: str) -> None:
    app = app_for(database, Metered("scripted", ["Table for two, done.", "Goodbye."]))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        assert await twilio.turn("a table for two") == ["Table for two, done."]
        assert await twilio.turn("thanks") == ["Goodbye."]
        await twilio.post("/status", CallStatus="completed")
    # the lifespan's end flushed the queue: everything is there now
    columns = rows(
        database,
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    assert [(t, c) for t, c, _ in columns] == [
        ("calls", c)
        for c in (
            "call_sid",
            "caller",
            "callee",
            "started",
            "ended",
            "seconds",
            "outcome",
            "turns",
            "providers",
            "usage",
            "input_tokens",
            "output_tokens",
            "llm_cost",
            "phone_cost",
            "cost",
            "channel",
            *DETAIL,
        )
    ] + [
        ("turns", c)
        for c in (
            "call_sid",
            "turn",
            "turn_id",
            "started",
            "speech",
            "reply",
            "interrupted",
            "provider",
            "first_token_ms",
            "first_audio_ms",
            "reply_ms",
            "input_tokens",
            "output_tokens",
            "cost",
            "taken_over",
            *DETAIL,
        )
    ]
    sid, cost = twilio.call_sid, (200 * 1 + 50 * 4) / 1e6
    calls = rows(
        database,
        "SELECT call_sid, caller, callee, outcome, turns, providers, usage, input_tokens, "
        "output_tokens, llm_cost::float8, phone_cost::float8, cost::float8, "
        "ended >= started, seconds < 60 FROM calls",
    )
    assert calls == [
        (
            sid,
            "+15005550006",
            "+15005550001",
            "completed",
            2,
            ["scripted"],
            {"scripted": {"input_tokens": 400, "output_tokens": 100}},
            400,
            100,
            2 * cost,
            0.0,
            2 * cost,
            True,
            True,
        )
    ]
    turns = rows(
        database,
        "SELECT call_sid, turn, speech, reply, interrupted, provider, input_tokens, output_tokens, "
        "cost::float8, first_token_ms >= 0, first_audio_ms >= first_token_ms, reply_ms >= 0, "
        "started > now() - interval '1 minute' FROM turns ORDER BY turn",
    )
    assert turns == [
        (sid, 1, "a table for two", "Table for two, done.", False, "scripted", 200, 50, cost, True, True, True, True),
        (sid, 2, "thanks", "Goodbye.", False, "scripted", 200, 50, cost, True, True, True, True),
    ]


async def test_a_turns_table_from_before_takeovers_gains_the_column_and_keeps_its_rows(database: str) -> None:
    old = "\n".join(line for line in PostgresSchema.splitlines() if not line.startswith("ALTER TABLE"))  # the first one
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(old)
        conn.execute(
            "INSERT INTO turns VALUES ('CAold', 1, 't1', now(), 'hi', 'Hello.', false, 'openai', "
            "NULL, NULL, NULL, 1, 2, 0)"
        )
    app = app_for(database, Metered("scripted", ["Yes."]))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.turn("hello")
        await twilio.post("/status", CallStatus="completed")
    assert rows(database, "SELECT call_sid, speech, taken_over FROM turns ORDER BY started") == [
        ("CAold", "hi", False),
        (twilio.call_sid, "hello", False),
    ]


async def test_a_restart_finds_its_tables_and_a_call_is_recorded_once(database: str) -> None:
    for _ in range(2):  # the tables exist the second time
        app = app_for(database, Metered("scripted", ["Yes."]))
        async with concurrent(app) as client:
            twilio = Twilio(client, call_sid="CA" + "1" * 32)
            await twilio.call()
            await twilio.turn("hello")
            await twilio.post("/status", CallStatus="completed")
    assert rows(database, "SELECT count(*) FROM calls") == [(1,)]
    assert rows(database, "SELECT count(*) FROM turns") == [(2,)]  # two turns: each start had its own


async def test_shutdown_flushes_what_is_queued(database: str) -> None:
    from plugins.calls_postgres import PostgresRecorder

    recorder = PostgresRecorder(main.load_settings({"DATABASE_URL": database}))
    await recorder.aopen()
    for i in range(50):
        recorder.call_finished(
            main.CallRecord(
                call_sid=f"CA{i:032d}",
                caller="+15005550006",
                to="+15005550001",
                started=time.time() - 30,
                ended=time.time(),
                outcome="completed",
                turns=0,
            )
        )
    assert recorder.written == 0
    await recorder.aclose()  # at once: the writer has not run yet
    assert (recorder.written, recorder.dropped) == (50, 0)
    assert rows(database, "SELECT count(*), min(seconds) >= 29 FROM calls") == [(50, True)]


async def test_tables_from_before_the_usage_detail_gain_its_columns_and_keep_their_rows(database: str) -> None:
    from plugins.calls_postgres import SCHEMA, PostgresRecorder

    with psycopg.connect(database, autocommit=True) as conn:  # the first release's tables, with a call in them
        conn.execute(SCHEMA.split("ALTER TABLE")[0])
        conn.execute(
            "INSERT INTO calls VALUES ('CAold', '+1', '+2', now(), now(), 1, 'completed', 1, '{}', '{}', "
            "10, 5, 0.1, 0, 0.1)"
        )
    recorder = PostgresRecorder(main.load_settings({"DATABASE_URL": database}))
    await recorder.aopen()
    speech = main.Usage(
        input_tokens=100,
        cached_input_tokens=60,
        audio_input_tokens=300,
        cached_audio_input_tokens=30,
        output_tokens=20,
        audio_output_tokens=400,
        transcription_ms=4500,
    )
    now = time.time()
    recorder.turn_finished(
        main.TurnRecord(
            call_sid="CAnew",
            turn=1,
            turn_id="t1",
            started=now,
            speech="hi",
            reply="hello",
            cost=0.5,
            **msgspec.structs.asdict(speech),
        )
    )
    recorder.call_finished(
        main.CallRecord(
            call_sid="CAnew",
            caller="+1",
            to="+2",
            started=now - 5,
            ended=now,
            outcome="completed",
            turns=1,
            usage={"speech:openai": speech},
            **msgspec.structs.asdict(speech),
        )
    )
    await recorder.aclose()
    columns = ", ".join(("call_sid", "input_tokens", "output_tokens") + DETAIL)
    assert rows(database, f"SELECT {columns} FROM calls ORDER BY call_sid") == [
        ("CAnew", 100, 20, 60, 300, 30, 400, 4500),
        ("CAold", 10, 5, 0, 0, 0, 0, 0),
    ]
    assert rows(database, f"SELECT {columns} FROM turns") == [("CAnew", 100, 20, 60, 300, 30, 400, 4500)]


def test_postgres_needs_a_database_url() -> None:
    with pytest.raises(main.ConfigError, match="DATABASE_URL is not set; CALL_RECORDERS=postgres needs it"):
        main.create_app(env(CALL_RECORDERS="postgres"))


def test_a_bad_database_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(main.ConfigError) as e:
        main.create_app(env(CALL_RECORDERS="postgres", DATABASE_URL="postgresql://u:made-up-secret@h:notaport/db x"))
    assert "made-up-secret" not in str(e.value) and "DATABASE_URL" in str(e.value)


class Proxy:
    """A TCP proxy to the shared server that we can cut and restore: a Postgres outage of our own."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()
        await self.server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        except OSError:
            writer.close()
            return
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def proxied() -> AsyncIterator[Proxy]:
    proxy = Proxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        with contextlib.suppress(Exception):
            await proxy.cut()


async def wait_for(check: Any, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_postgres_outage_mid_call_never_touches_the_call(database: str, logs: Captured) -> None:
    model = Metered("scripted", ["First answer.", "Second answer.", "Third answer.", "Fourth answer."])
    async with proxied() as proxy:
        url = database.replace(":5432/", f":{proxy.port}/")
        app = app_for(url, model, CALLS_RETRIES="2", CALLS_RETRY_DELAY="0.05", CALLS_TIMEOUT="0.5")
        recorder = app.state.calls.obs.recorders[0]
        async with concurrent(app) as client:
            twilio = Twilio(client)
            await twilio.call()
            assert await twilio.turn("one") == ["First answer."]
            assert await twilio.turn("two") == ["Second answer."]  # closes turn 1: its record is written
            await wait_for(lambda: recorder.written == 1)
            await proxy.cut()  # the database is gone, mid-call
            assert await twilio.turn("three") == ["Third answer."]  # closes turn 2: written into the void
            await twilio.post("/status", CallStatus="completed")  # closes turn 3 and the call
            await wait_for(lambda: recorder.dropped == 3)
            scrape = (await client.get("/metrics")).text
            await proxy.start()  # it is back: later calls are recorded again
            later = Twilio(client)
            await later.call()
            assert await later.turn("four") == ["Fourth answer."]
            await later.post("/status", CallStatus="completed")
            await wait_for(lambda: recorder.written == 3, seconds=30)
    dropped = [
        s.value
        for f in text_string_to_metric_families(scrape)
        for s in f.samples
        if s.name == "switchboard_call_records_dropped_total"
    ]
    assert dropped == [3.0]
    warnings = [line for line in logs.lines if line.startswith("warning call records dropped")]
    assert warnings and all("recorder=postgres" in line for line in warnings)
    assert sum(int(line.split(" records=")[1].split()[0]) for line in warnings) == 3
    assert rows(
        database,
        "SELECT call_sid, turn, speech FROM turns ORDER BY call_sid = %s, turn".replace("%s", f"'{later.call_sid}'"),
    ) == [(twilio.call_sid, 1, "one"), (later.call_sid, 1, "four")]
    assert rows(database, "SELECT call_sid FROM calls") == [(later.call_sid,)]
