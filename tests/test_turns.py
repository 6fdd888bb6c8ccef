"""Streamed replies in Gather mode: first sentence at once, the rest by continuation, deadlines, barge-in."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET

import httpx
from conftest import (
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
)
from fake_llm import FakeLLM, Reply
from litestar import Litestar

import calls
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


def test_turn_ids_carry_their_age() -> None:
    turn = calls.new_turn_id()
    assert 0 <= calls.turn_age(turn) < 1
    assert calls.turn_age("zz") == float("inf")


async def test_without_streaming_the_whole_reply_comes_in_one_document() -> None:
    app = scripted_app(Scripted(replies=[LONG], gap=0.02), STREAM_REPLIES="0")
    async with running(app) as client:
        twilio = Twilio(client)
        answer = await twilio.say("count to five")
    assert tree(answer.content) == listening(*SENTENCES)


# ----------------------------------------------------------------------------- through a real SDK against the fake vendor


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
    app = main.create_app(env(LLM_PROVIDER="openai", TOOLS="none", FIRST_AUDIO_DEADLINE="0.3", LLM_FIRST_TOKEN_TIMEOUT="3",
                              **fake_llm.env("openai")))
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
