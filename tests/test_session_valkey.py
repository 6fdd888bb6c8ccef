"""The Valkey backend beyond the contract: settings, URLs and TLS, key layout, pub/sub between processes,
and faults (a silent server, an outage mid-call, a start without Valkey) on private servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import valkey
import valkey.asyncio
from conftest import (
    GATHER,
    VALKEY_PREFIX,
    VALKEY_URL,
    Scripted,
    Twilio,
    concurrent,
    env,
    plugin,
    redirect_of,
    running,
    says,
    shared_cluster,
    tree,
    twiml,
)
from valkey.asyncio.connection import SSLConnection
from valkey.crc import key_slot

import main
import phone
from plugins.session_valkey import ValkeyBackend, pool_options, server_name

SHARED_URL = VALKEY_URL  # shared with other runs: never flushed; every prefix here starts with VALKEY_PREFIX
SERVER = shutil.which("valkey-server") or shutil.which("redis-server") or "redis-server"


class PrivateValkey:
    """Our own redis-server/valkey-server on a free port, to stop and start at will (never the shared one)."""

    def __init__(self, directory: Path, *, tls: tuple[Path, Path] | None = None, password: str = "") -> None:
        self.dir, self.tls, self.password = directory, tls, password
        self.port = phone.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            SERVER,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "server.log"),
        ]
        if self.tls:
            cert, key = self.tls
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(cert),
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{SERVER} did not start: {(self.dir / 'server.log').read_text()}")

    def stop(self) -> None:
        """Stop gracefully (the append-only file keeps the data for the next start)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextlib.contextmanager
def private_valkey(directory: Path, **kwargs: object) -> Iterator[PrivateValkey]:
    server = PrivateValkey(directory, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared server; its keys are deleted afterwards."""
    name = f"{VALKEY_PREFIX}-{secrets.token_hex(4)}"
    yield name
    with valkey.Valkey.from_url(SHARED_URL) as client:
        for key in client.scan_iter(match=f"{name}:*", count=1000):
            client.delete(key)


@contextlib.asynccontextmanager
async def opened(**extra: str) -> AsyncIterator[ValkeyBackend]:
    backend = ValkeyBackend(main.load_settings(env(SESSION_BACKEND="valkey", **extra)))
    await backend.aopen()
    try:
        yield backend
    finally:
        await backend.aclose()


def valkey_app(model: Scripted, url: str, prefix: str, **extra: str) -> main.Litestar:
    return main.create_app(
        env(SESSION_BACKEND="valkey", VALKEY_URL=url, VALKEY_PREFIX=prefix, LLM_PROVIDER=model.name, **extra),
        plugins=[plugin(llm=[model])],
    )


def apology() -> tuple[object, ...]:
    """What the webhooks answer when the backend fails: the apology inside a listening <Gather>."""
    return twiml(lambda r: r.gather(**GATHER).say("Sorry, I'm having trouble answering right now."))


def answer(text: str) -> tuple[object, ...]:
    return twiml(lambda r: r.gather(**GATHER).say(text, voice="Polly.Joanna-Neural", language="en-US"))


# ----------------------------------------------------------------------------- settings and URLs


def test_a_missing_url_is_a_fix_it_config_error() -> None:
    with pytest.raises(main.ConfigError) as e:
        main.create_app(env(SESSION_BACKEND="valkey"))
    assert str(e.value).startswith("VALKEY_URL is not set (nor REDIS_URL); SESSION_BACKEND=valkey needs it.")
    assert "REDIS_URL=${{Redis.REDIS_URL}}" in str(e.value)


def test_redis_url_is_the_fallback_and_valkey_url_wins() -> None:
    from_redis = main.create_app(env(SESSION_BACKEND="valkey", REDIS_URL="redis://:pw@cache.internal:6380/2"))
    assert from_redis.state.calls.backend.where == "redis://cache.internal:6380/2"
    both = main.create_app(env(SESSION_BACKEND="valkey", REDIS_URL="redis://a:1/0", VALKEY_URL="redis://b:2/3"))
    assert both.state.calls.backend.where == "redis://b:2/3"
    assert both.state.calls.backend.prefix == "sb"


def test_bad_urls_and_numbers_are_config_errors_that_never_show_the_password() -> None:
    with pytest.raises(main.ConfigError, match="VALKEY_URL .* is not a usable Valkey/Redis URL") as e:
        main.create_app(env(SESSION_BACKEND="valkey", VALKEY_URL="http://user:hunter2@cache:6379"))
    assert "hunter2" not in str(e.value)
    with pytest.raises(main.ConfigError, match="not a usable Valkey/Redis URL: .*sockettimeout"):
        main.create_app(env(SESSION_BACKEND="valkey", VALKEY_URL="redis://cache:6379/0?sockettimeout=3"))
    with pytest.raises(main.ConfigError, match="not a usable Valkey/Redis URL: .*Certificate Requirements"):
        main.create_app(env(SESSION_BACKEND="valkey", VALKEY_URL="rediss://cache:6379/0?ssl_cert_reqs=maybe"))
    with pytest.raises(
        main.ConfigError, match="VALKEY_TIMEOUT='soon' is not valid: set it to a number of seconds above 0"
    ):
        main.create_app(env(SESSION_BACKEND="valkey", VALKEY_URL="redis://x", VALKEY_TIMEOUT="soon"))
    with pytest.raises(
        main.ConfigError, match="VALKEY_MAX_CONNECTIONS='0' is not valid: set it to a whole number above 0"
    ):
        main.create_app(env(SESSION_BACKEND="valkey", VALKEY_URL="redis://x", VALKEY_MAX_CONNECTIONS="0"))
    assert server_name("rediss://default:hunter2@red.example:6380") == "rediss://red.example:6380"


def test_tls_urls_build_tls_connections_that_check_the_certificate_and_the_host() -> None:
    settings = main.load_settings(env(VALKEY_URL="rediss://default:s3cret@red.example.com:6380/1"))
    pool = ValkeyBackend(settings).pool
    conn = pool.make_connection()
    assert isinstance(conn, SSLConnection)
    assert (conn.host, conn.port, conn.db, conn.username, conn.password) == (
        "red.example.com",
        6380,
        1,
        "default",
        "s3cret",
    )
    assert (conn.cert_reqs, conn.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert (conn.socket_timeout, conn.socket_connect_timeout) == (1.0, 1.0)
    # a self-signed server: the URL relaxes the check explicitly; the URL's own options always win
    relaxed = ValkeyBackend(main.load_settings(env(VALKEY_URL="rediss://red:6380?ssl_cert_reqs=none&socket_timeout=3")))
    conn = relaxed.pool.make_connection()
    assert (conn.cert_reqs, conn.check_hostname, conn.socket_timeout) == (ssl.CERT_NONE, False, 3.0)
    assert "ssl_check_hostname" not in pool_options("redis://plain:6379", 1.0, 8)


async def test_a_tls_server_is_reached_through_a_rediss_url(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    with private_valkey(tmp_path, tls=(cert, key)) as server:
        good = f"rediss://localhost:{server.port}/0?ssl_ca_certs={cert}"
        async with opened(VALKEY_URL=good) as backend:
            await backend.ping()
            snap = await backend.begin("CAtls", [], 60)
            assert await backend.commit("CAtls", snap.token, main.Session(call_sid="CAtls", turns=3))
            assert (await backend.begin("CAtls", [], 60)).session.turns == 3
        wrong_host = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={cert}"  # the certificate names localhost
        async with opened(VALKEY_URL=wrong_host, VALKEY_TIMEOUT="0.5") as backend:
            with pytest.raises(main.BackendError, match="certificate"):
                await backend.ping()


async def test_a_server_with_a_password_and_a_database_number_is_reached_through_its_url(
    tmp_path: Path,
    logs,  # type: ignore[no-untyped-def]
) -> None:
    """The handshake (AUTH, SELECT) happens before the backend takes the connection over: every command after it
    runs authenticated in the URL's database; a wrong password is a logged BackendError that never shows it."""
    with private_valkey(tmp_path, password="s3cret-pw") as server:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/3"
        async with opened(VALKEY_URL=url, VALKEY_PREFIX="pw") as backend:
            snap = await backend.begin("CApw", [], 60)
            assert await backend.commit("CApw", snap.token, main.Session(call_sid="CApw", turns=2))
            assert (await backend.begin("CApw", [], 60)).session.turns == 2
        with valkey.Valkey.from_url(url) as db3, valkey.Valkey.from_url(url[: -len("/3")] + "/0") as db0:
            assert (db3.exists("pw:{CApw}:s"), db0.exists("pw:{CApw}:s")) == (1, 0)
        async with opened(VALKEY_URL=f"redis://:not-it@127.0.0.1:{server.port}/3", VALKEY_TIMEOUT="0.5") as backend:
            with pytest.raises(main.BackendError, match="(?i)auth|password"):
                await backend.begin("CApw", [], 60)
    assert not [line for line in logs.lines if "s3cret-pw" in line or "not-it" in line]
    assert any("valkey failed" in line or "valkey unreachable" in line for line in logs.lines)


# ----------------------------------------------------------------------------- layout


async def test_every_key_of_a_call_is_in_one_slot_carries_the_prefix_and_expires(prefix: str) -> None:
    async with opened(VALKEY_URL=SHARED_URL, VALKEY_PREFIX=prefix, SESSION_TTL="120") as backend:
        call = "CA" + secrets.token_hex(16)
        snap = await backend.begin(call, [], 120)
        session = main.Session(
            call_sid=call, turns=1, current=main.Turn(id="ab12cd34", user="hi", keys=["k"], started=1.0)
        )
        await backend.commit(call, snap.token, session, turn_changed=True)
        await backend.serve(call, "ab12cd34", ["k"], [main.Segment(text="Hello.")])
        await backend.push(call, "ab12cd34", [main.Segment(text="More.")])
        await backend.put_blob("audio-1", b"\x00mp3", 30)
        raw = valkey.asyncio.Valkey.from_url(SHARED_URL)
        try:
            keys = sorted([k.decode() async for k in raw.scan_iter(match=f"{prefix}:*", count=1000)])
            assert keys == sorted(
                [f"{prefix}:{{{call}}}:{name}" for name in ("s", "c", "v", "q", "r", "g", "h")]
                + [f"{prefix}:blob:audio-1"]
            )
            assert len({key_slot(k.encode()) for k in keys if "blob" not in k}) == 1
            for k in keys:
                assert 0 < await raw.pttl(k) <= (30_000 if "blob" in k else 120_000), k
            assert msgspec.msgpack.decode(await raw.get(f"{prefix}:{{{call}}}:s"), type=main.Session) == session
            assert await raw.get(f"{prefix}:{{{call}}}:c") == b"ab12cd34"
            reply = msgspec.msgpack.decode(await raw.hget(f"{prefix}:{{{call}}}:r", "k"))
            assert reply == ["ab12cd34", [{"text": "Hello."}]]
        finally:
            await raw.aclose()


async def test_a_long_reply_is_stored_and_served_whole(prefix: str) -> None:
    segments = [main.Segment(text=f"Sentence {n}.") for n in range(70_000 // 1000 * 20)] + [main.END]
    async with opened(VALKEY_URL=SHARED_URL, VALKEY_PREFIX=prefix) as backend:
        snap = await backend.begin("CAlong", [], 60)
        await backend.commit(
            "CAlong",
            snap.token,
            main.Session(call_sid="CAlong", current=main.Turn(id="feed0001", user="x", keys=["k"], started=1.0)),
            turn_changed=True,
        )
        for n in range(0, len(segments), 7):
            assert await backend.push("CAlong", "feed0001", segments[n : n + 7])
        assert await backend.serve("CAlong", "feed0001", ["k", "feed0001:1"]) == segments
        assert await backend.reply("CAlong", "feed0001:1") == ("feed0001", segments)


async def test_a_server_error_in_a_flight_is_that_command_s_alone(prefix: str) -> None:
    async with opened(VALKEY_URL=SHARED_URL, VALKEY_PREFIX=prefix) as backend:
        await backend._do(backend._send("SET", f"{prefix}:text", "not a number"))
        replies = await asyncio.gather(
            backend._send("PING"),
            backend._send("INCR", f"{prefix}:text"),
            backend._send("GET", f"{prefix}:text"),
            return_exceptions=True,
        )  # one flight
        assert replies[0] == b"PONG" and replies[2] == b"not a number"
        assert isinstance(replies[1], valkey.exceptions.ResponseError) and "not an integer" in str(replies[1])
        assert await backend.begin("CAafter", [], 60) is not None  # the connection is still in step


async def test_scripts_are_loaded_again_when_the_server_forgets_them(tmp_path: Path) -> None:
    with private_valkey(tmp_path) as server:
        async with opened(VALKEY_URL=server.url) as backend:
            snap = await backend.begin("CAscript", [], 60)
            await backend.commit("CAscript", snap.token, main.Session(call_sid="CAscript", turns=1))
            raw = valkey.asyncio.Valkey.from_url(server.url)
            try:
                await raw.script_flush()
                assert await raw.script_exists(*backend.scripts) == [False] * len(backend.scripts)
            finally:
                await raw.aclose()
            many = await asyncio.gather(*(backend.begin(f"CA{n}", [], 60) for n in range(20)))  # one flight
            assert all(snap is not None and snap.session is None for snap in many)
            assert (await backend.begin("CAscript", [], 60)).session.turns == 1


# ----------------------------------------------------------------------------- between processes


@pytest.mark.parametrize("where", ["valkey", "cluster"])
async def test_cancels_and_pushes_reach_the_other_processes_once(prefix: str, where: str) -> None:
    # on a cluster, the two processes are told different nodes: they subscribe there and publish elsewhere
    urls = [SHARED_URL] * 2 if where == "valkey" else [f"redis://127.0.0.1:{p}/0" for p in shared_cluster().ports[1:]]
    async with (
        opened(VALKEY_URL=urls[0], VALKEY_PREFIX=prefix) as a,
        opened(VALKEY_URL=urls[1], VALKEY_PREFIX=prefix) as b,
    ):
        heard_a: list[str] = []
        heard_b: list[str] = []
        a.on_cancel(heard_a.append)
        b.on_cancel(heard_b.append)
        call = "CA" + secrets.token_hex(16)
        snap = await a.begin(call, [], 60)
        current = main.Turn(id="aa000001", user="hi", keys=["k"], started=1.0)
        await a.commit(call, snap.token, main.Session(call_sid=call, current=current), turn_changed=True)
        t0 = time.monotonic()
        waiting = asyncio.create_task(b.wait(call, "aa000001", 5.0))
        await asyncio.sleep(0.1)
        assert await a.push(call, "aa000001", [main.Segment(text="Hi.")])
        await waiting
        assert time.monotonic() - t0 < 1.0  # woken by the push, not by the timeout
        snap = await b.begin(call, [], 60)
        await b.commit(call, snap.token, main.Session(call_sid=call), turn_changed=True, cancel="aa000001")
        for _ in range(100):
            if heard_a:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert (heard_a, heard_b) == (["aa000001"], ["aa000001"])


async def test_deployments_with_different_prefixes_share_a_server_without_seeing_each_other(prefix: str) -> None:
    async with (
        opened(VALKEY_URL=SHARED_URL, VALKEY_PREFIX=prefix + "-a") as a,
        opened(VALKEY_URL=SHARED_URL, VALKEY_PREFIX=prefix + "-b") as b,
    ):
        heard: list[str] = []
        b.on_cancel(heard.append)
        snap = await a.begin("CAsame", [], 60)
        await a.commit("CAsame", snap.token, main.Session(call_sid="CAsame", turns=7), cancel="ab000001")
        other = await b.begin("CAsame", [], 60)
        assert other is not None and other.session is None
        await asyncio.sleep(0.2)
        assert heard == [] and (await a.begin("CAsame", [], 60)).session.turns == 7


# ----------------------------------------------------------------------------- faults


async def test_a_silent_server_is_a_backend_error_within_the_timeout() -> None:
    hung: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        async with opened(VALKEY_URL=f"redis://127.0.0.1:{port}/0", VALKEY_TIMEOUT="0.3") as backend:
            started = time.monotonic() - t0
            t0 = time.monotonic()
            with pytest.raises(main.BackendError, match="Timeout"):
                await backend.begin("CAsilent", ["k"], 60)
            assert time.monotonic() - t0 < 1.0
        assert started < 2.0  # the start does not hang on it either
    finally:
        await asyncio.sleep(0.05)  # the backend is closed: let the server take what it accepted last, then close all
        silent.close()
        for writer in hung:
            writer.close()
        await silent.wait_closed()


def busy_script(seconds: float) -> str:
    """A script that keeps the server busy for that long (DEBUG SLEEP is off by default since Redis 7)."""
    return (
        "local t = redis.call('TIME') local t0 = t[1] * 1e6 + t[2] "
        f"repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > {int(seconds * 1e6)}"
    )


async def test_one_connection_carries_every_call_and_stays_in_step(tmp_path: Path) -> None:
    """On one server every command of the process goes out pipelined on one connection (beside the
    subscription's), however many calls are in flight; replies reach their own callers, also when some
    callers gave up while theirs were on the way."""
    with private_valkey(tmp_path) as server:
        async with opened(VALKEY_URL=server.url) as backend:
            calls = [f"CAline{n}" for n in range(300)]
            for n, call in enumerate(calls):
                assert await backend.create(call, main.Session(call_sid=call, turns=n), 60)
            waves = []
            for wave in range(3):  # each wave leaves in a flight of its own while the ones before are on the way
                waves.append([asyncio.ensure_future(backend.begin(call, [], 60)) for call in calls[wave::3]])
                await asyncio.sleep(0)
            for task in waves[0]:  # these callers give up before their replies are in
                task.cancel()
            kept = await asyncio.gather(*waves[1], *waves[2])
            assert [snap.session.turns for snap in kept] == [*range(1, 300, 3), *range(2, 300, 3)]
            raw = valkey.asyncio.Valkey.from_url(server.url)
            try:
                ours = [c for c in await raw.client_list() if c["name"] == "switchboard"]
            finally:
                await raw.aclose()
            assert len(ours) == 2 and sorted(int(c["sub"]) for c in ours) == [0, 1], ours  # the line, the subscription
            assert [c["cmd"] for c in ours if c["sub"] == "0"] in (["eval"], ["evalsha"])  # first run: NOSCRIPT, EVAL


async def test_a_slow_command_times_out_alone_in_time_and_the_next_one_dials_again(tmp_path: Path) -> None:
    """VALKEY_TIMEOUT bounds every command on the shared connection: steady traffic for several timeouts never
    trips it, a command stuck behind a busy server fails within about one timeout, and the call after that is
    answered on a new connection."""
    with private_valkey(tmp_path) as server:
        async with opened(VALKEY_URL=server.url, VALKEY_TIMEOUT="0.3") as backend:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:  # over three timeouts of commands that each take no time
                await asyncio.gather(*(backend.ping() for _ in range(5)))
                await asyncio.sleep(0.01)
            first = backend.lines[""]
            blocker = threading.Thread(target=lambda: valkey.Valkey.from_url(server.url).eval(busy_script(0.8), 0))
            blocker.start()
            await asyncio.sleep(0.05)  # the server is in its script now
            t0 = time.monotonic()
            with pytest.raises(main.BackendError, match="Timeout"):
                await backend.begin("CAslow", [], 60)
            assert 0.25 < time.monotonic() - t0 < 0.6
            blocker.join()
            assert await backend.begin("CAslow", [], 60) is not None
            assert backend.lines[""] is not first


async def test_an_outage_mid_call_is_spoken_logged_once_and_recovers_by_itself(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    model = Scripted(replies=["First answer.", "Second answer.", "Third answer."])
    with private_valkey(tmp_path) as server:
        app = valkey_app(model, server.url, "sb", VALKEY_TIMEOUT="0.5")
        async with concurrent(app) as client:
            backend: ValkeyBackend = app.state.calls.backend
            twilio = Twilio(client)
            await twilio.call()
            assert await twilio.turn("one") == ["First answer."]
            server.stop()
            down = [await twilio.say(f"while down {n}") for n in range(3)]
            health = [await client.get("/health") for _ in range(3)]
            assert [(r.status_code, tree(r.content)) for r in down] == [(200, apology())] * 3
            assert [r.status_code for r in health] == [503] * 3
            assert health[0].json()["status"] == "unavailable"
            await asyncio.sleep(0.6)  # the subscription retries meanwhile, without a log line each time
            server.start()  # same port, same data
            for _ in range(200):
                if (await client.get("/health")).status_code == 200 and backend.listening:
                    break
                await asyncio.sleep(0.05)
            assert backend.listening  # the subscription came back by itself
            third = await twilio.say("two")
            assert tree(third.content) == answer("Second answer.")
    assert [(m.role, m.content) for m in model.calls[-1]] == [
        ("user", "one"),
        ("assistant", "First answer."),
        ("user", "two"),
    ]
    failures = [line for line in logs.lines if "valkey unreachable" in line]
    assert len(failures) == 1, logs.lines  # one line for the outage, not one per request or health check
    assert "ConnectionError" in failures[0]
    assert [line.split(" down_s=")[0] for line in logs.lines if "valkey reachable again" in line] == [
        f"warning valkey reachable again server={server.url}"
    ]
    assert not [line for line in logs.lines if line.startswith(("error session backend", "warning health check"))]
    assert len([line for line in logs.lines if "error=session backend unavailable" in line]) == 3  # request lines


async def test_starting_without_valkey_serves_apologies_until_it_answers(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    model = Scripted(replies=["Hello there."])
    server = PrivateValkey(tmp_path)  # not started yet
    app = valkey_app(model, server.url, "sb", VALKEY_TIMEOUT="0.3")
    try:
        async with concurrent(app) as client:
            backend: ValkeyBackend = app.state.calls.backend
            assert (await client.get("/health")).status_code == 503
            twilio = Twilio(client)
            assert tree((await twilio.call()).content) == apology()
            server.start()
            for _ in range(200):
                if backend.listening:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/health")).status_code == 200
            await twilio.call()
            assert await twilio.turn("hi") == ["Hello there."]
    finally:
        server.stop()
    assert any(line.startswith("warning starting without valkey") for line in logs.lines)
    assert len([line for line in logs.lines if "valkey unreachable" in line]) == 1


async def test_valkey_lost_mid_reply_stops_the_generation_and_the_continuation_apologises(tmp_path: Path) -> None:
    model = Scripted(replies=["One is here. Two is here. Three is here. Four is here."], gap=0.05)
    with private_valkey(tmp_path) as server:
        app = valkey_app(model, server.url, "sb", VALKEY_TIMEOUT="0.5")
        async with concurrent(app) as client:
            twilio = Twilio(client)
            await twilio.call()
            first = await twilio.say("hello")
            generation = next(iter(app.state.modes["gather"].runs.values())).task
            server.stop()
            await asyncio.wait([generation], timeout=3)
            later = await twilio.post(redirect_of(first.content))
    assert says(first.content) == ["One is here."]
    assert generation.cancelled()  # stopped quietly when its next sentence could not be queued
    assert model.closed == 1  # and the model's stream was closed
    assert tree(later.content) == apology()


# ----------------------------------------------------------------------------- a turn taken over, in process


class Records:
    """A call recorder plugin that keeps what it is told."""

    def __init__(self) -> None:
        self.turns: list[main.TurnRecord] = []

    @main.hookimpl
    def register_call_recorders(self, register: Any) -> None:
        recorder = self

        class Kept(main.CallRecorder):
            def turn_finished(self, record: main.TurnRecord) -> None:
                recorder.turns.append(record)

            def call_finished(self, record: main.CallRecord) -> None:
                pass

        register("kept", lambda settings: Kept())


async def test_a_turn_taken_over_is_recorded_as_such_with_the_surviving_generations_usage(prefix: str) -> None:
    from calls import new_turn_id

    class Metered(Scripted):
        async def stream(self, messages: Any, *, system: str, tools: Any = ()) -> Any:
            async for event in super().stream(messages, system=system, tools=tools):
                yield event
            yield main.Usage(input_tokens=30, output_tokens=7)

    model, kept = Metered(replies=["One. Two. Three."]), Records()
    app = main.create_app(
        env(
            SESSION_BACKEND="valkey",
            VALKEY_URL=SHARED_URL,
            VALKEY_PREFIX=prefix,
            LLM_PROVIDER=model.name,
            CALL_RECORDERS="kept",
        ),
        plugins=[plugin(llm=[model]), kept],
    )
    async with running(app) as client:
        twilio, turn = Twilio(client), new_turn_id()
        session = main.Session(
            call_sid=twilio.call_sid,
            started=time.time(),
            turns=1,
            current=main.Turn(id=turn, user="count", keys=["k0"], started=time.time()),
        )
        key = f"{prefix}:{{{twilio.call_sid}}}:"
        async with valkey.asyncio.Valkey.from_url(SHARED_URL) as vk:  # what a replica that died left behind
            await vk.set(key + "s", msgspec.msgpack.encode(session), px=60_000)
            await vk.set(key + "c", turn, px=60_000)
            await vk.set(key + "g", "1", px=60_000)
            await vk.rpush(key + "v", msgspec.msgpack.encode(main.Segment(text="One.")))
        docs = await twilio.follow(await twilio.post(f"/continue?n=1&turn={turn}"))
        await twilio.post("/status", CallStatus="completed")
    assert [text for doc in docs for text in says(doc.content)] == ["Two.", "Three."]
    assert [(m.role, m.content) for m in model.calls[0]] == [("user", "count")]
    (record,) = kept.turns
    assert msgspec.structs.replace(record, started=0.0, first_token_ms=None, reply_ms=None) == main.TurnRecord(
        call_sid=twilio.call_sid,
        turn=1,
        turn_id=turn,
        started=0.0,
        speech="count",
        reply="One. Two. Three.",
        provider="scripted",
        input_tokens=30,
        output_tokens=7,
        taken_over=True,
    )


# ----------------------------------------------------------------------------- Valkey Cluster


def sid() -> str:
    return "CA" + secrets.token_hex(16)


async def one_turn(backend: ValkeyBackend, call: str, text: str) -> None:
    """begin, commit a turn's history, serve: the three round trips of an ordinary turn."""
    snap = await backend.begin(call, ["k"], 60)
    assert snap is not None
    session = snap.session or main.Session(call_sid=call)
    session.history.append(main.Message(role="user", content=text))
    assert await backend.commit(call, snap.token, session)


async def history_of(backend: ValkeyBackend, call: str) -> list[str]:
    snap = await backend.begin(call, [], 60)
    assert snap is not None and snap.session is not None
    assert await backend.unlock(call, snap.token)
    return [m.content for m in snap.session.history]


async def test_a_cluster_is_found_from_any_node_and_each_call_lives_on_its_slot_s_node(prefix: str) -> None:
    cluster = shared_cluster()
    async with opened(VALKEY_URL=f"redis://127.0.0.1:{cluster.ports[2]}/0", VALKEY_PREFIX=prefix) as backend:
        calls = [sid() for _ in range(24)]
        await asyncio.gather(*(one_turn(backend, call, f"hello {call}") for call in calls))
        assert backend.is_cluster is True
        assert [await history_of(backend, call) for call in calls] == [[f"hello {call}"] for call in calls]
    homes = set()
    for call in calls:
        key = f"{prefix}:{{{call}}}:s"
        home = cluster.owner(key)
        homes.add(home)
        with cluster.client(home) as c:
            assert c.exists(key) == 1  # on the node that holds its slot (another node would answer MOVED)
    assert len(homes) == 3  # the calls spread over the whole cluster


async def test_a_busy_node_never_holds_up_the_calls_of_the_others(prefix: str) -> None:
    cluster = shared_cluster()
    async with opened(VALKEY_URL=cluster.url, VALKEY_PREFIX=prefix) as backend:
        calls = [sid() for _ in range(40)]
        await asyncio.gather(*(one_turn(backend, call, "hi") for call in calls))  # the slot table is known
        busy_port = cluster.owner(f"{prefix}:{{{calls[0]}}}:s")
        free = next(c for c in calls if cluster.owner(f"{prefix}:{{{c}}}:s") != busy_port)
        busy = (  # 0.4 s of a node's time
            "local t = redis.call('TIME') local t0 = t[1] * 1e6 + t[2] "
            "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > 400000"
        )
        blocker = threading.Thread(target=lambda: cluster.client(busy_port).eval(busy, 0))
        blocker.start()
        await asyncio.sleep(0.05)  # the node is in its script now
        slow = asyncio.ensure_future(backend.reply(calls[0], "k"))  # both leave in the same loop iteration
        fast = asyncio.ensure_future(backend.reply(free, "k"))
        done, _ = await asyncio.wait([slow, fast], return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast} and not slow.done()  # answered while the busy node still is
        assert await slow is None and await fast is None
        blocker.join()


async def test_a_call_whose_slot_moves_mid_call_follows_ask_tryagain_and_moved(prefix: str) -> None:
    cluster = shared_cluster()
    async with opened(VALKEY_URL=cluster.url, VALKEY_PREFIX=prefix) as backend:
        call = sid()
        await one_turn(backend, call, "one")
        key = f"{prefix}:{{{call}}}:s"
        source = cluster.owner(key)
        target = next(port for port in cluster.ports if port != source)
        slot, _ = cluster.begin_moving_slot(key, target)
        try:
            # a script's keys while their slot moves, some of them absent (no lock now): TRYAGAIN until it is over
            turn = asyncio.create_task(one_turn(backend, call, "two"))
            await asyncio.sleep(0.05)
            cluster.migrate_keys(slot, source, target)  # every key moved, the slot not yet handed over
            # one key: the source answers ASK, the target (after ASKING) has the call, so a second create fails
            assert await backend.create(call, main.Session(call_sid=call), 60) is False
            await asyncio.sleep(0.05)
            assert not turn.done()
        finally:
            cluster.finish_moving_slot(slot, target)
        await turn  # the source now answers MOVED: the backend learns the new owner and the turn goes through
        assert int(backend.cluster.nodes_manager.get_node_from_slot(slot).port) == target
        await one_turn(backend, call, "three")
        assert await history_of(backend, call) == ["one", "two", "three"]


async def test_a_cluster_down_at_start_is_found_when_it_first_answers(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    from valkey_cluster import Cluster

    cluster = Cluster(tmp_path)  # its ports are chosen, nothing listens yet
    logger = logging.getLogger("switchboard")
    level = logger.level
    logger.setLevel(logging.INFO)
    async with opened(VALKEY_URL=cluster.url, VALKEY_TIMEOUT="0.3") as backend:
        with pytest.raises(main.BackendError):
            await backend.ping()
        assert backend.is_cluster is None
        try:
            cluster.start()
            call = sid()
            for _ in range(100):
                with contextlib.suppress(main.BackendError):
                    await one_turn(backend, call, "hello")
                    break
                await asyncio.sleep(0.05)
            assert backend.is_cluster is True
            assert await history_of(backend, call) == ["hello"]
            for _ in range(100):
                if backend.listening:
                    break
                await asyncio.sleep(0.05)
            assert backend.listening
        finally:
            cluster.stop()
            logger.setLevel(level)
    assert [line.split(" server=")[0] for line in logs.lines if "valkey" in line] == [
        "error valkey unreachable",  # once, not once per try
        "warning starting without valkey: /health answers 503 and callers hear an apology until it answers",
        "info valkey is a cluster",
        "warning valkey reachable again",
    ]


def test_valkey_cluster_says_yes_no_or_detect() -> None:
    def backend(value: str) -> ValkeyBackend:
        settings = env(SESSION_BACKEND="valkey", VALKEY_URL=SHARED_URL, VALKEY_CLUSTER=value)
        return ValkeyBackend(main.load_settings(settings))

    assert [backend(v).is_cluster for v in ("", "auto", "1", "0")] == [None, None, True, False]
    with pytest.raises(main.ConfigError, match="VALKEY_CLUSTER must be 1, 0 or unset"):
        backend("sometimes")


async def test_a_primary_that_dies_is_replaced_by_its_replica_and_its_calls_carry_on(tmp_path: Path) -> None:
    from valkey_cluster import valkey_cluster

    with valkey_cluster(tmp_path, replicas=True) as cluster:  # three primaries, a replica each
        async with opened(VALKEY_URL=cluster.url, VALKEY_TIMEOUT="0.5") as backend:
            # a call held by the node VALKEY_URL names, which also carries this process's subscription
            call = next(c for c in iter(sid, "") if cluster.owner(f"sb:{{{c}}}:s") == cluster.ports[0])
            await one_turn(backend, call, "one")
            replica = cluster.replicas[0]
            with cluster.client(cluster.ports[0]) as c:
                assert c.execute_command("WAIT", 1, 2000) == 1  # the replica has the turn
            cluster.procs[cluster.ports[0]].kill()
            cluster.procs[cluster.ports[0]].wait(5)
            t0, refused, snap = time.monotonic(), 0, None
            while time.monotonic() - t0 < 20:
                try:
                    snap = await backend.begin(call, [], 60)
                except main.BackendError:
                    refused += 1  # the primary is gone, its replica not yet promoted
                    await asyncio.sleep(0.1)
                    continue
                if snap is not None:
                    break
                await asyncio.sleep(0.1)  # a lease taken just before a failure runs out by itself
            assert snap is not None and snap.session is not None
            snap.session.history.append(main.Message(role="user", content="two"))
            assert await backend.commit(call, snap.token, snap.session)
            assert refused > 0 and cluster.owner(f"sb:{{{call}}}:s") == replica
            assert await history_of(backend, call) == ["one", "two"]
            for _ in range(100):  # the subscription moved to a live node
                if backend.listening:
                    break
                await asyncio.sleep(0.05)
            assert backend.listening
