"""The OpenAI Realtime speech model, through the real `openai` SDK, against the fake GA server (fake_realtime)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
import pytest
from fake_realtime import FakeRealtime, Response, Utterance

import main
import observe
from plugins.speech_openai import DEFAULT_MODEL, RealtimeError, RealtimeModel, RealtimeSession, session_body

SILENCE = b"\xff" * 160  # one 20 ms frame of μ-law silence
HISTORY = [
    main.Message(role="user", content="What are your hours?"),
    main.Message(role="assistant", content="", tool_calls=(main.ToolCall(id="c1", name="hours", arguments={}),)),
    main.Message(role="tool", content='{"open": "9-5"}', tool_call_id="c1"),
    main.Message(role="assistant", content="We are open nine to five.", interrupted=True),
]
END_CALL = main.ToolSpec(
    name="end_call",
    description="Hang up.",
    parameters={"type": "object", "properties": {"reason": {"type": "string"}}},
)


def model(fake: FakeRealtime, **env: str) -> RealtimeModel:
    return RealtimeModel(main.load_settings(fake.env(**env)))


async def opened(
    fake: FakeRealtime, history: Sequence[main.Message] = (), tools: Sequence[main.ToolSpec] = (), **env: str
) -> tuple[RealtimeModel, RealtimeSession]:
    m = model(fake, **env)
    session = await m.open(instructions="Be brief.", tools=tools, history=history)
    assert isinstance(session, RealtimeSession)
    return m, session


def speak(session: main.SpeechSession, ms: int) -> None:
    for _ in range(ms // 20):
        session.send_audio(SILENCE)


async def collect(events: AsyncIterator[main.SpeechEvent], until: type, count: int = 1) -> list[Any]:
    """Events (audio summarised as ("audio", item, bytes)) up to the count-th of type `until`."""
    got: list[Any] = []
    seen = 0
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, main.SpeechAudio):
                if got and isinstance(got[-1], tuple) and got[-1][1] == event.item:
                    got[-1] = ("audio", event.item, got[-1][2] + len(event.data))
                else:
                    got.append(("audio", event.item, len(event.data)))
            else:
                got.append(event)
            seen += isinstance(event, until)
            if seen == count:
                return got
    raise AssertionError(f"the events ended first: {got}")


def sent(fake: FakeRealtime) -> list[dict[str, Any]]:
    """The client events other than audio appends."""
    return [e for e in fake.events if e["type"] != "input_audio_buffer.append"]


async def test_open_configures_pcmu_server_vad_transcription_and_tools_then_seeds_spoken_history(
    fake_realtime: FakeRealtime,
) -> None:
    m, session = await opened(fake_realtime, HISTORY, [END_CALL], OPENAI_REALTIME_VAD_SILENCE_MS="600")
    await fake_realtime.until(lambda: len(fake_realtime.connections[0].items) == 2)
    await session.close()
    await m.aclose()
    conn = fake_realtime.connections[0]
    assert conn.path == f"/v1/realtime?model={DEFAULT_MODEL}"
    assert conn.headers["authorization"] == "Bearer made-up-openai-key"
    assert "openai-beta" not in conn.headers and conn.binary_frames == 0
    assert sent(fake_realtime) == [
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "model": "gpt-realtime-2.1",
                "instructions": "Be brief.",
                "output_modalities": ["audio"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "transcription": {"model": "gpt-realtime-whisper", "language": "en"},
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.5,
                            "prefix_padding_ms": 300,
                            "silence_duration_ms": 600,
                            "create_response": True,
                            "interrupt_response": True,
                            "idle_timeout_ms": 8000,  # on by default: media mode's misses need it
                        },
                    },
                    "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
                },
                "tools": [
                    {
                        "type": "function",
                        "name": "end_call",
                        "description": "Hang up.",
                        "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}},
                    }
                ],
                "tool_choice": "auto",
            },
        },
        # tool calls and results are left out: the spoken text is what the caller heard
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "What are your hours?"}],
            },
        },
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "We are open nine to five."}],
            },
        },
    ]
    assert [(i["role"], i["content"][0]["type"]) for i in conn.items] == [
        ("user", "input_text"),
        ("assistant", "output_text"),
    ]


async def test_settings_choose_the_url_model_voice_and_turn_detection(fake_realtime: FakeRealtime) -> None:
    env = {
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # the LLM's server; the socket goes elsewhere
        "OPENAI_REALTIME_URL": fake_realtime.url + "/realtime",
        "OPENAI_REALTIME_MODEL": "gpt-realtime-2.1-mini",
        "OPENAI_REALTIME_VOICE": "cedar",
        "OPENAI_REALTIME_VAD_THRESHOLD": "0.7",
        "OPENAI_REALTIME_VAD_PREFIX_MS": "200",
        "OPENAI_REALTIME_IDLE_TIMEOUT_MS": "8000",
        "LANGUAGE": "es-MX",
    }
    m, session = await opened(fake_realtime, **env)
    await session.close()
    await m.aclose()
    body = fake_realtime.events[0]["session"]
    assert fake_realtime.connections[0].path == "/v1/realtime?model=gpt-realtime-2.1-mini"
    assert body["audio"]["output"]["voice"] == "cedar"
    assert body["audio"]["input"]["transcription"] == {"model": "gpt-realtime-whisper", "language": "es"}
    assert body["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.7,
        "prefix_padding_ms": 200,
        "silence_duration_ms": 500,
        "create_response": True,
        "interrupt_response": True,
        "idle_timeout_ms": 8000,
    }


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OPENAI_REALTIME_VAD_THRESHOLD", "1.5", "set it between 0 and 1"),
        ("OPENAI_REALTIME_VAD_SILENCE_MS", "0", "a whole number of milliseconds above 0"),
    ],
)
def test_bad_turn_detection_settings_say_what_to_set(name: str, value: str, message: str) -> None:
    env = {"OPENAI_API_KEY": "k", name: value}
    with pytest.raises(main.ConfigError, match=message):
        RealtimeModel(main.load_settings(env))


def test_the_model_needs_a_key() -> None:
    with pytest.raises(main.ConfigError, match="OPENAI_API_KEY is not set; SPEECH_MODEL=openai needs it"):
        RealtimeModel(main.load_settings({}))


async def test_a_turn_is_caller_speaking_done_audio_transcripts_and_the_reply_with_usage(
    fake_realtime: FakeRealtime,
) -> None:
    fake_realtime.hear(Utterance(start_ms=200, end_ms=800, transcript="what time is it"))
    fake_realtime.script(Response("It is noon.", audio_ms=300, chunk_ms=100, cached_text_tokens=100))
    m, session = await opened(fake_realtime)
    speak(session, 1400)  # the utterance, then the 500 ms of silence VAD waits for
    events = await collect(session.events(), main.ReplyDone)
    await fake_realtime.until(lambda: fake_realtime.connections[0].audio_bytes == 1400 * 8)  # every frame arrived
    await session.close()
    await m.aclose()
    item = events[3][1]
    assert events == [
        main.CallerSpeaking(),
        main.CallerDone(),
        main.Transcript("user", events[2].item, "what time is it"),
        ("audio", item, 2400),  # 300 ms of μ-law, unconverted
        main.Transcript("assistant", item, "It is noon."),
        main.ReplyDone(
            main.Usage(
                input_tokens=120,
                cached_input_tokens=100,
                audio_input_tokens=40,
                output_tokens=3,
                audio_output_tokens=6,
                transcription_ms=600,  # whisper reports seconds: 0.6 s
            )
        ),
    ]


async def test_the_idle_timeout_is_caller_silent_then_the_models_own_reprompt(fake_realtime: FakeRealtime) -> None:
    fake_realtime.script(Response("Are you still there?", audio_ms=200))
    m, session = await opened(fake_realtime, OPENAI_REALTIME_IDLE_TIMEOUT_MS="300")
    speak(session, 400)  # silence: the timeout at 300 ms, then the reprompt's 200 ms count before the next
    events = await collect(session.events(), main.ReplyDone)
    await fake_realtime.until(lambda: fake_realtime.connections[0].audio_bytes == 400 * 8)
    await session.close()
    await m.aclose()
    conn = fake_realtime.connections[0]
    assert conn.session["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 300
    (timeout,) = [{k: v for k, v in e.items() if k != "event_id"} for e in conn.sent if "timeout" in e["type"]]
    assert timeout == {
        "type": "input_audio_buffer.timeout_triggered",
        "audio_start_ms": 0,
        "audio_end_ms": 300,
        "item_id": conn.items[0]["id"],  # the silent stretch, committed as an empty user item
    }
    item = events[1][1]
    assert events == [
        main.CallerSilent(),
        ("audio", item, 200 * 8),
        main.Transcript("assistant", item, "Are you still there?"),
        main.ReplyDone(main.Usage(input_tokens=120, audio_input_tokens=40, output_tokens=4, audio_output_tokens=4)),
    ]


def test_the_idle_timeout_is_on_by_default_and_zero_turns_it_off() -> None:
    def turn(**env: str) -> dict[str, Any]:
        body = session_body(RealtimeModel(main.load_settings({"OPENAI_API_KEY": "k", **env})), "", ())
        return dict(body["audio"]["input"]["turn_detection"])

    assert turn()["idle_timeout_ms"] == 8000 and turn()["type"] == "server_vad"
    assert "idle_timeout_ms" not in turn(OPENAI_REALTIME_IDLE_TIMEOUT_MS="0")
    with pytest.raises(main.ConfigError, match="OPENAI_REALTIME_IDLE_TIMEOUT_MS='soon' is not valid"):
        turn(OPENAI_REALTIME_IDLE_TIMEOUT_MS="soon")


async def test_the_fake_times_out_only_with_server_vad_and_its_idle_timeout(fake_realtime: FakeRealtime) -> None:
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_realtime.url)
    conn = await client.realtime.connect(model="gpt-realtime").enter()

    def update(turn: dict[str, Any]) -> str:
        audio = {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": turn}}
        return json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": audio}})

    await conn.send_raw(update({"type": "semantic_vad", "idle_timeout_ms": 300}))  # server VAD's alone
    silence = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(SILENCE).decode()})
    for turn in ({"type": "semantic_vad", "eagerness": "low"}, {"type": "server_vad"}):  # no idle timeout
        await conn.send_raw(update(turn))
        for _ in range(50):  # a second of silence
            await conn.send_raw(silence)
    await conn.send_raw(json.dumps({"type": "response.cancel"}))  # its error says every append was handled
    received: list[dict[str, Any]] = []
    while not received or received[-1].get("error", {}).get("code") != "response_cancel_not_active":
        received.append(json.loads(await conn.recv_bytes()))
    await conn.close()
    await client.close()
    assert [(e["type"], e.get("error", {}).get("param")) for e in received] == [
        ("session.created", None),
        ("error", "session.audio.input.turn_detection.idle_timeout_ms"),
        ("session.updated", None),
        ("session.updated", None),
        ("error", None),
    ]
    assert received[1]["error"]["code"] == "unknown_parameter"


async def test_audio_is_passed_through_byte_for_byte(fake_realtime: FakeRealtime) -> None:
    fake_realtime.hear(Utterance(start_ms=0, end_ms=100))
    fake_realtime.script(Response(audio_ms=40, chunk_ms=20))
    m, session = await opened(fake_realtime)
    speak(session, 600)
    audio = b""
    async with asyncio.timeout(5):
        async for event in session.events():
            if isinstance(event, main.SpeechAudio):
                audio += event.data
            if isinstance(event, main.ReplyDone):
                break
    await session.close()
    await m.aclose()
    deltas = [e["delta"] for e in fake_realtime.connections[0].sent if e["type"] == "response.output_audio.delta"]
    assert audio == b"".join(base64.b64decode(d) for d in deltas) and len(audio) == 320
    appended = [e["audio"] for e in fake_realtime.events if e["type"] == "input_audio_buffer.append"]
    assert set(appended) == {base64.b64encode(SILENCE).decode()}


async def test_barge_in_truncates_at_what_was_heard_clamped_to_the_audio_received(
    fake_realtime: FakeRealtime,
) -> None:
    fake_realtime.hear(Utterance(start_ms=0, end_ms=100), Utterance(start_ms=1000, end_ms=1200))
    fake_realtime.script(Response("A long answer that goes on.", audio_ms=1000, chunk_ms=100, stall_after=3))
    m, session = await opened(fake_realtime)
    events = session.events()
    speak(session, 600)
    first = await collect(events, main.SpeechAudio, 3)
    item = first[-1][1]
    speak(session, 400)  # the caller talks over the reply
    interrupted = await collect(events, main.ReplyDone)
    assert interrupted[0] == main.CallerSpeaking()
    assert interrupted[-1].interrupted
    await session.truncate(item, 1500)  # the caller heard more than was sent? only 300 ms exist
    await fake_realtime.until(lambda: fake_realtime.of_type("conversation.item.truncate"))
    await session.truncate(item, 120)
    await session.truncate(item, 0)  # nothing heard: the item goes
    await fake_realtime.until(lambda: fake_realtime.of_type("conversation.item.delete"))
    await session.close()
    await m.aclose()
    assert [e for e in sent(fake_realtime) if e["type"].startswith("conversation.item.")] == [
        {"type": "conversation.item.truncate", "item_id": item, "audio_end_ms": 300, "content_index": 0},
        {"type": "conversation.item.truncate", "item_id": item, "audio_end_ms": 120, "content_index": 0},
        {"type": "conversation.item.delete", "item_id": item},
    ]
    server = [e for e in fake_realtime.connections[0].sent if e["type"] in ("error", "conversation.item.truncated")]
    assert [e["type"] for e in server] == ["conversation.item.truncated", "conversation.item.truncated"]
    done = [e for e in fake_realtime.connections[0].sent if e["type"] == "response.done"][0]["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "turn_detected")


async def test_a_tool_call_runs_and_its_output_goes_back_after_the_response_is_done(
    fake_realtime: FakeRealtime,
) -> None:
    fake_realtime.hear(Utterance(start_ms=0, end_ms=100))
    call = main.ToolCall(id="call_7", name="end_call", arguments={"reason": "caller is done"})
    fake_realtime.script(Response("Goodbye!", audio_ms=100, tool_calls=[call]), Response("Bye.", audio_ms=100))
    m, session = await opened(fake_realtime, tools=[END_CALL])
    events = session.events()
    speak(session, 700)
    got = [e async for e in _until(events, main.ToolCall)]
    assert got[-1] == call
    await session.tool_result("call_7", '{"ok": true}')  # the response has not ended yet
    await collect(events, main.ReplyDone, 2)
    await session.close()
    await m.aclose()
    kinds = [(e["type"], (e.get("item") or {}).get("type")) for e in sent(fake_realtime)[1:]]
    assert kinds == [("conversation.item.create", "function_call_output"), ("response.create", None)]
    output = {"type": "function_call_output", "call_id": "call_7", "output": '{"ok": true}'}
    assert sent(fake_realtime)[1]["item"] == output
    server = fake_realtime.connections[0].sent
    assert not [e for e in server if e["type"] == "error"]
    created = [n for n, e in enumerate(server) if e["type"] == "response.created"]
    done = [n for n, e in enumerate(server) if e["type"] == "response.done"]
    assert len(created) == 2 and done[0] < created[1]


async def _until(events: AsyncIterator[main.SpeechEvent], kind: type) -> AsyncIterator[main.SpeechEvent]:
    async with asyncio.timeout(5):
        async for event in events:
            yield event
            if isinstance(event, kind):
                return


async def test_keypad_digits_reach_the_model_as_text_and_it_answers(fake_realtime: FakeRealtime) -> None:
    fake_realtime.script(Response("You pressed five.", audio_ms=100))
    m, session = await opened(fake_realtime)
    await session.send_text("The caller pressed 5 on the keypad.")
    events = await collect(session.events(), main.ReplyDone)
    await session.close()
    await m.aclose()
    assert sent(fake_realtime)[1:] == [
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "The caller pressed 5 on the keypad."}],
            },
        },
        {"type": "response.create"},
    ]
    assert events[-2] == main.Transcript("assistant", events[0][1], "You pressed five.")


async def test_session_expiry_ends_the_events_with_a_retryable_provider_error() -> None:
    with FakeRealtime(max_seconds=0.2) as fake:
        m, session = await opened(fake)
        with pytest.raises(main.ProviderError, match="session_expired") as caught:
            await collect(session.events(), main.ReplyDone)
        # the server's close (1001) completes before ours starts: closing at once races it (1000 may win)
        await fake.until(lambda: fake.connections[0].close_code is not None, timeout=15)
        await session.close()
        await m.aclose()
    assert fake.connections[0].close_code == 1001
    assert caught.value.retryable and caught.value.provider == "openai"
    assert isinstance(caught.value.__cause__, RealtimeError)


async def test_the_socket_dropping_mid_reply_is_a_retryable_provider_error(fake_realtime: FakeRealtime) -> None:
    fake_realtime.hear(Utterance(start_ms=0, end_ms=100))
    fake_realtime.script(Response(audio_ms=500, close_after=2))
    m, session = await opened(fake_realtime)
    speak(session, 600)
    with pytest.raises(main.ProviderError, match="socket closed") as caught:
        await collect(session.events(), main.ReplyDone)
    await session.close()
    await m.aclose()
    assert caught.value.retryable and caught.value.__cause__ is not None


async def test_a_refused_key_is_not_retryable_and_a_busy_server_is(fake_realtime: FakeRealtime) -> None:
    m = model(fake_realtime, OPENAI_API_KEY=fake_realtime.bad_key)
    with pytest.raises(main.ProviderError, match="invalid_api_key") as caught:
        await m.open(instructions="", tools=(), history=())
    assert not caught.value.retryable
    await m.aclose()
    fake_realtime.refuse = 429
    m = model(fake_realtime)
    with pytest.raises(main.ProviderError, match="HTTP 429") as busy:
        await m.open(instructions="", tools=(), history=())
    assert busy.value.retryable and busy.value.__cause__ is not None
    await m.aclose()


async def test_non_fatal_errors_are_logged_once_and_the_session_goes_on(fake_realtime: FakeRealtime, logs: Any) -> None:
    fake_realtime.script(Response("One.", audio_ms=100))
    m, session = await opened(fake_realtime)
    for _ in range(3):  # an unknown item: the server refuses each
        session._send({"type": "conversation.item.delete", "item_id": "nope"})
    await session.send_text("hello")
    events = await collect(session.events(), main.ReplyDone)
    await session.close()
    await m.aclose()
    assert isinstance(events[-1], main.ReplyDone)
    assert [line for line in logs.lines if "realtime error" in line] == [
        "warning realtime error ignored provider=openai code=item_not_found error=Item with item_id not found: nope"
    ]


# -- the fake is strict: what a beta client sends is refused


async def test_the_fake_refuses_the_beta_protocol(fake_realtime: FakeRealtime) -> None:
    socket = "ws://" + fake_realtime.url.removeprefix("http://")
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_realtime.url, websocket_base_url=socket)
    with pytest.raises(Exception, match="HTTP 400"):
        await client.beta.realtime.connect(model="gpt-realtime").enter()  # sends OpenAI-Beta: realtime=v1
    conn = await client.realtime.connect(model="gpt-realtime").enter()
    beta = [
        {"type": "session.update", "session": {"type": "realtime", "input_audio_format": "g711_ulaw"}},
        {"type": "session.update", "session": {"modalities": ["audio", "text"]}},
        {"type": "session.update", "session": {"instructions": "no type"}},
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "beta"}]},
        },
        {"type": "session.update", "session": {"type": "realtime", "temperature": 0.8}},
    ]
    for event in beta:
        await conn.send_raw(json.dumps(event))
    errors = []
    while len(errors) < len(beta):
        event = json.loads(await conn.recv_bytes())
        if event["type"] == "error":
            errors.append((event["error"]["code"], event["error"]["param"]))
    await conn.close()
    await client.close()
    assert errors == [
        ("unknown_parameter", "session.input_audio_format"),
        ("unknown_parameter", "session.modalities"),
        ("missing_required_parameter", "session.type"),
        ("invalid_value", "item.content[0].type"),
        ("unknown_parameter", "session.temperature"),
    ]


async def test_the_fake_answers_truncates_past_the_end_or_at_zero_as_the_real_server(
    fake_realtime: FakeRealtime,
) -> None:
    fake_realtime.script(Response(audio_ms=200))
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_realtime.url)
    conn = await client.realtime.connect(model="gpt-realtime").enter()
    await conn.send_raw(json.dumps({"type": "response.create"}))
    received: list[dict[str, Any]] = []
    while not received or received[-1]["type"] != "response.done":
        received.append(json.loads(await conn.recv_bytes()))
    item = received[-1]["response"]["output"][0]["id"]
    for end in (260, 0):
        await conn.send_raw(
            json.dumps(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item,
                    "content_index": 0,
                    "audio_end_ms": end,
                    "event_id": f"ev{end}",
                }
            )
        )
    answers = [json.loads(await conn.recv_bytes()) for _ in range(3)]
    await conn.close()
    await client.close()
    assert [(a["type"], a.get("audio_end_ms"), (a.get("error") or {}).get("message")) for a in answers] == [
        ("error", None, "Audio content of 200ms is already shorter than 260ms"),
        ("conversation.item.truncated", 200, None),
        ("error", None, "Only model output audio messages can be truncated"),
    ]
    assert answers[0]["error"]["event_id"] is None and answers[2]["error"]["code"] == "unsupported_content_type"


# -- cost


def test_a_realtime_reply_is_priced_with_its_own_text_audio_cached_and_transcription_rates() -> None:
    settings = main.load_settings({"OPENAI_API_KEY": "k"})
    prices = observe.Prices(settings, [], [RealtimeModel(settings)])
    usage = main.Usage(
        input_tokens=1000,
        cached_input_tokens=600,
        audio_input_tokens=2000,
        cached_audio_input_tokens=500,
        output_tokens=100,
        audio_output_tokens=400,
        transcription_ms=30_000,
    )
    expected = (
        400 * 4.00 + 600 * 0.40 + 1500 * 32.00 + 500 * 0.40 + 100 * 24.00 + 400 * 64.00
    ) / 1_000_000 + 0.5 * 0.017
    assert prices.cost(observe.speech_key("openai"), usage) == pytest.approx(expected)
