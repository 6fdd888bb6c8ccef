"""ConversationRelay mode: the <Connect> document, the signed socket, streamed tokens, interruptions,
digits, degraded mode, reconnection (in one process and across processes) and the dev phone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
import pytest
import websockets
from conftest import (
    BASE,
    GATHER,
    TOKEN,
    VOICE,
    Captured,
    ProviderError,
    Scripted,
    Twilio,
    concurrent,
    env,
    new_call_sid,
    plugin,
    scripted_app,
    server,
    tree,
    twiml,
)
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar import Litestar
from twilio.twiml.voice_response import VoiceResponse

import main
import phone
import relay
import turns

ROOT = Path(__file__).resolve().parent.parent
WS_URL = BASE.replace("http://", "ws://") + "/relay"
GREETING = "Hello! You are talking to switchboard. How can I help?"


# ----------------------------------------------------------------------------- Twilio's side of the socket


def setup_message(call_sid: str, **custom: str) -> dict[str, Any]:
    """The `setup` message as Twilio's documentation shows it."""
    return {"type": "setup", "sessionId": "VX" + secrets.token_hex(16), "accountSid": "AC" + "0" * 32,
            "parentCallSid": "", "callSid": call_sid, "from": "+15005550006", "to": "+15005550001",
            "forwardedFrom": "+15005550002", "callType": "PSTN", "callerName": "", "direction": "inbound",
            "callStatus": "RINGING", "customParameters": custom or {"attempt": "1"}}


def prompt(text: str, *, last: bool = True) -> dict[str, Any]:
    return {"type": "prompt", "voicePrompt": text, "lang": "en-US", "last": last}


def interrupt(heard: str, ms: Any = 460) -> dict[str, Any]:
    return {"type": "interrupt", "utteranceUntilInterrupt": heard, "durationUntilInterruptMs": ms}


def dtmf(digit: str) -> dict[str, Any]:
    return {"type": "dtmf", "digit": digit}


class Peer:
    """Twilio's side of a ConversationRelay socket; subclasses carry the frames."""

    received: list[tuple[float, dict[str, Any]]]  # (monotonic time, message) of everything received

    async def send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raise NotImplementedError

    async def reply(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every message up to the end of the talk cycle (a text with last=true, or an end)."""
        got: list[dict[str, Any]] = []
        while not got or not (got[-1].get("last") or got[-1]["type"] == "end"):
            got.append(await self.recv(timeout))
        if got[-1]["type"] == "text":  # an `end` may follow the last text at once
            with contextlib.suppress(TimeoutError):
                got.append(await self.recv(0.05))
        return got

    async def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever arrives within `seconds`."""
        got: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(await self.recv(seconds))
        return got


def text_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["token"] for m in messages if m["type"] == "text")


class AsgiPeer(Peer):
    """Drives the app's WS /relay in this event loop through raw ASGI messages (like uvicorn does)."""

    def __init__(self, app: Litestar, headers: dict[str, str], *, send_delay: float = 0.0, path: str = "/relay") -> None:
        self.app, self.send_delay = app, send_delay
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received = []
        self.accepted: bool | None = None
        self.scope = {
            "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "scheme": "ws", "server": ("testserver.local", 80), "client": ("127.0.0.1", 50000), "root_path": "",
            "path": path, "raw_path": path.encode(), "query_string": b"", "subprotocols": [], "state": {},
            "headers": [(b"host", b"testserver.local")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "extensions": {},
        }
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> bool:
        async def receive() -> dict[str, Any]:
            return await self.to_app.get()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.send":
                if self.send_delay:
                    await asyncio.sleep(self.send_delay)  # a slow network: send() blocks like a full buffer
                self.received.append((time.monotonic(), json.loads(message["text"])))
            await self.from_app.put(message)

        self.task = asyncio.create_task(self.app(self.scope, receive, send))  # type: ignore[arg-type]
        await self.to_app.put({"type": "websocket.connect"})
        first = await asyncio.wait_for(self.from_app.get(), 5)
        self.accepted = first["type"] == "websocket.accept"
        return self.accepted

    async def send(self, message: dict[str, Any]) -> None:
        await self.to_app.put({"type": "websocket.receive", "text": json.dumps(message)})

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(self.from_app.get(), timeout)
            if message["type"] == "websocket.send":
                return json.loads(message["text"])
            if message["type"] == "websocket.close":
                raise ConnectionError(f"closed by the app: {message.get('code')}")

    async def close(self, code: int = 1000) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": code})
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


class WsPeer(Peer):
    """Twilio's side over a real WebSocket (the `websockets` client) to a real server process."""

    def __init__(self, connection: Any) -> None:
        self.ws = connection
        self.received = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.received.append((time.monotonic(), message))
        return message


def signed(url: str, token: str = TOKEN) -> dict[str, str]:
    return {"x-twilio-signature": main.twilio_signature(token, url, [])}


@contextlib.asynccontextmanager
async def relay_call(app: Litestar, call_sid: str | None = None, **custom: str) -> AsyncIterator[tuple[AsgiPeer, Twilio]]:
    """The app running; a call answered in relay mode; its socket open and set up."""
    async with concurrent(app) as client:
        twilio = Twilio(client, call_sid=call_sid)
        answer = await twilio.post("/voice?mode=relay", CallStatus="ringing")
        assert answer.status_code == 200, answer.text
        peer = AsgiPeer(app, signed(WS_URL))
        assert await peer.open()
        await peer.send(setup_message(twilio.call_sid, **custom))
        try:
            yield peer, twilio
        finally:
            if peer.task is not None and not peer.task.done():
                await peer.close()


def session_of(app: Litestar, call_sid: str) -> main.Session | None:
    call = app.state.engine.backend.calls.get(call_sid)
    return None if call is None or call.session is None else msgspec.msgpack.decode(call.session, type=main.Session)


def texts(*tokens: str, last_empty: bool = True) -> list[dict[str, Any]]:
    """The text messages of a reply streamed token by token."""
    out = [{"type": "text", "token": t, "last": False} for t in tokens]
    if last_empty:
        out.append({"type": "text", "token": "", "last": True})
    else:
        out[-1]["last"] = True
    return out


def words(reply: str) -> list[str]:
    """How Scripted cuts a reply into tokens."""
    return [w if i == 0 else " " + w for i, w in enumerate(reply.split(" "))]


# ----------------------------------------------------------------------------- smoke


async def test_a_relay_call_streams_the_reply_token_by_token() -> None:
    reply = "Hello there, how are you today?"
    model = Scripted(replies=[reply], gap=0.03)
    app = scripted_app(model)
    async with relay_call(app) as (peer, twilio):
        await peer.send(prompt("hi"))
        got = await peer.reply()
    assert got == texts(*words(reply))
