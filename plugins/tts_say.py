"""The default voice: Twilio's own <Say>, any Polly or Google voice name, no audio hosting."""

from __future__ import annotations

from main import Segment, Settings, TTSVoice, hookimpl


class SayVoice(TTSVoice):
    """Speaks through <Say voice=SAY_VOICE language=LANGUAGE>."""

    instant = True  # render() never waits, so the turn engine renders inline

    def __init__(self, settings: Settings) -> None:
        self.voice = settings.get("SAY_VOICE", "Polly.Joanna-Neural")
        self.language = settings.language

    async def render(self, text: str, *, base_url: str) -> Segment:
        return Segment(text=text, voice=self.voice, language=self.language)


@hookimpl
def register_tts_voices(register):  # type: ignore[no-untyped-def]
    register("say", SayVoice)
