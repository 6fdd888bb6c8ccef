"""Fuzz: hostile requests on every route the app serves, in process, never a 5xx or a traceback.

Requests go straight through the ASGI app (the same messages uvicorn sends), so the fuzz controls
every byte: methods, raw paths, query strings, headers, bodies in chunks. The signed fuzz signs its
requests like Twilio, so hostile field values reach past the signature check into the turn engine
(echo model, memory sessions, tools on). The WebSocket fuzz sends random frames after a signed upgrade.
The app serves no OpenAPI schema (openapi_config=None), so there is nothing for schemathesis to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import string
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import httpx
import pytest
from conftest import TOKEN, Captured, concurrent, env, server
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import main
import webhooks

HOST = "testserver.local"
BASE = f"http://{HOST}"
METRICS_TOKEN = "made-up-metrics-token"
ROUTES = [
    "/voice",
    "/process-speech",
    "/continue",
    "/status",
    "/handle-error",
    "/relay-action",
    "/relay",
    "/health",
    "/metrics",
    "/audio/" + "0" * 32 + ".mp3",
    "/audio/x",
    "/audio",
    "/",
    "/nope",
    "/voice/",
    "//voice",
    "/VOICE",
    "/process-speech/../voice",
    "/%2e%2e/voice",
    "/voice%00",
    "/schema",
    "/openapi.json",
]
WEBHOOKS = ["/voice", "/process-speech", "/continue", "/status", "/handle-error", "/relay-action"]
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Answer:
    """A response as the ASGI server saw it."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        assert messages, "no response at all"
        start = messages[0]
        assert start["type"] == "http.response.start", messages
        assert [m["type"] for m in messages[1:]] == ["http.response.body"] * (len(messages) - 1), messages
        assert not messages[-1].get("more_body", False), "the response never finished"
        self.status: int = start["status"]
        self.headers = {k.lower(): v for k, v in start.get("headers", [])}
        self.body = b"".join(m.get("body", b"") for m in messages[1:])


async def asgi_http(
    app: Any,
    method: str,
    raw_path: bytes,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    chunk: int = 0,
    disconnect: bool = False,
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
) -> Answer:
    """One HTTP request through the app; the body arrives in chunks of `chunk` bytes (0: at once)."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk and body else [body]
    if disconnect and len(pieces) > 1:  # the client goes away halfway through the body
        pieces = pieces[: len(pieces) // 2]
    inbox = [
        {"type": "http.request", "body": p, "more_body": disconnect or i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    path = unquote(raw_path.decode("ascii"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": list(headers),
        "client": client,
        "server": (HOST, 80),
        "state": {},
        "extensions": {},
    }
    async with asyncio.timeout(10):
        await app(scope, receive, send)  # an exception here is what a server turns into a 500
    return Answer(sent)


def check(answer: Answer, method: str = "GET") -> None:
    """The properties every answer has: no 5xx, TwiML that parses and is small, short 4xx bodies."""
    assert answer.status < 500, (answer.status, answer.body[:500])
    if b"content-length" in answer.headers and method != "HEAD":
        assert int(answer.headers[b"content-length"]) == len(answer.body)
    ctype = answer.headers.get(b"content-type", b"")
    if answer.status == 200 and ctype.startswith(b"text/xml"):
        assert len(answer.body) < 64_000
        assert ET.fromstring(answer.body).tag == "Response", answer.body[:500]
    if 400 <= answer.status < 500:
        assert len(answer.body) < 1000, answer.body[:500]
        assert b"Traceback" not in answer.body and b'File "' not in answer.body, answer.body[:500]


def no_tracebacks(logs: Captured) -> None:
    """Nothing the fuzz sends is an error on our side: no error lines, no tracebacks."""
    bad = [
        line
        for record, line in zip(logs.records, logs.lines, strict=True)
        if record.levelno >= logging.ERROR or record.exc_info
    ]
    assert not bad, bad


@pytest.fixture
async def app() -> AsyncIterator[Any]:
    """The app with its lifespan running: echo model (streamed a token at a time), memory sessions, tools on."""
    app = main.create_app(
        env(
            ECHO_TOKEN_MS="0.001",
            CONTINUE_WAIT="0.2",
            TRANSFER_NUMBER="+15551234567",
            METRICS_TOKEN=METRICS_TOKEN,
            RELAY_DTMF_WAIT="0.005",
        )
    )
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:  # one task holds the lifespan (pytest-asyncio sets up and tears down in different ones)
        async with concurrent(app):
            started.set()
            await stop.wait()

    task = asyncio.create_task(serve())
    await asyncio.wait([task, asyncio.ensure_future(started.wait())], return_when=asyncio.FIRST_COMPLETED)
    assert started.is_set(), task.exception()
    yield app
    stop.set()
    await task


# ----------------------------------------------------------------------------- building blocks

printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
hostile_text = st.one_of(
    st.text(max_size=200),  # any code point: controls, emoji, RTL marks, noncharacters
    st.sampled_from(
        [
            "</Say><Hangup/>",
            "<speak><break time='10s'/>hi</speak>",
            "]]><![CDATA[",
            "&amp;&lt;&#0;&#x1F600;",
            "\x00\x01\x0b\x1b[31m\ufffe\uffff",
            "😀👍🏽👨‍👩‍👧",
            "\u202eevil\u202c",
            "\u200b" * 50,
            "a\r\nb\rc\nd",
            "${jndi:ldap://x}",
            "'; DROP TABLE calls; --",
            "{{7*7}}",
            "%s%n%x",
            "..\\..\\..",
            "goodbye",
            "transfer me",
            "talk to a person",
            "Hello. How are you? Fine! Good.",
            "Dr. No. 3.5 e.g. i.e.",
            "# Title\n- item\n1. one",
        ]
    ),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(100, 3000)),  # very long
)
sentences = st.lists(hostile_text, min_size=2, max_size=6).map(". ".join)  # a reply in several documents
valid_sids = st.builds(lambda n: f"CA{n:032x}", st.integers(0, 5))  # a few calls: state builds up between requests
call_sids = st.one_of(
    valid_sids, valid_sids, st.from_regex(r"[A-Za-z0-9_-]{2,64}", fullmatch=True), st.text(max_size=80)
)
confidences = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "0.9",
            "0.49",
            "0.5",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "-1",
            "2",
            "1e309",
            "1e-400",
            " 0.7 ",
            "high",
            "0x1p-2",
            "٠٫٩",
            "0,9",
            "1_0",
            "+.5",
            "true",
            "null",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    printable,
)
statuses = st.one_of(
    st.sampled_from(
        ["queued", "ringing", "in-progress", "completed", "busy", "failed", "no-answer", "canceled", "COMPLETED", ""]
    ),
    printable,
)
turn_ids = st.one_of(st.from_regex(r"[0-9a-f]{8,32}", fullmatch=True), printable)
numbers = st.one_of(st.integers(-5, 1005).map(str), printable)
handoffs = st.one_of(
    st.just(""),
    printable,
    st.builds(
        lambda d: json.dumps(d),
        st.dictionaries(
            st.sampled_from(["reasonCode", "number", "callerId", "reason"]),
            st.one_of(
                st.sampled_from(["live-agent-handoff", "+15551234567", "<Hangup/>"]),
                st.integers(),
                st.none(),
                st.lists(st.integers(), max_size=2),
                hostile_text,
            ),
            max_size=4,
        ),
    ),
    st.sampled_from(["[]", "null", "1", '"x"', "{", '{"reasonCode": "live-agent-handoff", "number": ["x"]}']),
)


def field_values() -> st.SearchStrategy[list[tuple[str, str]]]:
    """Twilio's fields with hostile values, some left out, plus unknown and repeated names."""
    known = {
        "CallSid": call_sids,
        "SpeechResult": hostile_text | sentences,
        "Confidence": confidences,
        "CallStatus": statuses,
        "From": st.one_of(st.just("+15005550006"), hostile_text),
        "To": st.one_of(st.just("+15005550001"), printable),
        "AccountSid": st.just("AC" + "0" * 32),
        "Direction": st.sampled_from(["inbound", "outbound-api", "x"]),
        "ErrorCode": printable,
        "ErrorUrl": hostile_text,
        "SessionStatus": st.sampled_from(["completed", "ended", "failed", "", "x"]) | printable,
        "SessionDuration": numbers | confidences,
        "HandoffData": handoffs,
        "Digits": printable,
    }
    chosen = st.fixed_dictionaries({"CallSid": call_sids}, optional={k: v for k, v in known.items() if k != "CallSid"})
    extra = st.lists(st.tuples(st.one_of(printable, st.sampled_from(list(known))), hostile_text), max_size=3)
    return st.builds(lambda fields, more: [*fields.items(), *more], chosen, extra)


def form_body(pairs: list[tuple[str, str]], plus: bool) -> bytes:
    quoting = quote_plus if plus else quote
    return "&".join(f"{quoting(k, safe='')}={quoting(v, safe='')}" for k, v in pairs).encode()


def signed_headers(url: str, pairs: list[tuple[str, str]], content_type: bytes) -> list[tuple[bytes, bytes]]:
    signature = webhooks.twilio_signature(TOKEN, url, pairs)
    return [(b"host", HOST.encode()), (b"content-type", content_type), (b"x-twilio-signature", signature.encode())]


# ----------------------------------------------------------------------------- unsigned, transport-level hostility

header_values = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), printable.map(str.encode)
)
content_types = st.one_of(
    st.sampled_from(
        [
            b"application/x-www-form-urlencoded",
            b"application/x-www-form-urlencoded; charset=utf-8",
            b"application/x-www-form-urlencodedX",
            b"application/json",
            b"multipart/form-data; boundary=x",
            b"text/plain",
            b"",
            b"\xff\xfe",
        ]
    ),
    header_values,
)
hostile_bodies = st.one_of(
    st.binary(max_size=300),
    st.lists(st.tuples(printable, printable), max_size=5).map(lambda ps: "&".join(f"{k}={v}" for k, v in ps).encode()),
    st.sampled_from(
        [
            b"CallSid=%",
            b"CallSid=%zz",
            b"CallSid=%C3%28",
            b"CallSid=%ED%A0%80",
            b"a=%FF%FE&&&=&==",
            b"CallSid=CA1&CallSid=CA2&CallSid=",
            b"%00=%00",
            b"+++=+++",
            b"\xff\xfe\x00CallSid=CA1",
            b"CallSid=CA1&SpeechResult=" + b"%F0%9F%98%80" * 3000,
        ]
    ),
    st.integers(65_000, 200_000).map(lambda n: b"CallSid=CA1&SpeechResult=" + b"x" * n),  # over MAX_BODY_BYTES
)
raw_paths = st.one_of(
    st.sampled_from(ROUTES).map(str.encode),
    st.text(alphabet=string.ascii_letters + string.digits + "/-._~%!$&'()*+,;=:@", max_size=40).map(
        lambda p: ("/" + p).encode()
    ),
)
queries = st.one_of(
    st.just(b""),
    st.sampled_from(
        [
            b"mode=relay",
            b"mode=gather",
            b"mode=x",
            b"n=1&turn=abcdef0123",
            b"turn=%ZZ&n=%",
            b"retries=abc",
            b"retries=-1",
            b"retries=99999999999999999999",
            b"%ff%fe",
            b"a=1&a=2&a",
            b"n=1e3&turn=" + b"a" * 5000,
        ]
    ),
    st.binary(max_size=60).map(lambda b: b.replace(b"#", b"")),
)
methods = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]),
    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=10),
)
header_lists = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"content-type",
                b"x-twilio-signature",
                b"host",
                b"x-forwarded-proto",
                b"x-forwarded-host",
                b"authorization",
                b"accept",
                b"content-length",
                b"transfer-encoding",
                b"cookie",
                b"x-other",
            ]
        ),
        header_values,
    ),
    max_size=6,
)


@FUZZ
@given(
    method=methods,
    raw_path=raw_paths,
    query=queries,
    headers=header_lists,
    content_type=st.none() | content_types,
    body=hostile_bodies,
    chunk=st.integers(0, 70),
    disconnect=st.booleans(),
    client=st.sampled_from([("127.0.0.1", 50000), ("10.1.2.3", 1), ("::1", 2), ("not-an-ip", 0), None]),
)
async def test_hostile_requests_never_get_a_5xx(
    app: Any,
    logs: Captured,
    method: str,
    raw_path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    content_type: bytes | None,
    body: bytes,
    chunk: int,
    disconnect: bool,
    client: tuple[str, int] | None,
) -> None:
    logs.records.clear()
    logs.lines.clear()
    if content_type is not None:
        headers = [(b"content-type", content_type), *headers]
    answer = await asgi_http(app, method, raw_path, query, headers, body, chunk, disconnect, client)
    event(f"status {answer.status}")
    check(answer, method)
    no_tracebacks(logs)
    lines = [line for line in logs.lines if line.split(" ", 2)[1:2] == ["request"]]
    assert len(lines) <= 1, lines
    if 400 <= answer.status < 500:  # a refused request is said once, on one line with its status
        assert len(lines) == 1 and f"status={answer.status}" in lines[0], (answer.status, lines)


@FUZZ
@given(
    path=st.sampled_from(WEBHOOKS),
    method=methods,
    body=hostile_bodies,
    query=queries,
    chunk=st.integers(0, 70),
    signature=st.one_of(st.none(), header_values),
)
async def test_webhooks_refuse_what_is_not_signed_before_reading_the_fields(
    app: Any, logs: Captured, path: str, method: str, body: bytes, query: bytes, chunk: int, signature: bytes | None
) -> None:
    logs.records.clear()
    logs.lines.clear()
    headers = [(b"host", HOST.encode()), (b"content-type", b"application/x-www-form-urlencoded")]
    if signature is not None:
        headers.append((b"x-twilio-signature", signature))
    answer = await asgi_http(app, method, path.encode(), query, headers, body, chunk)
    check(answer, method)
    assert answer.status in (400, 403, 405, 413), (answer.status, answer.body)  # never an answer without a signature
    no_tracebacks(logs)


@FUZZ
@given(raw_path=raw_paths, headers=header_lists, subprotocols=st.lists(printable, max_size=2))
async def test_websocket_upgrades_anywhere_are_refused_or_served_cleanly(
    app: Any, logs: Captured, raw_path: bytes, headers: list[tuple[bytes, bytes]], subprotocols: list[str]
) -> None:
    logs.records.clear()
    logs.lines.clear()
    inbox: list[dict[str, Any]] = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1006}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1006}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": (HOST, 80),
        "subprotocols": subprotocols,
        "state": {},
        "extensions": {},
    }
    async with asyncio.timeout(10):
        await app(scope, receive, send)
    assert all(m["type"].startswith("websocket.") for m in sent), sent  # never an HTTP response on a socket
    assert all(m["type"] != "websocket.accept" for m in sent), sent  # nothing here is a signed upgrade
    no_tracebacks(logs)


# ----------------------------------------------------------------------------- signed: into the engine


async def signed_post(
    app: Any,
    path_and_query: str,
    pairs: list[tuple[str, str]],
    *,
    plus: bool = True,
    content_type: bytes = b"application/x-www-form-urlencoded",
) -> Answer:
    path, _, query = path_and_query.partition("?")
    raw_path = quote(path, safe="/%").encode()
    url = BASE + raw_path.decode() + (f"?{query}" if query else "")
    answer = await asgi_http(
        app, "POST", raw_path, query.encode(), signed_headers(url, pairs, content_type), form_body(pairs, plus)
    )
    check(answer, "POST")
    return answer


@FUZZ
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "/voice",
                    "/voice?mode=relay",
                    "/voice?mode=gather",
                    "/process-speech",
                    "/process-speech",
                    "/continue",
                    "/status",
                    "/handle-error",
                    "/relay-action",
                ]
            ),
            field_values(),
            turn_ids,
            numbers,
            st.booleans(),
            st.one_of(st.none(), printable),
        ),
        min_size=1,
        max_size=6,
    )
)
async def test_signed_requests_with_hostile_fields_get_well_formed_twiml_or_a_clear_4xx(
    app: Any, logs: Captured, steps: list[tuple[str, list[tuple[str, str]], str, str, bool, str | None]]
) -> None:
    logs.records.clear()
    logs.lines.clear()
    for path, pairs, turn, n, plus, retries in steps:
        if path == "/continue":
            path += f"?n={quote_plus(n)}&turn={quote_plus(turn)}"
        elif path == "/relay-action" and retries is not None:
            path += f"?retries={quote_plus(retries)}"
        answer = await signed_post(app, path, pairs, plus=plus)
        event(f"{path.partition('?')[0]} {answer.status}")
        assert answer.status in (200, 400, 413), (path, answer.status, answer.body)  # TwiML, a bad field, too big
        for _ in range(8):  # follow the reply the way Twilio does, signed, with the same fields
            redirect = ET.fromstring(answer.body).find("Redirect") if answer.status == 200 else None
            if redirect is None or not redirect.text:
                break
            answer = await signed_post(app, redirect.text, pairs)
            event(f"followed {redirect.text.partition('?')[0]} {answer.status}")
            assert answer.status in (200, 400, 413), (redirect.text, answer.status, answer.body)
    no_tracebacks(logs)


@FUZZ
@given(speech=hostile_text | sentences, confidence=st.one_of(st.none(), st.none(), confidences), n=st.integers(1, 4))
async def test_any_speech_gets_escaped_twiml_with_the_echo_of_what_was_heard(
    app: Any, logs: Captured, speech: str, confidence: str | None, n: int
) -> None:
    """A valid call with hostile speech: every document is TwiML, and whatever is spoken stays text."""
    logs.records.clear()
    logs.lines.clear()
    sid = f"CA{n:032x}"
    base = [("CallSid", sid), ("From", "+15005550006"), ("To", "+15005550001")]
    assert (await signed_post(app, "/voice", [*base, ("CallStatus", "ringing")])).status == 200
    fields = [*base, ("SpeechResult", speech)] + ([("Confidence", confidence)] if confidence is not None else [])
    answer = await signed_post(app, "/process-speech", fields)
    docs = [answer]
    while answer.status == 200 and (redirect := ET.fromstring(answer.body).find("Redirect")) is not None:
        answer = await signed_post(app, redirect.text or "", base)
        docs.append(answer)
        event("a reply in several documents")
        assert len(docs) < 40
    assert all(d.status in (200, 400, 413) for d in docs), [d.status for d in docs]
    for doc in docs:
        if doc.status == 200:
            root = ET.fromstring(doc.body)
            allowed = {"Response", "Say", "Gather", "Redirect", "Pause", "Hangup", "Dial", "Play"}
            assert {el.tag for el in root.iter()} <= allowed, doc.body  # the caller's words never became verbs
    await signed_post(app, "/status", [*base, ("CallStatus", "completed")])
    no_tracebacks(logs)


@FUZZ
@given(accept=header_values, authorized=st.booleans(), method=st.sampled_from(["GET", "HEAD", "POST"]))
async def test_metrics_and_health_answer_any_accept_header(
    app: Any, logs: Captured, accept: bytes, authorized: bool, method: str
) -> None:
    logs.records.clear()
    logs.lines.clear()
    headers = [(b"accept", accept)] + ([(b"authorization", f"Bearer {METRICS_TOKEN}".encode())] if authorized else [])
    answer = await asgi_http(app, method, b"/metrics", b"", headers)
    check(answer, method)
    assert answer.status == (405 if method == "POST" else 200 if authorized else 401)
    health = await asgi_http(app, method, b"/health", b"", headers)
    check(health, method)
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    no_tracebacks(logs)


# ----------------------------------------------------------------------------- the relay socket

RELAY_URL = f"ws://{HOST}/relay"
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), hostile_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(printable, inner, max_size=3),
    max_leaves=6,
)
relay_messages = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["setup", "prompt", "interrupt", "dtmf", "info", "error", "", "PROMPT"]) | printable},
        optional={
            "callSid": call_sids | json_values,
            "voicePrompt": hostile_text | json_values,
            "last": st.booleans() | json_values,
            "utteranceUntilInterrupt": hostile_text | json_values,
            "durationUntilInterruptMs": st.one_of(st.integers(), st.floats(), printable, json_values),
            "digit": st.sampled_from(list("0123456789*#")) | printable | json_values,
            "customParameters": st.dictionaries(printable, printable, max_size=3) | json_values,
            "from": hostile_text,
            "to": hostile_text,
            "description": hostile_text,
            "name": hostile_text,
        },
    ),
    json_values,
).map(lambda m: {"type": "websocket.receive", "text": json.dumps(m)})
raw_frames = st.one_of(
    st.text(max_size=200).map(lambda t: {"type": "websocket.receive", "text": t}),
    st.binary(max_size=200).map(lambda b: {"type": "websocket.receive", "bytes": b}),
    st.integers(1000, 300_000).map(
        lambda n: {"type": "websocket.receive", "text": '{"type":"prompt","voicePrompt":"' + "a " * n + '"}'}
    ),
    st.just({"type": "websocket.receive"}),  # neither text nor bytes
)


def setup_frame(sid: str) -> dict[str, Any]:
    return {
        "type": "websocket.receive",
        "text": json.dumps(
            {
                "type": "setup",
                "sessionId": "VX" + "0" * 32,
                "callSid": sid,
                "from": "+15005550006",
                "to": "+15005550001",
                "customParameters": {"attempt": "1"},
            }
        ),
    }


@FUZZ
@given(
    frames=st.lists(st.one_of(relay_messages, raw_frames), max_size=8),
    set_up=st.booleans(),
    n=st.integers(0, 3),
    pause=st.sampled_from([0.0, 0.0, 0.002, 0.01]),
)
async def test_relay_socket_survives_random_frames(
    app: Any, logs: Captured, frames: list[dict[str, Any]], set_up: bool, n: int, pause: float
) -> None:
    logs.records.clear()
    logs.lines.clear()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/relay",
        "raw_path": b"/relay",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", HOST.encode()),
            (b"x-twilio-signature", webhooks.twilio_signature(TOKEN, RELAY_URL, []).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": (HOST, 80),
        "subprotocols": [],
        "state": {},
        "extensions": {},
    }
    task = asyncio.create_task(app(scope, inbox.get, send))
    await inbox.put({"type": "websocket.connect"})
    if set_up:
        await inbox.put(setup_frame(f"CA{n:032x}"))
    for frame in frames:
        await inbox.put(frame)
        await asyncio.sleep(pause)  # let a reply start (and a keypad timer fire) between frames
    await asyncio.sleep(0.01)
    await inbox.put({"type": "websocket.disconnect", "code": 1000})
    async with asyncio.timeout(10):
        await task  # the socket's coroutine ends without raising: the server never sees a crash
    assert sent and sent[0]["type"] == "websocket.accept", sent[:1]
    event("the model answered" if any(m["type"] == "websocket.send" for m in sent) else "nothing to answer")
    for message in sent[1:]:
        assert message["type"] in ("websocket.send", "websocket.close"), message
        if message["type"] == "websocket.send":
            out = json.loads(message["text"])
            assert out["type"] in ("text", "end"), out
            if out["type"] == "text":
                assert isinstance(out["token"], str) and isinstance(out["last"], bool)
    no_tracebacks(logs)


def test_the_app_serves_no_openapi_schema_for_schemathesis() -> None:
    """If this changes, run schemathesis against the schema too (issue 11)."""
    app = main.create_app(env())
    assert app.openapi_config is None
    paths = {route.path for route in app.routes}
    assert not {p for p in paths if "schema" in p or "openapi" in p}, paths


def status_line(port: int, request: bytes) -> bytes:
    """Send raw bytes to a real server; return its status line (or b"" when it just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        got = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in got and (chunk := conn.recv(4096)):
                got += chunk
    return got.partition(b"\r\n")[0]


def test_a_real_server_refuses_hostile_connections_without_a_5xx_or_a_traceback() -> None:
    """What the in-process fuzz found, on the Procfile's server: upgrades, odd signatures, bytes that are not HTTP."""
    upgrade = (
        b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with server() as (base, proc, log_path):
        port = int(base.rsplit(":", 1)[1])
        for path in (b"/voice", b"/process-speech", b"/health", b"/metrics", b"/audio/" + b"0" * 32 + b".mp3"):
            assert status_line(port, upgrade % path) == b"HTTP/1.1 403 Forbidden", path
        odd_signature = (
            b"POST /voice HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Twilio-Signature: \xff\xfe\x80\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 12\r\n\r\nCallSid=CA12"
        )
        assert status_line(port, odd_signature) == b"HTTP/1.1 403 Forbidden"
        never_sent = (
            b"POST /process-speech HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: 100000000\r\n\r\n"
        )  # and no body: not read
        assert status_line(port, never_sent) == b"HTTP/1.1 403 Forbidden"
        assert status_line(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)).startswith(
            (b"HTTP/1.1 400", b"")
        )  # TLS to the plain port: the server's own 400, or it hangs up
        assert httpx.get(base + "/health").status_code == 200
    text = log_path.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text and " 500" not in text, text[-3000:]


@settings(max_examples=500, deadline=None, database=None)
@given(
    st.binary().map(lambda b: b.replace(b"\x00", b""))
    | st.text(alphabet="ab=&+%2BFz\u00e9\u20ac09", max_size=40).map(str.encode)
)
def test_the_form_parser_agrees_with_urllib_on_any_body(data: bytes) -> None:
    """parse_form is urllib's parse_qsl (blank values kept, strict UTF-8), or both refuse the bytes."""
    from urllib.parse import parse_qsl

    try:
        expected = parse_qsl(data.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            webhooks.parse_form(data)
        return
    assert webhooks.parse_form(data) == expected
