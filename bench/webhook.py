#!/usr/bin/env python3
"""Webhook throughput: switchboard against a raw-ASGI floor, same signature check, same TwiML.

Loads POST /voice (a new call each request) and POST /process-speech (a turn on one of 4096 calls,
new speech each time, echo model) with wrk at 32 connections, signature checks on, and prints req/s,
p50, p99 and the server's CPU time per request for every server in one table. The server gets one CPU
core and wrk the other (taskset), so the numbers compare servers, not the scheduler. All servers run
at once and take turns: each route's load is cut into --rounds slices, served in turn (in reverse
order every other round), so a drift of the shared VM's speed during the run falls on every server
alike and the shares of memory compare like with like. No request is sent twice to a server (a
repeated one would be a retry, answered from the stored reply). The Valkey backend talks to a
private Valkey/Redis on wrk's core (in production Valkey is a separate service), unless --valkey-url;
the cluster backend (the same plugin) to a private three-node Valkey Cluster (tests/valkey_cluster.py)
on wrk's core too, found from its first node.

    python bench/webhook.py [--seconds 10] [--rounds 5] [--connections 32] [--backends memory,valkey,cluster]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phone import free_port  # noqa: E402
from webhooks import twilio_signature  # noqa: E402

TOKEN = "bench-token-" + secrets.token_hex(8)
CALLS = 4096


def pin(core: int) -> list[str]:
    """Run on one core when taskset exists and the machine has two."""
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def start(argv: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start a server and wait until it answers."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, "TWILIO_AUTH_TOKEN": TOKEN, "PUBLIC_URL": f"http://127.0.0.1:{port}", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(pin(0) + argv, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def requests_file(path: str, port: int, n: int, directory: Path) -> Path:
    """n pre-signed requests, one per line: path, form body, signature."""
    out = directory / f"{path.strip('/')}-{port}.tsv"
    url = f"http://127.0.0.1:{port}{path}"
    run = secrets.token_hex(4)
    with out.open("w") as f:
        for i in range(n):
            call = f"CA{run}{(i if path == '/voice' else i % CALLS):024x}"
            params = {
                "AccountSid": "AC" + "0" * 32,
                "CallSid": call,
                "From": "+15005550006",
                "To": "+15005550001",
                "CallStatus": "in-progress",
                "Direction": "inbound",
            }
            if path == "/process-speech":
                params |= {"SpeechResult": f"question number {i} about the opening hours", "Confidence": "0.93"}
            f.write(f"{path}\t{urlencode(params)}\t{twilio_signature(TOKEN, url, list(params.items()))}\n")
    return out


def wrk(port: int, data: Path, seconds: int, connections: int, first: int = 0) -> dict[str, Any]:
    """Run wrk from the file's line `first` on and parse requests, seconds, req/s, p50, p99 and errors."""
    argv = pin(1) + [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(ROOT / "bench/webhook.lua"),
        f"http://127.0.0.1:{port}",
        "--",
        str(data),
        "1",
        str(first),
    ]
    text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def pct(p: str) -> float:
        value, u = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE).groups()  # type: ignore[union-attr]
        return float(value) * unit[u]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", text)
    return {
        "requests": int(done.group(1)),  # type: ignore[union-attr]
        "seconds": float(done.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)],  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


@contextlib.contextmanager
def private_valkey(directory: Path) -> Iterator[str]:
    """A Valkey/Redis server of the bench's own, on wrk's core: in production Valkey is a separate
    service, so it must not take CPU from the agent under test."""
    binary = shutil.which("valkey-server") or shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no valkey-server or redis-server: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        pin(1)
        + [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def private_cluster(directory: Path) -> Iterator[str]:
    """A three-node Valkey Cluster of the bench's own, every node on wrk's core like the private Valkey."""
    sys.path.insert(0, str(ROOT / "tests"))
    from valkey_cluster import Cluster

    (directory / "cluster").mkdir()
    cluster = Cluster(directory / "cluster")
    try:
        cluster.start()
        if pin(1):
            for proc in cluster.procs.values():  # every thread of each node (taskset -a), as pin(1) would
                subprocess.run(["taskset", "-a", "-p", "-c", "1", str(proc.pid)], check=True, capture_output=True)
        yield cluster.url
    finally:
        cluster.stop()


def check(port: int, path: str, data: Path) -> None:
    """One request by hand first: the server must answer 200 with TwiML, or the numbers mean nothing."""
    line = data.read_text().splitlines()[-1]
    p, body, sig = line.split("\t")
    r = httpx.post(
        f"http://127.0.0.1:{port}{p}",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": sig},
    )
    if r.status_code != 200 or b"<Response>" not in r.content:
        raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merge(slices: list[dict[str, Any]], cpu: float) -> dict[str, Any]:
    """A server's slices of one route as one run: req/s over all of them, the median slice's p50, the worst
    slice's p99, every error, and the server's CPU time per request."""
    requests = sum(r["requests"] for r in slices)
    return {
        "rps": requests / sum(r["seconds"] for r in slices),
        "p50": statistics.median(r["p50"] for r in slices),
        "p99": max(r["p99"] for r in slices),
        "errors": sum(r["errors"] for r in slices),
        "socket_errors": "; ".join(r["socket_errors"] for r in slices if r["socket_errors"]),
        "cpu_us": 1e6 * cpu / requests,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="load per server and route, cut into slices")
    parser.add_argument("--rounds", type=int, default=5, help="slices per server and route (whole seconds each)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backends", default="memory", help="comma list: memory, valkey, cluster")
    parser.add_argument("--valkey-url", default="", help="an existing server; default: a private one on wrk's core")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    rounds = max(1, min(args.rounds, args.seconds))
    slice_seconds = max(1, args.seconds // rounds)
    servers = {"raw ASGI floor": (["uvicorn", "--app-dir", "bench", "raw_asgi:app"], {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for backend in args.backends.split(","):
            env = {"SESSION_BACKEND": backend}
            if backend == "valkey":
                url = args.valkey_url or stack.enter_context(private_valkey(Path(tmp)))
                env |= {"VALKEY_URL": url, "VALKEY_PREFIX": "bench" + secrets.token_hex(4)}
            elif backend == "cluster":  # the Valkey backend on a cluster (it finds out from the node's INFO)
                url = stack.enter_context(private_cluster(Path(tmp)))
                env = {"SESSION_BACKEND": "valkey", "VALKEY_URL": url, "VALKEY_PREFIX": "bench" + secrets.token_hex(4)}
            servers[f"switchboard ({backend})"] = (["uvicorn", "--factory", "main:create_app"], env)
        procs: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        for name, (argv, env) in servers.items():  # all up at once; the idle ones take no CPU
            port = free_port()
            common = ["--host", "127.0.0.1", "--port", str(port), "--no-proxy-headers", "--no-access-log"]
            procs[name] = port, start(argv + common, env, port, Path(tmp) / f"{port}.log")
            stack.callback(procs[name][1].wait, 10)
            stack.callback(procs[name][1].terminate)
        for path in ("/voice", "/process-speech"):  # enough for 25,000 req/s (warm-up too), at most 200,000
            data, sent, slices, cpu = {}, {}, {name: [] for name in procs}, dict.fromkeys(procs, 0.0)
            for name, (port, _) in procs.items():
                data[name] = requests_file(path, port, min(200_000, 25_000 * (args.seconds + 2)), Path(tmp))
                check(port, path, data[name])
                sent[name] = wrk(port, data[name], 2, args.connections, first=1)["requests"] + 1  # warm-up
            for turn in range(rounds):
                for name in list(procs) if turn % 2 == 0 else list(procs)[::-1]:
                    port, proc = procs[name]
                    before = cpu_seconds(proc.pid)
                    r = wrk(port, data[name], slice_seconds, args.connections, first=sent[name])
                    cpu[name] += cpu_seconds(proc.pid) - before
                    sent[name] += r["requests"]
                    slices[name].append(r)
            rows += [(name, path, merge(slices[name], cpu[name])) for name in procs]
    floor = {path: r["rps"] for name, path, r in rows if name == "raw ASGI floor"}
    memory = {path: r["rps"] for name, path, r in rows if name == "switchboard (memory)"}
    print(
        f"\nwebhook throughput: {args.connections} connections, {rounds} turns of {slice_seconds} s per server and "
        "route, signatures on, echo model\n"
    )
    print(
        f"{'server':24} {'route':16} {'req/s':>9} {'of floor':>9} {'of memory':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU µs/req':>11} {'non-2xx':>8}"
    )
    for name, path, r in rows:
        of_memory = f"{r['rps'] / memory[path]:.0%}" if path in memory and name != "raw ASGI floor" else ""
        print(
            f"{name:24} {path:16} {r['rps']:9.0f} {r['rps'] / floor[path]:9.0%} {of_memory:>10} {r['p50']:8.2f} "
            f"{r['p99']:8.2f} {r['cpu_us']:11.0f} {r['errors']:8d}"
            f"{'  ' + r['socket_errors'] if r['socket_errors'] else ''}"
        )
    print("BENCH " + json.dumps(bench_rows(rows, floor, args.connections)))
    return 0


def bench_rows(rows: list[tuple[str, str, dict[str, Any]]], floor: dict[str, float], connections: int) -> list[dict]:
    """The rows for bench/run. Targets: memory >= 60% of the floor's req/s and p99 <= 6 ms (issue 3);
    valkey >= 75% of the memory backend's req/s (issue 5; the cluster's share is reported, without a target)."""
    memory = {path: r["rps"] for name, path, r in rows if name == "switchboard (memory)"}
    out: list[dict] = []
    for name, path, r in rows:
        case = f"{name} {path}, {connections} connections"
        row = {"bench": "webhook", "case": case, "unit": "req/s", "metric": "req/s", "value": round(r["rps"])}
        out.append(row | {"target": None})
        if name == "switchboard (memory)":
            out.append(
                row
                | {
                    "metric": "req/s, % of the raw ASGI floor",
                    "unit": "%",
                    "value": round(100 * r["rps"] / floor[path], 1),
                    "target": ">= 60",
                }
            )
        elif name != "raw ASGI floor" and path in memory:
            out.append(
                row
                | {
                    "metric": "req/s, % of the memory backend",
                    "unit": "%",
                    "value": round(100 * r["rps"] / memory[path], 1),
                    "target": ">= 75" if name == "switchboard (valkey)" else None,
                }
            )
        out.append(
            row
            | {
                "metric": "p99",
                "unit": "ms",
                "value": round(r["p99"], 2),
                "target": "<= 6" if name == "switchboard (memory)" else None,
            }
        )
        if name != "raw ASGI floor":
            out.append(row | {"metric": "non-2xx responses", "unit": "", "value": r["errors"], "target": "<= 0"})
    return out


if __name__ == "__main__":
    sys.exit(main())
