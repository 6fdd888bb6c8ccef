#!/usr/bin/env python3
"""Valkey round trips per request: a real agent process (Procfile command, SESSION_BACKEND=valkey)
talks to Valkey through a counting TCP proxy, and every request is attributed its round trips.

The client is not patched: the proxy sees the wire. A round trip is a request flight on one
connection: the client's bytes from the moment it writes after the server's last answer (a
pipeline or one EVALSHA is one flight; the backend sends what it issues in one event-loop iteration
as one pipeline). The proxy also parses the RESP commands, so each flight is
named (EVALSHA is named after the script it runs) and attributed to the call in its keys. The
pub/sub connection and connection setup (CLIENT SETNAME/SETINFO, SCRIPT LOAD; on a cluster also INFO,
CLUSTER SLOTS, COMMAND, READONLY) are counted apart.

--cluster starts a private three-node Valkey Cluster (tests/valkey_cluster.py) whose nodes announce
the ports of one counting proxy each, so every connection the backend opens, to whichever node, goes
through a proxy. A flight of the backend may then be several writes at once, one per node: writes of
one request that overlap in time count as one round trip, and the writes are reported too.

Ordinary turns use the echo model (the reply fits one document). Long replies come from a paced
test model (an entry-point plugin written to a temp dir): six sentences 0.1 s apart, so the rest
of the reply is pushed sentence by sentence while Twilio (here: this script) follows /continue.

    python bench/valkey_roundtrips.py [--calls 50] [--valkey-url redis://127.0.0.1:6379/0 | --cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
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
SETUP = {"CLIENT", "SCRIPT", "HELLO", "AUTH", "SELECT", "INFO", "CLUSTER", "COMMAND", "READONLY"}
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
    """One request flight on one connection: its commands, the request (window) it fell in, the call it touched,
    the node (proxy) it went to, and when: its first byte written to its last reply byte read."""

    def __init__(self, window: tuple[str, int], node: int) -> None:
        self.window, self.node, self.commands, self.call = window, node, [], ""
        self.start = self.end = time.monotonic()

    @property
    def kind(self) -> str:
        if not self.commands:
            return "?"
        if all(c.split()[0].upper() in SETUP for c in self.commands):
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
    if command == "EVAL":  # a NOSCRIPT answer's retry (the node did not have the script yet)
        return "eval " + SCRIPTS.get(hashlib.sha1(parts[1]).hexdigest(), "?")
    if command in ("CLIENT", "SCRIPT", "CLUSTER"):
        return f"{command} {parts[1].decode().upper()}"
    return command.lower()


def round_trips(flights: list[Flight]) -> int:
    """Round trips in time: flights (on any connections, to any nodes) whose spans overlap count once."""
    count, until = 0, float("-inf")
    for f in sorted(flights, key=lambda f: f.start):
        if f.start > until:
            count += 1
        until = max(until, f.end) if f.start <= until else f.end
    return count


async def proxy(meter: Meter, upstreams: list[tuple[str, int]], ready: threading.Event, port_box: list[int]) -> None:
    """One counting proxy per upstream (a node), all on this thread's loop; their ports go to port_box, in order."""

    async def handle(node: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*upstreams[node])
        state: dict[str, Any] = {"waiting": False, "flight": None, "pubsub": False, "buf": bytearray()}

        async def up() -> None:
            while data := await client_r.read(65536):
                with meter.lock:
                    if not state["waiting"]:
                        state["flight"] = Flight(meter.window, node)
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
                if state["flight"] is not None:
                    state["flight"].end = time.monotonic()
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    servers = []
    for node in range(len(upstreams)):
        servers.append(await asyncio.start_server(functools.partial(handle, node), "127.0.0.1", 0))
        port_box.append(servers[-1].sockets[0].getsockname()[1])
    ready.set()
    await asyncio.gather(*(server.serve_forever() for server in servers))


# ----------------------------------------------------------------------------- driving calls


class Caller:
    """A Twilio stand-in for one call against the real server, attributing each request to a window."""

    def __init__(self, http: httpx.Client, base: str, meter: Meter, sid: str = "") -> None:
        self.http, self.base, self.meter = http, base, meter
        self.sid = sid or "CA" + secrets.token_hex(16)
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


def spread_sids(prefix: str, owners: list[int], per_node: int) -> list[str]:
    """Call SIDs whose keys live on each node in turn (owners[slot] is the node index), per_node of each."""
    from valkey.crc import key_slot

    out: list[str] = []
    for node in range(max(owners) + 1):
        while sum(owners[key_slot(f"{prefix}:{{{sid}}}:s".encode())] == node for sid in out) < per_node:
            sid = "CA" + secrets.token_hex(16)
            if owners[key_slot(f"{prefix}:{{{sid}}}:s".encode())] == node:
                out.append(sid)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="calls of each kind")
    parser.add_argument("--valkey-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster", action="store_true", help="a private three-node cluster, a proxy per node")
    args = parser.parse_args()
    meter, ready, port_box = Meter(), threading.Event(), []
    prefix = "bench-rt-" + secrets.token_hex(4)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        owners = [0] * 16384  # slot -> node index
        if args.cluster:
            sys.path.insert(0, str(ROOT / "tests"))
            from valkey_cluster import Cluster

            (tmp / "cluster").mkdir()
            cluster = Cluster(tmp / "cluster")  # its ports are chosen; it starts once the proxies listen
            upstreams = [("127.0.0.1", port) for port in cluster.ports]
        else:
            target = urlsplit(args.valkey_url)
            upstreams = [(target.hostname or "127.0.0.1", target.port or 6379)]
        threading.Thread(
            target=lambda: asyncio.run(proxy(meter, upstreams, ready, port_box)), daemon=True, name="proxy"
        ).start()
        ready.wait(5)
        if args.cluster:
            cluster.announce = dict(zip(cluster.ports, port_box, strict=True))  # clients are told the proxies
            stack.callback(cluster.stop)
            cluster.start()
            with cluster.client(cluster.ports[0]) as c:
                for first, last, announced in cluster.owners(c):
                    owners[first : last + 1] = [port_box.index(announced)] * (last - first + 1)
            proxied = f"redis://127.0.0.1:{port_box[0]}/0"
        else:
            proxied = f"redis://127.0.0.1:{port_box[0]}{target.path or '/0'}"
        warm_sids = spread_sids(prefix, owners, 1) if args.cluster else ["", "", ""]  # "": a new random call
        one_doc, long_docs = run_calls(args.calls, proxied, prefix, meter, tmp, warm_sids)
    if not args.cluster:
        import valkey

        with valkey.Valkey.from_url(args.valkey_url) as client:  # leave the shared server as we found it
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
    return report(args.calls, args.cluster, meter, one_doc, long_docs, len(upstreams))


def run_calls(
    calls: int, url: str, prefix: str, meter: Meter, tmp: Path, warm_sids: list[str]
) -> tuple[list[int], list[int]]:
    """Start the agent on the (proxied) Valkey URL and drive the calls; return the documents per turn."""
    package = tmp / "paced"
    package.mkdir()
    (package / "sb_paced.py").write_text(textwrap.dedent(PACED))
    dist = package / "sb_paced-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-paced\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\npaced = sb_paced\n")
    port = phone.free_port()
    env = {
        "SESSION_BACKEND": "valkey",
        "VALKEY_URL": url,
        "VALKEY_PREFIX": prefix,
        "LLM_PROVIDER": "paced",
        "PYTHONPATH": str(package),
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "LOG_LEVEL": "WARNING",
    }
    server = phone.start_local(port, TOKEN, env, tmp / "server.log")
    base = f"http://127.0.0.1:{port}"
    one_doc, long_docs = [], []
    try:
        with httpx.Client(timeout=20) as http:
            for sid in warm_sids:  # warm-up: pooled connections, scripts loaded (on a cluster: on every node)
                warm = Caller(http, base, meter, sid)
                warm.post("/voice", "warm-up", CallStatus="ringing")
                warm.turn("warming up", "warm-up")
                warm.turn("long warm-up", "warm-up")
                warm.post("/status", "warm-up", CallStatus="completed")
            time.sleep(0.5)
            for _ in range(calls):
                caller = Caller(http, base, meter)
                caller.post("/voice", "/voice", CallStatus="ringing")
                for n in range(3):
                    one_doc.append(len(caller.turn(f"ordinary question {n}", "/process-speech (one document)")))
                caller.post("/status", "/status", CallStatus="completed")
            for _ in range(calls):
                caller = Caller(http, base, meter)
                caller.post("/voice", "/voice", CallStatus="ringing")
                long_docs.append(len(caller.turn("long answer please", "/process-speech (long reply)")))
                time.sleep(0.05)
                caller.post("/status", "/status", CallStatus="completed")
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(10)
    return one_doc, long_docs


def report(calls: int, cluster: bool, meter: Meter, one_doc: list[int], long_docs: list[int], nodes: int) -> int:
    with meter.lock:
        flights = [f for f in meter.flights if f.window[0] not in ("idle", "warm-up")]  # startup, warm-up
        windows = [w for w in meter.windows if w[0] != "warm-up"]
    by_request: dict[tuple[str, int], list[Flight]] = {w: [] for w in windows}
    renewed: collections.Counter[tuple[str, int]] = collections.Counter()
    pushes: collections.Counter[str] = collections.Counter()
    per_node: collections.Counter[int] = collections.Counter()
    setup = renewals = evals = 0
    for f in flights:
        if f.kind == "setup":
            setup += 1
            continue
        # the generation queues sentences in the background, whatever request is open; the backend may
        # send a push in the same flight as a request's command (it pipelines what is issued together)
        pushes[f.call] += f.commands.count("push")
        renewals += f.commands.count("renew")  # lease renewals run beside the requests, like pushes
        renewed[f.window] += f.commands.count("renew")
        f.commands = [c for c in f.commands if c not in ("push", "renew")]
        evals += sum(c.startswith("eval ") for c in f.commands)
        if f.commands and f.window in by_request:
            by_request[f.window].append(f)
            per_node[f.node] += 1
    rows: dict[str, list[int]] = collections.defaultdict(list)
    writes: dict[str, list[int]] = collections.defaultdict(list)
    renews: dict[str, list[int]] = collections.defaultdict(list)
    shapes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    long_calls = set()
    for window, fs in by_request.items():
        label = window[0]
        rows[label].append(round_trips(fs))
        writes[label].append(len(fs))
        renews[label].append(renewed[window])
        shapes[label][" ".join(f.kind for f in fs)] += 1
        if label == "/process-speech (long reply)":
            long_calls |= {f.call for f in fs}
    where = f"a {nodes}-node cluster, a proxy per node" if cluster else "one Valkey"
    print(
        f"\nValkey round trips per request ({calls} calls of each kind, {where}; request path, counted on the wire;"
        "\nwrites of one request to several nodes at once are one round trip)\n"
    )
    print(
        f"{'route':32} {'requests':>8} {'round trips min / mean / max':>29} {'node writes mean / max':>23} "
        f"{'renewals beside':>15}   most common sequence"
    )
    for label, values in rows.items():
        shape, seen = shapes[label].most_common(1)[0]
        print(
            f"{label:32} {len(values):8d} {summary(values):>29} "
            f"{f'{statistics.mean(writes[label]):.2f} / {max(writes[label])}':>23} "
            f"{f'{sum(renews[label]) / len(values):.2f}':>15}   {shape} ({seen / len(values):.0%})"
        )
    per_long = [pushes[c] for c in long_calls]
    print(f"\nordinary turns answered in one document: {sum(d == 1 for d in one_doc)} of {len(one_doc)}")
    print(
        f"long replies (6 sentences, 0.1 s apart): {statistics.mean(long_docs):.2f} documents each; "
        f"pushes per long reply (background, off the request path): {summary(per_long)}"
    )
    print(
        f"lease renewals (beside the requests, off their path): {renewals} over {len(windows)} requests "
        "(renewals beside: per request, started while it was open)"
    )
    multi = sum(len(fs) > round_trips(fs) for fs in by_request.values())
    if cluster:
        spread = ", ".join(f"node {n}: {per_node[n]}" for n in range(nodes))
        print(f"request-path writes per node: {spread}; requests with writes to several nodes at once: {multi}")
    print(
        f"connection setup flights after warm-up: {setup}; pub/sub connection flights (subscribe, pings): "
        f"{meter.pubsub_flights}; NOSCRIPT retries (EVAL) on the request path: {evals}"
    )
    name = "valkey cluster round trips" if cluster else "valkey round trips"
    bench = []
    for label, values in rows.items():  # issue 5: <= 3 round trips for an ordinary turn
        ordinary = label == "/process-speech (one document)"
        row = {"bench": name, "case": label, "unit": ""}
        bench.append(
            row
            | {"metric": "round trips per request, max", "value": max(values), "target": "<= 3" if ordinary else None}
        )
        if cluster:
            bench.append(row | {"metric": "node writes per request, max", "value": max(writes[label]), "target": None})
        if ordinary:
            renewal_rate = round(sum(renews[label]) / len(values), 2)
            bench.append(row | {"metric": "lease renewals beside, per request", "value": renewal_rate, "target": None})
    print("BENCH " + json.dumps(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
