#!/usr/bin/env python3
"""The dev phone: call switchboard from a terminal exactly as Twilio would, no Twilio account needed.

    python phone.py                          start the agent locally (Procfile command) and call it
    python phone.py URL --token T            call a running or deployed agent (T = its TWILIO_AUTH_TOKEN)

It places a call with a signed POST to /voice carrying Twilio's parameters, prints what each <Say>
would speak, sends each line you type as SpeechResult (+ Confidence) to the <Gather> action URL,
follows <Redirect>, <Pause>, <Hangup> and <Dial>, and prints how long every response took.
While talking: an empty line is silence; `/low TEXT` sends TEXT with a low confidence;
`/conf 0.4 TEXT` sends TEXT with that confidence; `/bye` hangs up. Lines piped on stdin work too.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

import httpx

from main import twilio_signature

HERE = Path(__file__).resolve().parent


class Phone:
    """A Twilio stand-in for one call: signs requests, runs the TwiML it gets back."""

    def __init__(
        self, base_url: str, token: str, *, caller: str = "+15005550006", to: str = "+15005550001",
        confidence: float = 0.92, out: Callable[[str], None] = print,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self.confidence = confidence
        self.out = out
        self.http = httpx.Client(timeout=20.0)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.started = time.monotonic()
        self.params = {
            "AccountSid": "AC" + secrets.token_hex(16), "ApiVersion": "2010-04-01", "CallSid": self.call_sid,
            "CallStatus": "ringing", "Called": to, "Caller": caller, "Direction": "inbound", "From": caller,
            "To": to, "CallerCountry": "US", "ToCountry": "US",
        }
        self.spoken: list[str] = []  # every <Say> text, in order
        self.timings: list[tuple[str, float]] = []  # (path, ms) of every request

    def post(self, url: str, extra: dict[str, str] | None = None) -> httpx.Response:
        """A signed form POST, as Twilio sends it."""
        url = urljoin(self.base + "/", url)
        params = self.params | (extra or {})
        headers = {"X-Twilio-Signature": twilio_signature(self.token, url, list(params.items())),
                   "I-Twilio-Idempotency-Token": secrets.token_hex(16)}
        t0 = time.perf_counter()
        response = self.http.post(url, data=params, headers=headers)
        ms = (time.perf_counter() - t0) * 1000
        self.timings.append((url.removeprefix(self.base), ms))
        return response

    def run(self, say: Iterator[tuple[str, float | None]]) -> str:
        """Place the call and talk until it ends; return how it ended."""
        try:
            return self._talk(say)
        finally:
            self.http.close()

    def _talk(self, say: Iterator[tuple[str, float | None]]) -> str:
        next_url, extra = "/voice", {}
        while True:
            response = self.post(next_url, extra)
            self.out(f"   [{self.timings[-1][0]} {response.status_code} {self.timings[-1][1]:.0f} ms]")
            self.params["CallStatus"] = "in-progress"
            if response.status_code != 200:
                self.out(f"   (Twilio would play its application-error message: HTTP {response.status_code})")
                return self.hang_up("failed")
            action = self.execute(ET.fromstring(response.content), str(response.url))
            if action is None:
                return self.hang_up("completed")
            kind, next_url = action
            extra = {}
            if kind == "gather":
                text, confidence = next(say, ("/bye", None))
                if text == "/bye":
                    return self.hang_up("completed")
                extra = {"SpeechResult": text} | ({"Confidence": f"{confidence}"} if text and confidence is not None else {})

    def execute(self, root: ET.Element, url: str) -> tuple[str, str] | None:
        """Run one TwiML document; return what Twilio would request next, or None when the call ends."""
        if root.tag != "Response":
            raise ValueError(f"not TwiML: <{root.tag}>")
        for el in root:
            if el.tag in ("Say", "Play", "Pause"):
                self.speak(el)
            elif el.tag == "Gather":
                for child in el:
                    self.speak(child)
                return "gather", urljoin(url, el.get("action") or url)
            elif el.tag == "Redirect":
                return "redirect", urljoin(url, (el.text or "").strip())
            elif el.tag == "Hangup":
                self.out("   (the agent hung up)")
                return None
            elif el.tag == "Dial":
                self.out(f"   (transferring the call to {(el.text or '').strip() or 'a person'})")
                return None
            else:
                self.out(f"   (unsupported verb <{el.tag}>)")
        return None

    def speak(self, el: ET.Element) -> None:
        """Print what a <Say>, <Play> or <Pause> would do."""
        if el.tag == "Say":
            self.spoken.append(el.text or "")
            self.out(f"agent: {el.text or ''}")
        elif el.tag == "Play":
            self.out(f"agent: [plays {el.text}]")
        elif el.tag == "Pause":
            self.out(f"   (pause {el.get('length', '1')} s)")

    def hang_up(self, status: str) -> str:
        """Send the status callback Twilio sends when a call ends."""
        duration = str(round(time.monotonic() - self.started))
        self.post("/status", {"CallStatus": status, "CallDuration": duration})
        self.out(f"   (call {status}; status callback {self.timings[-1][1]:.0f} ms)")
        return status


def typed_lines(confidence: float) -> Iterator[tuple[str, float | None]]:
    """What the caller says: typed at a prompt, or read from piped stdin."""
    while True:
        try:
            line = input("you: ") if sys.stdin.isatty() else sys.stdin.readline()
        except EOFError:
            return
        if not sys.stdin.isatty():
            if not line:
                return
            print(f"you: {line.rstrip()}")
        line = line.strip()
        if line.startswith("/low "):
            yield line[5:], 0.2
        elif line.startswith("/conf "):
            _, value, text = (line.split(" ", 2) + [""])[:3]
            yield text, float(value)
        else:
            yield line, confidence


def free_port() -> int:
    """A TCP port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_local(port: int, token: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start the agent with the Procfile's command, as Railway would, and wait until it is healthy."""
    command = (HERE / "Procfile").read_text().split("web:", 1)[1].strip().replace("$PORT", str(port))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # this venv's uvicorn
    env = {**os.environ, "PATH": path, "TWILIO_AUTH_TOKEN": token, "TRUSTED_PROXIES": "127.0.0.1", **env}
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(shlex.split(command), cwd=HERE, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the agent exited at startup:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the agent did not become healthy in 30 s:\n{log_path.read_text()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="the agent's base URL; omit to start one locally")
    parser.add_argument("--token", help="the agent's TWILIO_AUTH_TOKEN (generated when starting locally)")
    parser.add_argument("--from", dest="caller", default="+15005550006", help="the caller's number")
    parser.add_argument("--to", default="+15005550001", help="the number called")
    parser.add_argument("--confidence", type=float, default=0.92, help="Confidence sent with each line")
    parser.add_argument("--log", default=str(HERE / ".phone-server.log"), help="where the local agent logs")
    args = parser.parse_args(argv)
    server = None
    if args.url is None:
        args.token = args.token or secrets.token_hex(16)
        port = free_port()
        server = start_local(port, args.token, {}, Path(args.log))
        args.url = f"http://127.0.0.1:{port}"
        print(f"switchboard is running at {args.url} (log: {args.log}); you are calling it now.")
        print("Type what you would say. Empty line = silence, /low TEXT = low confidence, /bye = hang up.\n")
    elif not args.token:
        parser.error("--token is required with a URL: the agent's TWILIO_AUTH_TOKEN")
    try:
        Phone(args.url, args.token, caller=args.caller, to=args.to, confidence=args.confidence).run(
            typed_lines(args.confidence)
        )
    except KeyboardInterrupt:
        print()
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
