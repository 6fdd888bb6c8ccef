"""Gather mode: the greeting, each turn streamed sentence by sentence through /continue, misses, retries, failures."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import msgspec
from conftest import (
    VOICE,
    Captured,
    ProviderError,
    Scripted,
    Twilio,
    concurrent,
    continuing,
    env,
    listening,
    redirect_of,
    running,
    says,
    scripted_app,
    tree,
    twiml,
)
from fake_llm import FakeLLM, Reply
from litestar import Litestar

import main

LONG = "One is first. Two comes next. Three is here. Four is near. Five is the end."
SENTENCES = ["One is first.", "Two comes next.", "Three is here.", "Four is near.", "Five is the end."]


async def timed_turn(app: Litestar) -> tuple[httpx.Response, float, list[httpx.Response]]:
    """A call whose caller says "hello": the first document, the seconds it took, and the documents after it."""
    async with running(app) as client:
        twilio = Twilio(client)
        t0 = time.perf_counter()
        first = await twilio.say("hello")
        elapsed = time.perf_counter() - t0
        rest = await twilio.follow(first)
    return first, elapsed, rest


# ----------------------------------------------------------------------------- a call


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


async def test_handle_error_apologises_and_listens() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.post("/handle-error", ErrorCode="11200", ErrorUrl="https://x.example/voice")
    assert tree(answer.content) == listening(app.state.settings.apology)


# ----------------------------------------------------------------------------- streamed replies


async def test_a_short_answer_is_one_document_nested_in_the_next_gather() -> None:
    app = scripted_app(Scripted(replies=["Sure, we open at nine."]))
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.say("when do you open")
    assert tree(answer.content) == listening("Sure, we open at nine.")


async def test_a_long_answer_streams_in_order_with_nothing_lost_or_repeated() -> None:
    model = Scripted(replies=[LONG], gap=0.03)
    app = scripted_app(model)
    async with running(app) as client:
        twilio = Twilio(client)
        docs = await twilio.follow(await twilio.say("count to five"))
    spoken = [text for doc in docs for text in says(doc.content)]
    assert spoken == SENTENCES
    first = docs[0]
    turn = redirect_of(first.content).split("turn=")[1]
    assert tree(first.content) == continuing("One is first.", url=f"/continue?n=1&turn={turn}")
    for n, doc in enumerate(docs[1:-1], start=1):  # intermediate parts are never inside a <Gather>
        root = ET.fromstring(doc.content)
        assert root.find("Gather") is None and redirect_of(doc.content) == f"/continue?n={n + 1}&turn={turn}"
    last = ET.fromstring(docs[-1].content)
    assert [el.tag for el in last] == ["Say"] * (len(says(docs[-1].content)) - 1) + ["Gather"]
    assert last.find("Gather/Say").text == "Five is the end."


async def test_the_first_document_leaves_as_soon_as_the_first_sentence_exists() -> None:
    model = Scripted(replies=[LONG], ttft=0.05, gap=0.1)
    app = scripted_app(model)
    async with running(app) as client:
        twilio = Twilio(client)
        t0 = time.perf_counter()
        first = await twilio.say("count to five")
        elapsed = time.perf_counter() - t0
    # "One is first." is known complete when " Two" arrives: ttft + 3 gaps, long before the 14-token reply ends
    assert says(first.content) == ["One is first."]
    assert 0.3 <= elapsed < 0.9


async def test_a_retried_continuation_gets_the_same_document() -> None:
    app = scripted_app(Scripted(replies=[LONG], gap=0.02))
    async with running(app) as client:
        twilio = Twilio(client)
        first = await twilio.say("count to five")
        url = redirect_of(first.content)
        once, again = await twilio.post(url), await twilio.post(url)
    assert once.content == again.content and says(once.content)


async def test_a_slow_first_token_gets_a_filler_inside_the_deadline() -> None:
    model = Scripted(replies=["Here it is."], ttft=1.2)
    first, elapsed, rest = await timed_turn(scripted_app(model, FIRST_AUDIO_DEADLINE="0.3"))
    turn = redirect_of(first.content).split("turn=")[1]
    assert tree(first.content) == continuing("One moment.", url=f"/continue?n=1&turn={turn}")
    assert 0.3 <= elapsed < 0.8
    assert tree(rest[-1].content) == listening("Here it is.")


async def test_a_stalled_generation_is_cancelled_and_the_caller_hears_an_apology() -> None:
    model = Scripted(replies=["First part is fine. And then the model"], stall_after=5)
    app = scripted_app(model, LLM_TOTAL_TIMEOUT="1", CONTINUE_WAIT="3")
    async with running(app) as client:
        twilio = Twilio(client)
        first = await twilio.say("hello")
        t0 = time.perf_counter()
        rest = await twilio.follow(first)
        elapsed = time.perf_counter() - t0
    assert says(first.content) == ["First part is fine."]
    assert tree(rest[-1].content) == listening(app.state.settings.apology)
    assert elapsed < 3
    assert model.closed == 1  # the stalled stream was closed, not left hanging


async def test_barge_in_cancels_the_generation_and_keeps_only_what_was_sent() -> None:
    model = Scripted(replies=[LONG, "Fine, stopping."], gap=0.15)
    app = scripted_app(model)
    async with concurrent(app) as client:
        twilio = Twilio(client)
        first = await twilio.say("count to five")
        assert says(first.content) == ["One is first."]
        interrupted = await twilio.say("stop please")
        await asyncio.sleep(0.3)
        stale = await twilio.post(redirect_of(first.content))  # the old turn's continuation, if Twilio still asks
    assert tree(interrupted.content) == listening("Fine, stopping.")
    assert model.closed == 2 and len(model.calls) == 2
    assert model.calls[1] == [
        main.Message(role="user", content="count to five"),
        main.Message(role="assistant", content="One is first.", interrupted=True),
        main.Message(role="user", content="stop please"),
    ]
    assert tree(stale.content) == listening()


async def test_a_continuation_for_an_unknown_turn_resumes_listening() -> None:
    app = scripted_app(Scripted())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        unknown = await twilio.post("/continue?n=1&turn=0123456789abcdef")
        malformed = await twilio.post("/continue?n=x&turn=zz")
    assert tree(unknown.content) == listening()
    assert malformed.status_code == 400


async def test_replies_are_capped_at_max_reply_chars() -> None:
    model = Scripted(replies=[" ".join(["This sentence has exactly eight words in it."] * 30)], gap=0.0)
    app = scripted_app(model, MAX_REPLY_CHARS="120")
    async with running(app) as client:
        twilio = Twilio(client)
        spoken = await twilio.turn("talk a lot")
    assert len(" ".join(spoken)) <= 120
    assert spoken == ["This sentence has exactly eight words in it."] * 2 + ["This sentence has exactly."]


async def test_every_document_stays_under_64kb_whatever_the_model_writes() -> None:
    model = Scripted(replies=["word" * 20_000 + "."])
    app = scripted_app(model, MAX_REPLY_CHARS="100000")
    async with running(app) as client:
        twilio = Twilio(client)
        docs = await twilio.follow(await twilio.say("go"))
    assert all(len(d.content) < 64_000 for d in docs)
    assert all(ET.fromstring(d.content).tag == "Response" for d in docs)


async def test_without_streaming_the_whole_reply_comes_in_one_document() -> None:
    app = scripted_app(Scripted(replies=[LONG], gap=0.02), STREAM_REPLIES="0")
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.say("count to five")
    assert tree(answer.content) == listening(*SENTENCES)


# ----------------------------------------------------------------------------- failures


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


# ------------------------------------------------------------------------ through a real SDK against the fake vendor


async def test_barge_in_closes_the_vendor_stream_and_trims_history(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(LONG, gap=0.15), Reply("Okay, stopping."))
    app = main.create_app(env(LLM_PROVIDER="openai", TOOLS="none", **fake_llm.env("openai")))
    async with concurrent(app) as client:
        twilio = Twilio(client)
        first = await twilio.say("count to five")
        interrupted = await twilio.say("stop")
        await fake_llm.until(lambda: fake_llm.posts[0].closed_early)  # the fake saw the stream closed
    assert says(first.content) == ["One is first."]
    assert tree(interrupted.content) == listening("Okay, stopping.")
    assert fake_llm.posts[1].body["messages"][1:] == [
        {"role": "user", "content": "count to five"},
        {"role": "assistant", "content": "One is first."},
        {"role": "user", "content": "stop"},
    ]
    assert not fake_llm.posts[0].completed


async def test_a_slow_vendor_gets_a_filler_then_the_answer(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("Here you go.", ttft=1.0))
    app = main.create_app(
        env(
            LLM_PROVIDER="openai",
            TOOLS="none",
            FIRST_AUDIO_DEADLINE="0.3",
            LLM_FIRST_TOKEN_TIMEOUT="3",
            **fake_llm.env("openai"),
        )
    )
    first, elapsed, rest = await timed_turn(app)
    assert says(first.content) == ["One moment."] and elapsed < 0.8
    assert tree(rest[-1].content) == listening("Here you go.")


async def test_a_vendor_stalling_mid_reply_ends_in_an_apology_in_time(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply("The first part arrives. Then nothing more", stall_after=5))
    app = main.create_app(env(LLM_PROVIDER="openai", TOOLS="none", LLM_TOTAL_TIMEOUT="1.5", **fake_llm.env("openai")))
    async with running(app) as client:
        twilio = Twilio(client)
        t0 = time.perf_counter()
        docs = await twilio.follow(await twilio.say("hello"))
        elapsed = time.perf_counter() - t0
        await fake_llm.until(lambda: fake_llm.posts[0].closed_early)
    assert [t for d in docs for t in says(d.content)] == ["The first part arrives.", app.state.settings.apology]
    assert tree(docs[-1].content)[3][-1][0] == "Gather" and elapsed < 4
