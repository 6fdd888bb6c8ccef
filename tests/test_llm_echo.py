"""The echo model: deterministic and offline."""

from __future__ import annotations

from conftest import env

import main
from plugins.llm_echo import EchoProvider


async def test_echo_repeats_the_last_caller_turn_word_by_word() -> None:
    echo = EchoProvider(main.load_settings(env()))
    history = [
        main.Message(role="user", content="first"),
        main.Message(role="assistant", content="You said: first."),
        main.Message(role="user", content="what is 3.5 plus one?"),
    ]
    events = [e async for e in echo.stream(history, system="ignored")]
    assert events == [
        "You",
        " said:",
        " what",
        " is",
        " 3.5",
        " plus",
        " one.",
        main.Usage(input_tokens=9, output_tokens=7),
    ]


async def test_echo_prefix_is_configurable() -> None:
    echo = EchoProvider(main.load_settings(env(ECHO_PREFIX="Heard:")))
    tokens = [e async for e in echo.stream([main.Message(role="user", content="hi")], system="")]
    assert "".join(t for t in tokens if isinstance(t, str)) == "Heard: hi."


async def test_echo_delays_let_a_person_see_fillers_and_streaming() -> None:
    import time

    echo = EchoProvider(main.load_settings(env(ECHO_FIRST_TOKEN_MS="200", ECHO_TOKEN_MS="50")))
    t0 = time.perf_counter()
    stamps = [
        time.perf_counter() - t0
        async for e in echo.stream([main.Message(role="user", content="a b")], system="")
        if isinstance(e, str)
    ]
    assert len(stamps) == 4  # "You" " said:" " a" " b."
    assert stamps[0] >= 0.2 and stamps[-1] - stamps[0] >= 3 * 0.05


TOOLS = (
    main.ToolSpec(name="transfer_call", description="Transfer to a person."),
    main.ToolSpec(name="end_call", description="Hang up."),
)


async def test_echo_calls_offered_tools_on_fixed_phrases() -> None:
    echo = EchoProvider(main.load_settings(env()))

    async def reply(text: str, tools: tuple[main.ToolSpec, ...] = TOOLS) -> list[object]:
        return [e async for e in echo.stream([main.Message(role="user", content=text)], system="", tools=tools)]

    transfer = main.ToolCall(id="echo-transfer_call-1", name="transfer_call", arguments={})
    end = main.ToolCall(id="echo-end_call-1", name="end_call", arguments={})
    assert await reply("Can I talk to a person please") == [transfer, main.Usage(input_tokens=7, output_tokens=1)]
    assert (await reply("please TRANSFER ME"))[0] == transfer
    assert (await reply("OK, goodbye"))[0] == end
    assert (await reply("That's all, thanks"))[0] == end
    assert (await reply("goodbye", tools=TOOLS[:1]))[:3] == ["You", " said:", " goodbye."]  # end_call not offered
    assert (await reply("goodbye", tools=()))[0] == "You"


async def test_after_a_tool_result_echo_says_what_happens_instead_of_calling_it_again() -> None:
    echo = EchoProvider(main.load_settings(env()))
    history = [
        main.Message(role="user", content="goodbye"),
        main.Message(role="assistant", content="", tool_calls=(main.ToolCall(id="e1", name="end_call", arguments={}),)),
        main.Message(role="tool", content="call ended", tool_call_id="e1"),
    ]
    assert [e async for e in echo.stream(history, system="", tools=TOOLS)] == [
        "Goodbye!",
        main.Usage(input_tokens=3, output_tokens=1),
    ]
