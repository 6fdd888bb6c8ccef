"""Hosted audio: a voice that synthesises audio is spoken with <Play> of a URL this service serves.

A voice with `synthesize(text) -> (audio bytes, content type)` (contract.AudioVoice) is wrapped in Hosted
at startup. Each segment's audio lives in the session backend (put_blob, with a TTL) under an
unguessable key: an HMAC of the voice settings and the text, keyed with a secret derived from
TWILIO_AUTH_TOKEN, so every replica computes the same key and serves what any other synthesised.
`GET /audio/{key}.{ext}` serves it. A failing vendor never means silence: that segment is spoken
with <Say> in FALLBACK_SAY_VOICE instead, logged, and counted in observe.audio_counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from typing import Any, cast

from litestar import asgi

from contract import (
    AudioVoice,
    ProviderError,
    Segment,
    SessionBackend,
    Settings,
    TTSVoice,
    log,
    say_voice,
)
from observe import audio_counts
from webhooks import Receive, Scope, Send, refuse_upgrade

EXTENSIONS = {"audio/mpeg": "mp3", "audio/wav": "wav"}  # what <Play> gets from us, by content type
_NAME = re.compile(r"([0-9a-f]{32})\.(mp3|wav)")
FIXED_TTL = 86400.0  # seconds the fixed phrases' audio stays in the backend for other replicas


def host(voice: TTSVoice | AudioVoice, backend: SessionBackend, settings: Settings) -> TTSVoice:
    """The voice calls speak with: an audio voice wrapped in Hosted, any other as it is."""
    if voice.synthesizes:
        return Hosted(cast(AudioVoice, voice), backend, settings)
    return cast(TTSVoice, voice)


class Hosted(TTSVoice):
    """Renders an audio voice: synthesise once per (settings, text), store, and point <Play> at it."""

    hosts_audio = True  # the engine retries a fixed phrase that fell back to <Say>

    def __init__(self, voice: AudioVoice, backend: SessionBackend, settings: Settings) -> None:
        self.voice, self.backend, self.name = voice, backend, settings.tts_voice
        fallback = settings.get("FALLBACK_SAY_VOICE", "Polly.Joanna-Neural").strip()
        self.fallback = say_voice("FALLBACK_SAY_VOICE", fallback)
        self.language = settings.language
        self.ttl = settings.number("AUDIO_TTL", 900.0, unit="seconds")
        self.timeout = settings.number("TTS_TIMEOUT", 5.0, unit="seconds")
        token = settings.twilio_auth_token.encode()  # ALLOW_UNSIGNED without a token: keys hold for this process
        self.secret = hmac.digest(token, b"switchboard audio", "sha256") if token else secrets.token_bytes(32)
        phrases = (
            settings.greeting,
            settings.filler,
            settings.reprompt,
            settings.low_confidence,
            settings.goodbye,
            settings.apology,
        )
        self.fixed = {self.key(text): text for text in phrases}  # any replica can voice these on demand
        self.pinned: dict[str, bytes] = {}  # the fixed phrases' audio, kept in this process
        self.making: dict[str, asyncio.Future[bytes]] = {}
        if not settings.get("FALLBACK_SAY_VOICE") and not settings.language.lower().startswith("en"):
            log.warning(
                "FALLBACK_SAY_VOICE is an English voice; set it to a <Say> voice of LANGUAGE",
                extra={"language": settings.language, "fallback": self.fallback},
            )

    def key(self, text: str) -> str:
        """The audio's key: unguessable without the server secret, the same on every replica."""
        return hmac.new(self.secret, f"{self.voice.settings_key}\n{text}".encode(), hashlib.sha256).hexdigest()[:32]

    async def aopen(self) -> None:
        await self.voice.aopen()

    async def aclose(self) -> None:
        making = list(self.making.values())  # syntheses nobody waits for any more
        for future in making:
            future.cancel()
        await asyncio.gather(*making, return_exceptions=True)
        await self.voice.aclose()

    def relay_attrs(self) -> dict[str, str]:
        return self.voice.relay_attrs()

    async def render(self, text: str, *, base_url: str) -> Segment:
        key = self.key(text)
        try:
            async with asyncio.timeout(self.timeout):
                blob = await self.audio(key, text)
        except Exception as e:  # a vendor failure, a timeout, the backend or a plugin bug: Twilio speaks it
            audio_counts["fallback"] += 1
            error = f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__
            log.warning("voice failed, speaking with FALLBACK_SAY_VOICE", extra={"voice": self.name, "error": error})
            return Segment(text=text, voice=self.fallback, language=self.language)
        return Segment(text=text, url=f"{base_url}/audio/{key}.{EXTENSIONS[content_type(blob)]}")

    async def audio(self, key: str, text: str) -> bytes:
        """The stored audio for key, synthesised once however many ask at the same time."""
        if (blob := self.pinned.get(key)) is not None:
            return blob
        if (future := self.making.get(key)) is None:
            future = self.making[key] = asyncio.ensure_future(self._make(key, text))
            future.add_done_callback(lambda f: (self.making.pop(key, None), f.cancelled() or f.exception()))
        return await asyncio.shield(future)  # a caller that gives up leaves the audio to be stored for the next

    async def _make(self, key: str, text: str) -> bytes:
        fixed = key in self.fixed
        if (blob := await self.backend.get_blob(f"audio:{key}")) is not None:
            audio_counts["reused"] += 1
        else:
            data, ctype = await self.voice.synthesize(text)
            if ctype not in EXTENSIONS or not data:
                raise ProviderError(f"{self.name} gave {len(data)} bytes of {ctype!r}", provider=self.name)
            blob = ctype.encode() + b"\n" + data
            await self.backend.put_blob(f"audio:{key}", blob, FIXED_TTL if fixed else self.ttl)
            audio_counts["synthesized"] += 1
        if fixed:
            self.pinned[key] = blob
        return blob


def content_type(blob: bytes) -> str:
    """The content type a stored blob starts with."""
    return blob.partition(b"\n")[0].decode("latin-1")


def route(voice: TTSVoice, backend: SessionBackend) -> Any:
    """GET /audio/{key}.{ext}: hosted audio, for Twilio's <Play> (raw ASGI like the webhooks)."""
    hosted = voice if isinstance(voice, Hosted) else None

    async def lookup(key: str) -> bytes | None:
        if hosted is not None and key in hosted.fixed:  # evicted or never made here: voice it now
            return await hosted.audio(key, hosted.fixed[key])
        return await backend.get_blob(f"audio:{key}")

    @asgi("/audio", is_mount=True, copy_scope=False, name="audio")
    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await refuse_upgrade(send, "/audio")
        t0 = time.perf_counter()
        status, body, ctype = 200, b"", "text/plain"
        match = _NAME.fullmatch(scope["path"].strip("/"))  # the mount leaves "/{key}.{ext}/"
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, b"405 method not allowed\n"
        elif match is None:
            status, body = 400, b"400 malformed audio key\n"
        else:
            try:
                blob = await lookup(match.group(1))
            except Exception as e:  # the backend or, for a fixed phrase, the vendor: Twilio may retry
                log.warning("audio unavailable", extra={"route": "/audio", "error": f"{type(e).__name__}: {e}"[:300]})
                blob, status, body = None, 503, b"503 audio unavailable\n"
            if blob is not None and EXTENSIONS.get(ctype := content_type(blob)) == match.group(2):
                body = blob.partition(b"\n")[2]
                audio_counts["served"] += 1
            elif status == 200:
                audio_counts["missing"] += 1
                status, body, ctype = 404, b"404 no such audio\n", "text/plain"
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        if status == 200:  # a key names one text in one voice for good
            headers.append((b"cache-control", b"public, max-age=3600, immutable"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        ms = round((time.perf_counter() - t0) * 1000, 2)
        log.info("request", extra={"route": "/audio", "status": status, "ms": ms})

    return serve
