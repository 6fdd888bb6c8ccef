#!/usr/bin/env python3
"""Memory: RSS of a started agent (default plugins), and what 10,000 idle calls add to it.

    python bench/memory.py [--calls 10000] [--concurrency 16]

It starts the agent with the Procfile's command (a real uvicorn process; echo model, <Say> voice,
memory sessions, log recorder, tools) and reads VmRSS from /proc/<pid>/status:
1. idle: after startup and a short warm-up call (the first requests fill a few caches), settled;
2. after `--calls` calls, each created with a signed POST /voice and left idle (Twilio's status
   callback never comes, so the memory backend keeps them until SESSION_TTL);
3. after one turn on each of those calls (POST /process-speech: a caller turn and the echo model's
   reply stored in history, plus the stored reply Twilio's retries would get).
Targets: idle <= 80 MiB; 10,000 idle calls add <= 50 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import phone  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)
IDLE_TARGET, CALLS_TARGET = 80, 50  # MiB


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settled(pid: int, seconds: float = 1.0) -> float:
    """RSS once the process has been quiet for a moment."""
    time.sleep(seconds)
    return rss_mib(pid)


async def drive(base: str, requests: list[tuple[str, dict[str, str]]], concurrency: int) -> None:
    """Send signed form POSTs like Twilio, `concurrency` at a time; every answer must be 200 TwiML."""
    queue = list(reversed(requests))
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def worker() -> None:
            while queue:
                path, params = queue.pop()
                signature = twilio_signature(TOKEN, base + path, list(params.items()))
                r = await http.post(
                    path,
                    content=urlencode(params),
                    headers={"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": signature},
                )
                if r.status_code != 200 or b"<Response>" not in r.content:
                    raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def call_params(sid: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": sid,
        "From": "+15005550006",
        "To": "+15005550001",
        "Direction": "inbound",
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    port = phone.free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"sb-bench-memory-{port}.log"
    server = phone.start_local(port, TOKEN, {"PUBLIC_URL": base, "LOG_LEVEL": "WARNING"}, log)
    try:
        started = settled(server.pid)
        warm = "CA" + secrets.token_hex(16)
        asyncio.run(
            drive(
                base,
                [
                    ("/voice", call_params(warm, CallStatus="ringing")),
                    ("/process-speech", call_params(warm, SpeechResult="warming up", Confidence="0.9")),
                    ("/status", call_params(warm, CallStatus="completed")),
                ],
                1,
            )
        )
        idle = settled(server.pid)
        sids = [f"CA{secrets.token_hex(4)}{i:024x}" for i in range(args.calls)]
        t0 = time.perf_counter()
        asyncio.run(drive(base, [("/voice", call_params(s, CallStatus="ringing")) for s in sids], args.concurrency))
        created = time.perf_counter() - t0
        calls = settled(server.pid)
        asyncio.run(
            drive(
                base,
                [
                    (
                        "/process-speech",
                        call_params(
                            s,
                            CallStatus="in-progress",
                            Confidence="0.92",
                            SpeechResult=f"What are your opening hours on day {i}?",
                        ),
                    )
                    for i, s in enumerate(sids)
                ],
                args.concurrency,
            )
        )
        turned = settled(server.pid)
    finally:
        server.terminate()
        server.wait(15)
    n = args.calls
    print(f"agent process (Procfile command, default plugins), VmRSS in MiB; {n} calls made in {created:.1f} s\n")
    print(f"{'':44}{'RSS MiB':>9}{'added MiB':>11}{'per call':>11}")
    print(f"{'started':44}{started:9.1f}")
    print(f"{'idle (after one warm-up call)':44}{idle:9.1f}{'':11}{'':11}  target <= {IDLE_TARGET} MiB")
    print(
        f"{f'{n} idle calls (POST /voice each)':44}{calls:9.1f}{calls - idle:11.1f}"
        f"{(calls - idle) * 1024 * 1024 / n:9.0f} B  target <= {CALLS_TARGET} MiB added"
    )
    print(
        f"{'... then one turn on each (/process-speech)':44}{turned:9.1f}{turned - idle:11.1f}"
        f"{(turned - idle) * 1024 * 1024 / n:9.0f} B"
    )
    scale = 10_000 / n  # the target is stated for 10,000 calls
    rows = [
        {
            "bench": "memory",
            "case": "idle, default plugins",
            "metric": "RSS",
            "value": round(idle, 1),
            "unit": "MiB",
            "target": f"<= {IDLE_TARGET}",
        },
        {
            "bench": "memory",
            "case": "10,000 idle Gather calls",
            "metric": "RSS added",
            "unit": "MiB",
            "value": round((calls - idle) * scale, 1),
            "target": f"<= {CALLS_TARGET}",
        },
        {
            "bench": "memory",
            "case": "10,000 Gather calls, one turn each",
            "metric": "RSS added",
            "unit": "MiB",
            "value": round((turned - idle) * scale, 1),
            "target": None,
        },
    ]
    print("BENCH " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
