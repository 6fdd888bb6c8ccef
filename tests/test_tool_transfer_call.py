"""The transfer_call tool: <Dial> to TRANSFER_NUMBER or a named destination, with caller ID."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from conftest import VOICE, Twilio, env, running, tree, twiml
from fake_llm import FakeLLM, Reply
from test_tool_end_call import spoken_then

import main
from plugins.tool_transfer_call import TransferCall, transfer_call

CALL = main.CallInfo(call_sid="CA1", caller="+15005550006", to="+15005550001")


def tool(**extra: str) -> TransferCall:
    made = transfer_call(main.load_settings(env(**extra)))
    assert made is not None
    return made


def test_without_a_number_the_tool_is_not_offered() -> None:
    assert transfer_call(main.load_settings(env())) is None
    app = main.create_app(env())
    assert list(app.state.calls.tools) == ["end_call"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"TRANSFER_NUMBER": "555-1234"}, "TRANSFER_NUMBER: '555-1234' for 'default' is not an E.164 number"),
        ({"TRANSFER_DESTINATIONS": "sales=+1555"}, "TRANSFER_DESTINATIONS: '+1555' for 'sales' is not an E.164 number"),
        (
            {"TRANSFER_NUMBER": "+15005550009", "TRANSFER_CALLER_ID": "me"},
            "TRANSFER_CALLER_ID='me': use caller, number",
        ),
    ],
)
def test_bad_transfer_settings_fail_at_startup_with_a_fix(extra: dict[str, str], message: str) -> None:
    with pytest.raises(main.ConfigError, match=re.escape(message)):
        main.create_app(env(**extra))


async def test_named_destinations_become_an_enum_and_dial_with_caller_id() -> None:
    transfer = tool(TRANSFER_DESTINATIONS="Sales=+15005550010, support=+15005550011")
    assert transfer.spec.parameters["properties"]["destination"]["enum"] == ["sales", "support"]
    assert transfer.spec.parameters["required"] == ["destination"]
    result = await transfer.run({"destination": "Support"}, CALL)
    assert result.action == main.Segment(kind="dial", number="+15005550011", caller_id="+15005550006")
    unknown = await transfer.run({"destination": "billing"}, CALL)
    assert unknown.action is None and "choose one of sales, support" in unknown.content


@pytest.mark.parametrize(
    ("caller_id", "expected"),
    [("caller", "+15005550006"), ("number", "+15005550001"), ("+15005550099", "+15005550099")],
)
async def test_caller_id_is_the_caller_the_number_called_or_a_fixed_one(caller_id: str, expected: str) -> None:
    result = await tool(TRANSFER_NUMBER="+15005550009", TRANSFER_CALLER_ID=caller_id).run({}, CALL)
    assert result.action == main.Segment(kind="dial", number="+15005550009", caller_id=expected)


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
async def test_the_model_transfers_the_call_with_dial(fake_llm: FakeLLM, vendor: str) -> None:
    fake_llm.script(
        Reply(
            "Let me get you a person.",
            tool_calls=[main.ToolCall(id="call_t1", name="transfer_call", arguments={"reason": "billing"})],
        ),
        Reply("Please hold."),
    )
    app = main.create_app(env(LLM_PROVIDER=vendor, TRANSFER_NUMBER="+15005550009", **fake_llm.env(vendor)))
    async with running(app) as client:
        twilio = Twilio(client)
        docs = await twilio.follow(await twilio.say("I want to talk to a human"))

    def expected(r: Any) -> None:
        r.say("Let me get you a person.", **VOICE)
        r.say("Please hold.", **VOICE)
        r.dial("+15005550009", caller_id="+15005550006")

    assert spoken_then(docs) == twiml(expected)
    first = fake_llm.posts[0].body
    offered = {t["function"]["name"] if vendor == "openai" else t["name"] for t in first["tools"]}
    assert offered == {"end_call", "transfer_call"}
    if vendor == "openai":
        assistant = fake_llm.posts[1].body["messages"][-2]
        assert assistant["tool_calls"][0]["function"] == {
            "name": "transfer_call",
            "arguments": json.dumps({"reason": "billing"}),
        }


async def test_the_echo_model_transfers_on_request_for_the_dev_phone() -> None:
    app = main.create_app(env(TRANSFER_NUMBER="+15005550009"))
    async with running(app) as client:
        answer = await Twilio(client).say("please transfer me")

    def expected(r: Any) -> None:
        r.say("Transferring you now.", **VOICE)
        r.dial("+15005550009", caller_id="+15005550006")

    assert tree(answer.content) == twiml(expected)
