#!/usr/bin/env python3
"""Media Streams bench: many concurrent media calls on one server core, with the parrot speech model.

    python bench/media.py [--calls 1,50,100] [--seconds 20] [--warmup 3]

For each count it starts a fresh agent with the Procfile's command (MODE=media, SPEECH_MODEL=parrot),
pinned to core 0; this load generator pins itself to core 1. Each call does what Twilio does: a signed
POST /voice?mode=media, a signed upgrade to the <Stream> URL, `connected` and `start`, then one 20 ms
μ-law frame every 20 ms on its own clock (a random phase), in a loop: a speech-like burst (600-1200 ms),
then quiet for the parrot's 500 ms silence wait, the answer and a 1 s pause. The agent's audio is played
in real time: each mark is echoed when the audio before it has played, a `clear` echoes the pending
marks at once.

Measured over `--seconds` once every call is open and `--warmup` seconds have passed:
- server CPU: the server's CPU time (/proc/<pid>/task/*/schedstat) as % of a core, and that per call;
- answer delay: the parrot answers when the 25th quiet frame after a burst arrives (PARROT_SILENCE_MS
  = 500), so the generator stamps that frame as it sends it and each answer message as it reads it:
  "first" is trigger sent -> the answer's first media message read, "all" the same for every media
  message of the answer. Both include the frame's way in, the server's work and the way out (and the
  generator's own reading), so each is an upper bound on either one-way delay;
- the generator's pacing: how late each frame went out against its 20 ms slot, and its own CPU.
  A count is sustained when that lateness stays within a frame (p99 <= 20 ms) and the answers came back
  whole (the burst, byte for byte);
- RSS per call: the server's RSS with every call open minus its RSS before them, divided by the calls.
Targets (issue 18): <= 0.5 % of a core per call and answer delay p99 <= 5 ms at 100 calls.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402

import pcm  # noqa: E402
from phone import free_port, speech_burst  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)
SERVER_CORE, GENERATOR_CORE = 0, 1
FRAME_S = pcm.FRAME / pcm.RATE
WAIT_FRAMES = 25  # PARROT_SILENCE_MS / 20: the quiet frame that makes the parrot answer
BURSTS = [speech_burst(ms, hz) for ms, hz in ((600, 200.0), (800, 240.0), (1000, 180.0), (1200, 260.0))]
QUIET = base64.b64encode(bytes([pcm.SILENCE]) * pcm.FRAME).decode()
SUSTAINED_LAG = 0.020  # seconds: a generator later than one frame slot (p99) no longer keeps the line's pace


class Media(msgspec.Struct):
    payload: str = ""


class Named(msgspec.Struct):
    name: str = ""


class Outbound(msgspec.Struct):
    """A message the agent sends on the media socket."""

    event: str = ""
    media: Media | None = None
    mark: Named | None = None


decode = msgspec.json.Decoder(Outbound).decode


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process so far, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def pin(core: int) -> list[str]:
    """Run on one core when taskset exists and the machine has two."""
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def start(port: int, log: Path) -> subprocess.Popen[bytes]:
    """The agent with the Procfile's command on the server core, in media mode, healthy."""
    command = (ROOT / "Procfile").read_text().split("web:", 1)[1].strip().replace("$PORT", str(port))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "MODE": "media",
        "SPEECH_MODEL": "parrot",
        "PARROT_SILENCE_MS": str(WAIT_FRAMES * 20),
        "LOG_LEVEL": "warning",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(pin(SERVER_CORE) + command.split(), cwd=ROOT, env=env, stdout=out, stderr=out)
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, in milliseconds; nan without values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] * 1000


class Call:
    """One media call as Twilio plays it: frames out on the line's clock, the answer played, marks echoed."""

    def __init__(self, ws: websockets.ClientConnection, call_sid: str, n: int) -> None:
        self.ws, self.call_sid = ws, call_sid
        self.stream = "MZ" + secrets.token_hex(16)
        self.loop = asyncio.get_running_loop()
        self.play_end = 0.0  # when the audio received so far will have played
        self.pending: dict[str, asyncio.TimerHandle] = {}  # marks waiting for their audio to play
        self.burst = BURSTS[n % len(BURSTS)]
        self.frames = [
            base64.b64encode(self.burst[i : i + pcm.FRAME]).decode() for i in range(0, len(self.burst), pcm.FRAME)
        ]
        self.trigger = 0.0  # when the quiet frame that makes the parrot answer went out
        self.first = True  # the next media message is an answer's first
        self.got = 0  # bytes of the current answer
        self.measuring = False
        self.lag: list[float] = []
        self.firsts: list[float] = []
        self.delays: list[float] = []
        self.answers = self.whole = self.clears = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "accountSid": "AC" + "0" * 32,
            "streamSid": self.stream,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": {"attempt": "1"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await self.ws.send(
            json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": self.stream})
        )
        self.tasks = [asyncio.create_task(self.talk()), asyncio.create_task(self.listen())]

    def script(self) -> list[str]:
        """One cycle: the burst, then quiet for the parrot's wait, its answer and a 1 s pause."""
        return self.frames + [QUIET] * (WAIT_FRAMES + len(self.frames) + 50)

    async def talk(self) -> None:
        cycle = self.script()
        chunk, due = 0, self.loop.time() + random.random() * FRAME_S
        position = -random.randrange(len(cycle))  # a random start of quiet, so bursts spread over the cycle
        sid = self.stream
        while True:
            await asyncio.sleep(due - self.loop.time())
            now = self.loop.time()
            if self.measuring:
                self.lag.append(now - due)
            payload = cycle[position % len(cycle)] if position >= 0 else QUIET
            if position >= 0 and position % len(cycle) == len(self.frames) + WAIT_FRAMES - 1:
                self.trigger, self.first, self.got = now, True, 0
            chunk += 1
            await self.ws.send(
                f'{{"event":"media","sequenceNumber":"{chunk + 1}","media":{{"track":"inbound","chunk":"{chunk}",'
                f'"timestamp":"{chunk * 20}","payload":"{payload}"}},"streamSid":"{sid}"}}'
            )
            position += 1
            due += FRAME_S

    async def listen(self) -> None:
        async for raw in self.ws:
            now = self.loop.time()
            message = decode(raw)
            if message.event == "media" and message.media is not None:
                size = len(base64.b64decode(message.media.payload))
                if self.measuring and self.trigger:
                    self.delays.append(now - self.trigger)
                    if self.first:
                        self.firsts.append(now - self.trigger)
                if self.first:
                    self.answers += 1
                self.first = False
                self.got += size
                if self.got == len(self.burst):  # (whole frames: the bursts are multiples of 20 ms)
                    self.whole += 1
                self.play_end = max(self.play_end, now) + size / pcm.RATE
            elif message.event == "mark" and message.mark is not None:
                name = message.mark.name
                if self.play_end <= now:
                    await self.echo(name)
                else:
                    self.pending[name] = self.loop.call_at(self.play_end, self.echo_later, name)
            elif message.event == "clear":
                self.clears += 1
                self.play_end = now
                for name, handle in list(self.pending.items()):
                    handle.cancel()
                    await self.echo(name)

    async def echo(self, name: str) -> None:
        self.pending.pop(name, None)
        await self.ws.send(
            f'{{"event":"mark","sequenceNumber":"0","streamSid":"{self.stream}","mark":{{"name":"{name}"}}}}'
        )

    def echo_later(self, name: str) -> None:
        if self.pending.pop(name, None) is not None:
            task = self.loop.create_task(self.echo(name))
            task.add_done_callback(lambda t: t.exception())  # a closed socket at the end is not news

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for handle in self.pending.values():
            handle.cancel()
        stop = {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}
        try:
            await self.ws.send(json.dumps({"event": "stop", "streamSid": self.stream, "stop": stop}))
        except websockets.ConnectionClosed:
            pass
        await self.ws.close()


async def open_call(client: httpx.AsyncClient, base: str, n: int) -> Call:
    """POST /voice?mode=media as Twilio signs it, then open the <Stream> it answers with."""
    call_sid = "CA" + secrets.token_hex(16)
    url = f"{base}/voice?mode=media"
    params = {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": call_sid,
        "From": "+15005550006",
        "To": "+15005550001",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    headers = {"X-Twilio-Signature": twilio_signature(TOKEN, url, list(params.items()))}
    answer = await client.post(url, data=params, headers=headers)
    found = re.search(r'<Stream url="([^"]+)"', answer.text)
    if answer.status_code != 200 or found is None:
        raise SystemExit(f"/voice answered {answer.status_code}: {answer.text[:300]}")
    stream_url = found.group(1)
    ws = await websockets.connect(
        stream_url, additional_headers={"X-Twilio-Signature": twilio_signature(TOKEN, stream_url, [])}, compression=None
    )
    call = Call(ws, call_sid, n)
    await call.start()
    return call


async def measure(base: str, pid: int, count: int, seconds: float, warmup: float) -> dict[str, float]:
    """Open `count` calls, let them talk, and measure the server and the generator over `seconds`."""
    async with httpx.AsyncClient(timeout=30) as client:
        warm = await open_call(client, base, 0)  # the first call's imports and caches are not a call's cost
        await asyncio.sleep(0.5)
        await warm.stop()
        await asyncio.sleep(0.5)
        rss_before = rss_kib(pid)
        calls = []
        for n in range(count):  # opened over about a second, as calls arrive
            calls.append(await open_call(client, base, n))
            await asyncio.sleep(1.0 / count)
        await asyncio.sleep(warmup)
        for call in calls:
            call.measuring = True
        cpu0, mine0, t0 = cpu_ns(pid), time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, mine1, t1 = cpu_ns(pid), time.process_time(), time.monotonic()
        for call in calls:
            call.measuring = False
        rss_during = rss_kib(pid)
        await asyncio.gather(*(call.stop() for call in calls))
    wall = t1 - t0
    server = (cpu1 - cpu0) / 1e9 / wall * 100
    lag = [x for c in calls for x in c.lag]
    answers = sum(c.answers for c in calls)
    return {
        "calls": count,
        "server_cpu": server,
        "cpu_per_call": server / count,
        "generator_cpu": (mine1 - mine0) / wall * 100,
        "first_p50": pct([x for c in calls for x in c.firsts], 50),
        "first_p99": pct([x for c in calls for x in c.firsts], 99),
        "all_p50": pct([x for c in calls for x in c.delays], 50),
        "all_p99": pct([x for c in calls for x in c.delays], 99),
        "lag_p99": pct(lag, 99),
        "lag_max": max(lag) * 1000 if lag else float("nan"),
        "answers": answers,
        "whole": sum(c.whole for c in calls),
        "clears": sum(c.clears for c in calls),
        "rss_per_call": (rss_during - rss_before) / count,
    }


def run_count(count: int, seconds: float, warmup: float, log_dir: Path) -> dict[str, float]:
    port = free_port()
    server = start(port, log_dir / f"media-{count}.log")
    try:
        return asyncio.run(measure(f"http://127.0.0.1:{port}", server.pid, count, seconds, warmup))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def sustained(r: dict[str, float]) -> bool:
    return r["lag_p99"] <= SUSTAINED_LAG * 1000 and r["answers"] > 0 and r["whole"] == r["answers"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=lambda v: [int(x) for x in v.split(",")], default=[1, 50, 100])
    parser.add_argument("--seconds", type=float, default=20.0, help="the measured window per count")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds every call talks before the window")
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {GENERATOR_CORE})
    log_dir = Path(tempfile.mkdtemp(prefix="sb-bench-media-"))
    results = []
    head = (
        f"{'calls':>5}  {'server CPU':>10}  {'per call':>8}  {'first p50':>9}  {'first p99':>9}  {'all p50':>8}  "
        f"{'all p99':>8}  {'RSS/call':>9}  {'generator':>9}  {'late p99':>8}  {'answers':>9}  sustained"
    )
    print(f"media calls against one server core (parrot), {args.seconds:.0f} s each; delays in ms")
    print(head)
    for count in args.calls:
        r = run_count(count, args.seconds, args.warmup, log_dir)
        results.append(r)
        print(
            f"{count:>5}  {r['server_cpu']:>9.1f}%  {r['cpu_per_call']:>7.2f}%  {r['first_p50']:>9.2f}  "
            f"{r['first_p99']:>9.2f}  {r['all_p50']:>8.2f}  {r['all_p99']:>8.2f}  {r['rss_per_call']:>5.0f} KiB  "
            f"{r['generator_cpu']:>8.1f}%  {r['lag_p99']:>8.2f}  {r['whole']:>4}/{r['answers']:<4}  "
            f"{'yes' if sustained(r) else 'no'}",
            flush=True,
        )
    rows = []
    for r in results:
        case = f"parrot, {r['calls']} calls, server on one core"
        at_target = r["calls"] >= 100
        rows += [
            {
                "bench": "media",
                "case": case,
                "metric": "server CPU per call",
                "value": round(r["cpu_per_call"], 3),
                "unit": "% of a core",
                "target": 0.5 if at_target else None,
            },
            {
                "bench": "media",
                "case": case,
                "metric": "answer's first frame after its trigger frame, p99",
                "value": round(r["first_p99"], 2),
                "unit": "ms",
                "target": 5 if at_target else None,
            },
            {
                "bench": "media",
                "case": case,
                "metric": "answer's frames after its trigger frame, p99",
                "value": round(r["all_p99"], 2),
                "unit": "ms",
                "target": None,
            },
            {
                "bench": "media",
                "case": case,
                "metric": "RSS per call",
                "value": round(r["rss_per_call"]),
                "unit": "KiB",
                "target": None,
            },
            {
                "bench": "media",
                "case": case,
                "metric": "load generator CPU",
                "value": round(r["generator_cpu"], 1),
                "unit": "% of a core",
                "target": None,
            },
            {
                "bench": "media",
                "case": case,
                "metric": "generator late frames, p99",
                "value": round(r["lag_p99"], 2),
                "unit": "ms",
                "target": SUSTAINED_LAG * 1000,
            },
        ]
    best = max((r["calls"] for r in results if sustained(r)), default=0)
    print(f"largest count the generator sustained: {best}")
    print("BENCH " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
