"""Fake OpenAI speech and ElevenLabs text-to-speech servers on 127.0.0.1, speaking the vendors' wire formats.

OpenAI:     POST /v1/audio/speech, `Authorization: Bearer KEY`, JSON {model, input, voice, response_format,
            instructions?}; 200 with the audio bytes (audio/mpeg for mp3, audio/wav for wav), or an error
            JSON {"error": {"message", "type", "param", "code"}}.
ElevenLabs: POST /v1/text-to-speech/{voice_id}[/stream]?output_format=mp3_22050_32, `xi-api-key: KEY`,
            JSON {text, model_id, ...}; 200 with the audio bytes (/stream: chunked), or an error JSON
            {"detail": {"status", "message"}}.
Each answer is fresh random bytes, recorded with the request, so a test can tell exactly which bytes
the vendor sent for which text.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KEY = "made-up-vendor-key-0123456789"
CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}
MAGIC = {"mp3": b"ID3\x04\x00", "wav": b"RIFF\x00\x00\x00\x00WAVE"}


class Call:
    """One request the fake received, and the audio it answered with (b"" for an error)."""

    def __init__(self, path: str, query: dict[str, list[str]], headers: dict[str, str], body: dict[str, Any]) -> None:
        self.path, self.query, self.headers, self.body = path, query, headers, body
        self.at = time.monotonic()
        self.audio = b""

    @property
    def text(self) -> str:
        return str(self.body.get("input") or self.body.get("text") or "")


class FakeTTS:
    """A vendor's TTS endpoint in a thread. Set `status` to answer errors, `delay` to be slow."""

    def __init__(self, vendor: str, *, size: int = 1200) -> None:
        self.vendor, self.size = vendor, size
        self.calls: list[Call] = []
        self.status = 200
        self.delay = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def texts(self) -> list[str]:
        """Every text the vendor was asked to speak, in order."""
        return [c.text for c in self.calls]

    def audio_of(self, text: str) -> bytes:
        """The bytes the vendor last answered for text."""
        return next(c.audio for c in reversed(self.calls) if c.text == text and c.audio)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        raw = h.rfile.read(int(h.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in h.headers.items()}
        call = Call(split.path, parse_qs(split.query), headers, json.loads(raw or b"{}"))
        self.calls.append(call)
        time.sleep(self.delay)
        status, error, fmt, stream = self.status, "", "mp3", False
        if self.vendor == "openai":
            fmt = call.body.get("response_format", "mp3")
            if split.path != "/v1/audio/speech":
                status, error = 404, f"Invalid URL (POST {split.path})"
            elif call.headers.get("authorization") != f"Bearer {KEY}":
                status, error = 401, "Incorrect API key provided."
            elif not call.body.get("input") or not call.body.get("model") or not call.body.get("voice"):
                status, error = 400, "Missing required parameter."
        else:
            parts = split.path.split("/")
            fmt = call.query.get("output_format", ["mp3_44100_128"])[0].split("_")[0]
            stream = parts[-1] == "stream"
            if parts[:3] != ["", "v1", "text-to-speech"] or len(parts) not in (4, 5):
                status, error = 404, "Not Found"
            elif call.headers.get("xi-api-key") != KEY:
                status, error = 401, "Invalid API key"
            elif not call.body.get("text"):
                status, error = 422, "text is required"
        if status != 200:
            error = error or "The server had an error while processing your request."
            body = (
                {"error": {"message": error, "type": "server_error", "param": None, "code": None}}
                if self.vendor == "openai"
                else {"detail": {"status": "error", "message": error}}
            )
            self._send(h, status, "application/json", json.dumps(body).encode())
            return
        call.audio = MAGIC[fmt] + secrets.token_bytes(self.size)
        self._send(h, 200, CONTENT_TYPES[fmt], call.audio, chunked=stream)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, ctype: str, body: bytes, *, chunked: bool = False) -> None:
        h.send_response(status)
        h.send_header("content-type", ctype)
        if chunked:
            h.send_header("transfer-encoding", "chunked")
            h.end_headers()
            for i in range(0, len(body), 512):
                piece = body[i : i + 512]
                h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        else:
            h.send_header("content-length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    def __enter__(self) -> FakeTTS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def fake_tts(vendor: str, **kwargs: Any) -> Iterator[FakeTTS]:
    with FakeTTS(vendor, **kwargs) as fake:
        yield fake
