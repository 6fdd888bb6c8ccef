"""The HTTP edge: Twilio's signatures, the request gate, /health, and webhooks answered before the router."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from conftest import (
    BASE,
    GATHER,
    TOKEN,
    Captured,
    Twilio,
    connect_doc,
    env,
    listening,
    new_call_sid,
    plugin,
    running,
    tree,
    twiml,
    voice_attrs,
)
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.middleware import ASGIMiddleware
from litestar.testing import AsyncTestClient
from litestar.types import ASGIApp, Receive, Scope, Send
from twilio.request_validator import RequestValidator

import main
import webhooks

# ------------------------------------------------------------------------- signatures (vectors from the wire reference)


URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
P = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675309"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
]


def signer(public_url: str = "") -> webhooks.Signer:
    return webhooks.Signer(main.load_settings({"TWILIO_AUTH_TOKEN": "12345", "PUBLIC_URL": public_url}))


@pytest.mark.parametrize(
    ("url", "params", "expected"),
    [
        (URL, P, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # V1
        ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", P, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),  # V3
        (
            URL,
            [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234"), ("Digits", "1234")],
            "IK+Dwps556ElfBT0I3Rgjkr1wJU=",
        ),  # V10: repeated keys, key-then-value order
        (
            URL,
            [("MessagingBinding.Address", "+1415xxxxxxx"), ("MessagingBinding.Address", "+1325xxxxxxx")],
            "83O6e2vORAoJHUNzJjDWN1jz+BA=",
        ),  # V11
        ("https://user:pass@mycompany.com/myapp.php?foo=1&bar=2", P, "CukzLTc1tT5dXEDIHm/tKBanW10="),  # V12
        ("https://user@mycompany.com/myapp.php?foo=1&bar=2", P, "2YRLlVAflCqxaNicjMpJcSTgzSs="),  # V13
        (
            URL,
            [
                ("CallSid", "CA1234567890ABCDE"),
                ("Caller", "+12349013030"),
                ("Digits", "1234"),
                ("From", "+12349013030"),
                ("To", "+18005551212"),
            ],
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ=",
        ),  # V17
        (URL, [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "1234")], "CgUWP726jjuqn1zmicHVG/3A2ak="),
        ("wss://mycompany.com/relay", [], "bueH7sLBnC+oqtcUZf4hX9Jxrmo="),
        ("wss://mycompany.com:443/relay", [], "sX+QkcfIDL5TG225HwHzbAL4+/Y="),
        (URL, [("CallSid", "CA1"), ("CalledCity", "")], "5l1tAxXopS2SdiEAWK6x1I2VjCg="),
    ],
)
def test_signature_matches_published_vectors(url: str, params: list[tuple[str, str]], expected: str) -> None:
    assert webhooks.twilio_signature("12345", url, params) == expected


@pytest.mark.parametrize(
    ("url", "header"),
    [
        ("https://mycompany.com:1234/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # V2: port dropped
        (URL, "kvajT1Ptam85bY51eRf/AJRuM3w="),  # V4: signed with :443
        ("http://mycompany.com/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),  # V5: signed with :80
        ("https://user:pass@mycompany.com/myapp.php?foo=1&bar=2", "ZQFR1PTIZXF2MXB8ZnKCvnnA+rI="),  # V14
        (URL + "&Body=It's+amazing", "TfZzewPq8wqrGlMfyAud8+/IvJ0="),  # V15: %27 spelling
        (URL + "&Body=It's+amazing", "dsq4Ehbj6cs+KdTkpF5sSSplOWw="),  # V15: literal spelling
        ("wss://mycompany.com/relay", "sX+QkcfIDL5TG225HwHzbAL4+/Y="),  # wss signed with :443
    ],
)
def test_signature_accepts_every_variant_twilio_signs(url: str, header: str) -> None:
    params = [] if url.startswith("wss") else P
    assert signer().check(url, params, header)


@pytest.mark.parametrize(
    ("url", "header"),
    [
        (URL, "WRONG_SIGNATURE"),
        (URL, "NOTRSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (URL, ""),
        (URL + "&somethingUnexpected=true", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (URL.replace("foo=1", "foo=2"), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
    ],
)
def test_signature_rejects_anything_else(url: str, header: str) -> None:
    assert not signer().check(url, P, header)


class MultiDict(dict[str, str]):
    """The multi-dict shape RequestValidator reads repeated keys from (Flask's getall)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs

    def getall(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@hsettings(max_examples=300, deadline=None)
@given(
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){1,2}", fullmatch=True),
    scheme=st.sampled_from(["https", "http"]),
    port=st.sampled_from(["", ":443", ":80", ":8443"]),
    path=st.from_regex(r"(/[A-Za-z0-9_.-]{0,12}){1,3}", fullmatch=True),
    query=st.lists(
        st.tuples(st.from_regex(r"[A-Za-z]{1,6}", fullmatch=True), st.from_regex(r"[A-Za-z0-9]{0,6}", fullmatch=True)),
        max_size=3,
    ),
    params=st.lists(st.tuples(_text, _text), max_size=8),
)
def test_signature_agrees_with_twilio_request_validator(
    host: str, scheme: str, port: str, path: str, query: list[tuple[str, str]], params: list[tuple[str, str]]
) -> None:
    url = f"{scheme}://{host}{port}{path}" + (("?" + urlencode(query)) if query else "")
    validator = RequestValidator("made-up-token")
    expected = validator.compute_signature(url, MultiDict(params))
    assert webhooks.twilio_signature("made-up-token", url, params) == expected
    ours = webhooks.Signer(main.load_settings({"TWILIO_AUTH_TOKEN": "made-up-token"}))
    assert ours.check(url, params, expected) == validator.validate(url, MultiDict(params), expected) is True


# ----------------------------------------------------------------------------- the URL Twilio signed


def _scope(
    path: str = "/voice", query: bytes = b"", scheme: str = "http", client: str = "10.0.0.7", kind: str = "http"
) -> dict[str, Any]:
    return {
        "type": kind,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "scheme": scheme,
        "client": (client, 5555),
    }


def test_signed_url_prefers_public_url_and_keeps_the_raw_query() -> None:
    s = signer("https://agent.example.com/")
    headers = {b"host": b"internal:8080"}
    assert s.url(_scope("/continue", b"n=1&turn=abc"), headers) == "https://agent.example.com/continue?n=1&turn=abc"
    assert s.url(_scope("/relay", kind="websocket"), headers) == "wss://agent.example.com/relay"


def test_forwarded_headers_are_trusted_only_from_configured_proxies() -> None:
    headers = {
        b"host": b"internal:8080",
        b"x-forwarded-proto": b"https, http",
        b"x-forwarded-host": b"agent.example.com",
    }
    settings = main.load_settings({"TWILIO_AUTH_TOKEN": "t", "TRUSTED_PROXIES": "10.0.0.0/8"})
    trusted = webhooks.Signer(settings)
    assert trusted.url(_scope(), headers) == "https://agent.example.com/voice"
    assert trusted.url(_scope(kind="websocket", scheme="ws"), headers) == "wss://agent.example.com/voice"
    assert trusted.url(_scope(client="203.0.113.9"), headers) == "http://internal:8080/voice"
    everyone = webhooks.Signer(main.load_settings({"TWILIO_AUTH_TOKEN": "t", "TRUSTED_PROXIES": "*"}))
    assert everyone.url(_scope(client="203.0.113.9"), headers) == "https://agent.example.com/voice"


async def test_mismatch_answers_403_and_logs_the_url_checked_and_what_to_set(logs: Captured) -> None:
    app = main.create_app(env(PUBLIC_URL="https://agent.example.com"))
    async with running(app) as client:
        twilio = Twilio(client)  # signs for http://testserver.local, not the public URL
        response = await twilio.call()
        unsigned = await client.post(
            "/voice", content="CallSid=CA1", headers={"content-type": "application/x-www-form-urlencoded"}
        )
    assert (response.status_code, response.text) == (403, "403 signature mismatch\n")
    assert unsigned.status_code == 403
    line = next(line for line in logs.lines if "signature mismatch" in line)
    assert "checked_url=https://agent.example.com/voice" in line and "PUBLIC_URL" in line
    assert TOKEN not in "\n".join(logs.lines)


async def test_signature_through_a_trusted_proxy_uses_the_forwarded_url() -> None:
    app = main.create_app(env(TRUSTED_PROXIES="*"))
    async with running(app) as client:
        data = {"CallSid": new_call_sid(), "From": "+15005550006"}
        signature = webhooks.twilio_signature(TOKEN, "https://agent.example.com/voice", list(data.items()))
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": signature,
            "x-forwarded-proto": "https",
            "x-forwarded-host": "agent.example.com",
        }
        ok = await client.post("/voice", content=urlencode(data), headers=headers)
        spoofed = await client.post(
            "/voice", content=urlencode(data), headers=headers | {"x-forwarded-host": "evil.example"}
        )
    assert (ok.status_code, spoofed.status_code) == (200, 403)


async def test_a_webhook_url_with_a_retry_override_fragment_passes_the_signature_check() -> None:
    # configured as https://agent.example.com/process-speech?mode=x#rc=2&rp=ct,rt: the fragment is Twilio's own
    # instruction and never sent (RFC 3986), so Twilio signs the URL it requests, which the server can rebuild
    configured = "https://agent.example.com/process-speech?mode=x#rc=2&rp=ct,rt&ct=1000"
    requested, _, _ = configured.partition("#")
    app = main.create_app(env(PUBLIC_URL="https://agent.example.com"))
    async with running(app) as client:
        data = {"CallSid": new_call_sid(), "From": "+15005550006", "SpeechResult": "hello", "Confidence": "0.9"}
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": webhooks.twilio_signature(TOKEN, requested, list(data.items())),
        }
        ok = await client.post("/process-speech?mode=x", content=urlencode(data), headers=headers)
    assert ok.status_code == 200 and b"<Gather" in ok.content  # answered, not refused with a 403


async def test_the_test_client_is_signed_like_twilio(monkeypatch: pytest.MonkeyPatch) -> None:
    app = main.create_app(env())
    async with AsyncTestClient(app) as client:
        twilio = Twilio(client, token="not-the-token")
        response = await twilio.call()
    assert response.status_code == 403


async def test_a_percent_encoded_url_is_checked_as_configured_and_replies_keep_the_public_base_url() -> None:
    # Twilio requests (and signs) the URL exactly as the number's configuration spells it; the server decodes the path
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-host": "agent.example.com"}
    for extra, headers in [({"PUBLIC_URL": "https://agent.example.com"}, {}), ({"TRUSTED_PROXIES": "*"}, forwarded)]:
        app = main.create_app(env(**extra))
        async with running(app) as client:
            twilio = Twilio(client, base="https://agent.example.com")
            relay_number = await twilio.post("/v%6Fice?mode=relay", headers, CallStatus="ringing")
            turn = await twilio.post("/process%2Dspeech", headers, SpeechResult="hello", Confidence="0.9")
        assert tree(relay_number.content) == connect_doc("wss://agent.example.com/relay", **voice_attrs(app)), extra
        assert tree(turn.content) == listening("You said: hello."), extra


# ----------------------------------------------------------------------------- the request gate


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b'{"CallSid": "CA1"}', 415),
        ("application/x-www-form-urlencoded", b"CallSid=CA1&SpeechResult=" + b"x" * 70_000, 413),
        ("application/x-www-form-urlencoded", b"CallSid=CA1&SpeechResult=%ff%fe", 400),
        ("application/x-www-form-urlencoded", b"From=%2B15005550006", 400),
        ("application/x-www-form-urlencoded", b"CallSid=CA1%7Bx%7D", 400),
        ("application/x-www-form-urlencoded", b"CallSid=CA1&Confidence=high", 400),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_a_log_line(
    content_type: str, body: bytes, status: int, logs: Captured
) -> None:
    app = main.create_app(env())
    async with running(app) as client:
        params = [
            (k, v)
            for k, v in __import__("urllib.parse").parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)
        ]
        signature = webhooks.twilio_signature(TOKEN, BASE + "/process-speech", params)
        response = await client.post(
            "/process-speech", content=body, headers={"content-type": content_type, "x-twilio-signature": signature}
        )
    assert response.status_code == status
    assert response.headers["content-type"] == "text/plain"
    assert [line for line in logs.lines if f"status={status}" in line]


async def test_every_request_logs_one_line_with_call_sid_and_never_the_number_or_token(logs: Captured) -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.say("hello")
    requests = [line for line in logs.lines if line.startswith("info request ")]
    assert [line.split(" ms=")[0] for line in requests] == [
        f"info request route=/voice status=200 call={twilio.call_sid}",
        f"info request route=/process-speech status=200 call={twilio.call_sid} turn=1 provider=echo",
    ]
    everything = "\n".join(logs.lines)
    assert TOKEN not in everything and "5005550006" not in everything


async def test_an_unexpected_error_in_a_route_still_answers_valid_twiml(logs: Captured) -> None:
    class BrokenVoice(main.TTSVoice):
        async def render(self, text: str, *, base_url: str) -> main.Segment:
            raise RuntimeError("bug in a voice")

    app = main.create_app(env(TTS_VOICE="broken"), plugins=[plugin(tts={"broken": BrokenVoice()})])
    async with running(app) as client:
        answer = await Twilio(client).call()
    assert answer.status_code == 200
    assert tree(answer.content) == twiml(lambda r: r.gather(**GATHER).say(app.state.settings.apology))
    assert "Traceback" not in answer.text
    assert any(line.startswith("error request failed route=/voice") for line in logs.lines)


# ----------------------------------------------------------------------------- /health


async def test_health_reports_plugins_and_503_when_the_backend_is_down() -> None:
    from plugins.session_memory import MemoryBackend

    class Down(MemoryBackend):
        async def ping(self) -> None:
            raise main.BackendError("unreachable")

    app = main.create_app(env())
    down = Down(main.load_settings(env()))
    broken = main.create_app(env(SESSION_BACKEND="down"), plugins=[plugin(session={"down": down})])
    async with running(app) as client, running(broken) as broken_client:
        ok, bad = await client.get("/health"), await broken_client.get("/health")
    assert (ok.status_code, ok.json()) == (
        200,
        {
            "status": "ok",
            "version": main.VERSION,
            "mode": "gather",
            "plugins": {"llm": ["echo"], "tts": "say", "session": "memory"},
        },
    )
    assert (bad.status_code, bad.json()["status"]) == (503, "unavailable")


# ----------------------------------------------------------------------------- webhooks answered before the router


async def test_webhooks_skip_litestar_middleware_that_health_goes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[str]] = {"middleware": [], "asgi_handler": [], "around the app": []}

    class Recording(ASGIMiddleware):
        def __init__(self, where: str) -> None:
            self.where = where

        async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
            seen[self.where].append(scope["path"])
            await next_app(scope, receive, send)

    init = Litestar.__init__

    def with_middleware(self: Litestar, *args: Any, middleware: Any = None, **kwargs: Any) -> None:
        init(self, *args, middleware=[Recording("middleware"), *(middleware or [])], **kwargs)  # as Sentry adds its own

    with monkeypatch.context() as patched:
        patched.setattr(Litestar, "__init__", with_middleware)
        app = main.create_app(env())
    app.asgi_handler = Recording("asgi_handler")(app.asgi_handler)  # where Litestar puts CORS and OpenTelemetry
    around = Recording("around the app")(app)  # what the Switchboard docstring says to do to wrap the webhooks too
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(around), base_url=BASE) as client:
        health = await client.get("/health")
        answer = await Twilio(client).call()
    assert (health.status_code, tree(answer.content)) == (200, listening(app.state.settings.greeting))
    assert seen == {"middleware": ["/health"], "asgi_handler": ["/health"], "around the app": ["/health", "/voice"]}
