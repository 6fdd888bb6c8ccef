"""The browser phone (browser.py): the page, its token, its own call ids, media mode's bridge for a page.

The first part drives the socket over raw ASGI; the second runs the real page in headless Chromium (Debian's
package, driven by Playwright) with a fake microphone playing speech from espeak-ng.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import ROOT, TOKEN, Twilio, concurrent, env
from fake_realtime import FakeRealtime, Response, Utterance
from litestar import Litestar
from test_media import Script, ScriptedPlugin, Socket, burst, session_of, silence, spoken, until

import main
import pcm
import phone
from main import CallerDone, CallerSpeaking, Message, ReplyDone, ToolCall, Usage

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


async def test_a_silent_caller_gets_the_goodbye_and_the_page_hangs_up() -> None:
    app = main.create_app(browser_env(PARROT_IDLE_MS="100"))  # timeouts at 100, 400 and 700 ms of silence
    records = Records()
    app.state.calls.obs.recorders.append(records)
    async with concurrent(app):
        socket, player = await dial(app)
        await player.audio(silence(1000))
        await asyncio.wait_for(socket.closed.wait(), 5)
        sid = sid_of(socket)
    told = [m for m in map(json.loads, socket.texts) if m["event"] in ("browser.say", "browser.hangup")]
    assert told == [{"event": "browser.say", "text": main.Settings().goodbye}, {"event": "browser.hangup"}]
    assert [r.outcome for r in records.calls] == ["completed"] and session_of(app, sid) is None


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


# -- the page in a real browser: Debian's Chromium, headless, with a fake microphone playing a WAV file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--use-fake-ui-for-media-stream",  # allow the microphone without asking
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",  # (CI runs as root)
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOTS = os.environ.get("BROWSER_PHONE_SCREENSHOTS")  # a folder (docs/) to keep the page's screenshots in


def speech(path: Path, *parts: str | float) -> Path:
    """A 48 kHz mono WAV for the fake microphone: espeak-ng saying each text, seconds of silence between."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: apt-get install espeak-ng (.ci/run installs it)")
    samples = array.array("h")
    for part in parts:
        if isinstance(part, float):
            samples.extend([0] * int(part * 48000))
            continue
        spoken_wav = subprocess.run(["espeak-ng", "--stdout", part], check=True, capture_output=True).stdout
        with wave.open(io.BytesIO(spoken_wav)) as w:
            rate, voice = w.getframerate(), array.array("h", w.readframes(w.getnframes()))
        step = rate / 48000  # espeak speaks at 22.05 kHz: linear interpolation is plenty for a test microphone
        for n in range(int((len(voice) - 2) / step)):
            t = n * step
            i = int(t)
            samples.append(int(voice[i] + (voice[i + 1] - voice[i]) * (t - i)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(samples.tobytes())
    return path


@contextlib.contextmanager
def chromium(microphone: Path) -> Iterator[Any]:
    """Headless Chromium (the distribution's, not a download) whose microphone plays `microphone` once."""
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # (launch() gives every browser a fresh, temporary profile)
        flags = [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={microphone}%noloop"]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`phone.py --browser` (the parrot, as a user starts it): the link it prints, and its log."""
    folder = tmp_path_factory.mktemp("agent")
    log_path = folder / "agent.log"
    environ = {k: v for k, v in os.environ.items() if k not in ("SPEECH_MODEL", "MODE", "BROWSER_PHONE_TOKEN")}
    command = [sys.executable, str(ROOT / "phone.py"), "--browser", "--log", str(log_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environ)
    try:
        assert proc.stdout is not None
        link = ""
        while not link and (text := proc.stdout.readline()):
            link = text.strip() if text.strip().startswith("http://127.0.0.1:") else ""
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/phone#token=[\w-]{32}", link), link
        yield link, log_path
    finally:
        proc.terminate()  # phone.py stops the agent it started
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def serving(app: Litestar) -> Iterator[str]:
    """`app` behind uvicorn (the Procfile's socket options) in a thread of this process, so a test can read the
    sessions it stores while a browser calls it: its base URL."""
    import uvicorn

    port = phone.free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        access_log=False,
        log_config=None,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="agent", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the agent did not start in 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def shot(page: Any, name: str, tmp_path: Path) -> None:
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    page.screenshot(path=str(folder / name))


def wait(page: Any, condition: str, timeout: float = 10.0) -> None:
    """Poll a JavaScript condition (wait_for_function would eval a string, which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"still not {condition} after {timeout} s"
        page.wait_for_timeout(50)


def transcript(page: Any) -> list[str]:
    return [" ".join(p.split()) for p in page.get_by_role("log").locator("p").all_inner_texts()]


def test_a_call_from_the_browser_hears_the_parrot_then_hangs_up_and_calls_again(
    agent: tuple[str, Path], tmp_path: Path
) -> None:
    link, log_path = agent
    mic = speech(tmp_path / "mic.wav", 0.5, "Hello, I would like to book a table for two people tonight.", 4.0)
    with chromium(mic) as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 520})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(link)
        page.get_by_role("button", name="Call").click()
        wait(page, "window.phone.stats.turns >= 1", 30)
        wait(page, "window.phone.stats.played === window.phone.stats.received", 10)
        stats = page.evaluate("window.phone.stats")
        shot(page, "browser-phone.png", tmp_path)
        assert stats["sent"] >= 3 * 8000  # the whole sentence went out as 8 kHz frames
        assert stats["received"] >= 8000 and stats["played"] == stats["received"]  # the parrot's answer, all played
        assert stats["marks"] >= stats["received"] // 800  # a mark echoed per 100 ms message, once played
        (latency,) = stats["latencies"]
        # the parrot waits 500 ms of quiet; the page finds the end of speech with its own level meter, which
        # may call it up to three 20 ms frames later than the parrot does
        assert 440 <= latency["page"] < 3000 and 0 <= latency["server"] < 500
        lines = transcript(page)
        assert lines[0] == (
            "Agent: Hello! You are talking to switchboard. How can I help? "
            "(greeting: Twilio speaks it in the call's voice)"
        )
        assert lines[1] == "You: (audio)"
        assert re.fullmatch(
            r"Agent: \(audio\) answer began \d+ ms after you stopped speaking; server: \d+ ms", lines[2]
        )
        assert re.fullmatch(r"\d+ ms", page.locator("#latency").inner_text())
        assert page.locator("#cost").inner_text() == "$0.0000"
        page.get_by_role("button", name="Hang up").click()
        assert transcript(page)[-1] == "You hung up."
        assert page.get_by_role("button", name="Call").is_enabled()
        assert page.get_by_role("button", name="Hang up").is_disabled()

        page.get_by_role("button", name="Call").click()  # a second call: the keypad this time
        wait(page, "document.getElementById('status').textContent.startsWith('Connected')")
        page.get_by_role("button", name="4", exact=True).click()
        page.get_by_role("button", name="#", exact=True).click()
        wait(page, "window.phone.stats.turns >= 2", 10)
        assert "You: (pressed 4)" in transcript(page)
        shot(page, "browser-phone-keypad.png", tmp_path)
        page.get_by_role("button", name="Hang up").click()
        assert errors == []
    log = log_path.read_text()
    ended = re.findall(r"info call ended call=(BR[0-9a-f]{32}) outcome=completed turns=1 .* channel=browser", log)
    assert len(ended) == 2 and ended[0] != ended[1]
    assert link.split("token=")[1] not in log


def test_speaking_over_the_answer_in_the_browser_clears_it_at_once(agent: tuple[str, Path], tmp_path: Path) -> None:
    link, _ = agent
    mic = speech(
        tmp_path / "mic.wav",
        0.3,
        "Please tell me about the opening hours of the restaurant on Sunday and Monday.",
        0.9,  # the parrot answers after 0.5 s of quiet: this speaks over its answer
        "Wait, stop.",
        3.0,
    )
    with chromium(mic) as browser:
        page = browser.new_page()
        page.goto(link)
        page.get_by_role("button", name="Call").click()
        wait(page, "window.phone.stats.turns >= 1", 30)  # (the interrupted turn closes at the barge-in)
        stats = page.evaluate("window.phone.stats")
        lines = transcript(page)
        page.get_by_role("button", name="Hang up").click()
    assert stats["clears"] == 1
    assert stats["played"] < stats["received"]  # what was cleared never played
    assert re.fullmatch(r"Agent: \(audio\) \(interrupted\).*", lines[2]), lines


def test_the_pages_codec_and_resampler_match_python(agent: tuple[str, Path], tmp_path: Path) -> None:
    link, _ = agent
    with chromium(speech(tmp_path / "mic.wav", 0.1)) as browser:
        page = browser.new_page()
        page.goto(link)
        got = page.evaluate(
            """async () => {
              const c = await import("/phone/codec.js");
              const all = Int16Array.from({ length: 65536 }, (_, i) => i - 32768);
              const tones = (rate, parts) => Float32Array.from({ length: rate }, (_, i) =>
                parts.reduce((sum, [hz, level]) => sum + level * Math.sin(2 * Math.PI * hz * i / rate), 0));
              const resampled = (rate, parts) => {
                const r = new c.Resampler(rate, 8000), input = tones(rate, parts), out = [];
                for (let i = 0; i < input.length; i += 128) out.push(...r.push(input.subarray(i, i + 128)));
                return out;
              };
              return {
                encoded: Array.from(c.ulawEncode(all)),
                decoded: Array.from(c.ulawDecode(Uint8Array.from({ length: 256 }, (_, i) => i))),
                floats: Array.from(c.toInt16(Float32Array.from([-1.5, -1, -0.5, 0, 0.5, 0.99999, 1.5]))),
                voice48: resampled(48000, [[1000, 0.5], [3000, 0.3]]),
                voice44: resampled(44100, [[440, 0.6], [2500, 0.3]]),
                above: resampled(48000, [[5000, 0.8]]),
              };
            }"""
        )
    assert bytes(got["encoded"]) == pcm.pcm16_to_ulaw(array.array("h", range(-32768, 32768)).tobytes())
    assert got["decoded"] == list(pcm.DECODE)
    assert got["floats"] == [-32768, -32768, -16384, 0, 16384, 32767, 32767]
    # the resampler against the same tones computed at 8 kHz: within 0.02 of full scale (-34 dB) in the band
    for key, parts in (("voice48", [(1000, 0.5), (3000, 0.3)]), ("voice44", [(440, 0.6), (2500, 0.3)])):
        out = got[key]
        assert 7900 <= len(out) <= 8000, key
        ideal = [sum(level * math.sin(2 * math.pi * hz * m / 8000) for hz, level in parts) for m in range(len(out))]
        assert max(abs(a - b) for a, b in zip(out[80:], ideal[80:], strict=True)) < 0.02, key
    # and a 5 kHz tone, above the phone band, is at least 50 dB down instead of folding back to 3 kHz
    rms = math.sqrt(sum(x * x for x in got["above"][80:]) / len(got["above"][80:]))
    assert rms < 0.8 / math.sqrt(2) * 10 ** (-50 / 20)


def test_a_realtime_call_in_the_browser_shows_both_transcripts_and_a_barge_in_clears_the_reply(
    fake_realtime: FakeRealtime, tmp_path: Path
) -> None:
    """SPEECH_MODEL=openai against the fake Realtime server (it finds speech by the duration of the audio the
    page streams, in ms since the stream's first frame): the caller asks for a story, speaks over it 2.5 s into
    its 8 s of audio, and gets a short answer."""
    story = "Once upon a time there was a telephone that rang all night and nobody ever answered it at all."
    fake_realtime.hear(
        Utterance(start_ms=300, end_ms=1800, transcript="tell me a story"),
        Utterance(start_ms=5000, end_ms=5600, transcript="stop"),  # the story starts playing at about 2.4 s
    )
    fake_realtime.script(Response(story, audio_ms=8000, chunk_ms=100), Response("Okay, I stopped.", audio_ms=600))
    app = main.create_app(browser_env(MODE="media", **fake_realtime.env()))
    mic = speech(tmp_path / "mic.wav", 0.5, "Please tell me a story.", 3.0, "Stop.", 8.0)  # (as the fake hears it)
    with serving(app) as base, chromium(mic) as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/phone#token={PHONE_TOKEN}")
        page.get_by_role("button", name="Call").click()
        wait(page, "window.phone.stats.clears >= 1", 60)  # the barge-in
        wait(page, "window.phone.stats.turns >= 2", 30)  # the answer after it, played to its end mark
        wait(page, "window.phone.current() !== null && window.phone.current().sources.size === 0", 10)
        sid = page.evaluate("window.phone.current().callSid")
        stats = page.evaluate("window.phone.stats")
        lines = transcript(page)
        deadline = time.monotonic() + 30  # the second turn's history is committed around when the page hears of it
        while (session := session_of(app, sid)) is None or session.turns < 2:
            assert time.monotonic() < deadline, session
            time.sleep(0.05)
        page.get_by_role("button", name="Hang up").click()
        assert errors == []
    (truncate,) = fake_realtime.of_type("conversation.item.truncate")
    heard = truncate["audio_end_ms"]  # what the page's mark echoes said had played when the caller spoke
    words = story.split()
    said = " ".join(words[: round(len(words) * heard / 8000)])
    assert 500 <= heard <= 7000 and said  # the caller heard part of the story, not all of it
    assert session.history == [
        Message(role="user", content="tell me a story"),
        Message(role="assistant", content=said, interrupted=True),
        Message(role="user", content="stop"),
        Message(role="assistant", content="Okay, I stopped."),
    ], session.history
    timing = r"( answer began \d+ ms after you stopped speaking;)? server: \d+ ms"  # (the page's figure needs the
    # microphone's speech to line up with what the fake hears, which a loaded machine may shift)
    assert len(lines) == 5 and lines[0].startswith("Agent: Hello!"), lines
    assert lines[1] == "You: tell me a story" and lines[3] == "You: stop", lines
    assert re.fullmatch(re.escape(f"Agent: {said} (interrupted)") + timing, lines[2]), lines
    assert re.fullmatch(re.escape("Agent: Okay, I stopped.") + timing, lines[4]), lines
    assert stats["clears"] == 1
    assert stats["received"] == (8000 + 600) * 8  # the whole story reached the page before the caller spoke
    story_played = stats["played"] - 600 * 8  # (all of the short answer played: its turn closed on its end mark)
    assert abs(story_played / 8 - heard) <= 500, (stats, heard)  # the page stopped where the server cut the story
