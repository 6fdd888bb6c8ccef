#!/usr/bin/env python3
"""Soak: replicas on one Valkey, callers in parallel, one replica SIGKILLed and restarted every few seconds.

Everything runs on loopback: three agent processes (the Procfile command, SESSION_BACKEND=valkey on the
shared server under a fresh prefix), a fake OpenAI-compatible model (tests/fake_llm.py) answering each
turn in about 100 ms with three sentences that quote the caller, and a tiny load balancer in this
process that sends each request to a random live replica and re-sends a request whose connection broke
to another one (what a platform's edge does, and Twilio with a retry override on the webhook URL).

Each caller calls, says a few things with a short pause between turns (following every <Redirect>), and
hangs up, again and again. A turn is answered by the model when the caller heard exactly the model's
three sentences; lost when it heard anything else (the apology, a missing sentence); cross-talk when
it heard another caller's words or the model was sent another call's history. The slowest answer is a
webhook's time from its first attempt to its answer. Lease renewals and takeovers come from each
replica's /metrics (scraped every second), as does the longest event-loop stall a lease renewal saw.

    python bench/soak.py [--seconds 60] [--callers 40] [--kill-every 3] [--max-turns 20000] [--hogs 0]

--hogs N adds N busy-looping processes, to see how long the event loops stall on an overloaded machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_llm import FakeLLM, FakeRequest, Reply  # noqa: E402

import phone  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "soak-" + secrets.token_hex(8)
FILLER = "One moment."
WORDS = re.compile(r"c\d+x\d+")  # the marker every caller's words carry: caller and turn
METRICS = ("switchboard_lease_renewals_total", "switchboard_turns_taken_over_total", "switchboard_leases_lost_total")


def answer_to(heard: str) -> str:
    """What the fake model says to the caller's last words: three sentences that quote them."""
    return f"First, you said {heard}. Second, about {heard}. Third, that was {heard}."


def model_reply(request: FakeRequest) -> Reply:
    heard = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
    return Reply(answer_to(heard), ttft=0.08, gap=0.002)


@dataclass
class Replica:
    """One agent process on a fixed port, restarted on the same port after each kill."""

    index: int
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.incarnation += 1
        self.proc = phone.start_local(self.port, TOKEN, self.env, self.log.with_suffix(f".{self.incarnation}.log"))


@dataclass
class Stats:
    turns: int = 0
    answered: int = 0
    lost: int = 0
    crosstalk: int = 0
    server_errors: int = 0
    resent: int = 0
    kills: int = 0
    slowest: float = 0.0
    slowest_turn: float = 0.0
    lost_examples: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)  # requests no replica answered within Twilio's 15 s
    restart_failures: list[str] = field(default_factory=list)
    metrics: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)  # (replica, incarnation)
    lag: dict[tuple[int, int], float] = field(default_factory=dict)


class Balancer:
    """Sends each request to a random live replica; re-sends one whose connection broke to another."""

    def __init__(self, replicas: list[Replica], stats: Stats, public: str) -> None:
        self.replicas, self.stats, self.public = replicas, stats, public
        self.alive = set(range(len(replicas)))
        self.clients = [self._client() for _ in replicas]

    @staticmethod
    def _client() -> httpx.AsyncClient:
        # idle connections are dropped before uvicorn's keep-alive timeout (5 s) closes them under a request
        limits = httpx.Limits(max_connections=200, keepalive_expiry=2.0)
        return httpx.AsyncClient(timeout=15, limits=limits)

    def down(self, index: int) -> None:
        """A replica died: its pooled connections are dead too (requests on them break and are re-sent)."""
        self.alive.discard(index)
        old, self.clients[index] = self.clients[index], self._client()
        asyncio.get_running_loop().create_task(old.aclose())

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def post(self, path: str, params: dict[str, str]) -> tuple[bytes, float]:
        """The answer to a signed webhook and the seconds from its first attempt."""
        body = urlencode(params)
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": twilio_signature(TOKEN, self.public + path, list(params.items())),
        }
        t0, tried = time.monotonic(), 0
        while True:
            live = sorted(self.alive) or list(range(len(self.replicas)))
            replica = self.replicas[random.choice(live)]
            try:
                r = await self.clients[replica.index].post(replica.url + path, content=body, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                tried += 1
                self.stats.resent += 1
                if time.monotonic() - t0 > 15:  # Twilio gives up too: the caller hears its error message
                    self.stats.gave_up.append(f"{path}: {type(e).__name__} after {tried} attempts")
                    return b"<Response/>", time.monotonic() - t0
                await asyncio.sleep(0.01 if tried < 3 else 0.1)
                continue
            if r.status_code >= 500:
                self.stats.server_errors += 1
            return r.content, time.monotonic() - t0


def spoken(doc: bytes) -> tuple[list[str], str | None]:
    root = ET.fromstring(doc)
    redirect = root.find("Redirect")
    return [el.text or "" for el in root.iter("Say")], None if redirect is None else (redirect.text or "")


async def caller(n: int, lb: Balancer, stats: Stats, stop: float, max_turns: int) -> None:
    rng = random.Random(n)
    while time.monotonic() < stop and stats.turns < max_turns:
        sid = "CA" + secrets.token_hex(16)
        params = {
            "AccountSid": "AC" + "0" * 32,
            "CallSid": sid,
            "From": "+15005550006",
            "To": "+15005550001",
            "Direction": "inbound",
            "CallStatus": "in-progress",
        }
        await lb.post("/voice", params | {"CallStatus": "ringing"})
        for turn in range(rng.randint(3, 8)):
            if time.monotonic() > stop or stats.turns >= max_turns:
                break
            words = f"c{n}x{stats.turns} turn {turn}"
            stats.turns += 1
            t0 = time.monotonic()
            doc, took = await lb.post("/process-speech", params | {"SpeechResult": words, "Confidence": "0.9"})
            stats.slowest = max(stats.slowest, took)
            heard, url = spoken(doc)
            while url:
                doc, took = await lb.post(url, params)
                stats.slowest = max(stats.slowest, took)
                more, url = spoken(doc)
                heard += more
            stats.slowest_turn = max(stats.slowest_turn, time.monotonic() - t0)
            said = " ".join(heard)
            if set(WORDS.findall(said)) - {words.split()[0]}:
                stats.crosstalk += 1
            if said.removeprefix(FILLER + " ") == answer_to(words):  # a filler first is a slow model, not a loss
                stats.answered += 1
            else:
                stats.lost += 1
                if len(stats.lost_examples) < 5:
                    stats.lost_examples.append(f"{words!r} -> {said!r}")
            await asyncio.sleep(rng.uniform(0.1, 0.4))
        await lb.post("/status", params | {"CallStatus": "completed"})


async def warm_up(lb: Balancer, replicas: list[Replica]) -> None:
    """One model turn on each replica before the soak, so its vendor SDK is loaded."""
    for replica in replicas:
        lb.alive = {replica.index}
        params = {
            "AccountSid": "AC" + "0" * 32,
            "CallSid": "CA" + secrets.token_hex(16),
            "From": "+15005550006",
            "To": "+15005550001",
            "Direction": "inbound",
            "CallStatus": "in-progress",
        }
        await lb.post("/voice", params | {"CallStatus": "ringing"})
        await lb.post("/process-speech", params | {"SpeechResult": "warming up", "Confidence": "0.9"})
    lb.alive = {r.index for r in replicas}


async def killer(replicas: list[Replica], lb: Balancer, stats: Stats, stop: float, every: float) -> None:
    """SIGKILL a random live replica every `every` seconds and start it again on the same port."""
    rng = random.Random(7)
    restarts: set[asyncio.Task[None]] = set()
    next_kill = time.monotonic() + every
    while time.monotonic() + 0.5 < stop:
        await asyncio.sleep(max(0.0, min(next_kill, stop) - time.monotonic()))
        if time.monotonic() < next_kill:
            continue
        next_kill += every
        if not lb.alive:
            continue
        victim = replicas[rng.choice(sorted(lb.alive))]
        await scrape(victim, stats)  # its counters up to now (what it renews in its last second is lost)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        lb.down(victim.index)
        stats.kills += 1

        async def restart(replica: Replica = victim) -> None:
            while True:
                try:
                    await asyncio.to_thread(replica.start)
                    break
                except BaseException as e:  # phone.start_local says why with SystemExit
                    stats.restart_failures.append(str(e)[-300:])
            lb.alive.add(replica.index)

        task = asyncio.create_task(restart())
        restarts.add(task)
        task.add_done_callback(restarts.discard)
    await asyncio.gather(*restarts)


async def scrape(replica: Replica, stats: Stats) -> None:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            text = (await http.get(replica.url + "/metrics")).text
    except httpx.HTTPError:
        return
    got = {name: float(m.group(1)) for name in METRICS if (m := re.search(rf"^{name} (\S+)$", text, re.M))}
    stats.metrics[replica.index, replica.incarnation] = got
    if m := re.search(r"^switchboard_event_loop_lag_max_seconds (\S+)$", text, re.M):
        stats.lag[replica.index, replica.incarnation] = float(m.group(1))


async def scraper(replicas: list[Replica], lb: Balancer, stats: Stats, stop: float) -> None:
    while time.monotonic() < stop:
        await asyncio.gather(*(scrape(r, stats) for r in replicas if r.index in lb.alive))
        await asyncio.sleep(1.0)


def crosstalk_in_histories(histories: list[list[dict[str, Any]]]) -> int:
    """Model requests whose history mixes calls' words."""
    bad = 0
    for messages in histories:
        marks = {m.split("x")[0] for msg in messages for m in WORDS.findall(str(msg.get("content", "")))}
        bad += len(marks) > 1
    return bad


def serve_model() -> int:
    """The fake model in its own process: print its URL, serve until SIGINT, then print every history sent."""
    with FakeLLM() as fake:
        fake.default = model_reply  # type: ignore[assignment]  (a callable item: the reply quotes the caller)
        print(fake.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
        for request in fake.posts:
            print(json.dumps(request.messages))
    return 0


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "soak-" + secrets.token_hex(4)
    stats = Stats()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    model = subprocess.Popen([sys.executable, __file__, "--serve-model"], stdout=subprocess.PIPE, text=True)
    assert model.stdout is not None
    model_url = model.stdout.readline().strip()  # its own process: this one's event loop is busy with callers
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.log_dir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        public = "http://soak.invalid"
        env = {
            "SESSION_BACKEND": "valkey",
            "VALKEY_URL": args.valkey_url,
            "VALKEY_PREFIX": prefix,
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": model_url + "/v1",
            "OPENAI_API_KEY": "made-up-openai-key",
            "TOOLS": "none",
            "PUBLIC_URL": public,
            "LOG_LEVEL": "WARNING",
        }
        replicas = [Replica(i, phone.free_port(), env, Path(tmp) / f"replica{i}") for i in range(args.replicas)]
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
        lb = Balancer(replicas, stats, public)
        await warm_up(lb, replicas)
        t0 = time.monotonic()
        stop = t0 + args.seconds
        try:
            await asyncio.gather(
                *(caller(n, lb, stats, stop, args.max_turns) for n in range(args.callers)),
                killer(replicas, lb, stats, stop, args.kill_every),
                scraper(replicas, lb, stats, stop),
            )
            await asyncio.gather(*(scrape(r, stats) for r in replicas))
        finally:
            await lb.aclose()
            for r in replicas:
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.terminate()
            for r in replicas:
                if r.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        r.proc.wait(20)
            for hog in hogs:
                hog.kill()
            model.stdin = None
            model.send_signal(signal.SIGINT)  # it prints the histories it was sent, as JSON lines, and exits
            requests = [json.loads(line) for line in model.communicate(timeout=60)[0].splitlines() if line]
        took = time.monotonic() - t0
        logs = [p.read_text(errors="replace") for p in Path(tmp).glob("replica*.log")]
        tracebacks = sum(text.count("Traceback") for text in logs)
        lines = Counter(
            re.sub(r"\S+=\S+", "", line.split(" ", 2)[-1])[:90]
            for text in logs
            for line in text.splitlines()
            if line.startswith(("warning", "error"))
        )
        if args.show_logs:
            for text in logs:
                print("\n".join(line for line in text.splitlines() if line.startswith(("warning", "error"))))
        history_crosstalk = crosstalk_in_histories(requests)
    import valkey

    with valkey.Valkey.from_url(args.valkey_url) as client:  # leave the shared server as we found it
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.unlink(key)
    totals = Counter[str]()
    for got in stats.metrics.values():
        totals.update(got)
    return {
        "stats": stats,
        "seconds": took,
        "renewals": totals[METRICS[0]],
        "takeovers": totals[METRICS[1]],
        "lost_leases": totals[METRICS[2]],
        "lag": max(stats.lag.values(), default=0.0),
        "tracebacks": tracebacks,
        "history_crosstalk": history_crosstalk,
        "log_lines": lines,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--callers", type=int, default=40)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--max-turns", type=int, default=20000)
    parser.add_argument("--hogs", type=int, default=0, help="busy-looping processes competing for the CPUs")
    parser.add_argument("--log-dir", default="", help="keep the replicas' logs there")
    parser.add_argument("--show-logs", action="store_true", help="print the replicas' warnings and errors")
    parser.add_argument("--valkey-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--serve-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_model:
        return serve_model()
    got = asyncio.run(soak(args))
    s: Stats = got["stats"]
    per_turn = got["renewals"] / s.turns if s.turns else 0.0
    print(
        f"soak: {args.replicas} replicas, {args.callers} callers, a kill every {args.kill_every:g} s, "
        f"{got['seconds']:.0f} s, {args.hogs} CPU hogs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"turns {s.turns}  answered by the model {s.answered}  lost {s.lost}  cross-talk {s.crosstalk} "
        f"(histories {got['history_crosstalk']})  5xx {s.server_errors}"
    )
    print(
        f"slowest answer {s.slowest:.2f} s from the first attempt (slowest whole turn {s.slowest_turn:.2f} s)  "
        f"kills {s.kills}  re-sent requests {s.resent}"
    )
    print(
        f"lease renewals {got['renewals']:.0f} ({per_turn:.3f} per turn)  turns taken over {got['takeovers']:.0f}  "
        f"leases lost {got['lost_leases']:.0f}  longest event-loop stall at a renewal {got['lag'] * 1000:.0f} ms  "
        f"tracebacks in replica logs {got['tracebacks']}"
    )
    for example in s.lost_examples:
        print("  lost:", example)
    for example in s.gave_up[:5] + s.restart_failures[:3]:
        print("  failed:", example)
    print(
        "event-loop stall at a renewal, per replica process (ms; started with the soak / restarted):",
        sorted(round(v * 1000) for k, v in s.lag.items() if k[1] == 1),
        "/",
        sorted(round(v * 1000) for k, v in s.lag.items() if k[1] > 1),
    )
    for line, count in got["log_lines"].most_common(8):
        print(f"  replica log: {count} x {line}")
    case = f"{args.replicas} replicas, {args.callers} callers, kill every {args.kill_every:g} s"
    rows = [
        ("turns", s.turns, "", None),
        ("turns answered by the model", s.answered, "", None),
        ("lost turns", s.lost, "", "<= 0"),
        ("cross-talk", s.crosstalk + got["history_crosstalk"], "", "<= 0"),
        ("5xx responses", s.server_errors, "", "<= 0"),
        ("slowest answer from the first attempt", round(s.slowest, 2), "s", "< 10"),
        ("kills", s.kills, "", f">= {max(1, int(got['seconds'] / args.kill_every) - 1)}"),
        ("lease renewals per turn", round(per_turn, 3), "", None),
        ("turns taken over", got["takeovers"], "", None),
        ("longest event-loop stall at a lease renewal", round(got["lag"] * 1000, 1), "ms", None),
    ]
    print(
        "BENCH "
        + json.dumps(
            [{"bench": "soak", "case": case, "metric": m, "value": v, "unit": u, "target": t} for m, v, u, t in rows]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
