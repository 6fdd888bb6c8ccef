"""Per-request cost of the webhook hot path, in process (no sockets): what instrumentation adds.

    python bench/webhook_overhead.py [ROOT ...] [NAME=VALUE ...]
        ROOT: a checkout to load main.py from (default: this one); NAME=VALUE: env vars for create_app
        (e.g. SENTRY_DSN=http://key@127.0.0.1:9/1 to price Sentry's middleware; nothing is sent)

Each ROOT runs in its own process: N signed /voice requests (new calls), N /process-speech (a turn on
each of those calls, echo model), N /status `ringing` (the
cheapest webhook) and N /status `completed` (ends the call: records, cost, log lines), driven straight
through the ASGI app; then Gather mode alone (its voice() opens each of those calls again, then its
speech() takes a turn on each; no ASGI call, signature check, log line or metrics), to show what
the webhook wrapper costs and what a turn costs by itself; and a request's log line written straight
(observe.request_line) against the same line as a logging call. Prints the best of 5 rounds in µs per
request. Log lines go to /dev/null.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import msgspec

N, ROUNDS = 2000, 5
TOKEN = "made-up-bench-token"


async def bench(root: str) -> dict[str, float]:
    sys.path.insert(0, root)
    import main
    import webhooks

    extra = dict(a.split("=", 1) for a in os.environ.get("BENCH_ENV", "").split("\n") if a)
    app = main.create_app({"TWILIO_AUTH_TOKEN": TOKEN, **extra})
    best: dict[str, float] = {}

    def request(path: str, params: dict[str, str]) -> tuple[dict, bytes]:
        body = urlencode(params).encode()
        signature = webhooks.twilio_signature(TOKEN, "http://bench.local" + path, list(params.items()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 5000),
            "server": ("bench.local", 80),
            "headers": [
                (b"host", b"bench.local"),
                (b"content-type", b"application/x-www-form-urlencoded"),
                (b"x-twilio-signature", signature.encode()),
            ],
        }
        return scope, body

    async def drive(requests: list[tuple[dict, bytes]]) -> float:
        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200, message

        t0 = time.perf_counter()
        for scope, body in requests:

            async def receive(body: bytes = body) -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            await app(scope, receive, send)
        return (time.perf_counter() - t0) / len(requests) * 1e6

    async with app.lifespan():
        for r in range(ROUNDS):
            sids = [f"CA{r:04d}{i:028d}" for i in range(N)]
            base = {"AccountSid": "AC" + "0" * 32, "From": "+15005550006", "To": "+15005550001"}
            batches = {
                "/voice": [request("/voice", base | {"CallSid": s, "CallStatus": "ringing"}) for s in sids],
                "/process-speech": [
                    request(
                        "/process-speech",
                        base | {"CallSid": s, "SpeechResult": f"question {r} {i}", "Confidence": "0.9"},
                    )
                    for i, s in enumerate(sids)
                ],
                "/status ringing": [request("/status", base | {"CallSid": s, "CallStatus": "ringing"}) for s in sids],
                "/status completed": [
                    request("/status", base | {"CallSid": s, "CallStatus": "completed"}) for s in sids
                ],
            }
            for name, requests in batches.items():
                us = await drive(requests)
                best[name] = min(best.get(name, us), us)
            # the Gather mode alone, without the ASGI call, signature check, log line or metrics
            forms = [
                msgspec.convert(dict(webhooks.parse_form(body)), main.TwilioForm, strict=False)
                for _, body in batches["/process-speech"]
            ]
            if hasattr(app.state, "modes"):
                gather = app.state.modes["gather"]
                voice = functools.partial(gather.voice, query={})
            else:  # a checkout from before the layered core (its Engine), for a side-by-side run
                gather = app.state.engine
                voice = gather.voice
            for name, call in (("mode only: Gather voice", voice), ("mode only: Gather speech", gather.speech)):
                t0 = time.perf_counter()
                for form in forms:
                    await call(form, "http://bench.local")
                us = (time.perf_counter() - t0) / len(forms) * 1e6
                best[name] = min(best.get(name, us), us)
        # a request's one log line: written straight by observe.request_line, or as a logging call
        import observe

        fields = {"route": "/process-speech", "status": 200, "call": sids[0], "turn": 3, "provider": "echo", "ms": 0.42}
        for name, line in (
            ("request line: written straight", lambda: observe.request_line(dict(fields))),
            ("request line: through logging", lambda: main.log.info("request", extra=dict(fields))),
        ):
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                for _ in range(N):
                    line()
                us = (time.perf_counter() - t0) / N * 1e6
                best[name] = min(best.get(name, us), us)
    return best


def main_() -> None:
    if os.environ.get("BENCH_CHILD"):
        result = asyncio.run(bench(os.environ["BENCH_CHILD"]))
        print(" ".join(f"{k.replace(' ', '_')}={v:.1f}" for k, v in result.items()))
        return
    roots = [a for a in sys.argv[1:] if "=" not in a] or [str(Path(__file__).resolve().parent.parent)]
    extra = "\n".join(a for a in sys.argv[1:] if "=" in a)
    print(f"µs per request, best of {ROUNDS} rounds of {N} (in process, logs to /dev/null)")
    rows = []
    for root in roots:
        out = subprocess.run(
            [sys.executable, __file__],
            env={**os.environ, "BENCH_CHILD": root, "BENCH_ENV": extra},
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"{root}: {out.stdout.strip()}")
        label = "" if len(roots) == 1 else f"{root}: "
        rows += [
            {
                "bench": "webhook overhead",
                "case": label + name.replace("_", " "),
                "metric": "in process, per request",
                "value": float(us),
                "unit": "µs",
                "target": None,
            }
            for name, us in (pair.split("=") for pair in out.stdout.split())
        ]
    print("BENCH " + json.dumps(rows))


if __name__ == "__main__":
    main_()
