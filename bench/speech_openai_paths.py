#!/usr/bin/env python3
"""The OpenAI Realtime plugin's audio path against the SDK's typed one, in process: µs per append, per delta.

Against the fake Realtime server (tests/fake_realtime.py, in a thread of this process), it times N
input_audio_buffer.append events of one 20 ms μ-law frame sent through the plugin (send_audio: encode
and queue; the writer task: send_raw) against the SDK's typed `input_audio_buffer.append()`, and N
parses of one 100 ms response.output_audio.delta (the plugin's msgspec decode, base64 included) against
the SDK's `parse_event()` plus base64 decoding. Send rows are this thread's CPU time (the fake's thread
excluded), parse rows wall time of a tight loop.

    python bench/speech_openai_paths.py [-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_realtime import FakeRealtime  # noqa: E402

import main  # noqa: E402
from plugins.speech_openai import ENCODER, Append, RealtimeModel, RealtimeSession, decode  # noqa: E402

FRAME = bytes(range(160))
DELTA = json.dumps(
    {
        "type": "response.output_audio.delta",
        "event_id": "event_1",
        "response_id": "resp_1",
        "item_id": "item_1",
        "output_index": 0,
        "content_index": 0,
        "delta": base64.b64encode(bytes(800)).decode(),
    }
).encode()


async def run(n: int) -> None:
    with FakeRealtime() as fake:
        model = RealtimeModel(main.load_settings(fake.env()))
        session = await model.open(instructions="", tools=(), history=())
        assert isinstance(session, RealtimeSession)
        conn = session.conn
        cpu = time.thread_time()
        for _ in range(n):
            session.send_audio(FRAME)
        while not session.outbox.empty():
            await asyncio.sleep(0)
        ours = (time.thread_time() - cpu) / n * 1e6
        start = time.perf_counter()
        for _ in range(n):
            ENCODER.encode(Append(audio=FRAME)).decode()
        encode = (time.perf_counter() - start) / n * 1e6
        b64 = base64.b64encode(FRAME).decode()
        cpu = time.thread_time()
        for _ in range(n):
            await conn.input_audio_buffer.append(audio=b64)
        sdk = (time.thread_time() - cpu) / n * 1e6
        start = time.perf_counter()
        for _ in range(n):
            decode(DELTA)
        parse = (time.perf_counter() - start) / n * 1e6
        start = time.perf_counter()
        for _ in range(n):
            base64.b64decode(conn.parse_event(DELTA).delta)
        sdk_parse = (time.perf_counter() - start) / n * 1e6
        await session.close()
        await model.aclose()
    print(f"append  plugin {ours:7.1f} µs (encode {encode:.1f} µs)   SDK typed {sdk:7.1f} µs   x{sdk / ours:.1f}")
    print(f"delta   plugin {parse:7.1f} µs                 SDK typed {sdk_parse:7.1f} µs   x{sdk_parse / parse:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000)
    asyncio.run(run(parser.parse_args().n))
