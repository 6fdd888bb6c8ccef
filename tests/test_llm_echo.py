"""The echo model: deterministic and offline."""

from __future__ import annotations

from conftest import env

import main
from plugins.llm_echo import EchoProvider


async def test_echo_repeats_the_last_caller_turn_word_by_word() -> None:
    echo = EchoProvider(main.load_settings(env()))
    history = [main.Message(role="user", content="first"), main.Message(role="assistant", content="You said: first."),
               main.Message(role="user", content="what is 3.5 plus one?")]
    events = [e async for e in echo.stream(history, system="ignored")]
    assert events == ["You", " said:", " what", " is", " 3.5", " plus", " one.",
                      main.Usage(input_tokens=9, output_tokens=7)]


async def test_echo_prefix_is_configurable() -> None:
    echo = EchoProvider(main.load_settings(env(ECHO_PREFIX="Heard:")))
    tokens = [e async for e in echo.stream([main.Message(role="user", content="hi")], system="")]
    assert "".join(t for t in tokens if isinstance(t, str)) == "Heard: hi."


async def test_echo_delays_let_a_person_see_fillers_and_streaming() -> None:
    import time

    echo = EchoProvider(main.load_settings(env(ECHO_FIRST_TOKEN_MS="200", ECHO_TOKEN_MS="50")))
    t0 = time.perf_counter()
    stamps = [time.perf_counter() - t0 async for e in echo.stream([main.Message(role="user", content="a b")], system="")
              if isinstance(e, str)]
    assert len(stamps) == 4  # "You" " said:" " a" " b."
    assert stamps[0] >= 0.2 and stamps[-1] - stamps[0] >= 3 * 0.05
