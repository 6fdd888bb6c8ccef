"""OpenAI's voices: each sentence synthesised by the speech endpoint, hosted by the core, played with <Play>."""

from __future__ import annotations

from typing import Any

from main import AudioVoice, ConfigError, ProviderError, Register, Settings, VendorSDK, hookimpl, log

FORMATS = {"mp3": "audio/mpeg", "wav": "audio/wav"}  # response_format: content type; both play in <Play>
# ConversationRelay speaks with Google, Amazon or ElevenLabs voices only; this one stands in there.
RELAY_DEFAULT = {"ttsProvider": "Amazon", "voice": "Joanna-Neural"}


class OpenAIVoice(VendorSDK, AudioVoice):
    """POST {OPENAI_BASE_URL}/audio/speech through the openai SDK (imported in the background: main.VendorSDK)."""

    name = "openai"
    package = "openai"

    def __init__(self, settings: Settings) -> None:
        self.api_key = settings.require("OPENAI_API_KEY", "TTS_VOICE=openai")
        self.base_url = settings.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        self.model = settings.get("OPENAI_TTS_MODEL", "gpt-4o-mini-tts")
        self.voice = settings.get("OPENAI_TTS_VOICE", "alloy")
        self.format = settings.get("OPENAI_TTS_FORMAT", "mp3")
        self.instructions = settings.get("OPENAI_TTS_INSTRUCTIONS")
        if self.format not in FORMATS:
            raise ConfigError(f"OPENAI_TTS_FORMAT={self.format!r} is not playable by Twilio; use mp3 or wav")
        self.settings_key = "\n".join(["openai", self.model, self.voice, self.format, self.instructions])
        self.noted = False
        super().__init__("TTS_VOICE=openai")

    async def connect(self, sdk: Any) -> Any:
        # TTS_TIMEOUT bounds the caller's wait (audio.py); this bounds the synthesis finishing for the next caller
        return sdk.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, timeout=20.0, max_retries=1)

    async def synthesize(self, text: str) -> tuple[bytes, str]:
        client = await self.ready()
        openai = self.sdk
        voice: Any = {"id": self.voice} if self.voice.startswith("voice_") else self.voice  # a custom voice
        extra = {"instructions": self.instructions} if self.instructions else {}
        try:
            response = await client.audio.speech.create(
                model=self.model, voice=voice, input=text, response_format=self.format, **extra
            )
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            retryable = status is None or status in (408, 409, 429) or status >= 500
            raise ProviderError(f"OpenAI speech failed: {e}", provider="openai", retryable=retryable) from e
        ctype = response.response.headers.get("content-type", "")
        if not ctype.startswith("audio/"):
            raise ProviderError(f"OpenAI speech answered {ctype!r}, not audio", provider="openai")
        return response.content, FORMATS[self.format]

    def relay_attrs(self) -> dict[str, str]:
        if not self.noted:
            self.noted = True
            log.info(
                "OpenAI voices are not available in ConversationRelay; relay mode speaks with an Amazon voice",
                extra={"relay_voice": RELAY_DEFAULT["voice"]},
            )
        return dict(RELAY_DEFAULT)


@hookimpl
def register_tts_voices(register: Register) -> None:
    register("openai", OpenAIVoice)
