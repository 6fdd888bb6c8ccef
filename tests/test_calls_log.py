"""The default call recorder: one structured line per finished call, numbers masked."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from conftest import Captured, Scripted, Twilio, concurrent, env, plugin

import main


class Metered(Scripted):
    async def stream(self, messages: Any, *, system: str, tools: Any = ()) -> Any:
        async for event in super().stream(messages, system=system, tools=tools):
            yield event
        yield main.Usage(input_tokens=120, output_tokens=30)


@pytest.mark.parametrize("json_lines", [False, True])
async def test_one_line_per_call_with_masked_numbers_cost_and_latency(json_lines: bool) -> None:
    model = Metered("scripted", ["Sure.", "Bye now."], ttft=0.1)
    app = main.create_app(
        env(LLM_PROVIDER="scripted", PRICES='{"scripted": [1, 4]}', CALL_PRICE_PER_MINUTE="0.02"),
        plugins=[plugin(llm=[model])],
    )
    handler = Captured(json_lines=json_lines)
    main.log.addHandler(handler)
    try:
        async with concurrent(app) as client:
            twilio = Twilio(client)
            await twilio.call()
            assert await twilio.turn("book a table") == ["Sure."]
            assert await twilio.turn("thanks") == ["Bye now."]
            await twilio.post("/status", CallStatus="completed")
    finally:
        main.log.removeHandler(handler)
    lines = [line for line in handler.lines if "call record" in line]
    assert len(lines) == 1
    cost = round(2 * (120 * 1 + 30 * 4) / 1e6 + 0.02, 6)
    if json_lines:
        fields = msgspec.json.decode(lines[0])
        seconds, wait = fields.pop("seconds"), fields.pop("first_audio_ms")
        fields.pop("ts")
        assert fields == {
            "level": "info",
            "msg": "call record",
            "call": twilio.call_sid,
            "caller": "…0006",
            "to": "…0001",
            "outcome": "completed",
            "turns": 2,
            "providers": "scripted",
            "input_tokens": 240,
            "output_tokens": 60,
            "cost_usd": cost,
        }
        assert 0 <= seconds < 5 and 95 <= wait < 3000
    else:
        head, _, tail = lines[0].partition(" seconds=")
        assert head == f"info call record call={twilio.call_sid} caller=…0006 to=…0001 outcome=completed"
        assert f" turns=2 providers=scripted input_tokens=240 output_tokens=60 cost_usd={cost} first_audio_ms=" in tail


async def test_a_call_without_turns_is_one_line_too(logs: Captured) -> None:
    app = main.create_app(env())
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.post("/status", CallStatus="no-answer")
    (line,) = [line for line in logs.lines if line.startswith("info call record")]
    assert " outcome=no-answer " in line and " turns=0 providers=- input_tokens=0 output_tokens=0 cost_usd=0.0 " in line
    assert line.endswith("first_audio_ms=None")


async def test_call_recorders_none_records_nothing(logs: Captured) -> None:
    app = main.create_app(env(CALL_RECORDERS="none"))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        await twilio.post("/status", CallStatus="completed")
    assert app.state.calls.obs.recorders == []
    assert [line.split(" seconds=")[0] for line in logs.lines if " call " in f" {line} "] == [
        f"info call ended call={twilio.call_sid} outcome=completed turns=0"
    ]
