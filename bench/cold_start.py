#!/usr/bin/env python3
"""Cold start: milliseconds from spawning the agent (the Procfile command) to its first signed /voice answer.

    python bench/cold_start.py [--runs 5] [--only NAME,...]

For every plugin of every kind (LLM providers, voices, session backends, call recorders, tools), plus
relay mode, Sentry and everything at once, it spawns a fresh server process per run and polls a signed
POST /voice until it answers 200. Vendors are local fakes (tests/fake_llm.py, tests/fake_tts.py), so
nothing leaves the machine; Valkey and PostgreSQL are the real local servers (a unique key prefix, a
database of its own, dropped afterwards). Then it sends the first caller turn at once and reports when
that answer came back (for the LLM SDKs, that wait includes the SDK still loading in the background).
It also prints each SDK's import time in a fresh interpreter, and, for comparison, anthropic with its
SDK imported before the app starts (what importing it in the factory would cost).
Target: first /voice <= 1000 ms with any plugin selected (the median of the runs; the max is shown).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_llm import FakeLLM, Reply  # noqa: E402
from fake_tts import KEY, fake_tts  # noqa: E402

import phone  # noqa: E402

TOKEN = "bench-made-up-token"
TARGET_MS = 1000
VALKEY_URL = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def import_ms(module: str) -> float:
    """Import time of a module in a fresh interpreter (after the app's own imports, as in the server)."""
    code = (
        f"import time, litestar, msgspec, pluggy; t = time.perf_counter(); import {module}; "
        "print((time.perf_counter() - t) * 1000)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def one_run(env: dict[str, str]) -> tuple[float, float | None]:
    """Spawn the server; return (ms to the first /voice 200, ms to the first turn's answer, if Gather mode)."""
    port = phone.free_port()
    command = (ROOT / "Procfile").read_text().split("web:", 1)[1].strip().replace("$PORT", str(port))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {
        **os.environ,
        "PATH": path,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TRUSTED_PROXIES": "127.0.0.1",
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "LOG_LEVEL": "WARNING",
        **env,
    }
    caller = phone.Phone(f"http://127.0.0.1:{port}", TOKEN, out=lambda line: None)
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    server = subprocess.Popen(shlex.split(command), cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                first = caller.post("/voice")
                if first.status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    log.seek(0)
                    raise SystemExit(
                        f"the server exited with {server.returncode}:\n{log.read().decode()[-3000:]}"
                    ) from None
                time.sleep(0.002)
        voice = (time.perf_counter() - t0) * 1000
        if b"<Response>" not in first.content:
            raise SystemExit(f"unexpected /voice answer: {first.text}")
        if b"<Connect" in first.content:  # relay mode: the socket takes it from here
            return voice, None
        caller.params["CallStatus"] = "in-progress"
        answer = caller.post("/process-speech", {"SpeechResult": "hello", "Confidence": "0.9"})
        turn = (time.perf_counter() - t0) * 1000
        if answer.status_code != 200 or b"<Response>" not in answer.content:
            raise SystemExit(f"unexpected first answer: {answer.status_code} {answer.text}")
        apologies = b"trouble answering" in answer.content
        if apologies:
            raise SystemExit(f"the first turn was an apology: {answer.text}")
        return voice, turn
    finally:
        caller.http.close()
        server.terminate()
        server.wait(15)
        log.close()


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A database of our own on the shared PostgreSQL server, dropped afterwards."""
    import psycopg

    name = "sb_bench_" + secrets.token_hex(6)
    with psycopg.connect(POSTGRES + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(POSTGRES + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def delete_keys(prefix: str) -> None:
    import valkey

    with valkey.Valkey.from_url(VALKEY_URL) as client:  # leave the shared server as we found it
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.unlink(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--only", default="", help="run only the cases whose names contain one of these |-separated words"
    )
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} runs each (median [min-max])\n")
    for module in ("openai", "anthropic", "valkey.asyncio", "psycopg_pool", "sentry_sdk"):
        times = [import_ms(module) for _ in range(3)]
        print(f"import {module:<15} {statistics.median(times):7.0f} ms  (fresh interpreter, median of 3)")
    print()
    eager = Path(tempfile.mkdtemp())  # for comparison: the SDK imported at startup, as a factory import would
    (eager / "sitecustomize.py").write_text("import anthropic\n")
    prefix = "sbbench" + secrets.token_hex(4)
    with FakeLLM() as fake, fake_tts("openai") as openai_tts, fake_tts("elevenlabs") as eleven, database() as db:
        fake.default = Reply("Hello from the fake model.")
        valkey = {"SESSION_BACKEND": "valkey", "VALKEY_URL": VALKEY_URL, "VALKEY_PREFIX": prefix}
        postgres = {"CALL_RECORDERS": "postgres", "DATABASE_URL": db}
        sentry = {"SENTRY_DSN": "http://made-up-key@127.0.0.1:9/1"}  # nothing is sent: no error happens
        voices = {
            "openai": {"TTS_VOICE": "openai", "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": openai_tts.url + "/v1"},
            "elevenlabs": {"TTS_VOICE": "elevenlabs", "ELEVENLABS_API_KEY": KEY, "ELEVENLABS_BASE_URL": eleven.url},
        }
        cases: dict[str, dict[str, str]] = {
            "defaults (echo, say, memory, log, tools)": {},
            "llm=openai": {"LLM_PROVIDER": "openai", **fake.env("openai")},
            "llm=anthropic": {"LLM_PROVIDER": "anthropic", **fake.env("anthropic")},
            "llm=openai,anthropic": {"LLM_PROVIDER": "openai,anthropic", **fake.env("openai"), **fake.env("anthropic")},
            "tts=openai": voices["openai"],
            "tts=elevenlabs": voices["elevenlabs"],
            "session=valkey": valkey,
            "recorders=postgres": postgres,
            "recorders=log,postgres": {**postgres, "CALL_RECORDERS": "log,postgres"},
            "recorders=none": {"CALL_RECORDERS": "none"},
            "tools=none": {"TOOLS": "none"},
            "tools=end_call,transfer_call +number": {"TRANSFER_NUMBER": "+15551234567"},
            "mode=relay": {"MODE": "relay"},
            "SENTRY_DSN set": sentry,
            "all: anthropic,elevenlabs,valkey,postgres,sentry": {
                "LLM_PROVIDER": "anthropic",
                **fake.env("anthropic"),
                **voices["elevenlabs"],
                **valkey,
                **postgres,
                **sentry,
                "TRANSFER_NUMBER": "+15551234567",
            },
        }
        cases["(anthropic imported eagerly)"] = {**cases["llm=anthropic"], "PYTHONPATH": str(eager)}
        if args.only:
            cases = {name: env for name, env in cases.items() if any(part in name for part in args.only.split("|"))}
        results: dict[str, list[tuple[float, float | None]]] = {name: [] for name in cases}
        try:
            for _ in range(args.runs):  # interleaved, so a noisy moment on the machine hits every case alike
                for name, env in cases.items():
                    results[name].append(one_run(env))
        finally:
            delete_keys(prefix)
    rows = []
    print(f"{'case':<50}{'spawn -> first /voice 200':>30}{'spawn -> first turn answered':>32}")
    for name, runs in results.items():
        voice = [r[0] for r in runs]
        turns = [r[1] for r in runs if r[1] is not None]
        turn = (
            f"{statistics.median(turns):>15.0f} ms [{min(turns):.0f}-{max(turns):.0f}]"
            if turns
            else f"{'(relay: socket)':>27}"
        )
        verdict = "" if name.startswith("(") else ("  ok" if statistics.median(voice) <= TARGET_MS else "  OVER")
        print(f"{name:<50}{statistics.median(voice):>15.0f} ms [{min(voice):.0f}-{max(voice):.0f}]{turn}{verdict}")
        if not name.startswith("("):
            rows.append(
                {
                    "bench": "cold start",
                    "case": name,
                    "metric": "spawn to first /voice (median)",
                    "value": round(statistics.median(voice)),
                    "unit": "ms",
                    "target": f"<= {TARGET_MS}",
                }
            )
    print(f"\ntarget: first /voice <= {TARGET_MS} ms (median of {args.runs}); the first turn is not part of the target")
    print("BENCH " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
