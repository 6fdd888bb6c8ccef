"""The core: signatures, settings, plugins, TwiML, the Gather-mode call flow, the dev phone, a real process."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
import pytest
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
    continuing,
    env,
    listening,
    new_call_sid,
    plugin,
    running,
    scripted_app,
    server,
    tree,
    twiml,
)
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from twilio.request_validator import RequestValidator

import deadlines
import main
import phone
import speech
import webhooks
from twiml import gather_tag, render

# ----------------------------------------------------------------------------- signatures (vectors from the wire reference)

URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
P = [("CallSid", "CA1234567890ABCDE"), ("Caller", "+14158675309"), ("Digits", "1234"), ("From", "+14158675309"),
     ("To", "+18005551212")]


def signer(public_url: str = "") -> webhooks.Signer:
    return webhooks.Signer(main.load_settings({"TWILIO_AUTH_TOKEN": "12345", "PUBLIC_URL": public_url}))


@pytest.mark.parametrize(
    ("url", "params", "expected"),
    [
        (URL, P, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # V1
        ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", P, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),  # V3
        (URL, [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234"), ("Digits", "1234")],
         "IK+Dwps556ElfBT0I3Rgjkr1wJU="),  # V10: repeated keys, key-then-value order
        (URL, [("MessagingBinding.Address", "+1415xxxxxxx"), ("MessagingBinding.Address", "+1325xxxxxxx")],
         "83O6e2vORAoJHUNzJjDWN1jz+BA="),  # V11
        ("https://user:pass@mycompany.com/myapp.php?foo=1&bar=2", P, "CukzLTc1tT5dXEDIHm/tKBanW10="),  # V12
        ("https://user@mycompany.com/myapp.php?foo=1&bar=2", P, "2YRLlVAflCqxaNicjMpJcSTgzSs="),  # V13
        (URL, [("CallSid", "CA1234567890ABCDE"), ("Caller", "+12349013030"), ("Digits", "1234"),
               ("From", "+12349013030"), ("To", "+18005551212")], "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),  # V17
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
    query=st.lists(st.tuples(st.from_regex(r"[A-Za-z]{1,6}", fullmatch=True), st.from_regex(r"[A-Za-z0-9]{0,6}", fullmatch=True)), max_size=3),
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


def _scope(path: str = "/voice", query: bytes = b"", scheme: str = "http", client: str = "10.0.0.7",
           kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "path": path, "raw_path": path.encode(), "query_string": query, "scheme": scheme,
            "client": (client, 5555)}


def test_signed_url_prefers_public_url_and_keeps_the_raw_query() -> None:
    s = signer("https://agent.example.com/")
    headers = {b"host": b"internal:8080"}
    assert s.url(_scope("/continue", b"n=1&turn=abc"), headers) == "https://agent.example.com/continue?n=1&turn=abc"
    assert s.url(_scope("/relay", kind="websocket"), headers) == "wss://agent.example.com/relay"


def test_forwarded_headers_are_trusted_only_from_configured_proxies() -> None:
    headers = {b"host": b"internal:8080", b"x-forwarded-proto": b"https, http", b"x-forwarded-host": b"agent.example.com"}
    settings = main.load_settings({"TWILIO_AUTH_TOKEN": "t", "TRUSTED_PROXIES": "10.0.0.0/8"})
    trusted = webhooks.Signer(settings)
    assert trusted.url(_scope(), headers) == "https://agent.example.com/voice"
    assert trusted.url(_scope(kind="websocket", scheme="ws"), headers) == "wss://agent.example.com/voice"
    assert trusted.url(_scope(client="203.0.113.9"), headers) == "http://internal:8080/voice"
    everyone = webhooks.Signer(main.load_settings({"TWILIO_AUTH_TOKEN": "t", "TRUSTED_PROXIES": "*"}))
    assert everyone.url(_scope(client="203.0.113.9"), headers) == "https://agent.example.com/voice"


def test_railway_public_domain_is_the_default_public_url() -> None:
    settings = main.load_settings({"RAILWAY_PUBLIC_DOMAIN": "sb-production.up.railway.app"})
    assert settings.public_url == "https://sb-production.up.railway.app"
    assert main.load_settings({"RAILWAY_PUBLIC_DOMAIN": "x.app", "PUBLIC_URL": "https://mine.example"}).public_url == "https://mine.example"


async def test_mismatch_answers_403_and_logs_the_url_checked_and_what_to_set(logs: Captured) -> None:
    app = main.create_app(env(PUBLIC_URL="https://agent.example.com"))
    async with running(app) as client:
        twilio = Twilio(client)  # signs for http://testserver.local, not the public URL
        response = await twilio.call()
        unsigned = await client.post("/voice", content="CallSid=CA1", headers={"content-type": "application/x-www-form-urlencoded"})
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
        headers = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": signature,
                   "x-forwarded-proto": "https", "x-forwarded-host": "agent.example.com"}
        ok = await client.post("/voice", content=urlencode(data), headers=headers)
        spoofed = await client.post("/voice", content=urlencode(data), headers=headers | {"x-forwarded-host": "evil.example"})
    assert (ok.status_code, spoofed.status_code) == (200, 403)


# ----------------------------------------------------------------------------- settings and startup


def test_server_refuses_to_start_without_an_auth_token() -> None:
    with pytest.raises(main.ConfigError, match="TWILIO_AUTH_TOKEN is not set"):
        main.create_app({})


def test_allow_unsigned_is_loud(logs: Captured) -> None:
    main.create_app({"ALLOW_UNSIGNED": "1"})
    assert any("ALLOW_UNSIGNED=1" in line and line.startswith("warning") for line in logs.lines)


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(main.ConfigError, match="MIN_CONFIDENCE='lots' is not valid"):
        main.load_settings({"MIN_CONFIDENCE": "lots"})
    with pytest.raises(main.ConfigError, match="MIN_CONFIDENCE=2.0 must be between 0 and 1"):
        main.load_settings({"MIN_CONFIDENCE": "2"})
    with pytest.raises(main.ConfigError, match="^MODE='webhook' is not valid: use one of gather, relay$"):
        main.create_app(env(MODE="webhook"))  # checked against main.modes, where a new mode is one entry


def test_settings_are_read_once_and_never_print_secrets() -> None:
    settings = main.load_settings({"TWILIO_AUTH_TOKEN": "sekrit-token", "LLM_PROVIDER": "anthropic, openai",
                                   "OPENAI_API_KEY": "sk-sekrit", "MAX_TURNS": "4", "REDIS_URL": "redis://r:6379"})
    assert (settings.llm_provider, settings.max_turns, settings.valkey_url) == (("anthropic", "openai"), 4, "redis://r:6379")
    assert settings.get("OPENAI_API_KEY") == "sk-sekrit"
    assert "sekrit" not in repr(settings) and "sekrit" not in str(settings)


def test_memory_backend_with_several_workers_is_refused() -> None:
    with pytest.raises(main.ConfigError, match="WEB_CONCURRENCY=4 with SESSION_BACKEND=memory"):
        main.create_app(env(WEB_CONCURRENCY="4"))


# ----------------------------------------------------------------------------- plugins


def test_unknown_plugin_names_fail_with_the_list_of_what_exists() -> None:
    with pytest.raises(main.ConfigError) as e:
        main.create_app(env(LLM_PROVIDER="opnai"))
    names = sorted(main.registered(main.plugin_manager(), "llm"))
    assert str(e.value) == f"LLM_PROVIDER='opnai' is not registered; available: {', '.join(names)}"
    with pytest.raises(main.ConfigError, match="TTS_VOICE='robot' is not registered; available: .*say"):
        main.create_app(env(TTS_VOICE="robot"))
    with pytest.raises(main.ConfigError, match="SESSION_BACKEND='disk' is not registered; available: .*memory"):
        main.create_app(env(SESSION_BACKEND="disk"))


def test_two_plugins_registering_one_name_is_an_error_naming_both() -> None:
    echo_again = plugin(llm=[Scripted("echo")])
    with pytest.raises(main.ConfigError, match="llm 'echo' is registered twice: by conftest and by plugins.llm_echo"):
        main.create_app(env(), plugins=[echo_again])


def test_a_missing_vendor_key_names_the_variable_to_set() -> None:
    class NeedsKey:
        @main.hookimpl
        def register_llm_providers(self, register: Any) -> None:
            register("keyed", lambda settings: settings.require("KEYED_API_KEY", "LLM_PROVIDER=keyed"))

    with pytest.raises(main.ConfigError, match="KEYED_API_KEY is not set; LLM_PROVIDER=keyed needs it"):
        main.create_app(env(LLM_PROVIDER="keyed"), plugins=[NeedsKey()])


def test_a_misspelled_hook_is_an_error() -> None:
    class Typo:
        @main.hookimpl
        def register_llm_provider(self, register: Any) -> None: ...

    with pytest.raises(Exception, match="register_llm_provider"):
        main.create_app(env(), plugins=[Typo()])


def test_entry_point_plugins_are_discovered(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sb_parrot.py").write_text(
        "from main import LLMProvider, hookimpl\n"
        "class Parrot(LLMProvider):  # a protocol subclass: it inherits the optional capabilities\n"
        "    name = 'parrot'\n"
        "    def __init__(self, settings): self.settings = settings\n"
        "@hookimpl\n"
        "def register_llm_providers(register):\n"
        "    register('parrot', Parrot)\n"
    )
    dist = tmp_path / "sb_parrot-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-parrot\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nparrot = sb_parrot\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = main.create_app(env(LLM_PROVIDER="parrot,echo"))
    assert [p.name for p in app.state.calls.llm.providers] == ["parrot", "echo"]


def test_unselected_plugins_build_nothing() -> None:
    built: list[str] = []

    class Counting:
        @main.hookimpl
        def register_llm_providers(self, register: Any) -> None:
            register("never", lambda settings: built.append("never"))

    main.create_app(env(), plugins=[Counting()])
    assert built == []


# ----------------------------------------------------------------------------- the call flow


async def test_a_whole_call_greets_answers_inside_gather_and_ends() -> None:
    app = main.create_app(env(GREETING="Hi, this is the test line."))
    async with running(app) as client:
        twilio = Twilio(client)
        greeting = await twilio.call()
        answer = await twilio.say("What time is it")
        status = await twilio.post("/status", CallStatus="completed")
    assert greeting.headers["content-type"] == "text/xml"
    assert tree(greeting.content) == listening("Hi, this is the test line.")
    assert tree(answer.content) == listening("You said: What time is it.")
    assert tree(status.content) == twiml(lambda r: None)
    assert app.state.calls.backend.calls == {}


async def test_history_sent_to_the_model_is_system_plus_the_last_max_turns() -> None:
    model = Scripted(replies=["First answer.", "Second answer.", "Third answer.", "Fourth answer."])
    app = scripted_app(model, MAX_TURNS="2")
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        for text in ["one", "two", "three", "four"]:
            assert await twilio.turn(text) == [f"{['First', 'Second', 'Third', 'Fourth'][['one', 'two', 'three', 'four'].index(text)]} answer."]
    sent = [(m.role, m.content) for m in model.calls[-1]]
    assert sent == [("user", "two"), ("assistant", "Second answer."), ("user", "three"), ("assistant", "Third answer."),
                    ("user", "four")]


async def test_silence_reprompts_low_confidence_asks_again_and_three_misses_hang_up() -> None:
    model = Scripted()
    app = scripted_app(model)
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        silence = await twilio.post("/process-speech", SpeechResult="")
        low = await twilio.say("purple monkey", confidence="0.2")
        third = await twilio.post("/process-speech")
    settings = app.state.settings
    assert tree(silence.content) == listening(settings.reprompt)
    assert tree(low.content) == listening(settings.low_confidence)

    def goodbye(r: Any) -> None:
        r.say(settings.goodbye, **VOICE)
        r.hangup()

    assert tree(third.content) == twiml(goodbye)
    assert model.calls == []  # the model was never asked, and the mumble was never stored
    session = msgspec.msgpack.decode(app.state.calls.backend.calls[twilio.call_sid].session, type=main.Session)
    assert session.history == [] and session.misses == 3


async def test_a_missing_confidence_is_accepted_and_a_hit_resets_the_misses() -> None:
    model = Scripted(replies=["Sure."])
    app = scripted_app(model)
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.post("/process-speech", SpeechResult="")
        await twilio.post("/process-speech", SpeechResult="")
        answer = await twilio.post("/process-speech", SpeechResult="book a table")
        again = await twilio.post("/process-speech", SpeechResult="")
    assert tree(answer.content) == listening("Sure.")
    assert tree(again.content) == listening(app.state.settings.reprompt)  # not a hang-up: the count restarted


async def test_an_unknown_call_starts_a_fresh_session_and_carries_on() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)  # never called /voice, as after a restart
        answer = await twilio.say("are you still there")
    assert tree(answer.content) == listening("You said: are you still there.")
    assert twilio.call_sid in app.state.calls.backend.calls


async def test_a_retried_webhook_gets_the_same_twiml_without_asking_the_model_again() -> None:
    model = Scripted(replies=["Once only. Really once."], ttft=0.2)
    app = scripted_app(model)
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        during = await asyncio.gather(twilio.say("hello"), twilio.say("hello"))
        after = await twilio.say("hello")
    assert during[0].content == during[1].content == after.content
    assert len(model.calls) == 1


async def test_speech_inside_the_debounce_window_is_merged_and_answered_once() -> None:
    model = Scripted(replies=["Merged answer."], ttft=0.3)
    app = scripted_app(model)
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        first = asyncio.create_task(twilio.say("I would like"))
        await asyncio.sleep(0.1)
        second = await twilio.say("a table for two")
        first_response = await first
    assert first_response.content == second.content
    assert tree(second.content) == listening("Merged answer.")
    assert [m.content for m in model.calls[-1]] == ["I would like a table for two"]
    assert model.closed == 2  # the first generation was cancelled, not left running


async def test_caller_text_cannot_inject_twiml() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        answer = await twilio.say('</Say><Hangup/><Say>& "quoted" \x00\x07 bell')
    assert tree(answer.content) == listening('You said: </Say><Hangup/><Say>& "quoted" bell.')


async def test_a_provider_failure_is_spoken_and_the_agent_keeps_listening() -> None:
    model = Scripted(fail=ProviderError("vendor down", provider="scripted"))
    app = scripted_app(model)
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        answer = await twilio.say("hello")
    assert tree(answer.content) == listening(app.state.settings.apology)


async def test_with_a_fallback_number_a_failure_transfers_to_a_person() -> None:
    model = Scripted(fail=ProviderError("vendor down", provider="scripted"))
    app = scripted_app(model, FALLBACK_NUMBER="+15005550009")
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        answer = await twilio.say("hello")

    def expected(r: Any) -> None:
        r.say(app.state.settings.apology, **VOICE)
        r.dial("+15005550009")

    assert tree(answer.content) == twiml(expected)


async def test_a_plugin_bug_in_the_model_is_spoken_as_an_apology(logs: Captured) -> None:
    class Broken(Scripted):
        def stream(self, messages: Any, *, system: str, tools: Any = ()) -> Any:
            raise RuntimeError("bug in a plugin")

    app = scripted_app(Broken("broken"))
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        answer = await twilio.say("hello")
    assert tree(answer.content) == listening(app.state.settings.apology)
    assert any(line.startswith("error generation failed") and "bug in a plugin" in line for line in logs.lines)


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


async def test_handle_error_apologises_and_listens() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.post("/handle-error", ErrorCode="11200", ErrorUrl="https://x.example/voice")
    assert tree(answer.content) == listening(app.state.settings.apology)


async def test_status_callbacks_end_the_session_only_when_the_call_is_over() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.post("/status", CallStatus="ringing")
        still = twilio.call_sid in app.state.calls.backend.calls
        await twilio.post("/status", CallStatus="no-answer")
    assert still and twilio.call_sid not in app.state.calls.backend.calls


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
    assert (ok.status_code, ok.json()) == (200, {"status": "ok", "version": main.VERSION, "mode": "gather",
                                                 "plugins": {"llm": ["echo"], "tts": "say", "session": "memory"}})
    assert (bad.status_code, bad.json()["status"]) == (503, "unavailable")


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
async def test_bad_input_gets_a_clear_4xx_and_a_log_line(content_type: str, body: bytes, status: int, logs: Captured) -> None:
    app = main.create_app(env())
    async with running(app) as client:
        params = [(k, v) for k, v in __import__("urllib.parse").parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)]
        signature = webhooks.twilio_signature(TOKEN, BASE + "/process-speech", params)
        response = await client.post("/process-speech", content=body,
                                     headers={"content-type": content_type, "x-twilio-signature": signature})
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


def test_json_logs_are_one_object_per_line() -> None:
    handler = Captured(json_lines=True)
    main.log.addHandler(handler)
    try:
        main.log.info("request", extra={"route": "/voice", "status": 200, "call": "CA1"})
    finally:
        main.log.removeHandler(handler)
    line = msgspec.json.decode(handler.lines[0])
    assert {k: line[k] for k in ("level", "msg", "route", "status", "call")} == {
        "level": "info", "msg": "request", "route": "/voice", "status": 200, "call": "CA1"}


def test_documents_stay_under_64kb() -> None:
    huge = [main.Segment(text="word " * 5000) for _ in range(30)]
    doc = render([*huge, main.END], gather=gather_tag(main.load_settings({})))
    assert len(doc) < 64_000
    assert ET.fromstring(doc).tag == "Response"


# ----------------------------------------------------------------------------- sentences


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["Hello", " there.", " How", " are", " you?"], ["Hello there.", "How are you?"]),
        (["It costs 3", ".5 dollars.", " Next"], ["It costs 3.5 dollars.", "Next"]),
        (["Dr. Smith", " will see", " you. Ok"], ["Dr. Smith will see you.", "Ok"]),
        (["Wait... and", " then. Done"], ["Wait... and then.", "Done"]),
        (["Wait... Then", " go"], ["Wait...", "Then go"]),
        (["e.g. this", " one. Yes"], ["e.g. this one.", "Yes"]),
        (['He said "stop." Then', " left"], ['He said "stop."', "Then left"]),
        (["Line one\nLine two"], ["Line one", "Line two"]),
        (["Call Dr.", " Smith."], ["Call Dr. Smith."]),
        (["It is 3.", "5 miles."], ["It is 3.5 miles."]),
        (["Really?", " Yes."], ["Really?", "Yes."]),
    ],
)
def test_segmenter_cuts_at_sentence_ends_only(tokens: list[str], expected: list[str]) -> None:
    seg = speech.Segmenter()
    out = [s for t in tokens for s in seg.feed(t)] + seg.flush()
    assert out == expected


def test_a_sentence_is_known_complete_when_the_next_token_arrives() -> None:
    seg = speech.Segmenter()
    assert seg.feed("We open at nine.") == []  # maybe the reply's end: it waits, so a short reply stays whole
    assert seg.feed(" Mr.") == ["We open at nine."]
    assert seg.feed(" Smith is in.") == [] and seg.flush() == ["Mr. Smith is in."]


def test_segmenter_cuts_long_unpunctuated_speech_at_a_pause() -> None:
    seg = speech.Segmenter(max_len=60)
    text = "this sentence goes on and on without any end in sight, and it keeps going and going forever"
    out = seg.feed(text) + seg.flush()
    assert out == ["this sentence goes on and on without any end in sight,", "and it keeps going and going forever"]


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.sampled_from("ab .!?,\n3"), max_size=12), max_size=30))
def test_segmenter_never_loses_or_reorders_text(tokens: list[str]) -> None:
    seg = speech.Segmenter(max_len=40)
    out = [s for t in tokens for s in seg.feed(t)] + seg.flush()
    assert "".join(out).replace(" ", "").replace("\n", "") == "".join(tokens).replace(" ", "").replace("\n", "")
    assert all(s == s.strip() and s for s in out)


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Bold** and _plain_ text", "Bold and _plain_ text"),
        ("## Heading", "Heading"),
        ("- first item", "first item"),
        ("See [the docs](https://example.com/docs) now", "See the docs now"),
        ("Visit https://example.com/x?y=1 today", "Visit today"),
        ("Great job 🎉👍", "Great job"),
        ("Use `code` here", "Use code here"),
    ],
)
def test_markdown_and_emoji_are_not_spoken(raw: str, spoken: str) -> None:
    assert speech.speakable(raw) == spoken


# ----------------------------------------------------------------------------- the dev phone and a real process


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


def test_continuing_documents_redirect_to_the_continuation() -> None:
    doc = render([main.Segment(text="Part one.", **VOICE)], gather="", next_url="/continue?n=1&turn=abc")
    assert tree(doc) == continuing("Part one.", url="/continue?n=1&turn=abc")


async def test_the_test_client_is_signed_like_twilio(monkeypatch: pytest.MonkeyPatch) -> None:
    app = main.create_app(env())
    async with AsyncTestClient(app) as client:
        twilio = Twilio(client, token="not-the-token")
        response = await twilio.call()
    assert response.status_code == 403


# ----------------------------------------------------------------------------- limits (deadlines.within)


async def test_a_limit_fires_on_time_as_a_timeout_error_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.within(0.1):
            await asyncio.sleep(5)
    assert 0.1 <= loop.time() - t0 < 0.1 + 3 * deadlines.Clock.TICK
    async with deadlines.within(0.3):  # not early
        await asyncio.sleep(0.15)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_nested_limits_other_errors_and_outside_cancels_pass_through_and_the_clock_stops() -> None:
    async with deadlines.within(5):
        with pytest.raises(TimeoutError):
            async with deadlines.within(0.05):
                await asyncio.sleep(5)
        await asyncio.sleep(0.01)  # the outer block carries on
        with pytest.raises(KeyError):
            async with deadlines.within(5):
                raise KeyError("mine")

    async def sleeper() -> None:
        async with deadlines.within(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0.01)
    task.cancel()  # someone else's cancel stays a cancel
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(2 * deadlines.Clock.TICK)
    assert not deadlines._clock.limits and not deadlines._clock.armed


def test_limits_work_on_each_new_event_loop() -> None:
    async def late() -> bool:
        try:
            async with deadlines.within(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return True
        return False

    async def abandoned() -> None:  # a loop closed while a limit was open must not stall the next loop's
        async with deadlines.within(5):
            asyncio.get_running_loop().stop()
            await asyncio.sleep(5)

    loop = asyncio.new_event_loop()
    loop.create_task(abandoned())
    loop.run_forever()
    loop.close()
    assert asyncio.run(late()) and asyncio.run(late())
