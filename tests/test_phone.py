"""The dev phone: Twilio's side of a call in a terminal, signed like Twilio, driving a real process."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import httpx
from conftest import TOKEN, server
from twilio.request_validator import RequestValidator

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
    assert call.execute(doc, "http://agent.example/process-speech") == ("redirect", "http://agent.example/continue?n=1&turn=abc")
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
