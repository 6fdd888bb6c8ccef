#!/usr/bin/env python3
"""What the Valkey backend's line saves: client CPU per command, the line against a pooled round trip.

The backend sends every command of a process on one connection (`Line` in plugins/session_valkey.py):
each event-loop iteration's commands leave in one write and the replies are matched to their futures in
data_received. Before, each iteration's commands were a flight of their own: a task that took a pooled
connection, wrote, read each reply with valkey-py's read_response (a timeout context per reply) and gave
the connection back. That pooled flight is rebuilt here as it was, on the backend's own connection pool, in
a backend whose take-off is the old one, and both carry the same commands:
C callers at once, each doing SET, GET, PEXPIRE on its own key in turn (three round trips, like a turn).
Rounds alternate between the two; the best round of each is printed as CPU µs per command (this process
only, on its own core; the private Valkey runs on the other core).

    python bench/valkey_line.py [--commands 6000] [--rounds 5] [--callers 1,8,32] [--valkey-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from webhook import private_valkey  # noqa: E402

import main  # noqa: E402
from plugins.session_valkey import ValkeyBackend, pack  # noqa: E402


class Pooled(ValkeyBackend):
    """The backend with the replaced take-off: one task per flight, on a connection taken from its pool."""

    def _take_off(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._pooled_fly(batch))
        self.flushing.add(task)
        task.add_done_callback(self.flushing.discard)

    async def _pooled_fly(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        connection = await self.pool.get_connection("pipeline")
        try:  # one write, then each reply in turn
            await connection.send_packed_command(pack([command for command, _ in batch]), check_health=False)
            for _, future in batch:
                future.set_result(await connection.read_response())
        finally:
            await self.pool.release(connection)


async def caller(send: Any, key: str, turns: int) -> None:
    for _ in range(turns):
        await send("SET", key, "x" * 200)
        await send("GET", key)
        await send("PEXPIRE", key, 60_000)


async def measure(url: str, commands: int, rounds: int, callers: list[int]) -> dict[tuple[str, int], float]:
    settings = main.load_settings(
        {"SESSION_BACKEND": "valkey", "VALKEY_URL": url, "VALKEY_PREFIX": "bench" + secrets.token_hex(4)}
    )
    backends = {"line": ValkeyBackend(settings), "pooled": Pooled(settings)}
    for backend in backends.values():
        await backend.aopen()
    best: dict[tuple[str, int], float] = {}
    try:
        for n in callers:
            turns = max(1, commands // (3 * n))
            for _ in range(rounds):
                for name, backend in backends.items():
                    send = backend._send
                    keys = [f"{settings.get('VALKEY_PREFIX')}:{{k{i}}}" for i in range(n)]
                    await asyncio.gather(*(caller(send, key, 5) for key in keys))  # warm: connections, caches
                    t0 = time.process_time()
                    await asyncio.gather(*(caller(send, key, turns) for key in keys))
                    used = 1e6 * (time.process_time() - t0) / (3 * turns * n)
                    best[name, n] = min(best.get((name, n), used), used)
    finally:
        for backend in backends.values():
            await backend.aclose()
    return best


def main_() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=6000, help="per round, callers and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callers", default="1,8,32")
    parser.add_argument("--valkey-url", default="", help="an existing server; default: a private one on core 1")
    args = parser.parse_args()
    callers = [int(n) for n in args.callers.split(",")]
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        if args.valkey_url:
            best = asyncio.run(measure(args.valkey_url, args.commands, args.rounds, callers))
        else:
            with private_valkey(Path(tmp)) as url:
                best = asyncio.run(measure(url, args.commands, args.rounds, callers))
    print(f"\nclient CPU per command, best of {args.rounds} alternating rounds\n")
    print(f"{'callers':>8} {'line µs':>9} {'pooled µs':>10} {'pooled / line':>14}")
    rows = []
    for n in callers:
        line, pooled = best["line", n], best["pooled", n]
        print(f"{n:8d} {line:9.1f} {pooled:10.1f} {pooled / line:14.2f}")
        case = f"{n} callers, SET GET PEXPIRE in turn"
        for name, value in (("line", line), ("pooled round trip (replaced)", pooled)):
            rows.append(
                {
                    "bench": "valkey line",
                    "case": case,
                    "metric": f"client CPU per command, {name}",
                    "unit": "µs",
                    "value": round(value, 1),
                    "target": None,
                }
            )
        rows.append(
            {
                "bench": "valkey line",
                "case": case,
                "metric": "pooled / line",
                "unit": "×",
                "value": round(pooled / line, 2),
                "target": None,
            }
        )
    print("BENCH " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main_())
