"""The floor for bench/webhook.py: a bare ASGI app doing the same signature check and TwiML, no framework."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any
from urllib.parse import parse_qsl

TOKEN = os.environ["TWILIO_AUTH_TOKEN"].encode()
PUBLIC = os.environ["PUBLIC_URL"].rstrip("/")
ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"})
GATHER = (
    '<Gather input="speech" speechTimeout="auto" actionOnEmptyResult="true" action="/process-speech" '
    'method="POST" language="en-US">'
)
HEADERS = [(b"content-type", b"text/xml")]


def signature(url: str, params: list[tuple[str, str]]) -> str:
    data = url + "".join(k + v for k, v in sorted(params))
    return base64.b64encode(hmac.new(TOKEN, data.encode(), hashlib.sha1).digest()).decode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    params = parse_qsl(body.decode(), keep_blank_values=True)
    headers = dict(scope["headers"])
    given = headers.get(b"x-twilio-signature", b"").decode()
    if not hmac.compare_digest(signature(PUBLIC + scope["path"], params), given):
        await send({"type": "http.response.start", "status": 403, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b""})
        return
    form = dict(params)
    text = f"You said: {form.get('SpeechResult', '')}." if scope["path"] == "/process-speech" else "Hello!"
    doc = (
        f'<?xml version="1.0" encoding="UTF-8"?><Response>{GATHER}'
        f'<Say voice="Polly.Joanna-Neural" language="en-US">{text.translate(ESCAPES)}</Say></Gather></Response>'
    )
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": doc.encode()})
