"""What hosted audio costs: rendering a sentence, serving /audio, and the first sentence of a reply.

    python bench/tts_audio.py

In process, no Twilio: (1) Hosted.render with an instant in-process voice, for new text (key, backend
miss, synthesis, put) and for stored text (key, backend hit); (2) GET /audio/{key}.mp3 of 20 kB through
the ASGI app; (3) /process-speech until the first document, <Say> voice vs the openai voice through the
real SDK against the fake speech server on 127.0.0.1 (tests/fake_tts.py) answering at once. Best of 5
rounds; log lines go to /dev/null.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_tts import KEY, fake_tts  # noqa: E402

import audio  # noqa: E402
import main  # noqa: E402
import webhooks  # noqa: E402

TOKEN = "made-up-bench-token"
N, ROUNDS = 2000, 5


class Instant(main.AudioVoice):
    settings_key = "bench"

    async def synthesize(self, text: str) -> tuple[bytes, str]:
        return b"ID3" + bytes(20_000), "audio/mpeg"


def quiet() -> None:
    logging.getLogger("switchboard").handlers[:] = [logging.StreamHandler(open(os.devnull, "w"))]


async def render_costs() -> tuple[float, float]:
    settings = main.load_settings({"TWILIO_AUTH_TOKEN": TOKEN, "BLOB_CACHE_BYTES": str(10**9)})
    backend = main.select(main.plugin_manager(), "session", ["memory"], settings)[0]
    hosted = audio.Hosted(Instant(), backend, settings)
    new, stored = [], []
    for r in range(ROUNDS):
        texts = [f"Sentence {r} {i}." for i in range(N)]
        t0 = time.perf_counter()
        for text in texts:
            await hosted.render(text, base_url="https://x.example")
        t1 = time.perf_counter()
        for text in texts:
            await hosted.render(text, base_url="https://x.example")
        t2 = time.perf_counter()
        new.append((t1 - t0) / N * 1e6)
        stored.append((t2 - t1) / N * 1e6)
    return min(new), min(stored)


async def asgi_get(app: object, path: str) -> tuple[int, bytes]:
    out: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        out.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 5000),
        "server": ("bench.local", 80),
    }
    await app(scope, receive, send)  # type: ignore[operator]
    return out[0]["status"], out[1]["body"]


async def serve_cost() -> float:
    app = main.create_app(
        {"TWILIO_AUTH_TOKEN": TOKEN, "TTS_VOICE": "instant"}, plugins=[plugin_of("instant", Instant())]
    )
    quiet()
    best = []
    async with app.lifespan():
        seg = await app.state.calls.voice.render("A sentence to fetch.", base_url="http://bench.local")
        path = seg.url.removeprefix("http://bench.local")
        assert (await asgi_get(app, path))[0] == 200
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(N):
                await asgi_get(app, path)
            best.append((time.perf_counter() - t0) / N * 1e6)
    return min(best)


def plugin_of(name: str, voice: object) -> object:
    class Plugin:
        @main.hookimpl
        def register_tts_voices(self, register):  # type: ignore[no-untyped-def]
            register(name, lambda settings: voice)

    return Plugin()


async def first_document_ms(environ: dict[str, str], turns: int = 60) -> float:
    import httpx

    app = main.create_app({"TWILIO_AUTH_TOKEN": TOKEN, "GREETING": "Hi.", **environ})
    quiet()
    times = []
    async with (
        app.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://bench.local") as c,
    ):
        for n in range(turns):
            sid = f"CA{n:032x}"
            for path, extra in (
                ("/voice", {}),
                ("/process-speech", {"SpeechResult": f"hello number {n}", "Confidence": "0.9"}),
            ):
                params = {"CallSid": sid, "From": "+15005550006", "To": "+15005550001", **extra}
                sig = webhooks.twilio_signature(TOKEN, "http://bench.local" + path, list(params.items()))
                t0 = time.perf_counter()
                r = await c.post(
                    path,
                    content=urlencode(params),
                    headers={"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": sig},
                )
                assert r.status_code == 200
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[5:])


async def run() -> None:
    new, stored = await render_costs()
    print(f"Hosted.render, new text (key + miss + synthesis + put): {new:7.1f} µs")
    print(f"Hosted.render, stored text (key + hit):                 {stored:7.1f} µs")
    served = await serve_cost()
    print(f"GET /audio/{{key}}.mp3, 20 kB, in process:               {served:7.1f} µs")
    say = await first_document_ms({})
    with fake_tts("openai", size=20_000) as fake:
        voiced = await first_document_ms(
            {"TTS_VOICE": "openai", "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake.url + "/v1"}
        )
    print(f"/process-speech to first document, <Say> voice:         {say:7.2f} ms (median)")
    print(f"/process-speech to first document, openai voice (fake): {voiced:7.2f} ms (median)")
    rows = [
        ("Hosted.render, new text", "time", new, "µs"),
        ("Hosted.render, stored text", "time", stored, "µs"),
        ("GET /audio/{key}.mp3, 20 kB", "time", served, "µs"),
        ("/process-speech, <Say> voice", "to the first document (median)", say, "ms"),
        ("/process-speech, openai voice (fake vendor)", "to the first document (median)", voiced, "ms"),
    ]
    print(
        "BENCH "
        + json.dumps(
            [
                {
                    "bench": "tts audio",
                    "case": case,
                    "metric": metric,
                    "value": round(value, 2),
                    "unit": unit,
                    "target": None,
                }
                for case, metric, value, unit in rows
            ]
        )
    )


if __name__ == "__main__":
    asyncio.run(run())
