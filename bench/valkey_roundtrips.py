#!/usr/bin/env python3
"""Valkey round trips per request: a real agent process (Procfile command, SESSION_BACKEND=valkey)
talks to Valkey through a counting TCP proxy, and every request is attributed its round trips.

The client is not patched: the proxy sees the wire. A round trip is a request flight on one
connection: the client's bytes from the moment it writes after the server's last answer (a
pipeline or one EVALSHA is one flight; the backend sends what it issues in one event-loop iteration
as one pipeline). The proxy also parses the RESP commands, so each flight is
named (EVALSHA is named after the script it runs) and attributed to the call in its keys. The
pub/sub connection and connection setup (CLIENT SETNAME/SETINFO, SCRIPT LOAD) are counted apart.

Ordinary turns use the echo model (the reply fits one document). Long replies come from a paced
test model (an entry-point plugin written to a temp dir): six sentences 0.1 s apart, so the rest
of the reply is pushed sentence by sentence while Twilio (here: this script) follows /continue.

    python bench/valkey_roundtrips.py [--calls 50] [--valkey-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import re
import secrets
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import phone  # noqa: E402
from plugins import session_valkey  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)
SCRIPTS = {
    hashlib.sha1(getattr(session_valkey, name).encode()).hexdigest(): name.lower()
    for name in ("BEGIN", "COMMIT", "PUSH", "SERVE", "UNLOCK", "RENEW", "TAKE_OVER")
}
SETUP = {"CLIENT", "SCRIPT", "HELLO", "AUTH", "SELECT"}
CALL_IN_KEY = re.compile(rb"\{(CA[0-9a-f]+)\}")

PACED = """
import asyncio
from main import LLMProvider, hookimpl

class Paced(LLMProvider):
    name = "paced"

    def __init__(self, settings):
        pass

    async def stream(self, messages, *, system, tools=()):
        heard = messages[-1].content
        if not heard.startswith("long"):
            yield f"You said {heard}."
            return
        for n in range(1, 7):
            yield f"This is sentence number {n} of a long answer. "
            await asyncio.sleep(0.1)

@hookimpl
def register_llm_providers(register):
    register("paced", Paced)
"""


# ----------------------------------------------------------------------------- the counting proxy


class Flight:
    """One request flight on one connection: its commands, the request (window) it fell in, the call it touched."""

    def __init__(self, window: tuple[str, int]) -> None:
        self.window, self.commands, self.call = window, [], ""

    @property
    def kind(self) -> str:
        if not self.commands:
            return "?"
        if all(c.split()[0] in SETUP for c in self.commands):
            return "setup"
        return "+".join(self.commands)


class Meter:
    """Shared between the proxy thread and the driver: the current window and every flight seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.window = ("idle", 0)
        self.windows: list[tuple[str, int]] = []  # every request, in order
        self.flights: list[Flight] = []
        self.pubsub_flights = 0

    def set(self, label: str) -> None:
        with self.lock:
            self.window = (label, len(self.windows))
            if label != "between":
                self.windows.append(self.window)


def parse_commands(buf: bytearray) -> list[list[bytes]]:
    """Complete RESP arrays at the start of buf (consumed); an incomplete tail stays."""
    out = []
    while buf.startswith(b"*"):
        pos = buf.find(b"\r\n")
        if pos < 0:
            break
        count, pos, parts = int(buf[1:pos]), pos + 2, []
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0 or buf[pos : pos + 1] != b"$":
                return out
            size = int(buf[pos + 1 : end])
            if len(buf) < end + 2 + size + 2:
                return out
            parts.append(bytes(buf[end + 2 : end + 2 + size]))
            pos = end + 2 + size + 2
        del buf[:pos]
        out.append(parts)
    return out


def name_of(parts: list[bytes]) -> str:
    command = parts[0].decode().upper()
    if command == "EVALSHA":
        return SCRIPTS.get(parts[1].decode(), "evalsha?")
    if command in ("CLIENT", "SCRIPT"):
        return f"{command} {parts[1].decode().upper()}"
    return command.lower()


async def proxy(meter: Meter, upstream: tuple[str, int], ready: threading.Event, port_box: list[int]) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*upstream)
        state: dict[str, Any] = {"waiting": False, "flight": None, "pubsub": False, "buf": bytearray()}

        async def up() -> None:
            while data := await client_r.read(65536):
                with meter.lock:
                    if not state["waiting"]:
                        state["flight"] = Flight(meter.window)
                        if not state["pubsub"]:
                            meter.flights.append(state["flight"])
                        else:
                            meter.pubsub_flights += 1
                    state["waiting"] = True
                    state["buf"] += data
                    for parts in parse_commands(state["buf"]):
                        if parts[0].upper() == b"SUBSCRIBE":
                            state["pubsub"] = True
                            if state["flight"] in meter.flights:
                                meter.flights.remove(state["flight"])
                                meter.pubsub_flights += 1
                        state["flight"].commands.append(name_of(parts))
                        if not state["flight"].call and (m := CALL_IN_KEY.search(b" ".join(parts[1:]))):
                            state["flight"].call = m.group(1).decode()
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def down() -> None:
            while data := await server_r.read(65536):
                state["waiting"] = False
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_box.append(server.sockets[0].getsockname()[1])
    ready.set()
    async with server:
        await server.serve_forever()


# ----------------------------------------------------------------------------- driving calls


class Caller:
    """A Twilio stand-in for one call against the real server, attributing each request to a window."""

    def __init__(self, http: httpx.Client, base: str, meter: Meter) -> None:
        self.http, self.base, self.meter = http, base, meter
        self.sid = "CA" + secrets.token_hex(16)
        self.params = {
            "AccountSid": "AC" + "0" * 32,
            "CallSid": self.sid,
            "From": "+15005550006",
            "To": "+15005550001",
            "Direction": "inbound",
            "CallStatus": "in-progress",
        }

    def post(self, path: str, window: str, **extra: str) -> str:
        params = self.params | extra
        url = self.base + path
        signature = twilio_signature(TOKEN, url, list(params.items()))
        self.meter.set(window)
        r = self.http.post(
            url,
            content=urlencode(params),
            headers={"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": signature},
        )
        self.meter.set("between")
        if r.status_code != 200 or b"<Response>" not in r.content:
            raise SystemExit(f"{path}: {r.status_code} {r.text[:300]}")
        return r.text

    def turn(self, text: str, window: str) -> list[str]:
        """Say something, follow every <Redirect>; return the documents."""
        docs = [self.post("/process-speech", window, SpeechResult=text, Confidence="0.92")]
        while m := re.search(r"<Redirect[^>]*>([^<]+)</Redirect>", docs[-1]):
            docs.append(self.post(m.group(1).replace("&amp;", "&"), "warm-up" if window == "warm-up" else "/continue"))
        return docs


def summary(values: list[int]) -> str:
    return f"{min(values)} / {statistics.mean(values):.2f} / {max(values)}" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="calls of each kind")
    parser.add_argument("--valkey-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    target = urlsplit(args.valkey_url)
    meter, ready, port_box = Meter(), threading.Event(), []
    threading.Thread(
        target=lambda: asyncio.run(proxy(meter, (target.hostname, target.port or 6379), ready, port_box)), daemon=True
    ).start()
    ready.wait(5)
    prefix = "bench-rt-" + secrets.token_hex(4)
    proxied = f"redis://127.0.0.1:{port_box[0]}{target.path or '/0'}"
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp)
        (package / "sb_paced.py").write_text(textwrap.dedent(PACED))
        dist = package / "sb_paced-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-paced\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text("[switchboard]\npaced = sb_paced\n")
        port = phone.free_port()
        env = {
            "SESSION_BACKEND": "valkey",
            "VALKEY_URL": proxied,
            "VALKEY_PREFIX": prefix,
            "LLM_PROVIDER": "paced",
            "PYTHONPATH": str(package),
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "LOG_LEVEL": "WARNING",
        }
        server = phone.start_local(port, TOKEN, env, package / "server.log")
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=20) as http:
                for _ in range(3):  # warm-up: pooled connections, scripts loaded
                    warm = Caller(http, base, meter)
                    warm.post("/voice", "warm-up", CallStatus="ringing")
                    warm.turn("warming up", "warm-up")
                    warm.turn("long warm-up", "warm-up")
                    warm.post("/status", "warm-up", CallStatus="completed")
                time.sleep(0.5)
                one_doc, long_docs = [], []
                for _ in range(args.calls):
                    caller = Caller(http, base, meter)
                    caller.post("/voice", "/voice", CallStatus="ringing")
                    for n in range(3):
                        one_doc.append(len(caller.turn(f"ordinary question {n}", "/process-speech (one document)")))
                    caller.post("/status", "/status", CallStatus="completed")
                for _ in range(args.calls):
                    caller = Caller(http, base, meter)
                    caller.post("/voice", "/voice", CallStatus="ringing")
                    long_docs.append(len(caller.turn("long answer please", "/process-speech (long reply)")))
                    time.sleep(0.05)
                    caller.post("/status", "/status", CallStatus="completed")
                time.sleep(0.2)
        finally:
            server.terminate()
            server.wait(10)
    import valkey

    with valkey.Valkey.from_url(args.valkey_url) as client:  # leave the shared server as we found it
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)

    with meter.lock:
        flights = [f for f in meter.flights if f.window[0] not in ("idle", "warm-up")]  # startup, warm-up
        windows = [w for w in meter.windows if w[0] != "warm-up"]
    by_request: dict[tuple[str, int], list[Flight]] = {w: [] for w in windows}
    pushes: collections.Counter[str] = collections.Counter()
    setup = renewals = 0
    for f in flights:
        if f.kind == "setup":
            setup += 1
            continue
        # the generation queues sentences in the background, whatever request is open; the backend may
        # send a push in the same flight as a request's command (it pipelines what is issued together)
        pushes[f.call] += f.commands.count("push")
        renewals += f.commands.count("renew")  # lease renewals run beside the requests, like pushes
        f.commands = [c for c in f.commands if c not in ("push", "renew")]
        if f.commands and f.window in by_request:
            by_request[f.window].append(f)
    rows: dict[str, list[int]] = collections.defaultdict(list)
    shapes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    long_calls = set()
    for (label, _), fs in by_request.items():
        rows[label].append(len(fs))
        shapes[label][" ".join(f.kind for f in fs)] += 1
        if label == "/process-speech (long reply)":
            long_calls |= {f.call for f in fs}
    print(f"\nValkey round trips per request ({args.calls} calls of each kind; request path, counted on the wire)\n")
    print(f"{'route':32} {'requests':>8} {'round trips min / mean / max':>29}   most common sequence")
    for label, values in rows.items():
        shape, seen = shapes[label].most_common(1)[0]
        print(f"{label:32} {len(values):8d} {summary(values):>29}   {shape} ({seen / len(values):.0%})")
    per_long = [pushes[c] for c in long_calls]
    print(f"\nordinary turns answered in one document: {sum(d == 1 for d in one_doc)} of {len(one_doc)}")
    print(
        f"long replies (6 sentences, 0.1 s apart): {statistics.mean(long_docs):.2f} documents each; "
        f"pushes per long reply (background, off the request path): {summary(per_long)}"
    )
    print(f"lease renewals (beside the requests, off their path): {renewals} over {len(windows)} requests")
    print(
        f"connection setup flights after warm-up: {setup}; pub/sub connection flights (subscribe, pings): "
        f"{meter.pubsub_flights}"
    )
    bench = [
        {
            "bench": "valkey round trips",
            "case": label,
            "metric": "round trips per request, max",
            "unit": "",
            "value": max(values),
            "target": "<= 3" if label == "/process-speech (one document)" else None,
        }
        for label, values in rows.items()
    ]  # issue 5: <= 3 round trips for an ordinary turn
    print("BENCH " + json.dumps(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
