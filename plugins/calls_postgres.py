"""Call records in PostgreSQL (psycopg 3, async pool): tables `calls` and `turns`, written off the request path.

Records go into a bounded queue; one writer task batches them into the database. A Postgres outage never
touches a call: a batch is retried a few times, then dropped with a log line and a count (`dropped`, published
as switchboard_call_records_dropped_total). Shutdown flushes what is queued.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec

from main import CallRecord, CallRecorder, ConfigError, Register, Settings, TurnRecord, hookimpl, log

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_sid text PRIMARY KEY,
    caller text NOT NULL,
    callee text NOT NULL,
    started timestamptz NOT NULL,
    ended timestamptz NOT NULL,
    seconds double precision NOT NULL,
    outcome text NOT NULL,
    turns integer NOT NULL,
    providers text[] NOT NULL,
    usage jsonb NOT NULL,
    input_tokens integer NOT NULL,
    output_tokens integer NOT NULL,
    llm_cost numeric(14, 6) NOT NULL,
    phone_cost numeric(14, 6) NOT NULL,
    cost numeric(14, 6) NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_started ON calls (started);
ALTER TABLE calls ADD COLUMN IF NOT EXISTS channel text NOT NULL DEFAULT 'phone';
CREATE TABLE IF NOT EXISTS turns (
    call_sid text NOT NULL,
    turn integer NOT NULL,
    turn_id text NOT NULL,
    started timestamptz NOT NULL,
    speech text NOT NULL,
    reply text NOT NULL,
    interrupted boolean NOT NULL,
    provider text NOT NULL,
    first_token_ms real,
    first_audio_ms real,
    reply_ms real,
    input_tokens integer NOT NULL,
    output_tokens integer NOT NULL,
    cost numeric(14, 6) NOT NULL,
    PRIMARY KEY (call_sid, turn_id)
);
ALTER TABLE turns ADD COLUMN IF NOT EXISTS taken_over boolean NOT NULL DEFAULT false;
""" + "".join(  # usage detail, added after the first release: tables created before gain the columns, old rows 0
    f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} integer NOT NULL DEFAULT 0;\n"
    for table in ("calls", "turns")
    for column in (
        "cached_input_tokens",
        "audio_input_tokens",
        "cached_audio_input_tokens",
        "audio_output_tokens",
        "transcription_ms",
    )
)
DETAIL = "cached_input_tokens, audio_input_tokens, cached_audio_input_tokens, audio_output_tokens, transcription_ms"
INSERT_CALL = f"""
INSERT INTO calls (call_sid, caller, callee, started, ended, seconds, outcome, turns, providers, usage,
                   input_tokens, output_tokens, llm_cost, phone_cost, cost, {DETAIL}, channel)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (call_sid) DO NOTHING
"""
INSERT_TURN = f"""
INSERT INTO turns (call_sid, turn, turn_id, started, speech, reply, interrupted, provider, first_token_ms,
                   first_audio_ms, reply_ms, input_tokens, output_tokens, cost, taken_over, {DETAIL})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (call_sid, turn_id) DO NOTHING
"""
LOCK = 0x5B_CA11  # an advisory lock id: replicas starting together create the tables once


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _detail(r: TurnRecord | CallRecord) -> tuple[int, ...]:
    return (
        r.cached_input_tokens,
        r.audio_input_tokens,
        r.cached_audio_input_tokens,
        r.audio_output_tokens,
        r.transcription_ms,
    )


class PostgresRecorder(CallRecorder):
    """Writes every finished turn and call to PostgreSQL, never blocking a call."""

    def __init__(self, settings: Settings) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self.url = settings.require("DATABASE_URL", "CALL_RECORDERS=postgres")
        try:
            self.password = str(conninfo_to_dict(self.url).get("password") or "")
        except Exception as e:  # never echo the URL: it may carry a password
            raise ConfigError(f"DATABASE_URL is not valid: {type(e).__name__}") from None
        size = settings.number("CALLS_QUEUE_SIZE", 10000)
        self.queue: asyncio.Queue[TurnRecord | CallRecord] = asyncio.Queue(size)
        self.retries = settings.number("CALLS_RETRIES", 3, inclusive=True)
        self.delay = settings.number("CALLS_RETRY_DELAY", 0.5, inclusive=True, unit="seconds")
        self.timeout = settings.number("CALLS_TIMEOUT", 3.0, unit="seconds")
        self.pool: Any = None
        self.writer: asyncio.Task[None] | None = None
        self.ready = False
        self.written = self.dropped = 0

    async def aopen(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=2,
            open=False,
            timeout=self.timeout,
            name="switchboard-calls",
            reconnect_timeout=60,
        )
        await self.pool.open(wait=False)  # a database that is down must not stop the agent starting
        self.writer = asyncio.create_task(self._write_forever())

    async def aclose(self) -> None:
        if self.writer is not None:
            try:
                async with asyncio.timeout(self.timeout * (self.retries + 2)):
                    await self.queue.join()
            except TimeoutError:
                pass
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)
            if left := self.queue.qsize():
                self._drop(left, "still queued at shutdown")
        if self.pool is not None:
            await self.pool.close()

    def turn_finished(self, record: TurnRecord) -> None:
        self._put(record)

    def call_finished(self, record: CallRecord) -> None:
        self._put(record)

    def _put(self, record: TurnRecord | CallRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(1, "queue full")

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        log.warning("call records dropped", extra={"recorder": "postgres", "records": count, "error": why})

    async def _write_forever(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < 200 and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                self._drop(len(batch), "shut down before they were written")
                raise
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _write(self, batch: list[TurnRecord | CallRecord]) -> None:
        """Write a batch in one transaction; retry with backoff, then drop it."""
        why = ""
        for attempt in range(self.retries + 1):
            try:
                async with self.pool.connection(timeout=self.timeout) as conn:
                    if not self.ready:
                        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK])
                        await conn.execute(SCHEMA)
                    async with conn.cursor() as cur:
                        if turns := [self._turn_row(r) for r in batch if isinstance(r, TurnRecord)]:
                            await cur.executemany(INSERT_TURN, turns)
                        if calls := [self._call_row(r) for r in batch if isinstance(r, CallRecord)]:
                            await cur.executemany(INSERT_CALL, calls)
                self.ready = True
                self.written += len(batch)
                return
            except Exception as e:  # psycopg errors, pool timeouts, broken sockets: all mean "not now"
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if self.password:  # a driver message never carries it, but make sure
                    why = why.replace(self.password, "***")
                if attempt < self.retries:
                    await asyncio.sleep(self.delay * 2**attempt)
        self._drop(len(batch), why)

    @staticmethod
    def _turn_row(r: TurnRecord) -> tuple[Any, ...]:
        return (
            r.call_sid,
            r.turn,
            r.turn_id,
            _time(r.started),
            r.speech,
            r.reply,
            r.interrupted,
            r.provider,
            r.first_token_ms,
            r.first_audio_ms,
            r.reply_ms,
            r.input_tokens,
            r.output_tokens,
            r.cost,
            r.taken_over,
            *_detail(r),
        )

    @staticmethod
    def _call_row(r: CallRecord) -> tuple[Any, ...]:
        from psycopg.types.json import Jsonb

        return (
            r.call_sid,
            r.caller,
            r.to,
            _time(r.started),
            _time(r.ended),
            round(r.ended - r.started, 3),
            r.outcome,
            r.turns,
            list(r.providers),
            Jsonb(msgspec.to_builtins(r.usage)),
            r.input_tokens,
            r.output_tokens,
            r.llm_cost,
            r.phone_cost,
            r.cost,
            *_detail(r),
            r.channel,
        )


@hookimpl
def register_call_recorders(register: Register) -> None:
    register("postgres", PostgresRecorder)
