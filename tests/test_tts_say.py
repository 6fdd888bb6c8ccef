"""The <Say> voice."""

from __future__ import annotations

import pytest
from conftest import GATHER, Captured, Twilio, env, running, tree, twiml

import main
import observe
from plugins.tts_say import SayVoice


async def test_say_renders_the_configured_voice_and_language() -> None:
    voice = SayVoice(main.load_settings(env(SAY_VOICE="Google.en-GB-Neural2-A", LANGUAGE="en-GB")))
    assert await voice.render("Hello.", base_url="https://x.example") == main.Segment(
        text="Hello.", voice="Google.en-GB-Neural2-A", language="en-GB"
    )


async def test_the_greeting_is_spoken_in_the_selected_voice() -> None:
    app = main.create_app(env(SAY_VOICE="Polly.Matthew-Neural", LANGUAGE="en-US", GREETING="Howdy."))
    async with running(app) as client:
        response = await Twilio(client).call()
        audio = await client.get("/audio/" + "0" * 32 + ".mp3")
    assert tree(response.content) == twiml(
        lambda r: r.gather(**GATHER).say("Howdy.", voice="Polly.Matthew-Neural", language="en-US")
    )
    assert audio.status_code == 404  # a <Say> voice hosts no audio


# Names from Twilio's list (twilio-node's SayVoice type), one of each shape.
VOICES = [
    "man",
    "woman",
    "alice",
    "Polly.Joanna",
    "Polly.Joanna-Neural",
    "Polly.Joanna-Generative",
    "Polly.Mía-Generative",
    "Polly.Rémi-Generative",
    "Google.en-US-Standard-C",
    "Google.de-DE-Wavenet-B",
    "Google.en-US-Neural2-F",
    "Google.en-US-Chirp3-HD-Aoede",
    "Google.cmn-CN-Chirp3-HD-Charon",
    "Google.fil-ph-Neural2-A",
]


@pytest.mark.parametrize("name", VOICES)
def test_every_shape_of_twilio_voice_name_is_accepted(name: str) -> None:
    assert SayVoice(main.load_settings(env(SAY_VOICE=f" {name} "))).voice == name


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("Joanna-Neural", "; did you mean 'Polly.Joanna-Neural'?"),
        ("en-US-Neural2-F", "; did you mean 'Google.en-US-Neural2-F'?"),
        ("polly.joanna-neural", "; voice names are case-sensitive"),
        ("Polly.Joanna-neural", "; voice names are case-sensitive"),
        ("Google.en-US-Journey-O", ""),
        ("Polly.Joanna-Neural2", ""),
        ("Google.en-US-Neural2", ""),
        ("Google.en-US-Chirp3-HD", ""),
        ("gcloud.en-US-Standard-A", ""),
        ("Polly.Joanna Neural", ""),
    ],
)
def test_a_misshapen_voice_name_stops_startup_with_a_fix(name: str, hint: str) -> None:
    with pytest.raises(main.ConfigError) as caught:
        main.create_app(env(SAY_VOICE=name))
    assert str(caught.value) == (
        f"SAY_VOICE={name!r} is not a Twilio <Say> voice name{hint}. Use man, woman, alice, Polly.<Name> with "
        "an optional -Neural or -Generative (e.g. Polly.Joanna-Neural), Google.<ll-CC>-<Standard|Wavenet|Neural2>-"
        "<letter> (e.g. Google.en-US-Neural2-F) or Google.<ll-CC>-Chirp3-HD-<Name> (e.g. "
        "Google.en-US-Chirp3-HD-Aoede); see https://www.twilio.com/docs/voice/twiml/say/text-speech"
    )


def test_a_google_voice_of_another_language_is_warned_about(logs: Captured) -> None:
    SayVoice(main.load_settings(env(SAY_VOICE="Google.de-DE-Wavenet-B", LANGUAGE="en-US")))
    SayVoice(main.load_settings(env(SAY_VOICE="Google.en-US-Wavenet-B", LANGUAGE="en-US")))
    assert logs.lines == [
        "warning SAY_VOICE is a voice of another language than LANGUAGE; Twilio may refuse it "
        "voice=Google.de-DE-Wavenet-B language=en-US"
    ]


@pytest.mark.parametrize(
    ("name", "attrs"),
    [
        ("Polly.Joanna-Neural", {"ttsProvider": "Amazon", "voice": "Joanna-Neural"}),
        ("Polly.Matthew-Generative", {"ttsProvider": "Amazon", "voice": "Matthew-Generative"}),
        ("Polly.Amy", {"ttsProvider": "Amazon", "voice": "Amy"}),
        ("Google.en-US-Neural2-F", {"ttsProvider": "Google", "voice": "en-US-Neural2-F"}),
        ("Google.en-US-Chirp3-HD-Aoede", {"ttsProvider": "Google", "voice": "en-US-Chirp3-HD-Aoede"}),
    ],
)
def test_relay_mode_gets_the_same_voice(name: str, attrs: dict[str, str], logs: Captured) -> None:
    assert SayVoice(main.load_settings(env(SAY_VOICE=name))).relay_attrs() == attrs
    assert logs.lines == []


def test_legacy_voices_get_an_amazon_voice_in_relay_mode_with_a_note(logs: Captured) -> None:
    observe.setup_logging(main.load_settings(env()))  # as create_app does: info lines are logged
    man, alice = (SayVoice(main.load_settings(env(SAY_VOICE=v))) for v in ("man", "alice"))
    assert man.relay_attrs() == man.relay_attrs() == {"ttsProvider": "Amazon", "voice": "Matthew-Neural"}
    assert alice.relay_attrs() == {"ttsProvider": "Amazon", "voice": "Joanna-Neural"}
    assert logs.lines == [
        "info ConversationRelay has no legacy <Say> voices; relay mode speaks with an Amazon voice voice=man "
        "relay_voice=Matthew-Neural",
        "info ConversationRelay has no legacy <Say> voices; relay mode speaks with an Amazon voice voice=alice "
        "relay_voice=Joanna-Neural",
    ]
