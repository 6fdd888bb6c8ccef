#!/usr/bin/env python3
"""Cold start: milliseconds from spawning the agent (the Procfile command) to its first signed /voice answer.

    python bench/cold_start.py [--runs 5]

For LLM_PROVIDER=echo, openai and anthropic (pointed at the local fake vendor from tests/fake_llm.py,
so nothing leaves the machine) it spawns a fresh server process per run and polls a signed
POST /voice until it answers 200; then it sends the first caller turn at once and reports when the
model's answer came back (that wait includes the SDK still loading in the background). It also
prints each SDK's import time in a fresh interpreter: the cost the background import keeps off
the path to the first /voice answer, and, for comparison, anthropic with its SDK imported before the
app starts (what importing it in the factory would cost). Target: first /voice < 1000 ms for every
provider.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_llm import FakeLLM, Reply  # noqa: E402

import phone  # noqa: E402

TOKEN = "bench-made-up-token"


def import_ms(module: str) -> float:
    """Import time of a module in a fresh interpreter (after the app's own imports, as in the server)."""
    code = (f"import time, litestar, msgspec, pluggy; t = time.perf_counter(); import {module}; "
            "print((time.perf_counter() - t) * 1000)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def one_run(env: dict[str, str]) -> tuple[float, float]:
    """Spawn the server; return (ms to the first /voice 200, ms to the first model answer)."""
    port = phone.free_port()
    command = (ROOT / "Procfile").read_text().split("web:", 1)[1].strip().replace("$PORT", str(port))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, "TWILIO_AUTH_TOKEN": TOKEN, "TRUSTED_PROXIES": "127.0.0.1",
                "LOG_LEVEL": "WARNING", **env}
    caller = phone.Phone(f"http://127.0.0.1:{port}", TOKEN, out=lambda line: None)
    t0 = time.perf_counter()
    server = subprocess.Popen(shlex.split(command), cwd=ROOT, env=full_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if caller.post("/voice").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode}") from None
                time.sleep(0.002)
        voice = (time.perf_counter() - t0) * 1000
        caller.params["CallStatus"] = "in-progress"
        answer = caller.post("/process-speech", {"SpeechResult": "hello", "Confidence": "0.9"})
        turn = (time.perf_counter() - t0) * 1000
        if b"fake model" not in answer.content and b"You said" not in answer.content:
            raise SystemExit(f"unexpected first answer: {answer.text}")
        return voice, turn
    finally:
        caller.http.close()
        server.terminate()
        server.wait(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} runs each (median [min-max])\n")
    for module in ("openai", "anthropic"):
        times = [import_ms(module) for _ in range(3)]
        print(f"import {module:<10} {statistics.median(times):7.0f} ms  (fresh interpreter, median of 3)")
    print()
    print(f"{'LLM_PROVIDER':<14}{'spawn -> first /voice 200':>30}{'spawn -> first model answer':>34}")
    eager = Path(tempfile.mkdtemp())  # for comparison: the SDK imported at startup, as a factory import would
    (eager / "sitecustomize.py").write_text("import anthropic\n")
    with FakeLLM() as fake:
        fake.default = Reply("Hello from the fake model.")
        variants = {"echo": {"LLM_PROVIDER": "echo"}, "openai": {"LLM_PROVIDER": "openai", **fake.env("openai")},
                    "anthropic": {"LLM_PROVIDER": "anthropic", **fake.env("anthropic")}}
        variants["(eager import)"] = {**variants["anthropic"], "PYTHONPATH": str(eager)}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.runs):  # interleaved, so a noisy moment on the machine hits every variant alike
            for name, env in variants.items():
                results[name].append(one_run(env))
    for provider, runs in results.items():
        voice, turn = [r[0] for r in runs], [r[1] for r in runs]
        print(f"{provider:<14}{statistics.median(voice):>12.0f} ms [{min(voice):.0f}-{max(voice):.0f}]"
              f"{statistics.median(turn):>17.0f} ms [{min(turn):.0f}-{max(turn):.0f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
