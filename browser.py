"""The browser phone: a web page plays Twilio's part of a media call with your microphone and speakers.

With BROWSER_PHONE_TOKEN set, `GET /phone` serves the page (static/); without it the routes do not exist
(404). The page reads the token from its URL's fragment (`/phone#token=...`, never sent to a server or a
proxy log) and offers it as a WebSocket subprotocol (`token.<value>`) when it opens `WS /phone/socket`:
the one header a browser lets a page set on an upgrade, so a wrong token is refused (403) before the socket
opens, and the token is compared in constant time and never logged.

The socket is media mode's own `Bridge` (media.py) speaking Twilio's media protocol to the page. What
Twilio does around a stream (speaking the greeting and other TwiML phrases, hanging up, dialling, opening
a new stream) the server does for the page with a few events Twilio never gets: `browser.call` (the call's
ids and the greeting), `browser.say`, `browser.turn` (a turn record: both sides, latency, the call's cost so far),
`browser.hangup`, `browser.transfer`, `browser.reconnect`. Browser calls get ids of their own ("BR" + 32 hex
digits), which every Twilio route refuses, so a token holder can never touch a phone call; they are
recorded with channel "browser" and cost no phone minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from pathlib import Path
from typing import Any

import msgspec
from litestar import asgi

from calls import Calls
from contract import ConfigError, Session, TurnRecord, TwilioForm, log
from media import Bridge, MediaMode, Start
from webhooks import BROWSER_SID, Receive, Scope, Send, respond

PAGE_PATH, SOCKET_PATH = "/phone", "/phone/socket"
STATIC = Path(__file__).resolve().parent / "static"
FILES = {"phone.js": b"text/javascript", "codec.js": b"text/javascript", "capture.js": b"text/javascript"}
SUBPROTOCOL = "switchboard.phone"  # the page offers it with its token; the server answers with it alone
HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"),
]


def new_call_id() -> str:
    """A browser call's id: in a namespace no Twilio CallSid (CA + 32 hex digits) can have."""
    return "BR" + secrets.token_hex(16)


def offered(scope: Scope) -> list[str]:
    """The subprotocols the page offered on its upgrade."""
    return [p for p in scope.get("subprotocols") or [] if isinstance(p, str)]


class BrowserBridge(Bridge):
    """Media mode's bridge for the page: its call id is ours, and what Twilio would do around the stream
    (the action URL's TwiML) is done with browser-only events."""

    def __init__(self, media: MediaMode, send: Send, call_sid: str, stream_sid: str) -> None:
        super().__init__(media, send)
        self.assigned, self.assigned_stream = call_sid, stream_sid
        self.why = ""  # why we closed the socket ourselves (as stored for the action URL)

    async def tell(self, event: str, **fields: Any) -> None:
        """Send the page a browser-only event (the page may be gone already)."""
        with contextlib.suppress(Exception):
            await self._send(msgspec.json.encode({"event": f"browser.{event}", **fields}).decode())

    def accepts(self, start: Start) -> bool:
        return start.call_sid == self.assigned and start.stream_sid == self.assigned_stream

    async def _start(self, start: Start) -> None:
        if self.accepts(start):  # the session opens with the socket (or carries on, after a reconnect)
            await self.calls.open_call(TwilioForm(call_sid=start.call_sid), channel="browser")
        await super()._start(start)

    async def turn_closed(self, record: TurnRecord, session: Session) -> None:
        models, _ = self.calls.obs.costs(session, 0)
        await self.tell(
            "turn",
            user=record.speech,
            agent=record.reply,
            interrupted=record.interrupted,
            first_audio_ms=record.first_audio_ms,
            cost=round(models, 6),
        )

    async def _end(self, why: str) -> None:
        self.why = why
        await super()._end(why)

    async def closing(self) -> None:
        """Do for the page what the action URL's answer would make Twilio do."""
        if not self.sid or self.superseded:  # the page hung up (`stop` ended the call), or a new socket took over
            return
        if not self.why:  # the page went away without `stop`: nobody will open a new stream
            await self.calls.end_call(self.sid, "completed")
            return
        what, number, _, _ = await self.media.conclude(self.sid)
        if what in ("failed", "goodbye"):
            await self.tell("say", text=self.settings.apology if what == "failed" else self.settings.goodbye)
        if what in ("dial", "failed") and number:
            await self.tell("transfer", number=number)
        elif what in ("hangup", "failed", "goodbye"):
            await self.tell("hangup")
        elif what == "reconnect":
            await self.tell("reconnect", callSid=self.sid)


class BrowserPhone:
    """The page, its files, and its socket; at most BROWSER_PHONE_MAX_CALLS calls at once on this replica."""

    def __init__(self, calls: Calls, media: MediaMode) -> None:
        settings = calls.settings
        self.calls, self.media, self.settings = calls, media, settings
        self.token = settings.browser_phone_token.encode()
        if len(self.token) < 16 or not all(33 <= c < 127 and c not in b'()<>@,;:\\"/[]?={}' for c in self.token):
            raise ConfigError(
                "BROWSER_PHONE_TOKEN must be at least 16 letters, digits or -._~ (it travels as a WebSocket "
                "subprotocol); for example: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        self.live: set[BrowserBridge] = set()
        self.files = {name: (STATIC / name).read_bytes() for name in ["phone.html", *FILES]}

    def routes(self) -> list[Any]:
        """GET /phone, its scripts, and WS /phone/socket."""
        page = [self._file(PAGE_PATH, "phone.html", b"text/html; charset=utf-8")]
        scripts = [self._file(f"{PAGE_PATH}/{name}", name, kind) for name, kind in FILES.items()]
        return [*page, *scripts, self._socket()]

    def _file(self, path: str, name: str, kind: bytes) -> Any:
        body = self.files[name]

        @asgi(path, copy_scope=False, name=path)
        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
                await respond(send, 405, b"405 method not allowed\n", b"text/plain")
                return
            headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), *HEADERS]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

        return endpoint

    async def _upgrade(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Accept an upgrade that offers the right token (compared in constant time); refuse any other (403)."""
        if scope["type"] != "websocket":
            await respond(send, 426, b"426 this route takes WebSocket upgrades only\n", b"text/plain")
            return False
        if (await receive())["type"] != "websocket.connect":
            return False
        protocols = offered(scope)
        given = next((p[6:] for p in protocols if p.startswith("token.")), "").encode()
        right = hmac.compare_digest(given, self.token)
        if SUBPROTOCOL not in protocols or not right:
            why = f"browser phone {'protocol' if right else 'token'} {'mismatch' if given else 'missing'}"
            log.warning(why, extra={"route": SOCKET_PATH})  # (never the token itself)
            await send({"type": "websocket.close", "code": 1008})  # before accept: the upgrade gets a 403
            return False
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        return True

    async def _resumable(self, protocols: list[str]) -> str:
        """The call a page asks to carry on after `browser.reconnect`, if it is a live browser call."""
        sid = next((p[7:] for p in protocols if p.startswith("resume.")), "")
        if not BROWSER_SID.fullmatch(sid):
            return ""
        snap = await self.calls.begin(sid)
        await self.calls.release(sid, snap.token)
        return sid if snap.session is not None and snap.session.channel == "browser" else ""

    def _socket(self) -> Any:
        limit, minutes = self.settings.browser_phone_max_calls, self.settings.browser_phone_max_minutes

        @asgi(SOCKET_PATH, copy_scope=False, name=SOCKET_PATH)
        async def socket(scope: Scope, receive: Receive, send: Send) -> None:
            if not await self._upgrade(scope, receive, send):
                return
            if len(self.live) >= limit:
                log.info("browser phone busy", extra={"route": SOCKET_PATH, "calls": len(self.live)})
                reason = f"{limit} browser calls at once is the limit (BROWSER_PHONE_MAX_CALLS); try again later"
                await send({"type": "websocket.close", "code": 1013, "reason": reason})
                return
            resumed = await self._resumable(offered(scope))
            sid = resumed or new_call_id()
            bridge = BrowserBridge(self.media, send, sid, "MZ" + secrets.token_hex(16))
            self.live.add(bridge)
            self.calls.obs.browser_calls.inc()
            log.info("browser call", extra={"call": sid, "resumed": bool(resumed)})
            # as Twilio speaks the greeting before <Connect>, the page starts its stream after it (a resumed call
            # was greeted before)
            greeting = "" if resumed else self.settings.greeting
            await bridge.tell("call", callSid=sid, streamSid=bridge.assigned_stream, greeting=greeting)
            timer = asyncio.create_task(self._limit(bridge, minutes))
            try:
                await bridge.run(receive)
            finally:
                timer.cancel()
                self.live.discard(bridge)
                if self.media.live.get(bridge.stream) is bridge:
                    del self.media.live[bridge.stream]

        return socket

    async def _limit(self, bridge: BrowserBridge, minutes: float) -> None:
        """End a call at BROWSER_PHONE_MAX_MINUTES: a browser call is free to make, not to serve."""
        await asyncio.sleep(minutes * 60)
        if bridge.sid:
            await bridge.tell("say", text=f"This browser call has reached its {minutes:g} minute limit. Goodbye!")
            await bridge._end("hangup")
