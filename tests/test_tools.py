"""The tool kind: third-party tools arrive through entry points and are called by the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Twilio, env, running
from fake_llm import FakeLLM, Reply

import main

HOURS_PLUGIN = '''
"""A third-party switchboard tool: the business's opening hours."""
from main import Tool, ToolResult, ToolSpec, hookimpl


class BusinessHours(Tool):
    spec = ToolSpec(
        name="business_hours",
        description="Opening hours for a day of the week.",
        parameters={"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]},
    )

    def __init__(self, settings):
        self.hours = settings.get("HOURS", "9 to 5")

    async def run(self, arguments, call):
        day = arguments.get("day", "today")
        return ToolResult(content=f"On {day} we are open {self.hours}.")


@hookimpl
def register_tools(register):
    register("business_hours", BusinessHours)
'''


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the example package the way pip would: a module plus dist-info with an entry point."""
    (tmp_path / "sb_hours.py").write_text(HOURS_PLUGIN)
    dist = tmp_path / "sb_hours-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-hours\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[switchboard]\nhours = sb_hours\n")
    monkeypatch.syspath_prepend(str(tmp_path))


async def test_an_entry_point_tool_is_discovered_offered_and_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_llm: FakeLLM
) -> None:
    install(tmp_path, monkeypatch)
    fake_llm.script(
        Reply("", tool_calls=[main.ToolCall(id="call_h1", name="business_hours", arguments={"day": "Monday"})]),
        Reply("On Monday we open at eight."),
    )
    app = main.create_app(
        env(LLM_PROVIDER="openai", TOOLS="end_call,business_hours", HOURS="8 to 6", **fake_llm.env("openai"))
    )
    async with running(app) as client:
        spoken = await Twilio(client).turn("are you open on monday")
    offered = [t["function"] for t in fake_llm.posts[0].body["tools"]]
    assert [t["name"] for t in offered] == ["end_call", "business_hours"]
    assert offered[1]["parameters"] == {
        "type": "object",
        "properties": {"day": {"type": "string"}},
        "required": ["day"],
    }
    assert fake_llm.posts[1].body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_h1",
        "content": "On Monday we are open 8 to 6.",
    }
    assert spoken == ["On Monday we open at eight."]


def test_an_unknown_tool_name_fails_at_startup_with_the_list() -> None:
    with pytest.raises(main.ConfigError, match="TOOLS='weather' is not registered; available: end_call, transfer_call"):
        main.create_app(env(TOOLS="weather"))


def test_tools_can_be_turned_off() -> None:
    app = main.create_app(env(TOOLS="none", TRANSFER_NUMBER="+15005550009"))
    assert app.state.calls.tool_specs == ()
    assert main.load_settings({"TOOLS": " "}).tools == ("end_call", "transfer_call")  # blank is unset


async def test_tool_rounds_are_bounded(fake_llm: FakeLLM) -> None:
    loop = Reply("", tool_calls=[main.ToolCall(id="c", name="end_call", arguments={})])
    fake_llm.script(loop, loop, loop, Reply("Done looping."))
    app = main.create_app(env(LLM_PROVIDER="openai", **fake_llm.env("openai")))
    async with running(app) as client:
        await Twilio(client).turn("bye")
    assert [("tools" in p.body) for p in fake_llm.posts] == [True, True, True, False]  # the last round offers none
    assert len(fake_llm.posts) == 4
