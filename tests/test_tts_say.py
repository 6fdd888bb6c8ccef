"""The <Say> voice."""

from __future__ import annotations

from conftest import GATHER, Twilio, env, running, tree, twiml

import main
from plugins.tts_say import SayVoice


async def test_say_renders_the_configured_voice_and_language() -> None:
    voice = SayVoice(main.load_settings(env(SAY_VOICE="Google.en-GB-Neural2-A", LANGUAGE="en-GB")))
    assert await voice.render("Hello.", base_url="https://x.example") == main.Segment(
        text="Hello.", voice="Google.en-GB-Neural2-A", language="en-GB")


async def test_the_greeting_is_spoken_in_the_selected_voice() -> None:
    app = main.create_app(env(SAY_VOICE="Polly.Matthew-Neural", LANGUAGE="en-US", GREETING="Howdy."))
    async with running(app) as client:
        response = await Twilio(client).call()
    assert tree(response.content) == twiml(
        lambda r: r.gather(**GATHER).say("Howdy.", voice="Polly.Matthew-Neural", language="en-US"))
