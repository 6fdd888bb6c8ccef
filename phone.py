#!/usr/bin/env python3
"""The dev phone: call switchboard from a terminal exactly as Twilio would, no Twilio account needed.

    python phone.py                          start the agent locally (Procfile command) and call it
    python phone.py URL --token T            call a running or deployed agent (T = its TWILIO_AUTH_TOKEN)
    python phone.py --relay                  call /voice?mode=relay (ConversationRelay mode)
    python phone.py --media [--wav F]        call /voice?mode=media (Media Streams: audio both ways)
    python phone.py --browser                start the agent locally and print the browser phone's link

It places a call with a signed POST to /voice carrying Twilio's parameters, prints what each <Say>
would speak, sends each line you type as SpeechResult (+ Confidence) to the <Gather> action URL,
follows <Redirect>, <Pause>, <Hangup> and <Dial>, and prints how long every response took.
While talking: an empty line is silence; `/low TEXT` sends TEXT with a low confidence;
`/conf 0.4 TEXT` sends TEXT with that confidence; `/bye` hangs up. Lines piped on stdin work too.

When the agent answers <Connect><ConversationRelay>, the phone plays ConversationRelay: it opens the
wss/ws URL with a signed upgrade, sends `setup`, sends each line as a `prompt` and prints the reply's
tokens as they stream. `/interrupt` interrupts the reply with what has been printed so far; a line of
digits (0-9 * #) is sent as key presses. When the agent ends the session (or the socket drops), the
phone calls the <Connect action> URL like Twilio and follows its answer.

When the agent answers <Connect><Stream> (--media), the phone plays Twilio's media stream: a signed
upgrade, `connected` and `start` (the <Parameter>s as customParameters), then the caller's audio in
20 ms frames on the line's clock: the file given with --wav (8 kHz mono, μ-law or 16-bit PCM) or three
generated speech-like bursts, each followed by quiet until the answer has played and a second has
passed. It plays the agent's audio on a simulated clock (--speed 2 = twice real time), echoes its marks
and obeys `clear`, and prints for every answer how long after the caller's last loud frame its first
audio came, how much audio came and whether it was interrupted; --bargein speaks over the first answer.
When the agent closes the stream, the phone requests the <Connect action> URL and follows its answer
(<Hangup/>, <Dial>, <Say>, or a new <Connect><Stream>: a reconnect); when the caller is done, it sends
`stop` and hangs up.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import json
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

import pcm
from webhooks import twilio_signature

HERE = Path(__file__).resolve().parent


class Phone:
    """A Twilio stand-in for one call: signs requests, runs the TwiML it gets back."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        caller: str = "+15005550006",
        to: str = "+15005550001",
        confidence: float = 0.92,
        out: Callable[[str], None] = print,
        voice: str = "/voice",
        write: Callable[[str], None] | None = None,
        typing: bool = False,
        caller_audio: CallerAudio | None = None,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.voice = voice
        self.write = write or stdout
        self.typing = typing  # a person at a terminal: relay replies stream while they type
        self.token = token
        self.confidence = confidence
        self.out = out
        self.http = httpx.Client(timeout=20.0)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.started = time.monotonic()
        self.params = {
            "AccountSid": "AC" + secrets.token_hex(16),
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": "ringing",
            "Called": to,
            "Caller": caller,
            "Direction": "inbound",
            "From": caller,
            "To": to,
            "CallerCountry": "US",
            "ToCountry": "US",
        }
        self.spoken: list[str] = []  # every <Say> text, in order
        self.timings: list[tuple[str, float]] = []  # (path, ms) of every request
        self.relay_noun: ET.Element | None = None
        self.stream_noun: ET.Element | None = None
        self.caller_audio = caller_audio or CallerAudio([])  # what the caller says on a media stream

    def post(self, url: str, extra: dict[str, str] | None = None) -> httpx.Response:
        """A signed form POST, as Twilio sends it."""
        url = urljoin(self.base + "/", url)
        params = self.params | (extra or {})
        headers = {
            "X-Twilio-Signature": twilio_signature(self.token, url, list(params.items())),
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
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
        next_url, extra = self.voice, dict[str, str]()
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
            if kind == "connect" and self.relay_noun is not None:
                session = RelaySession(self, self.relay_noun)
                callback = session.run(say)
                if callback is None:  # the caller hung up: Twilio reports it to the action URL, then the status
                    self.post(
                        next_url,
                        {
                            "CallStatus": "completed",
                            "SessionStatus": "completed",
                            "SessionDuration": session.duration(),
                        },
                    )
                    return self.hang_up("completed")
                extra = callback
            elif kind == "connect" and self.stream_noun is not None:
                streamed = MediaSession(self, self.stream_noun, self.caller_audio).run()
                if streamed is None:  # the caller hung up: the stream stops, then the action URL and the status
                    self.post(next_url, {"CallStatus": "completed"})
                    self.out(f"   [{self.timings[-1][0]} {self.timings[-1][1]:.0f} ms]")
                    return self.hang_up("completed")
                extra = streamed
            if kind == "gather":
                text, confidence = next(say, ("/bye", None))
                if text == "/bye":
                    return self.hang_up("completed")
                extra = {"SpeechResult": text} | (
                    {"Confidence": f"{confidence}"} if text and confidence is not None else {}
                )

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
            elif el.tag == "Connect" and (noun := el.find("ConversationRelay")) is not None:
                self.relay_noun, self.stream_noun = noun, None
                return "connect", urljoin(url, el.get("action") or url)
            elif el.tag == "Connect" and (noun := el.find("Stream")) is not None:
                self.relay_noun, self.stream_noun = None, noun
                return "connect", urljoin(url, el.get("action") or url)
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


def stdout(text: str) -> None:
    """Print without a newline, at once (streamed tokens)."""
    sys.stdout.write(text)
    sys.stdout.flush()


class RelaySession:
    """Twilio's side of one ConversationRelay socket, in the terminal."""

    REPLY_WAIT = 30.0  # seconds to wait for the agent's talk cycle before reading the next line

    def __init__(self, phone: Phone, noun: ET.Element) -> None:
        self.phone = phone
        self.url = noun.get("url", "")
        self.greeting = noun.get("welcomeGreeting", "")
        self.custom = {p.get("name", ""): p.get("value", "") for p in noun.iter("Parameter")}
        self.started = time.monotonic()
        self.heard: list[str] = []  # the current reply's tokens printed so far
        self.idle = threading.Event()  # no reply in progress: the caller may talk
        self.first = threading.Event()  # the current reply has begun
        self.muted = False  # after /interrupt, until the next prompt
        self.end: dict[str, str] | None = None  # the agent's `end` message
        self.asked = self.first_ms = 0.0

    def duration(self) -> str:
        return str(round(time.monotonic() - self.started))

    def run(self, say: Iterator[tuple[str, float | None]]) -> dict[str, str] | None:
        """Talk until the socket closes; return the <Connect action> parameters (None: the caller hung up)."""
        from websockets.exceptions import InvalidHandshake
        from websockets.sync.client import connect

        phone = self.phone
        if self.greeting:
            phone.spoken.append(self.greeting)
            phone.out(f"agent: {self.greeting}")
        signature = twilio_signature(phone.token, self.url, [])
        t0 = time.perf_counter()
        try:
            ws = connect(self.url, additional_headers={"X-Twilio-Signature": signature}, open_timeout=10)
        except (OSError, InvalidHandshake) as e:
            phone.out(f"   (ConversationRelay could not open {self.url}: {e})")
            return self.callback(
                "failed", ErrorCode="39001", ErrorMessage="Network connection to WebSocket server failed."
            )
        ms = (time.perf_counter() - t0) * 1000
        phone.timings.append((urlsplit(self.url).path, ms))
        phone.out(f"   [{self.url} connected {ms:.0f} ms]")
        with ws:
            ws.send(
                json.dumps(
                    {
                        "type": "setup",
                        "sessionId": "VX" + secrets.token_hex(16),
                        "accountSid": phone.params["AccountSid"],
                        "parentCallSid": "",
                        "callSid": phone.call_sid,
                        "from": phone.params["From"],
                        "to": phone.params["To"],
                        "forwardedFrom": "",
                        "callType": "PSTN",
                        "callerName": "",
                        "direction": "inbound",
                        "callStatus": "IN-PROGRESS",
                        "customParameters": self.custom,
                    }
                )
            )
            reader = threading.Thread(target=self.read, args=(ws,), daemon=True)
            self.idle.set()
            reader.start()
            while reader.is_alive() and self.end is None:
                if not phone.typing:  # piped lines: one after each reply (a person may type while it streams)
                    self.idle.wait(self.REPLY_WAIT)
                text, _ = next(say, ("/bye", None))
                if text != "/interrupt":  # the caller talks (or hangs up) once the agent's talk cycle is over
                    self.idle.wait(self.REPLY_WAIT)
                if text == "/bye":
                    return None
                if not reader.is_alive() or self.end is not None:
                    break
                self.say(ws, text)
            reader.join()
        if self.end is not None:
            handoff = self.end.get("handoffData")
            return self.callback("ended", **({"HandoffData": handoff} if handoff else {}))
        phone.out("   (the socket closed without `end`)")
        return self.callback("failed", ErrorCode="39001", ErrorMessage="WebSocket closed unexpectedly.")

    def callback(self, status: str, **more: str) -> dict[str, str]:
        return {"SessionStatus": status, "SessionDuration": self.duration(), **more}

    def say(self, ws: Any, text: str) -> None:
        """Send one line: an interrupt, key presses, or what the caller said."""
        if text == "/interrupt":
            if self.idle.is_set():  # Twilio interrupts only an agent that is talking
                self.phone.out("   (the agent is not talking; nothing to interrupt)")
                return
            self.first.wait(self.REPLY_WAIT)  # interrupt the agent once it has started talking
            heard, self.muted = "".join(self.heard), True
            since = round((time.monotonic() - self.asked) * 1000)
            ws.send(
                json.dumps({"type": "interrupt", "utteranceUntilInterrupt": heard, "durationUntilInterruptMs": since})
            )
            if heard:
                self.phone.write("\n")
            self.phone.out(f"   (you interrupted after: {heard!r})")
            self.heard = []
            self.idle.set()
            return
        if not text:  # silence: ConversationRelay sends nothing
            return
        self.idle.clear()
        self.first.clear()
        self.muted, self.heard, self.asked = False, [], time.monotonic()
        if all(c in "0123456789*#" for c in text):
            for digit in text:
                ws.send(json.dumps({"type": "dtmf", "digit": digit}))
        else:
            ws.send(json.dumps({"type": "prompt", "voicePrompt": text, "lang": "en-US", "last": True}))

    def read(self, ws: Any) -> None:
        """Print the agent's tokens as they stream; note its `end`."""
        from websockets.exceptions import ConnectionClosed

        phone = self.phone
        try:
            for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "text" and not self.muted:
                    if not self.heard:
                        phone.write("\ragent: " if phone.typing else "agent: ")  # over the "you: " prompt
                        self.first_ms = (time.monotonic() - self.asked) * 1000
                    self.heard.append(message.get("token", ""))
                    phone.write(message.get("token", ""))
                    self.first.set()
                    if message.get("last"):
                        total = (time.monotonic() - self.asked) * 1000
                        phone.write("\n")
                        phone.spoken.append("".join(self.heard).strip())
                        phone.out(f"   [first token {self.first_ms:.0f} ms, reply {total:.0f} ms]")
                        self.heard = []
                        self.idle.set()
                        if phone.typing:
                            phone.write("you: ")
                elif message.get("type") == "end":
                    self.end = message
                    handing_off = ", handing off" if message.get("handoffData") else ""
                    phone.out(f"   (the agent ended the session{handing_off}; press Enter)")
                    ws.close()
                    break
        except ConnectionClosed:
            pass
        finally:
            self.idle.set()
            self.first.set()


class MediaPlayer:
    """Twilio's side of a media stream: plays the agent's audio on a clock and echoes its marks as Twilio does.

    A mark is echoed when the audio sent before it has played (at once when nothing is buffered); `clear`
    drops the buffered audio and echoes every pending mark at once. `speed` > 1 plays faster than real time
    (a simulated clock). `send` carries a message to the agent (JSON text)."""

    def __init__(self, send: Callable[[str], Awaitable[None]], stream_sid: str, *, speed: float = 1.0) -> None:
        self.send_text, self.stream_sid, self.speed = send, stream_sid, speed
        self.buffer: deque[bytes | str] = deque()  # audio not yet played, and marks waiting for it
        self.played = bytearray()  # every byte of the agent's audio that played
        self.heard_marks: list[tuple[str, int]] = []  # (mark, bytes played when it echoed), as echoed
        self.heard_at_clears: list[int] = []  # what heard() said when each `clear` came
        self.flushed: list[str] = []  # marks echoed because of a `clear` (their audio never played)
        self.sizes: dict[str, int] = {}  # mark -> bytes of audio sent between the previous mark and it
        self.unmarked = 0
        self.chunks = 0  # frames of the caller's audio sent on this stream
        self.messages: list[dict[str, Any]] = []  # everything the agent sent, in order
        self.clears = 0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message))

    async def start(self, call_sid: str, **parameters: str) -> None:
        """`connected` and `start`, as Twilio opens a stream; then play what comes back."""
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        start = {
            "accountSid": "AC" + "0" * 32,
            "streamSid": self.stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": {"attempt": "1", **parameters},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await self.send({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": self.stream_sid})
        self.task = asyncio.create_task(self._play())

    async def audio(self, data: bytes, *, realtime: bool = True) -> None:
        """Send the caller's audio in 20 ms frames, paced like a phone line (divided by `speed`)."""
        t0 = time.monotonic()
        for n in range(0, len(data), 160):
            await self.frame(data[n : n + 160])
            if realtime:  # on the clock from the first frame, so the pace does not drift with the sends
                await asyncio.sleep(max(0.0, t0 + (n // 160 + 1) * 0.02 / self.speed - time.monotonic()))

    async def frame(self, data: bytes) -> None:
        """Send one frame of the caller's audio, numbered and stamped on the stream's clock as Twilio does."""
        self.chunks += 1
        payload = base64.b64encode(data).decode()
        media = {
            "track": "inbound",
            "chunk": str(self.chunks),
            "timestamp": str((self.chunks - 1) * 20),
            "payload": payload,
        }
        await self.send(
            {"event": "media", "sequenceNumber": str(self.chunks + 1), "media": media, "streamSid": self.stream_sid}
        )

    async def digit(self, digit: str) -> None:
        await self.send(
            {"event": "dtmf", "streamSid": self.stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}}
        )

    async def stop(self, call_sid: str) -> None:
        await self.send(
            {
                "event": "stop",
                "streamSid": self.stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": call_sid},
            }
        )

    async def received(self, text: str) -> None:
        """A message from the agent: queue its audio and marks, or clear."""
        message = json.loads(text)
        self.messages.append(message)
        event = message.get("event")
        if event == "media":
            audio = base64.b64decode(message["media"]["payload"])
            self.unmarked += len(audio)
            self.buffer.append(audio)
        elif event == "mark":
            self.sizes[message["mark"]["name"]], self.unmarked = self.unmarked, 0
            self.buffer.append(message["mark"]["name"])
        elif event == "clear":
            self.clears += 1
            pending = [item for item in self.buffer if isinstance(item, str)]
            self.heard_at_clears.append(self.heard())
            self.flushed += pending
            self.buffer.clear()
            for name in pending:
                await self._echo(name)
        self.wake.set()

    async def _echo(self, name: str) -> None:
        self.heard_marks.append((name, len(self.played)))
        await self.send({"event": "mark", "sequenceNumber": "0", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def _play(self) -> None:
        while True:
            while not self.buffer:
                self.wake.clear()
                await self.wake.wait()
            item = self.buffer[0]
            if isinstance(item, str):
                self.buffer.popleft()
                await self._echo(item)
                continue
            frame, rest = item[:160], item[160:]
            await asyncio.sleep(len(frame) / 8000 / self.speed)
            if self.buffer and self.buffer[0] is item:  # (not cleared meanwhile)
                self.played += frame
                if rest:
                    self.buffer[0] = rest
                else:
                    self.buffer.popleft()

    def heard(self) -> int:
        """Bytes of audio in messages whose marks echoed because they played (not flushed by a `clear`)."""
        return sum(self.sizes.get(name, 0) for name, _ in self.heard_marks if name not in self.flushed)

    async def drained(self, timeout: float = 10.0) -> None:
        """Wait until everything sent so far has played."""
        async with asyncio.timeout(timeout):
            while self.buffer:
                await asyncio.sleep(0.005)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


LOUD_DB = -40.0  # a frame at least this loud is the caller speaking (the parrot's default threshold)
SILENT_FRAME = bytes([pcm.SILENCE]) * pcm.FRAME
BURSTS = ((600, 200.0), (900, 260.0), (1200, 180.0))  # the generated caller's utterances: (ms, pitch in Hz)


def speech_burst(ms: int, hz: float = 220.0) -> bytes:
    """Speech-like μ-law audio: a tone whose pitch wobbles and whose loudness swells like syllables."""
    samples, phase = array.array("h"), 0.0
    for n in range(ms * 8):
        t = n / pcm.RATE
        phase += 2 * math.pi * (hz + 40 * math.sin(2 * math.pi * 3 * t)) / pcm.RATE
        samples.append(int(9000 * (0.7 + 0.3 * math.sin(2 * math.pi * 4 * t)) * math.sin(phase)))
    return pcm.pcm16_to_ulaw(samples.tobytes())


def read_wav(path: Path) -> bytes:
    """A mono 8 kHz WAV file (μ-law or 16-bit PCM) as μ-law bytes; anything else is refused with the reason."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path} is not a WAV file")
    fmt, audio, at = b"", None, 12
    while at + 8 <= len(data):  # the wave module reads PCM only, so walk the chunks for μ-law too
        kind, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        if kind == b"fmt ":
            fmt = data[at + 8 : at + 8 + size]
        elif kind == b"data":
            audio = data[at + 8 : at + 8 + size]
        at += 8 + size + size % 2
    if len(fmt) < 16 or audio is None:
        raise ValueError(f"{path} has no fmt or data chunk")
    tag, channels, rate = (
        int.from_bytes(fmt[0:2], "little"),
        int.from_bytes(fmt[2:4], "little"),
        int.from_bytes(fmt[4:8], "little"),
    )
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format's first two bytes
        tag = int.from_bytes(fmt[24:26], "little")
    if rate != pcm.RATE or channels != 1:
        raise ValueError(
            f"{path} is {rate} Hz, {channels} channel(s); the phone line is 8000 Hz mono: "
            f"convert it first, e.g. sox {path.name} -r 8000 -c 1 -e mu-law out.wav"
        )
    if tag == 7 and bits == 8:
        return audio
    if tag == 1 and bits == 16:
        return pcm.pcm16_to_ulaw(audio)
    raise ValueError(f"{path} is format {tag} with {bits}-bit samples; use 8-bit μ-law (7) or 16-bit PCM (1)")


class CallerAudio:
    """What the caller says on a media call: utterances, each followed by quiet until the reply has played.

    Kept by the Phone across streams, so a reconnect carries on with the utterances not yet said."""

    def __init__(self, utterances: list[bytes], *, speed: float = 1.0, bargein: bool = False, pause: float = 1.0):
        self.pending = deque(utterances)
        self.said: list[bytes] = []  # every utterance sent, in order
        self.speed, self.bargein, self.pause = speed, bargein, pause
        self.turns: list[MediaTurn] = []
        self.reported = 0  # turns printed


class MediaTurn:
    """The agent's answer to the caller's speech: when its audio began, how much came, if it was cut."""

    def __init__(self, first_ms: float | None, played_before: int) -> None:
        self.first_ms = first_ms  # from the caller's last loud frame to the answer's first audio (wall clock)
        self.played_before = played_before  # bytes the player had played when this answer began
        self.audio = bytearray()
        self.clears = 0
        self.heard: float | None = None  # seconds of it played when the first `clear` came

    def line(self, n: int) -> str:
        cut = f", cut off after {self.heard:.2f} s" if self.heard is not None else ""
        first = "unprompted" if self.first_ms is None else f"first audio {self.first_ms:.0f} ms after you stopped"
        return f"   [answer {n}: {first}, {len(self.audio) / pcm.RATE:.2f} s of audio{cut}]"


class MediaSession:
    """Twilio's side of one <Connect><Stream> socket: the caller's audio out in 20 ms frames, the agent's played."""

    REPLY_WAIT = 5.0  # seconds (line time) of quiet after an utterance before the caller gives up on an answer
    LONGEST_QUIET = 60.0  # seconds (line time) the caller waits for an answer to finish playing
    BARGE_AFTER = 0.3  # seconds of the first answer played before --bargein speaks over it

    def __init__(self, phone: Phone, noun: ET.Element, caller: CallerAudio) -> None:
        self.phone, self.caller = phone, caller
        self.url = noun.get("url", "")
        self.custom = {p.get("name", ""): p.get("value", "") for p in noun.iter("Parameter")}
        self.player: MediaPlayer | None = None
        self.last_loud = 0.0  # when the caller's last loud frame went out
        self.spoke = False  # the caller spoke since the agent's last answer began
        self.due = 0.0  # when the next frame is due (monotonic)

    def run(self) -> dict[str, str] | None:
        """Stream until a side closes the socket; return the action URL's parameters (None: the caller hung up)."""
        return asyncio.run(self._run())

    async def _run(self) -> dict[str, str] | None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        phone = self.phone
        signature = twilio_signature(phone.token, self.url, [])
        t0 = time.perf_counter()
        try:
            ws = await connect(self.url, additional_headers={"X-Twilio-Signature": signature}, open_timeout=10)
        except (OSError, InvalidHandshake, TimeoutError) as e:
            phone.out(f"   (the media stream could not open {self.url}: {e}; hanging up)")
            return None
        ms = (time.perf_counter() - t0) * 1000
        phone.timings.append((urlsplit(self.url).path, ms))
        phone.out(f"   [{self.url} connected {ms:.0f} ms]")

        async def send(text: str) -> None:
            with contextlib.suppress(ConnectionClosed):  # the agent closed: the reader notices
                await ws.send(text)

        self.player = player = MediaPlayer(send, "MZ" + secrets.token_hex(16), speed=self.caller.speed)
        try:
            await player.start(phone.call_sid, **self.custom)
            reader = asyncio.create_task(self._read(ws))
            speaker = asyncio.create_task(self._speak(player))
            await asyncio.wait([reader, speaker], return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():  # the caller said everything: hang up (Twilio sends `stop`, the socket closes)
                await player.stop(phone.call_sid)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader, 5)
                return None
            speaker.cancel()
            await asyncio.gather(speaker, return_exceptions=True)
            phone.out(f"   (the agent closed the stream: code {ws.close_code})")
            return {}
        finally:
            player.close()
            await ws.close()
            self.report(len(self.caller.turns))

    async def _read(self, ws: Any) -> None:
        """Play what the agent sends; note each answer's first audio, its length and its interruptions."""
        from websockets.exceptions import ConnectionClosed

        assert self.player is not None
        player, turns = self.player, self.caller.turns
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                await player.received(raw)
                message = player.messages[-1]
                event = message.get("event")
                if event == "media":
                    if self.spoke or not turns:  # the first audio of an answer
                        first = (time.monotonic() - self.last_loud) * 1000 if self.spoke else None
                        self.spoke = False
                        self.report(len(turns))
                        turns.append(MediaTurn(first, len(player.played)))
                    turns[-1].audio += base64.b64decode(message["media"]["payload"])
                elif event == "clear" and turns:
                    turns[-1].clears += 1
                    if turns[-1].heard is None:
                        turns[-1].heard = (len(player.played) - turns[-1].played_before) / pcm.RATE
                    self.phone.out("   (the agent stopped talking: clear)")
                elif event != "mark":
                    self.phone.out(f"   (the agent sent {str(event)[:40]!r}, which Twilio does not know)")

    def report(self, upto: int) -> None:
        """Print the answers before `upto` not printed yet (an answer is printed once it is over)."""
        while self.caller.reported < upto:
            self.caller.reported += 1
            self.phone.out(self.caller.turns[self.caller.reported - 1].line(self.caller.reported))

    async def _frame(self, frame: bytes) -> None:
        """Send one 20 ms frame when it is due on the line's clock."""
        assert self.player is not None
        await asyncio.sleep(max(0.0, self.due - time.monotonic()))
        self.due = max(self.due, time.monotonic() - 0.1) + pcm.FRAME / pcm.RATE / self.caller.speed
        await self.player.frame(frame)
        if pcm.energy_db(frame) >= LOUD_DB:
            self.last_loud, self.spoke = time.monotonic(), True

    async def _speak(self, player: MediaPlayer) -> None:
        """Say each utterance, then keep the line quiet until the answer has played and a pause has passed."""
        self.due = time.monotonic()
        while self.caller.pending:
            utterance = pcm.pad(self.caller.pending.popleft())
            self.caller.said.append(utterance)
            self.phone.out(f"you: ({len(utterance) / pcm.RATE:.2f} s of speech)")
            for n in range(0, len(utterance), pcm.FRAME):
                await self._frame(utterance[n : n + pcm.FRAME])
            await self._quiet(player, barge=self.caller.bargein and len(self.caller.said) == 1)

    async def _quiet(self, player: MediaPlayer, *, barge: bool) -> None:
        frames = idle = 0  # counted in frames, so the waits are line time at any --speed
        answers = len(self.caller.turns)
        per_second = pcm.RATE // pcm.FRAME
        while frames < self.LONGEST_QUIET * per_second:
            await self._frame(SILENT_FRAME)
            frames += 1
            idle = 0 if player.buffer else idle + 1
            answered = len(self.caller.turns) > answers
            if barge and answered:
                turn = self.caller.turns[-1]
                if len(player.played) - turn.played_before >= self.BARGE_AFTER * pcm.RATE:
                    self.phone.out("you: (speaking over the answer)")
                    return
            elif idle >= self.caller.pause * per_second and (answered or frames >= self.REPLY_WAIT * per_second):
                self.report(len(self.caller.turns))
                return


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


def browser_phone(port: int, log_path: Path) -> int:
    """Start the agent with the browser phone on (a token for this run only) and print the page's link."""
    token = secrets.token_urlsafe(24)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # (stop the agent too, in `finally`)
    server = start_local(port, secrets.token_hex(16), {"MODE": "media", "BROWSER_PHONE_TOKEN": token}, log_path)
    model = os.environ.get("SPEECH_MODEL") or "parrot"
    print(f"switchboard is running (SPEECH_MODEL={model}; log: {log_path}). Open this link and press Call:\n")
    print(f"    http://127.0.0.1:{port}/phone#token={token}\n", flush=True)
    print("Ctrl-C stops the agent.", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        print()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="the agent's base URL; omit to start one locally")
    parser.add_argument("--token", help="the agent's TWILIO_AUTH_TOKEN (generated when starting locally)")
    parser.add_argument("--from", dest="caller", default="+15005550006", help="the caller's number")
    parser.add_argument("--to", default="+15005550001", help="the number called")
    parser.add_argument("--confidence", type=float, default=0.92, help="Confidence sent with each line")
    parser.add_argument("--relay", action="store_true", help="call /voice?mode=relay (ConversationRelay mode)")
    parser.add_argument("--media", action="store_true", help="call /voice?mode=media (Media Streams mode)")
    parser.add_argument("--wav", type=Path, help="--media: what the caller says (8 kHz mono WAV, μ-law or PCM16)")
    parser.add_argument("--speed", type=float, default=1.0, help="--media: the line's clock, times real time")
    parser.add_argument("--bargein", action="store_true", help="--media: speak over the agent's first answer")
    parser.add_argument("--browser", action="store_true", help="start the agent and print the browser phone's link")
    parser.add_argument("--port", type=int, default=0, help="with --browser: the local port (default: a free one)")
    parser.add_argument("--log", default=str(HERE / ".phone-server.log"), help="where the local agent logs")
    args = parser.parse_args(argv)
    if args.browser:
        if args.url:
            parser.error("--browser starts an agent here; on a deployed one open /phone#token=<BROWSER_PHONE_TOKEN>")
        return browser_phone(args.port or free_port(), Path(args.log))
    if (args.wav or args.bargein or args.speed != 1.0) and not args.media:
        parser.error("--wav, --speed and --bargein go with --media")
    if args.speed <= 0:
        parser.error("--speed must be above 0")
    caller_audio = None
    if args.media:
        try:
            said = [read_wav(args.wav)] if args.wav else [speech_burst(ms, hz) for ms, hz in BURSTS]
        except (OSError, ValueError) as e:
            parser.error(str(e))
        caller_audio = CallerAudio(said, speed=args.speed, bargein=args.bargein)
    server = None
    if args.url is None:
        args.token = args.token or secrets.token_hex(16)
        port = free_port()
        server = start_local(port, args.token, {"MODE": "media"} if args.media else {}, Path(args.log))
        args.url = f"http://127.0.0.1:{port}"
        print(f"switchboard is running at {args.url} (log: {args.log}); you are calling it now.")
        if not args.media:
            print("Type what you would say. Empty line = silence, /low TEXT = low confidence, /bye = hang up.\n")
    elif not args.token:
        parser.error("--token is required with a URL: the agent's TWILIO_AUTH_TOKEN")
    try:
        voice = "/voice?mode=relay" if args.relay else "/voice?mode=media" if args.media else "/voice"
        Phone(
            args.url,
            args.token,
            caller=args.caller,
            to=args.to,
            confidence=args.confidence,
            voice=voice,
            typing=sys.stdin.isatty() and not args.media,
            caller_audio=caller_audio,
        ).run(typed_lines(args.confidence))
    except KeyboardInterrupt:
        print()
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
