"""ConversationRelay bench: token latency through the socket, and memory per open relay session.

    python bench/relay.py [--sessions 500] [--tokens 200] [--gap 0.02] [--streams 1,50]

It starts the agent with the Procfile's command (a real uvicorn process) and a model plugin that
stamps every token with time.monotonic_ns() as it yields it (CLOCK_MONOTONIC is system-wide on Linux,
so a client process on the same machine can compare). Clients speak Twilio's side of the protocol
over real sockets (signed upgrade, setup, prompt) and stamp each message on receipt.

1. latency: model emits a token -> the token is read by the client, per token, with 1 and with N
   concurrent streams whose tokens tick at random phases, and with all streams ticking in lockstep
   (the worst case: every stream's token due in the same millisecond). The client's own receive path
   is included, so these are upper bounds. Server CPU per token is measured from /proc.
2. memory: RSS of a fresh server process with `--sessions` relay sessions open (each set up and
   having answered one turn of 20 tokens), minus its RSS before, divided by the number of sessions.
   The clients offer permessage-deflate like most; the Procfile's server declines it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import websockets  # noqa: E402

import phone  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)

CLOCK = '''
import asyncio, itertools, time
from main import LLMProvider, hookimpl

class Clock(LLMProvider):
    """Yields CLOCK_TOKENS word-sized tokens (" w<seq>") CLOCK_GAP seconds apart; logs when each was yielded."""
    name = "clock"
    def __init__(self, settings):
        self.n, self.gap = int(settings.get("CLOCK_TOKENS", "200")), float(settings.get("CLOCK_GAP", "0.02"))
        self.log, self.seq = settings.get("CLOCK_LOG"), itertools.count()
    async def stream(self, messages, *, system, tools=()):
        stamps = []
        try:
            for _ in range(self.n):
                seq = next(self.seq)
                stamps.append(f"{seq} {time.monotonic_ns()}")
                yield f" w{seq}"
                await asyncio.sleep(self.gap)
        finally:
            if self.log:
                with open(self.log, "a") as f:
                    f.write("\\n".join(stamps) + "\\n")

@hookimpl
def register_llm_providers(register):
    register("clock", Clock)
'''


def plugin_dir() -> Path:
    """A directory with the clock model as an entry-point plugin (put on the server's PYTHONPATH)."""
    root = Path(tempfile.mkdtemp(prefix="sb-bench-"))
    (root / "sb_clock.py").write_text(CLOCK)
    dist = root / "sb_clock-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-clock\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nclock = sb_clock\n")
    return root


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def setup(call_sid: str) -> str:
    return json.dumps(
        {
            "type": "setup",
            "sessionId": "VX" + secrets.token_hex(16),
            "accountSid": "AC" + "0" * 32,
            "parentCallSid": "",
            "callSid": call_sid,
            "from": "+15005550006",
            "to": "+15005550001",
            "forwardedFrom": "",
            "callType": "PSTN",
            "callerName": "",
            "direction": "inbound",
            "callStatus": "RINGING",
            "customParameters": {"attempt": "1"},
        }
    )


SEQ = re.compile(r"w(\d+)")
PROMPT = json.dumps({"type": "prompt", "voicePrompt": "go", "lang": "en-US", "last": True})


async def open_session(url: str, compression: str | None = "deflate") -> websockets.ClientConnection:
    ws = await websockets.connect(
        url,
        additional_headers={"X-Twilio-Signature": twilio_signature(TOKEN, url, [])},
        compression=compression,
        max_queue=None,
    )
    await ws.send(setup("CA" + secrets.token_hex(16)))
    return ws


async def one_turn(ws: websockets.ClientConnection, seen: dict[int, int] | None = None, delay: float = 0.0) -> int:
    """Send a prompt and read the reply to its last token; note when each token arrived (ns)."""
    await asyncio.sleep(delay)
    await ws.send(PROMPT)
    tokens = 0
    while True:
        raw = await ws.recv()
        now = time.monotonic_ns()
        message = json.loads(raw)
        for seq in SEQ.findall(message.get("token", "")):
            tokens += 1
            if seen is not None:
                seen[int(seq)] = now
        if message.get("last"):
            return tokens


async def in_process(streams: int, tokens: int, gap: float, rounds: int) -> list[int]:
    """Model yields a token -> the app hands it to the ASGI server (send), in this process: the app's share."""
    import main

    stamps: dict[int, int] = {}
    sent: dict[int, int] = {}
    counter = iter(range(10**9))

    class Clock(main.LLMProvider):
        name = "clock"

        async def stream(self, messages, *, system, tools=()):  # type: ignore[no-untyped-def]
            for _ in range(tokens):
                seq = next(counter)
                stamps[seq] = time.monotonic_ns()
                yield f" w{seq}"
                await asyncio.sleep(gap)

    class Plugin:
        @main.hookimpl
        def register_llm_providers(self, register):  # type: ignore[no-untyped-def]
            register("clock", lambda settings: Clock())

    app = main.create_app(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "LLM_PROVIDER": "clock",
            "MODE": "relay",
            "LOG_LEVEL": "WARNING",
            "MAX_REPLY_CHARS": "100000",
        },
        plugins=[Plugin()],
    )
    url = "ws://bench.local/relay"

    async def session() -> None:
        inbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        done = asyncio.Event()

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "websocket.send":
                now = time.monotonic_ns()
                text = str(message["text"])
                for seq in SEQ.findall(text):
                    sent[int(seq)] = now
                if '"last":true' in text:
                    done.set()

        scope = {
            "type": "websocket",
            "scheme": "ws",
            "path": "/relay",
            "raw_path": b"/relay",
            "query_string": b"",
            "headers": [(b"host", b"bench.local"), (b"x-twilio-signature", twilio_signature(TOKEN, url, []).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("bench.local", 80),
            "root_path": "",
            "subprotocols": [],
            "asgi": {"version": "3.0"},
            "state": {},
            "extensions": {},
        }
        await inbox.put({"type": "websocket.connect"})
        await inbox.put({"type": "websocket.receive", "text": setup("CA" + secrets.token_hex(16))})
        task = asyncio.create_task(app(scope, inbox.get, send))  # type: ignore[arg-type]
        for _ in range(rounds):
            await asyncio.sleep(random.uniform(0, gap))
            done.clear()
            await inbox.put({"type": "websocket.receive", "text": PROMPT})
            await done.wait()
        await inbox.put({"type": "websocket.disconnect", "code": 1000})
        await task

    async with app.lifespan():
        await asyncio.gather(*(session() for _ in range(streams)))
    return [sent[seq] - stamps[seq] for seq in sent]


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def latency(url: str, streams: int, rounds: int, gap: float, log: Path, lockstep: bool) -> list[int]:
    """Per-token delays (ns): streams start their turns at random offsets within one token gap, or together."""
    log.write_text("")
    sockets = [await open_session(url) for _ in range(streams)]
    seen: dict[int, int] = {}
    for _ in range(rounds):
        await asyncio.gather(*(one_turn(ws, seen, 0.0 if lockstep else random.uniform(0, gap)) for ws in sockets))
    for ws in sockets:
        await ws.close()
    await asyncio.sleep(0.2)
    emitted = dict(map(int, line.split()) for line in log.read_text().splitlines() if line)
    return [seen[seq] - emitted[seq] for seq in seen]


async def memory(url: str, pid: int, sessions: int, compression: str | None) -> tuple[float, float, float]:
    """RSS (KiB) before, with `sessions` open relay sessions, and after they close."""
    warm = await open_session(url, compression)
    await one_turn(warm)
    await warm.close()
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    sockets = []
    for i in range(0, sessions, 50):
        batch = await asyncio.gather(*(open_session(url, compression) for _ in range(min(50, sessions - i))))
        await asyncio.gather(*(one_turn(ws) for ws in batch))
        sockets += batch
    await asyncio.sleep(0.5)
    during = rss_kib(pid)
    for ws in sockets:
        await ws.close()
    await asyncio.sleep(1.0)
    return before, during, rss_kib(pid)


async def run(args: argparse.Namespace) -> None:
    stamps = Path(tempfile.mkdtemp(prefix="sb-bench-")) / "stamps"
    env = {
        "PYTHONPATH": str(plugin_dir()),
        "LLM_PROVIDER": "clock",
        "MODE": "relay",
        "LOG_LEVEL": "WARNING",
        "CLOCK_TOKENS": str(args.tokens),
        "CLOCK_GAP": str(args.gap),
        "MAX_REPLY_CHARS": "100000",
        "CLOCK_LOG": str(stamps),
    }
    log = Path(tempfile.gettempdir()) / "sb-bench-relay.log"
    port = phone.free_port()
    server = phone.start_local(port, TOKEN, env, log)
    url = f"ws://127.0.0.1:{port}/relay"
    rows: list[dict[str, object]] = []  # for bench/run; the target is issue 7's: token delay <= 5 ms at p99
    try:
        print(
            f"model: {args.tokens} tokens per reply, {args.gap * 1000:.0f} ms apart; {args.rounds} replies per stream"
        )
        print("\nin process: model yields a token -> the app hands it to the ASGI server (ms)")
        print(f"{'streams':>12} {'tokens':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
        for streams in args.streams:
            delays = await in_process(streams, args.tokens, args.gap, args.rounds)
            print(
                f"{streams:>12} {len(delays):>8} {pct(delays, 0.5):7.3f} {pct(delays, 0.9):7.3f} "
                f"{pct(delays, 0.99):7.3f} {max(delays) / 1e6:7.3f}"
            )
            rows.append(
                {
                    "bench": "relay",
                    "case": f"in process, {streams} streams",
                    "metric": "token delay p99",
                    "value": round(pct(delays, 0.99), 3),
                    "unit": "ms",
                    "target": None,
                }
            )
        print(f"\nreal sockets: the Procfile command (pid {server.pid}); model emits a token -> client reads it (ms)")
        print(f"{'streams':>12} {'tokens':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  server CPU/token")
        runs = [(n, False) for n in args.streams] + [(max(args.streams), True)]
        for streams, lockstep in runs:
            cpu = cpu_seconds(server.pid)
            delays = await latency(url, streams, args.rounds, args.gap, stamps, lockstep)
            per_token = (cpu_seconds(server.pid) - cpu) / len(delays) * 1e6
            label = f"{streams}{' lockstep' if lockstep else ''}"
            print(
                f"{label:>12} {len(delays):>8} {pct(delays, 0.5):7.3f} {pct(delays, 0.9):7.3f} "
                f"{pct(delays, 0.99):7.3f} {max(delays) / 1e6:7.3f}  {per_token:.0f} µs"
            )
            rows.append(
                {
                    "bench": "relay",
                    "case": f"real sockets, {label} streams",
                    "metric": "token delay p99",
                    "value": round(pct(delays, 0.99), 3),
                    "unit": "ms",
                    "target": None if lockstep else "<= 5",
                }
            )
        server.terminate()
        server.wait(15)
        port = phone.free_port()
        server = phone.start_local(port, TOKEN, env | {"CLOCK_TOKENS": "20", "CLOCK_GAP": "0"}, log)
        url = f"ws://127.0.0.1:{port}/relay"
        before, during, after = await memory(url, server.pid, args.sessions, "deflate")
        per = (during - before) / args.sessions
        print(f"\nmemory of a fresh server process (pid {server.pid}) with {args.sessions} relay sessions open")
        print(
            f"  RSS before {before / 1024:.1f} MiB, with sessions {during / 1024:.1f} MiB, "
            f"after they closed {after / 1024:.1f} MiB"
        )
        print(f"  per open session: {per:.1f} KiB")
        rows.append(
            {
                "bench": "relay",
                "case": f"{args.sessions} open relay sessions",
                "metric": "RSS per open session",
                "value": round(per, 1),
                "unit": "KiB",
                "target": None,
            }
        )
        print("BENCH " + json.dumps(rows))
    finally:
        server.terminate()
        server.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between the model's tokens")
    parser.add_argument("--rounds", type=int, default=3, help="turns per stream")
    parser.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")], default=[1, 50])
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
