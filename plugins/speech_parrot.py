"""The offline speech model: it finds each utterance by its loudness and plays it back.

SPEECH_MODEL=parrot (the default) needs no key and no network, so media mode's whole audio path works on a
fresh machine: frames in, turn detection, audio out, marks and barge-in. It has no transcripts (history
stores "(audio)"), answers keypad digits with a short tone per digit, and never calls tools.

PARROT_THRESHOLD_DB (default -40) is the loudness that counts as speech, PARROT_SILENCE_MS (default 500)
the quiet that ends an utterance, PARROT_MAX_MS (default 10000) the longest utterance it keeps.

PARROT_IDLE_MS (default 8000, 0 turns it off) is its idle timeout, counted in the caller's audio like a
vendor's: when the caller says nothing for that long after a reply has played (or from the start), it
reports CallerSilent (a miss in media mode). Having no words to reprompt with, it plays a short tone, so
the caller hears the line is alive; the goodbye after MAX_MISSES is the core's, in the call's voice.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence

from main import (
    FRAME,
    CallerDone,
    CallerSilent,
    CallerSpeaking,
    Message,
    Register,
    ReplyDone,
    Settings,
    SpeechAudio,
    SpeechEvent,
    SpeechModel,
    SpeechSession,
    ToolSpec,
    energy_db,
    hookimpl,
    pcm16_to_ulaw,
)

PIECE = FRAME * 5  # bytes of audio per event: 100 ms, as a vendor streams its deltas
START_FRAMES = 2  # loud frames in a row that begin an utterance (a click is not speech)


class ParrotSession(SpeechSession):
    """One conversation: utterances in, the same audio back."""

    def __init__(self, threshold: float, silence_frames: int, max_bytes: int, idle_frames: int = 0) -> None:
        self.threshold, self.silence_frames, self.max_bytes = threshold, silence_frames, max_bytes
        self.idle_frames = idle_frames  # frames without speech that make an idle timeout (0: never)
        self.idle = 0  # frames without speech since the last reply played (or the start); negative while it plays
        self.queue: asyncio.Queue[SpeechEvent | None] = asyncio.Queue()
        self.buffer = bytearray()  # audio not yet a whole frame
        self.utterance = bytearray()
        self.loud = self.quiet = 0
        self.speaking = False
        self.replies = 0
        self.truncated: list[tuple[str, int]] = []  # what the caller heard of each interrupted reply

    def send_audio(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= FRAME:
            frame = bytes(self.buffer[:FRAME])
            del self.buffer[:FRAME]
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        loud = energy_db(frame) >= self.threshold
        if not self.speaking:
            self.loud = self.loud + 1 if loud else 0
            self.utterance += frame
            del self.utterance[: -START_FRAMES * FRAME]  # keep the start of the utterance, not the silence before
            if self.loud >= START_FRAMES:
                self.speaking, self.quiet, self.idle = True, 0, 0
                self.queue.put_nowait(CallerSpeaking())
            else:
                self._idle()
            return
        self.utterance += frame
        self.quiet = 0 if loud else self.quiet + 1
        if self.quiet >= self.silence_frames or len(self.utterance) >= self.max_bytes:
            spoken = bytes(self.utterance[: len(self.utterance) - self.quiet * FRAME])
            self.utterance.clear()
            self.speaking, self.loud = False, 0
            self.queue.put_nowait(CallerDone())
            self._reply(spoken)

    def _idle(self) -> None:
        self.idle += 1
        if self.idle_frames and self.idle >= self.idle_frames:
            self.queue.put_nowait(CallerSilent())
            self._reply(NUDGE)

    def _reply(self, audio: bytes) -> None:
        self.idle = -math.ceil(len(audio) / FRAME)  # the idle time counts once the reply has played
        self.replies += 1
        item = f"parrot_{self.replies}"
        for start in range(0, len(audio), PIECE):
            self.queue.put_nowait(SpeechAudio(item=item, data=audio[start : start + PIECE]))
        self.queue.put_nowait(ReplyDone())

    async def send_text(self, text: str) -> None:
        digits = [c for c in text if c in "0123456789*#"]
        self._reply(b"".join(tone(600 + 40 * n, 150) for n in range(len(digits))))

    async def tool_result(self, call_id: str, output: str) -> None:
        return None  # parrot never calls tools

    async def truncate(self, item: str, heard_ms: int) -> None:
        self.truncated.append((item, heard_ms))

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self.queue.get()) is not None:
            yield event

    async def close(self) -> None:
        self.queue.put_nowait(None)


def tone(hz: float, ms: int) -> bytes:
    """A sine tone as 8 kHz μ-law audio."""
    samples = [int(8000 * math.sin(2 * math.pi * hz * n / 8000)) for n in range(ms * 8)]
    return pcm16_to_ulaw(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))


NUDGE = tone(440, 200)  # what it plays when the caller stays silent: it has no words for a reprompt


class Parrot(SpeechModel):
    """Plays each utterance back: the whole media path with no vendor."""

    name = "parrot"

    def __init__(self, settings: Settings) -> None:
        self.threshold = settings.number("PARROT_THRESHOLD_DB", -40.0, minimum=-100)
        self.silence_frames = max(1, int(settings.number("PARROT_SILENCE_MS", 500, unit="ms")) // 20)
        self.max_bytes = int(settings.number("PARROT_MAX_MS", 10000, unit="ms")) * 8
        self.idle_frames = math.ceil(settings.number("PARROT_IDLE_MS", 8000, inclusive=True, unit="ms") / 20)

    async def open(self, *, instructions: str, tools: Sequence[ToolSpec], history: Sequence[Message]) -> ParrotSession:
        return ParrotSession(self.threshold, self.silence_frames, self.max_bytes, self.idle_frames)


@hookimpl
def register_speech_models(register: Register) -> None:
    register("parrot", Parrot)
