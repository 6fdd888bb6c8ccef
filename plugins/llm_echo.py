"""The offline default model: repeats what it heard, so a person can see the loop work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from main import LLMProvider, Message, Settings, ToolSpec, Usage, hookimpl


class EchoProvider(LLMProvider):
    """Answers 'You said: <last caller turn>.' word by word, like a streaming model."""

    name = "echo"

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.get("ECHO_PREFIX", "You said:")
        self.first_delay = float(settings.get("ECHO_FIRST_TOKEN_MS", "0")) / 1000  # to see fillers and streaming
        self.delay = float(settings.get("ECHO_TOKEN_MS", "0")) / 1000

    async def stream(
        self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | Usage]:
        heard = next((m.content for m in reversed(messages) if m.role == "user"), "")
        reply = f"{self.prefix} {heard.rstrip('.!?')}."
        words = reply.split(" ")
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        for i, word in enumerate(words):
            if i and self.delay:
                await asyncio.sleep(self.delay)
            yield word if i == 0 else " " + word
        yield Usage(input_tokens=sum(len(m.content.split()) for m in messages), output_tokens=len(words))


@hookimpl
def register_llm_providers(register):  # type: ignore[no-untyped-def]
    register("echo", EchoProvider)
