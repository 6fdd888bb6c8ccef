"""The default voice: Twilio's own <Say>, any Polly or Google voice name, no audio hosting."""

from __future__ import annotations

import re

from main import Register, Segment, Settings, TTSVoice, hookimpl, log, say_voice

PROVIDERS = {"Polly": "Amazon", "Google": "Google"}  # <Say> prefix: ConversationRelay ttsProvider
LEGACY = {"man": "Matthew-Neural", "woman": "Joanna-Neural", "alice": "Joanna-Neural"}  # their Amazon stand-ins


class SayVoice(TTSVoice):
    """Speaks through <Say voice=SAY_VOICE language=LANGUAGE>."""

    instant = True  # render() never waits, so the turn engine renders inline

    def __init__(self, settings: Settings) -> None:
        self.voice = say_voice("SAY_VOICE", settings.get("SAY_VOICE", "Polly.Joanna-Neural").strip())
        self.language = settings.language
        locale = re.match(r"Google\.([a-z]+-[A-Za-z]+)-", self.voice)
        if locale and locale.group(1).lower() != self.language.lower():  # Twilio may refuse the pair
            log.warning(
                "SAY_VOICE is a voice of another language than LANGUAGE; Twilio may refuse it",
                extra={"voice": self.voice, "language": self.language},
            )
        self.noted = False

    async def render(self, text: str, *, base_url: str) -> Segment:
        return Segment(text=text, voice=self.voice, language=self.language)

    def relay_attrs(self) -> dict[str, str]:
        """Polly.Joanna-Neural is Amazon's Joanna-Neural there, Google.en-US-Neural2-F Google's en-US-Neural2-F."""
        prefix, _, name = self.voice.partition(".")
        if name:
            return {"ttsProvider": PROVIDERS[prefix], "voice": name}
        if not self.noted:
            self.noted = True
            log.info(
                "ConversationRelay has no legacy <Say> voices; relay mode speaks with an Amazon voice",
                extra={"voice": self.voice, "relay_voice": LEGACY[self.voice]},
            )
        return {"ttsProvider": "Amazon", "voice": LEGACY[self.voice]}


@hookimpl
def register_tts_voices(register: Register) -> None:
    register("say", SayVoice)
