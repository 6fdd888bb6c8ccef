"""ElevenLabs voices: each sentence synthesised by the text-to-speech endpoint, hosted by the core, played with <Play>.

Talks to the REST API with httpx (already a runtime dependency): one POST per sentence. The official
SDK would add pydantic, requests and websockets to the image for that one call.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from main import AudioVoice, ConfigError, ProviderError, Register, Settings, hookimpl

TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}  # output_format codec: content type; both play in <Play>


class ElevenLabsVoice(AudioVoice):
    """POST {ELEVENLABS_BASE_URL}/v1/text-to-speech/{voice_id}?output_format=... with the xi-api-key header."""

    def __init__(self, settings: Settings) -> None:
        self.api_key = settings.require("ELEVENLABS_API_KEY", "TTS_VOICE=elevenlabs")
        self.base_url = settings.get("ELEVENLABS_BASE_URL", "https://api.elevenlabs.io").rstrip("/")
        self.voice_id = settings.get("ELEVENLABS_VOICE_ID", "JBFqnCBsd6RMkjVDRZzb")
        self.model = settings.get("ELEVENLABS_MODEL", "eleven_flash_v2_5")
        self.output_format = settings.get("ELEVENLABS_OUTPUT_FORMAT", "mp3_22050_32")
        if not re.fullmatch(r"[A-Za-z0-9]{8,64}", self.voice_id):
            raise ConfigError(
                f"ELEVENLABS_VOICE_ID={self.voice_id!r} is not a voice id; copy the ID from the "
                "voice's page in ElevenLabs (20 letters and digits, e.g. JBFqnCBsd6RMkjVDRZzb)"
            )
        if not re.fullmatch(r"(mp3|wav)_\d+(_\d+)?", self.output_format):
            raise ConfigError(
                f"ELEVENLABS_OUTPUT_FORMAT={self.output_format!r} is not playable by Twilio; "
                "use an mp3_* or wav_* format, e.g. mp3_22050_32 or wav_8000"
            )
        self.content_type = TYPES[self.output_format.split("_")[0]]
        self.settings_key = "\n".join(["elevenlabs", self.voice_id, self.model, self.output_format])
        self.client: Any = None

    async def aopen(self) -> None:
        import httpx

        # TTS_TIMEOUT bounds the caller's wait (audio.py); this bounds the synthesis finishing for the next caller
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"xi-api-key": self.api_key},
            timeout=20.0,
            transport=httpx.AsyncHTTPTransport(retries=1),
        )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def _post(self, text: str) -> Any:
        return await self.client.post(
            f"/v1/text-to-speech/{self.voice_id}",
            params={"output_format": self.output_format},
            json={"text": text, "model_id": self.model},
            headers={"accept": self.content_type},
        )

    async def synthesize(self, text: str) -> tuple[bytes, str]:
        import httpx

        if self.client is None:
            await self.aopen()
        try:
            response = await self._post(text)
            if response.status_code in (408, 429) or response.status_code >= 500:  # worth one more try
                await asyncio.sleep(0.2)
                response = await self._post(text)
        except httpx.HTTPError as e:
            raise ProviderError(
                f"ElevenLabs unreachable: {type(e).__name__}: {e}", provider="elevenlabs", retryable=True
            ) from e
        if not response.is_success or not response.headers.get("content-type", "").startswith("audio/"):
            status = response.status_code
            raise ProviderError(
                f"ElevenLabs answered {status}: {detail(response)}",
                provider="elevenlabs",
                retryable=status in (408, 429) or status >= 500,
            )
        return response.content, self.content_type

    def relay_attrs(self) -> dict[str, str]:
        return {"ttsProvider": "ElevenLabs", "voice": self.voice_id}


def detail(response: Any) -> str:
    """ElevenLabs' error message: {"detail": {"status": ..., "message": ...}} or a validation list."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or response.headers.get("content-type", "")
    body = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(body, dict):
        body = body.get("message") or body.get("status") or body
    return str(body)[:200]


@hookimpl
def register_tts_voices(register: Register) -> None:
    register("elevenlabs", ElevenLabsVoice)
