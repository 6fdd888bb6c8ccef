"""The end_call tool: the model says goodbye and the call hangs up (webhook mode)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import VOICE, Twilio, env, running, tree, twiml
from fake_llm import FakeLLM, Reply

import main
from plugins.tool_end_call import EndCall


def spoken_then(docs: list[Any]) -> tuple[Any, ...]:
    """Every verb of a reply that spans documents, <Redirect>s left out, as one <Response> tree."""
    children = tuple(child for doc in docs for child in tree(doc.content)[3] if child[0] != "Redirect")
    return ("Response", {}, "", children)


async def test_end_call_asks_for_a_hangup_after_the_reply() -> None:
    result = await EndCall(main.load_settings(env())).run({}, main.CallInfo(call_sid="CA1"))
    assert result == main.ToolResult(
        content="The call ends after your reply. Say a short goodbye.", action=main.Segment(kind="hangup")
    )


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
async def test_the_model_ends_the_call_goodbye_then_hangup(fake_llm: FakeLLM, vendor: str) -> None:
    fake_llm.script(
        Reply("Thanks for calling.", tool_calls=[main.ToolCall(id="call_end_1", name="end_call", arguments={})]),
        Reply("Goodbye!"),
    )
    app = main.create_app(env(LLM_PROVIDER=vendor, **fake_llm.env(vendor)))
    async with running(app) as client:
        twilio = Twilio(client)
        docs = await twilio.follow(await twilio.say("that's everything, bye"))

    def expected(r: Any) -> None:
        r.say("Thanks for calling.", **VOICE)
        r.say("Goodbye!", **VOICE)
        r.hangup()

    assert spoken_then(docs) == twiml(expected)
    offered = fake_llm.posts[0].body["tools"]
    names = [t["function"]["name"] if vendor == "openai" else t["name"] for t in offered]
    assert names == ["end_call"]  # transfer_call is not offered: no TRANSFER_NUMBER
    result = fake_llm.posts[1].body["messages"][-1]
    if vendor == "openai":
        assert result == {
            "role": "tool",
            "tool_call_id": "call_end_1",
            "content": "The call ends after your reply. Say a short goodbye.",
        }
    else:
        assert result["role"] == "user" and result["content"][0]["type"] == "tool_result"
        assert result["content"][0]["tool_use_id"] == "call_end_1"


async def test_a_silent_hangup_still_says_goodbye(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("", tool_calls=[main.ToolCall(id="c1", name="end_call", arguments={})]), Reply(""))
    app = main.create_app(env(LLM_PROVIDER="openai", **fake_llm.env("openai")))
    async with running(app) as client:
        twilio = Twilio(client)
        docs = await twilio.follow(await twilio.say("bye"))

    def expected(r: Any) -> None:
        r.say(app.state.settings.farewell, **VOICE)
        r.hangup()

    assert spoken_then(docs) == twiml(expected)


async def test_the_echo_model_hangs_up_on_goodbye_for_the_dev_phone() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.say("ok goodbye")

    def expected(r: Any) -> None:
        r.say("Goodbye!", **VOICE)
        r.hangup()

    assert tree(answer.content) == twiml(expected)


async def test_a_failing_tool_is_explained_by_the_model_never_a_traceback(fake_llm: FakeLLM) -> None:
    class Broken(main.Tool):
        spec = main.ToolSpec(name="lookup_order", description="Look up an order.")

        async def run(self, arguments: dict[str, Any], call: main.CallInfo) -> main.ToolResult:
            raise ConnectionError("orders database unreachable")

    class Plugin:
        @main.hookimpl
        def register_tools(self, register: Any) -> None:
            register("lookup_order", lambda settings: Broken())

    fake_llm.script(
        Reply("", tool_calls=[main.ToolCall(id="c1", name="lookup_order", arguments={"id": "42"})]),
        Reply("Sorry, I can't look up orders right now."),
    )
    app = main.create_app(
        env(LLM_PROVIDER="openai", TOOLS="lookup_order", **fake_llm.env("openai")), plugins=[Plugin()]
    )
    async with running(app) as client:
        twilio = Twilio(client)
        spoken = await twilio.turn("where is my order")
    assert spoken == ["Sorry, I can't look up orders right now."]
    told = fake_llm.posts[1].body["messages"][-1]
    assert told["role"] == "tool" and "failed (orders database unreachable)" in told["content"]
    assert "Traceback" not in " ".join(spoken)


async def test_a_tool_the_model_invents_is_refused_politely(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Reply("", tool_calls=[main.ToolCall(id="c1", name="launch_rocket", arguments={})]), Reply("I can't do that.")
    )
    app = main.create_app(env(LLM_PROVIDER="openai", **fake_llm.env("openai")))
    async with running(app) as client:
        spoken = await Twilio(client).turn("launch the rocket")
    assert spoken == ["I can't do that."]
    assert "no tool named 'launch_rocket'" in fake_llm.posts[1].body["messages"][-1]["content"]
