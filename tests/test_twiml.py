"""TwiML documents: continuations, caller text that cannot become markup, and Twilio's 64 KB limit."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from conftest import VOICE, Twilio, continuing, env, listening, running, tree, twiml

import main
from twiml import gather_tag, hang_up_after, render


def test_continuing_documents_redirect_to_the_continuation() -> None:
    doc = render([main.Segment(text="Part one.", **VOICE)], gather="", next_url="/continue?n=1&turn=abc")
    assert tree(doc) == continuing("Part one.", url="/continue?n=1&turn=abc")


def test_a_last_phrase_is_spoken_then_the_call_hangs_up() -> None:
    said = hang_up_after(main.Segment(text="Goodbye & thanks!", **VOICE))
    played = hang_up_after(main.Segment(url="https://example.com/audio/ab.mp3"))
    assert tree(said) == twiml(lambda r: (r.say("Goodbye & thanks!", **VOICE), r.hangup()))
    assert tree(played) == twiml(lambda r: (r.play("https://example.com/audio/ab.mp3"), r.hangup()))


def test_documents_stay_under_64kb() -> None:
    huge = [main.Segment(text="word " * 5000) for _ in range(30)]
    doc = render([*huge, main.END], gather=gather_tag(main.load_settings({})))
    assert len(doc) < 64_000
    assert ET.fromstring(doc).tag == "Response"


async def test_caller_text_cannot_inject_twiml() -> None:
    app = main.create_app(env())
    async with running(app) as client:
        twilio = Twilio(client)
        await twilio.call()
        answer = await twilio.say('</Say><Hangup/><Say>& "quoted" \x00\x07 bell')
    assert tree(answer.content) == listening('You said: </Say><Hangup/><Say>& "quoted" bell.')
