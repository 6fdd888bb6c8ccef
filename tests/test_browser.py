"""The browser phone (browser.py): the page, its token, its own call ids, media mode's bridge for a page.

The first part drives the socket over raw ASGI; the second runs the real page in headless Chromium (Debian's
package, driven by Playwright) with a fake microphone playing speech from espeak-ng.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import msgspec
import pytest
from conftest import TOKEN, Twilio, concurrent, env
from litestar import Litestar
from test_media import Script, ScriptedPlugin, Socket, burst, session_of, silence, spoken, until

import main
import phone
from main import CallerDone, CallerSpeaking, ReplyDone, ToolCall, Usage

PHONE_TOKEN = "browser-phone-token-" + "x" * 12
OFFER = ["switchboard.phone", f"token.{PHONE_TOKEN}"]


def browser_env(**overrides: str) -> dict[str, str]:
    return env(BROWSER_PHONE_TOKEN=PHONE_TOKEN, **overrides)


def events(socket: Socket, name: str) -> list[dict[str, Any]]:
    """The browser-only events of one kind the page got."""
    return [m for m in map(json.loads, socket.texts) if m["event"] == f"browser.{name}"]


async def dial(app: Litestar, *offer: str) -> tuple[Socket, phone.MediaPlayer]:
    """Open the page's socket and start its stream as the page does, with the ids the server assigned."""
    socket = Socket(app, {}, path="/phone/socket", subprotocols=offer or OFFER)
    assert await socket.open()
    await until(lambda: bool(events(socket, "call")))
    call = events(socket, "call")[0]
    player = socket.player = phone.MediaPlayer(socket.send, call["streamSid"], speed=8.0)
    await player.start(call["callSid"])
    await until(lambda: session_of(app, call["callSid"]) is not None)
    return socket, player


def sid_of(socket: Socket) -> str:
    return str(events(socket, "call")[0]["callSid"])


class Records:
    """A call recorder keeping what it is told."""

    def __init__(self) -> None:
        self.calls: list[main.CallRecord] = []
        self.turns: list[main.TurnRecord] = []

    def turn_finished(self, record: main.TurnRecord) -> None:
        self.turns.append(record)

    def call_finished(self, record: main.CallRecord) -> None:
        self.calls.append(record)


# -- the page and its token


async def test_the_page_is_a_404_without_a_token_and_served_with_it() -> None:
    async with concurrent(main.create_app(env(MODE="media"))) as client:
        assert (await client.get("/phone")).status_code == 404
        assert (await client.get("/phone/phone.js")).status_code == 404
    async with concurrent(main.create_app(browser_env())) as client:
        page, script = await client.get("/phone"), await client.get("/phone/phone.js")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<button id="call" type="button">Call</button>' in page.text and 'role="log"' in page.text
    assert script.status_code == 200 and script.headers["content-type"] == "text/javascript"


def test_a_short_token_is_refused_at_startup_with_what_to_set() -> None:
    with pytest.raises(main.ConfigError, match="BROWSER_PHONE_TOKEN must be at least 16"):
        main.create_app(env(BROWSER_PHONE_TOKEN="short"))


async def test_an_upgrade_without_the_right_token_never_opens_and_the_token_is_never_logged(logs: Any) -> None:
    app = main.create_app(browser_env())
    async with concurrent(app):
        for offer in (
            [],
            ["switchboard.phone"],
            ["switchboard.phone", "token.browser-phone-token-xxxxxxxxxxxy"],
            [f"token.{PHONE_TOKEN}"],  # the right token without the page's protocol
        ):
            socket = Socket(app, {}, path="/phone/socket", subprotocols=offer)
            assert await socket.open() is False
        socket, player = await dial(app)
        assert socket.subprotocol == "switchboard.phone"  # never the token: the server answers with the protocol
        await player.stop(sid_of(socket))
    refusals = [line for line in logs.lines if "route=/phone/socket" in line]
    assert [line.split(" route=")[0] for line in refusals] == ["warning browser phone token missing"] * 2 + [
        "warning browser phone token mismatch",
        "warning browser phone protocol mismatch",
    ]
    assert not any(PHONE_TOKEN in line for line in logs.lines)


# -- its own call ids


async def test_browser_calls_have_ids_no_twilio_route_or_media_socket_accepts() -> None:
    app = main.create_app(browser_env(MODE="media"))
    async with concurrent(app) as client:
        socket, player = await dial(app)
        sid = sid_of(socket)
        assert sid.startswith("BR") and len(sid) == 34 and int(sid[2:], 16) >= 0
        twilio = Twilio(client, call_sid=sid)  # even signed with the auth token, a BR id is not a Twilio call
        assert (await twilio.post("/media-action", CallStatus="completed")).status_code == 400
        assert (await twilio.post("/status", CallStatus="completed")).status_code == 400
        media = Socket(app, {"x-twilio-signature": main_signature()})
        assert await media.open()
        await phone.MediaPlayer(media.send, "MZ" + secrets.token_hex(16)).start(sid)
        await asyncio.wait_for(media.closed.wait(), 5)  # `start` for a browser call: the Twilio socket closes
        assert session_of(app, sid) is not None  # and the browser call goes on
        other = Socket(app, {}, path="/phone/socket", subprotocols=OFFER)
        assert await other.open()
        await until(lambda: bool(events(other, "call")))
        await phone.MediaPlayer(other.send, "MZ" + secrets.token_hex(16)).start(sid)  # not the id it was given
        await asyncio.wait_for(other.closed.wait(), 5)
        await player.stop(sid)


def main_signature() -> str:
    import webhooks

    return webhooks.twilio_signature(TOKEN, "ws://testserver.local/media", [])


# -- media mode's bridge, for a page


async def test_a_browser_call_is_a_media_call_with_turn_events_and_a_browser_record() -> None:
    app = main.create_app(browser_env(CALL_PRICE_PER_MINUTE="0.0085"))
    records = Records()
    app.state.calls.obs.recorders.append(records)
    async with concurrent(app):
        socket, player = await dial(app)
        sid = sid_of(socket)
        assert events(socket, "call")[0]["greeting"] == main.Settings().greeting
        await player.audio(silence(100) + burst(400) + silence(700))
        await until(lambda: bool(events(socket, "turn")))
        await player.stop(sid)
        await asyncio.wait_for(socket.closed.wait(), 5)
    (turn,) = events(socket, "turn")
    assert msgspec.structs.asdict(records.turns[0])["first_audio_ms"] == turn["first_audio_ms"] is not None
    assert {k: v for k, v in turn.items() if k != "first_audio_ms"} == {
        "event": "browser.turn",
        "user": "(audio)",
        "agent": "(audio)",
        "interrupted": False,
        "cost": 0.0,
    }
    assert len(player.played) >= 400 * 8  # the parrot's answer, played by the page's side
    (record,) = records.calls
    assert (record.call_sid, record.channel, record.outcome, record.phone_cost) == (sid, "browser", "completed", 0.0)
    assert session_of(app, sid) is None
    assert app.state.calls.obs.browser_calls._value.get() == 1


@pytest.mark.parametrize(
    ("tool", "arguments", "told"),
    [
        ("end_call", {}, [{"event": "browser.hangup"}]),
        ("transfer_call", {"reason": "billing"}, [{"event": "browser.transfer", "number": "+15005550009"}]),
    ],
)
async def test_a_tool_that_ends_the_call_tells_the_page_what_twilio_would_do(
    tool: str, arguments: dict[str, Any], told: list[dict[str, Any]]
) -> None:
    Script.answers = [
        [CallerSpeaking(), CallerDone(), ToolCall(id="c1", name=tool, arguments=arguments), ReplyDone()],
        [*spoken("a2", "Goodbye!", 200), ReplyDone(usage=Usage(audio_output_tokens=10))],
    ]
    app = main.create_app(
        browser_env(SPEECH_MODEL="scripted", TRANSFER_NUMBER="+15005550009"), plugins=[ScriptedPlugin()]
    )
    async with concurrent(app):
        socket, player = await dial(app)
        await player.audio(burst(300))
        await asyncio.wait_for(socket.closed.wait(), 10)
        sid = sid_of(socket)
    assert [m for m in map(json.loads, socket.texts) if m["event"] in ("browser.hangup", "browser.transfer")] == told
    assert events(socket, "turn")[-1]["agent"] == "Goodbye!"
    assert session_of(app, sid) is None


async def test_at_most_max_calls_at_once_and_each_at_most_max_minutes() -> None:
    app = main.create_app(browser_env(BROWSER_PHONE_MAX_CALLS="1", BROWSER_PHONE_MAX_MINUTES="0.005"))
    async with concurrent(app):
        socket, _ = await dial(app)
        busy = Socket(app, {}, path="/phone/socket", subprotocols=OFFER)
        assert await busy.open()  # accepted, so the page can show why it closes at once
        await asyncio.wait_for(busy.closed.wait(), 5)
        assert busy.close_code == 1013 and busy.texts == []
        await asyncio.wait_for(socket.closed.wait(), 5)  # 0.3 s later: the limit
    assert [m["event"] for m in map(json.loads, socket.texts) if m["event"].startswith("browser.")] == [
        "browser.call",
        "browser.say",
        "browser.hangup",
    ]
    assert "0.005 minute limit" in events(socket, "say")[0]["text"]


async def test_a_draining_replica_asks_the_page_to_reconnect_and_the_call_carries_on() -> None:
    app = main.create_app(browser_env())
    async with concurrent(app):
        socket, player = await dial(app)
        sid = sid_of(socket)
        await player.audio(burst(300) + silence(700))
        await until(lambda: bool(events(socket, "turn")))
        await app.state.modes["media"].drain()
        await asyncio.wait_for(socket.closed.wait(), 5)
        assert events(socket, "reconnect") == [{"event": "browser.reconnect", "callSid": sid}]
        again, player = await dial(app, *OFFER, f"resume.{sid}")
        assert events(again, "call")[0]["callSid"] == sid and events(again, "call")[0]["greeting"] == ""
        session = session_of(app, sid)
        assert session is not None and session.turns == 1 and session.channel == "browser"
        await player.stop(sid)
        other, player = await dial(app, *OFFER, f"resume.BR{'0' * 32}")  # not a live call: a new one
        assert sid_of(other) != sid and events(other, "call")[0]["greeting"]
        await player.stop(sid_of(other))
