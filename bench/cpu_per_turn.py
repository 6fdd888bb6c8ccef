#!/usr/bin/env python3
"""CPU per caller turn: the server process's own CPU time per turn, echo against the real model plugins.

For each history length (MAX_TURNS=10, the default, and 40) and each provider (echo, openai, anthropic)
it starts the agent with the Procfile's command, pinned to one core when there are two (this process
and the fake vendor take the other), against the fake OpenAI/Anthropic server (tests/fake_llm.py)
streaming a ten-chunk reply with no delays. 8 concurrent calls first take enough turns to fill the
history, then --turns more each; the server's CPU time over those turns (every thread's, read from
/proc/<pid>/task/*/schedstat in nanoseconds) divided by their number is the row. Target: each real
provider at most 3x echo's CPU per turn at the same history length.

    python bench/cpu_per_turn.py [--calls 8] [--turns 25] [--providers echo,openai,anthropic] [--max-turns 10,40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_llm import FakeLLM, Reply  # noqa: E402  (from the paths just added)

from phone import free_port, start_local  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)
REPLY = Reply("We are open from nine until five on weekdays, thanks.")  # ten word tokens
HEARD = {"echo": "You said", "openai": "weekdays", "anthropic": "weekdays"}  # proof that the model answered
TARGET = 3.0  # a real provider's CPU per turn, at most this many times echo's


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process so far, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended between listing and reading
            pass
    return total


def pin(pid: int, core: int) -> bool:
    """Pin every thread of a process to one core (threads it starts later inherit it); False if impossible."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        return False
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {core})
    return True


class Caller:
    """One call's Twilio side: signed webhooks, following <Redirect>s until the agent listens again."""

    def __init__(self, client: httpx.AsyncClient, base: str) -> None:
        self.client, self.base = client, base
        self.params = {
            "AccountSid": "AC" + "0" * 32,
            "CallSid": "CA" + secrets.token_hex(16),
            "From": "+15005550006",
            "To": "+15005550001",
            "Direction": "inbound",
            "CallStatus": "in-progress",
        }

    async def post(self, path: str, **params: str) -> bytes:
        data = self.params | params
        signature = twilio_signature(TOKEN, self.base + path, list(data.items()))
        r = await self.client.post(self.base + path, data=data, headers={"X-Twilio-Signature": signature})
        if r.status_code != 200:
            raise SystemExit(f"{path}: HTTP {r.status_code} {r.text[:200]}")
        return r.content

    async def turn(self, text: str) -> str:
        """Say something; return everything the agent spoke in reply."""
        doc = await self.post("/process-speech", SpeechResult=text, Confidence="0.9")
        spoken = []
        while True:
            root = ET.fromstring(doc)
            spoken += [el.text or "" for el in root.iter("Say")]
            redirect = root.find("Redirect")
            if redirect is None:
                return " ".join(spoken)
            doc = await self.post(redirect.text or "")


async def calls(base: str, n: int, fill: int, turns: int, pid: int, heard: str) -> float:
    """n concurrent calls: `fill` turns each to fill the history, then `turns` measured ones; ms of CPU per turn."""
    async with httpx.AsyncClient(timeout=30) as client:
        callers = [Caller(client, base) for _ in range(n)]
        await asyncio.gather(*(c.post("/voice", CallStatus="ringing") for c in callers))

        async def talk(c: Caller, count: int, offset: int) -> None:
            for i in range(count):
                said = await c.turn(f"question number {offset + i} about the opening hours")
                if heard not in said:
                    raise SystemExit(f"the model did not answer: {said!r}")

        await asyncio.gather(*(talk(c, fill, 0) for c in callers))
        before = cpu_ns(pid)
        await asyncio.gather(*(talk(c, turns, fill) for c in callers))
        return (cpu_ns(pid) - before) / (n * turns) / 1e6


def measure(provider: str, max_turns: int, args: argparse.Namespace, fake: FakeLLM, log: Path) -> float:
    """Start a server for one provider and history length; return its CPU per measured turn (ms)."""
    env = {"LLM_PROVIDER": provider, "MAX_TURNS": str(max_turns), "LOG_LEVEL": "WARNING"}
    if provider != "echo":
        env |= fake.env(provider)
    port = free_port()
    server = start_local(port, TOKEN, env, log)
    try:
        pin(server.pid, 0)
        posts = len(fake.posts)
        fill = max_turns + 2  # the history holds the last MAX_TURNS turns: full after this many
        per_turn = asyncio.run(
            calls(f"http://127.0.0.1:{port}", args.calls, fill, args.turns, server.pid, HEARD[provider])
        )
        if provider != "echo" and len(fake.posts) - posts != args.calls * (fill + args.turns):
            raise SystemExit(f"{provider}: expected one model request per turn, got {len(fake.posts) - posts}")
        return per_turn
    except SystemExit:
        print(f"{provider}, MAX_TURNS={max_turns}: the server's log ends:\n" + log.read_text()[-3000:], flush=True)
        raise
    finally:
        server.terminate()
        server.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--turns", type=int, default=25, help="measured turns per call, after the history is full")
    parser.add_argument("--providers", default="echo,openai,anthropic")
    parser.add_argument("--max-turns", default="10,40", help="comma list of MAX_TURNS (history lengths)")
    args = parser.parse_args()
    providers = args.providers.split(",")
    lengths = [int(n) for n in args.max_turns.split(",")]
    results: dict[tuple[str, int], float] = {}
    pinned = pin(os.getpid(), 1)  # the client and the fake vendor (its thread starts below) on the other core
    with FakeLLM() as fake, tempfile.TemporaryDirectory() as tmp:
        fake.default = REPLY
        for max_turns in lengths:
            for provider in providers:
                results[provider, max_turns] = measure(provider, max_turns, args, fake, Path(tmp) / "server.log")
                print(f"{provider:10} MAX_TURNS={max_turns:<3} {results[provider, max_turns]:7.3f} ms/turn", flush=True)
    print(
        f"\nserver CPU per caller turn: {args.calls} calls, {args.turns} measured turns each after the history is "
        f"full, a ten-chunk reply with no delays, server on {'one core' if pinned else 'any core'}\n"
    )
    print(f"{'provider':10} " + " ".join(f"{f'MAX_TURNS={n}':>14} {'x echo':>7}" for n in lengths))
    rows = []
    for provider in providers:
        cells = []
        for n in lengths:
            value, echo = results[provider, n], results.get(("echo", n))
            ratio = value / echo if echo else None
            cells.append(f"{value:11.3f} ms {'' if ratio is None else f'{ratio:6.1f}x':>7}")
            case = f"{provider}, MAX_TURNS={n}, {args.calls} calls"
            rows.append(
                {
                    "bench": "cpu_per_turn",
                    "case": case,
                    "metric": "server CPU per turn",
                    "value": round(value, 3),
                    "unit": "ms",
                    "target": None,
                }
            )
            if ratio is not None and provider != "echo":
                rows.append(
                    {
                        "bench": "cpu_per_turn",
                        "case": case,
                        "metric": "CPU per turn, times echo's",
                        "value": round(ratio, 2),
                        "unit": "x",
                        "target": f"<= {TARGET:g}",
                    }
                )
        print(f"{provider:10} " + " ".join(cells))
    print("BENCH " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
