"""The offline default model: repeats what it heard, so a person can see the loop work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from main import Event, LLMProvider, Message, Register, Settings, ToolCall, ToolSpec, Usage, hookimpl

# fixed phrases that make the echo model call a tool (when the core offers it), so the dev phone can show tools
TRIGGERS = {"transfer_call": ("transfer me", "talk to a person"), "end_call": ("goodbye", "that's all")}
AFTER_TOOL = {"transfer_call": "Transferring you now.", "end_call": "Goodbye!"}


class EchoProvider(LLMProvider):
    """Answers 'You said: <last caller turn>.' word by word, like a streaming model; calls tools on fixed phrases."""

    name = "echo"

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.get("ECHO_PREFIX", "You said:")
        self.first_delay = (
            settings.number("ECHO_FIRST_TOKEN_MS", 0.0, inclusive=True, unit="ms") / 1000
        )  # to see fillers and streaming
        self.delay = settings.number("ECHO_TOKEN_MS", 0.0, inclusive=True, unit="ms") / 1000

    async def stream(
        self, messages: Sequence[Message], *, system: str, tools: Sequence[ToolSpec] = ()
    ) -> AsyncGenerator[Event]:
        used = sum(len(m.content.split()) for m in messages)
        last = messages[-1] if messages else None
        if last is not None and last.role == "tool":  # a tool has run: say what happens next
            asked_for = next((c.name for m in reversed(messages) for c in m.tool_calls), "")
            reply = AFTER_TOOL.get(asked_for, "Okay.")
            yield reply
            yield Usage(input_tokens=used, output_tokens=len(reply.split()))
            return
        heard = next((m.content for m in reversed(messages) if m.role == "user"), "")
        offered = {t.name for t in tools}
        asked = last is not None and last.role == "user"
        for tool, phrases in TRIGGERS.items():
            if asked and tool in offered and any(p in heard.lower() for p in phrases):
                yield ToolCall(id=f"echo-{tool}-{len(messages)}", name=tool, arguments={})
                yield Usage(input_tokens=used, output_tokens=1)
                return
        reply = f"{self.prefix} {heard.rstrip('.!?')}."
        words = reply.split(" ")
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        for i, word in enumerate(words):
            if i and self.delay:
                await asyncio.sleep(self.delay)
            yield word if i == 0 else " " + word
        yield Usage(input_tokens=used, output_tokens=len(words))


@hookimpl
def register_llm_providers(register: Register) -> None:
    register("echo", EchoProvider)
