#!/usr/bin/env python3
"""Time to first audio: from /process-speech arriving to the first <Say> leaving, streamed vs whole reply.

Two real server processes (the Procfile's command) ask the fake OpenAI server (tests/fake_llm.py) whose
model has a fixed time to first token and token rate: one streams replies (the default), one waits
for the whole reply (STREAM_REPLIES=0), in the same run. For a short answer (one sentence) and a long
one (six), it prints the time to the first document and what the model schedule allows: the moment
the first sentence has been written (its last token). Target: first audio <= TTFT + time to the
first sentence + 20 ms.

    python bench/first_audio.py [--ttft 0.3] [--gap 0.01] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_llm import FakeLLM, Reply  # noqa: E402

from phone import free_port, start_local  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)
SHORT = "We are open from nine in the morning until five in the evening on weekdays."
LONG = (
    "Our opening hours are simple to remember. We open at nine in the morning on every weekday. "
    "We close at five in the evening, except on Fridays when we close at four. "
    "On Saturdays we open from ten until two. We are closed on Sundays and public holidays. "
    "If you need us outside those hours, you can leave a message and we will call you back."
)


def tokens_in_first_sentence(text: str) -> int:
    """How many word tokens the fake streams up to and including the first sentence's full stop."""
    words = text.split(" ")
    return next(i + 1 for i, word in enumerate(words) if word.endswith((".", "!", "?")))


def post(client: httpx.Client, base: str, path: str, params: dict[str, str]) -> httpx.Response:
    signature = twilio_signature(TOKEN, base + path, list(params.items()))
    return client.post(base + path, data=params, headers={"X-Twilio-Signature": signature})


def first_audio(base: str, runs: int, fake: FakeLLM, k: int) -> tuple[list[float], list[float]]:
    """Per run (a fresh call each): seconds from sending /process-speech to its document, and from the
    fake sending the first sentence's last token to that document (the fake runs in this process)."""
    total, after_sentence = [], []
    with httpx.Client(timeout=30) as client:
        for _ in range(runs):
            call = {"CallSid": "CA" + secrets.token_hex(16), "From": "+15005550006", "To": "+15005550001"}
            post(client, base, "/voice", call)
            t0 = time.perf_counter()
            response = post(
                client, base, "/process-speech", call | {"SpeechResult": "When are you open?", "Confidence": "0.9"}
            )
            t1 = time.perf_counter()
            if response.status_code != 200 or b"<Say" not in response.content:
                raise SystemExit(f"unexpected answer: {response.status_code} {response.text[:200]}")
            total.append(t1 - t0)
            after_sentence.append(t1 - fake.posts[-1].sent_at[k - 1])
            time.sleep(0.05)
    return total, after_sentence


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttft", type=float, default=0.3, help="the fake model's time to first token, s")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between tokens (0.01 = 100 tokens/s)")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    rows, bench_rows = [], []
    with FakeLLM() as fake, tempfile.TemporaryDirectory() as tmp:
        env = {"LLM_PROVIDER": "openai", "TOOLS": "none", "LOG_LEVEL": "WARNING", **fake.env("openai")}
        servers = {}
        for mode, stream in (("streamed", "1"), ("whole reply", "0")):
            port = free_port()
            proc = start_local(port, TOKEN, env | {"STREAM_REPLIES": stream}, Path(tmp) / f"{port}.log")
            servers[mode] = (f"http://127.0.0.1:{port}", proc)
        try:
            for answer, text in (("short", SHORT), ("long", LONG)):
                fake.default = Reply(text, ttft=args.ttft, gap=args.gap)
                n, k = len(text.split(" ")), tokens_in_first_sentence(text)
                sentence_at = args.ttft + (k - 1) * args.gap  # the model has written the first sentence
                reply_at = args.ttft + (n - 1) * args.gap  # ... and the whole reply
                for mode, (base, _) in servers.items():
                    first_audio(base, 3, fake, k)  # warm-up: SDK import, connections
                    got, after = (sorted(x) for x in first_audio(base, args.runs, fake, k))
                    p50, p95 = statistics.median(got), got[int(len(got) * 0.95) - 1]
                    late50, late95 = statistics.median(after), after[int(len(after) * 0.95) - 1]
                    rows.append((answer, mode, k, n, sentence_at, reply_at, p50, p95, late50, late95))
                    bench_rows.append(
                        {
                            "bench": "first_audio",
                            "case": f"{answer} answer, {mode}",
                            "metric": "first <Say> after the first sentence was written, p50",
                            "value": round(late50 * 1000, 1),
                            "unit": "ms",
                            "target": 20 if mode == "streamed" else None,
                        }
                    )
        finally:
            for _, proc in servers.values():
                proc.terminate()
                proc.wait(10)
    print(
        f"\ntime to first audio: fake model TTFT {args.ttft * 1000:.0f} ms, {1 / args.gap:.0f} tokens/s, "
        f"{args.runs} runs\n"
    )
    print(
        f"{'answer':7} {'server':12} {'tokens':>10} {'schedule ms':>12} {'first audio ms':>15} "
        f"{'after the sentence ms':>22}"
    )
    print(f"{'':7} {'':12} {'sentence':>10} {'sentence/reply':>12} {'p50':>7} {'p95':>7} {'p50':>11} {'p95':>10}")
    for answer, mode, k, n, sentence_at, reply_at, p50, p95, late50, late95 in rows:
        print(
            f"{answer:7} {mode:12} {f'{k} of {n}':>10} {f'{sentence_at * 1000:.0f}/{reply_at * 1000:.0f}':>12} "
            f"{p50 * 1000:7.1f} {p95 * 1000:7.1f} {late50 * 1000:11.1f} {late95 * 1000:10.1f}"
        )
    print(
        "\n'schedule': when the model is due to have written the first sentence and the whole reply (TTFT + tokens "
        "x gap); 'after the sentence': from the fake model actually sending the first sentence's last token to "
        "the first <Say> arriving. Target (streamed): <= 20 ms. It includes the next token's gap, which tells a "
        "sentence end from an abbreviation and keeps a one-sentence reply whole."
    )
    print("BENCH " + json.dumps(bench_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
