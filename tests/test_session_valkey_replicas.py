"""Real replicas: two server processes (the Procfile's command) share one Valkey, as on Railway, or one
Valkey Cluster (each replica's VALKEY_URL names a different node).

What the model receives is observed through a real plugin: an entry-point package `sb_recorder`
(on PYTHONPATH for the servers) whose model appends every request it gets to a JSON-lines file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import valkey
from conftest import (
    BASE,
    GATHER,
    VALKEY_PREFIX,
    Twilio,
    new_call_sid,
    redirect_of,
    says,
    server,
    shared_cluster,
    tree,
    twiml,
)
from test_session_valkey import SHARED_URL, private_valkey

RECORDER = '''
"""A test model that records every request it gets, so tests see what the model receives."""
import asyncio, json, os
from main import LLMProvider, hookimpl

class Recorder(LLMProvider):
    name = "recorder"

    def __init__(self, settings):
        self.path = settings.require("RECORDER_FILE", "the recorder test model")

    async def stream(self, messages, *, system, tools=()):
        line = {"pid": os.getpid(), "messages": [[m.role, m.content, m.interrupted] for m in messages]}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (json.dumps(line) + "\\n").encode())
        finally:
            os.close(fd)
        heard = messages[-1].content
        if heard.startswith("slow"):  # a slow first token, so duplicates overlap the generation
            await asyncio.sleep(0.4)
        count = 4 if heard.startswith("long") else 1
        for n in range(1, count + 1):
            yield f"Reply {n} to {heard}. "
            if count > 1:
                await asyncio.sleep(0.3)

@hookimpl
def register_llm_providers(register):
    register("recorder", Recorder)
'''


def recorder_package(directory: Path) -> Path:
    """A directory to put on PYTHONPATH: the module and its dist-info with a `switchboard` entry point."""
    (directory / "sb_recorder.py").write_text(textwrap.dedent(RECORDER))
    dist = directory / "sb_recorder-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-recorder\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nrecorder = sb_recorder\n")
    return directory


def records(path: Path, token: str) -> list[dict[str, Any]]:
    """Every model request whose last caller turn mentions token, in the order they were made."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if token in r["messages"][-1][1]]


def history(*turns: str, interrupted: tuple[str, ...] = ()) -> list[list[Any]]:
    """The messages the model should receive for the last of `turns`, given every earlier one was answered."""
    out: list[list[Any]] = []
    for text in turns[:-1]:
        said = f"Reply 1 to {text}."
        out += [["user", text, False], ["assistant", said, text in interrupted]]
    return [*out, ["user", turns[-1], False]]


def reply(text: str, n: int = 1) -> str:
    return f"Reply {n} to {text}."


def apology() -> tuple[Any, ...]:
    return twiml(lambda r: r.gather(**GATHER).say("Sorry, I'm having trouble answering right now."))


class Replicas:
    """Two agent processes on one Valkey, with a signed client for each."""

    def __init__(self, urls: list[str], procs: list[Any], logs: list[Path], recorded: Path) -> None:
        self.urls, self.procs, self.logs, self.recorded = urls, procs, logs, recorded
        self.clients: list[httpx.AsyncClient] = []

    def phones(self, call_sid: str | None = None) -> list[Twilio]:
        """One Twilio stand-in per replica, all for the same call."""
        sid = call_sid or new_call_sid()
        return [Twilio(client, call_sid=sid) for client in self.clients]

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Replicas]:
        """HTTP clients for this test's event loop."""
        self.clients = [
            httpx.AsyncClient(base_url=u, timeout=30, limits=httpx.Limits(max_connections=200)) for u in self.urls
        ]
        try:
            yield self
        finally:
            for client in self.clients:
                await client.aclose()


@contextlib.contextmanager
def start_replicas(
    directory: Path, valkey_url: str | list[str], prefix: str, count: int = 2, **extra: str
) -> Iterator[Replicas]:
    """`count` replicas on one Valkey; given several URLs (a cluster's nodes), replica i uses URL i (round robin)."""
    urls = [valkey_url] if isinstance(valkey_url, str) else valkey_url
    package = directory / "plugin"
    if not package.exists():
        package.mkdir()
        recorder_package(package)
    recorded = directory / "model-requests.jsonl"
    environ = {
        "SESSION_BACKEND": "valkey",
        "VALKEY_PREFIX": prefix,
        "LLM_PROVIDER": "recorder",
        "RECORDER_FILE": str(recorded),
        "PYTHONPATH": str(package),
        "PUBLIC_URL": BASE,
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(server({**environ, "VALKEY_URL": urls[i % len(urls)]})) for i in range(count)]
        yield Replicas([u for u, _, _ in started], [p for _, p, _ in started], [g for _, _, g in started], recorded)


@pytest.fixture(scope="module")
def shared_prefix() -> Iterator[str]:
    name = f"{VALKEY_PREFIX}-{secrets.token_hex(4)}"
    yield name
    with valkey.Valkey.from_url(SHARED_URL) as client:
        for key in client.scan_iter(match=f"{name}:*", count=1000):
            client.delete(key)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, shared_prefix: str) -> Iterator[Replicas]:
    """Two replicas on the shared Valkey for this module's ordinary tests (started once)."""
    with start_replicas(tmp_path_factory.mktemp("replicas"), SHARED_URL, shared_prefix) as replicas:
        yield replicas


def cluster_nodes() -> list[str]:
    """The URL of every node of the run's cluster."""
    return [f"redis://127.0.0.1:{port}/0" for port in shared_cluster().ports]


@pytest.fixture(scope="module")
def cluster_pair(tmp_path_factory: pytest.TempPathFactory, shared_prefix: str) -> Iterator[Replicas]:
    """Two replicas on the run's Valkey Cluster, each told a different node."""
    with start_replicas(tmp_path_factory.mktemp("cluster"), cluster_nodes(), shared_prefix) as replicas:
        yield replicas


@pytest.fixture(params=["valkey", "cluster"])
def replicas(request: pytest.FixtureRequest) -> Replicas:
    """Two replicas, on one Valkey server or on a three-node cluster."""
    return request.getfixturevalue("pair" if request.param == "valkey" else "cluster_pair")  # type: ignore[no-any-return]


async def follow(phones: list[Twilio], first: httpx.Response) -> list[httpx.Response]:
    """Follow <Redirect>s, alternating between the replicas, from the one after the first's."""
    docs = [first]
    while (url := redirect_of(docs[-1].content)) is not None:
        docs.append(await phones[len(docs) % 2].post(url))
    return docs


def spoken(docs: list[httpx.Response]) -> list[str]:
    return [text for doc in docs for text in says(doc.content)]


async def test_a_call_alternating_between_replicas_keeps_its_whole_history(replicas: Any) -> None:
    async with replicas.connected():
        phones = replicas.phones()
        token = secrets.token_hex(4)
        await phones[0].call()
        turns = [f"alt{token} turn {n}" for n in range(6)]
        for n, text in enumerate(turns):
            assert await phones[n % 2].turn(text) == [reply(text)]
    seen = records(replicas.recorded, f"alt{token}")
    assert [r["messages"] for r in seen] == [history(*turns[: n + 1]) for n in range(6)]
    assert [r["pid"] for r in seen] == [p.pid for p in replicas.procs] * 3


async def test_a_long_reply_continues_on_the_other_replica(replicas: Any) -> None:
    async with replicas.connected():
        phones = replicas.phones()
        await phones[0].call()
        text = f"long{secrets.token_hex(4)}"
        docs = await follow(phones, await phones[0].say(text))
    assert spoken(docs) == [reply(text, n) for n in range(1, 5)]
    assert len(docs) >= 3  # the rest came through /continue, from both replicas
    assert tree(docs[-1].content)[3][-1][0] == "Gather"  # the last part listens


async def test_the_same_webhook_sent_to_both_replicas_is_answered_once_identically(replicas: Any) -> None:
    async with replicas.connected():
        a, b = replicas.phones()
        await a.call()
        text = f"slow dup{secrets.token_hex(4)}"
        first, second = await asyncio.gather(a.say(text), b.say(text))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert says(first.content) == [reply(text)]
    assert len(records(replicas.recorded, text)) == 1


async def test_two_hundred_concurrent_calls_keep_their_histories_apart(pair: Any) -> None:
    token = secrets.token_hex(3)

    async def one_call(i: int, replicas: Replicas) -> list[str]:
        phones, pick = replicas.phones(), random.Random(i)
        await phones[pick.randrange(2)].call()
        spoken = []
        for n in range(5):
            spoken += await phones[pick.randrange(2)].turn(f"c{i}x{token} turn {n}")
        return spoken

    async with pair.connected() as replicas:
        t0 = time.monotonic()
        spoken = await asyncio.gather(*(one_call(i, replicas) for i in range(200)))
        took = time.monotonic() - t0
    for i, said in enumerate(spoken):
        assert said == [reply(f"c{i}x{token} turn {n}") for n in range(5)]
    for i in range(200):
        seen = records(replicas.recorded, f"c{i}x{token} ")
        turns = [f"c{i}x{token} turn {n}" for n in range(5)]
        assert [r["messages"] for r in seen] == [history(*turns[: n + 1]) for n in range(5)], i
    by_pid = {p.pid: 0 for p in replicas.procs}
    for r in records(replicas.recorded, f"x{token} "):
        by_pid[r["pid"]] += 1
    assert min(by_pid.values()) > 300, by_pid  # both replicas did their share
    assert took < 60


async def test_worker_processes_of_one_server_share_the_calls_too(tmp_path: Path, shared_prefix: str) -> None:
    token = secrets.token_hex(4)
    with start_replicas(tmp_path, SHARED_URL, shared_prefix, WEB_CONCURRENCY="2") as replicas:
        async with replicas.connected():
            calls = [replicas.phones()[0] for _ in range(8)]
            await asyncio.gather(*(phone.call() for phone in calls))
            for n in range(4):
                said = await asyncio.gather(*(p.turn(f"wc{token} {i} turn {n}") for i, p in enumerate(calls)))
                assert said == [[reply(f"wc{token} {i} turn {n}")] for i in range(8)]
    for i in range(8):
        turns = [f"wc{token} {i} turn {n}" for n in range(4)]
        assert [r["messages"] for r in records(replicas.recorded, f"wc{token} {i} ")] == [
            history(*turns[: n + 1]) for n in range(4)
        ]


async def test_a_replica_killed_mid_call_loses_no_turn(tmp_path: Path, shared_prefix: str) -> None:
    token = secrets.token_hex(4)
    with start_replicas(tmp_path, SHARED_URL, shared_prefix) as replicas:
        async with replicas.connected():
            a, b = replicas.phones()
            await a.call()
            t1, t2, t3, t4 = (f"kill{token} one", f"long kill{token} two", f"kill{token} three", f"kill{token} four")
            assert await a.turn(t1) == [reply(t1)]
            first = await a.say(t2)  # the first sentence leaves; the rest is still being generated...
            assert says(first.content) == [reply(t2)]
            replicas.procs[0].send_signal(signal.SIGKILL)  # ...when replica A dies
            replicas.procs[0].wait(5)
            assert await b.turn(t3) == [reply(t3)]
            assert await b.turn(t4) == [reply(t4)]
    seen = records(replicas.recorded, f"kill{token}")
    assert [r["messages"] for r in seen] == [
        history(t1),
        history(t1, t2),
        history(t1, t2, t3, interrupted=(t2,)),
        history(t1, t2, t3, t4, interrupted=(t2,)),
    ]


async def test_valkey_stopped_and_restarted_mid_call_means_an_apology_then_recovery(tmp_path: Path) -> None:
    (tmp_path / "valkey").mkdir()
    with (
        private_valkey(tmp_path / "valkey") as vk,
        start_replicas(tmp_path, vk.url, "sb", VALKEY_TIMEOUT="0.5") as replicas,
    ):
        async with replicas.connected():
            a, b = replicas.phones()
            await a.call()
            token = secrets.token_hex(4)
            t1, t2, t3, t4 = (f"vk{token} one", f"vk{token} two", f"vk{token} three", f"long vk{token} four")
            assert await a.turn(t1) == [reply(t1)]
            vk.stop()
            t0 = time.monotonic()
            down = await b.say(t2)
            assert time.monotonic() - t0 < 2.0
            assert (down.status_code, tree(down.content)) == (200, apology())
            assert [(await c.get("/health")).status_code for c in replicas.clients] == [503, 503]
            await asyncio.sleep(1.0)  # both replicas keep retrying their subscription meanwhile
            vk.start()
            for _ in range(100):
                codes = [(await c.get("/health")).status_code for c in replicas.clients]
                if codes == [200, 200]:
                    break
                await asyncio.sleep(0.1)
            assert codes == [200, 200]
            assert await a.turn(t3) == [reply(t3)]
            await asyncio.sleep(0.3)
            docs = await follow([b, a], await b.say(t4))  # continuations alternate: pub/sub wakes them again
            assert spoken(docs) == [reply(t4, n) for n in range(1, 5)]
    seen = records(replicas.recorded, f"vk{token}")
    assert [r["messages"] for r in seen] == [history(t1), history(t1, t3), history(t1, t3, t4)]
    for log in replicas.logs:
        lines = log.read_text().splitlines()
        assert len([x for x in lines if "valkey unreachable" in x]) == 1, lines
        assert len([x for x in lines if "valkey reachable again" in x]) == 1, lines
        assert not [x for x in lines if "Traceback" in x or "never retrieved" in x], lines


# ----------------------------------------------------------------------------- replicas dying mid-turn


@pytest.mark.parametrize("where", ["valkey", "cluster"])
async def test_a_replica_killed_while_generating_is_replaced_and_the_turn_answered_whole(
    tmp_path: Path, shared_prefix: str, where: str
) -> None:
    token = secrets.token_hex(4)
    urls = SHARED_URL if where == "valkey" else cluster_nodes()
    with start_replicas(tmp_path, urls, shared_prefix, count=3) as replicas:
        async with replicas.connected():
            a, b, c = replicas.phones()
            await a.call()
            t1, t2, t3 = f"tk{token} one", f"long tk{token} two", f"tk{token} three"
            assert await a.turn(t1) == [reply(t1)]
            t0 = time.monotonic()
            first = await a.say(t2)  # the first sentence leaves; the rest is still being generated...
            replicas.procs[0].send_signal(signal.SIGKILL)  # ...when replica A dies
            replicas.procs[0].wait(5)
            docs = await follow([c, b], first)  # Twilio's /continue reaches the other replicas
            took = time.monotonic() - t0
            assert await c.turn(t3) == [reply(t3)]
    assert spoken(docs) == [reply(t2, n) for n in range(1, 5)]
    assert took < 10
    seen = records(replicas.recorded, f"tk{token}")
    pids = [p.pid for p in replicas.procs]
    assert [r["messages"] for r in seen] == [
        history(t1),
        history(t1, t2),
        history(t1, t2),
        [
            *history(t1, t2)[:-1],
            ["user", t2, False],
            ["assistant", " ".join(reply(t2, n) for n in range(1, 5)), False],
            ["user", t3, False],
        ],
    ]
    assert seen[1]["pid"] == pids[0] and seen[2]["pid"] in pids[1:]  # asked again by the replica taking over


async def test_a_retried_webhook_whose_replica_died_before_answering_is_answered_by_another(
    tmp_path: Path, shared_prefix: str
) -> None:
    token = secrets.token_hex(4)
    with start_replicas(tmp_path, SHARED_URL, shared_prefix) as replicas:
        async with replicas.connected():
            a, b = replicas.phones()
            await a.call()
            text = f"slow rt{token}"
            t0 = time.monotonic()
            attempt = asyncio.create_task(a.say(text))  # the model takes 0.4 s to its first token...
            await asyncio.sleep(0.2)
            replicas.procs[0].send_signal(signal.SIGKILL)  # ...and replica A dies before answering
            with pytest.raises(httpx.TransportError):
                await attempt
            retried = await b.say(text)  # Twilio retries (a #rc= override on the URL) on the other replica
            took = time.monotonic() - t0
            docs = await follow([b, b], retried)
    assert (retried.status_code, spoken(docs)) == (200, [reply(text)])
    assert took < 10
    assert [(r["messages"], r["pid"]) for r in records(replicas.recorded, text)] == [
        (history(text), replicas.procs[0].pid),
        (history(text), replicas.procs[1].pid),
    ]


def leave_a_dead_generation(prefix: str, call: str, turn: str, user: str, served: list[Any]) -> None:
    """Write into Valkey what a replica leaves when it dies generating `turn`: its lease will run out."""
    import main

    session = main.Session(
        call_sid=call,
        started=time.time(),
        turns=1,
        current=main.Turn(id=turn, user=user, keys=["k0"], started=time.time()),
    )
    key = f"{prefix}:{{{call}}}:"
    with valkey.Valkey.from_url(SHARED_URL) as vk:
        vk.set(key + "s", msgspec.msgpack.encode(session), px=60_000)
        vk.set(key + "c", turn, px=60_000)
        vk.set(key + "g", "1", px=60_000)
        vk.set(key + "h", "1", px=300)  # the dead holder renewed it last just before it died
        vk.rpush(key + "v", *[msgspec.msgpack.encode(seg) for seg in served])
        vk.pexpire(key + "v", 60_000)


async def test_a_lease_left_behind_by_a_dead_process_is_taken_over(pair: Any, shared_prefix: str) -> None:
    import main
    from calls import new_turn_id

    async with pair.connected() as replicas:
        phone = replicas.phones()[1]
        text, turn = f"long dl{secrets.token_hex(4)}", new_turn_id()
        leave_a_dead_generation(shared_prefix, phone.call_sid, turn, text, [main.Segment(text=reply(text))])
        t0 = time.monotonic()
        docs = await follow([phone, phone], await phone.post(f"/continue?n=1&turn={turn}"))
        took = time.monotonic() - t0
        after = await phone.turn(f"then {text}")
    assert spoken(docs) == [reply(text, n) for n in range(2, 5)]  # Twilio had the first sentence already
    assert took < 5
    assert after == [reply(f"then {text}")]
    seen = records(replicas.recorded, text)
    assert [r["messages"] for r in seen] == [
        [["user", text, False]],
        [
            ["user", text, False],
            ["assistant", " ".join(reply(text, n) for n in range(1, 5)), False],
            ["user", f"then {text}", False],
        ],
    ]


async def test_a_stalled_holder_cannot_write_after_its_turn_was_taken_over(tmp_path: Path, shared_prefix: str) -> None:
    token = secrets.token_hex(4)
    with start_replicas(tmp_path, SHARED_URL, shared_prefix) as replicas:
        async with replicas.connected():
            a, b = replicas.phones()
            await a.call()
            text = f"long st{token}"
            first = await a.say(text)
            replicas.procs[0].send_signal(signal.SIGSTOP)  # A stalls mid-reply, alive
            try:
                docs = await follow([b, b], first)  # B takes the turn over once A's lease runs out
            finally:
                replicas.procs[0].send_signal(signal.SIGCONT)  # A wakes up and carries on where it stopped
            await asyncio.sleep(1.5)  # its late pushes and its renewal reach the backend (and are refused)
            key = f"{shared_prefix}:{{{a.call_sid}}}:"
            with valkey.Valkey.from_url(SHARED_URL) as vk:
                served = [msgspec.msgpack.decode(raw) for raw in vk.lrange(key + "v", 0, -1)]
                queued = vk.llen(key + "q")
            after = await b.turn(f"st{token} next")
    assert spoken(docs) == [reply(text, n) for n in range(1, 5)]
    assert after == [reply(f"st{token} next")]
    seen = records(replicas.recorded, f"st{token}")
    assert seen[-1]["messages"] == [
        ["user", text, False],
        ["assistant", " ".join(reply(text, n) for n in range(1, 5)), False],
        ["user", f"st{token} next", False],
    ]  # nothing of A's after the takeover
    # what Twilio got: A's first sentence, then only the new generation's (A's own later ones were refused)
    assert [(seg.get("kind", "speech"), seg.get("text", ""), seg.get("taken_over", False)) for seg in served] == [
        ("speech", reply(text, 1), False),
        *[("speech", reply(text, n), True) for n in range(2, 5)],
        ("end", "", True),
    ]
    assert queued == 0
