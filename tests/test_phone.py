"""The dev phone: Twilio's side of a call in a terminal, signed like Twilio, driving a real process."""

from __future__ import annotations

import array
import asyncio
import math
import wave
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from conftest import TOKEN, server
from twilio.request_validator import RequestValidator

import pcm
import phone


async def test_the_procfile_command_serves_a_call_driven_by_the_dev_phone() -> None:
    lines = iter([("hello from the dev phone", 0.9), ("", None), ("/bye", None)])
    printed: list[str] = []
    with server() as (base, _proc, log_path):
        call = phone.Phone(base, TOKEN, out=printed.append)
        ended = await asyncio.to_thread(call.run, lines)
        health = httpx.get(base + "/health").json()
    assert ended == "completed"
    assert call.spoken == [
        "Hello! You are talking to switchboard. How can I help?",
        "You said: hello from the dev phone.",
        "Sorry, I didn't hear anything. What can I do for you?",
    ]
    assert [path for path, _ in call.timings] == ["/voice", "/process-speech", "/process-speech", "/status"]
    assert health["status"] == "ok"
    text = log_path.read_text()
    assert f"call={call.call_sid}" in text and TOKEN not in text and "5005550006" not in text


def test_the_dev_phone_follows_redirects_pauses_and_dial() -> None:
    printed: list[str] = []
    call = phone.Phone("http://agent.example", "t", out=printed.append)
    call.http.close()
    doc = ET.fromstring(
        '<Response><Say>One</Say><Pause length="2"/><Play>https://a.example/x.mp3</Play>'
        '<Redirect method="POST">/continue?n=1&amp;turn=abc</Redirect></Response>'
    )
    assert call.execute(doc, "http://agent.example/process-speech") == (
        "redirect",
        "http://agent.example/continue?n=1&turn=abc",
    )
    assert printed == ["agent: One", "   (pause 2 s)", "agent: [plays https://a.example/x.mp3]"]
    assert call.execute(ET.fromstring("<Response><Dial>+15005550009</Dial></Response>"), "http://a/") is None
    assert printed[-1] == "   (transferring the call to +15005550009)"


def test_signed_requests_from_the_dev_phone_validate_with_twilios_own_validator() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=b"<Response/>")

    call = phone.Phone("https://agent.example.com", "made-up", out=lambda _: None)
    call.http.close()
    call.http = httpx.Client(transport=httpx.MockTransport(handler))
    call.post("/voice")
    call.http.close()
    request = sent[0]
    params = dict(__import__("urllib.parse").parse.parse_qsl(request.content.decode()))
    assert {"CallSid", "AccountSid", "From", "To", "CallStatus", "Direction", "ApiVersion"} <= set(params)
    assert RequestValidator("made-up").validate(str(request.url), params, request.headers["x-twilio-signature"])


# -- media mode: Twilio's media stream against a real process, the parrot model


def test_the_dev_phone_in_media_mode_hears_its_own_bursts_back_then_hangs_up_through_the_action_url() -> None:
    printed: list[str] = []
    said = [phone.speech_burst(ms, hz) for ms, hz in phone.BURSTS]
    with server({"MODE": "media"}) as (base, _proc, log_path):
        caller = phone.CallerAudio(said, speed=4.0)
        call = phone.Phone(base, TOKEN, out=printed.append, voice="/voice?mode=media", caller_audio=caller)
        ended = call.run(iter([]))
    assert ended == "completed"
    assert caller.said == [pcm.pad(s) for s in said]
    assert [bytes(turn.audio) for turn in caller.turns] == caller.said  # the parrot plays each utterance back
    assert all(turn.first_ms is not None and turn.clears == 0 for turn in caller.turns)
    assert [path for path, _ in call.timings] == ["/voice?mode=media", "/media", "/media-action", "/status"]
    assert call.spoken == ["Hello! You are talking to switchboard. How can I help?"]
    assert [line.split(":")[0] for line in printed if line.startswith("   [answer")] == [
        "   [answer 1",
        "   [answer 2",
        "   [answer 3",
    ]
    assert f"call={call.call_sid}" in log_path.read_text()


def test_bargein_speaks_over_the_first_answer_and_the_agent_clears_it() -> None:
    said = [phone.speech_burst(ms, hz) for ms, hz in phone.BURSTS[:2]]
    with server({"MODE": "media"}) as (base, _proc, _log):
        caller = phone.CallerAudio(said, speed=2.0, bargein=True)
        call = phone.Phone(base, TOKEN, out=lambda _: None, voice="/voice?mode=media", caller_audio=caller)
        assert call.run(iter([])) == "completed"
    first, second = caller.turns
    assert first.clears == 1 and first.heard is not None and 0 < first.heard < len(said[0]) / pcm.RATE
    assert second.clears == 0 and bytes(second.audio) == pcm.pad(said[1])


def wav_file(path: Path, pcm16: bytes, rate: int = 8000) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm16)
    return path


def test_the_dev_phone_says_a_wav_file_and_refuses_one_at_another_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tone = array.array("h", (int(8000 * math.sin(2 * math.pi * 330 * n / 8000)) for n in range(700 * 8)))
    quiet = bytes(2 * 200 * 8)
    path = wav_file(tmp_path / "hello.wav", quiet + tone.tobytes() + quiet)
    assert phone.read_wav(path) == pcm.pcm16_to_ulaw(quiet + tone.tobytes() + quiet)
    with server({"MODE": "media"}) as (base, _proc, _log):
        assert phone.main([base, "--token", TOKEN, "--media", "--wav", str(path), "--speed", "4"]) == 0
    out = capsys.readouterr().out
    assert "you: (1.10 s of speech)" in out
    assert "s after you stopped, 0.70 s of audio]" in out  # the tone came back, the quiet around it did not
    assert "/media-action" in out and "(call completed" in out
    with pytest.raises(SystemExit):
        phone.main(
            ["http://127.0.0.1:9", "--token", "t", "--media", "--wav", str(wav_file(tmp_path / "hi.wav", quiet, 16000))]
        )
    assert "16000 Hz, 1 channel(s); the phone line is 8000 Hz mono" in capsys.readouterr().err
